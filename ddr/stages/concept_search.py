"""Concept search: which channels (or SAE features) respond to a concept, per UNet call.

A concept is a phrase (`stages.concept_search.concepts`: its samples are the capture prompts
holding the phrase as whole words, any case) or a named prompt list (`concept_prompts`: the
captured samples of those prompts). The rest are the other captured samples. Prompts of a list
that are not in the capture dataset are generated first (`generate_concept`) with the capture
stage's own code and settings, and join the concept side; the rest is then the whole dataset
(minus any listed prompts it holds).

Score (as SAeUron's feature importance ranks features for a concept, but scale-free so channels
of different scales compare): per channel and UNet call, the effect size

    score = (mean_concept - mean_rest) / (pooled_std + 1e-8),
    pooled_std = sqrt((n_concept * var_concept + n_rest * var_rest) / (n_concept + n_rest))

with population variances; `mean_score` is its mean over calls and `ranking` the channel ids by
descending mean_score (equal scores: the lower index first). The capture store is streamed in
sample chunks; per side, sums and sums of squares of x - shift (the first chunk's mean, against
cancellation) accumulate in float64, so memory is bounded by the chunk and the chunk size changes
the result only by float rounding.

Seeds of generated samples: the k-th generated sample of a concept (prompt-major, in the order
listed, `samples_per_prompt` per prompt) draws its initial latent from torch.Generator(s + 1 + k),
s the largest seed of the capture store, so it never shares its noise with a captured sample.

Outputs (paths from `ddr.stores`): `concepts/<kind>/<slug>.zarr` with `score`, `mean_concept`,
`mean_rest` (channel, timestep), `mean_score` (channel), `ranking` (rank), the dim `channel`
named `feature` for SAE features; `concepts/<kind>/<slug>.json`, the top list, written last: it
marks the concept done, and a rerun with the same inputs skips it. Generated samples go to
`concepts/generated/<slug>.zarr` in the capture-store layout.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ddr import stores
from ddr.config import ConceptSearchConfig, ConfigError, ExperimentConfig
from ddr.stages.analysis import CaptureIncomplete
from ddr.stores import Kind

log = logging.getLogger(__name__)

EPS = 1e-8
SLICE_BYTES = 8 * 2**20  # rows are cast to float64 about this many bytes at a time
SCORE_RULE = (
    "effect size per UNet call: (mean concept - mean rest) / (pooled std + 1e-8), pooled std = "
    "sqrt((n_concept var_concept + n_rest var_rest) / (n_concept + n_rest)), population variances; "
    "mean_score: its mean over calls; ranking: channel ids by descending mean_score, ties to the lower index"
)


@dataclass(frozen=True)
class Concept:
    """A phrase matched in the dataset prompts (`prompts` None), or a named list of prompts."""

    name: str
    prompts: tuple[str, ...] | None = None

    @property
    def slug(self) -> str:
        return stores.concept_slug(self.name)

    def describe(self) -> dict[str, Any]:
        """The concept as recorded in its summary and settings: the phrase, or the prompt list."""
        if self.prompts is None:
            return {"concept": self.name, "phrase": self.name.strip()}
        return {"concept": self.name, "prompts": list(self.prompts)}


@dataclass
class ConceptScores:
    """Scores [channel, call], the group means, and the channels ranked by mean score (positions into `channel`)."""

    concept: str
    channel: np.ndarray
    timestep: np.ndarray
    score: np.ndarray
    mean_concept: np.ndarray
    mean_rest: np.ndarray
    ranking: np.ndarray
    n_concept: int
    n_rest: int

    @property
    def mean_score(self) -> np.ndarray:
        return self.score.mean(axis=1)

    def top(self, n: int = 10) -> list[dict[str, float | int]]:
        """The first n channels of the ranking: id, mean score, and the call (and its timestep) scoring highest."""
        mean = self.mean_score
        rows = []
        for i in self.ranking[:n]:
            best = int(self.score[i].argmax())
            rows.append(
                {
                    "channel": int(self.channel[i]),
                    "score": float(mean[i]),
                    "best_call": best,
                    "best_timestep": int(self.timestep[best]),
                    "best_score": float(self.score[i, best]),
                }
            )
        return rows


# --- which concepts, from which store -------------------------------------------------------------


def capture_store_path(config: ExperimentConfig) -> Path:
    """`stages.concept_search.capture_results_dir` (relative to the experiment folder or absolute)."""
    layout = stores.ExperimentLayout(config.experiment_dir)
    return layout.capture_store_from(config.stages.concept_search.capture_results_dir)


def _open_capture(config: ExperimentConfig) -> tuple[Path, zarr.Group]:
    path = capture_store_path(config)
    if not path.exists():
        raise FileNotFoundError(
            f"capture store {path} does not exist (stages.concept_search.capture_results_dir="
            f"{config.stages.concept_search.capture_results_dir}); run the capture stage first"
        )
    return path, stores.open_store(path)


def search_kinds(config: ExperimentConfig) -> list[Kind]:
    """The experiment's kinds that the capture store holds (SAE features only when they were captured)."""
    _path, group = _open_capture(config)
    return [kind for kind in config.kinds if kind in group]


