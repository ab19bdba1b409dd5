"""Train the `toy-shapes` model: a small Stable Diffusion pipeline that draws the shapes dataset on a CPU.

Three parts, trained in order from one seed:

1. a small `AutoencoderKL` (32x32 RGB <-> 8x8x4 latents, downsampling factor 4) on reconstruction
   (L1 + MSE) plus a small KL term; its latents' scale sets `scaling_factor` as in SD;
2. a UNet with SD's block layout at toy width (so `up_blocks.1.attentions.1` exists) and
3. a small CLIP text encoder over a word-level CLIP tokenizer (the caption words are single BPE
   tokens, any other text falls back to characters), trained jointly on DDPM's noise-prediction
   loss with SD's noise schedule; captions are dropped to "" with probability `cfg_dropout` so
   classifier-free guidance works. The saved weights are an exponential moving average.

The result is a diffusers `StableDiffusionPipeline` folder (safetensors) with SD's PNDM
sampling scheduler, loaded by `StableDiffusionPipeline.from_pretrained` like any SD model.

    ddr train-toy --output assets/toy-shapes --steps 3000 --seed 0 --threads 1

That is how the shipped `assets/toy-shapes` was made (13 minutes on one shared CPU core; 6 MB:
UNet and VAE weights are stored as float16). On a CPU, one thread is usually fastest: the
models are small, and more threads mostly wait on each other, badly so on a shared machine.
Sample it with guidance_scale about 2: SD's 7.5 overshoots on a model whose captions fix every
colour.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ddr.models import generated
from ddr.models.generated import SD_SCHEDULER, SPECIAL_TOKENS, _byte_alphabet
from ddr.toy import shapes

MAX_TOKENS = 16
"""Tokens per prompt (the tokenizer's `model_max_length`): a caption is at most 10 word tokens."""
TRAIN_SCHEDULER = {k: v for k, v in SD_SCHEDULER.items() if k in ("beta_start", "beta_end", "beta_schedule")} | {
    "num_train_timesteps": 1000
}


@dataclass
class ToyTrainConfig:
    steps: int = 3000
    """UNet + text-encoder optimisation steps."""
    vae_steps: int = 2000
    seed: int = 0
    threads: int = 1
    n_samples: int = 6000
    """Training images (drawn from the training captions; held-out captions are never shown)."""
    batch_size: int = 32
    vae_batch_size: int = 16
    lr: float = 1e-3
    vae_lr: float = 2e-3
    warmup: int = 100
    cfg_dropout: float = 0.1
    ema_decay: float = 0.999
    kl_weight: float = 1e-3
    grad_clip: float = 1.0
    widths: tuple[int, ...] = (32, 64, 64, 64)
    text_width: int = 64
    eval_samples: int = 64
    progress: bool = True


@dataclass
class ToyTrainResult:
    folder: Path
    seconds: float
    vae_losses: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    initial_eval_loss: float = math.nan
    final_eval_loss: float = math.nan
    initial_vae_eval_loss: float = math.nan
    final_vae_eval_loss: float = math.nan

    def summary(self) -> dict[str, Any]:
        tail = self.losses[-100:] or [math.nan]
        return {
            "folder": str(self.folder),
            "seconds": round(self.seconds, 1),
            "final_train_loss_mean_last_100": float(np.mean(tail)),
            "eval_loss": [self.initial_eval_loss, self.final_eval_loss],
            "vae_eval_loss": [self.initial_vae_eval_loss, self.final_vae_eval_loss],
        }


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word one token (`word</w>`); deterministic (ties broken by the pair).

    Merges are learned on the words themselves, so applying them by rank (what CLIP's tokenizer
    does) reproduces the learned segmentation: each word ends as a single symbol.
    """
    segments = {w: [*w[:-1], w[-1] + "</w>"] for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for seg in segments.values():
            pairs.update(itertools.pairwise(seg))
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        for word, seg in segments.items():
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            segments[word] = out


def make_caption_tokenizer(folder: Path, words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is bytes, bytes + end-of-word, one token per caption word, then
    <|startoftext|> and <|endoftext|>; `model_max_length` is `MAX_TOKENS`."""
    words = words if words is not None else shapes.vocabulary()
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    merges = _learn_merges(words)
    tokens = alphabet + [c + "</w>" for c in alphabet]
    tokens += [a + b for a, b in merges if a + b not in set(tokens)]
    tokens += list(SPECIAL_TOKENS)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"caption word {word!r} is not a single token: {ids}")
    return tokenizer


