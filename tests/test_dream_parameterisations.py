"""Parameterisations of the dreamed latent: the plain latent, and phase-only Fourier keeping the magnitude exactly."""

from __future__ import annotations

import math

import pytest
import torch

from ddr.config import ConfigError
from ddr.dream.parameterisations import PhaseOnlyFourier, PlainLatent, make_parameterisation

SHAPES = [(4, 4), (5, 6), (8, 8), (7, 7), (6, 5), (1, 4)]


def spectrum(latents: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfft2(latents, norm="ortho")


def mean_magnitude(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """The mean |rfft2| of a few random real latents [2, h, w]."""
    latents = torch.randn((6, 2, h, w), generator=torch.Generator().manual_seed(seed))
    return spectrum(latents).abs().mean(0)


def test_plain_latent_is_the_identity_on_a_fresh_tensor() -> None:
    latents = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4).requires_grad_()
    plain = make_parameterisation("latent", None)
    params = plain.init(latents)
    assert isinstance(plain, PlainLatent) and plain.name == "latent" and plain.precondition
    assert not params.requires_grad and params.data_ptr() != latents.data_ptr()
    assert torch.equal(plain.to_latents(params), latents.detach())


@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_phase_only_keeps_the_magnitude_for_any_phase(h: int, w: int) -> None:
    magnitude = mean_magnitude(h, w)
    phase_only = PhaseOnlyFourier(magnitude, width=w)
    assert torch.allclose(phase_only.magnitude, magnitude, atol=1e-6)  # real latents' spectrum: symmetric already
    phase = 10 * torch.randn((5, 2, h, w // 2 + 1), generator=torch.Generator().manual_seed(1))
    latents = phase_only.to_latents(phase)
    assert latents.shape == (5, 2, h, w) and latents.dtype == torch.float32
    assert torch.allclose(spectrum(latents).abs(), magnitude.expand(5, -1, -1, -1), atol=1e-5)


@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_phase_gets_a_finite_nonzero_gradient(h: int, w: int) -> None:
    phase_only = PhaseOnlyFourier(mean_magnitude(h, w), width=w)
    phase = torch.randn((2, 2, h, w // 2 + 1), generator=torch.Generator().manual_seed(2)).requires_grad_()
    weights = torch.randn((2, 2, h, w), generator=torch.Generator().manual_seed(3))
    (phase_only.to_latents(phase) * weights).sum().backward()
    assert phase.grad is not None and torch.isfinite(phase.grad).all()
    assert phase.grad.abs().max() > 1e-3


@pytest.mark.parametrize(("h", "w"), SHAPES)
def test_init_then_to_latents_gives_back_the_latent_with_its_own_magnitude(h: int, w: int) -> None:
    latent = torch.randn((1, 3, h, w), generator=torch.Generator().manual_seed(4))
    phase_only = PhaseOnlyFourier(spectrum(latent).abs()[0], width=w)
    phase = phase_only.init(latent)
    assert phase.shape == (1, 3, h, w // 2 + 1) and not phase.requires_grad
    assert torch.allclose(phase_only.to_latents(phase), latent, atol=1e-5)


def test_hand_computed_4x2_with_a_negative_real_conjugate_pair() -> None:
    # Only column x=0 is non-zero, with column sums [0, 1, 2, 1]: X[ky, kx] = sum_y x[y] e^{-2 pi i ky y / 4} / sqrt(8)
    # = [4, -2, 0, -2] / sqrt(8) for both kx (w = 2 makes kx = 1 the Nyquist column).
    latent = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0]]).view(1, 1, 4, 2)
    s = math.sqrt(2)
    expected = torch.tensor([[s, s], [-1 / s, -1 / s], [0.0, 0.0], [-1 / s, -1 / s]])
    assert torch.allclose(spectrum(latent)[0, 0].real, expected, atol=1e-6)
    phase_only = PhaseOnlyFourier(expected.abs()[None], width=2)
    phase = phase_only.init(latent)
    # the pair (ky=1, ky=3) is -1/sqrt(2): phases pi and -pi (antisymmetric, not pi twice as angle() gives)
    assert torch.allclose(phase[0, 0], torch.tensor([[0.0, 0.0], [math.pi, math.pi], [0.0, 0.0], [-math.pi, -math.pi]]))
    assert torch.allclose(phase_only.to_latents(phase), latent, atol=1e-6)


def test_hand_computed_1x4_self_conjugate_sign_is_fixed() -> None:
    # x = [-1, 1, -1, 1]: X[kx] = sum_x x e^{-2 pi i kx x / 4} / 2 = [0, 0, -2]; kx = 0 and 2 are self-conjugate.
    latent = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(1, 1, 1, 4)
    assert torch.allclose(spectrum(latent)[0, 0, 0], torch.tensor([0, 0, -2], dtype=torch.complex64), atol=1e-6)
    phase_only = PhaseOnlyFourier(torch.tensor([[[0.0, 0.0, 2.0]]]), width=4)
    phase = phase_only.init(latent)
    assert torch.allclose(phase[0, 0, 0], torch.tensor([0.0, 0.0, math.pi]))
    nudged = (phase + torch.tensor([0.3, 0.0, -0.4])).requires_grad_()
    out = phase_only.to_latents(nudged)
    assert torch.allclose(out, latent, atol=1e-6)  # the sign stays; the phase cannot change the magnitude there
    out.sum().backward()
    assert nudged.grad is not None and torch.equal(nudged.grad[0, 0, 0, [0, 2]], torch.zeros(2))


def test_phase_only_validates_shapes_and_names() -> None:
    magnitude = mean_magnitude(4, 4)
    phase_only = make_parameterisation("phase_fourier", magnitude)
    assert phase_only.name == "phase_fourier" and not phase_only.precondition
    with pytest.raises(ValueError, match=r"phase: shape \(1, 2, 4, 4\)"):
        phase_only.to_latents(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"latents: shape \(1, 3, 4, 4\)"):
        phase_only.init(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="pass width= one of 4, 5"):
        PhaseOnlyFourier(magnitude, width=6)
    with pytest.raises(ValueError, match="latent_channel, h, w//2\\+1"):
        PhaseOnlyFourier(magnitude[0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        PhaseOnlyFourier(-magnitude)
    asymmetric = magnitude.clone()
    asymmetric[0, 1, 0] += 1.0
    with pytest.raises(ValueError, match="ky and -ky"):
        PhaseOnlyFourier(asymmetric)
    with pytest.raises(ConfigError, match="allowed: latent, phase_fourier"):
        make_parameterisation("pixels", None)
    with pytest.raises(ConfigError, match="latent_spectrum"):
        make_parameterisation("phase_fourier", None)
