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
# The shipped toy model as its end-to-end checks run it (guidance 2: SD's 7.5 overshoots on it).
TOY_SHAPES = [
    "model=toy-shapes",
    "sae=toy-shapes-topk",
    "stages.capture.prompt_dataset=toy-shapes",
    "guidance_scale=2",
    "num_inference_steps=10",
]


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A temporary Prefect server for the whole session (started once: it takes ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """The CPU is shared: oversubscribed intra-op threads make tiny batches ~30x slower.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(data_root: Path, *overrides: str) -> ExperimentConfig:
    """The tiny model with the test-sized settings, assets provisioned."""
    config = load_config([f"data_root={data_root}", *TINY, *overrides])
    provision(config)
    return config


def provisioned_root(tmp_path_factory: pytest.TempPathFactory, basename: str, *overrides: str) -> Path:
    """A fresh data root with the tiny model and SAE provisioned once, for a module's experiments."""
    root = tmp_path_factory.mktemp(basename)
    tiny_config(root, *overrides)
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> ExperimentConfig:
    return tiny_config(tmp_path)
