"""The Prefect flows on a real Dask LocalCluster with worker processes, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import xarray as xr

from ddr import stores
from ddr.config import load_config
from ddr.tracking import tracking_uri
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_capture_flow_maps_shards_on_dask_and_logs_an_mlflow_run(tmp_path: Path) -> None:
    from flows.capture import capture_flow

    overrides = [f"data_root={tmp_path}", *TINY, "infrastructure.n_workers=2"]
    result = capture_flow(overrides=overrides)
    config = load_config(overrides)
    ds = xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).capture_store)
    assert result["captured"] == 5 and not np.isnan(ds.raw.values).any()

    client = mlflow.MlflowClient(tracking_uri(config))
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["model.name"] == "tiny"
    assert run.data.params["stages.capture.samples_per_shard"] == "4"
    assert run.data.metrics["samples"] == 5 and run.data.metrics["samples_per_second"] > 0
    assert run.data.tags["prefect.flow_run_id"]
    assert "capture_contact_sheet.png" in [a.path for a in client.list_artifacts(run.info.run_id)]

    again = capture_flow(overrides=overrides)
    assert again["captured"] == 0, "a rerun skips every completed shard"
