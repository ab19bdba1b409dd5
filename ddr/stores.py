"""Where every stage's results live, and the layout of the Zarr stores (public interfaces).

This module is the one place that knows folder names, array names, dims and chunking; stages
call it instead of building paths or arrays themselves. Each store is a Zarr v3 group that
`xarray.open_zarr` opens as a Dataset. Shards write disjoint, chunk-aligned regions and mark
themselves complete with a small JSON file written after their data, so a crashed shard never
counts as done and a rerun does only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

Kind = Literal["raw", "sae"]


@dataclass(frozen=True)
class ExperimentLayout:
    """The folders of one experiment under `<data_root>/experiments/<name>/`."""

    root: Path

    @property
    def capture_dir(self) -> Path:
        return self.root / "capture"

    @property
    def capture_store(self) -> Path:
        return self.capture_dir / "activations.zarr"

    @property
    def capture_images(self) -> Path:
        return self.capture_dir / "images"

    @property
    def capture_shards(self) -> Path:
        return self.capture_dir / "shards"

    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def analysis_store(self, kind: Kind) -> Path:
        return self.analysis_dir() / f"{kind}.zarr"

    def analysis_store_from(self, kind: Kind, folder: Path | None) -> Path:
        """A `timestep_analysis_results_dir` setting (relative to the experiment folder or absolute; the store
        itself or the folder holding `<kind>.zarr`) as a store path; None means this experiment's."""
        if folder is None:
            return self.analysis_store(kind)
        folder = Path(folder).expanduser()
        folder = folder if folder.is_absolute() else self.root / folder
        return folder if folder.suffix == ".zarr" else folder / f"{kind}.zarr"

    def analysis_summary(self, kind: Kind) -> Path:
        return self.analysis_dir() / f"{kind}.summary.json"

    def plots_dir(self, kind: Kind) -> Path:
        return self.root / "plots" / kind

    def heatmap_dir(self, kind: Kind) -> Path:
        """`heatmaps/<kind>/`: overlay PNGs and done markers beside the store `heatmaps/<kind>.zarr`."""
        return self.root / "heatmaps" / kind

    def heatmap_store(self, kind: Kind) -> Path:
        return self.root / "heatmaps" / f"{kind}.zarr"

    def prior_dir(self, kind: Kind) -> Path:
        return self.root / "prior" / kind

    def prior_store(self, kind: Kind) -> Path:
        return self.prior_dir(kind) / "priors.zarr"

    def prior_store_from(self, kind: Kind, folder: Path | None) -> Path:
        """A `prior_results_dir` setting (relative to the experiment folder or absolute: a priors.zarr, a
        `prior/<kind>` folder or a `prior` folder) as a store path; None means this experiment's."""
        if folder is None:
            return self.prior_store(kind)
        folder = Path(folder).expanduser()
        folder = folder if folder.is_absolute() else self.root / folder
        if folder.suffix == ".zarr":
            return folder
        return folder / "priors.zarr" if (folder / "priors.zarr").exists() else folder / kind / "priors.zarr"

    def dream_dir(self, run: str, kind: Kind) -> Path:
        return self.root / "dream" / run / kind

    def dream_store(self, run: str, kind: Kind) -> Path:
        return self.dream_dir(run, kind) / "dreams.zarr"

    def spectrum_store(self, source: str, kind: Kind | None = None) -> Path:
        """`spectrum/<source>[_<kind>].zarr`: the cached mean latent spectrum of phase-only dreams (not under
        `dream/`, whose folders are runs)."""
        return self.root / "spectrum" / (f"{source}_{kind}.zarr" if kind else f"{source}.zarr")

    @property
    def representation_dir(self) -> Path:
        return self.root / "representation"

    def capture_store_from(self, folder: Path | None) -> Path:
        """A `capture_results_dir` setting (relative to the experiment folder or absolute; the store itself or
        the folder holding `activations.zarr`) as a store path; None means this experiment's."""
        if folder is None:
            return self.capture_store
        folder = Path(folder).expanduser()
        folder = folder if folder.is_absolute() else self.root / folder
        return folder if folder.suffix == ".zarr" else folder / "activations.zarr"

    def concepts_dir(self, kind: Kind) -> Path:
        return self.root / "concepts" / kind

    def concept_store(self, kind: Kind, concept: str) -> Path:
        """`concepts/<kind>/<slug>.zarr`: the concept's scores for every channel (or SAE feature)."""
        return self.concepts_dir(kind) / f"{concept_slug(concept)}.zarr"

    def concept_summary(self, kind: Kind, concept: str) -> Path:
        """`concepts/<kind>/<slug>.json`: its top list; written last, so it marks the store complete."""
        return self.concepts_dir(kind) / f"{concept_slug(concept)}.json"

    def concept_generated_store(self, concept: str) -> Path:
        """`concepts/generated/<slug>.zarr`: the capture-store layout for a concept's prompts not in the dataset."""
        return self.root / "concepts" / "generated" / f"{concept_slug(concept)}.zarr"


