"""Shared fixtures: telemetry off, one Prefect test server per session, the tiny model provisioned."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from ddr.config import ExperimentConfig, load_config
from ddr.provision import provision

# Small enough for the CPU, large enough that every code path runs: CFG on, several shards and batches.
TINY = [
    "num_inference_steps=6",
    "stages.capture.dev_n_prompts=5",
    "stages.capture.samples_per_shard=4",
    "stages.capture.batch_size=2",
]


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server for the whole session (started once: it takes ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_config(data_root: Path, *overrides: str) -> ExperimentConfig:
    """The tiny model with the test-sized settings, assets provisioned."""
    config = load_config([f"data_root={data_root}", *TINY, *overrides])
    provision(config)
    return config


@pytest.fixture
def tiny(tmp_path: Path) -> ExperimentConfig:
    return tiny_config(tmp_path)
