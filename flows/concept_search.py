"""ddr-concept-search: rank channels and SAE features by how much more they respond to each concept than to the rest.

Concepts whose prompts are not in the dataset are generated first (GPU tasks, the capture's
settings); then one task per (kind, concept) streams the capture store and writes that concept's
store and JSON summary. One MLflow run: the concepts and kinds as params, per concept its top
score and sample counts as metrics, the JSON summaries as artifacts.
"""

from __future__ import annotations

from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ddr import stores, tracking
from ddr.config import ExperimentConfig
from ddr.stages import concept_search
from ddr.stages.concept_search import Concept
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


@task(name="concept-generate", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def generate_concept_task(config: ExperimentConfig, concept: Concept) -> dict[str, Any]:
    return concept_search.generate_concept(config, concept)


@task(name="concept-score", retries=TASK_RETRIES, retry_delay_seconds=RETRY_DELAYS, cache_policy=NO_CACHE)
def concept_task(config: ExperimentConfig, kind: str, concept: Concept) -> dict[str, Any]:
    return concept_search.run_concept(config, kind, concept)


@flow(name="ddr-concept-generate")
def generate_concepts(config: ExperimentConfig, concepts: list[Concept]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=True):
        futures = [(c.name, generate_concept_task.submit(config, c)) for c in concepts]
    return gather(futures, "concept generation")


@flow(name="ddr-concept-scores")
def score_concepts(config: ExperimentConfig, pairs: list[tuple[str, Concept]]) -> list[dict[str, Any]]:
    with gpu_annotation(config, needs_gpu=False):
        futures = [(f"{kind} {c.name!r}", concept_task.submit(config, kind, c)) for kind, c in pairs]
    return gather(futures, "concept search")


def top_line(top: list[dict[str, Any]], n: int = 5) -> str:
    """The first channels of a ranking as `channel (score @ t=best timestep)`, for the Prefect summary."""
    return ", ".join(f"{r['channel']} ({r['score']:.2f} @ t={r['best_timestep']})" for r in top[:n])


@flow(name="ddr-concept-search")
def concept_search_flow(overrides: list[str] | None = None, config_file: str | None = None) -> dict[str, Any]:
    """Score every configured concept for raw channels and (when captured) SAE features; one MLflow run."""
    logger = get_run_logger()
    config = load(overrides, config_file)
    concepts = concept_search.planned_concepts(config)
    if not concepts:
        logger.info("concept search: nothing to do; set stages.concept_search.concepts or concept_prompts")
        return {"concepts": 0}
    kinds = concept_search.search_kinds(config)
    pairs = [(kind, c) for kind in kinds for c in concepts]
    layout = stores.ExperimentLayout(config.experiment_dir)
    params = {"concept_search.kinds": ",".join(kinds), "concept_search.names": [c.name for c in concepts]}
    summary: dict[str, Any] = {}
    with tracking.stage_run(config, "concept_search", tags=prefect_tags(), params=params) as run:
        pending = [c for c in concepts if concept_search.generation_pending(config, c)]
        logger.info("concept search: %d concepts x %s, %d to generate", len(concepts), kinds, len(pending))
        if pending:
            generated = generate_concepts.with_options(task_runner=task_runner(config, len(pending)))(config, pending)
            mlflow.log_metric("generated_samples", sum(r["generated"] for r in generated))
        todo = [(kind, c) for kind, c in pairs if not concept_search.concept_done(config, kind, c)]
        logger.info("concept search: %d of %d (kind, concept) pairs to score", len(todo), len(pairs))
        results = [concept_search.run_concept(config, kind, c) for kind, c in pairs if (kind, c) not in todo]
        if todo:
            results += score_concepts.with_options(task_runner=task_runner(config, len(todo)))(config, todo)
        for r in sorted(results, key=lambda r: (r["kind"], r["concept"])):
            kind, name = r["kind"], r["concept"]
            slug = stores.concept_slug(name)
            mlflow.log_metrics(
                {
                    f"{kind}.{slug}.top_score": r["top"][0]["score"],
                    f"{kind}.{slug}.n_concept": r["n_concept"],
                    f"{kind}.{slug}.n_rest": r["n_rest"],
                }
            )
            mlflow.log_artifact(str(layout.concept_summary(kind, name)), artifact_path=f"concepts/{kind}")
            summary.setdefault(kind, {})[name] = {
                "store": r["store"],
                "n_concept": r["n_concept"],
                "n_rest": r["n_rest"],
                "skipped": r["skipped"],
                "top": top_line(r["top"]),
            }
        summary["mlflow_run_id"] = run.info.run_id
    logger.info("concept search done: %s", summary)
    report_stage(
        "concept_search", summary, summary["mlflow_run_id"], tracking.tracking_uri(config), config.experiment_name
    )
    return summary