def consolidate(path: Path) -> None:
    """Write consolidated metadata so xarray opens the store without probing every array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zarr.consolidate_metadata(str(path))


def open_store(path: Path, mode: Literal["r", "r+"] = "r") -> zarr.Group:
    if not Path(path).exists():
        raise FileNotFoundError(f"store {path} does not exist; run the stage that writes it first")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zarr.open_group(str(path), mode=mode)


@contextmanager
def staged_store(path: Path) -> Iterator[Path]:
    """Yield `<name>.partial` beside `path` to write a whole store into; it is renamed to `path` when the block
    ends without an error, so a crash never leaves a half-written store. Stale partials and an old `path` go."""
    partial = path.with_name(path.name + ".partial")
    for stale in (partial, path):
        if stale.exists():
            shutil.rmtree(stale)
    path.parent.mkdir(parents=True, exist_ok=True)
    yield partial
    partial.rename(path)


def attr_sha256(group: zarr.Group, name: str = "settings") -> str:
    """sha256 of a store's recorded attribute (of "" when absent): a derived store keys on it, so it is redone
    when its source was made with other settings."""
    return hashlib.sha256(str(group.attrs.get(name, "")).encode()).hexdigest()


def _array(group: zarr.Group, name: str, data_or_shape: Any, dims: list[str], **kwargs: Any) -> zarr.Array:
    """An array with named dims; given data, it is written at once."""
    if isinstance(data_or_shape, tuple):
        return group.create_array(name, shape=data_or_shape, dimension_names=dims, **kwargs)
    data = np.asarray(data_or_shape)
    dtype = str if data.dtype.kind in "UO" else data.dtype
    array = group.create_array(name, shape=data.shape, dtype=dtype, dimension_names=dims, **kwargs)
    if data.size:
        array[...] = data
    return array


# --- capture --------------------------------------------------------------------------------

CAPTURE_COORDS = "prompt seed image"


def create_capture_store(
    path: Path,
    *,
    prompts: list[str],
    seeds: np.ndarray,
    images: list[str],
    timesteps: np.ndarray,
    n_channels: int,
    n_features: int | None,
    chunk_samples: int,
    dtype: str,
    attrs: dict[str, Any],
) -> zarr.Group:
    """Lay out `capture/activations.zarr` (DESIGN.md): data arrays filled with NaN until shards write."""
    n_samples = len(prompts)
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    n_steps = len(timesteps)
    for name, width, dim in (("raw", n_channels, "channel"), ("sae", n_features, "feature")):
        if width is None:
            continue
        _array(
            group,
            name,
            (n_samples, n_steps, width),
            ["sample", "timestep", dim],
            chunks=(chunk_samples, n_steps, min(width, 1024)),
            dtype=dtype,
            fill_value=np.nan,
            attributes={"coordinates": CAPTURE_COORDS},
        )
        _array(group, dim, np.arange(width, dtype=np.int64), [dim])
    _array(group, "timestep", np.asarray(timesteps, dtype=np.int64), ["timestep"])
    _array(group, "prompt", np.asarray(prompts, dtype=str), ["sample"])
    _array(group, "seed", np.asarray(seeds, dtype=np.int64), ["sample"])
    _array(group, "image", np.asarray(images, dtype=str), ["sample"])
    consolidate(path)
    return group


def write_capture_rows(group: zarr.Group, start: int, raw: np.ndarray, sae: np.ndarray | None) -> None:
    """One region write per array for a shard's rows [start, start + len(raw))."""
    stop = start + raw.shape[0]
    group["raw"][start:stop] = raw.astype(group["raw"].dtype, copy=False)
    if sae is not None:
        group["sae"][start:stop] = sae.astype(group["sae"].dtype, copy=False)


# --- shard completion markers ----------------------------------------------------------------


def marker_path(folder: Path, shard: int) -> Path:
    return folder / f"shard_{shard:05d}.json"


def shard_done(folder: Path, shard: int) -> bool:
    return marker_path(folder, shard).is_file()


def shard_info(folder: Path, shard: int) -> dict[str, Any]:
    """What a completed shard's marker recorded (`mark_shard_done`'s info)."""
    return json.loads(marker_path(folder, shard).read_text())


