"""The deep_dream stage: targets from the analysis store, the dream store's layout, priors, resumable shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig
from ddr.dream.objectives import LayerActivation, empty_prompt_embedding, make_objective
from ddr.dream.optimise import DreamSettings, optimise
from ddr.models.pipeline import load_pipeline
from ddr.stages import deep_dream
from tests.conftest import provisioned_root, tiny_config
from tests.helpers import active_ranges, peak_table, write_analysis_store, write_zarr

TOTAL_T = 1000
WIDTH = {"raw": 64, "sae": 256}  # tiny's up_blocks.1.attentions.1 channels; tiny-topk's features
CALLS = [831, 665, 665, 499, 333, 167, 1]  # tiny's PNDM at 6 steps (665 twice)
ACTIVE = {3: (0, 600), 7: (600, 1000), 10: (0, 1000), 12: (700, 800)}
PEAKS = {3: [600, 100], 7: [900], 10: [500]}
DREAM = [
    "image_size=64",
    "stages.deep_dream.num_steps=3",
    "stages.deep_dream.n_results=2",
    "stages.deep_dream.seeds=[11,22]",
    "stages.deep_dream.targets_per_batch=2",
    "stages.deep_dream.channels_per_shard=2",
    "stages.deep_dream.intermediate_opt_results_every_n_steps=2",
    "stages.deep_dream.use_prior=false",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provisioned_root(tmp_path_factory, "dream", *DREAM)


def max_activation(n: int) -> np.ndarray:
    """Distinct per channel and call (the two 665 calls differ)."""
    return (0.5 + 0.01 * np.arange(n)[:, None] + 0.1 * np.arange(len(CALLS))[None, :]).astype(np.float32)


def write_analysis(config: ExperimentConfig, kind: str) -> None:
    """A hand-made `analysis/<kind>.zarr` as DESIGN.md lays it out."""
    n = WIDTH[kind]
    write_analysis_store(
        config,
        kind,
        calls=np.asarray(CALLS),
        max_activation=max_activation(n),
        active=active_ranges(n, ACTIVE, TOTAL_T),
        peak_t=peak_table(n, PEAKS),
    )


def write_prior(config: ExperimentConfig, kind: str, channels: list[int], n_results: int = 2) -> np.ndarray:
    """A hand-made `prior/<kind>/priors.zarr`: latents (channel, result, latent_channel, y, x)."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((len(channels), n_results, 4, 8, 8)).astype(np.float32)
    ds = xr.Dataset(
        {
            "latent": (("channel", "result", "latent_channel", "y", "x"), latents),
            "seed": (("result",), np.arange(n_results, dtype=np.int64)),
        },
        coords={"channel": np.asarray(channels, dtype=np.int64)},
    )
    write_zarr(ds, stores.ExperimentLayout(config.experiment_dir).prior_store(kind))
    return latents


def experiment(data_root: Path, name: str, *overrides: str) -> ExperimentConfig:
    config = tiny_config(data_root, *DREAM, f"experiment_name={name}", *overrides)
    for kind in ("raw", "sae"):
        write_analysis(config, kind)
    return config


def open_dreams(config: ExperimentConfig, kind: str = "raw", run: str = "default") -> xr.Dataset:
    path = stores.ExperimentLayout(config.experiment_dir).dream_store(run, kind)
    return xr.open_zarr(path, chunks=None).load()


# --- targets ------------------------------------------------------------------------------------


def targets(config: ExperimentConfig, kind: str = "raw") -> list[tuple[int, int]]:
    return deep_dream.build_plan(config, kind).targets


