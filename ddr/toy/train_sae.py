"""Train a TopK sparse autoencoder on a UNet layer's per-token activations (sparsify's recipe, small).

The capture store keeps only spatial means, and an SAE reads tokens, so this collects its own
data: it generates the configured prompt set (prompt x `stages.capture.num_images_per_prompt`,
sample i seeded with `stages.capture.seed + i`, `num_inference_steps`, `guidance_scale`, both
CFG halves) with a forward hook on `target_layer_name` that keeps every token ([B, H*W, C] as
`ddr.hooks.sae_tokens` makes them) at every UNet call. A seeded fraction of the samples
(whole generations) is held out.

The SAE is sparsify's TopK autoencoder (`ddr.models.sae.SparseAutoencoder`): encoder Linear,
ReLU, per-token top-k, decoder `W_dec` with unit-norm rows, `b_dec` subtracted before encoding.
Training follows sparsify: encoder init with a zero bias, `W_dec` = the encoder's rows made unit
norm, `b_dec` = the data mean, loss = fraction of variance unexplained (FVU), Adam at
2e-4 / sqrt(num_latents / 2**14), the decoder's gradient parallel to its rows removed and the
rows renormalised after every step. It is saved with `save_sae` (cfg.json + sae.safetensors)
into `<output>/unet.<layer>/`, and its held-out fraction of variance explained and dead-latent
fraction are printed and written to `<output>/sae_training.json`.

    ddr train-sae --output assets/toy-shapes-sae model=toy-shapes stages.capture.prompt_dataset=toy-shapes \\
        num_inference_steps=25 stages.capture.num_images_per_prompt=4
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ddr.config import ExperimentConfig, load_config
from ddr.hooks import TimestepTracker, hooked, output_tensor, sae_tokens
from ddr.models.sae import SparseAutoencoder, save_sae


@dataclass
class SaeTrainConfig:
    expansion_factor: int = 4
    k: int = 8
    epochs: int = 30
    batch_size: int = 1024
    lr: float | None = None
    """None: sparsify's default, 2e-4 / sqrt(num_latents / 2**14)."""
    holdout: float = 0.2
    seed: int = 0
    threads: int = 1
    generation_batch: int = 16
    progress: bool = True


@dataclass
class TokenSet:
    """Per-token activations [N, C] and the sample (generation) each token came from [N]."""

    tokens: Tensor
    sample: Tensor


def collect_tokens(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    config: ExperimentConfig,
    batch_size: int = 16,
    progress: bool = False,
) -> TokenSet:
    """Every token of the target layer at every UNet call (both CFG halves) while generating the prompts."""
    from ddr.stages.capture import generate

    tokens: list[Tensor] = []
    owners: list[Tensor] = []
    current: list[int] = []

    def keep(_module: nn.Module, _args: Any, output: Any) -> None:
        rows = output_tensor(output).detach().float()
        per_row = sae_tokens(rows)  # [rows, H*W, C]
        # diffusers stacks [unconditional, conditional] under CFG: both halves belong to the same samples.
        index = torch.tensor(current).repeat(rows.shape[0] // len(current))
        tokens.append(per_row.reshape(-1, per_row.shape[-1]).cpu())
        owners.append(index.repeat_interleave(per_row.shape[1]))

    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc="collect", disable=not progress, dynamic_ncols=True):
        batch = slice(start, start + batch_size)
        current[:] = list(range(start, min(start + batch_size, len(prompts))))
        tracker = TimestepTracker()
        with torch.no_grad(), hooked(pipe.unet, config.target_layer_name, tracker, keep):
            generate(pipe, prompts[batch], seeds[batch], config, output_type="latent")
    return TokenSet(torch.cat(tokens), torch.cat(owners))


def split_samples(n_samples: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, held-out) sample indices: a seeded permutation, the last `holdout` fraction held out."""
    order = torch.randperm(n_samples, generator=torch.Generator().manual_seed(seed))
    n_held = max(1, round(holdout * n_samples)) if holdout > 0 else 0
    return order[: n_samples - n_held].sort().values, order[n_samples - n_held :].sort().values


def fvu(x: Tensor, reconstruction: Tensor) -> Tensor:
    """sparsify's fraction of variance unexplained: squared error over the total variance of the batch."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - reconstruction).pow(2).sum() / total


@torch.no_grad()
def evaluate(sae: SparseAutoencoder, tokens: Tensor, batch: int = 8192) -> dict[str, float]:
    """Fraction of variance explained (1 - FVU over all tokens) and the fraction of latents that never fire."""
    errors = 0.0
    fired = torch.zeros(sae.num_latents, dtype=torch.bool)
    for start in range(0, len(tokens), batch):
        x = tokens[start : start + batch]
        codes = sae.encode(x)
        errors += float((x - sae.decode(codes)).pow(2).sum())
        fired |= (codes > 0).any(0)
    total = float((tokens - tokens.mean(0)).pow(2).sum())
    return {"fve": 1.0 - errors / total, "dead_fraction": float((~fired).float().mean()), "tokens": len(tokens)}