def mark_shard_done(folder: Path, shard: int, info: dict[str, Any]) -> None:
    """Atomically record that a shard's data is fully written (rename is atomic on POSIX)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = marker_path(folder, shard)
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(final)


def done_shards(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("_")[1]) for p in folder.glob("shard_*.json")}


def clear_markers(folder: Path) -> None:
    for p in folder.glob("shard_*.json"):
        p.unlink()


# --- analysis ---------------------------------------------------------------------------------

# name -> (dims, dtype, fill value). Fill values mark what a block has not written yet.
ANALYSIS_ARRAYS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "topk_frequency": (("channel", "timestep"), "float64", np.nan),
    "max_activation": (("channel", "timestep"), "float32", np.nan),
    "mean_activation": (("channel", "timestep"), "float32", np.nan),
    "profile": (("channel", "t"), "float64", np.nan),
    "active": (("channel", "t"), "bool", False),
    "peak_t": (("channel", "peak"), "int64", -1),
    "peak_height": (("channel", "peak"), "float64", np.nan),
    "top_sample": (("channel", "timestep", "rank"), "int64", -1),
    "top_value": (("channel", "timestep", "rank"), "float32", np.nan),
}
ANALYSIS_CHUNK_TARGET = 512


def require_analysis_store(path: Path, stage: str, folder: Path | None) -> Path:
    """`path` when the analysis store is there; otherwise a FileNotFoundError naming the setting that chose it
    (`stages.<stage>.timestep_analysis_results_dir`, `folder`)."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"analysis store {path} does not exist (stages.{stage}.timestep_analysis_results_dir={folder}); "
            "run the timestep_analysis stage first"
        )
    return path


def nearest_calls(timesteps: np.ndarray, t: int) -> np.ndarray:
    """The UNet calls (indices into a capture or analysis store's `timestep`) whose timestep value is nearest t,
    ascending: all calls at the minimal distance (a repeated value, or two values equally near)."""
    distance = np.abs(np.asarray(timesteps, dtype=np.int64) - int(t))
    return np.flatnonzero(distance == distance.min())


def analysis_work_dir(store: Path) -> Path:
    """`analysis/<kind>.work/`: block markers and the k-th-value side array (not part of the public store)."""
    return Path(store).with_suffix(".work")


def analysis_block_markers(store: Path) -> Path:
    return analysis_work_dir(store) / "blocks"


def analysis_kth_store(store: Path) -> Path:
    return analysis_work_dir(store) / "kth.zarr"


def analysis_channel_chunk(channel_block: int) -> int:
    """Channel chunk of the analysis store: divides `channel_block`, so blocks never share a chunk.

    The largest divisor <= ANALYSIS_CHUNK_TARGET keeps one channel's read small; when only tiny
    divisors exist (e.g. a prime block size) the whole block is one chunk.
    """
    if channel_block <= ANALYSIS_CHUNK_TARGET:
        return channel_block
    best = max(d for d in range(1, ANALYSIS_CHUNK_TARGET + 1) if channel_block % d == 0)
    return best if best >= 64 else channel_block


def create_analysis_store(
    path: Path,
    *,
    channels: np.ndarray,
    timesteps: np.ndarray,
    total_timesteps: int,
    top_peak_count: int,
    top_examples: int,
    channel_block: int,
    attrs: dict[str, Any],
) -> zarr.Group:
    """Lay out `analysis/<kind>.zarr` (DESIGN.md); data arrays hold fill values until blocks write."""
    n_channels, n_calls = len(channels), len(timesteps)
    chunk = min(analysis_channel_chunk(channel_block), max(n_channels, 1))
    sizes = {"channel": n_channels, "timestep": n_calls, "t": total_timesteps + 1}
    sizes |= {"peak": top_peak_count, "rank": top_examples}
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    for name, (dims, dtype, fill) in ANALYSIS_ARRAYS.items():
        shape = tuple(sizes[d] for d in dims)
        _array(group, name, shape, list(dims), chunks=(chunk, *shape[1:]), dtype=dtype, fill_value=fill)
    _array(group, "channel", np.asarray(channels, dtype=np.int64), ["channel"])
    _array(group, "timestep", np.asarray(timesteps, dtype=np.int64), ["timestep"])
    _array(group, "t", np.arange(total_timesteps + 1, dtype=np.int64), ["t"])
    consolidate(path)
    return group


def write_analysis_block(group: zarr.Group, start: int, arrays: dict[str, np.ndarray]) -> None:
    """One region write per array for channels [start, start + len); every array must be given."""
    missing = set(ANALYSIS_ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f"write_analysis_block: missing arrays {sorted(missing)}")
    for name in ANALYSIS_ARRAYS:
        data = arrays[name]
        group[name][start : start + data.shape[0]] = data.astype(group[name].dtype, copy=False)


