"""ddr-timestep-analysis: per-channel activity profiles, peaks and ranked examples, in channel blocks."""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import stores, tracking
from ddr.config import ExperimentConfig
from ddr.stages import analysis
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


@task(name="analyse-block", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def analyse_block_task(config: ExperimentConfig, kind: str, block: analysis.Block) -> dict[str, Any]:
    return analysis.analyse_block(config, kind, block.start, block.stop)


@flow(name="ddr-timestep-analysis-blocks")
def analyse_blocks(config: ExperimentConfig, kind: str, blocks: list[analysis.Block]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=False):
        futures = [(b.index, analyse_block_task.submit(config, kind, b)) for b in blocks]
    return gather(futures, f"timestep analysis ({kind})")


def kinds_in_capture(config: ExperimentConfig) -> list[str]:
    """The kinds the capture store holds: raw always, sae when it was captured with an SAE."""
    group = stores.open_store(analysis.capture_store_path(config))
    return [kind for kind in ("raw", "sae") if kind in group]


@flow(name="ddr-timestep-analysis")
def timestep_analysis_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Analyse the capture store for raw channels and (when captured) SAE features; one MLflow run."""
    logger = get_run_logger()
    config = load(overrides, config_file)
    summaries: dict[str, Any] = {}
    with tracking.stage_run(config, "timestep_analysis", tags=prefect_tags()) as run:
        for kind in kinds_in_capture(config):
            blocks = analysis.plan_analysis(config, kind)
            logger.info("timestep analysis %s: %d channel blocks to do", kind, len(blocks))
            if len(blocks) > 1:
                analyse_blocks.with_options(task_runner=task_runner(config, len(blocks)))(config, kind, blocks)
            elif blocks:
                analysis.analyse_block(config, kind, blocks[0].start, blocks[0].stop)
            summary = analysis.finalize_analysis(config, kind)
            mlflow.log_metrics(
                {
                    f"{kind}_channels": summary["channels"],
                    f"{kind}_active_channels": summary["active_channels"],
                    f"{kind}_dead_channels": len(summary["dead_channels"]),
                }
            )
            mlflow.log_artifact(str(stores.ExperimentLayout(config.experiment_dir).analysis_summary(kind)))
            summaries[kind] = {k: summary[k] for k in ("analysis_store", "channels", "active_channels")}
        summaries["mlflow_run_id"] = run.info.run_id
    logger.info("timestep analysis done: %s", summaries)
    report_stage(
        "timestep_analysis",
        summaries,
        summaries["mlflow_run_id"],
        tracking.tracking_uri(config),
        config.experiment_name,
    )
    return summaries
