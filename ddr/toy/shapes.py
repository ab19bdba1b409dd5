"""A generated dataset of small captioned images of simple shapes ("a red circle on a blue background").

Everything is a pure function of a seed: the held-out captions (combinations of shape, colour
and background never shown in training), the training samples (attributes drawn from the
training captions, with the shape's position and size jittered), and the rendered pixels
(4x supersampled coverage, so edges are anti-aliased but colours stay flat). The colours are
far apart so a generated image's colours can be read back by nearest palette colour
(`classify_colours`), which is how the toy model's quality is measured.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross", "stripes")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 235),
    "yellow": (245, 220, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
HELDOUT_FRACTION = 0.1
SPLIT_SEED = 0
SUPERSAMPLE = 4
# Shape centre and half-size ranges in pixels: the shape never reaches the image border.
CENTRE_RANGE = (12.0, 20.0)
SIZE_RANGE = (7.0, 11.0)


@dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


@dataclass(frozen=True)
class Sample:
    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    size: float

    @property
    def attributes(self) -> Attributes:
        return Attributes(self.shape, self.colour, self.background)

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    """The caption of one combination: "a red circle on a blue background", "red stripes on a ..."."""
    thing = f"{colour} {shape}" if shape == "stripes" else f"a {colour} {shape}"
    return f"{thing} on a {background} background"


def all_attributes() -> list[Attributes]:
    """Every combination of shape, colour and a different background colour, in a fixed order."""
    return [Attributes(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]


def parse_caption(text: str) -> Attributes:
    """The attributes a caption names (the inverse of `caption`)."""
    by_caption = {a.caption: a for a in all_attributes()}
    if text not in by_caption:
        raise ValueError(f"{text!r} is not a toy-shapes caption")
    return by_caption[text]


def vocabulary() -> list[str]:
    """Every word a caption can hold."""
    return sorted({word for a in all_attributes() for word in a.caption.split()})


def split_attributes(
    seed: int = SPLIT_SEED, fraction: float = HELDOUT_FRACTION
) -> tuple[list[Attributes], list[Attributes]]:
    """(train, held-out) combinations; every shape, colour and background still occurs in training."""
    combos = all_attributes()
    rng = np.random.default_rng(seed)
    n_heldout = max(1, round(fraction * len(combos)))
    while True:
        order = rng.permutation(len(combos))
        heldout = sorted(int(i) for i in order[:n_heldout])
        train = [c for i, c in enumerate(combos) if i not in set(heldout)]
        seen = (
            {a.shape for a in train} == set(SHAPES)
            and {a.colour for a in train} == set(COLOURS)
            and {a.background for a in train} == set(COLOURS)
        )
        if seen:
            return train, [combos[i] for i in heldout]


def heldout_captions(seed: int = SPLIT_SEED) -> list[str]:
    return [a.caption for a in split_attributes(seed)[1]]


def train_captions(seed: int = SPLIT_SEED) -> list[str]:
    return [a.caption for a in split_attributes(seed)[0]]


def draw_samples(n: int, seed: int, attributes: list[Attributes] | None = None) -> list[Sample]:
    """n samples: attributes cycle through a seeded shuffle of `attributes` (default: the training ones),
    so every combination occurs equally often; position and size are drawn uniformly."""
    attributes = attributes if attributes is not None else split_attributes()[0]
    rng = np.random.default_rng(seed)
    samples = []
    order: list[int] = []
    for _ in range(n):
        if not order:
            order = [int(i) for i in rng.permutation(len(attributes))]
        a = attributes[order.pop()]
        cx, cy = rng.uniform(*CENTRE_RANGE, size=2)
        size = rng.uniform(*SIZE_RANGE)
        samples.append(Sample(a.shape, a.colour, a.background, float(cx), float(cy), float(size)))
    return samples


def shape_mask(sample: Sample, image_size: int = IMAGE_SIZE, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel the shape covers, [H, W] float32 in [0, 1]."""
    n = image_size * supersample
    coords = (np.arange(n, dtype=np.float64) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy, s = x - sample.cx, y - sample.cy, sample.size
    if sample.shape == "circle":
        inside = dx**2 + dy**2 <= s**2
    elif sample.shape == "square":
        inside = (np.abs(dx) <= 0.85 * s) & (np.abs(dy) <= 0.85 * s)
    elif sample.shape == "triangle":
        # Pointing up: apex at (cx, cy - s), base at cy + 0.8 s from cx - s to cx + s.
        t = (dy + s) / (1.8 * s)
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * s)
    elif sample.shape == "cross":
        arm = 0.3 * s
        inside = ((np.abs(dx) <= arm) & (np.abs(dy) <= s)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= s))
    elif sample.shape == "stripes":
        # Three horizontal bars in a square; the middle bar is centred on (cx, cy).
        period = 2 * s / 2.5
        phase = (dy / period + 0.25) % 1.0
        inside = (np.abs(dx) <= s) & (np.abs(dy) <= 1.25 * period) & (phase < 0.5)
    else:
        raise ValueError(f"unknown shape {sample.shape!r}; allowed: {', '.join(SHAPES)}")
    return inside.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3)).astype(np.float32)


def render(sample: Sample, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The sample's image, [H, W, 3] uint8."""
    mask = shape_mask(sample, image_size)[..., None]
    fg = np.array(COLOURS[sample.colour], dtype=np.float32)
    bg = np.array(COLOURS[sample.background], dtype=np.float32)
    return np.round(mask * fg + (1 - mask) * bg).astype(np.uint8)


def make_dataset(n: int, seed: int, attributes: list[Attributes] | None = None) -> tuple[np.ndarray, list[Sample]]:
    """n rendered samples ([n, H, W, 3] uint8) and their attributes; deterministic from the seed."""
    samples = draw_samples(n, seed, attributes)
    images = np.stack([render(s) for s in samples]) if samples else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return images, samples


def write_prompt_file(path: str | Path, captions: Iterable[str] | None = None) -> Path:
    """A plain-text prompt file, one caption per line (the capture stage's format).

    By default every caption: the training ones and the held-out ones (`heldout_captions`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = sorted(captions if captions is not None else (a.caption for a in all_attributes()))
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def classify_colours(image: np.ndarray, tolerance: float = 80.0) -> np.ndarray:
    """Each pixel's nearest palette colour as an index into `COLOURS` ([H, W] int), or -1 where the
    pixel is farther than `tolerance` (RGB distance) from every palette colour (e.g. a blended edge)."""
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    distance = np.sqrt(((image.astype(np.float32)[..., None, :] - palette) ** 2).sum(-1))
    labels = distance.argmin(-1)
    labels[distance.min(-1) > tolerance] = -1
    return labels


def read_colours(image: np.ndarray, border: int = 2) -> tuple[str, str]:
    """(shape colour, background colour) of an image, as `COLOURS` names ("" when none is found).

    The background is the most common palette colour on a `border`-pixel frame; the shape's
    is the most common one of the other pixels inside the frame. Pixels far from every palette
    colour are not counted.
    """
    labels = classify_colours(image)
    names = list(COLOURS)
    frame = np.ones(labels.shape, dtype=bool)
    frame[border:-border, border:-border] = False
    on_frame = labels[frame]
    on_frame = on_frame[on_frame >= 0]
    if on_frame.size == 0:
        return "", ""
    background = int(np.bincount(on_frame, minlength=len(names)).argmax())
    inner = labels[~frame]
    rest = inner[(inner != background) & (inner >= 0)]
    if rest.size == 0:
        return "", names[background]
    return names[int(np.bincount(rest, minlength=len(names)).argmax())], names[background]