def create_kth_store(path: Path, n_samples: int, n_calls: int, chunk_samples: int) -> zarr.Array:
    """The per-(sample, call) k-th largest activation, so channel blocks need not read every channel."""
    group = zarr.open_group(str(path), mode="w")
    return _array(
        group,
        "kth",
        (n_samples, n_calls),
        ["sample", "timestep"],
        chunks=(max(1, min(chunk_samples, n_samples)), n_calls),
        dtype="float32",
        fill_value=np.nan,
    )


# --- prior ------------------------------------------------------------------------------------

# name -> dims of `prior/<kind>/priors.zarr` (DESIGN.md); `channel`, `timestep` are coordinates.
PRIOR_ARRAYS: dict[str, tuple[str, ...]] = {
    "latent": ("channel", "result", "latent_channel", "y", "x"),
    "seed": ("result",),
    "strength": ("channel", "timestep"),
    "steered": ("channel", "timestep"),
    # steer_mode=ablate only: the unsteered generation with the same prompt and seed, and the mean absolute
    # difference (0..1 pixels) of the decoded ablated and baseline images
    "baseline_latent": ("channel", "result", "latent_channel", "y", "x"),
    "effect": ("channel", "result"),
    # prompt_source=top_examples only: the capture sample each result regenerates (its seed and prompt), and the
    # analysis call whose `top_sample` ranking they come from
    "example_sample": ("channel", "result"),
    "example_seed": ("channel", "result"),
    "example_prompt": ("channel", "result"),
    "example_call": ("channel",),
}
PRIOR_EXAMPLE_ARRAYS = ("example_sample", "example_seed", "example_prompt", "example_call")


def prior_images_dir(layout: ExperimentLayout, kind: Kind) -> Path:
    return layout.prior_dir(kind) / "images"


def prior_image_path(layout: ExperimentLayout, kind: Kind, channel: int, result: int) -> Path:
    return prior_images_dir(layout, kind) / f"channel_{channel:05d}_result_{result}.png"


def prior_baseline_image_path(layout: ExperimentLayout, kind: Kind, channel: int, result: int) -> Path:
    """The unablated generation beside an ablated result (steer_mode=ablate)."""
    return prior_images_dir(layout, kind) / f"channel_{channel:05d}_result_{result}_baseline.png"


def prior_contact_sheet_path(layout: ExperimentLayout, kind: Kind, channels: list[int]) -> Path:
    """One contact sheet per shard, named by the shard's first and last channel."""
    return layout.prior_dir(kind) / "contact_sheets" / f"channels_{channels[0]:05d}-{channels[-1]:05d}.png"


def prior_done_dir(layout: ExperimentLayout, kind: Kind) -> Path:
    """Per-channel completion markers (`channel_NNNNN.json`), written after the channel's data."""
    return layout.prior_dir(kind) / "done"


def create_prior_store(
    path: Path,
    *,
    channels: np.ndarray,
    seeds: np.ndarray,
    timesteps: np.ndarray,
    strength: np.ndarray,
    steered: np.ndarray,
    latent_shape: tuple[int, int, int],
    attrs: dict[str, Any],
    baseline: bool = False,
    examples: dict[str, np.ndarray] | None = None,
) -> zarr.Group:
    """Lay out `prior/<kind>/priors.zarr`: `latent` NaN until shards write it, chunked 1 along channel.

    `baseline` adds `baseline_latent` and `effect` (ablation); `examples` the `example_*` arrays
    (prompt_source=top_examples), written here once.
    """
    n, n_results = len(channels), len(seeds)
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    for name in ("latent", "baseline_latent") if baseline else ("latent",):
        _array(
            group,
            name,
            (n, n_results, *latent_shape),
            list(PRIOR_ARRAYS[name]),
            chunks=(1, n_results, *latent_shape),
            dtype="float32",
            fill_value=np.nan,
            attributes={"coordinates": "seed"},
        )
    if baseline:
        dims = list(PRIOR_ARRAYS["effect"])
        _array(group, "effect", (n, n_results), dims, chunks=(1, n_results), dtype="float32", fill_value=np.nan)
    # Written once by prepare (not by shards), so these may share chunks across channels.
    table = (max(1, min(n, 1024)), len(timesteps))
    _array(group, "strength", np.asarray(strength, dtype=np.float32), ["channel", "timestep"], chunks=table)
    _array(group, "steered", np.asarray(steered, dtype=bool), ["channel", "timestep"], chunks=table)
    for name, data in (examples or {}).items():
        _array(group, name, data, list(PRIOR_ARRAYS[name]))
    _array(group, "seed", np.asarray(seeds, dtype=np.int64), ["result"])
    _array(group, "channel", np.asarray(channels, dtype=np.int64), ["channel"], chunks=(max(n, 1),))
    _array(group, "timestep", np.asarray(timesteps, dtype=np.int64), ["timestep"])
    consolidate(path)
    return group


