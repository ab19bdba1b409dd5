"""What every stage flow shares: loading the config, the Dask task runner, gathering shard results."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dask
from prefect import get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect_dask import DaskTaskRunner

from ddr.config import ExperimentConfig, load_config

TASK_RETRIES = 2
RETRY_DELAYS = [2, 10]


def load(overrides: list[str] | None = None, config_file: str | None = None) -> ExperimentConfig:
    """The experiment config from `configs/` (or `config_file`) plus dotted overrides."""
    return load_config(list(overrides or []), Path(config_file) if config_file else None)


def worker_count(config: ExperimentConfig, wanted: int | None = None) -> int:
    infra = config.infrastructure
    return wanted or infra.n_workers or max(1, (os.cpu_count() or 1) // (infra.threads_per_worker or 1))


def task_runner(config: ExperimentConfig, workers: int | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner for the configured infrastructure: LocalCluster, one worker per GPU, or SLURM."""
    from ddr.cluster import cluster_spec

    spec = cluster_spec(config, worker_count(config, workers))
    if config.infrastructure.kind == "local" and config.infrastructure.processes:
        # Worker processes report task runs to the same Prefect API as this flow (never a server of their own).
        spec.cluster_kwargs["env"] = {**spec.cluster_kwargs.get("env", {}), **worker_env()}
    return DaskTaskRunner(
        cluster_class=spec.cluster_class, cluster_kwargs=spec.cluster_kwargs, adapt_kwargs=spec.adapt_kwargs
    )


def worker_env() -> dict[str, str]:
    """Environment for worker processes: this process's Prefect API and logging settings."""
    from prefect.client.orchestration import get_client

    env = {key: os.environ[key] for key in os.environ if key.startswith(("PREFECT_", "MLFLOW_", "DDR_"))}
    with get_client(sync_client=True) as client:
        env["PREFECT_API_URL"] = str(client.api_url).rstrip("/")
    return env


def gpu_annotation(config: ExperimentConfig, needs_gpu: bool) -> Any:
    """Dask resource annotation so GPU tasks only land on GPU workers (no-op on CPU infrastructures)."""
    from ddr.cluster import uses_gpus

    if needs_gpu and uses_gpus(config):
        return dask.annotate(resources={"GPU": 1})
    return dask.annotate()


def prefect_tags() -> dict[str, str]:
    """Tags that tie an MLflow run to the Prefect flow run that made it."""
    run_id = flow_run.get_id()
    tags = {"prefect.flow_run_id": str(run_id)} if run_id else {}
    url = flow_run.get_flow_run_ui_url() if run_id else None
    if url:
        tags["prefect.flow_run_url"] = url
    return tags


def gather(pairs: list[tuple[Any, PrefectFuture]], what: str) -> list[dict[str, Any]]:
    """Wait for (shard, future) pairs, logging progress with an ETA; raise at the end if any shard failed.

    A failing shard does not stop the others: everything that can finish is committed first,
    then the flow fails with the list of failed shards so a rerun does only those.
    """
    logger = get_run_logger()
    shard_of = {id(future): shard for shard, future in pairs}
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    started = time.perf_counter()
    for done, future in enumerate(as_completed([f for _, f in pairs]), start=1):
        try:
            results.append(future.result())
        except Exception as error:  # a failed shard is reported, the others still finish
            failures.append(f"shard {shard_of[id(future)]}: {type(error).__name__}: {error}")
        elapsed = time.perf_counter() - started
        eta = elapsed / done * (len(pairs) - done)
        logger.info("%s: %d/%d shards done, %.0fs elapsed, ETA %.0fs", what, done, len(pairs), elapsed, eta)
    if failures:
        raise RuntimeError(f"{what}: {len(failures)} of {len(pairs)} shards failed:\n  " + "\n  ".join(failures))
    return results
