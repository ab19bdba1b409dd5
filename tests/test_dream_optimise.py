"""The deep-dream loop: a planted feature is recovered, batches equal single targets, failures stay local."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from ddr.dream.objectives import (
    ChannelMean,
    LayerActivation,
    Readout,
    autocast_dtype,
    empty_prompt_embedding,
    make_objective,
)
from ddr.dream.optimise import DreamResult, DreamSettings, optimise, seed_distance_penalty
from ddr.dream.parameterisations import make_parameterisation
from ddr.dream.regularisers import Moment, Range, TotalVariation
from ddr.hooks import CaptureHook, TimestepTracker, hooked
from ddr.models.pipeline import load_experiment_sae, load_pipeline
from tests.conftest import tiny_config

SIDE = 8  # latent side of the tiny model at image_size=64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    config = tiny_config(tmp_path_factory.mktemp("dream_optimise"), "image_size=64")
    return config, load_pipeline(config), load_experiment_sae(config)


def activation_fn(tiny: Any, kind: str = "raw") -> LayerActivation:
    config, pipe, sae = tiny
    objective = make_objective(kind, sae)
    return LayerActivation(pipe.unet, config.target_layer_name, objective, empty_prompt_embedding(pipe))


# --- a planted feature --------------------------------------------------------------------------


def planted_pattern(index: int) -> torch.Tensor:
    """[4, 8, 8] of +-1 blocks, different per index (quadrant checker, halves by row, halves by column)."""
    rows = torch.arange(SIDE)[:, None] < SIDE // 2
    cols = torch.arange(SIDE)[None, :] < SIDE // 2
    base = [rows ^ cols, rows.expand(SIDE, SIDE), cols.expand(SIDE, SIDE)]
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(4, 1, 1)
    return torch.stack([base[(index + c) % 3].float() * 2 - 1 for c in range(4)]) * signs


class PlantedUNet(nn.Module):
    """Stands in for a UNet: its hooked layer `mid` is a Conv2d, channel c the linear filter `planted_pattern(c)`."""

    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.Conv2d(4, 3, kernel_size=SIDE)  # one output position: activation = <pattern, latent>
        self.conv_out = nn.Conv2d(3, 4, kernel_size=1)
        with torch.no_grad():
            for c in range(3):
                self.mid.weight[c] = planted_pattern(c) / planted_pattern(c).norm()
            self.mid.bias.zero_()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: Any = None) -> Any:
        return self.conv_out(self.mid(sample))


def test_planted_feature_is_recovered_and_later_layers_never_run() -> None:
    unet = PlantedUNet()
    fired: list[str] = []
    unet.conv_out.register_forward_hook(lambda *_: fired.append("conv_out"))
    fn = LayerActivation(unet, "mid", ChannelMean(), torch.zeros(1, 1, 1))
    settings = DreamSettings(
        num_steps=40,
        learning_rate=0.05,
        penalties=(TotalVariation(0.05), Range(0.5, threshold=3.0), Moment(0.0)),
        spectral=True,
        smoothing_sigma_start=0.5,
        smoothing_sigma_end=0.0,
        snapshot_every=5,
    )
    targets = [0, 0, 1, 2]
    init = 0.1 * torch.randn(len(targets), 4, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    result = optimise(fn, init, targets, [500] * len(targets), [1, 2, 3, 4], settings)

    assert fired == []  # the forward stopped at `mid` every step
    assert unet.mid.weight.grad is None  # no weight gradients were built
    for i, channel in enumerate(targets):
        cosines = [
            torch.nn.functional.cosine_similarity(result.latents[i].flatten(), planted_pattern(c).flatten(), 0).item()
            for c in range(3)
        ]
        assert cosines[channel] >= 0.9, (i, cosines)
        assert max(abs(v) for c, v in enumerate(cosines) if c != channel) < 0.2  # its own pattern, not another's
        history = result.history_activation[i].numpy()
        assert (np.diff(history) > -1e-3 * abs(history[-1])).all(), history  # non-decreasing
        assert result.activation[i] > 10 * max(history[0], 0.1)
    assert (result.failed_step == -1).all()
    assert result.snapshot_steps == [0, 5, 10, 15, 20, 25, 30, 35]
    torch.testing.assert_close(result.snapshots[:, 0], init)
    assert set(result.penalties) == {"total_variation", "range", "moment"}


# --- the real (tiny) UNet -----------------------------------------------------------------------


def test_forward_stops_at_the_target_layer_and_matches_capture(tiny: Any) -> None:
    config, pipe, sae = tiny
    later = ["up_blocks.2", "up_blocks.3", "conv_out"]
    fired: list[str] = []
    modules = dict(pipe.unet.named_modules())
    handles = [modules[name].register_forward_hook(lambda *_, n=name: fired.append(n)) for name in later]
    try:
        x = torch.randn(3, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
        t = torch.tensor([900, 500, 100])
        raw = activation_fn(tiny, "raw")(x, t)
        features = activation_fn(tiny, "sae")(x, t)
        assert fired == []
        # the same quantities the capture stage records, from a full forward with the capture hook
        tracker = TimestepTracker()
        context = empty_prompt_embedding(pipe).expand(3, -1, -1)
        for i in range(3):
            hook = CaptureHook(tracker, n_calls=1, cfg=False, sae=sae)
            with torch.no_grad(), hooked(pipe.unet, config.target_layer_name, tracker, hook):
                pipe.unet(x[i : i + 1], t[i : i + 1], encoder_hidden_states=context[:1])
            captured_raw, captured_sae = hook.result()
            torch.testing.assert_close(raw[i], captured_raw[0, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(features[i], captured_sae[0, 0], atol=1e-5, rtol=1e-5)
        assert set(fired) == set(later)  # the hooks do fire when the forward runs to the end
    finally:
        for handle in handles:
            handle.remove()
    assert raw.shape == (3, 64) and features.shape == (3, 256)


def noised_settings(**overrides: Any) -> DreamSettings:
    values: dict[str, Any] = {
        "num_steps": 4,
        "learning_rate": 0.1,
        "penalties": (TotalVariation(0.5), Range(0.5), Moment(0.1)),
        "smoothing_sigma_start": 0.5,
        "jitter_max": 1,
        "rotate_max": 5.0,
        "scale_max": 1.1,
        "see_through_noise": True,
        "snapshot_every": 2,
    }
    return DreamSettings(**{**values, **overrides})


def target_rows(targets: list[tuple[int, int]], results: int) -> tuple[list[int], list[int]]:
    """The channel and timestep of every row: each target repeated for its results, as the stage batches them."""
    return [c for c, _ in targets for _ in range(results)], [t for _, t in targets for _ in range(results)]


def one_target_at_a_time(
    fn: Any,
    init: torch.Tensor,
    channels: list[int],
    timesteps: list[int],
    seeds: list[int],
    settings: DreamSettings,
    results: int,
    **kwargs: Any,
) -> Iterator[tuple[slice, DreamResult]]:
    """Each target's rows and their optimisation alone (the reference a batched run must equal)."""
    for j in range(len(channels) // results):
        rows = slice(j * results, (j + 1) * results)
        yield rows, optimise(fn, init[rows], channels[rows], timesteps[rows], seeds[rows], settings, **kwargs)


def test_batched_equals_one_target_at_a_time(tiny: Any) -> None:
    _, pipe, _ = tiny
    fn = activation_fn(tiny)
    settings = noised_settings()
    targets = [(3, 500), (10, 200), (7, 900)]
    results, seeds = 2, [11, 22]
    init = torch.randn(len(targets) * results, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    channels, timesteps = target_rows(targets, results)
    sample_seeds = [1000 * c + s for c, _ in targets for s in seeds]
    batched = optimise(fn, init, channels, timesteps, sample_seeds, settings, add_noise=pipe.scheduler.add_noise)
    for rows, single in one_target_at_a_time(
        fn, init, channels, timesteps, sample_seeds, settings, results, add_noise=pipe.scheduler.add_noise
    ):
        torch.testing.assert_close(batched.latents[rows], single.latents, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.activation[rows], single.activation, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.history_activation[rows], single.history_activation, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.selectivity[rows], single.selectivity, atol=1e-4, rtol=1e-4)
        for name, value in single.penalties.items():
            torch.testing.assert_close(batched.penalties[name][rows], value, atol=1e-4, rtol=1e-4)
    # the optimisation moved the latents and each sample saw its own draws
    assert not torch.allclose(batched.latents, init)
    assert not torch.allclose(batched.latents[0] - init[0], batched.latents[1] - init[1])
    other = optimise(fn, init[:1], channels[:1], timesteps[:1], [999], settings, add_noise=pipe.scheduler.add_noise)
    assert not torch.allclose(other.latents[0], batched.latents[0])  # another seed, other draws


class Poisoned:
    """Wraps an activation function: NaN in one sample's input at one call (as a diverging forward)."""

    def __init__(self, fn: LayerActivation, sample: int, call: int) -> None:
        self.fn, self.sample, self.call, self.calls = fn, sample, call, 0
        self.modules = fn.modules

    def read(self, z: torch.Tensor, t: torch.Tensor) -> Readout:
        if self.calls == self.call:
            mask = torch.zeros(z.shape[0], 1, 1, 1, dtype=torch.bool)
            mask[self.sample] = True
            z = torch.where(mask, math.nan, z)
        self.calls += 1
        return self.fn.read(z, t)

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.read(z, t).activations


def test_a_nan_sample_fails_alone(tiny: Any) -> None:
    _, pipe, _ = tiny
    settings = noised_settings(num_steps=6, snapshot_every=1)
    init = torch.randn(3, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(3))
    args = (init, [3, 5, 9], [500, 500, 300], [1, 2, 3], settings)
    clean = optimise(activation_fn(tiny), *args, add_noise=pipe.scheduler.add_noise)
    poisoned = optimise(Poisoned(activation_fn(tiny), 1, 3), *args, add_noise=pipe.scheduler.add_noise)

    assert poisoned.failed_step.tolist() == [-1, 3, -1]
    assert clean.failed_step.tolist() == [-1, -1, -1]
    # the failed sample is frozen at its last finite latent: the one at the start of step 3
    torch.testing.assert_close(poisoned.latents[1], clean.snapshots[1, 3], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(poisoned.latents).all()
    # its history stops at the failure; the others finish exactly as without the failure
    assert torch.isfinite(poisoned.history_activation[1, :3]).all()
    assert torch.isnan(poisoned.history_activation[1, 3:]).all()
    assert torch.isnan(poisoned.step_activation[3:, 1]).all()
    for i in (0, 2):
        torch.testing.assert_close(poisoned.latents[i], clean.latents[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(poisoned.history_activation[i], clean.history_activation[i], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(poisoned.activation[i])


def test_autocast_path_and_context_cache(tiny: Any) -> None:
    """The bf16 autocast path (CUDA's) on the CPU: fp32 activations close to fp32's, gradients reach the latent."""
    config, pipe, _ = tiny
    context = empty_prompt_embedding(pipe)
    exact = LayerActivation(pipe.unet, config.target_layer_name, make_objective("raw"), context)
    mixed = LayerActivation(pipe.unet, config.target_layer_name, make_objective("raw"), context, torch.bfloat16)
    x = torch.randn(2, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(4), requires_grad=True)
    t = torch.tensor([700, 300])
    low = mixed(x, t)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, exact(x, t), atol=0.05, rtol=0.05)
    (grad,) = torch.autograd.grad(low[:, 3].sum(), x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    exact(torch.randn(5, 4, SIDE, SIDE), torch.full((5,), 10))
    assert sorted(exact._contexts) == [2, 5]  # the empty-prompt embedding expanded once per batch size
    assert autocast_dtype(torch.device("cpu")) is None  # fp32 on the CPU


# --- accentuation, attribution, the negative view, phase-only, diversity ---------------------------

N_LATENT = 4 * SIDE * SIDE


class LinearActivation:
    """activation_c(z) = <w_c, z> with w_c of +-1 entries: d activation / d z = w_c at every step."""

    def __init__(self, width: int = 3) -> None:
        self.weight = torch.where(
            torch.randn(width, N_LATENT, generator=torch.Generator().manual_seed(5)) > 0, 1.0, -1.0
        )

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return z.flatten(1) @ self.weight.T


def plain_settings(**overrides: Any) -> DreamSettings:
    """No augmentation, noise, preconditioning, smoothing or penalties: Adam's first steps are lr * sign(gradient)."""
    values: dict[str, Any] = {"num_steps": 6, "learning_rate": 0.1, "spectral": False, "snapshot_every": 1}
    return DreamSettings(**{**values, **overrides})


def start_latents(n: int) -> torch.Tensor:
    return torch.randn(n, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(6))


def test_projection_keeps_every_step_within_the_radius() -> None:
    fn, init = LinearActivation(), start_latents(2)
    lr, radius = 0.1, 2.5 * 0.1 * math.sqrt(N_LATENT)  # Adam moves lr * sqrt(N) a step: the ball is hit at step 3
    result = optimise(fn, init, [0, 2], [500, 500], [1, 2], plain_settings(seed_distance_max=radius))
    distances = (result.snapshots - init[:, None]).flatten(2).norm(dim=2)  # at the start of every step
    expected = torch.tensor([0, lr * math.sqrt(N_LATENT), 2 * lr * math.sqrt(N_LATENT), radius, radius, radius])
    for i in range(2):
        torch.testing.assert_close(distances[i], expected, atol=1e-4, rtol=1e-5)
    # pushed along w_c all the way: the point of the ball in w_c's direction
    for i, channel in enumerate((0, 2)):
        direction = fn.weight[channel].view(4, SIDE, SIDE) / math.sqrt(N_LATENT)
        torch.testing.assert_close(result.latents[i], init[i] + radius * direction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.seed_distance, torch.full((2,), radius), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result.start_latents, init)
    free = optimise(fn, init, [0, 2], [500, 500], [1, 2], plain_settings())
    torch.testing.assert_close(free.seed_distance, torch.full((2,), 6 * lr * math.sqrt(N_LATENT)), rtol=1e-5, atol=1e-4)


def test_seed_distance_penalty_pulls_towards_the_start() -> None:
    fn, init = LinearActivation(), start_latents(1)
    assert seed_distance_penalty(init + 0.5, init).item() == pytest.approx(0.25)  # mean of 0.5^2
    weight = 512.0
    held = optimise(fn, init, [1], [500], [1], plain_settings(num_steps=40, seed_distance_weight=weight))
    # the push (+-1 per element) balances the pull 2 * weight * d / N at d = N / (2 * weight) along w_1;
    # Adam circles that fixed point within a fraction of its step
    along = (held.latents - init).flatten() * fn.weight[1]
    fixed_point = N_LATENT / (2 * weight)
    assert (along - fixed_point).abs().max().item() < 0.05
    assert held.seed_distance.item() == pytest.approx(fixed_point * math.sqrt(N_LATENT), rel=0.2)
    free = optimise(fn, init, [1], [500], [1], plain_settings(num_steps=40))
    assert free.seed_distance.item() == pytest.approx(40 * 0.1 * math.sqrt(N_LATENT), rel=1e-5)


def test_attribution_and_the_negative_view_by_hand() -> None:
    fn, init = LinearActivation(), start_latents(2)
    steps, lr = 6, 0.1
    for negative in (False, True):
        result = optimise(fn, init, [0, 1], [500, 500], [1, 2], plain_settings(negative=negative))
        for i in range(2):
            w = fn.weight[i].view(4, SIDE, SIDE)
            torch.testing.assert_close(result.attribution[i], steps * w.abs())  # sum of |d activation / d latent|
            sign = -1.0 if negative else 1.0  # constant gradient: Adam moves lr * sign(gradient) a step
            torch.testing.assert_close(result.latents[i], init[i] + sign * steps * lr * w, atol=1e-5, rtol=1e-5)
            # history and activation are the raw activation: falling when minimised
            history = result.history_activation[i]
            assert (sign * history.diff() > 0).all()
            assert result.activation[i].item() == pytest.approx(float(fn(result.latents[i : i + 1], None)[0, i]))


def test_phase_only_keeps_the_magnitude_and_attributes_on_the_latent() -> None:
    fn, init = LinearActivation(), start_latents(2)
    magnitude = torch.fft.rfft2(torch.randn(8, 4, SIDE, SIDE), norm="ortho").abs().mean(0)
    phase = make_parameterisation("phase_fourier", magnitude)
    result = optimise(fn, init, [0, 1], [500, 500], [1, 2], plain_settings(), parameterisation=phase)
    spectrum = torch.fft.rfft2(result.latents, norm="ortho").abs()
    torch.testing.assert_close(spectrum, magnitude.expand_as(spectrum), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.fft.rfft2(result.start_latents, norm="ortho").abs(), spectrum, atol=1e-5, rtol=1e-5
    )
    assert result.activation[0] > fn(result.start_latents[:1], None)[0, 0]  # the phase moved towards w_0
    for i in range(2):
        torch.testing.assert_close(result.attribution[i], 6 * fn.weight[i].view(4, SIDE, SIDE).abs())
    with pytest.raises(ValueError, match="no projection"):
        optimise(fn, init, [0, 1], [500, 500], [1, 2], plain_settings(seed_distance_max=1.0), parameterisation=phase)


def test_diversity_couples_only_a_targets_results(tiny: Any) -> None:
    _, pipe, _ = tiny
    fn = activation_fn(tiny)
    settings = noised_settings(diversity_weight=10.0)
    targets, results = [(3, 500), (10, 200)], 2
    init = torch.randn(len(targets) * results, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    channels, timesteps = target_rows(targets, results)
    seeds = [100 * c + k for c, _ in targets for k in range(results)]
    groups = [j for j in range(len(targets)) for _ in range(results)]
    batched = optimise(
        fn, init, channels, timesteps, seeds, settings, add_noise=pipe.scheduler.add_noise, groups=groups
    )
    for rows, single in one_target_at_a_time(
        fn,
        init,
        channels,
        timesteps,
        seeds,
        settings,
        results,
        add_noise=pipe.scheduler.add_noise,
        groups=[0] * results,
    ):
        torch.testing.assert_close(batched.latents[rows], single.latents, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.diversity[rows], single.diversity, atol=1e-5, rtol=1e-4)
    plain = optimise(fn, init, channels, timesteps, seeds, noised_settings(), add_noise=pipe.scheduler.add_noise)
    assert not torch.allclose(plain.latents, batched.latents, atol=1e-4)  # the penalty did act
    assert torch.isnan(plain.diversity).all()  # every sample its own group: no pairs


def test_a_nan_sample_fails_alone_under_the_diversity_penalty(tiny: Any) -> None:
    _, pipe, _ = tiny
    settings = noised_settings(num_steps=5, diversity_weight=10.0)
    init = torch.randn(3, 4, SIDE, SIDE, generator=torch.Generator().manual_seed(8))
    poisoned = optimise(
        Poisoned(activation_fn(tiny), 1, 2),
        init,
        [3, 3, 3],
        [500] * 3,
        [1, 2, 3],
        settings,
        add_noise=pipe.scheduler.add_noise,
        groups=[0, 0, 0],
    )
    assert poisoned.failed_step.tolist() == [-1, 2, -1]
    assert torch.isfinite(poisoned.latents).all() and torch.isfinite(poisoned.diversity).all()