def test_targets_from_timesteps_peaks_and_active_calls(data_root: Path) -> None:
    sel = "stages.deep_dream.channels=[3,7,10,12,20]"
    config = experiment(data_root, "targets", sel)
    plan = deep_dream.build_plan(config, "raw")
    # default timesteps [0, activity_peaks]: 0, then the channel's peaks, highest first
    assert plan.targets == [(3, 0), (3, 600), (3, 100), (7, 0), (7, 900), (10, 0), (10, 500), (12, 0), (20, 0)]
    # max dataset activation at t: the call(s) with that value, else the nearest captured value
    expected = max_activation(64)
    assert plan.dataset_max[0] == pytest.approx(expected[3, 6])  # t=0 -> nearest call, t=1
    assert plan.dataset_max[1] == pytest.approx(expected[3, 2])  # t=600 -> 665, the larger of its two calls
    assert plan.dataset_max[6] == pytest.approx(expected[10, 3])  # t=500 -> 499

    active = experiment(data_root, "targets", sel, "stages.deep_dream.timesteps=[active_timesteps,50,499]")
    plan = deep_dream.build_plan(active, "raw")
    by_channel: dict[int, list[int]] = {}
    for channel, t in plan.targets:
        by_channel.setdefault(channel, []).append(t)
    assert by_channel == {
        3: [499, 333, 167, 1, 50],  # active 0..600: the calls at 499..1, then the ints (499 once)
        7: [831, 665, 50, 499],  # 665 is captured twice, targeted once
        10: [831, 665, 499, 333, 167, 1, 50],
        12: [50, 499],  # active only between calls (700..800): just the ints
        20: [50, 499],
    }
    one = experiment(
        data_root,
        "targets",
        sel,
        "stages.deep_dream.timesteps=[activity_peaks,0]",
        "stages.deep_dream.use_just_one_timestep=true",
    )
    assert targets(one) == [(3, 600), (7, 900), (10, 500), (12, 0), (20, 0)]
    both = experiment(data_root, "targets", sel, "stages.deep_dream.timesteps=[active_timesteps,activity_peaks]")
    assert targets(both) == [(3, 600), (3, 100), (7, 900), (10, 500)]  # peaks take precedence
    shards = deep_dream.plan_dream(
        experiment(
            data_root,
            "targets",
            "stages.deep_dream.channels=[3,7,10,12]",
            "stages.deep_dream.timesteps=[activity_peaks]",
        ),
        "raw",
    )
    assert shards == [[3, 7], [10]]  # 12 has no peaks: skipped, not an error


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stages.deep_dream.channels=[5,64]"], r"\[64\] out of range; allowed: 0..63"),
        (["stages.deep_dream.start_channel=70"], "start_channel: 70 is out of range"),
        (["stages.deep_dream.start_channel=0", "stages.deep_dream.end_channel=65"], "end_channel: 65 is out of range"),
        (["stages.deep_dream.channels=[1]", "stages.deep_dream.start_channel=0"], "either channels or start_channel"),
        (["stages.deep_dream.timesteps=[1000]"], r"1000 is out of range; allowed: 0..999"),
        (["stages.deep_dream.n_results=3"], "needs at least that many seeds"),
        (
            ["stages.deep_dream.n_results=1", "stages.deep_dream.diversity_penalty_weight=1"],
            "diversity_penalty_weight: 1.0 needs n_results >= 2",
        ),
        (
            ["stages.deep_dream.parameterisation=phase_fourier", "stages.deep_dream.seed_distance_max=2"],
            "seed_distance_max: 2.0 projects latents",
        ),
        (["stages.deep_dream.objective=sae_dot_cosine"], "'sae_dot_cosine' needs SAE features"),
        (["stages.deep_dream.start_from=examples"], "start_from"),
    ],
)
def test_bad_selection_is_a_clear_error(data_root: Path, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):  # at config load or at planning, before any work
        config = experiment(data_root, "errors", *overrides)
        deep_dream.plan_dream(config, "raw")


# --- the stage ----------------------------------------------------------------------------------

RUN = ["stages.deep_dream.channels=[3,7,10]", "stages.deep_dream.timesteps=[activity_peaks]"]
EXPECTED_TARGETS = [(3, 600), (3, 100), (7, 900), (10, 500)]


