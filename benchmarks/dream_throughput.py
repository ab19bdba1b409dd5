"""Deep-dream throughput: targets optimised per minute, batched vs one target at a time, same model.

    python benchmarks/dream_throughput.py                        # tiny, CPU
    python benchmarks/dream_throughput.py --model sd14-random    # SD v1.4 architecture (a GPU is advised)

Both modes run the same optimiser (`ddr.dream.optimise.optimise`) on the same targets (raw
channels 0..N-1 of the target layer, timesteps cycling over 900/500/100), seeds and settings
(the config's deep-dream defaults: level_1 augmentation, see-through noise, spectral
preconditioning, smoothing, penalties) at a fixed step count. "One target at a time" is the
original's loop: one target's `n_results` samples per batch; "batched" packs
`targets_per_batch` targets x `n_results` samples into each batch. Repeats alternate the two
modes so machine noise hits both alike; the medians are reported, with the speed-up (goal on
tiny on a CPU: >= 3x), the largest difference between the two modes' final latents, and the
achieved TFLOP/s (FLOPs of one step's forward to the target layer and backward, counted by
`torch.utils.flop_counter`, times the steps, over the time).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from ddr.config import load_config
from ddr.dream.objectives import LayerActivation, autocast_dtype, empty_prompt_embedding, make_objective
from ddr.dream.optimise import DreamSettings, optimise
from ddr.models.pipeline import latent_shape, load_pipeline
from ddr.provision import provision
from ddr.stages.deep_dream import FP16_LOSS_SCALE, noise_latents, sample_seed

TIMESTEPS = (900, 500, 100)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_flops(fn: LayerActivation, latents: torch.Tensor, timesteps: torch.Tensor) -> int:
    """FLOPs of one optimisation step's forward (stopped at the layer) and backward to the latent."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddr.dream.objectives import frozen

    with frozen(*fn.modules), FlopCounterMode(display=False) as counter:
        z = latents.detach().clone().requires_grad_(True)
        fn(z, timesteps).sum().backward()
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=10, help="optimisation steps per target")
    parser.add_argument("--targets", type=int, default=16)
    parser.add_argument("--results", type=int, default=2, help="n_results: samples per target")
    parser.add_argument("--targets-per-batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-root", default=None, help="default: a temporary folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data_root = args.data_root or tempfile.mkdtemp(prefix="ddr-bench-")
    overrides = [f"data_root={data_root}", f"model={args.model}", "use_sae=false"]
    if args.image_size:
        overrides.append(f"image_size={args.image_size}")
    config = load_config(overrides)
    provision(config)
    pipe = load_pipeline(config)
    device = pipe.device
    amp = autocast_dtype(device, config.infrastructure.precision)
    fn = LayerActivation(pipe.unet, config.target_layer_name, make_objective("raw"), empty_prompt_embedding(pipe), amp)
    dream_config = config.stages.deep_dream
    settings = DreamSettings.from_config(
        dream_config,
        num_steps=args.steps,
        loss_scale=FP16_LOSS_SCALE if amp == torch.float16 else 1.0,
    )
    seeds = dream_config.seeds[: args.results]
    shape = latent_shape(config)
    targets = [(c, TIMESTEPS[c % len(TIMESTEPS)]) for c in range(args.targets)]

    def run(per_batch: int) -> torch.Tensor:
        finals = []
        for start in range(0, len(targets), per_batch):
            batch = targets[start : start + per_batch]
            result = optimise(
                fn,
                noise_latents(seeds * len(batch), shape).to(device),
                [c for c, _ in batch for _ in seeds],
                [t for _, t in batch for _ in seeds],
                [sample_seed(s, c, t) for c, t in batch for s in seeds],
                settings,
                add_noise=pipe.scheduler.add_noise,
            )
            finals.append(result.latents)
        return torch.cat(finals)

    modes: dict[str, int] = {"one at a time": 1, "batched": args.targets_per_batch}
    run(args.targets_per_batch)  # warm-up (allocator, kernels, autotuning)
    times: dict[str, list[float]] = {name: [] for name in modes}
    latents: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name, per_batch in modes.items():
            _sync(device)
            start = time.perf_counter()
            latents[name] = run(per_batch)
            _sync(device)
            times[name].append(time.perf_counter() - start)

    flops: dict[str, int] = {}
    for name, per_batch in modes.items():
        t = torch.tensor([t for _, t in targets[:per_batch] for _ in seeds], device=device)
        flops[name] = step_flops(fn, noise_latents(seeds * per_batch, shape).to(device), t)
    precision = str(amp).removeprefix("torch.") if amp else "fp32"
    print(
        f"model={args.model} device={device} precision={precision} threads={torch.get_num_threads()} "
        f"latent={tuple(shape)} layer={config.target_layer_name}"
    )
    print(
        f"targets={args.targets} n_results={len(seeds)} steps={args.steps} "
        f"targets_per_batch={args.targets_per_batch} repeats={args.repeats}"
    )
    print(f"{'mode':16}{'batch':>7}{'median s':>10}{'min s':>10}{'targets/min':>13}{'TFLOP/s':>10}")
    rates: dict[str, float] = {}
    for name, per_batch in modes.items():
        median = statistics.median(times[name])
        rates[name] = 60 * len(targets) / median
        n_batches = -(-len(targets) // per_batch)
        total_flops = flops[name] * args.steps * n_batches  # last batch may be smaller: an upper bound
        tflops = total_flops / median / 1e12
        print(
            f"{name:16}{per_batch * len(seeds):>7}{median:10.3f}{min(times[name]):10.3f}"
            f"{rates[name]:13.1f}{tflops:10.4f}"
        )
    print(f"speed-up batched / one at a time: {rates['batched'] / rates['one at a time']:.2f}x")
    diff = (latents["batched"] - latents["one at a time"]).abs().max().item()
    print(f"max |final latent difference| between the modes: {diff:.2e}")


if __name__ == "__main__":
    main()
