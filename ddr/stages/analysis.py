"""Timestep analysis: when in the denoising process each channel (or SAE feature) is active.

Definitions (one activation value per sample, UNet call and channel; calls are the capture
store's `timestep` dimension, whose values can repeat, e.g. PNDM visits 961 twice):

- top-k: at each (sample, call) the k channels with the largest activations. Ties at the k-th
  value all count (a channel is in the top k when its value is >= the k-th largest), so the
  result does not depend on channel order or on how channels are split into blocks. For SAE
  features only strictly positive values count: 0 means the feature did not fire.
- `topk_frequency[c, call]`: the fraction of samples with c in their top k at that call.
- `max_activation`, `mean_activation`: over samples.
- `profile[c, t]`: topk_frequency averaged over calls that share a timestep value, linearly
  interpolated onto t = 0..total_timesteps (np.interp), 0 outside the captured range.
- `active = profile > 0`; peaks from `scipy.signal.find_peaks(profile, height, distance,
  plateau_size=1)` (so, as in the original, never at the two ends of the t axis), the highest
  `top_peak_count`, highest first (equal heights: lower t first).
- `top_sample`/`top_value[c, call, rank]`: the `top_examples` samples with the largest
  activation, descending; equal activations rank the lower sample index first.

Streaming: the capture array is read in chunks of `chunk_samples` samples, so memory is bounded
by a chunk, never the store. The work splits into channel blocks of `channel_block` channels,
which separate tasks can run: `plan_analysis` lays out the store (and, when several blocks are
to run, precomputes each (sample, call)'s k-th largest value across all channels in one pass,
since a block's top-k membership depends on channels outside it); `analyse_block` writes one
block's chunk-aligned region and marks it done; `finalize_analysis` writes the summary. A rerun
skips finished blocks; `run_analysis` does everything in-process in a single pass.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from scipy.signal import find_peaks

from ddr import stores
from ddr.config import ExperimentConfig, TimestepAnalysisConfig
from ddr.stores import Kind

log = logging.getLogger(__name__)

KINDS: tuple[Kind, ...] = ("raw", "sae")
TIE_HANDLING = (
    "top-k: every channel whose activation is >= the k-th largest of its (sample, call) counts; "
    "top examples: equal activations rank the lower sample index first; "
    "peaks: equal heights rank the lower t first"
)
_LOW32 = 0xFFFFFFFF
SLICE_BYTES = 8 * 2**20  # temporaries are built in slices of about this size


class CaptureIncomplete(RuntimeError):
    """The capture store still has unwritten shards; analysing it would silently drop samples."""


class AnalysisStoreMismatch(RuntimeError):
    """The analysis store was laid out for other settings than the config asks for."""


class Block(NamedTuple):
    """Channels [start, stop) of one analysis task; `index` names its completion marker."""

    index: int
    start: int
    stop: int


# --- locations ----------------------------------------------------------------------------------


def capture_store_path(config: ExperimentConfig) -> Path:
    """`stages.timestep_analysis.capture_results_dir` (relative to the experiment folder, or absolute)."""
    folder = config.stages.timestep_analysis.capture_results_dir
    return stores.ExperimentLayout(config.experiment_dir).capture_store_from(folder)


def analysis_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    return stores.ExperimentLayout(config.experiment_dir).analysis_store(kind)


def _settings(config: ExperimentConfig, kind: Kind) -> TimestepAnalysisConfig:
    if kind not in KINDS:
        raise ValueError(f"kind: unknown value {kind!r}; allowed: {', '.join(KINDS)}")
    return config.stages.timestep_analysis.for_kind(kind)  # type: ignore[return-value]


def _open_capture(config: ExperimentConfig, kind: Kind) -> tuple[Path, zarr.Group, zarr.Array]:
    path = capture_store_path(config)
    if not path.exists():
        raise FileNotFoundError(
            f"capture store {path} does not exist (stages.timestep_analysis.capture_results_dir="
            f"{config.stages.timestep_analysis.capture_results_dir}); run the capture stage first"
        )
    group = stores.open_store(path)
    if kind not in group:
        present = [k for k in KINDS if k in group]
        raise ValueError(f"kind: {kind!r} is not in capture store {path} (no SAE captured?); allowed: {present}")
    array = group[kind]
    if array.shape[0] == 0:
        raise ValueError(f"capture store {path} has no samples")
    return path, group, array


def _check_capture_complete(path: Path, array: zarr.Array) -> None:
    """Refuse a capture whose shard markers are missing (when it has a markers folder at all)."""
    markers = path.parent / "shards"
    if not markers.is_dir():
        return  # a store made elsewhere: unwritten rows are caught as NaN while streaming
    n_shards = math.ceil(array.shape[0] / array.chunks[0])
    missing = sorted(set(range(n_shards)) - stores.done_shards(markers))
    if missing:
        shown = ", ".join(str(m) for m in missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise CaptureIncomplete(
            f"capture store {path} is incomplete: {len(missing)} of {n_shards} shards not done "
            f"(shards {shown}; markers in {markers}); run the capture stage to completion first"
        )


def _store_settings(config: ExperimentConfig, kind: Kind, path: Path, group: zarr.Group) -> dict[str, Any]:
    """Everything that decides the analysis store's contents and layout; a store is reused only if equal."""
    s = _settings(config, kind)
    array = group[kind]
    return {
        "kind": kind,
        "capture_store": str(path.resolve()),
        "capture_shape": list(array.shape),
        "capture_settings_sha256": stores.attr_sha256(group),
        "timesteps": [int(v) for v in group["timestep"][:]],
        "top_k": s.top_k,
        "total_timesteps": s.total_timesteps,
        "peak_threshold": s.peak_threshold,
        "peak_separation": s.peak_separation,
        "top_peak_count": s.top_peak_count,
        "top_examples": s.top_examples,
        "channel_block": s.channel_block,
        "positive_only": kind == "sae",
    }


