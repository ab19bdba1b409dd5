"""Priors: steering schedules, exact steering at the hooked layer, batch invariance, resumable shards."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig
from ddr.hooks import CaptureHook, TimestepTracker, output_tensor
from ddr.models.pipeline import load_pipeline
from ddr.models.sae import load_sae
from ddr.provision import asset_dir
from ddr.stages import prior
from ddr.stages.capture import generate, scheduler_timesteps
from tests.conftest import provisioned_root, tiny_config
from tests.helpers import active_ranges, peak_table, write_analysis_store

TOTAL_T = 1000
WIDTH = {"raw": 64, "sae": 256}  # the tiny model's up_blocks.1.attentions.1 channels; tiny-topk's features
# Tiny's PNDM at 6 steps makes 7 UNet calls: [831, 665, 665, 499, 333, 167, 1] (665 twice).
ACTIVE = {
    3: (0, 600),  # calls 3..6
    7: (600, 1000),  # calls 0..2 (both 665 calls)
    10: (0, 1000),  # every call
    11: (300, 900),
    13: (100, 500),
    12: (700, 800),  # no UNet call has a timestep in 700..800
}
PEAKS = {3: [600, 100], 7: [900], 10: [500]}
PRIOR = [
    "image_size=64",
    "stages.prior.n_results=2",
    "stages.prior.seeds=[11,22]",
    "stages.prior.channels_per_batch=3",
    "stages.prior.channels_per_shard=4",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provisioned_root(tmp_path_factory, "prior", *PRIOR)


def max_activation(n: int, calls: int) -> np.ndarray:
    """Distinct per channel and per call (so the two 665 calls get different strengths)."""
    return (0.5 + 0.01 * np.arange(n)[:, None] + 0.1 * np.arange(calls)[None, :]).astype(np.float32)


def write_analysis(config: ExperimentConfig, kind: str, timesteps: np.ndarray | None = None) -> Path:
    """A hand-made analysis store as the timestep_analysis stage lays it out (DESIGN.md)."""
    n = WIDTH[kind]
    ts = scheduler_timesteps(config) if timesteps is None else np.asarray(timesteps)
    active = active_ranges(n, ACTIVE, TOTAL_T)
    return write_analysis_store(
        config,
        kind,
        calls=ts,
        max_activation=max_activation(n, len(ts)),
        active=active,
        peak_t=peak_table(n, PEAKS),
        profile=active * 0.5,
    )


def experiment(
    data_root: Path, name: str, *overrides: str, kinds: tuple[str, ...] = ("raw", "sae")
) -> ExperimentConfig:
    config = tiny_config(data_root, *PRIOR, f"experiment_name={name}", *overrides)
    for kind in kinds:
        write_analysis(config, kind)
    return config


def stored_latents(config: ExperimentConfig, kind: str) -> xr.DataArray:
    with xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).prior_store(kind), chunks=None) as ds:
        return ds["latent"].load()


def test_schedule_modes_repeated_timesteps_and_other_step_counts(data_root: Path) -> None:
    config = experiment(data_root, "schedule", "stages.prior.channels=[3,7,10,12,20]")
    calls = scheduler_timesteps(config)
    assert calls.tolist() == [831, 665, 665, 499, 333, 167, 1]
    expected = max_activation(64, 7)

    s = prior.build_schedule(config, "raw")
    assert s.channels.tolist() == [3, 7, 10]
    assert set(s.skipped) == {12, 20}
    assert "inactive" in s.skipped[20] and "between" in s.skipped[12]
    assert s.steered[0].tolist() == [False, False, False, True, True, True, True]
    assert s.steered[1].tolist() == [True, True, True, False, False, False, False]
    assert s.steered[2].all()
    assert s.strength_mapping == "per_call"
    # per call: the two 665 calls take their own max activation; 0 where not steered
    np.testing.assert_allclose(s.strength[1, :3], expected[7, :3] * 50.0, rtol=1e-6)
    assert s.strength[1, 1] != s.strength[1, 2]
    assert (s.strength[0, :3] == 0).all() and (s.strength[1, 3:] == 0).all()

    # the sae block applies to SAE features
    np.testing.assert_allclose(prior.build_schedule(config, "sae").strength[2], expected[10] * 500.0, rtol=1e-6)

    every = prior.build_schedule(
        experiment(data_root, "schedule", "stages.prior.channels=[3,20]", "stages.prior.timesteps=all_timesteps"), "raw"
    )
    assert every.steered.all() and every.channels.tolist() == [3] and 20 in every.skipped

    peaks = prior.build_schedule(
        experiment(data_root, "schedule", "stages.prior.channels=[3,7,10,11]", "stages.prior.timesteps=activity_peaks"),
        "raw",
    )
    # 600 -> 665 (both calls), 100 -> 167; 900 -> 831; 500 -> 499; channel 11 has no peaks
    assert peaks.steered.astype(int).tolist() == [[0, 1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]]
    assert peaks.channels.tolist() == [3, 7, 10] and "peaks" in peaks.skipped[11]

    # another step count: active by value, strength interpolated by value over averaged repeats
    four = tiny_config(
        data_root, *PRIOR, "experiment_name=schedule", "num_inference_steps=4", "stages.prior.channels=[10]"
    )
    s4 = prior.build_schedule(four, "raw")
    values = [1, 167, 333, 499, 665, 831]
    per_value = [
        expected[10, 6],
        expected[10, 5],
        expected[10, 4],
        expected[10, 3],
        expected[10, 1:3].mean(),
        expected[10, 0],
    ]
    want = np.interp(scheduler_timesteps(four), values, per_value) * 50.0
    assert s4.strength_mapping == "interpolated" and len(s4.timesteps) != 7
    np.testing.assert_allclose(s4.strength[0], want, rtol=1e-5)


def test_zero_strength_reproduces_unsteered_generation_exactly(data_root: Path) -> None:
    config = experiment(
        data_root,
        "zero",
        "stages.prior.steer_strength_scale=0",
        "stages.prior.channels=[3,10]",
        "stages.prior.channels_per_batch=2",
        kinds=("raw",),
    )
    result = prior.run_prior(config, "raw")
    assert result["generated"] == 2
    latents = torch.from_numpy(stored_latents(config, "raw").values)
    pipe = load_pipeline(config)
    reference = generate(
        pipe, [""] * 4, [11, 22, 11, 22], config.model_copy(update={"guidance_scale": 1.0}), output_type="latent"
    ).images
    assert torch.equal(latents.reshape(4, *latents.shape[2:]), reference)


def test_steering_raises_the_target_channel_and_nothing_before_the_first_steered_call(data_root: Path) -> None:
    config = experiment(data_root, "raise", "stages.prior.channels=[3]", kinds=("raw",))
    schedule = prior.build_schedule(config, "raw")
    assert schedule.steered[0].tolist().index(True) == 3
    pipe = load_pipeline(config)
    seeds = [11, 22]
    directions = prior.steering_directions(config, "raw", [3, 3], pipe.device)
    strengths = torch.from_numpy(schedule.strength).repeat(2, 1)

    def run(scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        tracker = TimestepTracker()
        capture = CaptureHook(tracker, n_calls=7, cfg=False)
        latents, _ = prior.steered_latents(
            pipe, config, directions, strengths * scale, seeds, hooks_after=[capture], tracker=tracker
        )
        return latents, capture.result()[0]

    steered_latents, steered = run(1.0)
    plain_latents, plain = run(0.0)
    assert torch.equal(steered[:, :3], plain[:, :3])  # every channel, calls before the first steered one
    lift = steered[:, 3:, 3] - plain[:, 3:, 3]
    assert (lift > 0.5 * strengths[:, 3:]).all(), lift
    assert (strengths[:, 3:] > 10).all()
    assert not torch.allclose(steered_latents, plain_latents, atol=1e-3)

    # the stage stores that steered result
    prior.run_prior(config, "raw")
    np.testing.assert_allclose(stored_latents(config, "raw").values[0], steered_latents.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "mode"), [("raw", "add"), ("sae", "add"), ("sae", "replace")])
def test_batched_equals_one_channel_per_call(data_root: Path, kind: str, mode: str) -> None:
    picks = ["stages.prior.channels=[3,7,10,11,13]", f"stages.prior.steer_mode={mode}"]
    batched = experiment(
        data_root, f"batched-{kind}-{mode}", *picks, "stages.prior.channels_per_batch=3", kinds=(kind,)
    )
    single = experiment(data_root, f"single-{kind}-{mode}", *picks, "stages.prior.channels_per_batch=1", kinds=(kind,))
    calls = [sum(r["pipeline_calls"] for r in prior.run_prior(c, kind)["shards"]) for c in (batched, single)]
    assert calls == [3, 5]  # shards [3,7,10,11] + [13]: 2 + 1 batched calls vs 5
    a, b = stored_latents(batched, kind), stored_latents(single, kind)
    assert a.channel.values.tolist() == b.channel.values.tolist() == [3, 7, 10, 11, 13]
    assert np.isfinite(a.values).all()
    np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-5)
    assert not np.allclose(a.values[0], a.values[1], atol=1e-2)  # channels really steer differently


def test_sae_steering_adds_exactly_strength_times_decoder_row(data_root: Path) -> None:
    config = experiment(data_root, "sae-exact", "stages.prior.channels=[3]", kinds=("sae",))
    schedule = prior.build_schedule(config, "sae")
    pipe = load_pipeline(config)
    sae = load_sae(asset_dir(config, "saes", config.sae.name), hookpoint=config.sae.hookpoint)
    row = sae.W_dec.detach()[3]
    directions = prior.steering_directions(config, "sae", [3], pipe.device)
    assert torch.equal(directions[0], row)
    strengths = torch.from_numpy(schedule.strength)
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    prior.steered_latents(
        pipe,
        config,
        directions,
        strengths,
        [11],
        hooks_before=[lambda _m, _a, out: before.append(output_tensor(out).clone())],
        hooks_after=[lambda _m, _a, out: after.append(output_tensor(out).clone())],
    )
    assert len(before) == len(after) == 7
    for call, steered in enumerate(schedule.steered[0]):
        if steered:
            added = (strengths[0, call] * row)[None, :, None, None]
            assert strengths[0, call] > 100
            assert torch.equal(after[call], before[call] + added), call
        else:
            assert torch.equal(after[call], before[call]), call


def test_rerun_after_interruption_generates_only_missing_channels(data_root: Path, monkeypatch) -> None:
    config = experiment(
        data_root, "resume", "stages.prior.channels=[3,7,10,11,13]", "stages.prior.channels_per_batch=2", kinds=("raw",)
    )
    shards = prior.plan_prior(config, "raw")
    assert shards == [[3, 7, 10, 11], [13]]
    prior.prepare_prior_store(config, "raw")
    real = prior.steered_latents
    generated: list[int] = []

    def counting(pipe, cfg, directions, strengths, seeds, **kw):
        channels = directions.argmax(dim=1)[:: len(set(seeds))].tolist()
        if crash and generated:
            raise RuntimeError("worker lost")
        generated.extend(channels)
        return real(pipe, cfg, directions, strengths, seeds, **kw)

    monkeypatch.setattr(prior, "steered_latents", counting)
    crash = True
    with pytest.raises(RuntimeError, match="worker lost"):
        prior.prior_shard(config, "raw", shards[0])  # first batch (3, 7) written, then the worker dies
    assert generated == [3, 7]
    done_dir = stores.prior_done_dir(stores.ExperimentLayout(config.experiment_dir), "raw")
    assert stores.prior_done_channels(done_dir) == {3, 7}

    crash, generated[:] = False, []
    result = prior.run_prior(config, "raw")
    assert generated == [10, 11, 13]
    assert result["generated"] == 3
    latents = stored_latents(config, "raw")
    assert np.isfinite(latents.values).all()

    generated[:] = []
    again = prior.run_prior(config, "raw")
    assert generated == [] and again["generated"] == 0 and all(r["skipped"] for r in again["shards"])
    for sheet in again["contact_sheets"]:
        assert Path(sheet).is_file()


def test_inactive_channels_are_skipped_and_listed_out_of_range_is_an_error(data_root: Path) -> None:
    config = experiment(data_root, "select", "stages.prior.channels=[3,12,20,40]", kinds=("raw",))
    assert prior.plan_prior(config, "raw") == [[3]]
    path = prior.prepare_prior_store(config, "raw")
    skipped = json.loads(stores.open_store(path).attrs["skipped_channels"])
    assert set(skipped) == {"12", "20", "40"}
    result = prior.run_prior(config, "raw")
    assert result["skipped_channels"].keys() == {12, 20, 40}

    with xr.open_zarr(path, chunks=None) as ds:
        assert ds["latent"].dims == ("channel", "result", "latent_channel", "y", "x")
        assert ds["latent"].shape == (1, 2, 4, 8, 8)
        assert ds["seed"].dims == ("result",) and ds["seed"].values.tolist() == [11, 22]
        assert ds["strength"].dims == ds["steered"].dims == ("channel", "timestep")
        assert ds["steered"].dtype == bool and ds["channel"].values.tolist() == [3]
        assert ds["timestep"].values.tolist() == [831, 665, 665, 499, 333, 167, 1]
        assert (ds["strength"].values[~ds["steered"].values] == 0).all()
        assert ds.attrs["strength_mapping"] == "per_call"
    images = stores.prior_images_dir(stores.ExperimentLayout(config.experiment_dir), "raw")
    assert sorted(p.name for p in images.iterdir()) == ["channel_00003_result_0.png", "channel_00003_result_1.png"]

    for overrides, message in [
        (["stages.prior.channels=[3,64]"], r"\[64\] out of range; allowed: 0\.\.63"),
        (["stages.prior.start_channel=70"], r"start_channel: 70 is out of range; allowed: 0\.\.63"),
        (["stages.prior.end_channel=65"], r"end_channel: 65 is out of range"),
        (["stages.prior.channels=[3]", "stages.prior.start_channel=0"], "not both"),
    ]:
        with pytest.raises(ConfigError, match=message):  # at config load (not both) or at planning (range)
            bad = tiny_config(data_root, *PRIOR, "experiment_name=select", "stages.prior.channels=null", *overrides)
            prior.plan_prior(bad, "raw")

    # an analysis block not written yet (NaN fill) is an error, not a silently "inactive" channel
    analysis = stores.open_store(stores.ExperimentLayout(config.experiment_dir).analysis_store("raw"), mode="r+")
    analysis["max_activation"][5] = np.nan
    analysis["active"][5] = False
    with pytest.raises(ValueError, match=r"no values for raw channels \[5\].*has not finished"):
        prior.plan_prior(tiny_config(data_root, *PRIOR, "experiment_name=select", "stages.prior.channels=[3,5]"), "raw")


def test_store_made_with_other_settings_is_refused_and_selection_can_grow(data_root: Path) -> None:
    config = experiment(data_root, "grow", "stages.prior.channels=[3]", kinds=("raw",))
    prior.run_prior(config, "raw")
    first = stored_latents(config, "raw").values[0]
    grown = tiny_config(data_root, *PRIOR, "experiment_name=grow", "stages.prior.channels=[3,7]")
    result = prior.run_prior(grown, "raw")
    assert [r["generated"] for r in result["shards"]] == [[7]]
    latents = stored_latents(grown, "raw")
    assert latents.channel.values.tolist() == [3, 7]
    assert np.array_equal(latents.values[0], first)
    with xr.open_zarr(stores.ExperimentLayout(grown.experiment_dir).prior_store("raw"), chunks=None) as ds:
        schedule = prior.build_schedule(grown, "raw")  # the added row's schedule, not zeros
        assert np.array_equal(ds["strength"].values, schedule.strength) and ds["steered"].values[1].any()
    other = tiny_config(data_root, *PRIOR, "experiment_name=grow", "stages.prior.steer_strength_scale=5")
    with pytest.raises(prior.PriorStoreMismatch, match="steer_strength_scale"):
        prior.prepare_prior_store(other, "raw")
    for setting, shown in [
        ("steer_mode=replace", "steer_mode (store 'add', now 'replace')"),
        ("steer_end_t=300", "steer_end_t (store None, now 300)"),
        ("prompt=a cat", "prompt (store '', now 'a cat')"),
        ("guidance_scale=3", "guidance_scale (store 1.0, now 3.0)"),
    ]:
        changed = tiny_config(data_root, *PRIOR, "experiment_name=grow", f"stages.prior.{setting}")
        with pytest.raises(prior.PriorStoreMismatch, match=re.escape(shown)):
            prior.prepare_prior_store(changed, "raw")

    # a store made before the steering modes (its params lack them) was made with add, no window, `prompt` source
    store = stores.open_store(stores.ExperimentLayout(grown.experiment_dir).prior_store("raw"), mode="r+")
    params = json.loads(store.attrs["params"])
    store.attrs["params"] = json.dumps({k: v for k, v in params.items() if k not in prior.LEGACY_PARAMS})
    assert prior.run_prior(grown, "raw")["generated"] == 0
