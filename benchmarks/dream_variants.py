"""Deep-dream variants on toy-shapes raw channels: diversity, accentuation within a ball, the negative view.

    python benchmarks/dream_variants.py
    python benchmarks/dream_variants.py --channels 8 --results 4 --steps 50 --t 300

Every run optimises the same targets (raw channels 0..N-1 of up_blocks.1.attentions.1 at t) with
the deep-dream stage's settings (`DreamSettings.from_config`: level_1 augmentation, see-through
noise, spectral preconditioning, smoothing, penalties) unless a row says otherwise, n results per
target with the stage's seeds (`sample_seed`). Printed:

- diversity: the mean over targets of the mean pairwise cosine of the final results' Gram
  matrices (`diversity`, what the store records), and the mean final activation, for penalty
  weights 0 / 10 / 100, with the stage's augmentation (level_1) and without it (level_0);
- accentuation: starts are toy-shapes dataset images (`ddr.toy.shapes.make_dataset`, the k-th
  image for result k) encoded by the VAE (`ddr.dream.sources.encode_images`); for each
  `seed_distance_max` radius (none = unconstrained) the largest and mean final L2 distance to the
  start latent, and the mean activation at the start and at the end;
- negative view: the mean final activation when maximising and when minimising from noise.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from PIL import Image

from ddr.config import load_config
from ddr.dream.objectives import LayerActivation, empty_prompt_embedding, make_objective
from ddr.dream.optimise import DreamResult, DreamSettings, optimise
from ddr.dream.sources import encode_images
from ddr.models.pipeline import latent_shape, load_pipeline
from ddr.provision import provision
from ddr.stages.deep_dream import noise_latents, sample_seed
from ddr.toy.shapes import make_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--results", type=int, default=4, help="n_results per target")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--t", type=int, default=500)
    parser.add_argument("--radii", default="1,2,4", help="seed_distance_max values (comma-separated)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = ["model=toy-shapes", "use_sae=false", "guidance_scale=2"]
    config = load_config([f"data_root={tempfile.mkdtemp(prefix='ddr-variants-')}", *base])
    provision(config)
    pipe = load_pipeline(config)
    fn = LayerActivation(pipe.unet, config.target_layer_name, make_objective("raw"), empty_prompt_embedding(pipe))
    dream_config = config.stages.deep_dream
    seeds = dream_config.seeds[: args.results]
    if len(seeds) < args.results:
        seeds = [*seeds, *range(len(seeds), args.results)]
    targets = [(c, args.t) for c in range(args.channels)]
    channels = [c for c, _ in targets for _ in seeds]
    timesteps = [t for _, t in targets for _ in seeds]
    sample_seeds = [sample_seed(s, c, t) for c, t in targets for s in seeds]
    groups = [j for j in range(len(targets)) for _ in seeds]

    def run(init: torch.Tensor, robustness: str = "level_1", **overrides: object) -> DreamResult:
        settings_config = load_config([*base, f"robustness={robustness}"]).stages.deep_dream
        settings = DreamSettings.from_config(settings_config, num_steps=args.steps, **overrides)
        return optimise(
            fn, init, channels, timesteps, sample_seeds, settings, add_noise=pipe.scheduler.add_noise, groups=groups
        )

    noise = noise_latents(seeds * len(targets), latent_shape(config))
    print(
        f"toy-shapes raw channels 0..{args.channels - 1} at t={args.t}, {args.results} results each, "
        f"{args.steps} steps, stage settings"
    )
    print("\ndiversity (mean pairwise Gram cosine of the final results; lower = more diverse)")
    print(f"{'augmentation':>14}{'weight':>8}{'diversity':>11}{'activation':>12}")
    for robustness in ("level_1", "level_0"):
        for weight in (0.0, 10.0, 100.0):
            result = run(noise, robustness, diversity_weight=weight)
            print(
                f"{robustness:>14}{weight:8g}{result.diversity.nanmean().item():11.4f}"
                f"{result.activation.mean().item():12.4f}"
            )

    images, _ = make_dataset(args.results, seed=0)
    starts = encode_images(pipe, [Image.fromarray(image) for image in images], size=config.resolved_image_size)
    starts = starts.repeat(len(targets), 1, 1, 1).cpu()
    with torch.no_grad():
        start_activation = fn(starts, torch.as_tensor(timesteps)).gather(1, torch.tensor(channels)[:, None]).mean()
    print(f"\naccentuation from {args.results} dataset images (mean activation at the start {start_activation:.4f})")
    print(f"{'radius':>8}{'max distance':>14}{'mean distance':>15}{'activation':>12}")
    for radius in [None, *(float(r) for r in args.radii.split(","))]:
        result = run(starts, seed_distance_max=radius)
        label = "none" if radius is None else f"{radius:g}"
        print(
            f"{label:>8}{result.seed_distance.max().item():14.4f}{result.seed_distance.mean().item():15.4f}"
            f"{result.activation.mean().item():12.4f}"
        )

    up, down = run(noise), run(noise, negative=True)
    print(
        f"\nnegative view from noise: mean final activation maximised {up.activation.mean().item():.4f}, "
        f"minimised {down.activation.mean().item():.4f}"
    )


if __name__ == "__main__":
    main()