def build_models(
    config: ToyTrainConfig, tokenizer: CLIPTokenizer
) -> tuple[AutoencoderKL, UNet2DConditionModel, CLIPTextModel]:
    """Seeded initial VAE, UNet (SD's block layout at toy width) and CLIP text encoder."""
    torch.manual_seed(config.seed)
    latent_size = shapes.IMAGE_SIZE // 4
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=shapes.IMAGE_SIZE,
        mid_block_add_attention=False,
    )
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(config.widths),
        layers_per_block=1,
        cross_attention_dim=config.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vocab = tokenizer.get_vocab()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=config.text_width,
            intermediate_size=2 * config.text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            hidden_act="quick_gelu",
            bos_token_id=vocab[SPECIAL_TOKENS[0]],
            eos_token_id=vocab[SPECIAL_TOKENS[1]],
            pad_token_id=vocab[SPECIAL_TOKENS[1]],
        )
    )
    return vae, unet, text_encoder


def _to_tensor(images: np.ndarray) -> Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _batches(n: int, batch: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """Index batches for `steps` steps: epochs of seeded permutations, concatenated."""
    order: list[Tensor] = []
    total = 0
    while total < steps * batch:
        order.append(torch.randperm(n, generator=generator))
        total += n
    flat = torch.cat(order)
    return [flat[i * batch : (i + 1) * batch] for i in range(steps)]


def _vae_loss(vae: AutoencoderKL, x: Tensor, generator: torch.Generator, kl_weight: float) -> Tensor:
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    return F.l1_loss(recon, x) + F.mse_loss(recon, x) + kl_weight * posterior.kl().mean() / x[0].numel()


@torch.no_grad()
def vae_eval_loss(vae: AutoencoderKL, x: Tensor) -> float:
    """Reconstruction MSE of the posterior mean on x (in [-1, 1] units)."""
    return float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x))