def append_prior_channels(
    path: Path,
    channels: np.ndarray,
    strength: np.ndarray,
    steered: np.ndarray,
    examples: dict[str, np.ndarray] | None = None,
) -> None:
    """Grow the store by rows for `channels` (latents NaN until written); rewrites the channel coordinate."""
    group = open_store(path, mode="r+")
    old = group["channel"][:]
    n, added = len(old), len(channels)
    grown = {"strength": np.asarray(strength, dtype=np.float32), "steered": np.asarray(steered, dtype=bool)}
    grown.update(examples or {})
    for name in ("latent", "baseline_latent", "effect", *grown):
        if name in group:
            array = group[name]  # one handle: the group's (consolidated) metadata still has the old shape
            array.resize((n + added, *array.shape[1:]))
            if name in grown:
                array[n:] = grown[name]
    ids = np.concatenate([old, np.asarray(channels, dtype=np.int64)])
    del group["channel"]
    _array(group, "channel", ids, ["channel"], chunks=(len(ids),))
    consolidate(path)


def write_prior_latents(group: zarr.Group, row: int, latents: np.ndarray) -> None:
    """One channel's latents [result, latent_channel, y, x]: exactly one chunk."""
    group["latent"][row] = latents.astype(np.float32, copy=False)


def write_prior_baseline(group: zarr.Group, row: int, latents: np.ndarray, effect: np.ndarray) -> None:
    """One channel's unablated latents and the ablation's effect per result: one chunk each."""
    group["baseline_latent"][row] = latents.astype(np.float32, copy=False)
    group["effect"][row] = effect.astype(np.float32, copy=False)