def planned_concepts(config: ExperimentConfig) -> list[Concept]:
    """The configured concepts (phrases, then prompt lists); two that would share a file name are an error."""
    s = config.stages.concept_search
    concepts = [Concept(c) for c in s.concepts]
    concepts += [Concept(name, tuple(p.strip() for p in prompts)) for name, prompts in s.concept_prompts.items()]
    by_slug: dict[str, str] = {}
    for concept in concepts:
        try:
            slug = concept.slug
        except ValueError as error:
            raise ConfigError(f"stages.concept_search: {error}") from None
        if slug in by_slug:
            raise ConfigError(
                f"stages.concept_search: concepts {by_slug[slug]!r} and {concept.name!r} would share the files "
                f"concepts/<kind>/{slug}.*; rename one"
            )
        by_slug[slug] = concept.name
    return concepts


def concept_mask(prompts: Sequence[str], concept: str | Sequence[str]) -> np.ndarray:
    """Samples of the concept: prompts containing the phrase (whole words, any case), or in the given list."""
    if isinstance(concept, str):
        pattern = re.compile(rf"\b{re.escape(concept.strip())}\b", re.IGNORECASE)
        return np.array([bool(pattern.search(p)) for p in prompts], dtype=bool)
    wanted = set(concept)
    return np.array([p in wanted for p in prompts], dtype=bool)


# --- generated concept samples --------------------------------------------------------------------


def generation_plan(config: ExperimentConfig, concept: Concept) -> tuple[list[str], np.ndarray]:
    """The samples to generate for a concept's prompts not in the capture dataset: (prompt per sample, seeds)."""
    if concept.prompts is None:
        return [], np.zeros(0, dtype=np.int64)
    _path, group = _open_capture(config)
    dataset = {str(p) for p in group["prompt"][:]}
    missing = [p for p in dict.fromkeys(concept.prompts) if p not in dataset]
    per_prompt = config.stages.concept_search.samples_per_prompt
    prompts = [p for p in missing for _ in range(per_prompt)]
    first = int(np.max(group["seed"][:])) + 1 if group["seed"].shape[0] else config.stages.capture.seed
    return prompts, first + np.arange(len(prompts), dtype=np.int64)


def _generation_settings(config: ExperimentConfig, concept: Concept) -> dict[str, Any] | None:
    """What decides a concept's generated store; None when it has nothing to generate."""
    prompts, seeds = generation_plan(config, concept)
    if not prompts:
        return None
    _path, group = _open_capture(config)
    return {
        "prompts": prompts,
        "seeds": seeds.tolist(),
        "capture_settings_sha256": stores.attr_sha256(group),
    }


