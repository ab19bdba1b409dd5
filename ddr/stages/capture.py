"""Capture: generate images for the prompt dataset and record the target layer's activations.

`plan_capture` decides the samples (prompt x image-per-prompt, each with its own seed) and
the shards; `prepare_store` lays out `capture/activations.zarr` once; `capture_shard` is the
stage function a worker runs: it generates its samples, writes its rows in one region write
and marks the shard complete. A shard already marked complete is skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch

from ddr import stores
from ddr.config import ExperimentConfig
from ddr.datasets import PromptFile, load_prompts
from ddr.hooks import CaptureHook, TimestepTracker, hooked, layer_output_shape
from ddr.models.pipeline import load_experiment_sae, load_pipeline, model_dir
from ddr.progress import log_progress
from ddr.provision import asset_dir, dataset_spec, require

log = logging.getLogger(__name__)


class CaptureStoreMismatch(RuntimeError):
    """An existing capture store was made with other settings; nothing is overwritten unless asked."""


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    stop: int


@dataclass
class CapturePlan:
    prompt_file: PromptFile
    sample_prompts: list[str]
    seeds: np.ndarray
    images: list[str]
    timesteps: np.ndarray
    n_channels: int
    n_features: int | None
    shards: list[Shard]

    @property
    def n_samples(self) -> int:
        return len(self.sample_prompts)


def prompt_file_path(config: ExperimentConfig) -> Path:
    """The prompt file of `stages.capture.prompt_dataset` (a provisioned dataset or a file path)."""
    spec = dataset_spec(config.stages.capture.prompt_dataset)
    if spec.path is not None and Path(spec.path).is_absolute():
        return Path(spec.path)
    folder = require(asset_dir(config, "datasets", spec.name), f"prompt dataset {spec.name!r}")
    if spec.file:
        return folder / spec.file
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    if len(files) != 1:
        raise FileNotFoundError(f"dataset {spec.name!r}: expected one prompt file in {folder}, found {len(files)}")
    return files[0]


def load_dataset(config: ExperimentConfig) -> PromptFile:
    spec = dataset_spec(config.stages.capture.prompt_dataset)
    return load_prompts(prompt_file_path(config), spec.format, spec.text_field)


def scheduler_timesteps(config: ExperimentConfig) -> np.ndarray:
    """The timestep of every UNet call of one generation, in order (PNDM at 50 steps: 51 calls)."""
    folder = model_dir(config)
    if not (folder / "model_index.json").is_file() and config.model.base_model:
        folder = asset_dir(config, "models", config.model.base_model)
    class_name = json.loads((folder / "model_index.json").read_text())["scheduler"][1]
    scheduler = getattr(diffusers, class_name).from_pretrained(folder, subfolder="scheduler")
    scheduler.set_timesteps(config.num_inference_steps)
    return scheduler.timesteps.cpu().numpy().astype(np.int64)


def layer_width(config: ExperimentConfig) -> int:
    """Channels of the target layer, from a meta-device forward pass (fails early on an unknown layer)."""
    folder = model_dir(config)
    unet_dir = folder / "unet"
    unet_config = json.loads((unet_dir / "config.json").read_text())
    vae_dir = (
        folder / "vae"
        if (folder / "vae").is_dir()
        else asset_dir(config, "models", str(config.model.base_model)) / "vae"
    )
    vae_config = json.loads((vae_dir / "config.json").read_text())
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    return layer_output_shape(unet_config, config.target_layer_name, config.resolved_image_size // factor)[0]


def sae_width(config: ExperimentConfig) -> int | None:
    if not config.use_sae or config.sae is None:
        return None
    folder = require(asset_dir(config, "saes", config.sae.name), f"SAE {config.sae.name!r}")
    hookpoint = folder / config.sae.hookpoint
    cfg = json.loads(((hookpoint if hookpoint.is_dir() else folder) / "cfg.json").read_text())
    return int(cfg.get("num_latents") or cfg.get("d_sae") or cfg["d_in"] * cfg["expansion_factor"])


def plan_capture(config: ExperimentConfig) -> CapturePlan:
    """Samples, seeds, image paths, UNet-call timesteps and shards; reads no weights."""
    settings = config.stages.capture
    prompt_file = load_dataset(config)
    if prompt_file.malformed:
        log.warning(prompt_file.report())
    prompts = prompt_file.prompts[: settings.dev_n_prompts] if settings.dev_n_prompts else prompt_file.prompts
    sample_prompts = [p for p in prompts for _ in range(settings.num_images_per_prompt)]
    n = len(sample_prompts)
    per_shard = settings.samples_per_shard
    shards = [Shard(i, start, min(start + per_shard, n)) for i, start in enumerate(range(0, n, per_shard))]
    return CapturePlan(
        prompt_file=prompt_file,
        sample_prompts=sample_prompts,
        seeds=settings.seed + np.arange(n, dtype=np.int64),
        images=[f"capture/images/{i:06d}.png" for i in range(n)],
        timesteps=scheduler_timesteps(config),
        n_channels=layer_width(config),
        n_features=sae_width(config),
        shards=shards,
    )


def generation_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The settings that decide what one sample's capture holds (model, layer, SAE, steps, guidance, size, branch).

    Part of the capture store's recorded `settings`; samples generated later (concept search) must match them.
    """
    return {
        "model": config.model.model_dump(mode="json"),
        "target_layer_name": config.target_layer_name,
        "sae": config.sae.model_dump(mode="json") if config.use_sae and config.sae else None,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "image_size": config.resolved_image_size,
        "branch": config.stages.capture.branch,
    }