def mark_prior_channel_done(folder: Path, channel: int, info: dict[str, Any]) -> None:
    """Atomically record that a channel's latents and images are written."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"channel_{channel:05d}.json"
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(final)


def prior_done_channels(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("_")[1]) for p in folder.glob("channel_*.json")}


# --- deep dream -------------------------------------------------------------------------------

# name -> (dims, dtype, fill) of the per-target arrays of `dream/<run>/<kind>/dreams.zarr` (DESIGN.md),
# written by shards; chunked 1 along target so concurrent shards never share a chunk.
DREAM_ARRAYS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "latent": (("target", "result", "latent_channel", "y", "x"), "float32", np.nan),
    "activation": (("target", "result"), "float32", np.nan),
    "normalized_activation": (("target", "result"), "float32", np.nan),
    "selectivity": (("target", "result"), "float32", np.nan),
    "failed_step": (("target", "result"), "int64", -1),
    "history_activation": (("target", "result", "step"), "float32", np.nan),
    # summed |d activation / d latent| over the steps, on the latent's grid
    "attribution": (("target", "result", "latent_channel", "y", "x"), "float32", np.nan),
    "seed_distance": (("target", "result"), "float32", np.nan),  # L2 of final latent - start latent
    "start_sample": (("target", "result"), "int64", -1),  # capture sample the start came from; -1: none
    "diversity": (("target",), "float32", np.nan),  # mean pairwise Gram cosine of the final results
}
DREAM_COORDS = "target_channel target_t"


def dream_images_dir(layout: ExperimentLayout, run: str, kind: Kind) -> Path:
    return layout.dream_dir(run, kind) / "images"


def dream_image_path(layout: ExperimentLayout, run: str, kind: Kind, channel: int, t: int, result: int) -> Path:
    return dream_images_dir(layout, run, kind) / f"channel_{channel:05d}_t_{t:04d}_result_{result}.png"


def dream_snapshot_path(
    layout: ExperimentLayout, run: str, kind: Kind, channel: int, t: int, result: int, step: int
) -> Path:
    """An intermediate result (the latent at the start of `step`), decoded."""
    name = f"channel_{channel:05d}_t_{t:04d}_result_{result}_step_{step:04d}.png"
    return dream_images_dir(layout, run, kind) / "snapshots" / name


def dream_attribution_path(layout: ExperimentLayout, run: str, kind: Kind, channel: int, t: int, result: int) -> Path:
    """The final image with its accumulated attribution as a heat overlay."""
    name = f"channel_{channel:05d}_t_{t:04d}_result_{result}.png"
    return dream_images_dir(layout, run, kind) / "attribution" / name


def dream_start_image_path(layout: ExperimentLayout, run: str, kind: Kind, channel: int, t: int, result: int) -> Path:
    """The decoded start latent of an accentuation (a run started from dataset examples)."""
    name = f"channel_{channel:05d}_t_{t:04d}_result_{result}.png"
    return dream_images_dir(layout, run, kind) / "start" / name


def dream_contact_sheet_path(layout: ExperimentLayout, run: str, kind: Kind, channels: list[int]) -> Path:
    return layout.dream_dir(run, kind) / "contact_sheets" / f"channels_{channels[0]:05d}-{channels[-1]:05d}.png"


def dream_done_dir(layout: ExperimentLayout, run: str, kind: Kind) -> Path:
    """Completion markers: `target_NNNNNN.json` per target row, `channel_NNNNN.json` once all its targets are."""
    return layout.dream_dir(run, kind) / "done"


def create_dream_store(
    path: Path,
    *,
    target_channel: np.ndarray,
    target_t: np.ndarray,
    seeds: np.ndarray,
    steps: np.ndarray,
    latent_shape: tuple[int, int, int],
    penalties: list[str],
    dataset_max_activation: np.ndarray,
    attrs: dict[str, Any],
) -> zarr.Group:
    """Lay out `dreams.zarr`: one row per target, data arrays at their fill value until shards write them."""
    n, n_results, n_steps = len(target_channel), len(seeds), len(steps)
    sizes = {"target": n, "result": n_results, "step": n_steps}
    sizes |= dict(zip(("latent_channel", "y", "x"), latent_shape, strict=True))
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    arrays = dict(DREAM_ARRAYS)
    arrays |= {f"penalty_{name}": (("target", "result"), "float32", np.nan) for name in penalties}
    for name, (dims, dtype, fill) in arrays.items():
        shape = tuple(sizes[d] for d in dims)
        _array(
            group,
            name,
            shape,
            list(dims),
            chunks=(1, *shape[1:]),
            dtype=dtype,
            fill_value=fill,
            attributes={"coordinates": DREAM_COORDS},
        )
    # Written once here (not by shards), so these may share chunks across targets.
    whole = (max(n, 1),)
    _array(group, "target_channel", np.asarray(target_channel, dtype=np.int64), ["target"], chunks=whole)
    _array(group, "target_t", np.asarray(target_t, dtype=np.int64), ["target"], chunks=whole)
    _array(
        group,
        "dataset_max_activation",
        np.asarray(dataset_max_activation, dtype=np.float32),
        ["target"],
        chunks=whole,
        attributes={"coordinates": DREAM_COORDS},
    )
    _array(group, "seed", np.asarray(seeds, dtype=np.int64), ["result"])
    _array(group, "step", np.asarray(steps, dtype=np.int64), ["step"])
    consolidate(path)
    return group


def write_dream_rows(group: zarr.Group, start: int, arrays: dict[str, np.ndarray]) -> None:
    """One region write per array for target rows [start, start + len); every per-target array must be given."""
    names = [n for n in group.array_keys() if n in DREAM_ARRAYS or n.startswith("penalty_")]
    missing = set(names) - set(arrays)
    if missing:
        raise ValueError(f"write_dream_rows: missing arrays {sorted(missing)}")
    for name in names:
        data = arrays[name]
        group[name][start : start + data.shape[0]] = data.astype(group[name].dtype, copy=False)


def _mark(folder: Path, name: str, info: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{name}.json"
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=1, default=str))
    tmp.replace(final)


def mark_dream_target_done(folder: Path, row: int, info: dict[str, Any]) -> None:
    """Atomically record that a target row's arrays and images are written."""
    _mark(folder, f"target_{row:06d}", info)


def mark_dream_channel_done(folder: Path, channel: int, info: dict[str, Any]) -> None:
    _mark(folder, f"channel_{channel:05d}", info)


def dream_done_targets(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("_")[1]) for p in folder.glob("target_*.json")}


def dream_done_channels(folder: Path) -> set[int]:
    if not folder.is_dir():
        return set()
    return {int(p.stem.split("_")[1]) for p in folder.glob("channel_*.json")}


# --- heatmaps ---------------------------------------------------------------------------------

# name -> (dims, dtype, fill) of `heatmaps/<kind>.zarr` (DESIGN.md). Maps are written by shards, chunked 1
# along channel; the tables are written once by prepare (before any shard), one chunk each.
HEATMAP_MAPS: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "example_map": (("channel", "peak", "rank", "y", "x"), "float32", np.nan),
    "prior_map": (("channel", "result", "y", "x"), "float32", np.nan),
}
HEATMAP_TABLES: dict[str, tuple[tuple[str, ...], str, Any]] = {
    "example_sample": (("channel", "peak", "rank"), "int64", -1),
    "example_call": (("channel", "peak"), "int64", -1),
    "peak_t": (("channel", "peak"), "int64", -1),
    "prior_t": (("channel",), "int64", -1),
}
HeatmapPart = Literal["examples", "priors"]


