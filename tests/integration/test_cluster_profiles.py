"""The infrastructure profiles: every one validates, clusters bind to loopback, GPU tasks go to GPU workers."""

from __future__ import annotations

import os
import re
from pathlib import Path

import dask
import pytest

from ddr.cluster import cluster_spec, gpu_ids, local_gpu_cluster, uses_gpus
from ddr.config import CONFIG_DIR, available, load_config
from ddr.slurm import expand, lifetime_args, slurm_cluster_kwargs
from flows.common import gpu_annotation, worker_count
from tests.integration.services import REPO


def test_every_infrastructure_profile_validates() -> None:
    assert {"local", "local-gpus", "slurm-a100", "slurm-local"} <= set(available("infrastructure"))
    for name in ("local", "local-gpus", "slurm-local"):
        assert load_config([f"infrastructure={name}"]).infrastructure.name == name


def test_env_example_lists_every_variable_the_profiles_use() -> None:
    used = set()
    for path in (CONFIG_DIR / "infrastructure").glob("*.yaml"):
        text = re.sub(r"\$\$\{?\w+", "", path.read_text())  # $$VAR is the job shell's, not ours
        used |= set(re.findall(r"\$\{(\w+)\}", text))
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    assert used and used <= listed, f"not in .env.example: {sorted(used - listed)}"
    assert {"PLG_GROUP_NAME", "PLG_USERNAME", "PLG_SLURM_PARTITION", "PLG_SLURM_ACCOUNT"} <= listed
    assert {"NOTIFICATION_EMAIL", "PLG_GROUPS_STORAGE"} <= listed


def test_local_cluster_is_sized_to_the_machine_and_bound_to_loopback() -> None:
    cores = os.cpu_count() or 1
    config = load_config(["infrastructure=local"])
    spec = cluster_spec(config, worker_count(config, 1000), env={"PREFECT_API_URL": "http://127.0.0.1:1/api"})
    kwargs = spec.cluster_kwargs
    assert kwargs["n_workers"] == cores and kwargs["threads_per_worker"] == 1
    assert kwargs["host"] == "127.0.0.1" and kwargs["dashboard_address"].startswith("127.0.0.1:")
    assert kwargs["env"]["PREFECT_API_URL"] == "http://127.0.0.1:1/api"
    assert worker_count(load_config(["infrastructure.n_workers=1"]), 5) == 1, "n_workers caps the shards' wish"
    assert worker_count(config, 1) == 1
    threads = cluster_spec(load_config(["infrastructure.processes=false"]), 4).cluster_kwargs
    assert threads["protocol"] == "tcp://" and threads["n_workers"] == 1, "in-process: one model, one worker"


def test_local_gpu_workers_each_see_one_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker process per GPU, pinned with CUDA_VISIBLE_DEVICES (no GPU needed to check the pinning)."""
    from distributed import Client

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert gpu_ids(2) == ["3", "5"]
    with pytest.raises(RuntimeError, match="shows 3 device"):
        gpu_ids(4)
    config = load_config(["infrastructure=local-gpus", "infrastructure.n_workers=2"])
    assert uses_gpus(config)
    spec = cluster_spec(config, 99, env={"DDR_PROBE": "1"})
    assert spec.cluster_class == "ddr.cluster.local_gpu_cluster" and spec.cluster_kwargs["n_gpus"] == 2
    with local_gpu_cluster(**spec.cluster_kwargs) as cluster, Client(cluster) as client:
        assert cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        seen = client.run(lambda: (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["DDR_PROBE"]))
        assert sorted(seen.values()) == [("3", "1"), ("5", "1")]
        assert all(w["resources"] == {"GPU": 1} for w in client.scheduler_info()["workers"].values())


def test_gpu_tasks_only_run_on_gpu_workers_and_cpu_tasks_anywhere() -> None:
    from distributed import Client, Scheduler, SpecCluster, Worker

    config = load_config(["infrastructure=slurm-local"])
    assert uses_gpus(config) and not uses_gpus(load_config(["infrastructure=local"]))
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}
    workers = {
        "gpu": {"cls": Worker, "options": {"nthreads": 1, "resources": {"GPU": 1}, "host": "127.0.0.1"}},
        "cpu": {"cls": Worker, "options": {"nthreads": 2, "host": "127.0.0.1"}},
    }
    with SpecCluster(workers=workers, scheduler=scheduler) as cluster, Client(cluster) as client:
        name_of = {addr: w["name"] for addr, w in client.scheduler_info()["workers"].items()}

        def where(i: int) -> str:
            from distributed import get_worker

            return get_worker().name

        with gpu_annotation(config, needs_gpu=True):
            gpu = client.gather([client.submit(where, i, pure=False) for i in range(8)])
        with gpu_annotation(config, needs_gpu=False):
            cpu = client.gather([client.submit(where, i, pure=False) for i in range(40)])
        assert set(gpu) == {"gpu"}
        assert "cpu" in set(cpu)
        assert set(name_of.values()) == {"gpu", "cpu"}
    assert dask.get_annotations() == {}


def test_slurm_settings_expand_site_variables_and_leave_job_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SITE_X", "x1")
    expanded = expand("a-${SITE_X}-$SITE_X-$${SLURM_CPUS_PER_TASK:-1}-$$HOME", "k")
    assert expanded == "a-x1-x1-${SLURM_CPUS_PER_TASK:-1}-$HOME"
    assert lifetime_args({"walltime": "1-00:00:00"}) == ["--lifetime", "86100s", "--lifetime-stagger", "120s"]
    assert lifetime_args({"walltime": "30", "lifetime": "10m", "lifetime_stagger": "1m"})[1] == "600s"
    assert lifetime_args({}) == []

    # .env in the working directory fills what the environment lacks; the environment wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("PLG_SLURM_PARTITION=from-dotenv  # comment\nPLG_SLURM_ACCOUNT=dotenv-account\n")
    monkeypatch.delenv("PLG_SLURM_PARTITION", raising=False)
    monkeypatch.setenv("PLG_SLURM_ACCOUNT", "env-account")
    monkeypatch.setenv("NOTIFICATION_EMAIL", "a@example.org")
    for key in ("PLG_GROUPS_STORAGE", "PLG_GROUP_NAME", "PLG_USERNAME"):
        monkeypatch.setenv(key, "x")
    kwargs = slurm_cluster_kwargs(load_config(["infrastructure=slurm-a100"]))
    assert kwargs["queue"] == "from-dotenv" and kwargs["account"] == "env-account"
    assert kwargs["log_directory"] == str(Path("x/x/x/ddr/slurm-logs").resolve())