def _generated_store_settings(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(stores.open_store(path).attrs["generation"])
    except (KeyError, ValueError, TypeError):
        return None


def generation_pending(config: ExperimentConfig, concept: Concept) -> bool:
    """Whether the concept has prompts to generate whose store is missing or was made for other inputs."""
    settings = _generation_settings(config, concept)
    path = stores.ExperimentLayout(config.experiment_dir).concept_generated_store(concept.name)
    return settings is not None and _generated_store_settings(path) != settings


def generate_concept(config: ExperimentConfig, concept: Concept) -> dict[str, Any]:
    """Capture the concept's prompts that the dataset lacks into `concepts/generated/<slug>.zarr` (skip if done).

    Uses the capture stage's batch code (`capture.capture_batch`: same hook, steps, guidance,
    branch, SAE); the config must match the capture store's recorded settings.
    """
    from ddr.models.pipeline import load_experiment_sae, load_pipeline
    from ddr.stages import capture

    layout = stores.ExperimentLayout(config.experiment_dir)
    path = layout.concept_generated_store(concept.name)
    settings = _generation_settings(config, concept)
    if settings is None:
        return {"concept": concept.name, "generated": 0, "skipped": True}
    if _generated_store_settings(path) == settings:
        return {"concept": concept.name, "generated": len(settings["prompts"]), "skipped": True}
    capture_path, group = _open_capture(config)
    try:
        recorded = json.loads(group.attrs["settings"])
    except (KeyError, ValueError, TypeError):
        recorded = None
    now = capture.generation_settings(config)
    differing = [k for k, value in now.items() if recorded is None or recorded.get(k) != value]
    if differing:
        raise ConfigError(
            f"stages.concept_search.concept_prompts[{concept.name!r}]: its prompts not in the dataset are generated "
            f"with the capture's settings, but this config differs from those recorded in {capture_path} in "
            f"{', '.join(differing)}; run with the capture's config"
        )
    prompts, seeds = settings["prompts"], settings["seeds"]
    planned = [int(t) for t in group["timestep"][:]]
    pipe, sae = load_pipeline(config), load_experiment_sae(config)
    batch_size = config.stages.capture.batch_size
    started = time.perf_counter()
    raws, codes = [], []
    for offset in range(0, len(prompts), batch_size):
        batch = slice(offset, offset + batch_size)
        _images, raw, features, seen = capture.capture_batch(
            pipe, prompts[batch], seeds[batch], config, len(planned), sae
        )
        if seen != planned:
            raise RuntimeError(
                f"concept {concept.name!r}: the UNet visited timesteps {seen}, the capture has {planned}"
            )
        raws.append(raw)
        if features is not None:
            codes.append(features)
    stores.write_generated_concept_store(
        path,
        prompts=prompts,
        seeds=np.asarray(seeds, dtype=np.int64),
        timesteps=np.asarray(planned, dtype=np.int64),
        raw=np.concatenate(raws),
        sae=np.concatenate(codes) if codes else None,
        attrs={
            "concept": concept.name,
            "capture_store": str(capture_path.resolve()),
            "seed_rule": "sample k of the concept draws from torch.Generator(max capture seed + 1 + k)",
            "generation": json.dumps(settings, sort_keys=True),
        },
    )
    seconds = time.perf_counter() - started
    log.info("concept %r: generated %d samples in %.1fs", concept.name, len(prompts), seconds)
    return {"concept": concept.name, "generated": len(prompts), "seconds": seconds, "skipped": False}


# --- scoring --------------------------------------------------------------------------------------


class _TwoSums:
    """Per (call, channel), for the concept (side 0) and the rest (side 1): count, sum and sum of squares of
    x - shift, in float64. The shift (the first rows' mean) keeps E[(x - shift)^2] - E[x - shift]^2 free of
    cancellation; rows are cast SLICE_BYTES at a time, so temporaries stay small beside the chunk."""

    def __init__(self) -> None:
        self.count = np.zeros(2)
        self.shift: np.ndarray | None = None
        self.sums = np.zeros(0)
        self.squares = np.zeros(0)

    def add(self, values: np.ndarray, concept: np.ndarray, where: str, offset: int) -> None:
        """values [n, calls, channels] (rows `offset`.. of `where`, for errors); concept [n] bool: the row's side."""
        flat = values.reshape(len(values), -1)
        if self.shift is None:
            self.shift = flat.mean(axis=0, dtype=np.float64)
            self.sums, self.squares = np.zeros((2, flat.shape[1])), np.zeros((2, flat.shape[1]))
        sides = np.stack([concept, ~concept]).astype(np.float64)  # [2, n], one-hot per row
        self.count += sides.sum(axis=1)
        step = max(1, SLICE_BYTES // (flat.shape[1] * 8))
        for a in range(0, len(flat), step):
            x = flat[a : a + step].astype(np.float64)
            bad = np.isnan(x).any(axis=1)
            if bad.any():
                rows = offset + a + np.flatnonzero(bad)
                raise CaptureIncomplete(
                    f"capture store {where} has unwritten (NaN) rows, e.g. samples {rows[:5].tolist()}; "
                    "run the capture stage to completion first"
                )
            x -= self.shift
            self.sums += sides[:, a : a + step] @ x
            np.square(x, out=x)
            self.squares += sides[:, a : a + step] @ x

    def moments(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Each side's mean and population variance, [2, *shape]."""
        if self.shift is None:
            raise ValueError("no samples were added")
        mean = self.sums / self.count[:, None]
        variance = np.maximum(self.squares / self.count[:, None] - mean**2, 0.0)
        return (self.shift + mean).reshape(2, *shape), variance.reshape(2, *shape)


def _settings(config: ExperimentConfig, kind: Kind) -> ConceptSearchConfig:
    config.require_kind(kind)
    return config.stages.concept_search.for_kind(kind)  # type: ignore[return-value]


def score_concept(
    config: ExperimentConfig, kind: Kind, concept: Concept | str, chunk_samples: int | None = None
) -> ConceptScores:
    """Effect size of concept vs rest for every channel and UNet call of the capture store (plus generated samples)."""
    concept = Concept(concept) if isinstance(concept, str) else concept
    s = _settings(config, kind)
    path, group = _open_capture(config)
    if kind not in group:
        raise ConfigError(f"kind {kind!r}: the capture store {path} holds no {kind!r} array")
    array = group[kind]
    prompts = [str(p) for p in group["prompt"][:]]
    mask = concept_mask(prompts, concept.name if concept.prompts is None else concept.prompts)
    generated = None
    generation = _generation_settings(config, concept)
    generated_path = stores.ExperimentLayout(config.experiment_dir).concept_generated_store(concept.name)
    if generation is not None:
        if _generated_store_settings(generated_path) != generation:
            raise FileNotFoundError(
                f"concept {concept.name!r}: its generated samples {generated_path} are missing or stale; "
                "run generate_concept (the flow does) first"
            )
        generated = stores.open_store(generated_path)[kind]
    n_generated = 0 if generated is None else generated.shape[0]
    n_concept, n_rest = int(mask.sum()) + n_generated, int((~mask).sum())
    if n_concept == 0 or n_rest == 0:
        raise ConfigError(
            f"concept {concept.name!r} matches {n_concept} of {len(prompts)} samples; it needs some samples on both "
            f"sides (stages.concept_search.concepts are whole-word phrases of the prompts; prompts of concept_prompts "
            "not in the dataset are generated)"
        )
    chunk = chunk_samples or s.chunk_samples or config.stages.timestep_analysis.chunk_samples
    sums = _TwoSums()
    for start in range(0, array.shape[0], chunk):
        values = np.asarray(array[start : start + chunk], dtype=np.float32)
        sums.add(values, mask[start : start + chunk], str(path), start)
    if generated is not None:
        values = np.asarray(generated[:], dtype=np.float32)
        sums.add(values, np.ones(len(values), dtype=bool), str(generated_path), 0)
    means, variances = sums.moments(array.shape[1:])
    pooled = np.sqrt((variances[0] * n_concept + variances[1] * n_rest) / (n_concept + n_rest))
    score = ((means[0] - means[1]) / (pooled + EPS)).T  # [channel, call]
    dim = "channel" if kind == "raw" else "feature"
    channels = np.asarray(group[dim][:]) if dim in group else np.arange(array.shape[2])
    return ConceptScores(
        concept=concept.name,
        channel=channels,
        timestep=np.asarray(group["timestep"][:]),
        score=score,
        mean_concept=means[0].T,
        mean_rest=means[1].T,
        ranking=np.argsort(-score.mean(axis=1), kind="stable"),
        n_concept=n_concept,
        n_rest=n_rest,
    )


# --- the stage: one (kind, concept) ---------------------------------------------------------------


def concept_settings(config: ExperimentConfig, kind: Kind, concept: Concept) -> dict[str, Any]:
    """Everything that decides a concept's results; a finished concept is redone only when these change."""
    path, group = _open_capture(config)
    return {
        "kind": kind,
        **concept.describe(),
        "capture_store": str(path.resolve()),
        "capture_shape": list(group[kind].shape) if kind in group else None,
        "capture_settings_sha256": stores.attr_sha256(group),
        "generation": _generation_settings(config, concept),
        "top": _settings(config, kind).top,
    }


def concept_done(config: ExperimentConfig, kind: Kind, concept: Concept) -> bool:
    """The concept's summary (written after its store) exists and was made with the current settings."""
    summary = stores.ExperimentLayout(config.experiment_dir).concept_summary(kind, concept.name)
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text()).get("settings") == concept_settings(config, kind, concept)
    except ValueError:
        return False


def write_concept(config: ExperimentConfig, kind: Kind, scores: ConceptScores, concept: Concept) -> dict[str, Any]:
    """The store, then the JSON summary (the completion marker); returns the summary."""
    layout = stores.ExperimentLayout(config.experiment_dir)
    settings = concept_settings(config, kind, concept)
    store = layout.concept_store(kind, concept.name)
    attrs = {
        "concept": concept.name,
        "kind": kind,
        "n_concept": scores.n_concept,
        "n_rest": scores.n_rest,
        "score_rule": SCORE_RULE,
        "settings": json.dumps(settings, sort_keys=True),
    }
    stores.write_concept_store(
        store,
        dim="channel" if kind == "raw" else "feature",
        channels=scores.channel,
        timesteps=scores.timestep,
        arrays={
            "score": scores.score,
            "mean_concept": scores.mean_concept,
            "mean_rest": scores.mean_rest,
            "mean_score": scores.mean_score,
            "ranking": scores.channel[scores.ranking],
        },
        attrs=attrs,
    )
    summary = {
        **{k: v for k, v in attrs.items() if k != "settings"},
        "store": str(store.relative_to(layout.root)),
        "generated_samples": 0 if settings["generation"] is None else len(settings["generation"]["prompts"]),
        "top": scores.top(settings["top"]),
        "settings": settings,
    }
    stores.write_concept_summary(layout.concept_summary(kind, concept.name), summary)
    return summary


def run_concept(config: ExperimentConfig, kind: Kind, concept: Concept) -> dict[str, Any]:
    """Score one concept for one kind and write its store and summary; skipped when already done."""
    summary_path = stores.ExperimentLayout(config.experiment_dir).concept_summary(kind, concept.name)
    if concept_done(config, kind, concept):
        return {**json.loads(summary_path.read_text()), "skipped": True}
    started = time.perf_counter()
    scores = score_concept(config, kind, concept)
    summary = write_concept(config, kind, scores, concept)
    log.info("concept %r (%s): top %s in %.1fs", concept.name, kind, summary["top"][:3], time.perf_counter() - started)
    return {**summary, "skipped": False}


def run_concept_search(config: ExperimentConfig) -> list[dict[str, Any]]:
    """Every configured concept for every captured kind, in this process (the flow maps the same calls)."""
    concepts = planned_concepts(config)
    for concept in concepts:
        generate_concept(config, concept)
    return [run_concept(config, kind, concept) for kind in search_kinds(config) for concept in concepts]
