"""ddr-representation: the index the inspector reads, per kind, with channel blocks as shards on Dask."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import tracking
from ddr.config import ExperimentConfig
from ddr.stages import representation
from flows.common import (
    RETRY_DELAYS,
    TASK_RETRIES,
    gather,
    gpu_annotation,
    load,
    prefect_tags,
    report_stage,
    task_runner,
)


@task(name="representation-shard", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def representation_shard_task(config: ExperimentConfig, kind: str, shard: representation.Shard) -> dict[str, Any]:
    return representation.representation_shard(config, kind, shard)


@flow(name="ddr-representation-shards")
def representation_shards(
    config: ExperimentConfig, kind: str, shards: list[representation.Shard]
) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=False):
        futures = [(s.index, representation_shard_task.submit(config, kind, s)) for s in shards]
    return gather(futures, f"representation ({kind})")


@flow(name="ddr-representation")
def representation_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Index every channel (and SAE feature): profile, peaks, examples, priors, deep dreams, heatmaps, concepts."""
    logger = get_run_logger()
    config = load(overrides, config_file)
    result: dict[str, Any] = {}
    with tracking.stage_run(config, "representation", tags=prefect_tags()) as run:
        for kind in representation.kinds_to_build(config):
            shards = representation.plan_representation(config, kind)
            logger.info("representation %s: %d channel shards to do", kind, len(shards))
            if len(shards) > 1:
                runner = task_runner(config, len(shards))
                representation_shards.with_options(task_runner=runner)(config, kind, shards)
            elif shards:
                representation.representation_shard(config, kind, shards[0])
            summary = representation.finalize_representation(config, kind, mlflow_experiment_id=run.info.experiment_id)
            for name, value in summary["absent"].items():
                logger.info("representation %s: %s absent: %s", kind, name, value)
            mlflow.log_metrics(
                {
                    f"{kind}_channels": summary["n_channels"],
                    f"{kind}_active_channels": summary["n_active"],
                    f"{kind}_channels_with_priors": summary["n_with_priors"],
                    f"{kind}_channels_with_dreams": summary["n_with_dreams"],
                    f"{kind}_channels_with_heatmaps": summary["n_with_heatmaps"],
                    f"{kind}_concepts": len(summary["concepts"]),
                }
            )
            index = representation.representation_dir(config, kind) / "index.json"
            mlflow.log_artifact(str(index), artifact_path=f"representation/{kind}")
            result[kind] = {**summary, "shards": len(shards), "index": str(index)}
        manifest = representation.write_manifest(config)
        mlflow.log_artifact(str(manifest), artifact_path="representation")
        result["manifest"] = str(manifest)
        result["mlflow_run_id"] = run.info.run_id
    logger.info("representation done: %s", result)
    report_stage(
        "representation", result, result.get("mlflow_run_id"), tracking.tracking_uri(config), config.experiment_name
    )
    return result
