"""Test helpers that run or stand in for stages: an in-process capture, an independent reference capture,
and hand-made stores written as the stages lay them out."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ddr import stores
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


def active_ranges(n: int, ranges: dict[int, tuple[int, int]], total_t: int) -> np.ndarray:
    """[n, total_t + 1] bool: channel c is active for t in ranges[c] (inclusive), nowhere else."""
    active = np.zeros((n, total_t + 1), dtype=bool)
    for channel, (lo, hi) in ranges.items():
        active[channel, lo : hi + 1] = True
    return active


def peak_table(n: int, peaks: dict[int, list[int]], width: int = 3) -> np.ndarray:
    """[n, width] int64 of each channel's peaks, highest first, -1 padded."""
    table = np.full((n, width), -1, dtype=np.int64)
    for channel, values in peaks.items():
        table[channel, : len(values)] = values
    return table


def write_analysis_store(
    config: ExperimentConfig,
    kind: str,
    *,
    calls: np.ndarray,
    max_activation: np.ndarray,
    active: np.ndarray,
    peak_t: np.ndarray,
    profile: np.ndarray | None = None,
) -> Path:
    """A hand-made `analysis/<kind>.zarr` with the arrays the later stages read, as DESIGN.md lays it out."""
    n, columns = active.shape
    data = {
        "max_activation": (("channel", "timestep"), max_activation),
        "active": (("channel", "t"), active),
        "peak_t": (("channel", "peak"), peak_t),
    }
    if profile is not None:
        data["profile"] = (("channel", "t"), profile)
    ds = xr.Dataset(
        data,
        coords={"channel": np.arange(n), "timestep": np.asarray(calls, dtype=np.int64), "t": np.arange(columns)},
    )
    path = stores.ExperimentLayout(config.experiment_dir).analysis_store(kind)
    write_zarr(ds, path)
    return path
