"""Deep dream: gradient ascent on the latent to find what most excites a channel or SAE feature.

- `objectives`: what is maximised (a channel's mean activation, an SAE feature's mean code, its
  linear pre-activation, or dot x cosine^p with its decoder direction), the Gram-matrix
  diversity of a target's results, and the UNet forward that stops right after the target layer;
- `regularisers`: penalties on the latent (total variation, range, moments);
- `transforms`: augmentation (jitter, rotation, scale) and gradient transforms (spectral
  preconditioning, scheduled Gaussian smoothing);
- `parameterisations`: what the optimiser changes (the latent, or the phase of its spectrum);
- `sources`: real latents to start from or to take a spectrum from (the capture's images, VAE-encoded);
- `optimise`: the batched AdamW loop, each sample its own target and random draws, with the
  negative view, the diversity penalty, the seed-distance penalty and ball, and attribution.

The stage that reads the stores and writes `dream/<run>/<kind>/dreams.zarr` is
`ddr.stages.deep_dream`.
"""

from ddr.dream.objectives import (
    ActivationFn,
    ChannelMean,
    LayerActivation,
    Objective,
    Readout,
    SaeDotCosine,
    SaeFeatureMean,
    SaePreActivationMean,
    diversity,
    make_objective,
    normalised_gram,
)
from ddr.dream.optimise import DreamResult, DreamSettings, optimise, project_to_ball, selectivity
from ddr.dream.parameterisations import Parameterisation, PhaseOnlyFourier, PlainLatent, make_parameterisation
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
    "Parameterisation",
    "Penalty",
    "PhaseOnlyFourier",
    "PlainLatent",
    "Range",
    "Readout",
    "SaeDotCosine",
    "SaeFeatureMean",
    "SaePreActivationMean",
    "SpectralPreconditioner",
    "TotalVariation",
    "diversity",
    "make_objective",
    "make_parameterisation",
    "normalised_gram",
    "optimise",
    "penalties_from_config",
    "precondition_spectral",
    "project_to_ball",
    "selectivity",
]
