"""Where dreams start, and the spectrum of real latents.

- `encode_images`: images -> clean latents (the VAE posterior's mean times the scaling factor),
  the inverse of `ddr.models.pipeline.decode_latents`;
- `mean_latent_spectrum`, `latent_spectrum`: the mean |rfft2(latent, norm="ortho")| of real
  latents, the fixed magnitude of phase-only dreams (`ddr.dream.parameterisations`), from the
  capture stage's images or from the priors, cached as `spectrum/<source>[_<kind>].zarr`;
- `example_starts`: feature accentuation starts from a channel's top dataset examples at t
  (the analysis store's `top_sample`), encoded by the VAE;
- `noised`: such starts noised to t by the scheduler, each with its own seeded noise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig
from ddr.dream.transforms import draw_noise, sample_generators
from ddr.models.pipeline import load_pipeline
from ddr.stores import Kind

log = logging.getLogger(__name__)
Source = Literal["capture", "prior"]
SOURCES: tuple[Source, ...] = ("capture", "prior")
SPECTRUM_RULE = "mean over latents of |torch.fft.rfft2(latent, norm='ortho')|, dims (latent_channel, y, kx)"


# --- latents of images --------------------------------------------------------------------------


def _pixels(image: Image.Image, size: int | None) -> Tensor:
    """RGB in [-1, 1] as [3, H, W] (the pipeline's preprocessing), resized (Lanczos) to size x size if given."""
    image = image.convert("RGB")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@torch.no_grad()
def encode_images(pipe: Any, images: Sequence[Image.Image], batch: int = 8, size: int | None = None) -> Tensor:
    """Clean latents [N, c, h, w] float32 on the pipeline's device: `vae.encode(...).latent_dist.mean *
    scaling_factor` (deterministic: the posterior mean, not a sample). `size` resizes every image to
    size x size pixels; without it all images must share one size."""
    if not images:
        raise ValueError("encode_images: no images given")
    if batch <= 0:
        raise ValueError(f"encode_images: batch {batch} must be > 0")
    sizes = {image.size for image in images}
    if size is None and len(sizes) > 1:
        raise ValueError(f"encode_images: images have sizes {sorted(sizes)}; pass size= to resize them to one")
    vae = pipe.vae
    parts = []
    for start in range(0, len(images), batch):
        pixels = torch.stack([_pixels(image, size) for image in images[start : start + batch]])
        posterior = vae.encode(pixels.to(pipe.device, vae.dtype)).latent_dist
        parts.append(posterior.mean.float() * vae.config.scaling_factor)
    return torch.cat(parts)


def _open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _encoded_batches(pipe: Any, paths: Sequence[Path], batch: int, size: int) -> Iterator[Tensor]:
    """The images at `paths`, `batch` at a time, as latents (only one batch of images in memory)."""
    for start in range(0, len(paths), batch):
        yield encode_images(pipe, [_open_rgb(p) for p in paths[start : start + batch]], batch, size)


def _capture_images(capture_store: Path) -> list[str]:
    """The capture store's `image` names (relative to its experiment folder); an error when none were saved."""
    if not capture_store.exists():
        raise FileNotFoundError(f"capture store {capture_store} does not exist; run the capture stage first")
    names = [str(n) for n in stores.open_store(capture_store)["image"][:]]
    if not any(names):
        raise ValueError(
            f"capture store {capture_store} has no images (it was captured with stages.capture.save_images=false); "
            "capture again with stages.capture.save_images=true, or use the priors (source='prior')"
        )
    return names


def _image_paths(capture_store: Path, names: list[str], samples: Iterable[int]) -> list[Path]:
    experiment = capture_store.parent.parent
    paths = []
    for sample in samples:
        path = experiment / names[sample]
        if not names[sample] or not path.is_file():
            raise FileNotFoundError(
                f"capture image of sample {sample} ({path}) is missing; run the capture stage to completion first"
            )
        paths.append(path)
    return paths


# --- the spectrum of real latents ---------------------------------------------------------------


def mean_latent_spectrum(latents: Tensor | Iterable[Tensor]) -> Tensor:
    """Mean over samples of |rfft2(latent, norm="ortho")|: [c, h, w//2+1] float32 on the CPU.

    `latents` is one [N, c, h, w] tensor or an iterable of such batches (streamed: memory bounded by a batch).
    """
    batches = [latents] if isinstance(latents, Tensor) else latents
    total: Tensor | None = None
    count = 0
    for chunk in batches:
        if chunk.ndim != 4:
            raise ValueError(f"latents: shape {tuple(chunk.shape)} is not [sample, latent_channel, h, w]")
        magnitude = torch.fft.rfft2(chunk.float(), norm="ortho").abs().sum(0).double().cpu()
        total = magnitude if total is None else total + magnitude
        count += chunk.shape[0]
    if total is None or count == 0:
        raise ValueError("mean_latent_spectrum: no latents given")
    return (total / count).float()


def _prior_latents(path: Path, kind: Kind, max_images: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Up to `max_images` written prior latents (channel order, then result), skipping unwritten (NaN) rows."""
    if not path.exists():
        raise FileNotFoundError(
            f"prior store {path} does not exist; run the prior stage for {kind} first, or use source='capture'"
        )
    group = stores.open_store(path)
    channels = group["channel"][:].tolist()
    rows: list[list[int]] = []
    latents: list[np.ndarray] = []
    for i, channel in enumerate(channels):
        block = group["latent"][i]  # [result, c, h, w]: one chunk
        for result, latent in enumerate(block):
            if len(rows) < max_images and np.isfinite(latent).all():
                rows.append([int(channel), result])
                latents.append(latent)
        if len(rows) >= max_images:
            break
    if not rows:
        raise ValueError(f"prior store {path} holds no written priors yet; run the prior stage for {kind} first")
    return rows, latents


def latent_spectrum(config: ExperimentConfig, source: Source, kind: Kind, max_images: int, batch: int = 8) -> Tensor:
    """The mean magnitude spectrum [c, h, w//2+1] of real latents, for phase-only dreams.

    `source` "capture": the first `max_images` images of this experiment's capture stage, encoded by
    the VAE (`kind` plays no part); "prior": the first `max_images` written latents of
    `prior/<kind>/priors.zarr` (channel order, then result; unwritten NaN rows skipped). The result is
    cached in `spectrum/<source>[_<kind>].zarr` with a key of what decides it (model, image size,
    source, max_images, the images or prior rows used, and the capture settings or prior
    parameters); a cache with another key is recomputed. Call it from one process (the stage's
    prepare), not from every shard.
    """
    if source not in SOURCES:
        raise ConfigError(f"spectrum source: {source!r} is not known; allowed: {', '.join(SOURCES)}")
    if max_images <= 0:
        raise ConfigError(f"spectrum max_images: {max_images} must be > 0")
    config.require_kind(kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    key: dict[str, Any] = {
        "model": config.model.model_dump(mode="json"),
        "image_size": config.resolved_image_size,
        "source": source,
        "max_images": max_images,
    }
    if source == "capture":
        path = layout.spectrum_store("capture")
        names = _capture_images(layout.capture_store)
        samples = [i for i, name in enumerate(names) if name][:max_images]
        capture_settings_sha256 = stores.attr_sha256(stores.open_store(layout.capture_store))
        key |= {"images": [names[i] for i in samples], "capture_settings_sha256": capture_settings_sha256}
    else:
        path = layout.spectrum_store("prior", kind)
        prior = layout.prior_store(kind)
        rows, latents = _prior_latents(prior, kind, max_images)
        params_sha256 = stores.attr_sha256(stores.open_store(prior), "params")
        key |= {"kind": kind, "prior_store": str(prior), "rows": rows, "prior_params_sha256": params_sha256}
    key_text = json.dumps(key, sort_keys=True, default=str)
    cached = stores.read_spectrum_store(path, key_text)
    if cached is not None:
        return torch.from_numpy(cached)
    if source == "capture":
        pipe = load_pipeline(config)
        paths = _image_paths(layout.capture_store, names, samples)
        magnitude = mean_latent_spectrum(_encoded_batches(pipe, paths, batch, config.resolved_image_size))
        used = len(paths)
    else:
        magnitude = mean_latent_spectrum(torch.from_numpy(np.stack(latents).astype(np.float32)))
        used = len(latents)
    path.parent.mkdir(parents=True, exist_ok=True)
    attrs = {"source": source, "kind": kind if source == "prior" else None, "n_latents": used, "rule": SPECTRUM_RULE}
    stores.write_spectrum_store(path, magnitude.numpy(), key_text, attrs)
    log.info("latent spectrum from %d %s latents written to %s", used, source, path)
    return magnitude


# --- feature accentuation -----------------------------------------------------------------------


def ranked_examples(top_sample: np.ndarray, top_value: np.ndarray, captured: np.ndarray, t: int) -> list[int]:
    """A channel's dataset examples at t, best first, each sample once: the top lists [call, rank] of the
    UNet calls whose timestep value is nearest t (several when a value repeats or two are equally near),
    merged by activation."""
    calls = stores.nearest_calls(captured, t)
    pairs = [
        (float(top_value[c, r]), int(top_sample[c, r]))
        for c in calls
        for r in range(top_sample.shape[1])
        if top_sample[c, r] >= 0
    ]
    pairs.sort(key=lambda pair: -pair[0])  # stable: equal activations keep call, then rank order
    return list(dict.fromkeys(sample for _, sample in pairs))


def example_starts(
    config: ExperimentConfig, kind: Kind, targets: Sequence[tuple[int, int]], n: int, batch: int = 8
) -> tuple[Tensor, np.ndarray]:
    """Clean latents [len(targets), n, c, h, w] (pipeline device, float32) of each (channel, t) target's top-n
    dataset examples at t (`ranked_examples`), and their sample indices [len(targets), n] int64.

    The analysis store is the deep-dream config's (`timestep_analysis_results_dir`); the images are
    those of the capture store it was computed from (its `capture_store` attribute, else this
    experiment's), resized to the config's image size and encoded once per distinct sample. A
    channel with fewer than n examples at t repeats its list from the best (s0 s1 s0 s1 ...; logged),
    so every target gets n starts, which then differ by their seeds' noise; one with none is an error.
    """
    if n <= 0:
        raise ConfigError(f"number of example starts: {n} must be > 0")
    if not targets:
        raise ValueError("example_starts: no targets given")
    config.require_kind(kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    folder = config.stages.deep_dream.for_kind(kind).timestep_analysis_results_dir
    path = stores.require_analysis_store(layout.analysis_store_from(kind, folder), "deep_dream", folder)
    group = stores.open_store(path)
    ids = group["channel"][:].tolist()
    row_of = {int(c): i for i, c in enumerate(ids)}
    captured = group["timestep"][:]
    samples = np.empty((len(targets), n), dtype=np.int64)
    short: list[tuple[int, int, int]] = []
    for i, (channel, t) in enumerate(targets):
        if channel not in row_of:
            raise ValueError(f"{kind} channel {channel} is not in {path} (it holds {len(ids)} channels: {ids[:10]}...)")
        row = row_of[channel]
        ranked = ranked_examples(group["top_sample"][row], group["top_value"][row], captured, t)
        if not ranked:
            raise ValueError(
                f"{kind} channel {channel} has no dataset examples near t={t} in {path} (top_sample all -1: "
                "is the timestep_analysis stage complete?)"
            )
        if len(ranked) < n:
            short.append((channel, t, len(ranked)))
        samples[i] = [ranked[k % len(ranked)] for k in range(n)]
    if short:
        log.warning("example starts: fewer than %d examples, best ones repeated for (channel, t, count) %s", n, short)
    capture_store = Path(group.attrs.get("capture_store") or layout.capture_store)
    names = _capture_images(capture_store)
    distinct = list(dict.fromkeys(samples.ravel().tolist()))
    paths = _image_paths(capture_store, names, distinct)
    latents = torch.cat(list(_encoded_batches(load_pipeline(config), paths, batch, config.resolved_image_size)))
    position = {sample: j for j, sample in enumerate(distinct)}
    take = torch.as_tensor([position[s] for s in samples.ravel().tolist()], device=latents.device)
    return latents[take].view(len(targets), n, *latents.shape[1:]), samples


def noised(scheduler: Any, latents: Tensor, t: int | Tensor, seeds: Sequence[int]) -> Tensor:
    """`scheduler.add_noise(latents, noise, t)`, sample i's noise `torch.randn` from `Generator().manual_seed(seeds[i])`
    (on the CPU, so it does not depend on the device); `t` one timestep or one per sample."""
    if len(seeds) != latents.shape[0]:
        raise ValueError(f"noised: {len(seeds)} seeds for {latents.shape[0]} latents; give one seed per latent")
    timesteps = torch.as_tensor(t, dtype=torch.long).expand(latents.shape[0]).clone()
    limit = int(scheduler.config.num_train_timesteps)
    if (timesteps < 0).any() or (timesteps >= limit).any():
        raise ValueError(f"noised: timestep {timesteps.tolist()} out of range; allowed: 0..{limit - 1}")
    noise = draw_noise(sample_generators(seeds), latents.shape[1:])
    return scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), timesteps.to(latents.device))