def init_sae(d_in: int, config: SaeTrainConfig, data: Tensor) -> SparseAutoencoder:
    torch.manual_seed(config.seed)
    sae = SparseAutoencoder(d_in, d_in * config.expansion_factor, activation="topk", k=config.k)
    reference = nn.Linear(d_in, sae.num_latents)
    with torch.no_grad():
        sae.encoder.weight.copy_(reference.weight)
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(reference.weight / reference.weight.norm(dim=1, keepdim=True))
        sae.b_dec.copy_(data.mean(0))
    return sae


def train_sae(tokens: Tensor, config: SaeTrainConfig) -> tuple[SparseAutoencoder, list[float]]:
    """A TopK SAE trained on tokens [N, C] by FVU with Adam; deterministic from `config.seed`."""
    sae = init_sae(tokens.shape[1], config, tokens)
    lr = config.lr or 2e-4 / math.sqrt(sae.num_latents / 2**14)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(config.seed + 1)
    steps_per_epoch = max(1, len(tokens) // config.batch_size)
    losses: list[float] = []
    bar = tqdm(range(config.epochs * steps_per_epoch), desc="sae", disable=not config.progress, dynamic_ncols=True)
    order = torch.randperm(len(tokens), generator=generator)
    sae.train()
    for step in bar:
        if step and step % steps_per_epoch == 0:
            order = torch.randperm(len(tokens), generator=generator)
        i = step % steps_per_epoch
        x = tokens[order[i * config.batch_size : (i + 1) * config.batch_size]]
        loss = fvu(x, sae(x))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            assert sae.W_dec.grad is not None
            parallel = (sae.W_dec.grad * sae.W_dec).sum(-1, keepdim=True)
            sae.W_dec.grad -= parallel * sae.W_dec
        optimizer.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(sae.W_dec.dtype).eps)
        losses.append(loss.item())
        bar.set_postfix(fvu=f"{np.mean(losses[-50:]):.4f}")
    return sae.eval(), losses


def prompt_plan(config: ExperimentConfig) -> tuple[list[str], list[int]]:
    """The capture stage's samples: every prompt `num_images_per_prompt` times, sample i seeded `seed + i`."""
    from ddr.stages.capture import load_dataset

    settings = config.stages.capture
    prompts = load_dataset(config).prompts
    prompts = prompts[: settings.dev_n_prompts] if settings.dev_n_prompts else prompts
    samples = [p for p in prompts for _ in range(settings.num_images_per_prompt)]
    return samples, [settings.seed + i for i in range(len(samples))]


def run_training(output: str | Path, overrides: list[str], config: SaeTrainConfig) -> dict[str, Any]:
    from ddr.models.pipeline import load_pipeline
    from ddr.provision import provision

    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    experiment = load_config([*overrides, "use_sae=false"])
    provision(experiment)
    pipe = load_pipeline(experiment)
    prompts, seeds = prompt_plan(experiment)
    data = collect_tokens(pipe, prompts, seeds, experiment, config.generation_batch, config.progress)
    _, held_ids = split_samples(len(prompts), config.holdout, config.seed)
    is_held = torch.isin(data.sample, held_ids)
    train_tokens, held_tokens = data.tokens[~is_held], data.tokens[is_held]
    sae, losses = train_sae(train_tokens, config)
    folder = Path(output) / f"unet.{experiment.target_layer_name.removeprefix('unet.')}"
    save_sae(sae, folder)
    report = {
        "model": experiment.model.name,
        "layer": experiment.target_layer_name,
        "prompt_dataset": experiment.stages.capture.prompt_dataset,
        "num_inference_steps": experiment.num_inference_steps,
        "guidance_scale": experiment.guidance_scale,
        "samples": len(prompts),
        "heldout_samples": len(held_ids),
        "train_tokens": len(train_tokens),
        "d_in": sae.d_in,
        "num_latents": sae.num_latents,
        "k": sae.k,
        "final_train_fvu_mean_last_50": float(np.mean(losses[-50:])),
        "train": evaluate(sae, train_tokens),
        "heldout": evaluate(sae, held_tokens) if len(held_tokens) else None,
        "seconds": round(time.perf_counter() - started, 1),
        "config": {**asdict(config), "overrides": overrides},
    }
    (Path(output) / "sae_training.json").write_text(json.dumps(report, indent=1) + "\n")
    return {"folder": str(folder), **report}


def main(argv: list[str] | None = None) -> int:
    from ddr.toy.cli import main as cli_main

    return cli_main(["train-sae", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
