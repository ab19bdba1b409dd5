"""Deep dream end to end on a captured and analysed tiny experiment: accentuation from dataset examples,
phase-only dreams, diversity, the negative view, attribution images and a sweep over a new setting."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import xarray as xr

from ddr import stores
from ddr.config import ExperimentConfig
from ddr.dream.sources import example_starts, latent_spectrum, noised, ranked_examples
from ddr.models.pipeline import load_pipeline
from ddr.stages import analysis, deep_dream
from ddr.tracking import experiment_name, tracking_uri
from tests.conftest import tiny_config
from tests.helpers import run_capture

BASE = [
    "image_size=64",
    "use_sae=false",
    "stages.capture.dev_n_prompts=4",
    "stages.timestep_analysis.top_k=8",
    "stages.deep_dream.num_steps=4",
    "stages.deep_dream.n_results=2",
    "stages.deep_dream.seeds=[11,22,33]",
    "stages.deep_dream.targets_per_batch=2",
    "stages.deep_dream.intermediate_opt_results_every_n_steps=2",
    "stages.deep_dream.timesteps=[activity_peaks]",
    "stages.deep_dream.use_just_one_timestep=true",
    "stages.deep_dream.use_prior=false",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny capture (4 samples with images) and its raw analysis; the dream overrides for two peaked channels."""
    root = tmp_path_factory.mktemp("dream_e2e")
    config = tiny_config(root, *BASE)
    run_capture(config)
    analysis.run_analysis(config, "raw")
    with xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).analysis_store("raw"), chunks=None) as ds:
        peaked = np.flatnonzero(ds["peak_t"].values[:, 0] >= 0)[:2].tolist()
    return root, [*BASE, f"stages.deep_dream.channels=[{peaked[0]},{peaked[1]}]"]


def run(experiment: tuple[Path, list[str]], name: str, *overrides: str) -> tuple[ExperimentConfig, xr.Dataset]:
    root, base = experiment
    config = tiny_config(root, *base, f"stages.deep_dream.run_name={name}", *overrides)
    deep_dream.run_dream(config, "raw")
    path = stores.ExperimentLayout(config.experiment_dir).dream_store(name, "raw")
    return config, xr.open_zarr(path, chunks=None).load()


@pytest.mark.parametrize("see_through", [True, False])
def test_accentuation_stays_within_the_set_distance_of_its_seed(
    experiment: tuple[Path, list[str]], see_through: bool
) -> None:
    radius = 1.0  # 4 free steps of lr 0.05 move a 4x8x8 latent about 4 * 0.05 * 16 = 3.2
    config, ds = run(
        experiment,
        f"accent_{see_through}",
        "stages.deep_dream.start_from=example",
        f"stages.deep_dream.seed_distance_max={radius}",
        f"stages.deep_dream.see_through_schedule_noise={str(see_through).lower()}",
    )
    targets = list(zip(ds["target_channel"].values.tolist(), ds["target_t"].values.tolist(), strict=True))
    clean, samples = example_starts(config, "raw", targets, 2)
    seeds = clean.flatten(0, 1)
    if not see_through:  # the UNet sees the latent as it is: the example noised to t once is the seed
        noise_seeds = [deep_dream.sample_seed(s, c, t) for c, t in targets for s in (11, 22)]
        times = torch.tensor([t for _, t in targets for _ in range(2)])
        seeds = noised(load_pipeline(config).scheduler, seeds, times, noise_seeds)
    seeds = seeds.view(len(targets), 2, *seeds.shape[1:])
    distance = np.linalg.norm((ds["latent"].values - seeds.numpy()).reshape(len(targets), 2, -1), axis=2)
    assert (distance <= radius * (1 + 1e-5)).all(), distance
    assert distance.max() == pytest.approx(radius, rel=1e-4)  # the ball bound the optimisation
    np.testing.assert_allclose(ds["seed_distance"].values, distance, rtol=1e-4)
    np.testing.assert_array_equal(ds["start_sample"].values, samples)
    with xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).analysis_store("raw"), chunks=None) as analysed:
        row = int(np.flatnonzero(analysed["channel"].values == targets[0][0])[0])
        best = ranked_examples(
            analysed["top_sample"].values[row],
            analysed["top_value"].values[row],
            analysed["timestep"].values,
            targets[0][1],
        )
    assert ds["start_sample"].values[0].tolist() == best[:2]  # result k starts from the k-th top example
    layout = stores.ExperimentLayout(config.experiment_dir)
    for channel, t in targets:
        for k in range(2):
            assert stores.dream_start_image_path(layout, f"accent_{see_through}", "raw", channel, t, k).is_file()
            assert stores.dream_attribution_path(layout, f"accent_{see_through}", "raw", channel, t, k).is_file()
    assert ds.attrs["start"] == "example" and ds.attrs["seed_distance_max"] == radius