def heatmap_overlay_path(layout: ExperimentLayout, kind: Kind, channel: int, peak: int, rank: int) -> Path:
    return layout.heatmap_dir(kind) / "overlays" / f"channel_{channel:05d}_peak_{peak}_rank_{rank}.png"


def heatmap_prior_overlay_path(layout: ExperimentLayout, kind: Kind, channel: int, result: int) -> Path:
    return layout.heatmap_dir(kind) / "overlays" / f"prior_channel_{channel:05d}_result_{result}.png"


def heatmap_done_dir(layout: ExperimentLayout, kind: Kind) -> Path:
    """Markers: `channel_NNNNN.json` once a channel's example maps and overlays are written,
    `prior_channel_NNNNN.json` once its prior maps and overlays are."""
    return layout.heatmap_dir(kind) / "done"


def _heatmap_array(group: zarr.Group, name: str, sizes: dict[str, int], table: bool) -> None:
    dims, dtype, fill = (HEATMAP_TABLES if table else HEATMAP_MAPS)[name]
    shape = tuple(sizes[d] for d in dims)
    chunks = (max(shape[0], 1), *shape[1:]) if table else (1, *(max(s, 1) for s in shape[1:]))
    _array(group, name, shape, list(dims), chunks=chunks, dtype=dtype, fill_value=fill)


def create_heatmap_store(
    path: Path,
    *,
    channels: np.ndarray,
    peaks: int,
    ranks: int,
    results: int,
    map_shape: tuple[int, int],
    attrs: dict[str, Any],
) -> zarr.Group:
    """Lay out `heatmaps/<kind>.zarr` with a row per channel: maps NaN and tables -1 until written."""
    sizes = {"channel": len(channels), "peak": peaks, "rank": ranks, "result": results}
    sizes |= {"y": map_shape[0], "x": map_shape[1]}
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    for name in HEATMAP_MAPS:
        _heatmap_array(group, name, sizes, table=False)
    for name in HEATMAP_TABLES:
        _heatmap_array(group, name, sizes, table=True)
    _array(group, "channel", np.asarray(channels, dtype=np.int64), ["channel"])
    for dim in ("peak", "rank", "result"):
        _array(group, dim, np.arange(sizes[dim], dtype=np.int64), [dim])
    consolidate(path)
    return group


def reset_heatmap_priors(layout: ExperimentLayout, kind: Kind, results: int) -> None:
    """Lay `prior_map` out again for `results` prior results per channel (NaN), `prior_t` as -1, and remove
    the prior markers and overlays (the prior maps are then made again from another prior store)."""
    stale = [*heatmap_done_dir(layout, kind).glob("prior_*.json")]
    stale += (layout.heatmap_dir(kind) / "overlays").glob("prior_*.png")
    for file in stale:
        file.unlink()
    path = layout.heatmap_store(kind)
    group = open_store(path, mode="r+")
    channels, _, y, x = group["prior_map"].shape
    sizes = {"channel": channels, "result": results, "y": y, "x": x}
    for name in ("prior_map", "prior_t", "result"):
        del group[name]
    _heatmap_array(group, "prior_map", sizes, table=False)
    _heatmap_array(group, "prior_t", sizes, table=True)
    _array(group, "result", np.arange(results, dtype=np.int64), ["result"])
    consolidate(path)


def write_heatmap_tables(group: zarr.Group, rows: np.ndarray, tables: dict[str, np.ndarray]) -> None:
    """Rows of the per-channel tables (prepare only: the tables are single chunks)."""
    unknown = set(tables) - set(HEATMAP_TABLES)
    if unknown:
        raise ValueError(f"write_heatmap_tables: unknown arrays {sorted(unknown)}")
    for name, data in tables.items():
        group[name].oindex[np.asarray(rows, dtype=np.int64)] = data.astype(group[name].dtype, copy=False)


def write_heatmap_maps(group: zarr.Group, name: str, row: int, maps: np.ndarray) -> None:
    """One channel's `example_map` [peak, rank, y, x] or `prior_map` [result, y, x]: exactly one chunk."""
    group[name][row] = maps.astype(np.float32, copy=False)


def heatmap_marker_path(layout: ExperimentLayout, kind: Kind, part: HeatmapPart, channel: int) -> Path:
    prefix = "prior_" if part == "priors" else ""
    return heatmap_done_dir(layout, kind) / f"{prefix}channel_{channel:05d}.json"


