"""Loading the diffusers pipeline and the SAE once per worker process.

Every model source ends as a provisioned folder; this module turns it into a
`StableDiffusionPipeline` on the right device and dtype and keeps it for the life of the
process, so Dask tasks on the same worker share one loaded model.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from ddr.config import ExperimentConfig, InfrastructureConfig
from ddr.models.sae import SparseAutoencoder, load_sae
from ddr.provision import asset_dir, require

log = logging.getLogger(__name__)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(infra: InfrastructureConfig) -> torch.device:
    if infra.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("infrastructure.device is 'cuda' but no CUDA device is visible")
    if infra.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(infra.device)


def resolve_dtype(infra: InfrastructureConfig, device: torch.device) -> torch.dtype:
    """fp16 weights on a GPU (as SD is usually run), fp32 on the CPU, unless the config says otherwise."""
    if infra.precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[infra.precision]


@functools.cache
def _load_pipeline(model_dir: str, base_dir: str | None, device: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    folder = Path(model_dir)
    diffusers.utils.logging.disable_progress_bar()
    if (folder / "model_index.json").is_file():
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=dtype, safety_checker=None)
    elif base_dir is not None and (folder / "unet").is_dir():
        pipe = StableDiffusionPipeline.from_pretrained(base_dir, dtype=dtype, safety_checker=None)
        pipe.unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype)
    else:
        raise FileNotFoundError(
            f"{folder} holds neither a diffusers pipeline (model_index.json) nor a unet/ folder with a base_model"
        )
    pipe.set_progress_bar_config(disable=True)
    pipe.safety_checker = None
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log.info("loaded pipeline %s on %s (%s)", folder, device, dtype)
    return pipe.to(device)


def model_dir(config: ExperimentConfig) -> Path:
    return require(asset_dir(config, "models", config.model.name), f"model {config.model.name!r}")


def _model_json(config: ExperimentConfig, component: str, name: str) -> dict[str, Any]:
    """A component's config file, from the model folder or, for a bare UNet checkpoint, its base model's."""
    folder = model_dir(config)
    if not (folder / component).is_dir() and config.model.base_model:
        folder = asset_dir(config, "models", config.model.base_model)
    return json.loads((folder / component / name).read_text())


def latent_shape(config: ExperimentConfig) -> tuple[int, int, int]:
    """(latent channels, h, w) at the experiment's image size, from the model configs."""
    vae = _model_json(config, "vae", "config.json")
    unet = json.loads((model_dir(config) / "unet" / "config.json").read_text())
    side = config.resolved_image_size // 2 ** (len(vae["block_out_channels"]) - 1)
    return int(unet["in_channels"]), side, side


def num_train_timesteps(config: ExperimentConfig) -> int:
    """The scheduler's training timesteps (t ranges over 0..n-1), from its config; 1000 when unset."""
    return int(_model_json(config, "scheduler", "scheduler_config.json").get("num_train_timesteps", 1000))


def load_pipeline(config: ExperimentConfig) -> StableDiffusionPipeline:
    """The experiment's pipeline, loaded once per process and device."""
    device = resolve_device(config.infrastructure)
    base = config.model.base_model
    base_dir = str(require(asset_dir(config, "models", base), f"base model {base!r}")) if base else None
    return _load_pipeline(str(model_dir(config)), base_dir, str(device), resolve_dtype(config.infrastructure, device))


@functools.cache
def _load_sae(folder: str, hookpoint: str, device: str) -> SparseAutoencoder:
    return load_sae(folder, hookpoint=hookpoint, device=device).eval()


def load_experiment_sae(config: ExperimentConfig) -> SparseAutoencoder | None:
    """The configured SAE (fp32, on the pipeline's device), or None when `use_sae` is off."""
    if not config.use_sae or config.sae is None:
        return None
    folder = require(asset_dir(config, "saes", config.sae.name), f"SAE {config.sae.name!r}")
    device = resolve_device(config.infrastructure)
    return _load_sae(str(folder), config.sae.hookpoint, str(device))


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    """Final latents through the pipeline's VAE, `batch` at a time (bounds the decoder's memory)."""
    vae = pipe.vae
    for start in range(0, latents.shape[0], batch):
        chunk = latents[start : start + batch].to(pipe.device, vae.dtype) / vae.config.scaling_factor
        yield vae.decode(chunk, return_dict=False)[0]
