"""ddr-heatmaps: spatial maps of each channel's top dataset examples (and priors), channel shards on Dask workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import tracking
from ddr.config import ExperimentConfig
from ddr.stages import heatmaps
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

CONTACT_SHEET_SIZE = 32


@task(name="heatmap-shard", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def heatmap_shard_task(config: ExperimentConfig, kind: str, channels: list[int]) -> dict[str, Any]:
    return heatmaps.heatmap_shard(config, kind, channels)


@flow(name="ddr-heatmaps-shards")
def heatmap_shards(config: ExperimentConfig, kind: str, shards: list[list[int]]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=True):
        futures = [(shard[0], heatmap_shard_task.submit(config, kind, shard)) for shard in shards]
    return gather(futures, f"heatmaps ({kind})")


@flow(name="ddr-heatmaps")
def heatmaps_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Regenerate each selected channel's top examples at its peaks, keep their spatial maps, draw overlays."""
    logger = get_run_logger()
    config = load(overrides, config_file)
    result: dict[str, Any] = {}
    with tracking.stage_run(config, "heatmaps", tags=prefect_tags()) as run:
        for kind in analysed_kinds(config):
            settings = heatmaps.heatmap_settings(config, kind)
            mlflow.log_params(
                {
                    f"{kind}.top_examples": settings.top_examples,
                    f"{kind}.peaks": settings.peaks,
                    f"{kind}.include_priors": settings.include_priors,
                    f"{kind}.overlay_alpha": settings.overlay_alpha,
                }
            )
            path = heatmaps.prepare_heatmap_store(config, kind)
            shards = heatmaps.plan_heatmaps(config, kind)
            logger.info("heatmaps %s: %d channel shards with maps to make", kind, len(shards))
            results: list[dict[str, Any]] = []
            if shards:
                runner = task_runner(config, config.infrastructure.n_workers or len(shards))
                results = heatmap_shards.with_options(task_runner=runner)(config, kind, shards)
            totals = {
                "channels_mapped": sum(len(r["examples_mapped"]) for r in results),
                "prior_channels_mapped": sum(len(r["prior_channels"]) for r in results),
                "samples_regenerated": sum(r["samples_regenerated"] for r in results),
                "prior_forwards": sum(r["prior_forwards"] for r in results),
            }
            mlflow.log_metrics({f"{kind}_{name}": value for name, value in totals.items()})
            if results:
                mlflow.log_metrics(
                    {
                        f"{kind}_max_mean_deviation": max(r["max_mean_deviation"] for r in results),
                        f"{kind}_shard_seconds": sum(r["seconds"] for r in results),
                    }
                )
            overlays = [Path(o) for r in results for o in r["overlays"]][:CONTACT_SHEET_SIZE]
            if overlays:
                mlflow.log_image(tracking.contact_sheet(overlays), f"heatmaps_{kind}_contact_sheet.png")
            result[kind] = {"store": str(path), **totals}
        result["mlflow_run_id"] = run.info.run_id
    logger.info("heatmaps done: %s", result)
    report_stage("heatmaps", result, result["mlflow_run_id"], tracking.tracking_uri(config), config.experiment_name)
    return result
