"""Does the toy-shapes model draw what it is told? Caption agreement on captions it never saw in training.

    python benchmarks/toy_quality.py                          # the shipped assets/toy-shapes, 150 held-out samples
    python benchmarks/toy_quality.py --guidance 1,2,3,7.5 --per-caption 4 --grid /tmp/toy.png
    python benchmarks/toy_quality.py --model /path/to/pipeline --steps 50

For each of the 15 held-out captions ("a green circle on a red background", combinations of
shape, colour and background left out of training) it generates `--per-caption` images with
their own seeds and reads their colours back (`ddr.toy.shapes.read_colours`: background = the
commonest palette colour on the border, shape = the commonest other one). A sample agrees when
both colours are the caption's. Prints the fraction that agree (goal: >= 0.80), the background
and shape-colour fractions alone, and the same on as many training captions for comparison.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ddr.provision import REPO_ROOT
from ddr.toy import quality, shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "assets" / "toy-shapes"), help="pipeline folder")
    parser.add_argument("--per-caption", type=int, default=10, help="samples per held-out caption")
    parser.add_argument("--steps", type=int, default=20, help="num_inference_steps (PNDM)")
    parser.add_argument("--guidance", default="2", help="comma-separated guidance scales (the model's is 2)")
    parser.add_argument("--seed", type=int, default=1000, help="first sample seed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", default=None, help="write the held-out images of the first guidance here (PNG)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    captions, seeds = quality.heldout_plan(args.per_caption, args.seed)
    train = shapes.train_captions()
    rng = np.random.default_rng(args.seed)
    train_captions = [train[i] for i in rng.choice(len(train), size=len(captions), replace=True)]
    print(f"model {args.model}: {len(captions)} samples of {len(set(captions))} held-out captions, {args.steps} steps")
    for i, guidance in enumerate(float(g) for g in args.guidance.split(",")):
        started = time.perf_counter()
        held = quality.caption_agreement(pipe, captions, seeds, args.steps, guidance)
        seen = quality.caption_agreement(pipe, train_captions, seeds, args.steps, guidance)
        print(
            f"guidance {guidance:>4}: held-out caption agreement {held.fraction:.3f} "
            f"(background {held.background_fraction:.3f}, shape colour {held.shape_colour_fraction:.3f}); "
            f"training captions {seen.fraction:.3f}  [{time.perf_counter() - started:.0f}s]"
        )
        if i == 0 and args.grid:
            from PIL import Image

            grid = quality.image_grid(held.images, columns=args.per_caption)
            Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.grid)
            print(f"  held-out images (one row per caption): {args.grid}")


if __name__ == "__main__":
    main()
