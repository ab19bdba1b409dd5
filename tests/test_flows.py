"""The Prefect flows on a real Dask LocalCluster with worker processes, tracked in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import xarray as xr

from ddr import stores
from ddr.config import load_config
from ddr.tracking import experiment_name, tracking_uri
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_pipeline_maps_shards_on_dask_and_logs_one_mlflow_run_per_stage(tmp_path: Path) -> None:
    from flows.capture import capture_flow
    from flows.pipeline import pipeline_flow

    overrides = [
        f"data_root={tmp_path}",
        *TINY,
        "infrastructure.n_workers=2",
        "stages.timestep_analysis.top_k=5",
        "stages.timestep_analysis.channel_block=128",
        "stages.plots.channels_per_shard=8",
    ]
    result = pipeline_flow(overrides=overrides, stages=["capture", "timestep_analysis", "plots"])
    config = load_config(overrides)
    layout = stores.ExperimentLayout(config.experiment_dir)
    ds = xr.open_zarr(layout.capture_store)
    assert result["capture"]["captured"] == 5 and not np.isnan(ds.raw.values).any()
    for kind in ("raw", "sae"):
        analysis = xr.open_zarr(layout.analysis_store(kind))
        assert analysis.sizes["channel"] == ds.sizes["channel" if kind == "raw" else "feature"]
        index = json.loads((layout.plots_dir(kind) / "index.json").read_text())
        assert result["plots"][kind]["plots"] == len(list(layout.plots_dir(kind).glob("channel_*"))) > 0
        assert index

    client = mlflow.MlflowClient(tracking_uri(config))
    run = client.get_run(result["capture"]["mlflow_run_id"])
    assert run.data.params["model.name"] == "tiny"
    assert run.data.params["stages.capture.samples_per_shard"] == "4"
    assert run.data.metrics["samples"] == 5 and run.data.metrics["samples_per_second"] > 0
    assert "capture_contact_sheet.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    experiment = client.get_experiment_by_name(experiment_name(config))
    runs = client.search_runs([experiment.experiment_id])
    assert {r.data.tags["ddr.stage"] for r in runs} == {"capture", "timestep_analysis", "plots"}
    assert all(r.data.tags.get("prefect.flow_run_id") for r in runs)
    analysis_run = next(r for r in runs if r.data.tags["ddr.stage"] == "timestep_analysis")
    assert analysis_run.data.metrics["raw_channels"] == 64

    again = capture_flow(overrides=overrides)
    assert again["captured"] == 0, "a rerun skips every completed shard"
