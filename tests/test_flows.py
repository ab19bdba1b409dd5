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


def test_deep_dream_sweep_makes_one_nested_mlflow_run_per_combination(tmp_path: Path) -> None:
    from ddr.stages import analysis
    from flows.deep_dream import deep_dream_sweep_flow, expand_grid
    from tests.conftest import tiny_config
    from tests.helpers import run_capture

    base = [*TINY[:1], "use_sae=false", "stages.capture.dev_n_prompts=3", "stages.timestep_analysis.top_k=8"]
    config = tiny_config(tmp_path, *base)
    run_capture(config)
    analysis.run_analysis(config, "raw")
    active = xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).analysis_store("raw")).active.any("t")
    channel = int(np.flatnonzero(active.values)[0])

    overrides = [
        f"data_root={tmp_path}",
        *base,
        "infrastructure.n_workers=1",
        "stages.deep_dream.use_prior=false",
        "stages.deep_dream.num_steps=2",
        "stages.deep_dream.n_results=1",
        "stages.deep_dream.use_just_one_timestep=true",
        f"stages.deep_dream.channels=[{channel}]",
    ]
    grid = ["learning_rate=0.01,0.1", "total_variation_penalty_weight=0.1,0.5"]
    assert len(expand_grid(grid)) == 4
    result = deep_dream_sweep_flow(grid=grid, overrides=overrides)

    client = mlflow.MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(experiment_name(config))
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'"
    )
    assert len(children) == 4
    settings = {
        (
            r.data.params["stages.deep_dream.learning_rate"],
            r.data.params["stages.deep_dream.total_variation_penalty_weight"],
        )
        for r in children
    }
    assert settings == {("0.01", "0.1"), ("0.01", "0.5"), ("0.1", "0.1"), ("0.1", "0.5")}
    for run in children:
        assert "raw_mean_normalized_activation" in run.data.metrics
        assert client.get_metric_history(run.info.run_id, "raw_step_activation")
    run_names = {m["run_name"] for m in result["members"]}
    for name in run_names:
        assert stores.ExperimentLayout(config.experiment_dir).dream_store(name, "raw").exists()


def test_each_config_tracks_into_its_own_data_root(tmp_path: Path, monkeypatch) -> None:
    from ddr.tracking import stage_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = (load_config([f"data_root={tmp_path / name}", "use_sae=false"]) for name in ("a", "b"))
    with stage_run(first, "capture"):
        pass
    assert tracking_uri(second) == f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"
    with stage_run(second, "capture") as run:
        pass
    assert mlflow.MlflowClient(tracking_uri(second)).get_run(run.info.run_id).info.run_id == run.info.run_id