def train_vae(vae: AutoencoderKL, images: Tensor, config: ToyTrainConfig) -> list[float]:
    generator = torch.Generator().manual_seed(config.seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses = []
    vae.train()
    batches = _batches(len(images), config.vae_batch_size, config.vae_steps, generator)
    bar = tqdm(batches, desc="vae", disable=not config.progress, dynamic_ncols=True)
    for step, idx in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = config.vae_lr * _lr_factor(step, config.vae_steps, min(config.warmup, config.vae_steps // 10))
        loss = _vae_loss(vae, images[idx], generator, config.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: Tensor, batch: int = 256) -> Tensor:
    """Posterior means of the images (unscaled)."""
    vae.eval()
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> Tensor:
    """Token ids as the SD pipeline makes them (padded to `model_max_length`)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _noise_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    latents: Tensor,
    ids: Tensor,
    noise: Tensor,
    timesteps: Tensor,
) -> Tensor:
    noisy = scheduler.add_noise(latents, noise, timesteps)
    context = text_encoder(ids)[0]
    return F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=context).sample, noise)


@torch.no_grad()
def eval_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    latents: Tensor,
    ids: Tensor,
    seed: int,
) -> float:
    """The noise-prediction loss on fixed samples, noise and evenly spread timesteps (comparable across steps)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.linspace(0, scheduler.config.num_train_timesteps - 1, len(latents)).long()
    return float(_noise_loss(unet, text_encoder, scheduler, latents, ids, noise, timesteps))


class Ema:
    """Exponential moving average of a module's parameters, with diffusers' (1 + n) / (10 + n) warmup."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema, param in zip(self.shadow.parameters(), module.parameters(), strict=True):
            ema.lerp_(param, 1 - decay)


def train_denoiser(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    latents: Tensor,
    ids: Tensor,
    empty_ids: Tensor,
    config: ToyTrainConfig,
) -> tuple[list[float], Ema, Ema]:
    """DDPM noise-prediction training of the UNet and text encoder; returns losses and the EMA copies."""
    scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    generator = torch.Generator().manual_seed(config.seed + 2)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.01)
    ema_unet, ema_text = Ema(unet, config.ema_decay), Ema(text_encoder, config.ema_decay)
    unet.train()
    text_encoder.train()
    losses: list[float] = []
    batches = _batches(len(latents), config.batch_size, config.steps, generator)
    bar = tqdm(batches, desc="unet", disable=not config.progress, dynamic_ncols=True)
    for step, idx in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, config.steps, min(config.warmup, config.steps // 10))
        batch_ids = ids[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < config.cfg_dropout
        batch_ids[drop] = empty_ids
        x = latents[idx]
        noise = torch.randn(x.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        loss = _noise_loss(unet, text_encoder, scheduler, x, batch_ids, noise, timesteps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses, ema_unet, ema_text


def save_pipeline(
    folder: Path,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    half: bool = True,
) -> Path:
    """A diffusers StableDiffusionPipeline folder (safetensors) with SD's PNDM sampling scheduler.

    With `half`, the UNet and VAE weights are stored as float16 (half the size); diffusers loads
    them back as float32 unless told otherwise. The text encoder stays float32 (it is small, and
    transformers would load it as float16, which the float32 UNet would then be fed).
    """
    if half:
        vae, unet = copy.deepcopy(vae).half(), copy.deepcopy(unet).half()
    return generated.save_pipeline(folder, unet, vae, text_encoder, tokenizer)


def _set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    # Inter-op threads are only settable before the first parallel work; the intra-op setting is what matters.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(threads)


def train_toy(output: str | Path, config: ToyTrainConfig | None = None) -> ToyTrainResult:
    """Train the toy-shapes pipeline into `output` (replaced if it exists); deterministic from `config.seed`."""
    config = config or ToyTrainConfig()
    threads = torch.get_num_threads()
    _set_threads(config.threads)
    try:
        return _train_toy(Path(output), config)
    finally:
        torch.set_num_threads(threads)


def _train_toy(output: Path, config: ToyTrainConfig) -> ToyTrainResult:
    started = time.perf_counter()
    images_np, samples = shapes.make_dataset(config.n_samples, config.seed)
    images = _to_tensor(images_np)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_caption_tokenizer(Path(tmp))
    vae, unet, text_encoder = build_models(config, tokenizer)
    result = ToyTrainResult(folder=output, seconds=0.0)

    held = images[: config.eval_samples]
    result.initial_vae_eval_loss = vae_eval_loss(vae, held)
    result.vae_losses = train_vae(vae, images, config)
    result.final_vae_eval_loss = vae_eval_loss(vae, held)

    raw = encode_latents(vae, images)
    scaling = float(1.0 / raw.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = raw * scaling
    ids = tokenize(tokenizer, [s.caption for s in samples])
    empty_ids = tokenize(tokenizer, [""])[0]

    scheduler = DDPMScheduler(**TRAIN_SCHEDULER)
    n_eval = min(config.eval_samples, len(latents))
    result.initial_eval_loss = eval_loss(unet, text_encoder, scheduler, latents[:n_eval], ids[:n_eval], config.seed)
    result.losses, ema_unet, ema_text = train_denoiser(unet, text_encoder, latents, ids, empty_ids, config)
    result.final_eval_loss = eval_loss(
        ema_unet.shadow, ema_text.shadow, scheduler, latents[:n_eval], ids[:n_eval], config.seed
    )

    if output.exists():
        shutil.rmtree(output)
    save_pipeline(output, vae, ema_unet.shadow, ema_text.shadow, tokenizer)
    result.seconds = time.perf_counter() - started
    info = {"config": asdict(config), **result.summary()}
    info.pop("folder")
    (output / "toy_training.json").write_text(json.dumps(info, indent=1) + "\n")
    return result


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    from ddr.toy.cli import main as cli_main

    return cli_main(["train-toy", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
