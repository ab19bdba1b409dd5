"""Deep-dream objectives against hand-computed values: SAE pre-activation, dot x cosine^p, Gram diversity."""

from __future__ import annotations

import math

import pytest
import torch

from ddr.dream.objectives import (
    COSINE_FLOOR,
    SaeDotCosine,
    SaeFeatureMean,
    SaePreActivationMean,
    diversity,
    make_objective,
    normalised_gram,
)
from ddr.models.sae import SparseAutoencoder

SQRT5 = math.sqrt(5)


def hand_sae() -> SparseAutoencoder:
    """d_in 2, 3 features, top-1; b_dec = (1, 0) so u = x - b_dec is what the encoder and decoder see."""
    sae = SparseAutoencoder(2, 3, activation="topk", k=1)
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        sae.encoder.bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0]))
    return sae


def layer_output(requires_grad: bool = False) -> torch.Tensor:
    """[1, C=2, H=1, W=2]: tokens x1 = (3, 1), x2 = (1, -2), so u1 = (2, 1), u2 = (0, -2)."""
    channels = torch.tensor([[3.0, 1.0], [1.0, -2.0]])  # [C, token]: channel 0 is (x1[0], x2[0])
    return channels.reshape(1, 2, 1, 2).requires_grad_(requires_grad)


def test_sae_pre_activation_is_linear_before_relu_and_topk() -> None:
    # linear pre-activations u . enc_f + b_f: u1 -> (2, 0, 3.5), u2 -> (0, -3, -1.5); mean over the two tokens
    out = SaePreActivationMean(hand_sae())(layer_output())
    torch.testing.assert_close(out, torch.tensor([[1.0, -1.5, 1.0]]))
    # the post-top-k code (the original's objective): only feature 2 at token 1 survives, 3.5 / 2
    torch.testing.assert_close(SaeFeatureMean(hand_sae())(layer_output()), torch.tensor([[0.0, 0.0, 1.75]]))


def test_a_dead_feature_has_a_gradient_only_under_the_new_objectives() -> None:
    sae = hand_sae()
    grads = {}
    for objective in (SaeFeatureMean(sae), SaePreActivationMean(sae), SaeDotCosine(sae)):
        x = layer_output(requires_grad=True)
        (grads[objective.name],) = torch.autograd.grad(objective(x)[0, 1], x)  # feature 1: code 0 at both tokens
    assert (grads["sae_mean"] == 0).all()
    # d mean_t(u_t . enc_1) / d x_t = enc_1 / 2 = (0, 0.5) at each token (channel-major layout [C, H, W])
    torch.testing.assert_close(grads["sae_pre_activation_mean"][0, :, 0], torch.tensor([[0.0, 0.0], [0.5, 0.5]]))
    assert grads["sae_dot_cosine"].abs().sum() > 0


@pytest.mark.parametrize(
    ("power", "expected"),
    [
        # per token dot * max(cos, 0.1)^p with d0 = (1, 0), d1 = (0, 2), d2 = (-1, 0); |u1| = sqrt 5, |u2| = 2
        # u1: dots (2, 2, -2), cosines (2/sqrt5, 1/sqrt5, floor); u2: dots (0, -4, 0), cosines all floored
        (1.0, [(2 * 2 / SQRT5 + 0) / 2, (2 / SQRT5 - 4 * COSINE_FLOOR) / 2, (-2 * COSINE_FLOOR) / 2]),
        (2.0, [(2 * 4 / 5) / 2, (2 / 5 - 4 * COSINE_FLOOR**2) / 2, (-2 * COSINE_FLOOR**2) / 2]),
        (0.0, [(2 + 0) / 2, (2 - 4) / 2, (-2 + 0) / 2]),  # p = 0: the plain dot product
    ],
)
def test_dot_cosine_by_hand(power: float, expected: list[float]) -> None:
    out = SaeDotCosine(hand_sae(), power)(layer_output())
    torch.testing.assert_close(out, torch.tensor([expected]), atol=1e-6, rtol=1e-6)
    objective = make_objective("sae", hand_sae(), "sae_dot_cosine", cosine_power=power)
    assert isinstance(objective, SaeDotCosine) and objective.power == power


def test_objectives_need_an_sae_and_a_known_name() -> None:
    with pytest.raises(ValueError, match="needs an SAE"):
        make_objective("sae", None, "sae_dot_cosine")
    with pytest.raises(ValueError, match="allowed: channel_mean, sae_mean, sae_pre_activation_mean, sae_dot_cosine"):
        make_objective("sae", hand_sae(), "dot")


# --- diversity ----------------------------------------------------------------------------------


def gram_samples() -> torch.Tensor:
    """[3, C=2, H=1, W=2]: F = I, [[1, 1], [0, 0]], [[1, 0], [1, 0]]; Grams I, [[2, 0], [0, 0]], [[1, 1], [1, 1]]."""
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0]]])
    return features.view(3, 2, 1, 2)


def test_normalised_gram_by_hand() -> None:
    grams = normalised_gram(gram_samples())
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(grams, expected)
    torch.testing.assert_close(normalised_gram(5 * gram_samples()), grams)  # scale-free


def test_diversity_is_the_mean_gram_cosine_within_a_group() -> None:
    # cosines: (a, b) = 1/sqrt2, (a, c) = 2 / (sqrt2 * 2) = 1/sqrt2, (b, c) = 1/2
    r = 1 / math.sqrt(2)
    one_group = diversity(gram_samples(), torch.tensor([0, 0, 0]))
    torch.testing.assert_close(one_group, torch.tensor([r, (r + 0.5) / 2, (r + 0.5) / 2]))
    assert one_group.mean().item() == pytest.approx((2 * r + 0.5) / 3)  # the mean pairwise cosine
    two_groups = diversity(gram_samples(), torch.tensor([4, 4, 9]))
    torch.testing.assert_close(two_groups[:2], torch.tensor([r, r]))
    assert math.isnan(two_groups[2])  # alone in its group
    torch.testing.assert_close(diversity(gram_samples()[:2], torch.tensor([0, 0])), two_groups[:2])  # batch-free
    poisoned = gram_samples().clone()
    poisoned[2, 0, 0, 0] = math.nan
    left_out = diversity(poisoned, torch.tensor([0, 0, 0]))  # a diverged sample does not spoil its mates
    torch.testing.assert_close(left_out[:2], torch.tensor([r, r]))
    assert math.isnan(left_out[2])


def test_diversity_gradient_stays_within_the_group() -> None:
    outputs = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (grad,) = torch.autograd.grad(diversity(outputs, torch.tensor([0, 0, 1, 1]))[:2].sum(), outputs)
    assert grad[:2].abs().sum() > 0 and (grad[2:] == 0).all()
