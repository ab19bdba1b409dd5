"""Parameterisations of the dreamed latent: what the optimiser changes, and how it becomes a latent.

As in Lucent, the optimiser works on parameters that `to_latents` maps (differentiably) onto
latents [B, c, h, w]:

- `PlainLatent` ("latent"): the latent itself; the gradient goes through the stage's spectral
  preconditioning and smoothing (`precondition` is True).
- `PhaseOnlyFourier` ("phase_fourier", MaCo: Fel et al. 2023, "Unlocking feature visualization
  for deeper networks with magnitude constrained optimization"): the phase of the latent's
  orthonormal 2-D real FFT; the magnitude stays fixed at the mean spectrum of real latents
  (`ddr.dream.sources.latent_spectrum`), so the dream keeps the spectral statistics of real
  latents and only the arrangement (phase) is optimised. No preconditioning (`precondition` is
  False): the magnitude already sets the spectrum.

The spectrum of a real latent is Hermitian, which constrains the half-spectrum `rfft2` returns:

- self-conjugate bins, (ky, kx) with ky in {0, h/2} and kx in {0, w/2} (halves only for even
  sizes), are real: the value there is `magnitude * sign`, the sign being that of `cos(phase)`
  (0 or pi from `init`, i.e. the starting latent's sign); it gets no gradient, so the phase
  cannot change the magnitude there;
- columns kx = 0 and kx = w/2 (even w) hold conjugate pairs ky, -ky; their phases are used
  antisymmetrised, `(phase[ky] - phase[-ky]) / 2`, so the pair stays conjugate (`irfft2` would
  otherwise average the pair and shrink it).

With these, `rfft2(to_latents(phase), norm="ortho").abs()` equals the magnitude for any phase.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from ddr.config import ConfigError

PARAMETERISATIONS = ("latent", "phase_fourier")
_SYMMETRY_TOLERANCE = 1e-3  # relative; a mean spectrum of real latents is symmetric up to rounding


class Parameterisation(Protocol):
    """Parameters <-> latents [B, c, h, w]; `precondition` says whether gradient preconditioning applies."""

    name: str
    precondition: bool

    def init(self, latents: Tensor) -> Tensor:
        """The parameters (a fresh float32 tensor, not requiring grad) that map onto `latents`."""
        ...

    def to_latents(self, params: Tensor) -> Tensor:
        """The latents [B, c, h, w] these parameters stand for (differentiable)."""
        ...


class PlainLatent:
    """The latent itself is optimised (the original's parameterisation)."""

    name = "latent"
    precondition = True

    def init(self, latents: Tensor) -> Tensor:
        _check_latents(latents)
        return latents.detach().to(torch.float32, copy=True)

    def to_latents(self, params: Tensor) -> Tensor:
        return params


class PhaseOnlyFourier:
    """Optimise the phase of the latent's spectrum; keep its magnitude at `magnitude` (module docstring).

    `magnitude` [c, h, w//2+1] is the mean |rfft2(latent, norm="ortho")| of real latents; `width`
    is the latent's w (default: square latents, w = h), needed because w//2+1 holds for two widths.
    The magnitude follows the phase's device.
    """

    name = "phase_fourier"
    precondition = False

    def __init__(self, magnitude: Tensor, width: int | None = None) -> None:
        if magnitude.ndim != 3:
            raise ValueError(
                f"magnitude: shape {tuple(magnitude.shape)} is not [latent_channel, h, w//2+1] "
                "(the mean |rfft2| of real latents, ddr.dream.sources.latent_spectrum)"
            )
        _, h, half = magnitude.shape
        width = h if width is None else width
        if width <= 0 or width // 2 + 1 != half:
            raise ValueError(
                f"magnitude: last dim {half} does not fit latent width {width} (needs w//2+1 = {width // 2 + 1}); "
                f"pass width= one of {2 * half - 2}, {2 * half - 1}"
            )
        magnitude = magnitude.detach().to(torch.float32)
        if not torch.isfinite(magnitude).all() or (magnitude < 0).any():
            raise ValueError("magnitude: must be finite and >= 0 (a mean magnitude spectrum)")
        self.height, self.width = h, width
        self._mirror = (-torch.arange(h)) % h  # row of -ky
        self._paired = torch.zeros(half, dtype=torch.bool)  # columns whose rows pair up as ky, -ky
        self._paired[0] = True
        if width % 2 == 0:
            self._paired[width // 2] = True
        rows = torch.zeros(h, dtype=torch.bool)
        rows[0] = True
        if h % 2 == 0:
            rows[h // 2] = True
        self._real = rows[:, None] & self._paired[None, :]  # self-conjugate bins [h, half]
        self.magnitude = self._symmetrised(magnitude)

    def _symmetrised(self, magnitude: Tensor) -> Tensor:
        """Average mirrored entries of the paired columns (rounding only; a real asymmetry is an error)."""
        mirrored = magnitude[:, self._mirror]
        gap = ((magnitude - mirrored).abs() * self._paired).amax()
        scale = magnitude.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
        if gap > _SYMMETRY_TOLERANCE * scale:
            raise ValueError(
                f"magnitude: columns kx=0 (and kx=w/2) differ between rows ky and -ky by up to {gap.item():.3g}; "
                "the spectrum of real latents is symmetric there (is the magnitude transposed or not from rfft2?)"
            )
        return torch.where(self._paired, (magnitude + mirrored) / 2, magnitude)

    @property
    def spectrum_shape(self) -> tuple[int, int, int]:
        return tuple(self.magnitude.shape)  # type: ignore[return-value]

    def init(self, latents: Tensor) -> Tensor:
        """The phase of `latents`' spectrum [B, c, h, w//2+1]: conjugate pairs exactly antisymmetric,
        self-conjugate bins exactly 0 or pi, so `to_latents` returns latents with this phase."""
        _check_latents(latents)
        expected = (self.spectrum_shape[0], self.height, self.width)
        if tuple(latents.shape[1:]) != expected:
            raise ValueError(f"latents: shape {tuple(latents.shape)} does not match the magnitude's [B, {expected}]")
        spectrum = torch.fft.rfft2(latents.detach().to(torch.float32), norm="ortho")
        phase = spectrum.angle()
        lower = (torch.arange(self.height) > self._mirror).to(latents.device)  # ky > -ky: the pair's second row
        paired = self._paired.to(latents.device)
        phase = torch.where(lower[:, None] & paired, -phase[..., self._mirror.to(latents.device), :], phase)
        signs = torch.where(spectrum.real < 0, math.pi, 0.0)
        return torch.where(self._real.to(latents.device), signs, phase)

    def to_latents(self, params: Tensor) -> Tensor:
        if params.ndim != 4 or tuple(params.shape[1:]) != self.spectrum_shape:
            raise ValueError(
                f"phase: shape {tuple(params.shape)} does not match the magnitude's [B, {self.spectrum_shape}]"
            )
        device = params.device
        if self.magnitude.device != device:
            self.magnitude = self.magnitude.to(device)
            self._mirror, self._paired, self._real = (x.to(device) for x in (self._mirror, self._paired, self._real))
        phase = params.to(torch.float32)
        phase = torch.where(self._paired, (phase - phase[..., self._mirror, :]) / 2, phase)
        sign = torch.where(torch.cos(params.detach()) < 0, -1.0, 1.0)
        real = self.magnitude * torch.where(self._real, sign, torch.cos(phase))
        imag = self.magnitude * torch.where(self._real, 0.0, torch.sin(phase))
        return torch.fft.irfft2(torch.complex(real, imag), s=(self.height, self.width), norm="ortho")


def _check_latents(latents: Tensor) -> None:
    if latents.ndim != 4:
        raise ValueError(f"latents: shape {tuple(latents.shape)} is not [batch, latent_channel, h, w]")


def make_parameterisation(name: str, magnitude: Tensor | None = None, *, width: int | None = None) -> Parameterisation:
    """The parameterisation called `name` ("latent" or "phase_fourier"; the latter needs `magnitude`)."""
    if name == "latent":
        return PlainLatent()
    if name == "phase_fourier":
        if magnitude is None:
            raise ConfigError(
                "parameterisation 'phase_fourier' needs the mean magnitude spectrum of real latents; get it with "
                "ddr.dream.sources.latent_spectrum(config, source='capture' or 'prior', kind, max_images)"
            )
        return PhaseOnlyFourier(magnitude, width)
    raise ConfigError(f"parameterisation: {name!r} is not known; allowed: {', '.join(PARAMETERISATIONS)}")
