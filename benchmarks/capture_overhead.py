"""Capture vs plain diffusers generation: same model (loaded once), prompts, seeds and steps.

    python benchmarks/capture_overhead.py                       # tiny, 20 steps, CPU
    python benchmarks/capture_overhead.py --model sd14-random   # SD v1.4 architecture (a GPU is advised)

Prints the median time of each over several repeats, alternating the two so machine noise
hits both alike, and the ratio capture / plain (goal: <= 1.10 on tiny at 20 steps).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from ddr.config import load_config
from ddr.models.pipeline import load_experiment_sae, load_pipeline
from ddr.provision import provision
from ddr.stages import capture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sae", action="store_true", help="also encode with the SAE (tiny-topk on tiny)")
    parser.add_argument("--data-root", default=None, help="default: a temporary folder")
    args = parser.parse_args()

    data_root = args.data_root or tempfile.mkdtemp(prefix="ddr-bench-")
    overrides = [f"data_root={data_root}", f"model={args.model}", f"num_inference_steps={args.steps}"]
    overrides.append("use_sae=true" if args.sae else "use_sae=false")
    config = load_config(overrides)
    provision(config)
    pipe = load_pipeline(config)
    sae = load_experiment_sae(config)
    prompts = capture.load_dataset(config).prompts[: args.batch]
    seeds = list(range(len(prompts)))
    n_calls = len(capture.plan_capture(config).timesteps)

    def plain() -> None:
        capture.generate(pipe, prompts, seeds, config, output_type="pil")

    def captured() -> None:
        capture.capture_batch(pipe, prompts, seeds, config, n_calls, sae)

    plain()
    captured()
    times: dict[str, list[float]] = {"plain": [], "capture": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("capture", captured)):
            if pipe.device.type == "cuda":
                import torch

                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if pipe.device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    plain_s, capture_s = statistics.median(times["plain"]), statistics.median(times["capture"])
    print(f"model={args.model} device={pipe.device} steps={args.steps} batch={len(prompts)} sae={bool(sae)}")
    print(f"{'':10}{'median s':>10}{'min s':>10}")
    for name in ("plain", "capture"):
        print(f"{name:10}{statistics.median(times[name]):10.3f}{min(times[name]):10.3f}")
    print(f"ratio capture/plain (median): {capture_s / plain_s:.3f}")


if __name__ == "__main__":
    main()
