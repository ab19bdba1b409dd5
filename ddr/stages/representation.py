"""Representation: one index per kind that the inspector (and notebooks) read, built from every stage's stores.

Layout under `<experiment>/representation/` (Zarr + JSON + the stages' PNGs; no pickle). Every
path stored in it is relative to the experiment folder (POSIX separators; absolute only for a
source outside the data root), so a copied data root still opens.

```
representation/
  index.json                    which kinds exist: {"kinds": {"raw": {...}, "sae": null}, "absent": {"sae": why}}
  <kind>/                       kind = raw | sae
    index.json                  the channel index: one row per channel, active channels first (ascending id),
                                then inactive ones; sources, absent stages, MLflow location, dream runs
    channels.zarr               dense per-channel arrays (xarray-readable, chunked by shard along channel)
    channels/channel_NNNNN.json ragged per-channel results: priors, deep dreams, heatmaps (only channels with any)
    shards/shard_NNNNN.json     completion markers (a shard's index rows), kept for provenance
    plan.json                   the inputs' fingerprint and the shard split this build used
```

`channels.zarr` (dims in brackets): `profile` [channel, t] top-k frequency on t = 0..total_timesteps;
`active` [channel, t]; `max_activation_profile` [channel, t] max activation averaged over UNet calls
that share a timestep value and linearly interpolated onto t (NaN outside the captured range);
`topk_frequency`, `max_activation`, `mean_activation` [channel, timestep] per UNet call;
`peak_t`, `peak_height` [channel, peak] (-1 / NaN padded); `top_sample`, `top_value`
[channel, timestep, rank] the ranked dataset examples per call; `prompt`, `image`, `seed` [sample]
the dataset (image paths relative to the experiment folder; "" when not saved); `has_prior`
[channel] bool and `n_dreams` [channel] int. Coordinates `channel`, `timestep` (the scheduler
timestep of each call), `t`, `sample`.

`index.json` rows: `channel`, `active`, `active_t` ([lowest, highest] active t, or null),
`n_active_t`, `activity` (mean of the profile over t), `peak_frequency` (its max),
`max_activation` (max over calls), `peaks` (t, highest first), `n_priors`, `prior_effect` (an
ablation's mean effect, else null), `n_dreams`, `dream_activation` / `dream_normalized_activation`
/ `dream_selectivity` / `dream_seed_distance` (best over every run, target and seed that did not
fail; null without dreams), `dream_diversity` (the lowest target diversity: mean pairwise
similarity of a target's results), `dreams` (per run: n, failed, the same best values and
diversity), `n_heatmaps`, `heatmap_max` (the highest example map value), `file` (the channel
JSON, or null). The index also lists `dream_runs` (with their `settings` and a `summary` such as
"negative · accentuation from examples · phase-only · diversity w=0.5") and `concepts`: per
concept-search ranking {name, slug, n_concept, n_rest, score_rule, top: [{channel, score,
best_call, best_timestep, best_score}], json, store}.

A channel JSON: `prior` ({store, row, mode, window ([steer_start_t, steer_end_t] or null),
prompt, prompt_source, guidance_scale, effect_rule, results: [{result, seed, image, baseline,
effect, sample, prompt}], steered_timesteps, strength} or null; `baseline` and `effect` for
ablation, `sample` and `prompt` when priors regenerate dataset examples), `dreams`: per run {run,
label, see_through_schedule_noise, store, mlflow_run_id, mlflow_experiment_id, settings, summary,
targets: [{target, t, diversity, results: [{result, seed, image, snapshots: [{step, image,
activation}], activation, normalized_activation, selectivity, failed_step, attribution,
start_image, start_sample, seed_distance}]}]} and `heatmaps` ({examples: [{peak, t, call, rank,
sample, overlay, map_max}], priors: [{result, t, overlay, map_max}]} or null). `failed_step` is
-1 when the optimisation did not fail; `start_sample` is null when the start was no dataset
example; a value a store does not hold (an older store) is null.

Sources: the analysis store (`stages.representation.timestep_analysis_results_dir`, default this
experiment's; required per kind), the prior store (`prior_results_dir`, default `prior/<kind>/`),
deep-dream runs (`deep_dream_results_dir_noise` / `_no_noise`: run folders labelled "noise" and
"no_noise"; default every `dream/<run>/<kind>/dreams.zarr`), the heatmap store
(`heatmaps/<kind>.zarr`, overlays under `heatmaps/<kind>/overlays/`) and the concept rankings
(`concepts/<kind>/<slug>.json`, beside their `.zarr` stores). A missing prior or heatmap store,
no dream run, no concept ranking, or no SAE analysis is recorded under `absent` with the reason,
never an error. Only dream targets, prior channels and heatmap parts marked done are listed
(heatmap stores without markers: maps that are not NaN). Dream images follow the store's
`image_pattern` and `snapshot_pattern` attributes (`images/channel_NNNNN_t_TTTT_result_K.png`,
`images/snapshots/..._step_SSSS.png`; the attribution overlay and the accentuation's start image
follow `attribution_pattern` and `start_pattern`, by default `images/attribution/` and
`images/start/` with the final image's name); in a store without them images are matched by the
numbers in their paths: `channel|feature`, `t|timestep`, `result|seed`, `target`, `step` (a file
with a step is an intermediate snapshot, one without the final image).

Stage API: `plan_representation` (lays out `<kind>.partial/` or finds the representation up to
date; returns the shards still to do), `representation_shard` (one channel block: its region of
channels.zarr, its channel JSONs, its marker), `finalize_representation` (index.json, then the
partial folder replaces the old one, so a reader never sees half a representation),
`write_manifest`, and `run_representation` (everything in-process). A rerun whose inputs are
unchanged (same fingerprint of the source stores) does nothing; an interrupted build resumes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr

from ddr import stores
from ddr.config import ExperimentConfig
from ddr.stores import Kind
from ddr.tracking import experiment_name, redact_uri, tracking_uri

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
KINDS: tuple[Kind, ...] = ("raw", "sae")
DENSE_FROM_ANALYSIS = (
    "profile",
    "active",
    "topk_frequency",
    "max_activation",
    "mean_activation",
    "peak_t",
    "peak_height",
    "top_sample",
    "top_value",
)
DREAM_METRICS = ("activation", "normalized_activation", "selectivity")
# Per-result images beside the final one: the attribution overlay and the decoded start latent (accentuation).
DREAM_SIDE_IMAGES = {
    "attribution": "images/attribution/channel_{channel:05d}_t_{t:04d}_result_{result}.png",
    "start": "images/start/channel_{channel:05d}_t_{t:04d}_result_{result}.png",
}
DEFAULT_OBJECTIVES = ("channel_mean", "sae_mean")  # the original's: no need to name them
# The dream settings that change what a run shows (the run selector summarises them).
DREAM_SETTINGS = (
    "objective",
    "cosine_power",
    "negative",
    "parameterisation",
    "spectrum_source",
    "start_from",
    "start",
    "seed_distance_max",
    "seed_distance_penalty_weight",
    "diversity_penalty_weight",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif"}


class Shard(NamedTuple):
    """Channel rows [start, stop) of the analysis store; `index` names its marker."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class DreamSource:
    run: str
    store: Path
    label: str | None = None  # "noise" / "no_noise" when named by the representation config


