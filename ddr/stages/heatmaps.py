"""Heatmaps: where in the image a channel (or SAE feature) fires, for its top dataset examples and its priors.

The capture stage keeps one number per (sample, UNet call, channel): a spatial mean. This stage
keeps the spatial map behind that number, only where it is looked at. For each selected channel
with an activity peak, at each of its `peaks` highest peaks (`peak_t`, highest first), the UNet
call nearest the peak (`nearest_call`: of calls at the minimal distance, the one whose top
example is strongest, the call the plots stage shows) and the `top_examples` highest-ranked
samples there (the analysis store's `top_sample`). A second, targeted pass regenerates exactly
those samples, each once per shard, with the capture's prompt, seed, steps, guidance and image
size (the config must match the capture store's settings), and records at the needed calls:

- raw channels: the channel's map of the layer output in the captured CFG half, exactly the values
  whose spatial mean the capture stage records;
- SAE features: the feature's code per token (`sae.encode`, top-k applied) reshaped to (y, x).

So a map's mean is the captured value, up to float rounding of another batch composition (each
channel's done marker records the largest difference, `max_mean_deviation`).

Priors (`include_priors`, for channels the prior stage has written): prior result k's final
latent is noised to the channel's first peak t by `scheduler.add_noise(latent, noise, t)` with
`noise = torch.randn` from `Generator().manual_seed(sample_seed(seed_k, channel, t))` (seed_k: the
prior store's seed of result k; `ddr.stages.deep_dream.sample_seed`, a SeedSequence of the
three), then goes through one unsteered UNet forward (empty prompt, guidance 1, stopped after the
target layer), where the map is read; `prior_t` records t. Prior maps are a separate part with
their own markers: the stage can run before the prior stage and again after it, which then maps
only the priors.

Overlays (`overlay`): the map normalised to 0..max(map) (negative values, which raw channels
have, clipped to 0; a map with nothing positive is cold everywhere), upsampled bilinearly to the
image size, coloured with matplotlib's `inferno` and blended as (1 - alpha) image + alpha colour,
alpha = `overlay_alpha`. Example overlays are drawn on the regenerated image (the capture image,
made again); prior overlays on the prior latent decoded by the VAE.

Stage API: `prepare_heatmap_store` (lays out or reuses `heatmaps/<kind>.zarr` and writes which
samples and calls each channel maps), `plan_heatmaps` (channel shards with something left to do),
`heatmap_shard`, and `run_heatmaps` for all of it in-process.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from matplotlib import colormaps
from PIL import Image
from torch import Tensor

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig, HeatmapsConfig
from ddr.dream.objectives import LayerActivation, autocast_dtype, empty_prompt_embedding
from ddr.hooks import SpatialMapHook, TimestepTracker, hooked, layer_output_shape, sae_tokens
from ddr.models.pipeline import latent_shape, load_experiment_sae, load_pipeline, model_dir
from ddr.models.sae import SparseAutoencoder
from ddr.stages.capture import generate
from ddr.stages.deep_dream import noise_latents, sample_seed
from ddr.stages.plots import nearest_call
from ddr.stages.prior import decode_pixels, to_pil
from ddr.stores import Kind

log = logging.getLogger(__name__)
COLOUR_MAP = "inferno"
NORMALISATION = "per map: clip(map, 0) / max(clip(map, 0)) (0 everywhere when nothing is positive)"
PRIOR_NOISE_RULE = (
    "scheduler.add_noise(prior latent, torch.randn(generator=Generator().manual_seed("
    "deep_dream.sample_seed(prior seed of the result, channel, t))), t), t = the channel's first peak"
)


class HeatmapStoreMismatch(RuntimeError):
    """The heatmap store was prepared with other settings than this config; prepare it again."""


# --- maps and overlays --------------------------------------------------------------------------


def spatial_maps(activation: Tensor, sae: SparseAutoencoder | None = None) -> Tensor:
    """Layer output [B, C, H, W] -> [B, width, H, W] float32: each channel's map, or each SAE feature's code
    at every token (`sae.encode` of the tokens, as the capture stage encodes them) as (y, x)."""
    rows = activation.float()
    if sae is None:
        return rows
    b, _, h, w = rows.shape
    codes = sae.encode(sae_tokens(rows).to(sae.dtype)).float()  # [B, H*W, F]
    return codes.transpose(1, 2).reshape(b, -1, h, w)


class SpatialMaps:
    """`spatial_maps` as an objective of `LayerActivation` (the prior maps' forward stops at the layer)."""

    name = "spatial_map"

    def __init__(self, sae: SparseAutoencoder | None) -> None:
        self.sae = sae

    def __call__(self, output: Tensor) -> Tensor:
        return spatial_maps(output, self.sae)


def normalise(heat: np.ndarray) -> np.ndarray:
    """0..1 per map: negative values clipped to 0, then divided by the max (all 0 when nothing is positive)."""
    clipped = np.clip(np.asarray(heat, dtype=np.float32), 0.0, None)
    top = float(clipped.max()) if clipped.size else 0.0
    return clipped / top if top > 0 else clipped


def overlay(image: Image.Image, heat: np.ndarray, alpha: float) -> Image.Image:
    """`image` with `heat` [y, x] normalised, upsampled bilinearly to its size and blended in as `inferno`."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    norm = torch.from_numpy(normalise(heat))[None, None]
    upsampled = F.interpolate(norm, size=base.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    colour = colormaps[COLOUR_MAP](np.clip(upsampled, 0.0, 1.0))[..., :3]
    mixed = (1.0 - alpha) * base + alpha * colour
    return Image.fromarray(np.round(np.clip(mixed, 0.0, 1.0) * 255).astype(np.uint8))


# --- locations and targets -------------------------------------------------------------------------


def heatmap_settings(config: ExperimentConfig, kind: Kind) -> HeatmapsConfig:
    """The heatmaps settings for this kind (the `sae` block applied for SAE features)."""
    config.require_kind(kind)
    return config.stages.heatmaps.for_kind(kind)  # type: ignore[return-value]


def analysis_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    folder = heatmap_settings(config, kind).timestep_analysis_results_dir
    return stores.ExperimentLayout(config.experiment_dir).analysis_store_from(kind, folder)


def prior_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    folder = heatmap_settings(config, kind).prior_results_dir
    return stores.ExperimentLayout(config.experiment_dir).prior_store_from(kind, folder)


def _open_analysis(config: ExperimentConfig, kind: Kind) -> tuple[Path, zarr.Group]:
    folder = heatmap_settings(config, kind).timestep_analysis_results_dir
    path = stores.require_analysis_store(analysis_store_path(config, kind), "heatmaps", folder)
    return path, stores.open_store(path)


@dataclass
class Targets:
    """Which samples and calls each planned channel maps (from the analysis store; reads no weights)."""

    channels: np.ndarray  # [n] selected channels with a peak, ascending
    rows: np.ndarray  # [n] their rows in the analysis (and heatmap) store
    peak_t: np.ndarray  # [n, peaks] -1 where the channel has fewer peaks
    example_call: np.ndarray  # [n, peaks] the UNet call nearest each peak, -1 where no peak
    example_sample: np.ndarray  # [n, peaks, ranks] top samples at that call, -1 where fewer
    n_channels: int = 0  # channels in the analysis store
    skipped: dict[int, str] = field(default_factory=dict)


def build_targets(config: ExperimentConfig, kind: Kind) -> Targets:
    """The channels to map and, per peak and rank, which sample at which UNet call."""
    settings = heatmap_settings(config, kind)
    path, group = _open_analysis(config, kind)
    n_peaks, n_ranks = group["peak_t"].shape[1], group["top_sample"].shape[2]
    if settings.top_examples > n_ranks:
        raise ConfigError(
            f"stages.heatmaps.top_examples: {settings.top_examples} is more than the {n_ranks} ranked examples "
            f"{path} keeps; allowed: 1..{n_ranks} (or rerun timestep_analysis with a larger top_examples)"
        )
    if settings.peaks > n_peaks:
        raise ConfigError(
            f"stages.heatmaps.peaks: {settings.peaks} is more than the {n_peaks} peaks {path} keeps; "
            f"allowed: 1..{n_peaks}"
        )
    ids = group["channel"][:].astype(np.int64)
    chosen = settings.select(ids, "stages.heatmaps", str(path))
    position = {int(c): i for i, c in enumerate(ids)}
    rows = np.asarray([position[int(c)] for c in chosen], dtype=np.int64)
    unwritten = chosen[np.isnan(np.asarray(group["profile"].oindex[rows, :1])).any(axis=1)]
    if len(unwritten):
        raise ValueError(
            f"{path} holds no values for {kind} channels {unwritten.tolist()[:20]} ({len(unwritten)} channels): "
            "the timestep_analysis stage has not finished; run it before the heatmaps stage"
        )
    timesteps = group["timestep"][:]
    peak_t = np.asarray(group["peak_t"].oindex[rows, : settings.peaks], dtype=np.int64)
    strength = np.asarray(group["top_value"].oindex[rows, :, 0], dtype=np.float64)
    top = np.asarray(group["top_sample"].oindex[rows, :, : settings.top_examples], dtype=np.int64)
    example_call = np.full(peak_t.shape, -1, dtype=np.int64)
    example_sample = np.full((*peak_t.shape, settings.top_examples), -1, dtype=np.int64)
    for i, p in zip(*np.nonzero(peak_t >= 0), strict=True):
        call = nearest_call(timesteps, int(peak_t[i, p]), strength[i])
        example_call[i, p] = call
        example_sample[i, p] = top[i, call]
    keep = peak_t[:, 0] >= 0
    skipped = {int(c): "no activity peak" for c in chosen[~keep]}
    if skipped:
        log.info("heatmaps %s: %d selected channels have no peak and get no maps", kind, len(skipped))
    return Targets(
        channels=chosen[keep],
        rows=rows[keep],
        peak_t=peak_t[keep],
        example_call=example_call[keep],
        example_sample=example_sample[keep],
        n_channels=len(ids),
        skipped=skipped,
    )


# --- the store ------------------------------------------------------------------------------------


def _capture_of(analysis: zarr.Group) -> tuple[Path, zarr.Group]:
    path = Path(str(analysis.attrs["capture_store"]))
    if not path.exists():
        raise FileNotFoundError(f"capture store {path} (the analysis store's source) does not exist")
    return path, stores.open_store(path)


def _check_generation(config: ExperimentConfig, kind: Kind, path: Path, capture: zarr.Group) -> dict[str, Any]:
    """The capture's settings; a ConfigError when this config would not regenerate its samples exactly."""
    if "settings" not in capture.attrs:
        raise ValueError(
            f"capture store {path} has no `settings` attribute (it was not made by the capture stage), "
            "so its samples cannot be regenerated for heatmaps"
        )
    captured = json.loads(str(capture.attrs["settings"]))
    sae = captured.get("sae") or {}
    pairs = {
        "model": (config.model.name, captured["model"]["name"]),
        "target_layer_name": (config.target_layer_name, captured["target_layer_name"]),
        "num_inference_steps": (config.num_inference_steps, captured["num_inference_steps"]),
        "guidance_scale": (config.guidance_scale, captured["guidance_scale"]),
        "image_size": (config.resolved_image_size, captured["image_size"]),
    }
    if kind == "sae" and config.sae is not None:
        pairs["sae"] = (config.sae.name, sae.get("name"))
        pairs["sae.hookpoint"] = (config.sae.hookpoint, sae.get("hookpoint"))
    differing = [f"{key}={a!r} (the capture used {b!r})" for key, (a, b) in pairs.items() if a != b]
    if differing:
        raise ConfigError(
            f"the heatmaps stage regenerates the samples of {path} and needs its settings: "
            f"{'; '.join(differing)}; set them to the capture's values"
        )
    return captured


def map_shape(config: ExperimentConfig) -> tuple[int, int]:
    """(y, x) of the target layer's output at the experiment's image size (a meta-device forward pass)."""
    unet = json.loads((model_dir(config) / "unet" / "config.json").read_text())
    shape = layer_output_shape(unet, config.target_layer_name, latent_shape(config)[1])
    if len(shape) != 3:
        raise ValueError(f"{config.target_layer_name} outputs shape {shape} per sample; heatmaps need [C, H, W]")
    return int(shape[1]), int(shape[2])


def _params(config: ExperimentConfig, kind: Kind, analysis_path: Path, analysis: zarr.Group) -> dict[str, Any]:
    """Everything (but the channel selection) that decides the store's contents; it is reused when these match."""
    settings = heatmap_settings(config, kind)
    capture_path, capture = _capture_of(analysis)
    return {
        "kind": kind,
        "analysis_store": str(analysis_path.resolve()),
        "analysis_settings_sha256": stores.attr_sha256(analysis),
        "capture_store": str(capture_path),
        "capture_settings_sha256": stores.attr_sha256(capture),
        "peaks": settings.peaks,
        "top_examples": settings.top_examples,
        "overlay_alpha": settings.overlay_alpha,
        "map_shape": list(map_shape(config)),
        "precision": config.infrastructure.precision,
    }


def _prior_source(config: ExperimentConfig, kind: Kind) -> dict[str, Any] | None:
    """What the prior maps are made from (the prior store, its parameters and seeds), or None without one."""
    if not heatmap_settings(config, kind).include_priors:
        return None
    path = prior_store_path(config, kind)
    if not path.exists():
        log.info("heatmaps %s: no prior store at %s yet; prior maps follow when the stage runs after it", kind, path)
        return None
    prior = stores.open_store(path)
    if tuple(prior["latent"].shape[2:]) != latent_shape(config):
        raise ValueError(
            f"{path} holds latents of shape {tuple(prior['latent'].shape[2:])}; this config's image_size "
            f"{config.resolved_image_size} needs {latent_shape(config)} (set stages.heatmaps.include_priors=false)"
        )
    return {
        "prior_store": str(path.resolve()),
        "prior_params_sha256": stores.attr_sha256(prior, "params"),
        "seeds": [int(s) for s in prior["seed"][:]],
    }


def prepare_heatmap_store(config: ExperimentConfig, kind: Kind) -> Path:
    """Create `heatmaps/<kind>.zarr` (a row per analysis channel), or reuse one made with the same settings.

    Writes each planned channel's `peak_t`, `example_call`, `example_sample` (and `prior_t` when a
    prior store exists). A store made with other settings (the analysis, the capture, peaks,
    top_examples, ...) is recomputed from scratch with a warning; prior maps made from another
    prior store are cleared alone. Call it once, before the shards.
    """
    analysis_path, analysis = _open_analysis(config, kind)
    targets = build_targets(config, kind)
    capture_path, capture = _capture_of(analysis)
    _check_generation(config, kind, capture_path, capture)
    params = _params(config, kind, analysis_path, analysis)
    layout = stores.ExperimentLayout(config.experiment_dir)
    path = layout.heatmap_store(kind)
    if path.exists():
        try:
            existing = json.loads(str(stores.open_store(path).attrs["params"]))
        except (KeyError, FileNotFoundError, ValueError):
            existing = None
        if existing != params:
            differing = sorted(k for k in params if existing is None or existing.get(k) != params[k])
            log.warning("heatmaps %s: settings changed (%s); recomputing %s", kind, ", ".join(differing), path)
            shutil.rmtree(path)
            shutil.rmtree(layout.heatmap_dir(kind), ignore_errors=True)
    if not path.exists():
        with stores.staged_store(path) as partial:
            stores.create_heatmap_store(
                partial,
                channels=analysis["channel"][:],
                peaks=params["peaks"],
                ranks=params["top_examples"],
                results=0,
                map_shape=tuple(params["map_shape"]),
                attrs={
                    **{k: v for k, v in params.items() if k != "map_shape"},
                    "model": config.model.name,
                    "layer": config.target_layer_name,
                    "sae": config.sae.name if kind == "sae" and config.sae else None,
                    "map": "SAE code per token (sae.encode), as (y, x)" if kind == "sae" else "layer output channel",
                    "branch": json.loads(str(capture.attrs["settings"]))["branch"],
                    "normalisation": NORMALISATION,
                    "colour_map": COLOUR_MAP,
                    "prior_noise_rule": PRIOR_NOISE_RULE,
                    "prior_source": "",
                    "params": json.dumps(params, sort_keys=True),
                    "config": json.dumps(config.model_dump(mode="json"), default=str),
                },
            )
    group = stores.open_store(path, mode="r+")
    stores.write_heatmap_tables(
        group,
        targets.rows,
        {"peak_t": targets.peak_t, "example_call": targets.example_call, "example_sample": targets.example_sample},
    )
    source = _prior_source(config, kind)
    if source is not None:
        text = json.dumps(source, sort_keys=True)
        if group.attrs.get("prior_source") != text:
            stores.reset_heatmap_priors(layout, kind, len(source["seeds"]))
            group = stores.open_store(path, mode="r+")
            group.attrs["prior_source"] = text
        _, with_prior = _prior_channels(group)
        has_prior = np.isin(targets.channels, sorted(with_prior))
        stores.write_heatmap_tables(group, targets.rows, {"prior_t": np.where(has_prior, targets.peak_t[:, 0], -1)})
    skipped = json.loads(str(group.attrs.get("skipped_channels", "{}")))
    skipped.update({str(c): why for c, why in targets.skipped.items()})
    group.attrs["skipped_channels"] = json.dumps(skipped)
    stores.consolidate(path)
    return path


def _open_heatmaps(config: ExperimentConfig, kind: Kind) -> tuple[Path, zarr.Group]:
    path = stores.ExperimentLayout(config.experiment_dir).heatmap_store(kind)
    if not path.exists():
        raise FileNotFoundError(f"heatmap store {path} does not exist; call prepare_heatmap_store(config, {kind!r})")
    return path, stores.open_store(path, mode="r+")


def _prior_channels(group: zarr.Group) -> tuple[Path | None, set[int]]:
    """The prior store the prior maps come from and the channels it has rows for (none without one)."""
    source = str(group.attrs.get("prior_source", ""))
    if not source:
        return None, set()
    path = Path(json.loads(source)["prior_store"])
    if not path.exists():
        return None, set()
    return path, {int(c) for c in stores.open_store(path)["channel"][:]}


def plan_heatmaps(config: ExperimentConfig, kind: Kind) -> list[list[int]]:
    """Shards of `channels_per_shard` planned channels whose example (or prior) maps are not all done."""
    targets = build_targets(config, kind)
    _, group = _open_heatmaps(config, kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    examples_done = stores.heatmap_done_channels(layout, kind, "examples")
    priors_done = stores.heatmap_done_channels(layout, kind, "priors")
    _, with_prior = _prior_channels(group) if heatmap_settings(config, kind).include_priors else (None, set())
    todo = [int(c) for c in targets.channels if c not in examples_done or (c in with_prior and c not in priors_done)]
    per_shard = heatmap_settings(config, kind).channels_per_shard
    return [todo[i : i + per_shard] for i in range(0, len(todo), per_shard)]


# --- the targeted pass ------------------------------------------------------------------------------


def _map_examples(
    config: ExperimentConfig, kind: Kind, group: zarr.Group, channels: list[int], rows: list[int]
) -> dict[str, Any]:
    """Regenerate the samples these channels' maps need (each once), record and write the maps and overlays."""
    settings = heatmap_settings(config, kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    capture_path, capture = _capture_of(stores.open_store(Path(str(group.attrs["analysis_store"]))))
    captured = _check_generation(config, kind, capture_path, capture)
    samples = np.asarray(group["example_sample"].oindex[rows], dtype=np.int64)  # [n, peaks, ranks]
    calls_of = np.asarray(group["example_call"].oindex[rows], dtype=np.int64)  # [n, peaks]
    needed = np.unique(samples[samples >= 0])
    calls = sorted({int(c) for c in calls_of[calls_of >= 0]})
    call_pos = {c: i for i, c in enumerate(calls)}
    prompts, seeds = capture["prompt"][:], capture["seed"][:]
    planned = [int(t) for t in capture["timestep"][:]]
    maps = np.full((*samples.shape, *group["example_map"].shape[3:]), np.nan, dtype=np.float32)
    pipe = load_pipeline(config)
    sae = load_experiment_sae(config) if kind == "sae" else None
    index = torch.as_tensor(channels, device=pipe.device)

    def select(rows_out: Tensor) -> Tensor:
        return spatial_maps(rows_out, sae)[:, index]

    overlays_dir = stores.heatmap_overlay_path(layout, kind, 0, 0, 0).parent
    overlays_dir.mkdir(parents=True, exist_ok=True)
    per_batch = settings.samples_per_batch
    for start in range(0, len(needed), per_batch):
        batch = needed[start : start + per_batch].tolist()
        tracker = TimestepTracker()
        hook = SpatialMapHook(tracker, calls, config.guidance_scale > 1.0, captured["branch"], select)
        with hooked(pipe.unet, config.target_layer_name, tracker, hook):
            images = generate(pipe, [str(prompts[s]) for s in batch], [int(seeds[s]) for s in batch], config).images
        if tracker.timesteps != planned:
            raise RuntimeError(f"heatmaps: the UNet visited timesteps {tracker.timesteps}, the capture {planned}")
        recorded = hook.result().numpy()  # [calls, batch, channels, y, x]
        where = {s: i for i, s in enumerate(batch)}
        for j, p, r in zip(*np.nonzero(np.isin(samples, batch)), strict=True):
            position = where[int(samples[j, p, r])]
            maps[j, p, r] = recorded[call_pos[int(calls_of[j, p])], position, j]
            picture = overlay(images[position], maps[j, p, r], settings.overlay_alpha)
            picture.save(stores.heatmap_overlay_path(layout, kind, channels[j], int(p), int(r)))
    deviation = _mean_deviation(capture[kind], samples, calls_of, channels, maps)
    for j, channel in enumerate(channels):
        stores.write_heatmap_maps(group, "example_map", rows[j], maps[j])
        used = sorted({int(s) for s in samples[j].ravel() if s >= 0})
        info = {"channel": channel, "row": rows[j], "samples": used, "max_mean_deviation": deviation[j]}
        stores.mark_heatmap_done(layout, kind, "examples", channel, info)
    return {"samples_regenerated": len(needed), "max_mean_deviation": max(deviation, default=0.0)}


def _mean_deviation(
    captured: zarr.Array, samples: np.ndarray, calls: np.ndarray, channels: list[int], maps: np.ndarray
) -> list[float]:
    """Per channel, the largest |spatial mean of a map - the captured value| (the capture is the reference).

    The captured values are read in one orthogonal selection, so each capture chunk is read once."""
    sample_ids, call_ids = np.unique(samples[samples >= 0]), np.unique(calls[calls >= 0])
    channel_ids = np.unique(channels)
    values = np.asarray(captured.get_orthogonal_selection((sample_ids, call_ids, channel_ids)), dtype=np.float64)
    deviation = []
    for j, channel in enumerate(channels):
        worst = 0.0
        for p, r in zip(*np.nonzero(samples[j] >= 0), strict=True):
            at = (
                np.searchsorted(sample_ids, samples[j, p, r]),
                np.searchsorted(call_ids, calls[j, p]),
                np.searchsorted(channel_ids, channel),
            )
            worst = max(worst, abs(float(maps[j, p, r].astype(np.float64).mean()) - float(values[at])))
        deviation.append(worst)
    return deviation


def _map_priors(
    config: ExperimentConfig, kind: Kind, group: zarr.Group, prior_path: Path, channels: list[int], rows: list[int]
) -> dict[str, Any]:
    """One unsteered forward per (channel, prior result) on the noised prior latent; maps and overlays."""
    settings = heatmap_settings(config, kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    prior = stores.open_store(prior_path)
    prior_row = {int(c): i for i, c in enumerate(prior["channel"][:])}
    prior_seeds = [int(s) for s in prior["seed"][:]]
    prior_t = np.asarray(group["prior_t"].oindex[rows], dtype=np.int64)
    ready: list[tuple[int, int, int, np.ndarray]] = []  # (channel, heatmap row, t, latents [result, c, h, w])
    for channel, row, t in zip(channels, rows, prior_t.tolist(), strict=True):
        latents = np.asarray(prior["latent"][prior_row[channel]], dtype=np.float32)
        if t < 0 or not np.isfinite(latents).all():
            log.info("heatmaps %s: the prior of channel %d is not written yet; its prior maps wait", kind, channel)
            continue
        ready.append((channel, row, t, latents))
    if not ready:
        return {"prior_forwards": 0, "prior_channels": []}
    pipe = load_pipeline(config)
    sae = load_experiment_sae(config) if kind == "sae" else None
    amp = autocast_dtype(pipe.device, config.infrastructure.precision)
    activation = LayerActivation(
        pipe.unet, config.target_layer_name, SpatialMaps(sae), empty_prompt_embedding(pipe), amp
    )
    pairs = [(i, k) for i in range(len(ready)) for k in range(len(prior_seeds))]
    maps = np.full((len(ready), len(prior_seeds), *group["prior_map"].shape[2:]), np.nan, dtype=np.float32)
    per_batch = settings.samples_per_batch
    for start in range(0, len(pairs), per_batch):
        batch = pairs[start : start + per_batch]
        latents = torch.from_numpy(np.stack([ready[i][3][k] for i, k in batch]))
        t = torch.tensor([ready[i][2] for i, _ in batch], dtype=torch.long)
        noise_seeds = [sample_seed(prior_seeds[k], ready[i][0], ready[i][2]) for i, k in batch]
        noisy = pipe.scheduler.add_noise(latents, noise_latents(noise_seeds, tuple(latents.shape[1:])), t)
        with torch.no_grad():
            out = activation(noisy.to(pipe.device), t.to(pipe.device))  # [batch, width, y, x]
        picked = out[torch.arange(len(batch)), torch.tensor([ready[i][0] for i, _ in batch])].cpu().numpy()
        images = to_pil(pipe, decode_pixels(pipe, latents))
        for b, (i, k) in enumerate(batch):
            maps[i, k] = picked[b]
            picture = overlay(images[b], picked[b], settings.overlay_alpha)
            picture.save(stores.heatmap_prior_overlay_path(layout, kind, ready[i][0], k))
    for i, (channel, row, t, _) in enumerate(ready):
        stores.write_heatmap_maps(group, "prior_map", row, maps[i])
        stores.mark_heatmap_done(layout, kind, "priors", channel, {"channel": channel, "row": row, "t": t})
    return {"prior_forwards": len(pairs), "prior_channels": [r[0] for r in ready]}


def heatmap_shard(config: ExperimentConfig, kind: Kind, channels: list[int]) -> dict[str, Any]:
    """Map the example (and prior) maps of `channels` not done yet; each part is marked done per channel.

    The shard's samples are regenerated once each, `samples_per_batch` per pipeline call, however
    many of its channels and peaks share them.
    """
    if not channels:
        raise ValueError("heatmap_shard: no channels given")
    path, group = _open_heatmaps(config, kind)
    analysis_path, analysis = _open_analysis(config, kind)
    if json.loads(str(group.attrs["params"])) != _params(config, kind, analysis_path, analysis):
        raise HeatmapStoreMismatch(f"{path} was prepared with other settings; call prepare_heatmap_store again")
    row_of = {int(c): i for i, c in enumerate(group["channel"][:])}
    unknown = [c for c in channels if c not in row_of]
    if unknown:
        raise ValueError(f"{kind} channels {unknown} are not in {path}; allowed: 0..{len(row_of) - 1}")
    calls = np.asarray(group["example_call"][:, 0])
    unplanned = [c for c in channels if calls[row_of[c]] < 0]
    if unplanned:
        raise ValueError(
            f"{kind} channels {unplanned} are not planned in {path} (not selected, or no activity peak); "
            "call prepare_heatmap_store with them selected"
        )
    layout = stores.ExperimentLayout(config.experiment_dir)
    started = time.perf_counter()
    examples = [c for c in channels if c not in stores.heatmap_done_channels(layout, kind, "examples")]
    result: dict[str, Any] = {"kind": kind, "channels": list(channels), "examples_mapped": examples}
    result |= {"samples_regenerated": 0, "max_mean_deviation": 0.0, "prior_forwards": 0, "prior_channels": []}
    if examples:
        result |= _map_examples(config, kind, group, examples, [row_of[c] for c in examples])
    prior_path, with_prior = _prior_channels(group)
    if heatmap_settings(config, kind).include_priors and prior_path is not None:
        done = stores.heatmap_done_channels(layout, kind, "priors")
        pending = [c for c in channels if c in with_prior and c not in done]
        if pending:
            result |= _map_priors(config, kind, group, prior_path, pending, [row_of[c] for c in pending])
    result["seconds"] = time.perf_counter() - started
    result["overlays"] = [
        str(p) for c in channels if (p := stores.heatmap_overlay_path(layout, kind, c, 0, 0)).is_file()
    ]
    return result


def run_heatmaps(config: ExperimentConfig, kind: Kind) -> dict[str, Any]:
    """The whole stage in this process: prepare, plan, every shard (finished parts are skipped)."""
    path = prepare_heatmap_store(config, kind)
    results = [heatmap_shard(config, kind, shard) for shard in plan_heatmaps(config, kind)]
    return {
        "store": str(path),
        "shards": results,
        "channels_mapped": sum(len(r["examples_mapped"]) for r in results),
        "prior_channels_mapped": sum(len(r["prior_channels"]) for r in results),
        "samples_regenerated": sum(r["samples_regenerated"] for r in results),
    }
