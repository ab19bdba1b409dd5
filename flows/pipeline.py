"""ddr-pipeline: every stage in order, each as a subflow, in one Prefect run."""

from __future__ import annotations

import importlib
from typing import Any

from prefect import flow, get_run_logger

from flows.common import load

# (stage, module, flow function): the order is the data dependency order of DESIGN.md.
PIPELINE: list[tuple[str, str, str]] = [
    ("provision", "flows.provision", "provision_flow"),
    ("capture", "flows.capture", "capture_flow"),
    ("timestep_analysis", "flows.analysis", "timestep_analysis_flow"),
    ("concept_search", "flows.concept_search", "concept_search_flow"),
    ("prior", "flows.prior", "prior_flow"),
    ("heatmaps", "flows.heatmaps", "heatmaps_flow"),  # after prior (maps its priors too), before plots (overlays)
    ("plots", "flows.plots", "plots_flow"),
    ("deep_dream", "flows.deep_dream", "deep_dream_flow"),
    ("representation", "flows.representation", "representation_flow"),
]


def stage_flow(stage: str) -> Any:
    for name, module, function in PIPELINE:
        if name == stage:
            return getattr(importlib.import_module(module), function)
    raise ValueError(f"unknown stage {stage!r}; allowed: {', '.join(name for name, _, _ in PIPELINE)}")


@flow(name="ddr-pipeline")
def pipeline_flow(
    overrides: list[str] | None = None, config_file: str | None = None, stages: list[str] | None = None
) -> dict[str, Any]:
    """Run the given stages (default: all) in pipeline order with the same config."""
    load(overrides, config_file)
    wanted = stages or [name for name, _, _ in PIPELINE]
    unknown = set(wanted) - {name for name, _, _ in PIPELINE}
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; allowed: {', '.join(n for n, _, _ in PIPELINE)}")
    results: dict[str, Any] = {}
    for name, _, _ in PIPELINE:
        if name in wanted:
            get_run_logger().info("pipeline: stage %s", name)
            results[name] = stage_flow(name)(overrides=overrides, config_file=config_file)
    return results
