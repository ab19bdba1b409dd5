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
from prefect.tasks import exponential_backoff
from prefect_dask import DaskTaskRunner

from ddr.config import ExperimentConfig, load_config

# Shard tasks: retried with exponential backoff (2 s, 4 s, ...) plus jitter where a task sets
# `retry_jitter_factor=RETRY_JITTER`. Shards are idempotent, so a retry redoes only what is missing.
TASK_RETRIES = 2
RETRY_DELAYS = exponential_backoff(backoff_factor=2)
RETRY_JITTER = 0.5


def load(overrides: list[str] | None = None, config_file: str | None = None) -> ExperimentConfig:
    """The experiment config from `configs/` (or `config_file`) plus dotted overrides."""
    return load_config(list(overrides or []), Path(config_file) if config_file else None)


def worker_count(config: ExperimentConfig, wanted: int | None = None) -> int:
    """Workers to start: as many as there are shards (`wanted`), at most the infrastructure's `n_workers`.

    Without `n_workers`, the limit is this machine's cores / `threads_per_worker`. Adaptive
    (SLURM) and per-GPU clusters size themselves; this number does not apply to them.
    """
    infra = config.infrastructure
    limit = infra.n_workers or max(1, (os.cpu_count() or 1) // (infra.threads_per_worker or 1))
    return max(1, min(wanted, limit)) if wanted else limit


def task_runner(config: ExperimentConfig, workers: int | None = None) -> DaskTaskRunner:
    """A DaskTaskRunner for the configured infrastructure: LocalCluster, one worker per GPU, or SLURM.

    Worker processes (local, per-GPU or in SLURM jobs) get `worker_env()`, so their task runs
    report to this flow's Prefect API and MLflow store. Dask settings the cluster needs (how many
    worker deaths a task survives) are applied before the scheduler starts.
    """
    from ddr.cluster import cluster_spec

    infra = config.infrastructure
    in_process = infra.kind == "local" and not infra.processes
    spec = cluster_spec(config, worker_count(config, workers), env=None if in_process else worker_env())
    if spec.dask_config:
        dask.config.set(spec.dask_config)
    return DaskTaskRunner(
        cluster_class=spec.cluster_class, cluster_kwargs=spec.cluster_kwargs, adapt_kwargs=spec.adapt_kwargs
    )


def worker_env() -> dict[str, str]:
    """Environment for worker processes: this process's Prefect API, MLflow and ddr settings.

    The API URL is the one this process actually talks to (also when it comes from a Prefect
    profile or a test harness rather than the environment), so workers never start a server of
    their own. Telemetry stays off in workers as it is here.
    """
    from prefect.client.orchestration import get_client

    prefixes = ("PREFECT_", "MLFLOW_", "DDR_", "HF_", "DO_NOT_TRACK", "TRANSFORMERS_")
    env = {key: os.environ[key] for key in os.environ if key.startswith(prefixes)}
    with get_client(sync_client=True) as client:
        env["PREFECT_API_URL"] = str(client.api_url).rstrip("/")
    return env


def gpu_annotation(config: ExperimentConfig, needs_gpu: bool) -> Any:
    """Dask resource annotation so GPU tasks only land on GPU workers (no-op where workers have no GPU resource).

    Submit GPU tasks inside `with gpu_annotation(config, needs_gpu=True):`; each asks for one
    `GPU`, so a worker runs one at a time. CPU stages (analysis, plots, representation) pass
    `needs_gpu=False` and run on any worker, GPU workers included.
    """
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


def mlflow_run_link(tracking_uri: str, run_id: str) -> str:
    """Where the MLflow UI shows a run: a URL for a tracking server, else how to open the embedded store."""
    import mlflow

    from ddr.tracking import redact_uri

    experiment_id = mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    fragment = f"#/experiments/{experiment_id}/runs/{run_id}"
    if tracking_uri.startswith(("http://", "https://")):
        return f"[{run_id}]({redact_uri(tracking_uri).rstrip('/')}/{fragment})"
    return (
        f"`{run_id}`: run `mlflow ui --backend-store-uri {redact_uri(tracking_uri)}` "
        f"and open http://127.0.0.1:5000/{fragment}"
    )


def _flat_rows(summary: dict[str, Any], prefix: str = "") -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for key, value in summary.items():
        if isinstance(value, dict) and value:
            rows += _flat_rows(value, f"{prefix}{key}.")
        else:
            text = str(value)
            rows.append({"key": f"{prefix}{key}", "value": text if len(text) <= 300 else text[:297] + "..."})
    return rows


def report_stage(
    stage: str,
    summary: dict[str, Any],
    mlflow_run_id: str | None,
    tracking_uri: str | None,
    experiment: str | None = None,
) -> None:
    """Prefect artifacts for a finished stage run: a markdown summary with a link to its MLflow run, and a table.

    Shown on the flow run's Artifacts tab in the Prefect UI, versioned under the key
    `ddr-<stage>[-<experiment>]`. Never fails the stage: a problem is logged as a warning.
    """
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    logger = get_run_logger()
    key = "-".join(part for part in ("ddr", stage, experiment) if part)
    key = "".join(c if c.isalnum() else "-" for c in key.lower())
    rows = _flat_rows(summary)
    try:
        link = mlflow_run_link(tracking_uri, mlflow_run_id) if mlflow_run_id and tracking_uri else "none"
        lines = [f"# ddr {stage}", "", f"**MLflow run:** {link}", "", "| | |", "|---|---|"]
        lines += [f"| {r['key']} | {r['value'].replace('|', '&#124;')} |" for r in rows]
        create_markdown_artifact("\n".join(lines), key=key, description=f"ddr {stage}: summary and MLflow run")
        create_table_artifact(rows, key=f"{key}-table", description=f"ddr {stage}: summary")
    except Exception as error:  # an artifact is a convenience: the stage's results are already committed
        logger.warning("could not create the Prefect artifacts for %s: %s: %s", stage, type(error).__name__, error)


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


def analysed_kinds(config: ExperimentConfig) -> list[str]:
    """Raw channels, plus SAE features when they were analysed (a missing raw analysis errors downstream)."""
    from ddr.stages.analysis import analysis_store_path

    return [kind for kind in config.kinds if kind == "raw" or analysis_store_path(config, kind).exists()]
