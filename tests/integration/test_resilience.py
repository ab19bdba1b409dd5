"""Fault injection: a task that fails once, a Dask worker that dies mid-task, a flow killed mid-capture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import xarray as xr

from ddr import stores
from tests.conftest import TINY
from tests.integration.services import REPO, PrefectServer, last_json, run, stop_process


def test_a_failing_task_is_retried_and_a_dead_worker_s_task_rescheduled(
    tmp_path: Path, data_root: Path, prefect_server: PrefectServer, flow_env: dict[str, str]
) -> None:
    """Shard tasks carry Prefect retries with backoff; a worker process killed mid-task (OOM, walltime)
    is restarted by its nanny and the scheduler reruns the task there."""
    flags = tmp_path / "flags"
    flags.mkdir()
    probe = [sys.executable, "-c", "from tests.integration.probes import main; main()"]
    overrides = [f"data_root={data_root}", "infrastructure.n_workers=1", "infrastructure.processes=true"]
    out = run([*probe, str(flags), *overrides], flow_env, timeout=300).stdout
    summary = last_json(out)
    results = {r["name"]: r for r in summary["results"]}

    assert results["flaky"]["attempts"] >= 2, "the first attempt failed, a retry succeeded"
    task_runs = prefect_server.task_runs(summary["flow_run_id"])
    flaky = [t for t in task_runs if t["name"].startswith("flaky-probe")]
    history = [prefect_server.get(f"/task_run_states/?task_run_id={t['id']}") for t in flaky]
    names = [[state["name"] for state in states] for states in history]
    assert any("Retrying" in run and run[-1] == "Completed" for run in names), names

    dying_pids = (flags / "dying.attempts").read_text().split()
    assert results["dying"]["attempts"] == 2 and len(dying_pids) == 2
    assert dying_pids[0] != dying_pids[1], "the second attempt ran in a fresh worker process"
    dying = [t for t in task_runs if t["name"].startswith("dying-probe")]
    assert dying and all(t["state_type"] == "COMPLETED" for t in dying), dying


def test_a_capture_killed_mid_flow_resumes_with_only_the_missing_shards(
    data_root: Path, prefect_server: PrefectServer, flow_env: dict[str, str]
) -> None:
    """SIGKILL `ddr run capture` (flow and workers) once the first shard is committed; the rerun computes
    only the shards without a marker, leaves the committed ones untouched, and the store is complete."""
    experiment = "killed"
    overrides = [
        f"data_root={data_root}",
        f"experiment_name={experiment}",
        *TINY,  # 5 prompts x 1 image
        "stages.capture.samples_per_shard=1",  # 5 shards
        "stages.capture.batch_size=1",
        "infrastructure.n_workers=1",  # one shard at a time
        "infrastructure.processes=false",
    ]
    markers = data_root / "experiments" / experiment / "capture" / "shards"
    command = [str(Path(sys.executable).parent / "ddr"), "run", "capture", *overrides]
    log_path = data_root / f"{experiment}-first.log"
    with log_path.open("w") as log:
        first = subprocess.Popen(
            command, cwd=REPO, env=flow_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 300
        while not list(markers.glob("shard_*.json")):
            assert first.poll() is None, f"capture exited early:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, "no shard committed within 300 s"
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)  # the flow's process group: flow and its Dask workers
        first.wait(30)
    finally:
        stop_process(first)
    assert first.returncode == -signal.SIGKILL

    committed = {p.name: p.stat().st_mtime_ns for p in markers.glob("shard_*.json")}
    assert 1 <= len(committed) < 5, f"{len(committed)} shards committed before the kill"

    result = last_json(run(command, flow_env, timeout=300).stdout)

    after = {p.name: p.stat().st_mtime_ns for p in markers.glob("shard_*.json")}
    assert len(after) == 5, "every shard is committed exactly once"
    assert {name: after[name] for name in committed} == committed, "committed shards were not recomputed"
    assert result["captured"] == 5 - len(committed)
    for path in markers.glob("shard_*.json"):
        info = json.loads(path.read_text())
        assert info["samples"] == 1
    layout = stores.ExperimentLayout(data_root / "experiments" / experiment)
    ds = xr.open_zarr(layout.capture_store)
    assert ds.sizes["sample"] == 5 and not np.isnan(ds.raw.values).any()
    assert ds.sizes["sample"] == len(list(layout.capture_images.glob("*.png")))
