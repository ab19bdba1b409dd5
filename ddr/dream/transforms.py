"""Augmentations of the latent before the forward pass, and transforms of its gradient.

Every random draw comes from the sample's own `torch.Generator`, in a fixed order per step
(jitter rows, jitter columns, angle, scale, then the scheduler noise), so a sample's draws do
not depend on which batch it is in (the original drew once per step for the whole batch with
Python's `random`).

- jitter: `torch.roll(x, shifts=(dy, dx), dims=(2, 3))` with dy, dx uniform integers in
  [-jitter_max, jitter_max] (the original's `randint(-j, j)`, inclusive).
- rotation and scale: angle ~ U(-rotate_max, rotate_max) degrees, scale ~ U(1, scale_max),
  an affine resampling about the centre (bilinear, zeros outside), as `TF.affine` with no
  translation or shear; applied only when rotate_max > 0 or scale_max != 1, so level_0 is the
  identity.
- spectral preconditioning of the gradient: `g' = real(ifft2(fft2(g) * s))` with
  `s = ifftshift(1 / (sqrt(X^2 + Y^2) + 1))`, `X = arange(W) - W//2`, `Y = arange(H) - H//2`,
  then `g' * std(g) / (std(g') + 1e-8)`, per sample (the original renormalised over the batch).
- Gaussian smoothing of the gradient: kernel `kernel_size` (odd), sigma scheduled linearly
  `sigma = start + step / max(num_steps - 1, 1) * (end - start)`; sigma 0 is the identity. The
  kernel is torchvision's (`linspace(-k//2, k//2, k)`, normalised to sum 1), reflect padding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SPECTRAL_EPS = 1e-8


# --- gradient transforms ------------------------------------------------------------------------


def spectral_scale(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """[H, W] factors 1/(|f| + 1) in `fft2`'s layout (zero frequency at [0, 0])."""
    y = torch.arange(height, dtype=torch.float32, device=device) - height // 2
    x = torch.arange(width, dtype=torch.float32, device=device) - width // 2
    radius = torch.sqrt(y[:, None] ** 2 + x[None, :] ** 2)
    return torch.fft.ifftshift(1.0 / (radius + 1.0))


def precondition_spectral(grad: Tensor, scale: Tensor | None = None) -> Tensor:
    """Scale each spatial frequency of the gradient by 1/(|f| + 1), then restore each sample's std."""
    if scale is None:
        scale = spectral_scale(grad.shape[-2], grad.shape[-1], grad.device)
    g = grad.float()
    filtered = torch.fft.ifft2(torch.fft.fft2(g) * scale).real
    std = g.flatten(1).std(1)
    new_std = filtered.flatten(1).std(1)
    ratio = (std / (new_std + SPECTRAL_EPS)).view(-1, *([1] * (g.ndim - 1)))
    return (filtered * ratio).to(grad.dtype)


class SpectralPreconditioner:
    """`precondition_spectral` with the scale computed once per latent size and device."""

    def __init__(self) -> None:
        self._scales: dict[tuple[int, int, str], Tensor] = {}

    def __call__(self, grad: Tensor) -> Tensor:
        key = (grad.shape[-2], grad.shape[-1], str(grad.device))
        if key not in self._scales:
            self._scales[key] = spectral_scale(key[0], key[1], grad.device)
        return precondition_spectral(grad, self._scales[key])


def scheduled_sigma(step: int, num_steps: int, start: float, end: float) -> float:
    """The smoothing sigma at `step`: linear from `start` (step 0) to `end` (the last step)."""
    return start + step / max(num_steps - 1, 1) * (end - start)