@pytest.fixture(scope="module")
def dreamed(data_root: Path) -> tuple[ExperimentConfig, dict[str, Any]]:
    config = experiment(data_root, "run", *RUN)
    return config, deep_dream.run_dream(config, "raw", mlflow_run_id="run-abc")


def test_run_writes_the_dream_store(dreamed: tuple[ExperimentConfig, dict[str, Any]]) -> None:
    config, out = dreamed
    ds = open_dreams(config)
    n = len(EXPECTED_TARGETS)
    assert (
        list(zip(ds["target_channel"].values.tolist(), ds["target_t"].values.tolist(), strict=True)) == EXPECTED_TARGETS
    )
    assert ds["latent"].dims == ("target", "result", "latent_channel", "y", "x")
    assert ds["latent"].shape == (n, 2, 4, 8, 8)
    for name in ("activation", "normalized_activation", "selectivity", "failed_step", "penalty_range"):
        assert ds[name].dims == ("target", "result"), name
    assert ds["attribution"].dims == ("target", "result", "latent_channel", "y", "x")
    assert ds["seed_distance"].dims == ds["start_sample"].dims == ("target", "result")
    assert ds["diversity"].dims == ("target",)
    assert (ds["attribution"].values >= 0).all() and (ds["attribution"].values > 0).any()
    assert (ds["start_sample"].values == -1).all()  # from noise
    starts = np.stack([deep_dream.noise_latents([11, 22], (4, 8, 8)).numpy()] * n)
    np.testing.assert_allclose(
        ds["seed_distance"].values, np.linalg.norm((ds["latent"].values - starts).reshape(n, 2, -1), axis=2), rtol=1e-5
    )
    assert np.isfinite(ds["diversity"].values).all() and (ds["diversity"].values <= 1 + 1e-6).all()
    assert ds["history_activation"].dims == ("target", "result", "step")
    assert ds["step"].values.tolist() == [0, 2] and ds["seed"].values.tolist() == [11, 22]
    assert np.isfinite(ds["latent"].values).all() and np.isfinite(ds["history_activation"].values).all()
    assert (ds["failed_step"].values == -1).all()
    np.testing.assert_allclose(
        ds["normalized_activation"].values,
        ds["activation"].values / ds["dataset_max_activation"].values[:, None],
        rtol=1e-5,
    )
    expected_max = max_activation(64)
    assert ds["dataset_max_activation"].values.tolist() == pytest.approx(
        [expected_max[3, 2], expected_max[3, 5], expected_max[7, 0], expected_max[10, 3]]  # 600->665, 100->167
    )
    for name in ("penalty_total_variation", "penalty_range", "penalty_moment"):
        assert np.isfinite(ds[name].values).all()
    attrs = ds.attrs
    assert attrs["mlflow_run_id"] == "run-abc" and attrs["num_steps"] == 3 and attrs["kind"] == "raw"
    assert attrs["start"] == "noise" and attrs["direction"] == "maximise" and attrs["parameterisation"] == "latent"
    assert attrs["diversity_penalty_weight"] == 0.0 and attrs["spectrum_store"] is None
    assert attrs["objective"] == "channel_mean" and attrs["robustness"] == "level_1"
    assert attrs["penalties"] == {"total_variation": 0.5, "range": 0.5, "moment": 0.0}
    assert json.loads(attrs["params"])["targets"] == [list(t) for t in EXPECTED_TARGETS]

    layout = stores.ExperimentLayout(config.experiment_dir)
    for channel, t in EXPECTED_TARGETS:
        for k in range(2):
            assert stores.dream_image_path(layout, "default", "raw", channel, t, k).is_file()
            assert stores.dream_attribution_path(layout, "default", "raw", channel, t, k).is_file()
            assert not stores.dream_start_image_path(layout, "default", "raw", channel, t, k).exists()
            for step in (0, 2):
                assert stores.dream_snapshot_path(layout, "default", "raw", channel, t, k, step).is_file()
    assert stores.dream_done_channels(stores.dream_done_dir(layout, "default", "raw")) == {3, 7, 10}
    assert [r["channels"] for r in out["shards"]] == [[3, 7], [10]]
    assert all(Path(p).is_file() for p in out["contact_sheets"])
    shard = out["shards"][0]
    assert set(shard["step_metrics"]) == {"activation", "penalty_total_variation", "penalty_range", "penalty_moment"}
    assert len(shard["step_metrics"]["activation"]) == 3
    assert shard["metrics"]["targets"] == 3 and shard["metrics"]["failed"] == 0
    summary = out["summary"]
    assert summary["targets"] == summary["targets_done"] == n and summary["failed"] == 0
    assert summary["mean_normalized_activation"] == pytest.approx(float(ds["normalized_activation"].mean()), rel=1e-5)
    assert summary["median_normalized_activation"] == pytest.approx(
        float(np.median(ds["normalized_activation"].values)), rel=1e-5
    )
    assert summary["mean_selectivity"] == pytest.approx(float(ds["selectivity"].mean()), rel=1e-5)
    assert summary["mean_seed_distance"] == pytest.approx(float(ds["seed_distance"].mean()), rel=1e-5)
    assert summary["mean_diversity"] == pytest.approx(float(ds["diversity"].mean()), rel=1e-5)