@dataclass
class Sources:
    kind: Kind
    analysis: Path
    prior: Path | None
    dreams: list[DreamSource]
    heatmaps: Path | None = None
    concepts: Path | None = None
    absent: dict[str, str] = field(default_factory=dict)


# --- locations -----------------------------------------------------------------------------------


def representation_dir(config: ExperimentConfig, kind: Kind) -> Path:
    return stores.ExperimentLayout(config.experiment_dir).representation_dir / kind


def partial_dir(config: ExperimentConfig, kind: Kind) -> Path:
    return stores.ExperimentLayout(config.experiment_dir).representation_dir / f"{kind}.partial"


def manifest_path(config: ExperimentConfig) -> Path:
    return stores.ExperimentLayout(config.experiment_dir).representation_dir / "index.json"


def _resolve(config: ExperimentConfig, folder: Path | None) -> Path | None:
    if folder is None:
        return None
    folder = Path(folder).expanduser()
    return folder if folder.is_absolute() else config.experiment_dir / folder


def analysis_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    folder = config.stages.representation.timestep_analysis_results_dir
    return stores.ExperimentLayout(config.experiment_dir).analysis_store_from(kind, folder)


def prior_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    """`prior_results_dir` may name the prior folder (holding <kind>/priors.zarr), its kind folder or the store."""
    folder = config.stages.representation.prior_results_dir
    return stores.ExperimentLayout(config.experiment_dir).prior_store_from(kind, folder)


def _dream_store_in(folder: Path, kind: Kind) -> Path:
    if folder.suffix == ".zarr":
        return folder
    if (folder / "dreams.zarr").exists() and folder.name == kind:
        return folder / "dreams.zarr"
    return folder / kind / "dreams.zarr"


def dream_sources(config: ExperimentConfig, kind: Kind) -> list[DreamSource]:
    """The named runs (noise, no_noise) or, when none is named, every `dream/<run>/<kind>/dreams.zarr`."""
    settings = config.stages.representation
    named = [
        (label, _resolve(config, folder))
        for label, folder in (
            ("noise", settings.deep_dream_results_dir_noise),
            ("no_noise", settings.deep_dream_results_dir_no_noise),
        )
        if folder is not None
    ]
    if named:
        found = []
        for label, folder in named:
            assert folder is not None
            store = _dream_store_in(folder, kind)
            run = store.parent.parent.name if store.parent.name == kind else store.parent.name
            found.append(DreamSource(run=run, store=store, label=label))
        return found
    root = stores.ExperimentLayout(config.experiment_dir).root / "dream"
    if not root.is_dir():
        return []
    return [DreamSource(run=p.name, store=p / kind / "dreams.zarr") for p in sorted(root.iterdir()) if p.is_dir()]


def find_sources(config: ExperimentConfig, kind: Kind) -> Sources:
    """Where this kind's inputs are; the analysis store must exist, the others are recorded as absent."""
    if kind not in KINDS:
        raise ValueError(f"kind: unknown value {kind!r}; allowed: {', '.join(KINDS)}")
    folder = config.stages.representation.timestep_analysis_results_dir
    analysis = stores.require_analysis_store(analysis_store_path(config, kind), "representation", folder)
    absent: dict[str, str] = {}
    prior: Path | None = prior_store_path(config, kind)
    if not prior.exists():
        absent["prior"] = f"no prior store at {_rel(config, prior)}"
        prior = None
    dreams = []
    for source in dream_sources(config, kind):
        if source.store.exists():
            dreams.append(source)
        elif source.label is not None:
            absent[f"dream:{source.label}"] = f"no deep-dream store at {_rel(config, source.store)}"
    if not dreams:
        absent.setdefault("dreams", f"no deep-dream runs for {kind} (dream/<run>/{kind}/dreams.zarr)")
    heatmaps: Path | None = stores.ExperimentLayout(config.experiment_dir).heatmap_store(kind)
    if not heatmaps.exists():
        absent["heatmaps"] = f"no heatmap store at {_rel(config, heatmaps)}"
        heatmaps = None
    concepts: Path | None = stores.ExperimentLayout(config.experiment_dir).concepts_dir(kind)
    if not any(concepts.glob("*.json")):
        absent["concepts"] = f"no concept rankings in {_rel(config, concepts)}"
        concepts = None
    return Sources(
        kind=kind, analysis=analysis, prior=prior, dreams=dreams, heatmaps=heatmaps, concepts=concepts, absent=absent
    )


def _rel(config: ExperimentConfig, path: Path | str) -> str:
    """A path relative to the experiment folder when it lies in the data root, else absolute."""
    absolute = Path(os.path.abspath(path))
    root = Path(os.path.abspath(config.data_root))
    if absolute == root or root in absolute.parents:
        return Path(os.path.relpath(absolute, os.path.abspath(config.experiment_dir))).as_posix()
    return absolute.as_posix()


# --- fingerprint ------------------------------------------------------------------------------------


