"""Penalties on the latent being dreamed, as small composable pieces (in the spirit of Lucent).

Each penalty maps latents [B, C, H, W] to one unweighted value per sample [B]; `weighted` is
`weight * value`, what the loss adds. The formulas are the original's (its `fe8ecff` versions),
taken per sample instead of over the whole batch, so a sample's penalty (and gradient) does not
depend on its batch-mates:

- total variation: `mean|x[:, 1:, :] - x[:, :-1, :]| + mean|x[:, :, 1:] - x[:, :, :-1]|`
- range: `mean(relu(|x| - threshold)^2)` (quadratic beyond the threshold; 3.0 by default)
- moment: `|mean(x)| + |std(x) - 1|` (the original's `norm(mean) + norm(std - 1)` of scalars;
  `std` is the unbiased one, as `torch.std`)

As in the original, penalties apply to the un-augmented latent. New penalties subclass `Penalty`
and implement `value`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ddr.config import DeepDreamConfig


@dataclass(frozen=True)
class Penalty:
    """A weighted per-sample penalty on the latent."""

    weight: float = 1.0
    name: ClassVar[str] = "penalty"

    def value(self, latents: Tensor) -> Tensor:
        """The unweighted penalty of each sample, [B]."""
        raise NotImplementedError

    def weighted(self, latents: Tensor) -> Tensor:
        return self.weight * self.value(latents)

    def __call__(self, latents: Tensor) -> Tensor:
        return self.weighted(latents)


@dataclass(frozen=True)
class TotalVariation(Penalty):
    name: ClassVar[str] = "total_variation"

    def value(self, latents: Tensor) -> Tensor:
        dy = (latents[:, :, 1:, :] - latents[:, :, :-1, :]).abs().flatten(1).mean(1)
        dx = (latents[:, :, :, 1:] - latents[:, :, :, :-1]).abs().flatten(1).mean(1)
        return dy + dx


@dataclass(frozen=True)
class Range(Penalty):
    threshold: float = 3.0
    name: ClassVar[str] = "range"

    def value(self, latents: Tensor) -> Tensor:
        return torch.relu(latents.abs() - self.threshold).square().flatten(1).mean(1)


@dataclass(frozen=True)
class Moment(Penalty):
    name: ClassVar[str] = "moment"

    def value(self, latents: Tensor) -> Tensor:
        flat = latents.flatten(1)
        return flat.mean(1).abs() + (flat.std(1) - 1.0).abs()


def penalties_from_config(settings: DeepDreamConfig) -> tuple[Penalty, ...]:
    """The original's three penalties with the configured weights (a weight of 0 still records the value)."""
    return (
        TotalVariation(settings.total_variation_penalty_weight),
        Range(settings.range_penalty_weight, threshold=settings.range_penalty_threshold),
        Moment(settings.moment_penalty_weight),
    )


def evaluate(penalties: Sequence[Penalty], latents: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """(sum of weighted penalties [B], unweighted value of each penalty by name [B])."""
    total = latents.new_zeros(latents.shape[0])
    values: dict[str, Tensor] = {}
    for penalty in penalties:
        value = penalty.value(latents)
        values[penalty.name] = value
        if penalty.weight:
            total = total + penalty.weight * value
    return total, values
