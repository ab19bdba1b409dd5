"""Concept search ranks a planted concept channel first, whatever the chunk size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ddr import stores
from ddr.config import ConfigError, load_config
from ddr.stages.concept_search import concept_mask, score_concept, write_concept_ranking


def planted(tmp_path: Path) -> tuple:
    config = load_config([f"data_root={tmp_path}", "use_sae=false"])
    rng = np.random.default_rng(0)
    prompts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "cross", "star")] * 3
    n, calls, channels = len(prompts), 5, 16
    raw = rng.normal(size=(n, calls, channels)).astype(np.float32)
    red = concept_mask(prompts, "red")
    raw[red, :, 11] += 3.0  # channel 11 fires on red prompts
    raw[:, :, 4] *= 10.0  # a large but concept-blind channel must not win on scale
    layout = stores.ExperimentLayout(config.experiment_dir)
    group = stores.create_capture_store(
        layout.capture_store,
        prompts=prompts,
        seeds=np.arange(n),
        images=[""] * n,
        timesteps=np.array([900, 700, 500, 300, 100]),
        n_channels=channels,
        n_features=None,
        chunk_samples=8,
        dtype="float32",
        attrs={},
    )
    stores.write_capture_rows(group, 0, raw, None)
    return config, prompts, raw, red


def test_concept_mask_matches_whole_words_or_a_prompt_list() -> None:
    prompts = ["a red circle", "a reddish square", "RED cross"]
    assert concept_mask(prompts, "red").tolist() == [True, False, True]
    assert concept_mask(prompts, ["a reddish square"]).tolist() == [False, True, False]


def test_planted_concept_channel_ranks_first_and_chunks_do_not_matter(tmp_path: Path) -> None:
    config, _prompts, raw, red = planted(tmp_path)
    scores = score_concept(config, "raw", "red", chunk_samples=7)
    assert scores.ranking[0] == 11 and scores.n_concept == red.sum()
    mean_in, mean_out = raw[red].astype(np.float64).mean(0), raw[~red].astype(np.float64).mean(0)
    pooled = np.sqrt((raw[red].var(0) * red.sum() + raw[~red].var(0) * (~red).sum()) / len(raw))
    np.testing.assert_allclose(scores.score, ((mean_in - mean_out) / pooled).T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(score_concept(config, "raw", "red", chunk_samples=100).score, scores.score, atol=1e-9)
    path = write_concept_ranking(config, "raw", scores, top=3)
    top = json.loads(path.read_text())["top"]
    assert top[0]["channel"] == 11 and len(top) == 3


def test_a_concept_on_one_side_only_is_a_clear_error(tmp_path: Path) -> None:
    config, *_ = planted(tmp_path)
    with pytest.raises(ConfigError, match="matches 0 of 36 samples"):
        score_concept(config, "raw", "purple")
