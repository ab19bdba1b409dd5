"""Concept search: which channels (or SAE features) respond to a concept, per timestep.

Given the samples of a concept (prompts containing a phrase, or an explicit prompt list) and
the rest of the capture store, each channel gets a contrastive score per UNet call, as
SAeUron's feature importance ranks features for a concept: the difference of the two groups'
mean activations divided by their pooled standard deviation (an effect size, so channels of
different scales compare). The store is streamed in sample chunks; memory is bounded by the
chunk, and the chunk size does not change the result beyond float rounding.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig

EPS = 1e-8


@dataclass
class ConceptScores:
    """Scores [channel, call] and the channels ranked by their mean score over calls (highest first)."""

    concept: str
    channel: np.ndarray
    timestep: np.ndarray
    score: np.ndarray
    ranking: np.ndarray
    n_concept: int
    n_rest: int

    def top(self, n: int = 10) -> list[dict[str, float | int]]:
        mean = self.score.mean(axis=1)
        return [
            {
                "channel": int(self.channel[i]),
                "score": float(mean[i]),
                "best_timestep": int(self.timestep[self.score[i].argmax()]),
            }
            for i in self.ranking[:n]
        ]


def concept_mask(prompts: Sequence[str], concept: str | Sequence[str]) -> np.ndarray:
    """Samples of the concept: prompts containing the phrase (whole words, any case), or in the given list."""
    if isinstance(concept, str):
        pattern = re.compile(rf"\b{re.escape(concept.strip())}\b", re.IGNORECASE)
        return np.array([bool(pattern.search(p)) for p in prompts])
    wanted = set(concept)
    return np.array([p in wanted for p in prompts])


def score_concept(
    config: ExperimentConfig, kind: str, concept: str | Sequence[str], chunk_samples: int | None = None
) -> ConceptScores:
    """Effect size of concept vs rest for every channel and UNet call of the capture store."""
    config.require_kind(kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    group = stores.open_store(layout.capture_store)
    if kind not in group:
        raise ConfigError(f"kind {kind!r}: the capture store {layout.capture_store} holds no {kind!r} array")
    array = group[kind]
    prompts = [str(p) for p in group["prompt"][:]]
    mask = concept_mask(prompts, concept)
    n_concept, n_rest = int(mask.sum()), int((~mask).sum())
    if n_concept == 0 or n_rest == 0:
        raise ConfigError(
            f"concept {concept!r} matches {n_concept} of {len(prompts)} samples; it needs some samples on both sides"
        )
    chunk = chunk_samples or config.stages.timestep_analysis.chunk_samples
    sums = np.zeros((2, *array.shape[1:]))
    squares = np.zeros((2, *array.shape[1:]))
    for start in range(0, array.shape[0], chunk):
        values = np.asarray(array[start : start + chunk], dtype=np.float64)
        if np.isnan(values).any():
            raise ValueError(f"capture store {layout.capture_store} has unwritten rows near sample {start}")
        inside = mask[start : start + chunk]
        for side, rows in ((0, values[inside]), (1, values[~inside])):
            sums[side] += rows.sum(axis=0)
            squares[side] += (rows**2).sum(axis=0)
    counts = np.array([n_concept, n_rest], dtype=np.float64)[:, None, None]
    means = sums / counts
    variances = np.maximum(squares / counts - means**2, 0.0)
    pooled = np.sqrt((variances[0] * n_concept + variances[1] * n_rest) / (n_concept + n_rest))
    score = ((means[0] - means[1]) / (pooled + EPS)).T  # [channel, call]
    ranking = np.argsort(-score.mean(axis=1), kind="stable")
    channel_name = "channel" if kind == "raw" else "feature"
    return ConceptScores(
        concept=concept if isinstance(concept, str) else f"{len(concept)} prompts",
        channel=np.asarray(group[channel_name][:]),
        timestep=np.asarray(group["timestep"][:]),
        score=score,
        ranking=ranking,
        n_concept=n_concept,
        n_rest=n_rest,
    )


def write_concept_ranking(config: ExperimentConfig, kind: str, scores: ConceptScores, top: int = 50) -> Path:
    """`concepts/<kind>/<concept>.json`: the top channels with their mean score and best timestep."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", scores.concept).strip("_") or "concept"
    path = config.experiment_dir / "concepts" / kind / f"{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "concept": scores.concept,
                "kind": kind,
                "n_concept": scores.n_concept,
                "n_rest": scores.n_rest,
                "score": "effect size (mean concept - mean rest) / pooled std, averaged over UNet calls",
                "top": scores.top(top),
            },
            indent=1,
        )
    )
    return path