def _tree_signature(path: Path, skip: tuple[str, ...] = ("images", "contact_sheets")) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime) of every file under `path` (skipping image folders)."""
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    out: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for name in sorted(filenames):
            full = Path(dirpath) / name
            stat = full.stat()
            out.append((full.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    return out


def _image_signature(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def fingerprint(config: ExperimentConfig, sources: Sources, channels_per_shard: int) -> str:
    """A hash of everything the representation is built from: a rerun with the same hash does nothing."""
    digest = hashlib.sha256()
    parts: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "channels_per_shard": channels_per_shard,
        "settings": config.stages.representation.model_dump(mode="json"),
        "analysis": _tree_signature(sources.analysis),
        "analysis_summary": _tree_signature(sources.analysis.with_name(f"{sources.kind}.summary.json"))
        if sources.analysis.with_name(f"{sources.kind}.summary.json").exists()
        else None,
    }
    if sources.prior is not None:
        parts["prior"] = _tree_signature(sources.prior.parent)
        parts["prior_images"] = _image_signature(sources.prior.parent / "images")
    for source in sources.dreams:
        parts[f"dream:{source.run}:{source.label}"] = _tree_signature(source.store.parent)
        parts[f"dream_images:{source.run}:{source.label}"] = _image_signature(source.store.parent / "images")
    if sources.heatmaps is not None:
        parts["heatmaps"] = _tree_signature(sources.heatmaps)
        files = stores.ExperimentLayout(config.experiment_dir).heatmap_dir(sources.kind)  # overlays, done markers
        parts["heatmap_files"] = _tree_signature(files) if files.is_dir() else None
    if sources.concepts is not None:
        parts["concepts"] = _tree_signature(sources.concepts)
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# --- planning -----------------------------------------------------------------------------------------


def _channels_per_shard(config: ExperimentConfig, channels_per_shard: int | None) -> int:
    value = channels_per_shard or config.stages.representation.channels_per_shard
    if value <= 0:
        raise ValueError(f"channels_per_shard: {value} must be positive")
    return value


def _shards(n_channels: int, per_shard: int) -> list[Shard]:
    return [Shard(i, a, min(a + per_shard, n_channels)) for i, a in enumerate(range(0, n_channels, per_shard))]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _capture_store(config: ExperimentConfig, analysis_group: zarr.Group) -> Path | None:
    """The capture store the analysis was computed from (its recorded path, else this experiment's)."""
    from ddr.stages.analysis import capture_store_path

    candidates = [Path(str(analysis_group.attrs.get("capture_store", ""))), capture_store_path(config)]
    return next((p for p in candidates if str(p) not in ("", ".") and p.exists()), None)


def _array(group: zarr.Group, name: str, data: Any, dims: list[str], chunks: tuple[int, ...] | None = None) -> None:
    data = np.asarray(data)
    dtype = str if data.dtype.kind in "UOT" else data.dtype
    kwargs: dict[str, Any] = {"chunks": chunks} if chunks else {}
    array = group.create_array(name, shape=data.shape, dtype=dtype, dimension_names=dims, **kwargs)
    if data.size:
        array[...] = data


def _layout_store(
    config: ExperimentConfig, path: Path, analysis_group: zarr.Group, per_shard: int, attrs: dict[str, Any]
) -> None:
    """Lay out channels.zarr: dense arrays chunked by shard along channel, coordinates and the sample table."""
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    channels = np.asarray(analysis_group["channel"][:], dtype=np.int64)
    n = len(channels)
    chunk = max(1, min(per_shard, n))
    for name in DENSE_FROM_ANALYSIS:
        source = analysis_group[name]
        dims = list(source.metadata.dimension_names or ())
        group.create_array(
            name,
            shape=source.shape,
            dtype=source.dtype,
            chunks=(chunk, *source.shape[1:]),
            fill_value=source.fill_value,
            dimension_names=dims,
        )
    n_t = analysis_group["t"].shape[0]
    group.create_array(
        "max_activation_profile",
        shape=(n, n_t),
        dtype="float32",
        chunks=(chunk, n_t),
        fill_value=np.nan,
        dimension_names=["channel", "t"],
    )
    for name, dtype, fill in (("has_prior", "bool", False), ("n_dreams", "int64", 0)):
        group.create_array(name, shape=(n,), dtype=dtype, chunks=(chunk,), fill_value=fill, dimension_names=["channel"])
    _array(group, "channel", channels, ["channel"])
    _array(group, "timestep", np.asarray(analysis_group["timestep"][:], dtype=np.int64), ["timestep"])
    _array(group, "t", np.asarray(analysis_group["t"][:], dtype=np.int64), ["t"])
    capture_path = _capture_store(config, analysis_group)
    if capture_path is not None:
        capture = stores.open_store(capture_path)
        capture_root = capture_path.parent.parent
        prompts = np.asarray([str(p) for p in capture["prompt"][:]], dtype=str)
        seeds = np.asarray(capture["seed"][:], dtype=np.int64)
        images = [_rel(config, capture_root / str(i)) if str(i) else "" for i in capture["image"][:]]
    else:
        n_samples = int(analysis_group.attrs.get("n_samples", 0))
        prompts, seeds, images = np.full(n_samples, "", dtype=str), np.full(n_samples, -1), [""] * n_samples
    _array(group, "prompt", np.asarray(prompts, dtype=str), ["sample"])
    _array(group, "seed", seeds, ["sample"])
    _array(group, "image", np.asarray(images, dtype=str), ["sample"])
    _array(group, "sample", np.arange(len(prompts), dtype=np.int64), ["sample"])
    stores.consolidate(path)


def plan_representation(
    config: ExperimentConfig, kind: Kind, *, channels_per_shard: int | None = None, force: bool = False
) -> list[Shard]:
    """Lay out `representation/<kind>.partial/` (or resume one built from the same inputs); the shards to do.

    Returns [] when `representation/<kind>/` is already built from the same inputs (unless `force`).
    """
    per_shard = _channels_per_shard(config, channels_per_shard)
    sources = find_sources(config, kind)
    stamp = fingerprint(config, sources, per_shard)
    final, partial = representation_dir(config, kind), partial_dir(config, kind)
    if not force and (final / "index.json").is_file() and _read_json(final / "index.json").get("fingerprint") == stamp:
        shutil.rmtree(partial, ignore_errors=True)
        return []
    analysis_group = stores.open_store(sources.analysis)
    n_channels = analysis_group["channel"].shape[0]
    shards = _shards(n_channels, per_shard)
    plan_file = partial / "plan.json"
    if partial.exists() and not (plan_file.is_file() and _read_json(plan_file).get("fingerprint") == stamp):
        shutil.rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        _layout_store(
            config,
            partial / "channels.zarr",
            analysis_group,
            per_shard,
            attrs={
                "kind": kind,
                "format_version": FORMAT_VERSION,
                "analysis_store": _rel(config, sources.analysis),
                "total_timesteps": int(analysis_group["t"].shape[0] - 1),
            },
        )
        _atomic_json(
            plan_file,
            {
                "fingerprint": stamp,
                "kind": kind,
                "channels_per_shard": per_shard,
                "n_channels": n_channels,
                "shards": len(shards),
            },
        )
    done = stores.done_shards(partial / "shards")
    return [s for s in shards if s.index not in done]


# --- reading priors and dreams -----------------------------------------------------------------------

_NUMBERED = re.compile(r"([A-Za-z]+)[_-]?(\d+)")
_KEYS = {
    "channel": "channel",
    "channels": "channel",
    "feature": "channel",
    "ch": "channel",
    "c": "channel",
    "t": "t",
    "timestep": "t",
    "ts": "t",
    "result": "result",
    "res": "result",
    "r": "result",
    "seed": "seed",
    "target": "target",
    "step": "step",
    "s": "step",
    "iter": "step",
}


def parse_image_name(relative: str) -> dict[str, int]:
    """The numbers a dream image's path carries: channel, t, result, seed, target, step (whichever it has)."""
    found: dict[str, int] = {}
    for part in re.split(r"[/_.-](?=[A-Za-z])", Path(relative).with_suffix("").as_posix()):
        for match in _NUMBERED.finditer(part):
            key = _KEYS.get(match.group(1).lower())
            if key is not None and key not in found:
                found[key] = int(match.group(2))
    return found


class _DreamImages:
    """The images of one dream run, keyed by (target row, result) -> {"final": path, "steps": {step: path}}."""

    def __init__(self, folder: Path, targets: list[tuple[int, int]], seeds: list[int]) -> None:
        self.by_key: dict[tuple[int, int], dict[str, Any]] = {}
        if not folder.is_dir():
            return
        row_of = {(c, t): i for i, (c, t) in enumerate(targets)}
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue
            if path.relative_to(folder).parts[0] in DREAM_SIDE_IMAGES:
                continue  # attribution overlays and start images belong to a result, they are not one
            info = parse_image_name(path.relative_to(folder).as_posix())
            if "target" in info and info["target"] < len(targets) and "channel" not in info:
                row = info["target"]
            elif "channel" in info and "t" in info:
                row = row_of.get((info["channel"], info["t"]))
                if row is None and "target" in info:
                    row = info["target"] if info["target"] < len(targets) else None
            else:
                row = None
            if row is None:
                continue
            if "result" in info:
                result = info["result"]
            elif "seed" in info:
                result = seeds.index(info["seed"]) if info["seed"] in seeds else info["seed"]
            else:
                result = 0
            entry = self.by_key.setdefault((row, result), {"final": None, "steps": {}})
            if "step" in info and "final" not in path.stem.lower():
                entry["steps"][info["step"]] = path
            else:
                entry["final"] = path


def _values(group: zarr.Group, name: str, rows: list[int]) -> np.ndarray | None:
    if name not in group or not rows:
        return None
    return np.asarray(group[name].get_orthogonal_selection((rows, *[slice(None)] * (group[name].ndim - 1))))


def _float_or_none(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _dream_run_info(config: ExperimentConfig, source: DreamSource, group: zarr.Group) -> dict[str, Any]:
    attrs = dict(group.attrs)
    run_id = next((attrs[k] for k in ("mlflow_run_id", "run_id", "mlflow.run_id") if attrs.get(k)), None)
    experiment_id = next((attrs[k] for k in ("mlflow_experiment_id", "experiment_id") if attrs.get(k)), None)
    noise = attrs.get("see_through_schedule_noise")
    if isinstance(noise, str):
        noise = noise.lower() == "true"
    settings = {k: attrs[k] for k in DREAM_SETTINGS if k in attrs}
    return {
        "run": source.run,
        "label": source.label or ("noise" if noise else "no_noise" if noise is not None else None),
        "see_through_schedule_noise": noise,
        "store": _rel(config, source.store),
        "mlflow_run_id": None if run_id is None else str(run_id),
        "mlflow_experiment_id": None if experiment_id is None else str(experiment_id),
        "settings": settings,
        "summary": describe_dream_settings(settings),
    }


def describe_dream_settings(settings: dict[str, Any]) -> str:
    """What sets a run apart from a plain maximisation, e.g. "negative · accentuation from examples · phase-only"."""
    parts = []
    if settings.get("objective") not in (None, *DEFAULT_OBJECTIVES):
        parts.append(f"objective {settings['objective']}")
    if settings.get("negative"):
        parts.append("negative")
    if (settings.get("start") or settings.get("start_from")) == "example":
        limit, weight = settings.get("seed_distance_max"), settings.get("seed_distance_penalty_weight")
        bounds = [f"distance ≤ {limit:g}"] if limit else []
        bounds += [f"L2-to-seed w={weight:g}"] if weight else []
        parts.append("accentuation from examples" + (f" ({', '.join(bounds)})" if bounds else ""))
    if settings.get("parameterisation") == "phase_fourier":
        parts.append("phase-only")
    weight = settings.get("diversity_penalty_weight")
    if weight:
        parts.append(f"diversity w={weight:g}")
    return " · ".join(parts)


def _steps_of(group: zarr.Group, n_steps: int) -> list[int]:
    if "step" in group and group["step"].shape == (n_steps,):
        return [int(s) for s in group["step"][:]]
    attrs = dict(group.attrs)
    every = attrs.get("intermediate_opt_results_every_n_steps") or attrs.get("snapshot_every")
    if every:
        return [int(every) * (i + 1) for i in range(n_steps)]
    return list(range(n_steps))


class _DreamRun:
    """One dream store, read once per shard: its targets by channel, metrics and images."""

    def __init__(self, config: ExperimentConfig, source: DreamSource) -> None:
        self.group = stores.open_store(source.store)
        self.info = _dream_run_info(config, source, self.group)
        self.config = config
        self.channels = np.asarray(self.group["target_channel"][:], dtype=np.int64)
        self.ts = np.asarray(self.group["target_t"][:], dtype=np.int64)
        n_results = self.group["activation"].shape[1] if "activation" in self.group else 0
        seeds = [int(s) for s in self.group["seed"][:]] if "seed" in self.group else []
        self.seeds = seeds if len(seeds) == n_results else list(range(n_results))
        targets = list(zip(self.channels.tolist(), self.ts.tolist(), strict=True))
        self.folder = source.store.parent
        self.image_pattern = self.group.attrs.get("image_pattern")
        self.snapshot_pattern = self.group.attrs.get("snapshot_pattern")
        self.side_patterns = {
            name: self.group.attrs.get(f"{name}_pattern") or pattern for name, pattern in DREAM_SIDE_IMAGES.items()
        }
        if not self.image_pattern:
            self.images = _DreamImages(self.folder / "images", targets, self.seeds)
        n_steps = self.group["history_activation"].shape[2] if "history_activation" in self.group else 0
        self.steps = _steps_of(self.group, n_steps)
        done = self.folder / "done"
        self.done = stores.dream_done_targets(done) if done.is_dir() else None

    def _images(self, row: int, result: int) -> dict[str, Any]:
        """{"final": path or None, "steps": {step: path}} from the store's patterns, else by file names."""
        if not self.image_pattern:
            return self.images.by_key.get((row, result), {"final": None, "steps": {}})
        names = {"channel": int(self.channels[row]), "t": int(self.ts[row]), "result": result}
        final = self.folder / self.image_pattern.format(**names)
        steps = {}
        if self.snapshot_pattern:
            for step in self.steps:
                path = self.folder / self.snapshot_pattern.format(**names, step=step)
                if path.is_file():
                    steps[step] = path
        return {"final": final if final.is_file() else None, "steps": steps}

    def _side_image(self, name: str, row: int, result: int) -> str | None:
        names = {"channel": int(self.channels[row]), "t": int(self.ts[row]), "result": result}
        path = self.folder / self.side_patterns[name].format(**names)
        return _rel(self.config, path) if path.is_file() else None

    def for_channel(self, channel: int) -> dict[str, Any] | None:
        rows = [int(r) for r in np.flatnonzero(self.channels == channel)]
        if self.done is not None:
            rows = [r for r in rows if r in self.done]  # targets not yet optimised have nothing to show
        if not rows:
            return None
        rows.sort(key=lambda r: (int(self.ts[r]), r))
        metrics = {m: _values(self.group, m, rows) for m in DREAM_METRICS}
        failed = _values(self.group, "failed_step", rows)
        history = _values(self.group, "history_activation", rows)
        seed_distance = _values(self.group, "seed_distance", rows)
        start_sample = _values(self.group, "start_sample", rows)
        diversity = _values(self.group, "diversity", rows)
        targets = []
        for i, row in enumerate(rows):
            results = []
            for r, seed in enumerate(self.seeds):
                images = self._images(row, r)
                values = {m: (None if a is None else _float_or_none(a[i, r])) for m, a in metrics.items()}
                steps = sorted(set(self.steps) | set(images["steps"]))
                snapshots = []
                for step in steps:
                    activation = None
                    if history is not None and step in self.steps:
                        activation = _float_or_none(history[i, r, self.steps.index(step)])
                    path = images["steps"].get(step)
                    if activation is None and path is None:
                        continue
                    snapshots.append(
                        {
                            "step": step,
                            "image": None if path is None else _rel(self.config, path),
                            "activation": activation,
                        }
                    )
                results.append(
                    {
                        "result": r,
                        "seed": seed,
                        "image": None if images["final"] is None else _rel(self.config, images["final"]),
                        "snapshots": snapshots,
                        **values,
                        "failed_step": -1 if failed is None else int(failed[i, r]),
                        "attribution": self._side_image("attribution", row, r),
                        "start_image": self._side_image("start", row, r),
                        "start_sample": None
                        if start_sample is None or start_sample[i, r] < 0
                        else int(start_sample[i, r]),
                        "seed_distance": None if seed_distance is None else _float_or_none(seed_distance[i, r]),
                    }
                )
            targets.append(
                {
                    "target": row,
                    "t": int(self.ts[row]),
                    "diversity": None if diversity is None else _float_or_none(diversity[i]),
                    "results": results,
                }
            )
        return {**self.info, "targets": targets}


class _Priors:
    """The prior store of a kind, read once per shard."""

    def __init__(self, config: ExperimentConfig, store: Path) -> None:
        self.config = config
        self.store = store
        self.group = stores.open_store(store)
        self.row_of = {int(c): i for i, c in enumerate(self.group["channel"][:])}
        self.seeds = [int(s) for s in self.group["seed"][:]]
        self.timesteps = [int(t) for t in self.group["timestep"][:]] if "timestep" in self.group else []
        done = store.parent / "done"
        self.done = stores.prior_done_channels(done) if done.is_dir() else None
        self.images = store.parent / "images"
        # prompt_source=top_examples: result k regenerates a dataset example, with its own seed and prompt
        # (tables written once by prepare: read whole here, not once per channel)
        self.examples = {
            name: np.asarray(self.group[f"example_{name}"][:])
            for name in ("sample", "seed", "prompt")
            if f"example_{name}" in self.group
        }
        attrs = dict(self.group.attrs)
        start, end = attrs.get("steer_start_t"), attrs.get("steer_end_t")
        self.settings = {
            "mode": attrs.get("steer_mode", "add"),  # stores older than the steering modes only added
            "window": None if start is None and end is None else [start, end],
            "prompt": attrs.get("prompt"),
            "prompt_source": attrs.get("prompt_source"),
            "guidance_scale": attrs.get("guidance_scale"),
            "effect_rule": attrs.get("effect_rule"),
        }

    def image(self, channel: int, result: int, suffix: str = "") -> Path:
        return self.images / f"channel_{channel:05d}_result_{result}{suffix}.png"

    def _baseline(self, channel: int, result: int) -> str | None:
        path = self.image(channel, result, "_baseline")
        return _rel(self.config, path) if path.is_file() else None

    def for_channel(self, channel: int) -> dict[str, Any] | None:
        row = self.row_of.get(channel)
        if row is None or (self.done is not None and channel not in self.done):
            return None
        effect = np.asarray(self.group["effect"][row], dtype=np.float64) if "effect" in self.group else None
        examples = {name: table[row] for name, table in self.examples.items()}
        results = [
            {
                "result": r,
                "seed": int(examples["seed"][r]) if "seed" in examples else seed,
                "image": _rel(self.config, self.image(channel, r)),
                "baseline": self._baseline(channel, r),
                "effect": None if effect is None else _float_or_none(effect[r]),
                "sample": int(examples["sample"][r]) if "sample" in examples else None,
                "prompt": str(examples["prompt"][r]) if "prompt" in examples else None,
            }
            for r, seed in enumerate(self.seeds)
            if self.image(channel, r).is_file()
        ]
        if not results:
            return None
        steered = np.asarray(self.group["steered"][row]) if "steered" in self.group else None
        strength = np.asarray(self.group["strength"][row]) if "strength" in self.group else None
        calls = np.flatnonzero(steered) if steered is not None else []
        return {
            "store": _rel(self.config, self.store),
            "row": row,
            **self.settings,
            "results": results,
            "steered_timesteps": [self.timesteps[c] for c in calls] if self.timesteps else [],
            "strength": [] if strength is None else [float(strength[c]) for c in calls],
        }


class _Heatmaps:
    """The heatmap store of a kind, read once per shard: where each channel fires in its top examples and priors.

    A channel's maps count once its done marker is written (stores without markers: once they are not NaN).
    """

    def __init__(self, config: ExperimentConfig, kind: Kind, store: Path) -> None:
        self.config = config
        self.kind = kind
        self.layout = stores.ExperimentLayout(config.experiment_dir)
        self.group = stores.open_store(store)
        self.row_of = {int(c): i for i, c in enumerate(self.group["channel"][:])}
        self.done = (
            {part: stores.heatmap_done_channels(self.layout, kind, part) for part in ("examples", "priors")}
            if stores.heatmap_done_dir(self.layout, kind).is_dir()
            else None
        )
        # the per-channel tables are single chunks: read each once here, not once per channel
        tables = [name for name in stores.HEATMAP_TABLES if name in self.group]
        self.tables = {name: np.asarray(self.group[name][:]) for name in tables}
        self.has_prior_maps = "prior_map" in self.group and "prior_t" in self.tables  # absent while being reset

    def _finished(self, part: stores.HeatmapPart, channel: int) -> bool:
        return self.done is None or channel in self.done[part]

    def _overlay(self, path: Path) -> str | None:
        return _rel(self.config, path) if path.is_file() else None

    def _examples(self, channel: int, row: int) -> list[dict[str, Any]]:
        if not self._finished("examples", channel):
            return []
        maps = np.asarray(self.group["example_map"][row], dtype=np.float64)  # [peak, rank, y, x]
        samples, calls = self.tables["example_sample"][row], self.tables["example_call"][row]
        peak_t = self.tables["peak_t"][row]
        out = []
        for peak, rank in zip(*np.nonzero(samples >= 0), strict=True):
            written = np.isfinite(maps[peak, rank])
            if not written.any():
                continue  # not mapped (yet)
            out.append(
                {
                    "peak": int(peak),
                    "t": int(peak_t[peak]),
                    "call": int(calls[peak]),
                    "rank": int(rank),
                    "sample": int(samples[peak, rank]),
                    "overlay": self._overlay(
                        stores.heatmap_overlay_path(self.layout, self.kind, channel, int(peak), int(rank))
                    ),
                    "map_max": float(maps[peak, rank][written].max()),
                }
            )
        return out

    def _priors(self, channel: int, row: int) -> list[dict[str, Any]]:
        if not self.has_prior_maps or not self._finished("priors", channel):
            return []
        maps = np.asarray(self.group["prior_map"][row], dtype=np.float64)  # [result, y, x]
        t = int(self.tables["prior_t"][row])
        return [
            {
                "result": result,
                "t": t,
                "overlay": self._overlay(stores.heatmap_prior_overlay_path(self.layout, self.kind, channel, result)),
                "map_max": float(np.nanmax(maps[result])),
            }
            for result in range(maps.shape[0])
            if np.isfinite(maps[result]).any()
        ]

    def for_channel(self, channel: int) -> dict[str, Any] | None:
        row = self.row_of.get(channel)
        if row is None:
            return None
        examples, priors = self._examples(channel, row), self._priors(channel, row)
        return {"examples": examples, "priors": priors} if examples or priors else None


# --- shards -------------------------------------------------------------------------------------------


def interpolate_max(max_activation: np.ndarray, timesteps: np.ndarray, total_timesteps: int) -> np.ndarray:
    """[channels, calls] -> [channels, t]: averaged over calls sharing a value, interpolated, NaN outside."""
    values, inverse = np.unique(np.asarray(timesteps), return_inverse=True)
    per_value = np.stack([max_activation[:, inverse == j].mean(axis=1) for j in range(len(values))], axis=1)
    t = np.arange(total_timesteps + 1)
    rows = [np.interp(t, values, row, left=np.nan, right=np.nan) for row in per_value]
    return np.stack(rows).astype(np.float32) if rows else np.zeros((0, len(t)), dtype=np.float32)


def _best(results: list[dict[str, Any]], metric: str) -> float | None:
    values = [r[metric] for r in results if r.get(metric) is not None and r.get("failed_step", -1) < 0]
    return max(values) if values else None


def _lowest(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return min(found) if found else None


def _dream_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best metrics over the runs' results that did not fail; the lowest diversity (most distinct seeds)."""
    results = [r for run in runs for target in run["targets"] for r in target["results"]]
    return {
        "n": len(results),
        "failed": sum(1 for r in results if r.get("failed_step", -1) >= 0),
        **{metric: _best(results, metric) for metric in (*DREAM_METRICS, "seed_distance")},
        "diversity": _lowest([target.get("diversity") for run in runs for target in run["targets"]]),
    }


def _row(
    channel: int,
    arrays: dict[str, np.ndarray],
    i: int,
    prior: Any,
    dreams: list[dict[str, Any]],
    heatmaps: dict[str, Any] | None,
) -> dict:
    profile = arrays["profile"][i]
    active_t = np.flatnonzero(arrays["active"][i])
    peaks = [int(t) for t in arrays["peak_t"][i] if t >= 0]
    max_act = arrays["max_activation"][i]
    overall = _dream_summary(dreams)
    per_run = {run["run"]: _dream_summary([run]) for run in dreams}
    effects = [r["effect"] for r in (prior or {}).get("results", []) if r.get("effect") is not None]
    example_maps = [e["map_max"] for e in (heatmaps or {}).get("examples", [])]
    return {
        "channel": channel,
        "active": bool(len(active_t)),
        "active_t": [int(active_t.min()), int(active_t.max())] if len(active_t) else None,
        "n_active_t": len(active_t),
        "activity": _float_or_none(np.nanmean(profile)) if np.isfinite(profile).any() else None,
        "peak_frequency": _float_or_none(np.nanmax(profile)) if np.isfinite(profile).any() else None,
        "max_activation": _float_or_none(np.nanmax(max_act)) if np.isfinite(max_act).any() else None,
        "peaks": peaks,
        "n_priors": 0 if prior is None else len(prior["results"]),
        "prior_effect": float(np.mean(effects)) if effects else None,
        "n_dreams": overall["n"],
        **{f"dream_{metric}": overall[metric] for metric in (*DREAM_METRICS, "seed_distance", "diversity")},
        "dreams": per_run,
        "n_heatmaps": 0 if heatmaps is None else len(heatmaps["examples"]) + len(heatmaps["priors"]),
        "heatmap_max": max(example_maps) if example_maps else None,
        "file": None,
    }


def representation_shard(config: ExperimentConfig, kind: Kind, shard: Shard) -> dict[str, Any]:
    """Write channels [start, stop): their region of channels.zarr, their channel JSONs, then the marker."""
    partial = partial_dir(config, kind)
    markers = partial / "shards"
    if stores.shard_done(markers, shard.index):
        return {"kind": kind, "shard": shard.index, "skipped": True, "channels": 0}
    if not (partial / "plan.json").is_file():
        raise FileNotFoundError(f"{partial} is not laid out; call plan_representation(config, {kind!r}) first")
    sources = find_sources(config, kind)
    analysis_group = stores.open_store(sources.analysis)
    group = stores.open_store(partial / "channels.zarr", mode="r+")
    a, b = shard.start, shard.stop
    arrays = {name: np.asarray(analysis_group[name][a:b]) for name in DENSE_FROM_ANALYSIS}
    timesteps = np.asarray(analysis_group["timestep"][:])
    total = int(analysis_group["t"].shape[0] - 1)
    arrays["max_activation_profile"] = interpolate_max(arrays["max_activation"].astype(np.float64), timesteps, total)
    priors = _Priors(config, sources.prior) if sources.prior is not None else None
    runs = [_DreamRun(config, source) for source in sources.dreams]
    maps = _Heatmaps(config, kind, sources.heatmaps) if sources.heatmaps is not None else None
    channels = [int(c) for c in analysis_group["channel"][a:b]]
    rows, has_prior, n_dreams = [], np.zeros(len(channels), bool), np.zeros(len(channels), np.int64)
    for i, channel in enumerate(channels):
        prior = priors.for_channel(channel) if priors is not None else None
        dreams = [d for d in (run.for_channel(channel) for run in runs) if d is not None]
        heatmaps = maps.for_channel(channel) if maps is not None else None
        row = _row(channel, arrays, i, prior, dreams, heatmaps)
        if prior is not None or dreams or heatmaps is not None:
            name = f"channels/channel_{channel:05d}.json"
            details = {"kind": kind, "channel": channel, "prior": prior, "dreams": dreams, "heatmaps": heatmaps}
            _atomic_json(partial / name, details)
            row["file"] = name
        has_prior[i], n_dreams[i] = prior is not None, row["n_dreams"]
        rows.append(row)
    for name, data in {**arrays, "has_prior": has_prior, "n_dreams": n_dreams}.items():
        group[name][a:b] = data.astype(group[name].dtype, copy=False)
    info = {"kind": kind, "shard": shard.index, "start": a, "stop": b, "rows": rows}
    stores.mark_shard_done(markers, shard.index, info)
    return {"kind": kind, "shard": shard.index, "skipped": False, "channels": len(channels)}


# --- finalising -----------------------------------------------------------------------------------------


def concept_rankings(config: ExperimentConfig, folder: Path | None) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The concept-search rankings of a kind (`concepts/<kind>/<slug>.json`), and why unreadable ones are left out."""
    found: list[dict[str, Any]] = []
    problems: dict[str, str] = {}
    for path in sorted(folder.glob("*.json")) if folder is not None else []:
        try:
            data = _read_json(path)
            top = [
                {
                    **e,
                    "channel": int(e["channel"]),
                    "score": _float_or_none(e["score"]),
                    "best_timestep": int(e["best_timestep"]),
                }
                for e in data["top"]
            ]
        except (ValueError, KeyError, TypeError) as error:
            problems[f"concept:{path.stem}"] = f"unreadable ranking {_rel(config, path)}: {error!r}"
            continue
        store = path.with_suffix(".zarr")
        found.append(
            {
                "name": str(data.get("concept", path.stem)),
                "slug": path.stem,
                "n_concept": data.get("n_concept"),
                "n_rest": data.get("n_rest"),
                "score_rule": data.get("score_rule", data.get("score")),
                "top": top,
                "json": _rel(config, path),
                "store": _rel(config, store) if store.exists() else None,
            }
        )
    return found, problems


def _mlflow_location(config: ExperimentConfig, experiment_id: str | None) -> dict[str, Any]:
    uri = tracking_uri(config)
    relative = None
    if uri.startswith("sqlite:///"):
        relative = _rel(config, Path(uri.removeprefix("sqlite:///")))
        relative = None if relative.startswith("/") else relative
    elif uri.startswith("file:"):
        relative = _rel(config, Path(uri.removeprefix("file://").removeprefix("file:")))
        relative = None if relative.startswith("/") else relative
    return {
        "tracking_uri": redact_uri(uri),
        "tracking_path_relative": relative,
        "experiment_name": experiment_name(config),
        "experiment_id": experiment_id,
    }


def finalize_representation(
    config: ExperimentConfig, kind: Kind, *, mlflow_experiment_id: str | None = None
) -> dict[str, Any]:
    """Write `<kind>.partial/index.json` from the shard markers and swap it in; returns the index summary."""
    final, partial = representation_dir(config, kind), partial_dir(config, kind)
    if not partial.exists():
        if (final / "index.json").is_file():
            index = _read_json(final / "index.json")
            if mlflow_experiment_id and index["mlflow"].get("experiment_id") != mlflow_experiment_id:
                index["mlflow"] = _mlflow_location(config, mlflow_experiment_id)
                _atomic_json(final / "index.json", index)
            return summarize(index)
        raise FileNotFoundError(f"{partial} does not exist; call plan_representation(config, {kind!r}) first")
    plan = _read_json(partial / "plan.json")
    n_shards = plan["shards"]
    done = stores.done_shards(partial / "shards")
    missing = sorted(set(range(n_shards)) - done)
    if missing:
        raise RuntimeError(
            f"representation {kind}: {len(missing)} of {n_shards} shards not done ({missing[:10]}); "
            "run representation_shard for them first"
        )
    rows = []
    for index in range(n_shards):
        rows.extend(_read_json(stores.marker_path(partial / "shards", index))["rows"])
    rows.sort(key=lambda r: (not r["active"], r["channel"]))
    sources = find_sources(config, kind)
    analysis_group = stores.open_store(sources.analysis)
    concepts, unreadable = concept_rankings(config, sources.concepts)
    dream_runs = []
    for source in sources.dreams:
        group = stores.open_store(source.store)
        info = _dream_run_info(config, source, group)
        info["targets"] = int(group["target_channel"].shape[0])
        keys = (
            "num_steps",
            "learning_rate",
            "total_variation_penalty_weight",
            "range_penalty_weight",
            "moment_penalty_weight",
            "gradient_smoothing_sigma_start",
            "gradient_smoothing_sigma_end",
            "use_gradient_spectral_filtering",
            "jitter_max",
            "rotate_max",
            "scale_max",
            "use_prior",
        )
        info["params"] = {k: group.attrs[k] for k in keys if k in group.attrs}
        dream_runs.append(info)
    index = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "experiment": config.experiment_name,
        "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "fingerprint": plan["fingerprint"],
        "store": "channels.zarr",
        "total_timesteps": int(analysis_group["t"].shape[0] - 1),
        "timesteps": [int(v) for v in analysis_group["timestep"][:]],
        "n_samples": int(stores.open_store(partial / "channels.zarr")["prompt"].shape[0]),
        "n_channels": len(rows),
        "n_active": sum(1 for r in rows if r["active"]),
        "n_with_priors": sum(1 for r in rows if r["n_priors"]),
        "n_with_dreams": sum(1 for r in rows if r["n_dreams"]),
        "n_with_heatmaps": sum(1 for r in rows if r.get("n_heatmaps")),
        "sources": {
            "analysis": _rel(config, sources.analysis),
            "prior": None if sources.prior is None else _rel(config, sources.prior),
            "dreams": [d["store"] for d in dream_runs],
            "heatmaps": None if sources.heatmaps is None else _rel(config, sources.heatmaps),
            "concepts": None if sources.concepts is None else _rel(config, sources.concepts),
        },
        "absent": {**sources.absent, **unreadable},
        "dream_runs": dream_runs,
        "concepts": concepts,
        "mlflow": _mlflow_location(config, mlflow_experiment_id),
        "channels": rows,
    }
    _atomic_json(partial / "index.json", index)
    if final.exists():
        old = final.with_name(f"{kind}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        partial.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(final)
    return summarize(index)


def summarize(index: dict[str, Any]) -> dict[str, Any]:
    keys = ("kind", "n_channels", "n_active", "n_with_priors", "n_with_dreams", "absent")
    return {
        **{k: index[k] for k in keys},
        "n_with_heatmaps": index.get("n_with_heatmaps", 0),
        "runs": [d["run"] for d in index["dream_runs"]],
        "concepts": [c["slug"] for c in index.get("concepts", [])],
    }


def write_manifest(config: ExperimentConfig) -> Path:
    """`representation/index.json`: which kinds have a representation, and why the others are absent."""
    kinds: dict[str, Any] = {}
    absent: dict[str, str] = {}
    for kind in KINDS:
        index_path = representation_dir(config, kind) / "index.json"
        if index_path.is_file():
            index = _read_json(index_path)
            kinds[kind] = {"index": f"{kind}/index.json", **summarize(index)}
        else:
            kinds[kind] = None
            absent[kind] = absent_reason(config, kind)
    path = manifest_path(config)
    _atomic_json(
        path,
        {"format_version": FORMAT_VERSION, "experiment": config.experiment_name, "kinds": kinds, "absent": absent},
    )
    return path


def absent_reason(config: ExperimentConfig, kind: Kind) -> str:
    if kind == "sae" and not (config.use_sae and config.sae is not None):
        return "no SAE configured (use_sae=false)"
    store = analysis_store_path(config, kind)
    if not store.exists():
        return f"no analysis store at {_rel(config, store)} (run capture and timestep_analysis)"
    return "not built yet (run ddr run representation)"


def kinds_to_build(config: ExperimentConfig) -> list[Kind]:
    """The kinds whose analysis store exists (raw always when analysed; sae when configured and analysed)."""
    kinds = [k for k in KINDS if (k == "raw" or config.use_sae) and analysis_store_path(config, k).exists()]
    if not kinds:
        raise FileNotFoundError(
            f"no analysis store under {analysis_store_path(config, 'raw').parent}; run capture and timestep_analysis"
        )
    return kinds


def run_representation(
    config: ExperimentConfig,
    kinds: list[Kind] | None = None,
    *,
    channels_per_shard: int | None = None,
    mlflow_experiment_id: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build every kind's representation in this process and write the manifest."""
    result: dict[str, Any] = {}
    for kind in kinds or kinds_to_build(config):
        shards = plan_representation(config, kind, channels_per_shard=channels_per_shard, force=force)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for shard in shards:
                representation_shard(config, kind, shard)
        result[kind] = {
            **finalize_representation(config, kind, mlflow_experiment_id=mlflow_experiment_id),
            "shards": len(shards),
        }
    result["manifest"] = str(write_manifest(config))
    return result
