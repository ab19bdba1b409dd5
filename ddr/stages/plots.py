"""Activity plots: per active channel, when it fires and which dataset image excites it most.

Each figure shows the channel's activity profile (the observed top-k frequency at each captured
UNet call, the interpolated curve, its peaks; the t axis runs from T down to 0 as denoising
does) above its max-activation curve, beside the top dataset example for a peak with its prompt.
A channel with two or more peaks gets a GIF with one frame per peak (highest first); otherwise a
PNG (for the highest peak, or where the profile is highest when it has none). Inactive channels
get no plot. Rendering uses matplotlib's Agg canvas directly (no pyplot, no global backend).

When the heatmaps stage has mapped the channel (`heatmaps/<kind>.zarr`), a frame whose peak and
top example it mapped shows that example's heat overlay (its spatial activation map at the
frame's UNet call over the image) instead of the plain image, and the caption says so; other
frames show the plain image.
"""

from __future__ import annotations

import json
import logging
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ddr import stores
from ddr.config import ExperimentConfig, PlotsConfig
from ddr.stores import Kind

log = logging.getLogger(__name__)

KINDS: tuple[Kind, ...] = ("raw", "sae")
IMAGE_SIZE = 256


def _settings(config: ExperimentConfig, kind: Kind) -> PlotsConfig:
    if kind not in KINDS:
        raise ValueError(f"kind: unknown value {kind!r}; allowed: {', '.join(KINDS)}")
    return config.stages.plots.for_kind(kind)  # type: ignore[return-value]


def analysis_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    """`stages.plots.timestep_analysis_results_dir`/<kind>.zarr (default: this experiment's analysis)."""
    folder = _settings(config, kind).timestep_analysis_results_dir
    return stores.ExperimentLayout(config.experiment_dir).analysis_store_from(kind, folder)


def plot_path(config: ExperimentConfig, kind: Kind, channel: int, animated: bool) -> Path:
    folder = stores.ExperimentLayout(config.experiment_dir).plots_dir(kind)
    return folder / f"channel_{channel:05d}.{'gif' if animated else 'png'}"


def _open_analysis(config: ExperimentConfig, kind: Kind) -> tuple[Path, zarr.Group]:
    folder = _settings(config, kind).timestep_analysis_results_dir
    path = stores.require_analysis_store(analysis_store_path(config, kind), "plots", folder)
    return path, stores.open_store(path)


def _active_channels(group: zarr.Group) -> np.ndarray:
    """Channel ids with any active t, read a chunk of channels at a time."""
    channels = group["channel"][:]
    step = group["active"].chunks[0]
    active = np.zeros(len(channels), dtype=bool)
    for a in range(0, len(channels), step):
        active[a : a + step] = np.asarray(group["active"][a : a + step]).any(axis=1)
    return channels[active]


def plan_plots(config: ExperimentConfig, kind: Kind) -> list[list[int]]:
    """The active channels in shards of `stages.plots.channels_per_shard` (inactive channels get no plot)."""
    _, group = _open_analysis(config, kind)
    per_shard = _settings(config, kind).channels_per_shard
    active = [int(c) for c in _active_channels(group)]
    return [active[i : i + per_shard] for i in range(0, len(active), per_shard)]


@dataclass
class _Channel:
    """What one figure needs about one channel."""

    channel: int
    profile: np.ndarray
    frequency: np.ndarray
    max_activation: np.ndarray
    mean_activation: np.ndarray
    peak_t: np.ndarray
    peak_height: np.ndarray
    top_sample: np.ndarray
    top_value: np.ndarray

    def frames(self) -> list[int]:
        """The t of each frame: its peaks highest first, else where the profile is highest."""
        peaks = [int(t) for t in self.peak_t if t >= 0]
        return peaks or [int(np.argmax(self.profile))]

    def example_at(self, t: int, timesteps: np.ndarray) -> tuple[int, int, float]:
        """(call, sample, value): the top example at the captured call nearest t (of repeats, the strongest)."""
        call = nearest_call(timesteps, t, self.top_value)
        return call, int(self.top_sample[call]), float(self.top_value[call])


def nearest_call(timesteps: np.ndarray, t: int, strength: np.ndarray) -> int:
    """The UNet call whose timestep is nearest t; of several (PNDM visits one value twice), the one with the
    largest `strength` (NaN counts as lowest; ties: the earlier call). The heatmaps stage maps this call."""
    calls = stores.nearest_calls(timesteps, t)
    values = np.where(np.isnan(strength[calls]), -np.inf, strength[calls])
    return int(calls[int(np.argmax(values))])


