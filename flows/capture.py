"""ddr-capture: provision, plan the prompt shards, capture them on Dask workers, log to MLflow."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import stores, tracking
from ddr.config import ExperimentConfig
from ddr.provision import provision
from ddr.stages import capture
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


@task(name="capture-shard", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def capture_shard_task(config: ExperimentConfig, shard: capture.Shard) -> dict[str, Any]:
    return capture.capture_shard(config, shard)


@flow(name="ddr-capture-shards")
def capture_shards(config: ExperimentConfig, shards: list[capture.Shard]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=True):
        futures = [(s.index, capture_shard_task.submit(config, s)) for s in shards]
    return gather(futures, "capture")


@flow(name="ddr-capture")
def capture_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Capture the target layer's activations for every prompt x image into capture/activations.zarr."""
    logger = get_run_logger()
    config = load(overrides, config_file)
    provision(config)
    plan = capture.plan_capture(config)
    logger.info(plan.prompt_file.report())
    store = capture.prepare_store(config, plan)
    todo = capture.pending_shards(config, plan)
    logger.info("capture: %d samples in %d shards, %d to do", plan.n_samples, len(plan.shards), len(todo))
    with tracking.stage_run(config, "capture", tags=prefect_tags()) as run:
        results = []
        if todo:
            runner = task_runner(config, config.stages.capture.num_workers or len(todo))
            results = capture_shards.with_options(task_runner=runner)(config, todo)
        seconds = sum(r["seconds"] for r in results)
        samples = sum(r["samples"] for r in results)
        import mlflow

        mlflow.log_metrics(
            {
                "samples": plan.n_samples,
                "samples_captured": samples,
                "shards_skipped": len(plan.shards) - len(todo),
                "shard_seconds": seconds,
                "samples_per_second": samples / seconds if seconds else 0.0,
                "malformed_prompt_lines": len(plan.prompt_file.malformed),
            }
        )
        layout = stores.ExperimentLayout(config.experiment_dir)
        images = sorted(layout.capture_images.glob("*.png"))[:32]
        if images:
            mlflow.log_image(tracking.contact_sheet(images), "capture_contact_sheet.png")
        run_id = run.info.run_id
    summary = {"store": str(store), "samples": plan.n_samples, "captured": samples, "mlflow_run_id": run_id}
    logger.info("capture done: %s", summary)
    report_stage("capture", summary, run_id, tracking.tracking_uri(config), config.experiment_name)
    return summary
