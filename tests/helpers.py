"""Test helpers that run or stand in for stages: an in-process capture, an independent reference capture,
and hand-made stores written as the stages lay them out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ddr.config import ExperimentConfig
from ddr.hooks import find_layer, output_tensor
from ddr.models.pipeline import load_pipeline
from ddr.stages import capture


def run_capture(config: ExperimentConfig) -> capture.CapturePlan:
    """The capture stage in-process: prepare the store and capture every shard not done yet."""
    plan = capture.plan_capture(config)
    capture.prepare_store(config, plan)
    for shard in capture.pending_shards(config, plan):
        capture.capture_shard(config, shard)
    return plan


def reference_capture(config: ExperimentConfig, prompt: str, seed: int) -> np.ndarray:
    """Independent reference: a plain forward hook on the layer, one sample, conditional half."""
    pipe = load_pipeline(config)
    rows: list[np.ndarray] = []

    def hook(_module: object, _args: object, output: object) -> None:
        activation = output_tensor(output)
        rows.append(activation[activation.shape[0] // 2 :].mean(dim=(2, 3))[0].detach().numpy().copy())

    handle = find_layer(pipe.unet, config.target_layer_name).register_forward_hook(hook)
    try:
        size = config.resolved_image_size
        with torch.no_grad():
            pipe(
                prompt=[prompt],
                num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale,
                height=size,
                width=size,
                generator=[torch.Generator().manual_seed(seed)],
                output_type="np",
            )
    finally:
        handle.remove()
    return np.stack(rows)


def write_zarr(ds: xr.Dataset, path: Path) -> None:
    """Write a hand-made store, replacing any there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: consolidated metadata is not in the v3 spec (yet)
        ds.to_zarr(path, mode="w")
