"""Where dreams start: VAE-encoded images, the mean spectrum of real latents (cached), top examples, noising."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig
from ddr.dream import sources
from ddr.dream.sources import encode_images, example_starts, latent_spectrum, mean_latent_spectrum, noised
from ddr.models.pipeline import load_pipeline
from tests.conftest import tiny_config
from tests.helpers import run_capture, write_zarr

SIZE = ["image_size=64", "stages.capture.dev_n_prompts=4"]  # 4 samples, latents [4, 8, 8]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """A tiny experiment whose capture stage ran in-process (images saved)."""
    config = tiny_config(tmp_path_factory.mktemp("sources"), *SIZE)
    run_capture(config)
    return config


def layout(config: ExperimentConfig) -> stores.ExperimentLayout:
    return stores.ExperimentLayout(config.experiment_dir)


def capture_images(config: ExperimentConfig, samples: list[int]) -> list[Image.Image]:
    names = stores.open_store(layout(config).capture_store)["image"][:]
    return [Image.open(config.experiment_dir / names[s]).convert("RGB") for s in samples]


def counting_encoder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace `sources.encode_images` by a wrapper recording how many images each call encodes."""
    calls: list[int] = []
    real = sources.encode_images

    def counted(pipe: Any, images: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(len(images))
        return real(pipe, images, *args, **kwargs)

    monkeypatch.setattr(sources, "encode_images", counted)
    return calls


# --- encode_images ------------------------------------------------------------------------------


def test_encode_images_is_the_scaled_posterior_mean_of_the_pixels(captured: ExperimentConfig) -> None:
    pipe = load_pipeline(captured)
    colours = [(255, 255, 255), (0, 0, 0), (255, 0, 0)]
    images = [Image.new("RGB", (64, 64), c) for c in colours]
    # pixels map to [-1, 1]: white 1, black -1, red (1, -1, -1)
    hand = torch.stack([torch.tensor([1.0, 1, 1]), torch.tensor([-1.0, -1, -1]), torch.tensor([1.0, -1, -1])])
    pixels = hand.view(3, 3, 1, 1).expand(3, 3, 64, 64)
    with torch.no_grad():
        expected = pipe.vae.encode(pixels).latent_dist.mean * 0.18215  # AutoencoderKL's scaling_factor
    assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
    latents = encode_images(pipe, images, batch=2)
    assert latents.shape == (3, 4, 8, 8) and latents.dtype == torch.float32
    assert torch.allclose(latents, expected, atol=1e-5)
    assert torch.equal(encode_images(pipe, images, batch=2), latents)  # the mean, not a posterior sample
    small = Image.new("RGB", (32, 32), colours[2])  # a constant image stays constant when resized
    assert torch.allclose(encode_images(pipe, [small], size=64), latents[2:], atol=1e-5)
    with pytest.raises(ValueError, match=r"sizes \[\(32, 32\), \(64, 64\)\]; pass size="):
        encode_images(pipe, [small, images[0]])


# --- the spectrum -------------------------------------------------------------------------------


def test_mean_latent_spectrum_hand_computed() -> None:
    h, w = 4, 6
    constant = torch.tensor([[1.0, -3.0], [2.0, 5.0]]).view(2, 2, 1, 1).expand(2, 2, h, w)
    spectrum = mean_latent_spectrum(constant)
    expected = torch.zeros(2, h, w // 2 + 1)
    # a constant v has only a DC bin: |sum v| / sqrt(h w) = |v| sqrt(h w); the mean over the two samples
    expected[:, 0, 0] = torch.tensor([(1 + 2) / 2, (3 + 5) / 2]) * math.sqrt(h * w)
    assert spectrum.shape == (2, h, w // 2 + 1) and torch.allclose(spectrum, expected, atol=1e-5)
    # cos(2 pi x / w) along x: bin (ky 0, kx 1) holds h * w / 2 / sqrt(h w) = sqrt(h w) / 2; mean with a zero latent
    cosine = torch.cos(2 * math.pi * torch.arange(w) / w).expand(1, 1, h, w)
    two = torch.cat([cosine, torch.zeros_like(cosine)])
    expected = torch.zeros(1, h, w // 2 + 1)
    expected[0, 0, 1] = math.sqrt(h * w) / 4
    assert torch.allclose(mean_latent_spectrum(two), expected, atol=1e-5)
    assert torch.allclose(mean_latent_spectrum(iter([constant[:1], constant[1:]])), spectrum)  # streamed
    with pytest.raises(ValueError, match="no latents"):
        mean_latent_spectrum(iter([]))


def test_latent_spectrum_from_capture_is_cached_and_recomputed_when_stale(
    captured: ExperimentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = load_pipeline(captured)
    expected = mean_latent_spectrum(encode_images(pipe, capture_images(captured, [0, 1, 2])))
    calls = counting_encoder(monkeypatch)
    spectrum = latent_spectrum(captured, "capture", "raw", max_images=3, batch=2)
    assert spectrum.shape == (4, 8, 5) and torch.allclose(spectrum, expected, atol=1e-5)
    assert calls == [2, 1]
    path = layout(captured).spectrum_store("capture")
    written = (path / "zarr.json").stat().st_mtime_ns
    again = latent_spectrum(captured, "capture", "raw", max_images=3)
    assert torch.equal(again, spectrum) and calls == [2, 1]  # read from the cache, nothing encoded
    assert (path / "zarr.json").stat().st_mtime_ns == written
    more = latent_spectrum(captured, "capture", "raw", max_images=4)
    assert calls == [2, 1, 4] and not torch.allclose(more, spectrum)
    with xr.open_zarr(path, chunks=None) as ds:
        assert ds["magnitude"].dims == ("latent_channel", "y", "kx") and ds.attrs["n_latents"] == 4
        assert np.array_equal(ds["magnitude"].values, more.numpy())


def test_latent_spectrum_from_priors_skips_unwritten_rows(captured: ExperimentConfig) -> None:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 2, 4, 8, 8)).astype(np.float32)
    latents[0, 1] = np.nan  # channel 7's second result is not written yet
    ds = xr.Dataset(
        {"latent": (("channel", "result", "latent_channel", "y", "x"), latents)},
        coords={"channel": np.asarray([7, 9], dtype=np.int64)},
    )
    write_zarr(ds, layout(captured).prior_store("raw"))
    spectrum = latent_spectrum(captured, "prior", "raw", max_images=2)
    expected = mean_latent_spectrum(torch.from_numpy(latents[[0, 1], [0, 0]]))  # (7, 0) and (9, 0)
    assert torch.allclose(spectrum, expected, atol=1e-6)
    every = latent_spectrum(captured, "prior", "raw", max_images=10)
    assert torch.allclose(every, mean_latent_spectrum(torch.from_numpy(latents.reshape(4, 4, 8, 8)[[0, 2, 3]])))
    assert layout(captured).spectrum_store("prior", "raw").name == "prior_raw.zarr"


def test_latent_spectrum_errors(captured: ExperimentConfig, tmp_path: Path) -> None:
    bare = tiny_config(captured.data_root, *SIZE, "experiment_name=bare")
    with pytest.raises(FileNotFoundError, match="run the prior stage for raw first"):
        latent_spectrum(bare, "prior", "raw", max_images=2)
    with pytest.raises(FileNotFoundError, match="run the capture stage first"):
        latent_spectrum(bare, "capture", "raw", max_images=2)
    with pytest.raises(ConfigError, match="allowed: capture, prior"):
        latent_spectrum(bare, "pixels", "raw", max_images=2)  # type: ignore[arg-type]
    write_zarr(
        xr.Dataset(
            {"latent": (("channel", "result", "a", "y", "x"), np.full((1, 2, 4, 8, 8), np.nan, np.float32))},
            coords={"channel": [3]},
        ),
        layout(bare).prior_store("raw"),
    )
    with pytest.raises(ValueError, match="holds no written priors yet"):
        latent_spectrum(bare, "prior", "raw", max_images=2)
    layout(bare).capture_dir.mkdir(parents=True)
    stores.create_capture_store(
        layout(bare).capture_store,
        prompts=["a", "b"],
        seeds=np.arange(2),
        images=["", ""],
        timesteps=np.arange(3),
        n_channels=2,
        n_features=None,
        chunk_samples=2,
        dtype="float32",
        attrs={},
    )
    with pytest.raises(ValueError, match="save_images=false"):
        latent_spectrum(bare, "capture", "raw", max_images=2)


# --- example starts -----------------------------------------------------------------------------


def test_ranked_examples_merges_the_nearest_calls_by_activation() -> None:
    captured_calls = np.asarray([831, 665, 665, 499])
    top_sample = np.asarray([[0, 1, -1], [4, 2, -1], [2, 5, 3], [6, -1, -1]])
    top_value = np.asarray([[9, 8, np.nan], [0.8, 0.2, np.nan], [0.7, 0.6, 0.1], [5, np.nan, np.nan]])
    assert sources.ranked_examples(top_sample, top_value, captured_calls, 660) == [4, 2, 5, 3]
    assert sources.ranked_examples(top_sample, top_value, captured_calls, 0) == [6]
    # 582 is 83 from both 665 and 499: the three calls merge
    assert sources.ranked_examples(top_sample, top_value, captured_calls, 582) == [6, 4, 2, 5, 3]


def test_example_starts_encode_the_planted_top_examples_once(
    captured: ExperimentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = stores.open_store(layout(captured).capture_store)["timestep"][:]
    n_calls = len(calls)
    assert n_calls == 7 and calls[1] == calls[2]  # tiny's PNDM at 6 steps visits one value twice
    top_sample = np.full((3, n_calls, 3), -1, dtype=np.int64)
    top_value = np.full((3, n_calls, 3), np.nan, dtype=np.float32)
    top_sample[1, 3], top_value[1, 3] = [2, 0, 3], [0.9, 0.5, 0.1]  # channel 5 at the call with value calls[3]
    top_sample[2, 1, :2], top_value[2, 1, :2] = [1, 3], [0.8, 0.2]  # channel 9 at the repeated value:
    top_sample[2, 2, :2], top_value[2, 2, :2] = [3, 0], [0.7, 0.6]  # merged -> 1, 3, 0
    top_sample[0, 6, 0], top_value[0, 6, 0] = 3, 1.0  # channel 0: one example at the last call
    ds = xr.Dataset(
        {
            "top_sample": (("channel", "timestep", "rank"), top_sample),
            "top_value": (("channel", "timestep", "rank"), top_value),
        },
        coords={"channel": np.asarray([0, 5, 9]), "timestep": calls},
        attrs={"capture_store": str(layout(captured).capture_store)},
    )
    write_zarr(ds, layout(captured).analysis_store("raw"))
    encoded = counting_encoder(monkeypatch)
    targets = [(5, int(calls[3]) - 10), (9, int(calls[1])), (0, 0)]
    latents, samples = example_starts(captured, "raw", targets, n=3, batch=8)
    assert samples.dtype == np.int64 and samples.tolist() == [[2, 0, 3], [1, 3, 0], [3, 3, 3]]
    assert encoded == [4]  # samples 2, 0, 3, 1: each encoded once
    pipe = load_pipeline(captured)
    expected = encode_images(pipe, capture_images(captured, samples.ravel().tolist())).view(3, 3, 4, 8, 8)
    assert latents.shape == (3, 3, 4, 8, 8) and torch.allclose(latents, expected, atol=1e-5)
    with pytest.raises(ValueError, match="channel 7 is not in"):
        example_starts(captured, "raw", [(7, 0)], n=1)
    with pytest.raises(ValueError, match="no dataset examples near t=999"):
        example_starts(captured, "raw", [(0, 999)], n=1)


# --- noised -------------------------------------------------------------------------------------


def test_noised_is_the_forward_process_with_seeded_noise(captured: ExperimentConfig) -> None:
    scheduler = load_pipeline(captured).scheduler
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    noise = [torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(s))[0] for s in (3, 4)]
    bar = scheduler.alphas_cumprod
    for t, ts in ((499, (499, 499)), (torch.tensor([499, 1]), (499, 1))):
        out = noised(scheduler, latents, t, [3, 4])
        for i in range(2):
            hand = bar[ts[i]].sqrt() * latents[i] + (1 - bar[ts[i]]).sqrt() * noise[i]
            assert torch.allclose(out[i], hand, atol=1e-6)
    with pytest.raises(ValueError, match="1 seeds for 2 latents"):
        noised(scheduler, latents, 499, [3])
    with pytest.raises(ValueError, match=r"allowed: 0\.\.999"):
        noised(scheduler, latents, 1000, [3, 4])