def test_phase_only_dream_keeps_the_magnitude_spectrum(experiment: tuple[Path, list[str]]) -> None:
    config, ds = run(
        experiment,
        "phase",
        "stages.deep_dream.parameterisation=phase_fourier",
        "stages.deep_dream.spectrum_max_images=4",
    )
    magnitude = latent_spectrum(config, "capture", "raw", 4).numpy()
    spectrum = np.abs(np.fft.rfft2(ds["latent"].values.astype(np.float64), norm="ortho"))
    np.testing.assert_allclose(spectrum, np.broadcast_to(magnitude, spectrum.shape), atol=1e-5, rtol=1e-4)
    assert np.isfinite(ds["attribution"].values).all() and (ds["attribution"].values > 0).any()
    assert ds.attrs["spectrum_store"].endswith("capture.zarr")


def test_diversity_lowers_the_mean_pairwise_similarity(experiment: tuple[Path, list[str]]) -> None:
    # without augmentation: on an 8x8 latent the default jitter, rotation and zoom blur the few steps' Gram gradients
    common = ["stages.deep_dream.n_results=3", "stages.deep_dream.num_steps=8", "robustness=level_0"]
    _, without = run(experiment, "similar", *common)
    _, spread = run(experiment, "diverse", *common, "stages.deep_dream.diversity_penalty_weight=100")
    assert np.isfinite(without["diversity"].values).all()  # recorded whatever the weight
    assert (spread["diversity"].values < without["diversity"].values).all(), (
        spread["diversity"].values,
        without["diversity"].values,
    )


def test_the_negative_view_minimises(experiment: tuple[Path, list[str]]) -> None:
    _, up = run(experiment, "up")
    config, down = run(experiment, "down", "stages.deep_dream.negative=true")
    assert (down["activation"].values < up["activation"].values).all()
    history = down["history_activation"].values  # the raw activation, falling
    assert (history[..., -1] < history[..., 0]).all()
    assert down.attrs["direction"] == "minimise" and (down["start_sample"].values == -1).all()
    summary = deep_dream.summarise_dreams(config, "raw")
    assert summary["mean_seed_distance"] == pytest.approx(float(down["seed_distance"].mean()), rel=1e-5)
    assert summary["mean_diversity"] == pytest.approx(float(down["diversity"].mean()), rel=1e-5)


@pytest.mark.usefixtures("prefect_harness")
def test_sweep_over_a_new_setting_logs_distinct_params_and_metrics(experiment: tuple[Path, list[str]]) -> None:
    from flows.deep_dream import deep_dream_sweep_flow

    root, base = experiment
    overrides = [
        f"data_root={root}",
        *base,
        "infrastructure.n_workers=1",
        "infrastructure.processes=false",
        "stages.deep_dream.run_name=sweep",
        "stages.deep_dream.n_results=3",
        "stages.deep_dream.num_steps=8",
        "robustness=level_0",
    ]
    result = deep_dream_sweep_flow(grid=["diversity_penalty_weight=0,100"], overrides=overrides)
    config = tiny_config(root, *base)
    client = mlflow.MlflowClient(tracking_uri(config))
    experiment_id = client.get_experiment_by_name(experiment_name(config)).experiment_id
    children = client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{result['parent_run_id']}'"
    )
    by_weight = {r.data.params["stages.deep_dream.diversity_penalty_weight"]: r for r in children}
    assert set(by_weight) == {"0.0", "100.0"}
    for weight, child in by_weight.items():
        assert child.data.params["resolved.raw.diversity_penalty_weight"] == weight
        assert child.data.params["stages.deep_dream.parameterisation"] == "latent"
        assert {"raw_mean_diversity", "raw_mean_seed_distance"} <= set(child.data.metrics)
    assert by_weight["100.0"].data.metrics["raw_mean_diversity"] < by_weight["0.0"].data.metrics["raw_mean_diversity"]
