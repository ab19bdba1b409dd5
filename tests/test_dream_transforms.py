"""Deep dream building blocks against hand-computed values: penalties, gradient transforms, augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from ddr.config import load_config
from ddr.dream.optimise import DreamSettings, selectivity
from ddr.dream.regularisers import Moment, Range, TotalVariation, evaluate, penalties_from_config
from ddr.dream.transforms import (
    Augmenter,
    GradientSmoother,
    affine_per_sample,
    draw_noise,
    gaussian_blur,
    gaussian_kernel1d,
    precondition_spectral,
    sample_generators,
    scheduled_sigma,
    spectral_scale,
)

# --- penalties ----------------------------------------------------------------------------------


def test_total_variation_by_hand() -> None:
    x = torch.tensor([[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]).view(1, 1, 2, 3)
    batch = torch.cat([x, torch.zeros_like(x), 2 * x])
    # rows: |2-0|, |2-1|, |2-3| -> mean 4/3; columns: |1-0|, |3-1|, 0, 0 -> mean 3/4
    expected = 4 / 3 + 3 / 4
    value = TotalVariation(0.5).value(batch)
    torch.testing.assert_close(value, torch.tensor([expected, 0.0, 2 * expected]))
    torch.testing.assert_close(TotalVariation(0.5)(batch)[0], torch.tensor(0.5 * expected))


def test_range_quadratic_beyond_threshold() -> None:
    x = torch.tensor([4.0, -5.0, 1.0, 0.5]).view(1, 1, 2, 2)
    # relu(|x| - 3)^2 = [1, 4, 0, 0] -> mean 1.25
    torch.testing.assert_close(Range(1.0, threshold=3.0).value(x), torch.tensor([1.25]))
    torch.testing.assert_close(Range(0.5, threshold=3.0)(x), torch.tensor([0.625]))
    torch.testing.assert_close(Range(1.0, threshold=10.0).value(x), torch.tensor([0.0]))


def test_moment_penalty() -> None:
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    std = math.sqrt(5 / 3)  # unbiased std of 1..4
    torch.testing.assert_close(Moment().value(x), torch.tensor([2.5 + abs(std - 1)]))
    standard = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(1, 1, 2, 2) * math.sqrt(3 / 4)
    torch.testing.assert_close(Moment().value(standard), torch.tensor([0.0]), atol=1e-6, rtol=0)


def test_penalties_from_config_and_sum() -> None:
    config = load_config([])
    raw = penalties_from_config(config.stages.deep_dream.for_kind("raw"))
    assert [(p.name, p.weight) for p in raw] == [("total_variation", 0.5), ("range", 0.5), ("moment", 0.0)]
    assert raw[1].threshold == 3.0
    sae = penalties_from_config(config.stages.deep_dream.for_kind("sae"))
    assert [p.weight for p in sae] == [0.0, 0.5, 0.5]
    x = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 3
    total, values = evaluate(raw, x)
    torch.testing.assert_close(total, 0.5 * values["total_variation"] + 0.5 * values["range"])
    assert set(values) == {"total_variation", "range", "moment"}


def test_selectivity_is_target_minus_mean_of_others() -> None:
    acts = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 5.0, 2.0]])
    # sample 0 targets channel 3: 6 - mean(1, 2, 3) = 4; sample 1 targets channel 1: -1 - mean(0, 5, 2) = -10/3
    torch.testing.assert_close(selectivity(acts, torch.tensor([3, 1])), torch.tensor([4.0, -1 - 7 / 3]))


# --- gradient transforms ------------------------------------------------------------------------


def test_spectral_scale_values() -> None:
    scale = spectral_scale(4, 4)
    assert scale[0, 0] == 1.0  # zero frequency
    torch.testing.assert_close(scale[0, 1], torch.tensor(1 / 2))
    torch.testing.assert_close(scale[0, 2], torch.tensor(1 / 3))  # |f| = 2 (Nyquist)
    torch.testing.assert_close(scale[0, 3], torch.tensor(1 / 2))  # f = -1
    torch.testing.assert_close(scale[1, 1], torch.tensor(1 / (math.sqrt(2) + 1)))
    torch.testing.assert_close(scale, scale.T)


def test_spectral_preconditioning_on_known_frequencies() -> None:
    w = 8
    x = torch.arange(w, dtype=torch.float32)
    cos1 = torch.cos(2 * math.pi * x / w).expand(w, w)
    cos3 = torch.cos(2 * math.pi * 3 * x / w).expand(w, w)
    g = (cos1 + cos3).view(1, 1, w, w).repeat(1, 2, 1, 1)
    out = precondition_spectral(g)
    # |f| = 1 is scaled by 1/2, |f| = 3 by 1/4, then the sample's std is restored
    expected = (0.5 * cos1 + 0.25 * cos3).view(1, 1, w, w).repeat(1, 2, 1, 1)
    expected = expected * g.std() / expected.std()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # a single frequency keeps its shape exactly; each sample is renormalised to its own std
    single = torch.cat([cos1.view(1, 1, w, w), 10 * cos3.view(1, 1, w, w)])
    torch.testing.assert_close(precondition_spectral(single), single, atol=1e-5, rtol=1e-5)
    both = precondition_spectral(torch.cat([g, 7 * g]))
    torch.testing.assert_close(both[1], 7 * out[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(precondition_spectral(torch.zeros(1, 1, w, w)), torch.zeros(1, 1, w, w))


def test_gaussian_kernel_and_sigma_schedule() -> None:
    k = gaussian_kernel1d(3, 1.0)
    e = math.exp(-0.5)
    torch.testing.assert_close(k, torch.tensor([e, 1.0, e]) / (1 + 2 * e))
    for size, sigma in ((9, 0.5), (9, 3.0), (5, 1.3)):
        kernel = gaussian_kernel1d(size, sigma)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(kernel, kernel.flip(0))
    assert [scheduled_sigma(s, 5, 0.5, 0.0) for s in range(5)] == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert scheduled_sigma(0, 1, 0.7, 0.0) == 0.7  # one step: the start value
    smoother = GradientSmoother(kernel_size=3, sigma_start=1.0, sigma_end=0.0, num_steps=3)
    assert [smoother.sigma(s) for s in range(3)] == [1.0, 0.5, 0.0]
    delta = torch.zeros(1, 1, 7, 7)
    delta[0, 0, 3, 3] = 1.0
    torch.testing.assert_close(smoother(delta, 0)[0, 0, 2:5, 2:5], torch.outer(k, k))
    assert smoother(delta, 2) is delta  # sigma 0 is the identity
    constant = torch.full((2, 4, 8, 8), 3.0)
    torch.testing.assert_close(gaussian_blur(constant, 9, 2.0), constant)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel1d(4, 1.0)


# --- augmentation -------------------------------------------------------------------------------


def test_jitter_is_a_roll_by_the_drawn_amount() -> None:
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    augmenter = Augmenter(jitter_max=2)
    draw = augmenter.draw(sample_generators([5, 6]))
    for i, seed in enumerate((5, 6)):
        assert (
            draw.shifts[i].tolist()
            == torch.randint(-2, 3, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        )
    out = augmenter.apply(x, draw)
    for i in range(2):
        torch.testing.assert_close(out[i], torch.roll(x[i], shifts=tuple(draw.shifts[i].tolist()), dims=(1, 2)))
    shifts = torch.cat([augmenter.draw(sample_generators([s])).shifts for s in range(200)])
    assert shifts.min() == -2 and shifts.max() == 2  # inclusive range, as the original's randint


def test_draws_are_per_sample() -> None:
    augmenter = Augmenter(jitter_max=3, rotate_max=10.0, scale_max=1.5)
    together = augmenter.draw(sample_generators([1, 2, 3]))
    alone = augmenter.draw(sample_generators([2]))
    assert together.shifts[1].tolist() == alone.shifts[0].tolist()
    assert together.angles[1] == alone.angles[0] and together.scales[1] == alone.scales[0]
    assert (together.angles.abs() <= 10).all() and ((together.scales >= 1) & (together.scales <= 1.5)).all()
    noise = draw_noise(sample_generators([4, 5]), (2, 3, 3))
    torch.testing.assert_close(noise[1], draw_noise(sample_generators([5]), (2, 3, 3))[0])


def test_rotation_and_scale() -> None:
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    quarter = affine_per_sample(x, torch.tensor([90.0]), torch.tensor([1.0]))
    assert any(torch.allclose(quarter, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, -1))
    torch.testing.assert_close(affine_per_sample(x, torch.tensor([0.0]), torch.tensor([1.0])), x)
    zoomed = affine_per_sample(torch.ones(1, 1, 8, 8), torch.tensor([0.0]), torch.tensor([2.0]))
    torch.testing.assert_close(zoomed, torch.ones(1, 1, 8, 8))  # zooming in never reads outside
    shrunk = affine_per_sample(torch.ones(1, 1, 8, 8), torch.tensor([0.0]), torch.tensor([0.5]))
    assert shrunk[0, 0, 0, 0] == 0 and shrunk[0, 0, 4, 4] == 1  # zeros outside


def test_robustness_presets_reach_the_augmenter() -> None:
    level_0 = DreamSettings.from_config(load_config(["robustness=level_0"]).stages.deep_dream)
    augmenter = level_0.augmenter
    assert augmenter.identity
    x = torch.randn(2, 4, 8, 8)
    generators = sample_generators([1, 2])
    assert augmenter(x, generators) is x
    assert torch.rand((), generator=generators[0]) == torch.rand((), generator=torch.Generator().manual_seed(1))
    level_3 = DreamSettings.from_config(load_config(["robustness=level_3"]).stages.deep_dream)
    assert (level_3.jitter_max, level_3.rotate_max, level_3.scale_max) == (16, 45.0, 1.8)
    assert not level_3.augmenter.identity
