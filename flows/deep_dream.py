"""ddr-deep-dream and ddr-deep-dream-sweep: regularised feature visualisation, channels as shards.

One deep-dream flow run is one MLflow run with every resolved parameter, per-step curves of the
mean activation and penalties, the aggregate metrics (mean and median normalised activation,
selectivity, diversity, seed distance, failures) and contact sheets. A sweep runs one member per
grid combination (any `stages.deep_dream` field, e.g. `diversity_penalty_weight=0,10` or
`parameterisation=latent,phase_fourier`), each a nested MLflow run under one parent, so the
MLflow UI's compare view shows the settings against the metrics.
"""

from __future__ import annotations

import itertools
from typing import Any

import mlflow
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import tracking
from ddr.config import ConfigError, ExperimentConfig, flatten, parse_value
from ddr.stages import deep_dream
from flows.common import (
    RETRY_DELAYS,
    TASK_RETRIES,
    analysed_kinds,
    gather,
    gpu_annotation,
    load,
    prefect_tags,
    report_stage,
    task_runner,
)


@task(name="deep-dream-shard", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def dream_shard_task(config: ExperimentConfig, kind: str, channels: list[int]) -> dict[str, Any]:
    return deep_dream.dream_shard(config, kind, channels)


@flow(name="ddr-deep-dream-shards")
def dream_shards(config: ExperimentConfig, kind: str, shards: list[list[int]]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=True):
        futures = [(shard[0], dream_shard_task.submit(config, kind, shard)) for shard in shards]
    return gather(futures, f"deep dream ({kind})")


def log_step_curves(kind: str, results: list[dict[str, Any]], every: int) -> None:
    """Per-step mean of each curve over the shards, weighted by how many targets each optimised."""
    weighted = [(r["optimised"], r["step_metrics"]) for r in results if r["optimised"]]
    if not weighted:
        return
    total = sum(n for n, _ in weighted)
    for name in weighted[0][1]:
        curves = np.array([curve[name] for _, curve in weighted], dtype=float)
        weights = np.array([n for n, _ in weighted], dtype=float)[:, None]
        mean = np.nansum(curves * weights, axis=0) / total
        for index, value in enumerate(mean):
            if np.isfinite(value):
                mlflow.log_metric(f"{kind}_step_{name}", float(value), step=index * every)


def _run(config: ExperimentConfig, parent_run_id: str | None) -> dict[str, Any]:
    logger = get_run_logger()
    result: dict[str, Any] = {}
    kinds = analysed_kinds(config)
    resolved = {
        f"resolved.{kind}.{key}": value
        for kind in kinds
        for key, value in flatten(deep_dream.dream_settings(config, kind).model_dump(exclude={"sae"})).items()
    }
    with tracking.stage_run(config, "deep_dream", prefect_tags(), resolved, parent_run_id) as run:
        for kind in kinds:
            settings = deep_dream.dream_settings(config, kind)
            shards = deep_dream.plan_dream(config, kind)
            path = deep_dream.prepare_dream_store(config, kind, run.info.run_id)
            logger.info("deep dream %s: %d channel shards into %s", kind, len(shards), path)
            results = []
            if shards:
                runner = task_runner(config, config.infrastructure.n_workers or len(shards))
                results = dream_shards.with_options(task_runner=runner)(config, kind, shards)
            log_step_curves(kind, results, settings.intermediate_opt_results_every_n_steps)
            summary = deep_dream.summarise_dreams(config, kind)
            mlflow.log_metrics(
                {f"{kind}_{k}": float(v) for k, v in summary.items() if isinstance(v, int | float) and np.isfinite(v)}
            )
            for r in results:
                mlflow.log_artifact(r["contact_sheet"], artifact_path=f"dream/{kind}")
            result[kind] = {"store": str(path), "optimised": sum(r["optimised"] for r in results), **summary}
        result["mlflow_run_id"] = run.info.run_id
    logger.info("deep dream done: %s", result)
    report_stage("deep_dream", result, result["mlflow_run_id"], tracking.tracking_uri(config), config.experiment_name)
    return result


@flow(name="ddr-deep-dream")
def deep_dream_flow(
    overrides: list[str] | None = None, config_file: str | None = None, parent_run_id: str | None = None
) -> dict[str, Any]:
    """Optimise a latent per (channel, timestep) target and record how well it worked."""
    return _run(load(overrides, config_file), parent_run_id)


def expand_grid(grid: list[str]) -> list[list[str]]:
    """`["learning_rate=0.01,0.1", "tv=0.1"]` -> one override list per combination (keys default to the stage)."""
    axes: list[list[str]] = []
    for item in grid:
        if "=" not in item:
            raise ConfigError(f"sweep item {item!r} is not of the form key=v1,v2,...")
        key, values = item.split("=", 1)
        key = key if "." in key else f"stages.deep_dream.{key}"
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not options:
            raise ConfigError(f"sweep item {item!r} has no values")
        axes.append([f"{key}={parse_value(v)}" for v in options])
    return [list(combo) for combo in itertools.product(*axes)]


@flow(name="ddr-deep-dream-sweep")
def deep_dream_sweep_flow(
    grid: list[str], overrides: list[str] | None = None, config_file: str | None = None
) -> dict[str, Any]:
    """One deep-dream run per grid combination, nested under one parent MLflow run."""
    logger = get_run_logger()
    members = expand_grid(grid)
    base = load(overrides, config_file)
    for index, member in enumerate(members):  # every member's config is valid before any work starts
        load([*(overrides or []), *member, f"stages.deep_dream.run_name={base.stages.deep_dream.run_name}-{index:03d}"])
    children = []
    with tracking.stage_run(base, "deep_dream_sweep", prefect_tags(), {"sweep.grid": " ".join(grid)}) as parent:
        for index, member in enumerate(members):
            run_name = f"{base.stages.deep_dream.run_name}-{index:03d}"
            logger.info("sweep member %d/%d: %s", index + 1, len(members), " ".join(member))
            child = _run(
                load([*(overrides or []), *member, f"stages.deep_dream.run_name={run_name}"]), parent.info.run_id
            )
            children.append({"overrides": member, "run_name": run_name, "mlflow_run_id": child["mlflow_run_id"]})
        mlflow.log_metric("members", len(members))
    result = {"parent_run_id": parent.info.run_id, "members": children}
    report_stage("deep_dream_sweep", result, parent.info.run_id, tracking.tracking_uri(base), base.experiment_name)
    return result