def gaussian_kernel1d(kernel_size: int, sigma: float) -> Tensor:
    """torchvision's 1-D Gaussian kernel: samples at linspace(-k//2, k//2, k), normalised to sum 1."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).float()


def gaussian_blur(x: Tensor, kernel_size: int, sigma: float) -> Tensor:
    """Separable Gaussian blur of every channel of [B, C, H, W]; sigma <= 0 returns `x` unchanged."""
    if sigma <= 0 or kernel_size == 1:
        return x
    b, c, h, w = x.shape
    kernel = gaussian_kernel1d(kernel_size, sigma).to(x.device, torch.float32)
    pad = kernel_size // 2
    planes = x.float().reshape(b * c, 1, h, w)
    mode = "reflect" if pad < min(h, w) else "replicate"
    planes = F.pad(planes, (pad, pad, pad, pad), mode=mode)
    planes = F.conv2d(planes, kernel.view(1, 1, 1, -1))
    planes = F.conv2d(planes, kernel.view(1, 1, -1, 1))
    return planes.reshape(b, c, h, w).to(x.dtype)


@dataclass(frozen=True)
class GradientSmoother:
    """Gaussian smoothing of the gradient with a sigma scheduled over the steps."""

    kernel_size: int = 9
    sigma_start: float = 0.0
    sigma_end: float = 0.0
    num_steps: int = 1

    def sigma(self, step: int) -> float:
        return scheduled_sigma(step, self.num_steps, self.sigma_start, self.sigma_end)

    def __call__(self, grad: Tensor, step: int) -> Tensor:
        return gaussian_blur(grad, self.kernel_size, self.sigma(step))


# --- augmentation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentationDraw:
    """One step's augmentation parameters, one row per sample (CPU tensors)."""

    shifts: Tensor  # [B, 2] int64: (rows, columns) rolled
    angles: Tensor  # [B] float64, degrees
    scales: Tensor  # [B] float64


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


@dataclass(frozen=True)
class Augmenter:
    """Jitter, rotation and scale of the latent, each sample its own draws."""

    jitter_max: int = 0
    rotate_max: float = 0.0
    scale_max: float = 1.0

    @property
    def affine(self) -> bool:
        return self.rotate_max > 0 or self.scale_max != 1.0

    @property
    def identity(self) -> bool:
        return self.jitter_max == 0 and not self.affine

    def draw(self, generators: Sequence[torch.Generator]) -> AugmentationDraw:
        """This step's parameters: per sample, jitter (rows, columns), then angle, then scale."""
        n = len(generators)
        shifts = torch.zeros(n, 2, dtype=torch.int64)
        angles = torch.zeros(n, dtype=torch.float64)
        scales = torch.ones(n, dtype=torch.float64)
        for i, gen in enumerate(generators):
            if self.jitter_max > 0:
                shifts[i] = torch.randint(-self.jitter_max, self.jitter_max + 1, (2,), generator=gen)
            if self.affine:
                angles[i] = _uniform(gen, -self.rotate_max, self.rotate_max)
                scales[i] = _uniform(gen, 1.0, self.scale_max)
        return AugmentationDraw(shifts, angles, scales)

    def apply(self, x: Tensor, draw: AugmentationDraw) -> Tensor:
        if self.jitter_max > 0:
            x = roll_per_sample(x, draw.shifts)
        if self.affine:
            x = affine_per_sample(x, draw.angles, draw.scales)
        return x

    def __call__(self, x: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        return x if self.identity else self.apply(x, self.draw(generators))


def roll_per_sample(x: Tensor, shifts: Tensor) -> Tensor:
    """`torch.roll(x[i], shifts=tuple(shifts[i]), dims=(1, 2))` for every sample, as two gathers."""
    b, c, h, w = x.shape
    shifts = shifts.to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] - shifts[:, 0:1]) % h  # [B, H]
    cols = (torch.arange(w, device=x.device)[None, :] - shifts[:, 1:2]) % w  # [B, W]
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def affine_per_sample(x: Tensor, angles: Tensor, scales: Tensor) -> Tensor:
    """Rotate by `angles` degrees and zoom by `scales` about the centre: bilinear, zeros outside."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    radians = angles.double() * (math.pi / 180.0)
    cos, sin = torch.cos(radians) / scales.double(), torch.sin(radians) / scales.double()
    # Output pixel p (relative to the centre) reads input pixel R(-angle) p / scale; in normalised
    # coordinates (x, y) the off-diagonal terms carry the aspect ratio.
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = -sin * w / h, cos
    grid = F.affine_grid(theta.to(x.device, torch.float32), [b, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def draw_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """[B, *shape] standard normal noise on the CPU, row i from generator i."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
