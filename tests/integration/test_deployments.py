"""The repository's prefect.yaml end to end: a real server, a process work pool, `prefect deploy`, a worker,
`prefect deployment run ddr-capture/local` and `ddr-timestep-analysis/local`, both to Completed."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mlflow
import numpy as np
import xarray as xr
import yaml

from ddr import stores
from tests.conftest import TINY
from tests.integration.services import REPO, PrefectServer, created_flow_run_id, run

PREFECT = str(Path(sys.executable).parent / "prefect")
RUN = ["ddr-capture/local", "ddr-timestep-analysis/local"]


def local_deployments_present() -> list[str]:
    """`prefect deploy -n` selectors (entrypoint function/deployment name) of every `local` deployment in
    prefect.yaml whose flow file exists: all of them once every stage flow is written."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    present = []
    for deployment in config["deployments"]:
        path, function = deployment["entrypoint"].split(":")
        if deployment["name"] == "local" and (REPO / path).is_file():
            present.append(f"{function}/local")
    return present


def test_prefect_yaml_declares_every_flow_for_local_and_slurm_a100() -> None:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    found = {(d["entrypoint"], d["name"]) for d in config["deployments"]}
    entrypoints = {
        "flows/provision.py:provision_flow",
        "flows/capture.py:capture_flow",
        "flows/analysis.py:timestep_analysis_flow",
        "flows/concept_search.py:concept_search_flow",
        "flows/heatmaps.py:heatmaps_flow",
        "flows/plots.py:plots_flow",
        "flows/prior.py:prior_flow",
        "flows/deep_dream.py:deep_dream_flow",
        "flows/deep_dream.py:deep_dream_sweep_flow",
        "flows/representation.py:representation_flow",
        "flows/pipeline.py:pipeline_flow",
    }
    assert found == {(e, v) for e in entrypoints for v in ("local", "slurm-a100")}
    for deployment in config["deployments"]:
        sweep = deployment["entrypoint"].endswith(":deep_dream_sweep_flow")
        assert set(deployment["parameters"]) == {"overrides", "config_file"} | ({"grid"} if sweep else set())
        pool = deployment["work_pool"]["name"]
        assert pool == ("ddr-local" if deployment["name"] == "local" else "ddr-slurm")
        if deployment["name"] == "slurm-a100":
            assert deployment["parameters"]["overrides"][0] == "infrastructure=slurm-a100"


def _run_deployment(server: PrefectServer, env: dict[str, str], name: str, overrides: list[str]) -> dict:
    """`prefect deployment run NAME`, then a run-once worker executes it; the finished flow run."""
    params = json.dumps({"overrides": overrides})
    created = run([PREFECT, "deployment", "run", name, "--params", params], env, timeout=120).stdout
    run_id = created_flow_run_id(created)
    worker = run(
        [PREFECT, "worker", "start", "--pool", "ddr-local", "--type", "process", "--run-once", "--limit", "1"],
        env,
        timeout=420,
        check=False,
    )
    flow_run = server.wait_flow_run(run_id, timeout=120)
    assert flow_run["state_type"] == "COMPLETED", f"{name}: {flow_run['state_name']}\n{worker.stdout[-8000:]}"
    return flow_run


def test_capture_and_analysis_deployments_run_from_prefect_yaml(
    prefect_server: PrefectServer, data_root: Path, flow_env: dict[str, str]
) -> None:
    env = flow_env
    run([PREFECT, "work-pool", "create", "ddr-local", "--type", "process", "--overwrite"], env, timeout=120)
    present = local_deployments_present()
    assert {"capture_flow/local", "timestep_analysis_flow/local"} <= set(present)
    selectors = [arg for selector in present for arg in ("-n", selector)]
    deployed = " ".join(run([PREFECT, "--no-prompt", "deploy", *selectors], env, timeout=400).stdout.split())
    created = re.findall(r"Deployment '([\w-]+/local)' successfully created", deployed)
    assert len(created) == len(present) and set(RUN) <= set(created), deployed[-4000:]
    for name in RUN:
        deployment = prefect_server.get(f"/deployments/name/{name}")
        assert deployment["work_pool_name"] == "ddr-local"
        assert deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)

    experiment = "deployed"
    overrides = [f"data_root={data_root}", f"experiment_name={experiment}", *TINY, "infrastructure.processes=false"]
    capture_run = _run_deployment(prefect_server, env, "ddr-capture/local", overrides)
    analysis_run = _run_deployment(prefect_server, env, "ddr-timestep-analysis/local", overrides)

    # the stores are complete
    layout = stores.ExperimentLayout(data_root / "experiments" / experiment)
    ds = xr.open_zarr(layout.capture_store)
    assert ds.sizes["sample"] == 5 and not np.isnan(ds.raw.values).any()
    assert stores.done_shards(layout.capture_shards) == {0, 1}
    for kind in ("raw", "sae"):
        profile = xr.open_zarr(layout.analysis_store(kind))
        assert profile.sizes["channel"] > 0 and not np.isnan(profile.topk_frequency.values).any()

    # each flow run made one MLflow run tagged with its Prefect flow run id
    client = mlflow.MlflowClient(f"sqlite:///{data_root.resolve() / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(f"ddr-{experiment}").experiment_id
    for flow_run, stage in ((capture_run, "capture"), (analysis_run, "timestep_analysis")):
        runs = client.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run['id']}'")
        assert [r.data.tags["ddr.stage"] for r in runs] == [stage]

    # and the capture run reports itself in the Prefect UI, linking its MLflow run
    artifacts = {a["key"]: a for a in prefect_server.artifacts(capture_run["id"])}
    assert {"ddr-capture-deployed", "ddr-capture-deployed-table"} <= set(artifacts)
    capture_mlflow = client.search_runs([experiment_id], f"tags.`prefect.flow_run_id` = '{capture_run['id']}'")[0]
    assert capture_mlflow.info.run_id in artifacts["ddr-capture-deployed"]["data"]
