"""Heatmaps: maps whose means are the captured values, that peak where a planted bump sits, a targeted pass
that regenerates only the top examples, resumes per channel, and says clearly what is wrong."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import xarray as xr
from matplotlib import colormaps
from PIL import Image

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig, load_config
from ddr.dream.objectives import empty_prompt_embedding
from ddr.hooks import find_layer, output_tensor, replace_output
from ddr.models.pipeline import load_experiment_sae, load_pipeline
from ddr.provision import provision
from ddr.stages import analysis, heatmaps
from ddr.stages.deep_dream import noise_latents, sample_seed
from ddr.stages.plots import nearest_call
from ddr.tracking import tracking_uri
from tests.conftest import TINY, TOY_SHAPES, tiny_config
from tests.helpers import run_capture

torch.set_num_threads(1)

# tiny at its 128 px: up_blocks.1.attentions.1 outputs 64 channels on a 4 x 4 grid (32 px per cell).
BASE = ["stages.timestep_analysis.top_k=5", "stages.timestep_analysis.top_examples=3"]
RAW_CHANNEL, RAW_AT = 9, (1, 3)  # a bump planted in raw channel 9 at (y, x) = (1, 3)
SAE_FEATURE, SAE_AT = 17, (2, 0)  # SAE feature 17's decoder row planted at the token (2, 0)
BUMP = 40.0


class Plant:
    """A forward hook on the target layer: adds BUMP to RAW_CHANNEL at RAW_AT, and BUMP x the SAE feature's
    decoder row at SAE_AT, in every sample and call (so capture and the targeted pass both see it)."""

    def __init__(self, direction: torch.Tensor) -> None:
        self.direction = direction

    def __call__(self, _module: Any, _args: Any, output: Any) -> Any:
        x = output_tensor(output).clone()
        x[:, RAW_CHANNEL, RAW_AT[0], RAW_AT[1]] += BUMP
        x[:, :, SAE_AT[0], SAE_AT[1]] += BUMP * self.direction.to(x)
        return replace_output(output, x)


def run_capture_and_analysis(config: ExperimentConfig) -> None:
    run_capture(config)
    for kind in config.kinds:
        analysis.run_analysis(config, kind)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExperimentConfig]:
    """A tiny capture + analysis with the bumps planted; the hook stays on the cached pipeline for the module."""
    config = tiny_config(tmp_path_factory.mktemp("heatmaps"), *BASE)
    pipe = load_pipeline(config)
    sae = load_experiment_sae(config)
    assert sae is not None
    hook = Plant(sae.decoder_directions.detach()[SAE_FEATURE].float())
    handle = find_layer(pipe.unet, config.target_layer_name).register_forward_hook(hook)
    try:
        run_capture_and_analysis(config)
        yield config
    finally:
        handle.remove()


def experiment(planted: ExperimentConfig, name: str, *overrides: str) -> ExperimentConfig:
    """Another experiment in the same data root whose heatmaps read the planted analysis (and its capture)."""
    analysed = planted.experiment_dir.resolve() / "analysis"
    return load_config(
        [
            f"data_root={planted.data_root}",
            f"experiment_name={name}",
            *TINY,
            *BASE,
            f"stages.heatmaps.timestep_analysis_results_dir={analysed}",
            "stages.heatmaps.top_examples=3",  # the analysis keeps 3 (the default 4 is an error here)
            *overrides,
        ]
    )


def open_heatmaps(config: ExperimentConfig, kind: str) -> xr.Dataset:
    return xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).heatmap_store(kind), chunks=None)


def written_entries(ds: xr.Dataset) -> list[tuple[int, int, int, int, int]]:
    """(row, peak, rank, sample, call) of every mapped example."""
    samples, calls = ds.example_sample.values, ds.example_call.values
    return [
        (c, p, r, int(samples[c, p, r]), int(calls[c, p])) for c, p, r in zip(*np.nonzero(samples >= 0), strict=True)
    ]


class CountGenerations:
    """Wraps `heatmaps.generate` and records the seed of every sample it generates."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seeds: list[int] = []
        original = heatmaps.generate

        def counting(pipe: Any, prompts: list[str], seeds: list[int], config: ExperimentConfig, **kw: Any) -> Any:
            self.seeds.extend(int(s) for s in seeds)
            return original(pipe, prompts, seeds, config, **kw)

        monkeypatch.setattr(heatmaps, "generate", counting)


