"""Fault-injection probes: flows that run like a stage flow (config, task_runner, gather) but fail on purpose.

Run in a subprocess against the test's Prefect server:
    python -c "from tests.integration.probes import main; main()" FLAG_DIR [override ...]
prints a JSON summary last. Each task records its attempts in FLAG_DIR/<name>.attempts.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.common import RETRY_DELAYS, TASK_RETRIES, gather, gpu_annotation, load, task_runner


def _attempt(flag_dir: str, name: str) -> int:
    """Record one attempt; the number of attempts so far, this one included."""
    path = Path(flag_dir) / f"{name}.attempts"
    with path.open("a") as f:
        f.write(f"{os.getpid()}\n")
    return len(path.read_text().splitlines())


@task(name="flaky-probe", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def fails_once(flag_dir: str, name: str) -> dict[str, Any]:
    """Raises on its first attempt (as a CUDA or I/O hiccup would), succeeds on the retry."""
    attempts = _attempt(flag_dir, name)
    if attempts == 1:
        raise RuntimeError(f"{name}: injected failure on attempt 1")
    return {"name": name, "attempts": attempts, "pid": os.getpid()}


@task(name="dying-probe", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def kills_its_worker_once(flag_dir: str, name: str) -> dict[str, Any]:
    """Kills its Dask worker process on the first attempt (as an OOM kill or a walltime would)."""
    attempts = _attempt(flag_dir, name)
    if attempts == 1:
        os._exit(1)
    return {"name": name, "attempts": attempts, "pid": os.getpid()}


@flow(name="ddr-probe-shards")
def probe_shards(flag_dir: str, overrides: list[str]) -> list[dict[str, Any]]:
    config = load(overrides)
    with gpu_annotation(config, needs_gpu=False):
        futures = [
            ("flaky", fails_once.submit(flag_dir, "flaky")),
            ("dying", kills_its_worker_once.submit(flag_dir, "dying")),
        ]
    return gather(futures, "probe")


@flow(name="ddr-probe")
def probe_flow(flag_dir: str, overrides: list[str]) -> dict[str, Any]:
    config = load(overrides)
    runner = task_runner(config, 1)
    results = probe_shards.with_options(task_runner=runner)(flag_dir, overrides)
    return {"flow_run_id": str(flow_run.get_id()), "results": results}


def main() -> None:
    flag_dir, *overrides = sys.argv[1:]
    print(json.dumps(probe_flow(flag_dir, overrides), indent=1))


if __name__ == "__main__":
    main()
