"""Deep dream: gradient ascent on the latent to find what most excites a channel or SAE feature.

- `objectives`: what is maximised (a channel's mean activation, an SAE feature's mean code) and
  the UNet forward that stops right after the target layer;
- `regularisers`: penalties on the latent (total variation, range, moments);
- `transforms`: augmentation (jitter, rotation, scale) and gradient transforms (spectral
  preconditioning, scheduled Gaussian smoothing);
- `optimise`: the batched AdamW loop, each sample its own target and random draws.

The stage that reads the stores and writes `dream/<run>/<kind>/dreams.zarr` is
`ddr.stages.deep_dream`.
"""

from ddr.dream.objectives import (
    ActivationFn,
    ChannelMean,
    LayerActivation,
    Objective,
    SaeFeatureMean,
    SaePreActivationMean,
    make_objective,
)
from ddr.dream.optimise import DreamResult, DreamSettings, optimise, selectivity
from ddr.dream.regularisers import Moment, Penalty, Range, TotalVariation, penalties_from_config
from ddr.dream.transforms import Augmenter, GradientSmoother, SpectralPreconditioner, precondition_spectral

__all__ = [
    "ActivationFn",
    "Augmenter",
    "ChannelMean",
    "DreamResult",
    "DreamSettings",
    "GradientSmoother",
    "LayerActivation",
    "Moment",
    "Objective",
    "Penalty",
    "Range",
    "SaeFeatureMean",
    "SaePreActivationMean",
    "SpectralPreconditioner",
    "TotalVariation",
    "make_objective",
    "optimise",
    "penalties_from_config",
    "precondition_spectral",
    "selectivity",
]
