"""ddr-plots: an activity plot (PNG, or a GIF over the peaks) per active channel, channels as shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import tracking
from ddr.config import ExperimentConfig
from ddr.stages import plots
from flows.analysis import kinds_in_capture
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

MLFLOW_SAMPLE = 8


@task(name="plot-channels", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def plot_channels_task(config: ExperimentConfig, kind: str, channels: list[int]) -> dict[str, Any]:
    return {"files": [str(p) for p in plots.plot_channels(config, kind, channels)]}


@flow(name="ddr-plots-shards")
def plot_shards(config: ExperimentConfig, kind: str, shards: list[list[int]]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=False):
        futures = [(shard[0], plot_channels_task.submit(config, kind, shard)) for shard in shards]
    return gather(futures, f"plots ({kind})")


@flow(name="ddr-plots")
def plots_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Plot every active channel's activity profile beside its top dataset example; log a sample to MLflow."""
    logger = get_run_logger()
    config = load(overrides, config_file)
    result: dict[str, Any] = {}
    with tracking.stage_run(config, "plots", tags=prefect_tags()) as run:
        for kind in kinds_in_capture(config):
            shards = plots.plan_plots(config, kind)
            files: list[str] = []
            if shards:
                runner = task_runner(config, len(shards))
                results = plot_shards.with_options(task_runner=runner)(config, kind, shards)
                files = [f for r in results for f in r["files"]]
            index = plots.write_plot_index(config, kind)
            mlflow.log_metric(f"{kind}_plots", len(files))
            mlflow.log_artifact(str(index), artifact_path=f"plots/{kind}")
            for file in sorted(files)[:MLFLOW_SAMPLE]:
                mlflow.log_artifact(file, artifact_path=f"plots/{kind}")
            result[kind] = {"plots": len(files), "index": str(index), "folder": str(Path(index).parent)}
        result["mlflow_run_id"] = run.info.run_id
    logger.info("plots done: %s", result)
    report_stage("plots", result, result["mlflow_run_id"], tracking.tracking_uri(config), config.experiment_name)
    return result
