"""On the shipped toy-shapes model and SAE, a feature that is dead at the start (its post-top-k code is 0
at every token, so the original's `sae_mean` has no gradient) is reached by the gradient-safe objectives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddr.config import load_config
from ddr.dream.objectives import LayerActivation, empty_prompt_embedding, make_objective
from ddr.dream.optimise import DreamSettings, optimise
from ddr.models.pipeline import latent_shape, load_experiment_sae, load_pipeline
from ddr.provision import provision
from ddr.stages.deep_dream import noise_latents

T = 500
FEATURES = 2  # the two deadest: the lowest mean linear pre-activation among the features with code 0

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_dead_feature_is_reached_by_the_new_objectives_and_not_by_the_old(tmp_path: Path) -> None:
    config = load_config(
        [f"data_root={tmp_path}", "model=toy-shapes", "sae=toy-shapes-topk", "use_sae=true", "guidance_scale=2"]
    )
    provision(config)
    pipe, sae = load_pipeline(config), load_experiment_sae(config)
    context = empty_prompt_embedding(pipe)
    fns = {
        name: LayerActivation(pipe.unet, config.target_layer_name, make_objective("sae", sae, name), context)
        for name in ("sae_mean", "sae_pre_activation_mean", "sae_dot_cosine")
    }
    start = noise_latents([1024], latent_shape(config))
    with torch.no_grad():
        codes = fns["sae_mean"](start, torch.tensor([T]))[0]
        pre = fns["sae_pre_activation_mean"](start, torch.tensor([T]))[0]
    dead = torch.nonzero(codes == 0).flatten()
    features = dead[pre[dead].argsort()][:FEATURES].tolist()
    assert (pre[features] < 0).all()  # negative at every token on average: far from the top k
    # no augmentation, noise or penalties: only the objective moves the latent
    settings = DreamSettings(num_steps=30, learning_rate=0.1, snapshot_every=10)
    init = start.repeat(FEATURES, 1, 1, 1)
    reached = {}
    for name, fn in fns.items():
        result = optimise(fn, init, features, [T] * FEATURES, list(range(FEATURES)), settings)
        with torch.no_grad():
            final = fns["sae_mean"](result.latents, torch.full((FEATURES,), T))
        reached[name] = final[torch.arange(FEATURES), torch.tensor(features)]
        if name == "sae_mean":
            torch.testing.assert_close(result.latents, init, rtol=0, atol=0)  # zero gradient: never moved
    assert (reached["sae_mean"] == 0).all()
    assert (reached["sae_pre_activation_mean"] > 0).all(), reached
    assert (reached["sae_dot_cosine"] > 0).all(), reached
