"""Does the toy model draw what it is told? Caption agreement of generated images.

An image agrees with its caption when the colours read back from it (`shapes.read_colours`:
the background is the commonest palette colour on the border, the shape's the commonest of
the other pixels) are the caption's shape colour and background colour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from ddr.toy import shapes


@dataclass
class Agreement:
    captions: list[str]
    read: list[tuple[str, str]]
    images: np.ndarray = field(repr=False)

    @property
    def matches(self) -> list[bool]:
        out = []
        for text, (colour, background) in zip(self.captions, self.read, strict=True):
            want = shapes.parse_caption(text)
            out.append(colour == want.colour and background == want.background)
        return out

    @property
    def fraction(self) -> float:
        return float(np.mean(self.matches)) if self.captions else float("nan")

    @property
    def background_fraction(self) -> float:
        return float(
            np.mean([r[1] == shapes.parse_caption(c).background for c, r in zip(self.captions, self.read, strict=True)])
        )

    @property
    def shape_colour_fraction(self) -> float:
        return float(
            np.mean([r[0] == shapes.parse_caption(c).colour for c, r in zip(self.captions, self.read, strict=True)])
        )


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    captions: list[str],
    seeds: list[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    batch_size: int = 16,
) -> np.ndarray:
    """Images [N, H, W, 3] uint8, sample i from `torch.Generator().manual_seed(seeds[i])`."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = []
    for start in range(0, len(captions), batch_size):
        batch = slice(start, start + batch_size)
        result = pipe(
            prompt=captions[batch],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(int(s)) for s in seeds[batch]],
            output_type="np",
        )
        out.append(np.round(result.images * 255).clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def caption_agreement(
    pipe: StableDiffusionPipeline,
    captions: list[str],
    seeds: list[int],
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
) -> Agreement:
    images = generate(pipe, captions, seeds, num_inference_steps, guidance_scale)
    return Agreement(captions=list(captions), read=[shapes.read_colours(im) for im in images], images=images)


def heldout_plan(n_per_caption: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Every held-out caption `n_per_caption` times, each with its own seed."""
    captions = [c for c in shapes.heldout_captions() for _ in range(n_per_caption)]
    return captions, [seed + i for i in range(len(captions))]


def image_grid(images: np.ndarray, columns: int = 8) -> np.ndarray:
    rows = -(-len(images) // columns)
    padded = np.zeros((rows * columns, *images.shape[1:]), dtype=images.dtype)
    padded[: len(images)] = images
    return np.concatenate([np.concatenate(list(padded[r * columns : (r + 1) * columns]), axis=1) for r in range(rows)])
