"""Dead-at-start SAE features: which deep-dream objective reaches them (toy-shapes model and SAE).

    python benchmarks/dream_dead_feature.py                    # 8 deadest features at t=500
    python benchmarks/dream_dead_feature.py --features 16 --t 200 --steps 50 --stage-settings

A feature is dead at the start when its post-top-k code (`sae.encode`) is 0 at every token of the
start latent (seeded noise) at t: the original's objective, the mean code (`sae_mean`), then has
a zero gradient and the latent never moves. The features with the lowest mean linear
pre-activation among those are optimised with each objective (`sae_mean`,
`sae_pre_activation_mean`, `sae_dot_cosine`), and the final latent's mean post-top-k code of
the feature is printed (> 0: the feature was reached). By default only the objective acts (no
augmentation, scheduler noise or penalties); `--stage-settings` uses the deep-dream stage's
settings for SAE features instead (level_1 augmentation, see-through noise, penalties), and the
final code is then read without noise, like the stage's final evaluation but without its noise.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from ddr.config import load_config
from ddr.dream.objectives import LayerActivation, empty_prompt_embedding, make_objective
from ddr.dream.optimise import DreamSettings, optimise
from ddr.models.pipeline import latent_shape, load_experiment_sae, load_pipeline
from ddr.provision import provision
from ddr.stages.deep_dream import noise_latents, sample_seed

OBJECTIVES = ("sae_mean", "sae_pre_activation_mean", "sae_dot_cosine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, default=8, help="how many of the deadest features")
    parser.add_argument("--t", type=int, default=500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1024, help="seed of the start latent")
    parser.add_argument("--cosine-power", type=float, default=1.0)
    parser.add_argument("--stage-settings", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    overrides = ["model=toy-shapes", "sae=toy-shapes-topk", "use_sae=true", "guidance_scale=2"]
    config = load_config([f"data_root={tempfile.mkdtemp(prefix='ddr-dead-')}", *overrides])
    provision(config)
    pipe, sae = load_pipeline(config), load_experiment_sae(config)
    context = empty_prompt_embedding(pipe)
    fns = {
        name: LayerActivation(
            pipe.unet,
            config.target_layer_name,
            make_objective("sae", sae, name, cosine_power=args.cosine_power),
            context,
        )
        for name in OBJECTIVES
    }
    start = noise_latents([args.seed], latent_shape(config))
    with torch.no_grad():
        codes = fns["sae_mean"](start, torch.tensor([args.t]))[0]
        pre = fns["sae_pre_activation_mean"](start, torch.tensor([args.t]))[0]
    dead = torch.nonzero(codes == 0).flatten()
    features = dead[pre[dead].argsort()][: args.features].tolist()
    n = len(features)
    if args.stage_settings:
        settings = DreamSettings.from_config(
            config.stages.deep_dream.for_kind("sae"), num_steps=args.steps, learning_rate=args.learning_rate
        )
    else:
        settings = DreamSettings(num_steps=args.steps, learning_rate=args.learning_rate)
    init = start.repeat(n, 1, 1, 1)
    seeds = [sample_seed(args.seed, f, args.t) for f in features]
    final: dict[str, torch.Tensor] = {}
    moved: dict[str, float] = {}
    for name, fn in fns.items():
        result = optimise(fn, init, features, [args.t] * n, seeds, settings, add_noise=pipe.scheduler.add_noise)
        with torch.no_grad():
            codes_after = fns["sae_mean"](result.latents, torch.full((n,), args.t))
        final[name] = codes_after[torch.arange(n), torch.tensor(features)]
        moved[name] = float((result.latents - init).abs().max())

    print(
        f"toy-shapes SAE ({sae.num_latents} features, k={sae.k}) at t={args.t}, start seed {args.seed}: "
        f"{len(dead)} features dead at the start; {args.steps} steps, lr {args.learning_rate}, "
        f"{'stage settings' if args.stage_settings else 'objective only'}, cosine_power {args.cosine_power}"
    )
    print(f"{'feature':>8}{'start pre-act':>15}" + "".join(f"{name:>26}" for name in OBJECTIVES))
    for i, feature in enumerate(features):
        row = "".join(f"{final[name][i].item():26.4f}" for name in OBJECTIVES)
        print(f"{feature:>8}{pre[feature].item():15.4f}{row}")
    print(f"{'reached':>23}" + "".join(f"{f'{int((final[name] > 0).sum())}/{n}':>26}" for name in OBJECTIVES))
    print(f"{'max |latent change|':>23}" + "".join(f"{moved[name]:26.4f}" for name in OBJECTIVES))


if __name__ == "__main__":
    main()
