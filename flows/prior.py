"""ddr-prior: steered (or ablated) generations per channel, channels as shards over Dask workers."""

from __future__ import annotations

import json
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import stores, tracking
from ddr.config import ExperimentConfig
from ddr.stages import prior
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


@task(name="prior-shard", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def prior_shard_task(config: ExperimentConfig, kind: str, channels: list[int]) -> dict[str, Any]:
    return prior.prior_shard(config, kind, channels)


@flow(name="ddr-prior-shards")
def prior_shards(config: ExperimentConfig, kind: str, shards: list[list[int]]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=True):
        futures = [(shard[0], prior_shard_task.submit(config, kind, shard)) for shard in shards]
    return gather(futures, f"prior ({kind})")


@flow(name="ddr-prior")
def prior_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Generate priors for every selected active channel (and SAE feature); contact sheets to MLflow."""
    logger = get_run_logger()
    config = load(overrides, config_file)
    result: dict[str, Any] = {}
    with tracking.stage_run(config, "prior", tags=prefect_tags()) as run:
        for kind in analysed_kinds(config):
            settings = prior.prior_settings(config, kind)
            params = {f"{kind}.{key}": str(getattr(settings, key)) for key in prior.KIND_PARAMS}
            mlflow.log_params({key: value[: tracking.MAX_PARAM_LENGTH] for key, value in params.items()})
            shards = prior.plan_prior(config, kind)
            path = prior.prepare_prior_store(config, kind)
            logger.info("prior %s: %d channel shards", kind, len(shards))
            results = []
            if shards:
                runner = task_runner(config, config.infrastructure.n_workers or len(shards))
                results = prior_shards.with_options(task_runner=runner)(config, kind, shards)
            skipped = json.loads(stores.open_store(path).attrs["skipped_channels"])
            generated = sum(len(r["generated"]) for r in results)
            mlflow.log_metrics({f"{kind}_channels_generated": generated, f"{kind}_channels_skipped": len(skipped)})
            effect = prior.mean_effect(path)
            if effect is not None:
                mlflow.log_metric(f"{kind}_mean_effect", effect)
            for r in results:
                mlflow.log_artifact(r["contact_sheet"], artifact_path=f"prior/{kind}")
            result[kind] = {
                "store": str(path),
                "generated": generated,
                "skipped_channels": len(skipped),
                "mean_effect": effect,
            }
        result["mlflow_run_id"] = run.info.run_id
    logger.info("prior done: %s", result)
    report_stage("prior", result, result["mlflow_run_id"], tracking.tracking_uri(config), config.experiment_name)
    return result