def _blocks(n_channels: int, channel_block: int) -> list[Block]:
    return [Block(i, a, min(a + channel_block, n_channels)) for i, a in enumerate(range(0, n_channels, channel_block))]


def _atomic_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


# --- the vectorised kernels -----------------------------------------------------------------------


def _rows_per_slice(row_bytes: int) -> int:
    return max(1, SLICE_BYTES // max(row_bytes, 1))


def kth_largest(x: np.ndarray, k: int) -> np.ndarray:
    """[n, calls, C] -> [n, calls]: the k-th largest value across channels (the smallest when k >= C)."""
    width = x.shape[-1]
    k = min(k, width)
    out = np.empty(x.shape[:-1], dtype=np.float32)
    rows = _rows_per_slice(x[0].nbytes)
    for a in range(0, x.shape[0], rows):
        out[a : a + rows] = np.partition(x[a : a + rows], width - k, axis=-1)[..., width - k]
    return out


def _ordered_bits(bits: np.ndarray) -> None:
    """In place: float32 bit patterns (as int32) -> int32 that sort like the floats (an involution)."""
    flip = bits >> 31
    flip &= 0x7FFFFFFF
    bits ^= flip


def _decode_keys(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort keys -> (sample index, activation)."""
    bits = (keys >> 32).astype(np.int32)
    _ordered_bits(bits)
    return _LOW32 - (keys & _LOW32), bits.view(np.float32)


class _Accumulator:
    """Running per-(call, channel) statistics of one channel block over sample chunks.

    Ranked examples are kept as int64 keys (activation's order-preserving bits << 32 | ~sample):
    unique, so a partial sort over them is exact and deterministic, and a key decodes back to
    (sample, activation). Keys are built a slice of channels at a time to bound temporaries.
    """

    def __init__(self, block: Block, n_calls: int, top_examples: int, positive_only: bool) -> None:
        width = block.stop - block.start
        self.block = block
        self.top_examples = top_examples
        self.positive_only = positive_only
        self.count = np.zeros((n_calls, width), dtype=np.int64)
        self.vmax = np.full((n_calls, width), -np.inf, dtype=np.float32)
        self.vsum = np.zeros((n_calls, width), dtype=np.float64)
        self.best = np.empty((n_calls, width, 0), dtype=np.int64)  # unsorted top keys
        self.n = 0

    def update(self, x: np.ndarray, kth: np.ndarray, offset: int) -> None:
        """x [n, calls, width] float32 (this block's channels), kth [n, calls] from all channels."""
        hit = x >= kth[..., None]
        if self.positive_only:
            hit &= x > 0
        self.count += np.count_nonzero(hit, axis=0)
        del hit
        np.maximum(self.vmax, x.max(axis=0), out=self.vmax)
        self.vsum += x.sum(axis=0, dtype=np.float64)
        n, n_calls, width = x.shape
        have = self.best.shape[-1]
        keep = min(self.top_examples, have + n)
        best = np.empty((n_calls, width, keep), dtype=np.int64)
        low = _LOW32 - np.arange(offset, offset + n, dtype=np.int64)
        step = _rows_per_slice(n * n_calls * 8 * 3)
        for j in range(0, width, step):
            part = x[:, :, j : j + step]
            bits = np.empty((n_calls, part.shape[2], n), dtype=np.float32)
            np.add(part.transpose(1, 2, 0), np.float32(0), out=bits)  # + 0 turns -0.0 into 0.0
            bits = bits.view(np.int32)
            _ordered_bits(bits)
            keys = np.empty((n_calls, part.shape[2], have + n), dtype=np.int64)
            keys[..., :have] = self.best[:, j : j + step]
            fresh = keys[..., have:]
            fresh[...] = bits
            fresh <<= 32
            fresh |= low
            if have + n > keep:
                keys.partition(have + n - keep, axis=-1)
            best[:, j : j + step] = keys[..., have + n - keep :]
        self.best = best
        self.n += n

    def result(self, timesteps: np.ndarray, s: TimestepAnalysisConfig) -> dict[str, np.ndarray]:
        width = self.block.stop - self.block.start
        freq = (self.count / self.n).T
        profile = interpolate_profile(freq, timesteps, s.total_timesteps)
        peak_t, peak_height = find_top_peaks(profile, s.peak_threshold, s.peak_separation, s.top_peak_count)
        ranked = np.sort(self.best, axis=-1)[..., ::-1].transpose(1, 0, 2)  # [width, calls, rank]
        samples, values = _decode_keys(ranked)
        top_sample = np.full((width, len(timesteps), s.top_examples), -1, dtype=np.int64)
        top_value = np.full(top_sample.shape, np.nan, dtype=np.float32)
        top_sample[..., : samples.shape[-1]] = samples
        top_value[..., : values.shape[-1]] = values
        return {
            "topk_frequency": freq,
            "max_activation": self.vmax.T,
            "mean_activation": (self.vsum / self.n).T.astype(np.float32),
            "profile": profile,
            "active": profile > 0,
            "peak_t": peak_t,
            "peak_height": peak_height,
            "top_sample": top_sample,
            "top_value": top_value,
        }


def interpolate_profile(freq: np.ndarray, timesteps: np.ndarray, total_timesteps: int) -> np.ndarray:
    """[channels, calls] -> [channels, total_timesteps + 1]: repeated timestep values averaged, then np.interp."""
    values, inverse = np.unique(np.asarray(timesteps), return_inverse=True)
    per_value = np.stack([freq[:, inverse == j].mean(axis=1) for j in range(len(values))], axis=1)
    t = np.arange(total_timesteps + 1)
    return np.stack([np.interp(t, values, row, left=0.0, right=0.0) for row in per_value]).reshape(len(freq), -1)


def find_top_peaks(profile: np.ndarray, threshold: float, separation: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel the `count` highest peaks of its profile: positions (-1 padded) and heights (NaN padded)."""
    peak_t = np.full((len(profile), count), -1, dtype=np.int64)
    peak_height = np.full((len(profile), count), np.nan, dtype=np.float64)
    for c, row in enumerate(profile):
        if not (row > 0).any():
            continue  # profiles are >= 0, so a peak (higher than both neighbours) is > 0
        positions, props = find_peaks(row, height=threshold, distance=separation, plateau_size=1)
        order = np.argsort(-props["peak_heights"], kind="stable")[:count]
        peak_t[c, : len(order)] = positions[order]
        peak_height[c, : len(order)] = props["peak_heights"][order]
    return peak_t, peak_height


# --- planning, blocks, finalising ---------------------------------------------------------------


def plan_analysis(config: ExperimentConfig, kind: Kind, *, precompute_thresholds: bool = True) -> list[Block]:
    """Create `analysis/<kind>.zarr` (or reuse a matching one) and return the channel blocks still to do.

    With several blocks to do, one streamed pass stores each (sample, call)'s k-th largest value
    across all channels, so each block then reads only its own channels.
    """
    s = _settings(config, kind)
    path, group, array = _open_capture(config, kind)
    _check_capture_complete(path, array)
    timesteps = group["timestep"][:]
    if timesteps.min() < 0 or timesteps.max() > s.total_timesteps:
        raise ValueError(
            f"stages.timestep_analysis.total_timesteps: {s.total_timesteps} does not cover the captured "
            f"timesteps {int(timesteps.min())}..{int(timesteps.max())}; allowed: >= {int(timesteps.max())}"
        )
    store = analysis_store_path(config, kind)
    settings = _store_settings(config, kind, path, group)
    if store.exists():
        try:
            existing = json.loads(stores.open_store(store).attrs["settings"])
        except (KeyError, FileNotFoundError, ValueError, TypeError):
            existing = None
        if existing != settings:
            differing = sorted(k for k in settings if existing is None or existing.get(k) != settings.get(k))
            log.warning("analysis %s: settings changed (%s); recomputing %s", kind, ", ".join(differing), store)
            _clear(config, kind)
    if not store.exists():
        _create(config, kind, store, settings, group)
    done = stores.done_shards(stores.analysis_block_markers(store))
    pending = [b for b in _blocks(array.shape[2], s.channel_block) if b.index not in done]
    if precompute_thresholds and len(pending) > 1:
        _precompute_kth(config, kind, store, array, s)
    return pending


def _clear(config: ExperimentConfig, kind: Kind) -> None:
    store = analysis_store_path(config, kind)
    for p in (store, stores.analysis_work_dir(store)):
        if p.exists():
            shutil.rmtree(p)
    stores.ExperimentLayout(config.experiment_dir).analysis_summary(kind).unlink(missing_ok=True)


def _create(config: ExperimentConfig, kind: Kind, store: Path, settings: dict[str, Any], capture: zarr.Group) -> None:
    """Lay the store out under a temporary name and rename it, so a crash never leaves a half store."""
    s = _settings(config, kind)
    dim = "channel" if kind == "raw" else "feature"
    channels = capture[dim][:] if dim in capture else np.arange(capture[kind].shape[2])
    attrs = {
        **{k: v for k, v in settings.items() if k != "timesteps"},
        "tie_handling": TIE_HANDLING,
        "chunk_samples": s.chunk_samples,  # bounds memory only; results do not depend on it
        "n_samples": int(capture[kind].shape[0]),
        "source_dim": dim,
        "settings": json.dumps(settings, sort_keys=True),
    }
    with stores.staged_store(store) as partial:
        stores.create_analysis_store(
            partial,
            channels=channels,
            timesteps=capture["timestep"][:],
            total_timesteps=s.total_timesteps,
            top_peak_count=s.top_peak_count,
            top_examples=s.top_examples,
            channel_block=s.channel_block,
            attrs=attrs,
        )


def _chunks(n_samples: int, chunk_samples: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk_samples, n_samples)) for a in range(0, n_samples, chunk_samples)]


def _read(array: zarr.Array, start: int, stop: int, channels: slice, path: Path) -> np.ndarray:
    """One sample chunk as float32; refuses NaN rows (never-written capture shards)."""
    x = np.asarray(array[start:stop, :, channels], dtype=np.float32)
    bad = np.isnan(x).any(axis=(1, 2))
    if bad.any():
        rows = start + np.flatnonzero(bad)
        shards = sorted({int(r) // array.chunks[0] for r in rows})
        raise CaptureIncomplete(
            f"capture store {path} has unwritten (NaN) rows, e.g. samples {rows[:5].tolist()} "
            f"(capture shards {shards[:20]}); run the capture stage to completion first"
        )
    return x


def _kth_done(store: Path) -> Path:
    return stores.analysis_work_dir(store) / "kth.done.json"


def _precompute_kth(
    config: ExperimentConfig, kind: Kind, store: Path, array: zarr.Array, s: TimestepAnalysisConfig
) -> None:
    if _kth_done(store).is_file():
        return
    path = capture_store_path(config)
    kth = stores.create_kth_store(stores.analysis_kth_store(store), array.shape[0], array.shape[1], s.chunk_samples)
    started = time.perf_counter()
    for a, b in _chunks(array.shape[0], s.chunk_samples):
        kth[a:b] = kth_largest(_read(array, a, b, slice(None), path), s.top_k)
    _atomic_json(_kth_done(store), {"top_k": s.top_k, "seconds": time.perf_counter() - started})


def _check_store(config: ExperimentConfig, kind: Kind) -> tuple[Path, zarr.Group, zarr.Group, zarr.Array]:
    store = analysis_store_path(config, kind)
    if not store.exists():
        raise FileNotFoundError(f"analysis store {store} does not exist; call plan_analysis(config, {kind!r}) first")
    path, capture, array = _open_capture(config, kind)
    group = stores.open_store(store, mode="r+")
    if json.loads(group.attrs["settings"]) != _store_settings(config, kind, path, capture):
        raise AnalysisStoreMismatch(
            f"{store} was planned with other settings than this config; call plan_analysis(config, {kind!r}) again"
        )
    return store, group, capture, array


def analyse_block(config: ExperimentConfig, kind: Kind, start: int, stop: int) -> dict[str, Any]:
    """Analyse channels [start, stop) (a block from plan_analysis) into its region; skip it if already done."""
    s = _settings(config, kind)
    store, group, _capture, array = _check_store(config, kind)
    blocks = _blocks(array.shape[2], s.channel_block)
    block = next((b for b in blocks if (b.start, b.stop) == (start, stop)), None)
    if block is None:
        raise ValueError(
            f"channels [{start}, {stop}) is not a block of stages.timestep_analysis.channel_block={s.channel_block} "
            f"over {array.shape[2]} channels; allowed: {[(b.start, b.stop) for b in blocks[:4]]}..."
        )
    if stores.shard_done(stores.analysis_block_markers(store), block.index):
        return {"kind": kind, "block": block.index, "start": start, "stop": stop, "skipped": True}
    info = _analyse(config, kind, [block], store, group, array)
    return {**info[0], "skipped": False}


def _analyse(
    config: ExperimentConfig, kind: Kind, blocks: list[Block], store: Path, group: zarr.Group, array: zarr.Array
) -> list[dict[str, Any]]:
    """Stream the capture once for these blocks, then write each block's region and mark it done."""
    s = _settings(config, kind)
    path = capture_store_path(config)
    n_samples, n_calls, n_channels = array.shape
    timesteps = group["timestep"][:]
    covered = sum(b.stop - b.start for b in blocks)
    use_kth = covered < n_channels and _kth_done(store).is_file()
    kth_array = stores.open_store(stores.analysis_kth_store(store))["kth"] if use_kth else None
    accumulators = [_Accumulator(b, n_calls, s.top_examples, kind == "sae") for b in blocks]
    started = time.perf_counter()
    chunks = _chunks(n_samples, s.chunk_samples)
    for i, (a, b) in enumerate(chunks):
        if kth_array is None:
            full = _read(array, a, b, slice(None), path)
            kth = kth_largest(full, s.top_k)
            for acc in accumulators:
                acc.update(full[:, :, acc.block.start : acc.block.stop], kth, a)
            del full
        else:
            kth = np.asarray(kth_array[a:b])
            for acc in accumulators:
                acc.update(_read(array, a, b, slice(acc.block.start, acc.block.stop), path), kth, a)
        if (i + 1) % 16 == 0 or i + 1 == len(chunks):
            elapsed = time.perf_counter() - started
            mb = b * n_calls * covered * 4 / 1e6
            ids = [x.index for x in blocks]
            log.info(
                "analysis %s blocks %s: %d/%d samples, %.0f MB/s", kind, ids, b, n_samples, mb / max(elapsed, 1e-9)
            )
    infos = []
    for acc in accumulators:
        stores.write_analysis_block(group, acc.block.start, acc.result(timesteps, s))
        info = {
            "kind": kind,
            "block": acc.block.index,
            "start": acc.block.start,
            "stop": acc.block.stop,
            "samples": n_samples,
            "seconds": time.perf_counter() - started,
        }
        stores.mark_shard_done(stores.analysis_block_markers(store), acc.block.index, info)
        infos.append(info)
    return infos


def finalize_analysis(config: ExperimentConfig, kind: Kind) -> dict[str, Any]:
    """Check every block is done, write `analysis/<kind>.summary.json` and consolidated metadata."""
    s = _settings(config, kind)
    store, group, _capture, array = _check_store(config, kind)
    blocks = _blocks(array.shape[2], s.channel_block)
    done = stores.done_shards(stores.analysis_block_markers(store))
    missing = [b for b in blocks if b.index not in done]
    if missing:
        raise RuntimeError(
            f"analysis {kind}: {len(missing)} of {len(blocks)} channel blocks not done "
            f"({[(b.index, b.start, b.stop) for b in missing[:10]]}); run analyse_block for them first"
        )
    channels = group["channel"][:]
    active = np.zeros(len(channels), dtype=bool)
    for b in blocks:
        active[b.start : b.stop] = np.asarray(group["active"][b.start : b.stop]).any(axis=1)
    attrs = dict(group.attrs)
    summary = {
        "kind": kind,
        "analysis_store": str(store),
        "capture_store": attrs["capture_store"],
        "channels": len(channels),
        "active_channels": int(active.sum()),
        "dead_channels": [int(c) for c in channels[~active]],
        "n_samples": attrs["n_samples"],
        "timesteps": [int(v) for v in group["timestep"][:]],
        "parameters": {
            **{k: attrs[k] for k in json.loads(attrs["settings"]) if k not in ("timesteps", "capture_shape")},
            "chunk_samples": s.chunk_samples,
            "tie_handling": TIE_HANDLING,
        },
    }
    stores.consolidate(store)
    _atomic_json(stores.ExperimentLayout(config.experiment_dir).analysis_summary(kind), summary)
    shutil.rmtree(stores.analysis_kth_store(store), ignore_errors=True)
    _kth_done(store).unlink(missing_ok=True)
    return summary


def run_analysis(config: ExperimentConfig, kind: Kind) -> dict[str, Any]:
    """Plan, analyse every pending block in one streamed pass in this process, finalise; returns the summary."""
    blocks = plan_analysis(config, kind, precompute_thresholds=False)
    if blocks:
        store, group, _capture, array = _check_store(config, kind)
        _analyse(config, kind, blocks, store, group, array)
    return finalize_analysis(config, kind)
