"""The toy-shapes model: its dataset, its training, the shipped pipeline and SAE, and that it draws what it is told.

Nothing here retrains the shipped model: the quality and SAE checks load `assets/toy-shapes`
and `assets/toy-shapes-sae`; training is checked with a run of a few steps on a few samples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from ddr.config import load_config
from ddr.hooks import find_layer
from ddr.models.sae import load_sae
from ddr.provision import REPO_ROOT
from ddr.toy import quality, shapes
from ddr.toy.train import ToyTrainConfig, make_caption_tokenizer, train_toy
from ddr.toy.train_sae import collect_tokens, evaluate

MODEL = REPO_ROOT / "assets" / "toy-shapes"
SAE = REPO_ROOT / "assets" / "toy-shapes-sae"
HOOKPOINT = "unet.up_blocks.1.attentions.1"


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_dataset_is_deterministic_and_captions_match_the_pixels() -> None:
    images, samples = shapes.make_dataset(60, seed=3)
    again, same = shapes.make_dataset(60, seed=3)
    other, _ = shapes.make_dataset(60, seed=4)
    assert np.array_equal(images, again) and samples == same
    assert not np.array_equal(images, other)
    assert images.shape == (60, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and images.dtype == np.uint8
    held = set(shapes.heldout_captions())
    for image, sample in zip(images, samples, strict=True):
        assert shapes.parse_caption(sample.caption) == sample.attributes
        assert sample.caption not in held  # training draws only training captions
        centre = image[int(sample.cy), int(sample.cx)]
        assert tuple(centre) == shapes.COLOURS[sample.colour], sample
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            assert tuple(corner) == shapes.COLOURS[sample.background], sample
        assert shapes.read_colours(image) == (sample.colour, sample.background)


def test_split_and_prompt_file(tmp_path: Path) -> None:
    train, held = shapes.split_attributes()
    assert len(held) == 15 and len(train) + len(held) == len(shapes.all_attributes()) == 150
    assert not set(train) & set(held)
    assert {a.colour for a in train} == set(shapes.COLOURS) and {a.shape for a in train} == set(shapes.SHAPES)
    lines = shapes.write_prompt_file(tmp_path / "prompts.txt").read_text().splitlines()
    assert len(lines) == 150 and set(shapes.heldout_captions()) <= set(lines)
    shipped = (REPO_ROOT / "configs" / "datasets" / "toy_shapes_prompts.txt").read_text().splitlines()
    assert shipped == lines


def test_caption_words_are_single_tokens(tmp_path: Path) -> None:
    tokenizer = make_caption_tokenizer(tmp_path)
    ids = tokenizer("a red circle on a blue background").input_ids
    assert len(ids) == 2 + 7
    assert len(tokenizer("a purple dog").input_ids) > 2 + 3  # unknown words fall back to characters


def test_shipped_pipeline_loads_with_sd_layout(pipe: StableDiffusionPipeline) -> None:
    assert find_layer(pipe.unet, "up_blocks.1.attentions.1") is not None
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == shapes.IMAGE_SIZE
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.scheduler.config.skip_prk_steps
    config = load_config(["model=toy-shapes"])
    assert config.model.image_size == shapes.IMAGE_SIZE
    files = [p for p in MODEL.rglob("*") if p.is_file()]
    assert all(p.suffix in (".json", ".safetensors") for p in files), files
    assert sum(p.stat().st_size for p in files) < 10 * 2**20


def _tiny_run(folder: Path) -> tuple[dict[str, torch.Tensor], object]:
    config = ToyTrainConfig(
        steps=12, vae_steps=8, n_samples=16, batch_size=8, vae_batch_size=8, eval_samples=8, progress=False
    )
    result = train_toy(folder, config)
    weights = {}
    for part in ("unet", "vae"):
        weights.update(
            {f"{part}.{k}": v for k, v in load_file(folder / part / "diffusion_pytorch_model.safetensors").items()}
        )
    weights.update({f"text.{k}": v for k, v in load_file(folder / "text_encoder" / "model.safetensors").items()})
    return weights, result


def test_short_training_reduces_loss_and_is_deterministic(tmp_path: Path) -> None:
    first, result = _tiny_run(tmp_path / "a")
    second, _ = _tiny_run(tmp_path / "b")
    assert result.final_eval_loss < 0.8 * result.initial_eval_loss
    assert result.final_vae_eval_loss < result.initial_vae_eval_loss
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "a", safety_checker=None)
    assert find_layer(loaded.unet, "up_blocks.1.attentions.1") is not None
    assert json.loads((tmp_path / "a" / "toy_training.json").read_text())["config"]["steps"] == 12


def test_toy_model_draws_held_out_captions(pipe: StableDiffusionPipeline) -> None:
    """A smaller version of benchmarks/toy_quality.py: 20 samples of captions never seen in training."""
    captions = shapes.heldout_captions()
    captions = (captions * 2)[:20]
    seeds = [500 + i for i in range(20)]
    agreement = quality.caption_agreement(pipe, captions, seeds, num_inference_steps=20, guidance_scale=2.0)
    assert agreement.fraction >= 0.8, list(zip(agreement.captions, agreement.read, strict=True))


def test_shipped_sae_explains_fresh_held_out_activations(pipe: StableDiffusionPipeline, tmp_path: Path) -> None:
    sae = load_sae(SAE, hookpoint=HOOKPOINT)
    config = load_config(
        [f"data_root={tmp_path}", "model=toy-shapes", "num_inference_steps=10", "guidance_scale=2", "use_sae=false"]
    )
    captions = shapes.heldout_captions()[:6]
    data = collect_tokens(pipe, captions, [9000 + i for i in range(len(captions))], config)
    # 11 UNet calls x 2 CFG halves x (2 x 2) tokens per sample.
    assert data.tokens.shape == (len(captions) * 11 * 2 * 4, sae.d_in)
    result = evaluate(sae, data.tokens)
    assert result["fve"] >= 0.8, result
    report = json.loads((SAE / "sae_training.json").read_text())
    assert report["heldout"]["fve"] >= 0.8


def test_capture_runs_on_toy_shapes_with_its_sae(tmp_path: Path) -> None:
    """What `ddr run capture model=toy-shapes sae=toy-shapes-topk stages.capture.prompt_dataset=toy-shapes` runs."""
    import xarray as xr
    from PIL import Image

    from ddr import stores
    from ddr.provision import provision
    from ddr.stages import capture

    config = load_config(
        [
            f"data_root={tmp_path}",
            "model=toy-shapes",
            "sae=toy-shapes-topk",
            "stages.capture.prompt_dataset=toy-shapes",
            "num_inference_steps=4",
            "guidance_scale=2",
            "stages.capture.dev_n_prompts=3",
            "stages.capture.samples_per_shard=2",
            "stages.capture.batch_size=2",
        ]
    )
    provision(config)
    plan = capture.plan_capture(config)
    assert len(plan.prompt_file.prompts) == 150
    capture.prepare_store(config, plan)
    for shard in capture.pending_shards(config, plan):
        capture.capture_shard(config, shard)
    ds = xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).capture_store)
    assert ds.raw.shape == (3, 5, 64) and ds.sae.shape == (3, 5, 256)
    assert np.isfinite(ds.raw.values).all() and (ds.sae.values >= 0).all() and (ds.sae.values > 0).any()
    image = Image.open(config.experiment_dir / str(ds.image.values[0]))
    assert image.size == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)


def test_train_sae_command_collects_trains_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    out = tmp_path / "sae"
    overrides = [
        f"data_root={tmp_path / 'data'}",
        "model=toy-shapes",
        "stages.capture.prompt_dataset=toy-shapes-heldout",
        "stages.capture.dev_n_prompts=5",
        "num_inference_steps=3",
        "guidance_scale=2",
    ]
    assert (
        main(["train-sae", "--output", str(out), "--epochs", "3", "--holdout", "0.4", "--no-progress", *overrides]) == 0
    )
    assert "held-out fraction of variance explained" in capsys.readouterr().out
    sae = load_sae(out, hookpoint=HOOKPOINT)
    assert (sae.d_in, sae.num_latents, sae.k) == (64, 256, 8)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.num_latents), atol=1e-5)
    report = json.loads((out / "sae_training.json").read_text())
    # 5 prompts, 2 held out; 4 UNet calls x 2 CFG halves x 4 tokens per sample.
    assert report["heldout_samples"] == 2 and report["train_tokens"] == 3 * 4 * 2 * 4
    assert 0 <= report["heldout"]["dead_fraction"] <= 1 and report["heldout"]["fve"] <= 1