class _Heatmaps:
    """The heatmaps stage's overlays of one kind, where it has mapped a channel (no store: no overlays)."""

    def __init__(self, config: ExperimentConfig, kind: Kind) -> None:
        self.layout, self.kind = stores.ExperimentLayout(config.experiment_dir), kind
        path = self.layout.heatmap_store(kind)
        self.group = stores.open_store(path) if path.exists() else None
        self.row: dict[int, int] = {}
        self.done: set[int] = set()
        if self.group is not None:
            self.row = {int(c): i for i, c in enumerate(self.group["channel"][:])}
            self.done = stores.heatmap_done_channels(self.layout, kind, "examples")
            # the tables are single chunks: read once here, not once per frame
            self.call = np.asarray(self.group["example_call"][:])  # [channel, peak]
            self.top_sample = np.asarray(self.group["example_sample"][:, :, 0])  # [channel, peak], rank 0

    def mapped_at(self, channel: int) -> float:
        """When the channel's maps were written (its marker's mtime; -inf when it has none)."""
        if channel not in self.done:
            return -np.inf
        return stores.heatmap_marker_path(self.layout, self.kind, "examples", channel).stat().st_mtime

    def overlay(self, channel: int, peak: int, call: int, sample: int) -> tuple[Path, float] | None:
        """(overlay PNG, map max) of the channel's top example at this peak, if that very call and sample was mapped."""
        if self.group is None or channel not in self.done or peak >= self.call.shape[1]:
            return None
        row = self.row[channel]
        if int(self.call[row, peak]) != call or int(self.top_sample[row, peak]) != sample:
            return None
        path = stores.heatmap_overlay_path(self.layout, self.kind, channel, peak, 0)
        return (path, float(np.max(self.group["example_map"][row, peak, 0]))) if path.is_file() else None


def _read_channels(group: zarr.Group, channels: list[int]) -> list[_Channel]:
    ids = group["channel"][:]
    position = {int(c): i for i, c in enumerate(ids)}
    unknown = [c for c in channels if c not in position]
    if unknown:
        raise ValueError(f"channels {unknown[:10]} are not in the analysis store; allowed: {ids.min()}..{ids.max()}")
    rows = [position[c] for c in channels]

    def rows_of(name: str, *rest: Any) -> np.ndarray:
        return np.asarray(group[name].get_orthogonal_selection((rows, *rest)))

    rank0 = (slice(None), 0)
    data = {
        "profile": rows_of("profile", slice(None)),
        "frequency": rows_of("topk_frequency", slice(None)),
        "max_activation": rows_of("max_activation", slice(None)),
        "mean_activation": rows_of("mean_activation", slice(None)),
        "peak_t": rows_of("peak_t", slice(None)),
        "peak_height": rows_of("peak_height", slice(None)),
        "top_sample": rows_of("top_sample", *rank0),
        "top_value": rows_of("top_value", *rank0),
    }
    return [_Channel(channel=c, **{k: v[i] for k, v in data.items()}) for i, c in enumerate(channels)]


def _load_image(path: Path | None) -> Image.Image | None:
    if path is None or not path.is_file():
        return None
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((IMAGE_SIZE, IMAGE_SIZE))
        return image


def render_frame(
    info: _Channel,
    *,
    kind: Kind,
    timesteps: np.ndarray,
    total_timesteps: int,
    frame_t: int,
    image: Image.Image | None,
    caption: str,
    dpi: int,
) -> Image.Image:
    """One figure as an RGB image: profile and max-activation curves (t from T down to 0) and the example."""
    figure = Figure(figsize=(10, 4.5), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 2, width_ratios=[1.7, 1], height_ratios=[2, 1], hspace=0.35, wspace=0.15)
    profile_ax = figure.add_subplot(grid[0, 0])
    max_ax = figure.add_subplot(grid[1, 0], sharex=profile_ax)
    image_ax = figure.add_subplot(grid[:, 1])

    t = np.arange(len(info.profile))
    profile_ax.plot(t, info.profile, color="C0", lw=1.2, label="interpolated")
    profile_ax.scatter(timesteps, info.frequency, color="k", s=12, zorder=3, label="observed")
    peaks = info.peak_t >= 0
    profile_ax.scatter(
        info.peak_t[peaks], info.peak_height[peaks], marker="x", color="C3", s=50, zorder=4, label="peaks"
    )
    profile_ax.axvline(frame_t, color="C3", alpha=0.35, lw=2)
    active = np.flatnonzero(info.profile > 0)
    span = f"active t {active.max()}..{active.min()}" if len(active) else "inactive"
    profile_ax.set_title(f"{kind} channel {info.channel}: {span}", fontsize=10)
    profile_ax.set_ylabel("top-k frequency")
    profile_ax.legend(fontsize=7, loc="upper right")
    profile_ax.set_xlim(total_timesteps, 0)

    max_ax.plot(timesteps, info.max_activation, marker=".", color="C2", label="max")
    max_ax.plot(timesteps, info.mean_activation, ls="--", color="C7", label="mean")
    max_ax.axvline(frame_t, color="C3", alpha=0.35, lw=2)
    max_ax.set_xlabel("timestep t")
    max_ax.set_ylabel("activation")
    max_ax.legend(fontsize=7, loc="upper right")

    image_ax.set_axis_off()
    if image is None:
        image_ax.imshow(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 0.6))
        image_ax.text(IMAGE_SIZE / 2, IMAGE_SIZE / 2, "image not found", ha="center", va="center", fontsize=9)
    else:
        image_ax.imshow(np.asarray(image))
    image_ax.set_title(caption, fontsize=8)

    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def _caption(prompt: str, sample: int, t: int, value: float) -> str:
    lines = textwrap.wrap(prompt, 42)[:3] or ["(empty prompt)"]
    return "\n".join([*lines, f"sample {sample}, t={t}, activation {value:.3g}"])