# --- maps and overlays by hand --------------------------------------------------------------------


def test_spatial_maps_keep_each_token_at_its_position() -> None:
    activation = torch.arange(2 * 3 * 2 * 4, dtype=torch.float32).reshape(2, 3, 2, 4)
    assert torch.equal(heatmaps.spatial_maps(activation), activation)

    class DoublingSae:
        """encode = 2 x the token (and a fourth feature: 1); token i is position (i // W, i % W)."""

        dtype = torch.float32

        def encode(self, tokens: torch.Tensor) -> torch.Tensor:
            return torch.cat([2 * tokens, torch.ones_like(tokens[..., :1])], dim=-1)

    maps = heatmaps.spatial_maps(activation, DoublingSae())  # type: ignore[arg-type]
    assert maps.shape == (2, 4, 2, 4)
    assert torch.equal(maps[:, :3], 2 * activation) and torch.equal(maps[:, 3], torch.ones(2, 2, 4))


def test_normalise_clips_negatives_and_divides_by_the_max() -> None:
    np.testing.assert_allclose(heatmaps.normalise(np.array([[-1.0, 2.0], [1.0, 0.0]])), [[0, 1], [0.5, 0]])
    assert not heatmaps.normalise(np.array([[-3.0, -1.0], [0.0, -2.0]])).any()  # nothing positive: all cold


def test_overlay_blends_the_colour_map_where_the_map_is_hot() -> None:
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    heat = np.array([[0.0, 3.0], [-1.0, 0.0]])  # hottest at (y, x) = (0, 1): the top-right quadrant
    assert np.array_equal(np.asarray(heatmaps.overlay(image, heat, 0.0)), np.asarray(image))
    pure = np.asarray(heatmaps.overlay(image, heat, 1.0)).astype(float)
    cmap = colormaps[heatmaps.COLOUR_MAP]
    np.testing.assert_allclose(pure[0, 7], np.round(np.asarray(cmap(1.0)[:3]) * 255), atol=1)
    np.testing.assert_allclose(pure[7, 0], np.round(np.asarray(cmap(0.0)[:3]) * 255), atol=1)
    half = np.asarray(heatmaps.overlay(image, heat, 0.5)).astype(float)
    np.testing.assert_allclose(half[7, 0], np.round(0.5 * 200 + 0.5 * np.asarray(cmap(0.0)[:3]) * 255), atol=1)
    y, x = np.unravel_index(pure.sum(-1).argmax(), pure.shape[:2])
    assert y < 4 <= x


# --- the targeted pass ------------------------------------------------------------------------------


def test_map_means_are_the_captured_values(planted: ExperimentConfig) -> None:
    config = experiment(planted, "means", "stages.heatmaps.top_examples=3", "stages.heatmaps.peaks=2")
    captured = xr.open_zarr(planted.experiment_dir / "capture" / "activations.zarr", chunks=None)
    for kind in ("raw", "sae"):
        result = heatmaps.run_heatmaps(config, kind)
        assert result["channels_mapped"] > 3
        ds = open_heatmaps(config, kind)
        ranked = xr.open_zarr(planted.experiment_dir / "analysis" / f"{kind}.zarr", chunks=None)
        entries = written_entries(ds)
        assert len(entries) > 8
        for c, p, r, sample, call in entries:
            mean = float(ds.example_map.values[c, p, r].mean())
            assert mean == pytest.approx(float(captured[kind].values[sample, call, c]), rel=1e-5, abs=1e-6)
            t = int(ds.peak_t.values[c, p])
            assert t == int(ranked.peak_t.values[c, p]) >= 0
            assert call == nearest_call(ranked.timestep.values, t, ranked.top_value.values[c, :, 0])
            assert sample == int(ranked.top_sample.values[c, call, r])
        unmapped = ds.example_sample.values < 0
        assert np.isnan(ds.example_map.values[unmapped]).all()
        assert ds.example_map.shape[-2:] == (4, 4) and ds.sizes["rank"] == 3 and ds.sizes["peak"] == 2
        assert ds.attrs["normalisation"] == heatmaps.NORMALISATION


