"""SLURM: the slurm-a100 job script, and a capture whose shards run inside jobs of a single-node SLURM."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ddr import stores
from ddr.cluster import cluster_spec, uses_gpus
from ddr.config import ConfigError, load_config
from tests.conftest import TINY
from tests.integration.services import REPO, last_json, run, stop_process

SITE = {
    "PLG_SLURM_PARTITION": "plgrid-gpu-a100",
    "PLG_SLURM_ACCOUNT": "plgddr-gpu-a100",
    "NOTIFICATION_EMAIL": "someone@example.org",
    "PLG_GROUPS_STORAGE": "/net/pr2/projects/plgrid",
    "PLG_GROUP_NAME": "plggddr",
    "PLG_USERNAME": "plgsomeone",
}


def test_slurm_a100_job_script(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dask_jobqueue import SLURMCluster

    monkeypatch.chdir(tmp_path)  # no .env here: the values come from the environment
    for key, value in SITE.items():
        monkeypatch.setenv(key, value)
    config = load_config(["infrastructure=slurm-a100"])
    assert str(config.data_root) == "/net/pr2/projects/plgrid/plggddr/plgsomeone/ddr"
    assert config.stages.capture.num_images_per_prompt == 5 and config.stages.capture.log_every_n_steps == 10
    assert uses_gpus(config)

    worker_env = {"PREFECT_API_URL": "http://127.0.0.1:4200/api", "PREFECT_API_KEY": "secret", "HF_TOKEN": "secret"}
    spec = cluster_spec(config, 1, env=worker_env)
    assert spec.cluster_class == "dask_jobqueue.SLURMCluster"
    assert spec.adapt_kwargs == {"minimum": 0, "maximum": 8}
    assert spec.dask_config == {"distributed.scheduler.allowed-failures": 10}
    kwargs = dict(spec.cluster_kwargs)
    kwargs["scheduler_options"] = {**kwargs["scheduler_options"], "host": "127.0.0.1"}  # this test: loopback only
    kwargs["log_directory"] = str(tmp_path / "logs")
    with SLURMCluster(**kwargs) as cluster:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        script = cluster.job_script()
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    for directive in (
        "#SBATCH -p plgrid-gpu-a100",
        "#SBATCH -A plgddr-gpu-a100",
        "#SBATCH --cpus-per-task=16",
        "#SBATCH --mem=125G",
        "#SBATCH -t 00:30:00",
        "#SBATCH --gres=gpu:1",
        "#SBATCH --mail-user=someone@example.org",
        "#SBATCH --mail-type=BEGIN,END,FAIL",
    ):
        assert directive in directives, f"{directive!r} not in\n{script}"
    lines = script.splitlines()
    assert "source deployments/slurm/setup-plg.sh" in lines
    assert "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-16}" in lines  # $$ left for the job's shell
    assert "export PREFECT_API_URL=http://127.0.0.1:4200/api" in lines
    assert "secret" not in script, "secrets are not written into job scripts"
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert "--resources GPU=1" in worker
    assert "--lifetime 1500s --lifetime-stagger 120s" in worker  # 30 min walltime - 5 min margin


def test_slurm_profile_names_a_missing_site_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for key, value in SITE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("PLG_SLURM_ACCOUNT")
    config = load_config(["infrastructure=slurm-a100"])
    with pytest.raises(ConfigError, match=r"infrastructure\.slurm\.account: .*PLG_SLURM_ACCOUNT"):
        cluster_spec(config, 1)
    # a walltime on the command line that YAML would read as a number (2:00:00 -> 7200)
    monkeypatch.setenv("PLG_SLURM_ACCOUNT", SITE["PLG_SLURM_ACCOUNT"])
    config = load_config(["infrastructure=slurm-a100", "infrastructure.slurm.walltime=2:00:00"])
    with pytest.raises(ConfigError, match="quote it"):
        cluster_spec(config, 1)


def _worker_addresses(logs: Path) -> set[str]:
    text = "".join(p.read_text(errors="replace") for p in logs.glob("*.err"))
    return set(re.findall(r"(?:Start worker at|Registered to|Listening to):\s+(tcp://[0-9.]+)", text))


def test_capture_runs_its_shards_in_slurm_jobs_and_survives_a_killed_job(
    local_slurm: None, data_root: Path, flow_env: dict[str, str]
) -> None:
    """`ddr run capture infrastructure=slurm-local`: each shard runs inside a SLURM job (its marker records
    SLURM_JOB_ID). The job that committed the first shard is then cancelled, as a walltime kill would:
    adaptive scaling submits a new job, the interrupted shard is retried there, and the capture completes."""
    experiment = "slurm"
    overrides = [
        "infrastructure=slurm-local",
        "infrastructure.adapt_maximum=1",  # one job at a time: the cancelled job's work must move
        f"data_root={data_root}",
        f"experiment_name={experiment}",
        *TINY,
        "stages.capture.samples_per_shard=1",  # 5 shards
        "stages.capture.batch_size=1",
    ]
    markers = data_root / "experiments" / experiment / "capture" / "shards"
    command = [str(Path(sys.executable).parent / "ddr"), "run", "capture", *overrides]
    log_path = data_root / f"{experiment}.log"
    with log_path.open("w") as log:
        flow = subprocess.Popen(
            command, cwd=REPO, env=flow_env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not list(markers.glob("shard_*.json")):
            assert flow.poll() is None, f"capture exited early:\n{log_path.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"no shard committed within 300 s:\n{log_path.read_text()[-6000:]}"
            time.sleep(0.1)
        first_job = json.loads(next(markers.glob("shard_*.json")).read_text())["slurm_job_id"]
        assert first_job, "the shard ran inside a SLURM job"
        subprocess.run(["scancel", first_job], check=True, timeout=30)
        flow.wait(timeout=400)
    finally:
        stop_process(flow)
    output = log_path.read_text()
    assert flow.returncode == 0, output[-8000:]
    result = last_json(output)
    assert result["captured"] == 5

    jobs = {int(json.loads(p.read_text())["slurm_job_id"]) for p in markers.glob("shard_*.json")}
    assert len(list(markers.glob("shard_*.json"))) == 5
    assert len(jobs) >= 2 and min(jobs) == int(first_job), f"a replacement job finished the shards: {jobs}"
    ds = xr.open_zarr(stores.ExperimentLayout(data_root / "experiments" / experiment).capture_store)
    assert ds.sizes["sample"] == 5 and not np.isnan(ds.raw.values).any()

    # scheduler and workers talked over loopback only; the jobs are gone once the flow is done
    addresses = _worker_addresses(data_root / "slurm-logs")
    assert addresses and all(a.startswith("tcp://127.0.0.1") for a in addresses), addresses
    assert "Scheduler at:     tcp://127.0.0.1:" in output
    for _ in range(30):
        queue = run(["squeue", "-h", "-n", "ddr-worker", "-o", "%i"], flow_env, timeout=30).stdout.strip()
        if not queue:
            break
        time.sleep(1)
    assert not queue, f"worker jobs left behind: {queue}"