def test_a_stored_target_equals_a_direct_optimisation(dreamed: tuple[ExperimentConfig, dict[str, Any]]) -> None:
    """The stage's batch (two targets) holds what one target alone gives: seeds, noise start, t, channel."""
    config, _ = dreamed
    ds = open_dreams(config)
    pipe = load_pipeline(config)
    fn = LayerActivation(pipe.unet, config.target_layer_name, make_objective("raw"), empty_prompt_embedding(pipe))
    settings = DreamSettings.from_config(config.stages.deep_dream)
    channel, t = EXPECTED_TARGETS[1]
    seeds = [11, 22]
    result = optimise(
        fn,
        deep_dream.noise_latents(seeds, (4, 8, 8)),
        [channel] * 2,
        [t] * 2,
        [deep_dream.sample_seed(s, channel, t) for s in seeds],
        settings,
        add_noise=pipe.scheduler.add_noise,
    )
    np.testing.assert_allclose(ds["latent"].values[1], result.latents.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ds["activation"].values[1], result.activation.numpy(), atol=1e-4, rtol=1e-4)


def test_rerun_skips_completed_targets(dreamed: tuple[ExperimentConfig, dict[str, Any]], monkeypatch: Any) -> None:
    config, _ = dreamed
    before = open_dreams(config)
    calls: list[list[int]] = []
    real = deep_dream.optimise

    def counting(fn: Any, init: torch.Tensor, channels: list[int], *args: Any, **kwargs: Any) -> Any:
        calls.append(list(channels))
        return real(fn, init, channels, *args, **kwargs)

    monkeypatch.setattr(deep_dream, "optimise", counting)
    again = deep_dream.run_dream(config, "raw", mlflow_run_id="run-def")
    assert calls == [] and again["optimised"] == 0
    assert all(shard["skipped"] for shard in again["shards"])
    after = open_dreams(config)
    np.testing.assert_array_equal(after["latent"].values, before["latent"].values)
    assert after.attrs["mlflow_run_id"] == "run-def"
    assert json.loads(after.attrs["mlflow_run_ids"]) == ["run-abc", "run-def"]

    # an interrupted target (no marker) is the only one redone, with the same result
    layout = stores.ExperimentLayout(config.experiment_dir)
    done = stores.dream_done_dir(layout, "default", "raw")
    (done / "target_000002.json").unlink()
    (done / "channel_00007.json").unlink()
    redo = deep_dream.run_dream(config, "raw")
    assert calls == [[7, 7]] and redo["optimised"] == 1
    final = open_dreams(config)
    np.testing.assert_allclose(final["latent"].values, before["latent"].values, atol=1e-6)
    assert stores.dream_done_channels(done) == {3, 7, 10}