def _image_path(image: str, roots: list[Path]) -> Path | None:
    if not image:
        return None
    for root in roots:
        if (root / image).is_file():
            return root / image
    return None


def _save(frames: list[Image.Image], path: Path, duration_s: float) -> None:
    """Write atomically (a crash never leaves half a file), as a GIF for several frames, else a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if len(frames) > 1:
        duration = round(duration_s * 1000)
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)
    else:
        frames[0].save(tmp, format="PNG")
    tmp.replace(path)


def plot_channels(config: ExperimentConfig, kind: Kind, channels: list[int], *, overwrite: bool = False) -> list[Path]:
    """Render the plots of these channels (one plan_plots shard); returns the files written or kept.

    Inactive channels are skipped (and a stale plot of theirs removed). A plot newer than the
    analysis summary is kept unless `overwrite`, so a rerun does only what is missing.
    """
    s = _settings(config, kind)
    path, group = _open_analysis(config, kind)
    capture_path = Path(group.attrs["capture_store"])
    capture = stores.open_store(capture_path)
    prompts = capture["prompt"][:]
    images = capture["image"][:]
    roots = [config.experiment_dir, capture_path.parent.parent]
    timesteps = group["timestep"][:]
    total = int(group.attrs["total_timesteps"])
    summary = path.with_name(f"{kind}.summary.json")
    analysed_at = summary.stat().st_mtime if summary.is_file() else float("inf")
    heat = _Heatmaps(config, kind)
    written: list[Path] = []
    for info in _read_channels(group, [int(c) for c in channels]):
        frames_t = info.frames()
        target = plot_path(config, kind, info.channel, animated=len(frames_t) > 1)
        other = plot_path(config, kind, info.channel, animated=len(frames_t) <= 1)
        other.unlink(missing_ok=True)
        if not (info.profile > 0).any():
            target.unlink(missing_ok=True)
            continue
        fresh = target.is_file() and target.stat().st_mtime >= max(analysed_at, heat.mapped_at(info.channel))
        if not overwrite and fresh:
            written.append(target)
            continue
        frames = []
        for peak, t in enumerate(frames_t):
            call, sample, value = info.example_at(t, timesteps)
            image = _load_image(_image_path(str(images[sample]), roots)) if sample >= 0 else None
            caption = _caption(str(prompts[sample]), sample, int(timesteps[call]), value) if sample >= 0 else ""
            mapped = heat.overlay(info.channel, peak, call, sample) if sample >= 0 and info.peak_t[0] >= 0 else None
            if mapped is not None:
                image = _load_image(mapped[0])
                caption += f"\nheat: its spatial map at this call (0..{mapped[1]:.3g})"
            frames.append(
                render_frame(
                    info,
                    kind=kind,
                    timesteps=timesteps,
                    total_timesteps=total,
                    frame_t=t,
                    image=image,
                    caption=caption,
                    dpi=s.dpi,
                )
            )
        _save(frames, target, s.frame_duration)
        written.append(target)
    log.info("plots %s: %d channels plotted", kind, len(written))
    return written


def write_plot_index(config: ExperimentConfig, kind: Kind) -> Path:
    """`plots/<kind>/index.json`: every active channel with its plot file (relative) and peaks."""
    path, group = _open_analysis(config, kind)
    folder = stores.ExperimentLayout(config.experiment_dir).plots_dir(kind)
    active = [int(c) for c in _active_channels(group)]
    entries: list[dict[str, Any]] = []
    missing: list[int] = []
    if active:
        position = {int(c): i for i, c in enumerate(group["channel"][:])}
        rows = [position[c] for c in active]
        peak_t = np.asarray(group["peak_t"].get_orthogonal_selection((rows, slice(None))))
        peak_height = np.asarray(group["peak_height"].get_orthogonal_selection((rows, slice(None))))
        for i, channel in enumerate(active):
            files = [p for p in (plot_path(config, kind, channel, a) for a in (True, False)) if p.is_file()]
            if not files:
                missing.append(channel)
            valid = peak_t[i] >= 0
            heights = peak_height[i][valid]
            entries.append(
                {
                    "channel": channel,
                    "plot": files[0].name if files else None,
                    "peaks": [
                        {"t": int(t), "height": float(h)} for t, h in zip(peak_t[i][valid], heights, strict=True)
                    ],
                }
            )
    index = {
        "kind": kind,
        "analysis_store": str(path),
        "active_channels": len(active),
        "missing_plots": missing,
        "channels": entries,
    }
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "index.json"
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(target)
    return target