def _settings(config: ExperimentConfig, plan: CapturePlan) -> dict[str, Any]:
    """Everything that decides the store's contents; a store is reused only when these match."""
    settings = config.stages.capture
    return {
        **generation_settings(config),
        "store_dtype": settings.store_dtype,
        "samples_per_shard": settings.samples_per_shard,
        "prompts_sha256": hashlib.sha256("\n".join(plan.sample_prompts).encode()).hexdigest(),
        "seeds_sha256": hashlib.sha256(plan.seeds.tobytes()).hexdigest(),
        "save_images": settings.save_images,
    }


def _clear(config: ExperimentConfig) -> None:
    layout = stores.ExperimentLayout(config.experiment_dir)
    for path in (layout.capture_store, layout.capture_shards, layout.capture_images):
        if path.exists():
            shutil.rmtree(path)


def prepare_store(config: ExperimentConfig, plan: CapturePlan) -> Path:
    """Create the capture store, or reuse one made with the same settings (so a rerun resumes)."""
    layout = stores.ExperimentLayout(config.experiment_dir)
    settings = _settings(config, plan)
    if layout.capture_store.exists():
        try:
            existing = json.loads(stores.open_store(layout.capture_store).attrs["settings"])
        except (KeyError, FileNotFoundError, ValueError):
            existing = None
        if existing == settings:
            return layout.capture_store
        if not config.stages.capture.overwrite:
            differing = sorted(k for k in settings if existing is None or existing.get(k) != settings[k])
            raise CaptureStoreMismatch(
                f"{layout.capture_store} was captured with other settings (differing: {', '.join(differing)}); "
                "use another experiment_name, or stages.capture.overwrite=true to replace it"
            )
        _clear(config)
    layout.capture_dir.mkdir(parents=True, exist_ok=True)
    stores.create_capture_store(
        layout.capture_store,
        prompts=plan.sample_prompts,
        seeds=plan.seeds,
        images=plan.images if config.stages.capture.save_images else [""] * plan.n_samples,
        timesteps=plan.timesteps,
        n_channels=plan.n_channels,
        n_features=plan.n_features,
        chunk_samples=config.stages.capture.samples_per_shard,
        dtype=config.stages.capture.store_dtype,
        attrs={
            "model": config.model.name,
            "layer": config.target_layer_name,
            "sae": config.sae.name if config.use_sae and config.sae else None,
            "sae_hookpoint": config.sae.hookpoint if config.use_sae and config.sae else None,
            "scheduler_steps": config.num_inference_steps,
            "unet_calls": len(plan.timesteps),
            "guidance_scale": config.guidance_scale,
            "branch": config.stages.capture.branch,
            "image_size": config.resolved_image_size,
            "n_prompts": len(set(plan.sample_prompts)),
            "num_images_per_prompt": config.stages.capture.num_images_per_prompt,
            "malformed_prompt_lines": [n for n, _ in plan.prompt_file.malformed],
            "settings": json.dumps(settings, sort_keys=True),
            "config": json.dumps(config.model_dump(mode="json"), default=str),
        },
    )
    return layout.capture_store