def test_priors_start_the_optimisation_and_settings_changes_are_refused(data_root: Path) -> None:
    overrides = [
        *RUN,
        "stages.deep_dream.use_prior=true",
        "stages.deep_dream.learning_rate=1e-6",
        "stages.deep_dream.num_steps=1",
        "stages.deep_dream.run_name=from_prior",
    ]
    config = experiment(data_root, "prior", *overrides)
    priors = write_prior(config, "raw", [3, 10])
    out = deep_dream.run_dream(config, "raw")
    assert set(out["skipped_channels"]) == {7}
    assert "no prior" in out["skipped_channels"][7]
    ds = open_dreams(config, run="from_prior")
    assert ds["target_channel"].values.tolist() == [3, 3, 10]
    np.testing.assert_allclose(ds["latent"].values[0], priors[0], atol=1e-4)  # one step of 1e-6 from the prior
    np.testing.assert_allclose(ds["latent"].values[2], priors[1], atol=1e-4)

    changed = experiment(
        data_root, "prior", *overrides[:-2], "stages.deep_dream.num_steps=2", "stages.deep_dream.run_name=from_prior"
    )
    with pytest.raises(deep_dream.DreamStoreMismatch, match=r"settings\.num_steps"):
        deep_dream.prepare_dream_store(changed, "raw")
    for new_setting in (
        "stages.deep_dream.diversity_penalty_weight=0.5",
        "stages.deep_dream.negative=true",
        "stages.deep_dream.seed_distance_max=3",
        "stages.deep_dream.parameterisation=phase_fourier",
    ):  # the new settings are content: a changed value never reuses the store
        other = experiment(data_root, "prior", *overrides, new_setting)
        field = new_setting.split("=")[0].split(".")[-1]
        with pytest.raises(deep_dream.DreamStoreMismatch, match=rf"settings\.{field}"):
            deep_dream.prepare_dream_store(other, "raw")
    with pytest.raises(deep_dream.DreamStoreMismatch):
        deep_dream.dream_shard(changed, "raw", [3])
    deep_dream.prepare_dream_store(changed, "raw", overwrite=True)
    assert open_dreams(changed, run="from_prior").attrs["num_steps"] == 2


def test_sae_features(data_root: Path) -> None:
    config = experiment(
        data_root, "sae", "stages.deep_dream.channels=[10]", "stages.deep_dream.timesteps=[activity_peaks]"
    )
    out = deep_dream.run_dream(config, "sae")
    ds = open_dreams(config, kind="sae")
    assert ds.attrs["objective"] == "sae_mean" and ds.attrs["kind"] == "sae"
    assert ds.attrs["penalties"] == {"total_variation": 0.0, "range": 0.5, "moment": 0.5}  # the sae block
    assert ds["target_channel"].values.tolist() == [10] and ds["target_t"].values.tolist() == [500]
    assert np.isfinite(ds["latent"].values).all() and (ds["failed_step"].values == -1).all()
    assert (ds["activation"].values >= 0).all()  # top-k codes are non-negative
    assert out["summary"]["targets_done"] == 1


def test_sae_dot_cosine_objective_through_the_stage(data_root: Path) -> None:
    config = experiment(
        data_root,
        "sae",
        "stages.deep_dream.channels=[10]",
        "stages.deep_dream.timesteps=[activity_peaks]",
        "stages.deep_dream.sae.objective=sae_dot_cosine",
        "stages.deep_dream.cosine_power=2",
        "stages.deep_dream.run_name=dot",
    )
    deep_dream.run_dream(config, "sae")
    ds = open_dreams(config, kind="sae", run="dot")
    assert ds.attrs["objective"] == "sae_dot_cosine" and ds.attrs["cosine_power"] == 2.0
    assert np.isfinite(ds["activation"].values).all() and (ds["failed_step"].values == -1).all()
    assert json.loads(ds.attrs["params"])["objective"] == "sae_dot_cosine"
