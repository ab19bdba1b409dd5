"""The notebooks run top to bottom (nbclient, a real kernel) against the demo data root; they are stored stripped."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.test_representation import demo_root

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXPECTED = {
    "01_capture_store.ipynb": ["experiment folder:", "samples: 5", "#1 sample"],
    "02_channel_results.ipynb": ["deep-dream runs: default, no-noise", "prior: steered at timesteps"],
    "03_mlflow_sweep.ipynb": ["2 deep-dream runs", "settings that vary across runs: ['total_variation_penalty_weight'"],
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_root(tmp_path_factory)


def execute(name: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[nbformat.NotebookNode, str]:
    """Run a notebook in a fresh kernel with these environment variables; returns it and its text output."""
    for key in ("DDR_MLFLOW_URI", "MLFLOW_TRACKING_URI", "DDR_CHANNEL", "DDR_KIND"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws figures as outputs
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    text = []
    for cell in book.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    return book, "\n".join(text)


def images(book: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in book.cells for o in c.get("outputs", []))


def test_notebooks_are_stored_without_outputs() -> None:
    found = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(EXPECTED)
    for name in found:
        book = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(book)
        code = [c for c in book.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: outputs not stripped"
        assert "DDR_DATA_ROOT" in code[0].source and "DATA_ROOT" in code[0].source, "first cell sets the paths"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_against_the_demo_data_root(name: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book, text = execute(name, monkeypatch, DDR_DATA_ROOT=str(root), DDR_EXPERIMENT="default")
    for expected in EXPECTED[name]:
        assert expected in text, f"{name}: {expected!r} not in the output"
    assert images(book) >= 1, f"{name} draws its figures"


def test_sweep_notebook_says_so_when_there_are_no_runs_yet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book, text = execute("03_mlflow_sweep.ipynb", monkeypatch, DDR_DATA_ROOT=str(tmp_path), DDR_EXPERIMENT="none")
    assert "no deep-dream runs yet" in text and "nothing to plot yet" in text
    assert images(book) == 0 and not (tmp_path / "mlflow.db").exists(), "no store is created by looking"
