"""Prior throughput: channels per minute, batched across channels vs one channel per pipeline call.

Both modes run the real stage function (`prior_shard`: steered generation, VAE decode, PNGs,
Zarr writes) on the same model (loaded once), the same channels, seeds and steering schedule;
only `channels_per_batch` differs. The analysis store is synthetic (every channel active at
every timestep), since throughput does not depend on its values. Each repeat starts from an
empty prior store; the median over repeats is reported, plus the largest difference between
the two modes' latents (they must agree up to float rounding).

    python benchmarks/prior_throughput.py                        # tiny model on the CPU
    python benchmarks/prior_throughput.py --model sd14-random --steps 50 --channels 16 --channels-per-batch 8
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from ddr import stores
from ddr.config import ExperimentConfig, load_config
from ddr.models.pipeline import load_pipeline
from ddr.provision import provision
from ddr.stages import prior
from ddr.stages.capture import layer_width, scheduler_timesteps


def write_synthetic_analysis(config: ExperimentConfig, n_channels: int, total_timesteps: int = 1000) -> None:
    """Every channel active at every t; max activation ~1 (seeded), at the scheduler's calls."""
    timesteps = scheduler_timesteps(config)
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {
            "max_activation": (
                ("channel", "timestep"),
                rng.uniform(0.5, 1.5, (n_channels, len(timesteps))).astype(np.float32),
            ),
            "active": (("channel", "t"), np.ones((n_channels, total_timesteps + 1), dtype=bool)),
            "profile": (("channel", "t"), np.full((n_channels, total_timesteps + 1), 0.5)),
            "peak_t": (("channel", "peak"), np.full((n_channels, 3), 500, dtype=np.int64)),
        },
        coords={"channel": np.arange(n_channels), "timestep": timesteps, "t": np.arange(total_timesteps + 1)},
    )
    path = stores.ExperimentLayout(config.experiment_dir).analysis_store("raw")
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.to_zarr(path, mode="w")


def experiment(args: argparse.Namespace, name: str, per_batch: int) -> ExperimentConfig:
    overrides = [
        f"data_root={args.data_root}",
        f"experiment_name={name}",
        f"model={args.model}",
        "use_sae=false",
        f"num_inference_steps={args.steps}",
        f"stages.prior.n_results={args.n_results}",
        f"stages.prior.channels=[{','.join(str(c) for c in range(args.channels))}]",
        f"stages.prior.channels_per_batch={per_batch}",
        f"stages.prior.channels_per_shard={args.channels}",
        "stages.prior.log_every_n_steps=1000",
    ]
    if args.image_size:
        overrides.append(f"image_size={args.image_size}")
    if args.device:
        overrides.append(f"infrastructure.device={args.device}")
    return load_config(overrides)


def run_once(config: ExperimentConfig) -> tuple[float, np.ndarray]:
    """Seconds for the whole shard on a fresh store, and its latents."""
    shutil.rmtree(stores.ExperimentLayout(config.experiment_dir).prior_dir("raw"), ignore_errors=True)
    shards = prior.plan_prior(config, "raw")
    prior.prepare_prior_store(config, "raw")
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for shard in shards:
        prior.prior_shard(config, "raw", shard)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    group = stores.open_store(stores.ExperimentLayout(config.experiment_dir).prior_store("raw"))
    return seconds, group["latent"][:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (CPU) or sd14-random (a GPU)")
    parser.add_argument("--data-root", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--channels", type=int, default=24, help="channels generated per mode and repeat")
    parser.add_argument("--channels-per-batch", type=int, default=8, help="the batched mode's channels per call")
    parser.add_argument("--n-results", type=int, default=5, help="seeds per channel")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps")
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    temporary = args.data_root is None
    if temporary:
        args.data_root = Path(tempfile.mkdtemp(prefix="ddr-prior-bench-"))
    try:
        batched = experiment(args, "bench-batched", args.channels_per_batch)
        single = experiment(args, "bench-single", 1)
        provision(batched)
        width = layer_width(batched)
        if args.channels > width:
            parser.error(f"--channels {args.channels}: the layer has {width} channels")
        for config in (batched, single):
            write_synthetic_analysis(config, width)
        pipe = load_pipeline(batched)
        print(
            f"model={args.model} device={pipe.device} dtype={pipe.unet.dtype} image_size={batched.resolved_image_size} "
            f"steps={args.steps} channels={args.channels} n_results={args.n_results} "
            f"channels_per_batch={args.channels_per_batch} threads={torch.get_num_threads()}"
        )
        # warm-up: both batch shapes once (kernel selection, allocator), not timed
        warm = args.channels_per_batch
        for config, n in ((batched, warm), (single, 1)):
            directions = prior.steering_directions(config, "raw", list(range(n)), pipe.device, width)
            strengths = torch.ones(n, len(scheduler_timesteps(config)))
            reps = directions.repeat_interleave(args.n_results, 0), strengths.repeat_interleave(args.n_results, 0)
            prior.steered_latents(pipe, config, *reps, list(range(args.n_results)) * n)
        times: dict[str, list[float]] = {"batched": [], "single": []}
        latents: dict[str, np.ndarray] = {}
        for r in range(args.repeats):
            for name, config in (("batched", batched), ("single", single)):
                seconds, latents[name] = run_once(config)
                times[name].append(seconds)
                print(f"  repeat {r}: {name:8s} {seconds:7.2f} s  {60 * args.channels / seconds:8.1f} channels/min")
        rate = {name: 60 * args.channels / statistics.median(t) for name, t in times.items()}
        diff = float(np.abs(latents["batched"] - latents["single"]).max())
        print(f"one channel per call : {rate['single']:8.1f} channels/min (median of {args.repeats})")
        print(f"{args.channels_per_batch} channels per call  : {rate['batched']:8.1f} channels/min")
        print(f"ratio batched/single : {rate['batched'] / rate['single']:.2f}x")
        print(
            f"max |latent difference| between modes: {diff:.2e} (latent max |x| {np.abs(latents['single']).max():.1f})"
        )
    finally:
        if temporary:
            shutil.rmtree(args.data_root, ignore_errors=True)


if __name__ == "__main__":
    main()
