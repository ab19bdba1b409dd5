"""Heatmaps' cost: the targeted pass vs recording every sample's maps during capture.

Runs capture, timestep analysis and the heatmaps stage (raw channels, and SAE features with
--sae) on one model, then prints side by side:

- store size: `heatmaps/<kind>.zarr` on disk vs what the capture would have to hold to keep the
  map of every sample, UNet call and channel (samples x calls x width x y x x float32, computed,
  not written), with the capture store itself for scale;
- time: the targeted pass (regenerating only the top examples' samples) vs the capture, and how
  many samples each generated.

    python benchmarks/heatmaps_cost.py                                  # toy-shapes, guidance 2, CPU
    python benchmarks/heatmaps_cost.py --prompts 150 --sae
    python benchmarks/heatmaps_cost.py --model sd14-random --prompts 32 --steps 50 --guidance 7.5  # a GPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ddr import stores
from ddr.config import load_config
from ddr.provision import provision
from ddr.stages import analysis, capture, heatmaps


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-shapes")
    parser.add_argument("--prompts", type=int, default=60, help="prompts captured (one image each)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=16, help="capture batch and heatmaps samples_per_batch")
    parser.add_argument("--top-examples", type=int, default=4)
    parser.add_argument("--sae", action="store_true", help="also SAE features (toy-shapes-topk on toy-shapes)")
    parser.add_argument("--data-root", default=None, help="default: a temporary folder")
    args = parser.parse_args()

    data_root = args.data_root or tempfile.mkdtemp(prefix="ddr-bench-")
    overrides = [
        f"data_root={data_root}",
        f"model={args.model}",
        f"num_inference_steps={args.steps}",
        f"guidance_scale={args.guidance}",
        f"stages.capture.dev_n_prompts={args.prompts}",
        f"stages.capture.batch_size={args.batch}",
        f"stages.capture.samples_per_shard={args.batch}",
        "stages.timestep_analysis.top_k=8",
        f"stages.heatmaps.top_examples={args.top_examples}",
        f"stages.heatmaps.samples_per_batch={args.batch}",
        "stages.heatmaps.include_priors=false",
        "use_sae=true" if args.sae else "use_sae=false",
    ]
    if args.model == "toy-shapes":
        overrides += ["sae=toy-shapes-topk", "stages.capture.prompt_dataset=toy-shapes"]
    config = load_config(overrides)
    provision(config)
    layout = stores.ExperimentLayout(config.experiment_dir)

    plan = capture.plan_capture(config)
    capture.prepare_store(config, plan)
    capture.capture_shard(config, plan.shards[0])  # loads the model and warms up: not timed
    started = time.perf_counter()
    for shard in plan.shards[1:]:
        capture.capture_shard(config, shard)
    capture_s = (time.perf_counter() - started) * len(plan.shards) / max(len(plan.shards) - 1, 1)
    for kind in config.kinds:
        analysis.run_analysis(config, kind)

    print(f"model={args.model} steps={args.steps} guidance={args.guidance} samples={plan.n_samples}")
    print(f"capture: {capture_s:.1f} s for {plan.n_samples} samples (extrapolated from the timed shards)")
    print(f"capture store on disk: {disk_bytes(layout.capture_store) / 1e6:.2f} MB")
    header = f"{'kind':5}{'channels':>9}{'regenerated':>12}{'targeted s':>11}{'store MB':>10}{'all maps MB':>12}"
    print(header)
    for kind in config.kinds:
        started = time.perf_counter()
        result = heatmaps.run_heatmaps(config, kind)
        seconds = time.perf_counter() - started
        store = layout.heatmap_store(kind)
        group = stores.open_store(store)
        n_calls = len(plan.timesteps)
        width, (y, x) = group["channel"].shape[0], group["example_map"].shape[-2:]
        all_maps = plan.n_samples * n_calls * width * y * x * 4
        print(
            f"{kind:5}{result['channels_mapped']:>9}{result['samples_regenerated']:>12}{seconds:>11.1f}"
            f"{disk_bytes(store) / 1e6:>10.3f}{all_maps / 1e6:>12.2f}"
        )
    overlays = layout.heatmap_dir("raw") / "overlays"
    print(f"overlay PNGs (raw): {disk_bytes(overlays) / 1e6:.2f} MB in {len(list(overlays.glob('*.png')))} files")


if __name__ == "__main__":
    main()
