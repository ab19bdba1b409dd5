"""Integration tests: real Prefect server, workers, deployments, a single-node SLURM, killed processes.

Every test in this folder is marked `integration`. The services are started here, on 127.0.0.1,
and stopped by PID at the end of the session. The SLURM tests need the SLURM and munge binaries
(`.ci/run` installs them with `deployments/local-slurm.sh install`); where they are absent those
tests are skipped with that reason. Where SLURM is installed but not running, the session starts
it with `deployments/local-slurm.sh start` and stops it again afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.integration.services import REPO, PrefectServer

HERE = Path(__file__).parent
LOCAL_SLURM = REPO / "deployments" / "local-slurm.sh"
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scancel", "munged")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data root for the integration tests (tiny assets provisioned once, one MLflow store);
    each test uses its own experiment_name."""
    root = tmp_path_factory.mktemp("integration-data")
    tiny_config(root)
    return root


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real `prefect server start` on 127.0.0.1:<free port> with a temporary PREFECT_HOME."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    server.start()
    assert server.api_url.startswith("http://127.0.0.1:")
    try:
        yield server
    finally:
        server.stop()


def _missing_slurm() -> list[str]:
    return [b for b in SLURM_BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]


def _slurm_running() -> bool:
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ping.returncode == 0 and "UP" in ping.stdout and state.stdout.strip() in ("idle", "mixed", "allocated")


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[None]:
    """A single-node SLURM on this machine: the one .ci/run started, or one started (and stopped) here."""
    missing = _missing_slurm()
    if missing:
        pytest.skip(
            f"SLURM is not installed (missing {', '.join(missing)}); "
            "`deployments/local-slurm.sh install` installs it (.ci/run does)"
        )
    started_here = False
    if not _slurm_running():
        result = subprocess.run([str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, f"local-slurm.sh start failed:\n{result.stdout}\n{result.stderr}"
        started_here = True
    try:
        yield
    finally:
        if started_here:
            subprocess.run([str(LOCAL_SLURM), "stop"], capture_output=True, text=True, timeout=120)


@pytest.fixture
def flow_env(prefect_server: PrefectServer) -> dict[str, str]:
    """Environment for `ddr run` and probe subprocesses: the session's Prefect server, no telemetry."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**prefect_server.env, "PYTHONPATH": path}