def mark_heatmap_done(
    layout: ExperimentLayout, kind: Kind, part: HeatmapPart, channel: int, info: dict[str, Any]
) -> None:
    """Atomically record that a channel's example (or prior) maps and overlays are written."""
    path = heatmap_marker_path(layout, kind, part, channel)
    _mark(path.parent, path.stem, info)


def heatmap_done_channels(layout: ExperimentLayout, kind: Kind, part: HeatmapPart) -> set[int]:
    folder = heatmap_done_dir(layout, kind)
    if not folder.is_dir():
        return set()
    pattern = "prior_channel_*.json" if part == "priors" else "channel_*.json"
    return {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob(pattern)}


# --- concepts ---------------------------------------------------------------------------------

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

# name -> dims of `concepts/<kind>/<slug>.zarr` (README); "channel" is named "feature" for SAE features, as in
# the capture store. `ranking` holds channel ids in rank order (highest mean_score first); `rank` is its coordinate.
CONCEPT_ARRAYS: dict[str, tuple[str, ...]] = {
    "score": ("channel", "timestep"),
    "mean_concept": ("channel", "timestep"),
    "mean_rest": ("channel", "timestep"),
    "mean_score": ("channel",),
    "ranking": ("rank",),
}


def concept_slug(concept: str) -> str:
    """A concept's file name: each run of characters other than letters, digits, _ and - becomes one _."""
    slug = _SLUG_UNSAFE.sub("_", concept).strip("_")
    if not slug:
        raise ValueError(f"concept {concept!r} has no letters or digits to name its files by")
    return slug


def write_concept_store(
    path: Path,
    *,
    dim: str,
    channels: np.ndarray,
    timesteps: np.ndarray,
    arrays: dict[str, np.ndarray],
    attrs: dict[str, Any],
) -> None:
    """Write the whole store under a temporary name, then rename it into place, so it is never half written."""
    missing = set(CONCEPT_ARRAYS) - set(arrays)
    if missing:
        raise ValueError(f"write_concept_store: missing arrays {sorted(missing)}")
    with staged_store(path) as partial:
        group = zarr.open_group(str(partial), mode="w", attributes=attrs)
        for name, dims in CONCEPT_ARRAYS.items():
            dtype = np.int64 if name == "ranking" else np.float32
            named = [dim if d == "channel" else d for d in dims]
            _array(group, name, np.asarray(arrays[name], dtype=dtype), named)
        _array(group, dim, np.asarray(channels, dtype=np.int64), [dim])
        _array(group, "timestep", np.asarray(timesteps, dtype=np.int64), ["timestep"])
        _array(group, "rank", np.arange(len(arrays["ranking"]), dtype=np.int64), ["rank"])
        consolidate(partial)


def write_generated_concept_store(
    path: Path,
    *,
    prompts: list[str],
    seeds: np.ndarray,
    timesteps: np.ndarray,
    raw: np.ndarray,
    sae: np.ndarray | None,
    attrs: dict[str, Any],
) -> None:
    """A concept's generated samples in the capture-store layout, written whole under a temporary name and
    renamed into place (so an interrupted generation never leaves a store that looks complete)."""
    with staged_store(path) as partial:
        group = create_capture_store(
            partial,
            prompts=prompts,
            seeds=seeds,
            images=[""] * len(prompts),
            timesteps=timesteps,
            n_channels=raw.shape[2],
            n_features=None if sae is None else sae.shape[2],
            chunk_samples=max(1, len(prompts)),
            dtype="float32",
            attrs=attrs,
        )
        write_capture_rows(group, 0, raw, sae)


def write_concept_summary(path: Path, summary: dict[str, Any]) -> None:
    """Atomically write a concept's JSON summary (after its store: the summary marks the concept done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    tmp.replace(path)


# --- latent spectrum (phase-only dreams) --------------------------------------------------------


def write_spectrum_store(path: Path, magnitude: np.ndarray, key: str, attrs: dict[str, Any]) -> None:
    """`magnitude` (latent_channel, y, kx) float32; `key` (what decided it) is written last, so a store a
    crash left without it never matches and is recomputed. Write it from one process (not from every shard)."""
    group = zarr.open_group(str(path), mode="w", attributes=attrs)
    _array(group, "magnitude", np.asarray(magnitude, dtype=np.float32), ["latent_channel", "y", "kx"])
    group.attrs["key"] = key
    consolidate(path)


def read_spectrum_store(path: Path, key: str) -> np.ndarray | None:
    """The cached magnitude when `path` holds one made with `key`; None when absent or stale."""
    if not Path(path).exists():
        return None
    group = open_store(path)
    if group.attrs.get("key") != key or "magnitude" not in group:
        return None
    return np.asarray(group["magnitude"][:])