def test_maps_and_overlays_peak_where_the_bump_was_planted(planted: ExperimentConfig) -> None:
    config = experiment(
        planted,
        "planted",
        f"stages.heatmaps.channels=[{RAW_CHANNEL}]",
        f"stages.heatmaps.sae={{channels: [{SAE_FEATURE}]}}",
        "stages.heatmaps.top_examples=3",
    )
    layout = stores.ExperimentLayout(config.experiment_dir)
    images = planted.experiment_dir / "capture" / "images"
    for kind, channel, (y, x) in (("raw", RAW_CHANNEL, RAW_AT), ("sae", SAE_FEATURE, SAE_AT)):
        heatmaps.run_heatmaps(config, kind)
        ds = open_heatmaps(config, kind)
        entries = [e for e in written_entries(ds) if e[0] == channel]
        assert len(entries) == 3
        for c, p, r, sample, _ in entries:
            heat = ds.example_map.values[c, p, r]
            assert np.unravel_index(np.argmax(heat), heat.shape) == (y, x)
            drawn = np.asarray(Image.open(stores.heatmap_overlay_path(layout, kind, c, p, r))).astype(float)
            image = np.asarray(Image.open(images / f"{sample:06d}.png").convert("RGB")).astype(float)
            colour = (drawn - 0.5 * image) / 0.5  # overlay_alpha 0.5: what the colour map added
            py, px = np.unravel_index(colour.sum(-1).argmax(), colour.shape[:2])
            assert (py // 32, px // 32) == (y, x), kind  # the hottest pixel lies in the planted cell


def test_only_the_top_examples_are_regenerated(planted: ExperimentConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    config = experiment(
        planted, "targeted", f"stages.heatmaps.channels=[{RAW_CHANNEL}]", "stages.heatmaps.top_examples=1"
    )
    counted = CountGenerations(monkeypatch)
    result = heatmaps.run_heatmaps(config, "raw")
    ds = open_heatmaps(config, "raw")
    ((_, _, _, sample, _),) = written_entries(ds)
    seeds = xr.open_zarr(planted.experiment_dir / "capture" / "activations.zarr").seed.values
    assert counted.seeds == [int(seeds[sample])] and result["samples_regenerated"] == 1  # of 5 captured


def test_a_shard_regenerates_each_sample_once_and_a_rerun_only_what_is_missing(
    planted: ExperimentConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = experiment(planted, "resume", "stages.heatmaps.end_channel=16", "stages.heatmaps.top_examples=3")
    heatmaps.prepare_heatmap_store(config, "raw")
    (shard,) = heatmaps.plan_heatmaps(config, "raw")
    assert len(shard) >= 3
    ds = open_heatmaps(config, "raw")
    samples = ds.example_sample.values
    seeds = xr.open_zarr(planted.experiment_dir / "capture" / "activations.zarr").seed.values
    counted = CountGenerations(monkeypatch)
    first = heatmaps.heatmap_shard(config, "raw", shard[:1])  # an interrupted run: one channel done
    assert sorted(counted.seeds) == sorted(int(seeds[s]) for s in np.unique(samples[shard[0]][samples[shard[0]] >= 0]))
    marker = stores.heatmap_marker_path(stores.ExperimentLayout(config.experiment_dir), "raw", "examples", shard[0])
    done_at = marker.stat().st_mtime_ns

    counted.seeds.clear()
    (rest,) = heatmaps.plan_heatmaps(config, "raw")
    assert rest == shard[1:]
    heatmaps.heatmap_shard(config, "raw", shard)
    needed = np.unique(samples[shard[1:]][samples[shard[1:]] >= 0])
    assert sorted(counted.seeds) == sorted(int(seeds[s]) for s in needed)  # each once, none for the done channel
    assert marker.stat().st_mtime_ns == done_at and first["samples_regenerated"] > 0
    assert np.isfinite(open_heatmaps(config, "raw").example_map.values[shard][samples[shard] >= 0]).all()

    counted.seeds.clear()
    assert heatmaps.plan_heatmaps(config, "raw") == []
    assert heatmaps.run_heatmaps(config, "raw")["samples_regenerated"] == 0 and counted.seeds == []


def test_prior_maps_are_one_forward_on_the_seeded_noised_prior(planted: ExperimentConfig) -> None:
    """A hand-made prior store; the map must equal a hand-run UNet forward on the documented noised latent."""
    config = experiment(
        planted, "priors", f"stages.heatmaps.channels=[{RAW_CHANNEL}]", "stages.heatmaps.top_examples=1"
    )
    heatmaps.run_heatmaps(config, "raw")  # before the prior stage: examples only
    assert open_heatmaps(config, "raw").sizes["result"] == 0

    layout = stores.ExperimentLayout(config.experiment_dir)
    prior_seeds = [11, 22]
    latents = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(5))
    group = stores.create_prior_store(
        layout.prior_store("raw"),
        channels=np.array([RAW_CHANNEL]),
        seeds=np.array(prior_seeds),
        timesteps=np.array([1]),
        strength=np.zeros((1, 1)),
        steered=np.zeros((1, 1), dtype=bool),
        latent_shape=(4, 16, 16),
        attrs={"params": "hand-made"},
    )
    stores.write_prior_latents(group, 0, latents.numpy())
    result = heatmaps.run_heatmaps(config, "raw")
    assert result["channels_mapped"] == 0 and result["prior_channels_mapped"] == 1  # only the new part ran
    ds = open_heatmaps(config, "raw")
    t = int(ds.prior_t.values[RAW_CHANNEL])
    assert t == int(ds.peak_t.values[RAW_CHANNEL, 0]) > 0

    pipe = load_pipeline(config)
    seen: list[torch.Tensor] = []
    handle = find_layer(pipe.unet, config.target_layer_name).register_forward_hook(
        lambda _m, _a, out: seen.append(output_tensor(out)[:, RAW_CHANNEL].detach().clone())
    )
    try:
        for k, seed in enumerate(prior_seeds):
            noise = noise_latents([sample_seed(seed, RAW_CHANNEL, t)], (4, 16, 16))
            noisy = pipe.scheduler.add_noise(latents[k : k + 1], noise, torch.tensor([t]))
            with torch.no_grad():
                pipe.unet(noisy, torch.tensor([t]), encoder_hidden_states=empty_prompt_embedding(pipe))
    finally:
        handle.remove()
    for k in range(2):
        heat = ds.prior_map.values[RAW_CHANNEL, k]
        np.testing.assert_allclose(heat, seen[k][0].numpy(), rtol=1e-5, atol=1e-5)
        assert np.unravel_index(np.argmax(heat), heat.shape) == RAW_AT
        assert stores.heatmap_prior_overlay_path(layout, "raw", RAW_CHANNEL, k).is_file()
    assert np.isnan(ds.prior_map.values[RAW_CHANNEL + 1]).all()


def test_errors_name_the_value_and_what_is_allowed(planted: ExperimentConfig, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"stages\.heatmaps\.top_examples: 4 .*allowed: 1\.\.3"):
        heatmaps.prepare_heatmap_store(experiment(planted, "e1", "stages.heatmaps.top_examples=4"), "raw")
    with pytest.raises(ConfigError, match=r"stages\.heatmaps\.peaks: 4 .*allowed: 1\.\.3"):
        heatmaps.prepare_heatmap_store(experiment(planted, "e2", "stages.heatmaps.peaks=4"), "raw")
    with pytest.raises(ConfigError, match=r"guidance_scale=3\.0 \(the capture used 7\.5\)"):
        heatmaps.prepare_heatmap_store(experiment(planted, "e3", "guidance_scale=3"), "raw")
    with pytest.raises(ConfigError, match=r"stages\.heatmaps\.end_channel: 99 is out of range"):
        heatmaps.prepare_heatmap_store(experiment(planted, "e4", "stages.heatmaps.end_channel=99"), "raw")
    with pytest.raises(ConfigError, match=r"stages\.heatmaps\.overlay_alpha: .*less than or equal to 1"):
        load_config(["stages.heatmaps.overlay_alpha=1.5"])
    with pytest.raises(FileNotFoundError, match=r"run the timestep_analysis stage first"):
        heatmaps.prepare_heatmap_store(load_config([f"data_root={tmp_path}"]), "raw")


# --- end to end ---------------------------------------------------------------------------------------


def test_toy_shapes_end_to_end(tmp_path: Path) -> None:
    """The shipped toy model at guidance 2: the targeted pass regenerates the captured images and values
    exactly, and the maps (2 x 2 at its SAE layer) and overlays peak at the planted bumps."""
    config = load_config(
        [
            f"data_root={tmp_path}",
            *TOY_SHAPES,
            "stages.capture.dev_n_prompts=12",
            "stages.capture.samples_per_shard=12",
            "stages.capture.batch_size=12",
            "stages.timestep_analysis.top_k=4",
            "stages.timestep_analysis.top_examples=3",
            "stages.heatmaps.end_channel=16",
            f"stages.heatmaps.sae={{end_channel: null, channels: [3, {SAE_FEATURE}, 40]}}",
            "stages.heatmaps.top_examples=3",
            "stages.heatmaps.samples_per_batch=12",
        ]
    )
    provision(config)
    pipe = load_pipeline(config)
    sae = load_experiment_sae(config)
    assert sae is not None
    at = {"raw": (0, 1), "sae": (1, 0)}  # transposed positions would fail
    direction = sae.decoder_directions.detach()[SAE_FEATURE].float()

    def plant(_module: Any, _args: Any, output: Any) -> Any:
        x = output_tensor(output).clone()
        x[:, RAW_CHANNEL, at["raw"][0], at["raw"][1]] += BUMP
        x[:, :, at["sae"][0], at["sae"][1]] += BUMP * direction.to(x)
        return replace_output(output, x)

    handle = find_layer(pipe.unet, config.target_layer_name).register_forward_hook(plant)
    try:
        run_capture_and_analysis(config)
        results = {kind: heatmaps.run_heatmaps(config, kind) for kind in ("raw", "sae")}
    finally:
        handle.remove()
    layout = stores.ExperimentLayout(config.experiment_dir)
    captured = xr.open_zarr(layout.capture_store, chunks=None)
    for kind, channel in (("raw", RAW_CHANNEL), ("sae", SAE_FEATURE)):
        ds = open_heatmaps(config, kind)
        entries = written_entries(ds)
        assert results[kind]["samples_regenerated"] <= 12 and len(entries) >= 3
        for c, p, r, sample, call in entries:
            mean = float(ds.example_map.values[c, p, r].mean())
            assert mean == pytest.approx(float(captured[kind].values[sample, call, c]), rel=1e-5, abs=1e-6)
            image = Image.open(layout.root / str(captured.image.values[sample])).convert("RGB")
            expected = np.asarray(heatmaps.overlay(image, ds.example_map.values[c, p, r], 0.5)).astype(int)
            drawn = np.asarray(Image.open(stores.heatmap_overlay_path(layout, kind, c, p, r))).astype(int)
            assert np.abs(drawn - expected).max() <= 1  # drawn on the regenerated image = the captured image
            if c == channel:
                heat = ds.example_map.values[c, p, r]
                assert np.unravel_index(np.argmax(heat), heat.shape) == at[kind]
                colour = (drawn - 0.5 * np.asarray(image, dtype=float)) / 0.5
                py, px = np.unravel_index(colour.sum(-1).argmax(), colour.shape[:2])
                assert (py // 16, px // 16) == at[kind]
        assert any(c == channel for c, *_ in entries)


@pytest.mark.usefixtures("prefect_harness")
def test_flow_writes_the_store_and_an_mlflow_run(planted: ExperimentConfig) -> None:
    from flows.heatmaps import heatmaps_flow

    overrides = [
        f"data_root={planted.data_root}",
        *TINY,
        *BASE,
        "infrastructure.processes=false",  # a worker thread in this process: the planted hook stays on
        "stages.heatmaps.end_channel=12",
        "stages.heatmaps.sae={end_channel: 24}",
        "stages.heatmaps.top_examples=2",
        "stages.heatmaps.channels_per_shard=6",
    ]
    result = heatmaps_flow(overrides=overrides)
    layout = stores.ExperimentLayout(planted.experiment_dir)
    for kind in ("raw", "sae"):
        ds = open_heatmaps(planted, kind)
        assert result[kind]["channels_mapped"] == len(stores.heatmap_done_channels(layout, kind, "examples")) > 0
        assert np.isfinite(ds.example_map.values[ds.example_sample.values >= 0]).all()
    client = mlflow.MlflowClient(tracking_uri(planted))
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["ddr.stage"] == "heatmaps" and run.data.params["raw.top_examples"] == "2"
    assert run.data.metrics["raw_channels_mapped"] == result["raw"]["channels_mapped"]
    assert run.data.metrics["raw_max_mean_deviation"] < 1e-4
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert {"heatmaps_raw_contact_sheet.png", "heatmaps_sae_contact_sheet.png"} <= set(artifacts)
    assert heatmaps_flow(overrides=overrides)["raw"]["channels_mapped"] == 0  # a rerun maps nothing again
