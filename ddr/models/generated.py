"""Models made from configs with seeded random weights, so tests and the demo never download.

`tiny` keeps Stable Diffusion's block layout (so `up_blocks.1.attentions.1` exists) at toy
width; `sd14-random` has SD v1.4's real architecture for benchmarks. Both are written with
`save_pretrained` and loaded back with `from_pretrained`, the same code path as a real model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
)
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the base of a byte-level BPE vocab)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return [chr(c) for c in codes]


def make_tokenizer(folder: Path) -> CLIPTokenizer:
    """A character-level CLIP tokenizer: every byte (and byte + end-of-word) is a token, no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + list(SPECIAL_TOKENS)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _text_encoder(hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> CLIPTextModel:
    n_tokens = 2 * len(_byte_alphabet()) + len(SPECIAL_TOKENS)
    config = CLIPTextConfig(
        vocab_size=max(vocab, n_tokens),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=n_tokens - 2,
        eos_token_id=n_tokens - 1,
        pad_token_id=n_tokens - 1,
    )
    return CLIPTextModel(config)


def save_pipeline(
    folder: Path,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
) -> Path:
    """A StableDiffusionPipeline folder (safetensors) with SD's PNDM sampling scheduler and no safety checker."""
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=PNDMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _save_pipeline(folder: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> Path:
    """Saved with the generated character-level tokenizer (its source files are removed afterwards)."""
    source = folder / "_tokenizer_src"
    save_pipeline(folder, unet, vae, text_encoder, make_tokenizer(source))
    for p in source.iterdir():
        p.unlink()
    source.rmdir()
    return folder


def build_tiny(folder: Path, seed: int = 0) -> Path:
    """SD's UNet block layout at toy width (a few MB), a 2-layer CLIP text encoder and a small VAE."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
    )
    text_encoder = _text_encoder(hidden=32, layers=2, heads=4, intermediate=64, vocab=0)
    return _save_pipeline(folder, unet, vae, text_encoder)


def build_sd14_random(folder: Path, seed: int = 0) -> Path:
    """Stable Diffusion v1.4's architecture (UNet 860M, CLIP ViT-L/14 text, SD VAE) with random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text_encoder = _text_encoder(hidden=768, layers=12, heads=12, intermediate=3072, vocab=49408)
    return _save_pipeline(folder, unet, vae, text_encoder)


MODEL_GENERATORS: dict[str, Callable[..., Path]] = {"tiny": build_tiny, "sd14-random": build_sd14_random}


def generate_model(generator: str, folder: Path, args: dict[str, Any]) -> Path:
    if generator not in MODEL_GENERATORS:
        raise ValueError(f"unknown model generator {generator!r}; allowed: {', '.join(MODEL_GENERATORS)}")
    return MODEL_GENERATORS[generator](folder, **args)