def pending_shards(config: ExperimentConfig, plan: CapturePlan) -> list[Shard]:
    done = stores.done_shards(stores.ExperimentLayout(config.experiment_dir).capture_shards)
    return [s for s in plan.shards if s.index not in done]


def generate(
    pipe: diffusers.StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    config: ExperimentConfig,
    output_type: str = "pil",
) -> Any:
    """One pipeline call; each sample draws its initial latent from its own seeded CPU generator."""
    size = config.resolved_image_size
    return pipe(
        prompt=prompts,
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        height=size,
        width=size,
        generator=[torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        output_type=output_type,
    )


def capture_batch(
    pipe: diffusers.StableDiffusionPipeline,
    prompts: list[str],
    seeds: list[int],
    config: ExperimentConfig,
    n_calls: int,
    sae: Any = None,
) -> tuple[list[Any], np.ndarray, np.ndarray | None, list[int]]:
    """Generate one batch with the capture hook: images, raw [B, calls, C], sae [B, calls, F], timesteps seen."""
    tracker = TimestepTracker()
    hook = CaptureHook(tracker, n_calls, cfg=config.guidance_scale > 1.0, branch=config.stages.capture.branch, sae=sae)
    with hooked(pipe.unet, config.target_layer_name, tracker, hook):
        images = generate(pipe, prompts, seeds, config).images
    raw, features = hook.result()
    return images, raw.numpy(), None if features is None else features.numpy(), list(tracker.timesteps)


def capture_shard(config: ExperimentConfig, shard: Shard) -> dict[str, Any]:
    """Capture one shard's samples into the store; a no-op when the shard is already complete.

    A shard found complete reports what its marker recorded: the flow only runs shards that were
    pending when it planned, so such a shard was captured by an earlier attempt of this task whose
    result was lost with its worker (a cancelled SLURM job), and its samples count for this run.
    """
    layout = stores.ExperimentLayout(config.experiment_dir)
    if stores.shard_done(layout.capture_shards, shard.index):
        return {**stores.shard_info(layout.capture_shards, shard.index), "skipped": True}
    group = stores.open_store(layout.capture_store, mode="r+")
    prompts = group["prompt"][shard.start : shard.stop].tolist()
    seeds = group["seed"][shard.start : shard.stop].tolist()
    planned = group["timestep"][:].tolist()
    pipe = load_pipeline(config)
    sae = load_experiment_sae(config)
    settings = config.stages.capture
    started = time.perf_counter()
    raws, codes = [], []
    n = shard.stop - shard.start
    n_batches = -(-n // settings.batch_size)
    for b, offset in enumerate(range(0, n, settings.batch_size)):
        batch = slice(offset, min(offset + settings.batch_size, n))
        images, raw, features, seen = capture_batch(pipe, prompts[batch], seeds[batch], config, len(planned), sae)
        if seen != planned:
            raise RuntimeError(f"shard {shard.index}: the UNet visited timesteps {seen}, the store expects {planned}")
        raws.append(raw)
        if features is not None:
            codes.append(features)
        if settings.save_images:
            layout.capture_images.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(layout.root / f"capture/images/{shard.start + offset + i:06d}.png")
        if (b + 1) % settings.log_every_n_steps == 0 or b + 1 == n_batches:
            log_progress(log, f"capture shard {shard.index}", batch.stop, n, "samples", started)
    stores.write_capture_rows(group, shard.start, np.concatenate(raws), np.concatenate(codes) if codes else None)
    seconds = time.perf_counter() - started
    info = {"shard": shard.index, "start": shard.start, "stop": shard.stop, "seconds": seconds, "samples": n}
    info["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")  # which SLURM job (if any) computed this shard
    stores.mark_shard_done(layout.capture_shards, shard.index, info)
    return {**info, "skipped": False}
