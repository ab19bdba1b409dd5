"""Steering modes of the prior stage (add, replace, cfg_aware, ablate), the timestep window, prompted generation
and SAE feature ablation with the error term preserved: hand-computed hook outputs, then the tiny pipeline,
then toy-shapes end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig, load_config
from ddr.hooks import ChannelCodes, SaeFeatureCodes, SteeringHook, TimestepTracker, output_tensor, sae_tokens
from ddr.models.pipeline import load_experiment_sae, load_pipeline
from ddr.models.sae import SparseAutoencoder, random_topk_sae
from ddr.provision import provision
from ddr.stages import analysis, prior
from ddr.stages.capture import generate, scheduler_timesteps
from tests.conftest import TOY_SHAPES, provisioned_root, tiny_config
from tests.helpers import peak_table, run_capture, write_analysis_store

torch.set_num_threads(1)
TOTAL_T = 1000
CALLS = [831, 665, 665, 499, 333, 167, 1]  # tiny's PNDM at 6 steps
PRIOR = ["image_size=64", "stages.prior.n_results=2", "stages.prior.seeds=[11,22]", "stages.prior.channels_per_batch=2"]


def steer(hook: SteeringHook, x: torch.Tensor, t: int = 500) -> torch.Tensor:
    """One layer call through the hook, as the UNet's forward pre-hook and the layer hook would see it."""
    hook.tracker.timesteps.append(t)
    return hook(None, (), x)


# --- the hook, hand-computed -----------------------------------------------------------------------


def test_raw_add_replace_ablate_on_a_hand_made_activation() -> None:
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) - 5.0
    directions = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # sample 0 steers channel 1, sample 1 channel 2
    strengths = torch.tensor([[5.0, 5.0], [7.0, 7.0]])
    steered = torch.tensor([[True, False], [True, True]])
    codes = ChannelCodes(torch.tensor([1, 2]))

    added = steer(SteeringHook(TimestepTracker(), directions, strengths, steered), x.clone())
    want = x.clone()
    want[0, 1] += 5.0
    want[1, 2] += 7.0
    assert torch.equal(added, want)

    replaced = steer(SteeringHook(TimestepTracker(), directions, strengths, steered, "replace", codes), x.clone())
    want = x.clone()
    want[0, 1] = 5.0  # the channel's map becomes s at every position
    want[1, 2] = 7.0
    assert torch.equal(replaced, want)

    ablated = steer(SteeringHook(TimestepTracker(), directions, strengths, steered, "ablate", codes), x.clone())
    want = x.clone()
    want[0, 1] = 0.0
    want[1, 2] = 0.0
    assert torch.equal(ablated, want)

    # second call: sample 0 is not steered there, so replace leaves it bit-identical (strength 0 is not "set to 0")
    hook = SteeringHook(TimestepTracker(), directions, strengths, steered, "replace", codes)
    steer(hook, x.clone())
    second = steer(hook, x.clone(), t=400)
    assert torch.equal(second[0], x[0]) and torch.equal(second[1, 2], torch.full((2, 2), 7.0))


def test_cfg_aware_adds_to_the_conditional_half_and_subtracts_from_the_unconditional() -> None:
    uncond = torch.full((2, 3, 2, 2), 1.0)
    cond = torch.full((2, 3, 2, 2), 10.0)
    directions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    strengths = torch.tensor([[2.0], [4.0]])
    out = steer(SteeringHook(TimestepTracker(), directions, strengths, mode="cfg_aware"), torch.cat([uncond, cond]))
    per_position = out[:, :, 0, 0]
    assert per_position.tolist() == [
        [-1.0, 1.0, 1.0],  # uncond, sample 0: 1 - 2 * [1, 0, 0]
        [1.0, -1.0, -1.0],  # uncond, sample 1: 1 - 4 * [0, .5, .5]
        [12.0, 10.0, 10.0],  # cond, sample 0: 10 + 2 * [1, 0, 0]
        [10.0, 12.0, 12.0],  # cond, sample 1
    ]
    assert (out == out[:, :, :1, :1]).all(), "the same at every position"
    with pytest.raises(RuntimeError, match=r"CFG batch \[unconditional, conditional\] of 2 x 2 rows; .* has 2"):
        steer(SteeringHook(TimestepTracker(), directions, strengths, mode="cfg_aware"), cond)


def hand_made_sae() -> SparseAutoencoder:
    """2 dims, 2 features, ReLU; encoder = identity, b_dec = [0.5, 0], W_dec rows [1, 0] and [0.6, 0.8]."""
    sae = SparseAutoencoder(2, 2, activation="relu")
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(2))
        sae.encoder.bias.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.5, 0.0]))
    return sae


def test_sae_ablation_removes_the_feature_and_keeps_the_error_term() -> None:
    sae = hand_made_sae()
    # one sample, 2 tokens: [3, 1] has codes relu([3, 1] - b_dec) = [2.5, 1]; [-1, -2] has codes [0, 0]
    x = torch.tensor([[3.0, -1.0], [1.0, -2.0]]).reshape(1, 2, 1, 2)
    codes = SaeFeatureCodes(sae, torch.tensor([1]))
    ablated = steer(SteeringHook(TimestepTracker(), sae.W_dec[1:].detach(), torch.ones(1, 1), None, "ablate", codes), x)
    # x - a_1 * W_dec[1] = [3, 1] - 1 * [0.6, 0.8]; the token whose code is 0 is untouched
    torch.testing.assert_close(ablated[0, :, 0], torch.tensor([[2.4, -1.0], [0.2, -2.0]]))
    assert torch.equal(ablated[0, :, 0, 1], x[0, :, 0, 1])
    # the same as decode(codes with feature 1 zeroed) + SAE error: [3, 0] + ([3, 1] - [3.6, 0.8])
    tokens = sae_tokens(x)
    full = sae.encode(tokens)
    assert full[0, 0].tolist() == [2.5, 1.0]
    without = full.clone()
    without[..., 1] = 0
    error = tokens - sae.decode(full)
    torch.testing.assert_close(sae_tokens(ablated), sae.decode(without) + error)

    replaced = steer(
        SteeringHook(TimestepTracker(), sae.W_dec[1:].detach(), torch.full((1, 1), 2.0), None, "replace", codes), x
    )
    # the code becomes 2 at both tokens: [3, 1] - 1 * W_dec[1] + 2 * W_dec[1] and [-1, -2] - 0 + 2 * W_dec[1]
    torch.testing.assert_close(replaced[0, :, 0], torch.tensor([[3.6, 0.2], [1.8, -0.4]]))


def test_sae_ablation_under_input_unit_norm_is_decode_without_the_feature_plus_error() -> None:
    sae = random_topk_sae(8, 16, k=3, seed=0)
    sae.input_unit_norm = True
    x = torch.randn(2, 8, 3, 3, generator=torch.Generator().manual_seed(1))
    features = torch.tensor([4, 9])
    tokens = sae_tokens(x)
    full, stats = sae.encode_with_stats(tokens)
    assert (full[0, :, 4] > 0).any() and (full[1, :, 9] > 0).any(), "both features fire somewhere"
    hook = SteeringHook(
        TimestepTracker(),
        sae.W_dec[features].detach(),
        torch.zeros(2, 1),
        None,
        "ablate",
        SaeFeatureCodes(sae, features),
    )
    without = full.clone()
    without[0, :, 4] = 0
    without[1, :, 9] = 0
    want = sae.decode(without, stats) + (tokens - sae.decode(full, stats))
    torch.testing.assert_close(sae_tokens(steer(hook, x)), want, rtol=1e-5, atol=1e-5)


# --- the tiny pipeline -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return provisioned_root(tmp_path_factory, "steering", *PRIOR)


def write_analysis(config: ExperimentConfig, kind: str) -> None:
    """Every channel active at every t; channel 3 peaks at t=600 and t=100, the others at 500."""
    n = 64 if kind == "raw" else 256
    ts = scheduler_timesteps(config)
    write_analysis_store(
        config,
        kind,
        calls=ts,
        max_activation=np.full((n, len(ts)), 0.5, dtype=np.float32),
        active=np.ones((n, TOTAL_T + 1), dtype=bool),
        peak_t=peak_table(n, {c: [600, 100] if c == 3 else [500] for c in range(n)}, width=2),
    )


def experiment(data_root: Path, name: str, *overrides: str, kind: str = "raw") -> ExperimentConfig:
    config = tiny_config(data_root, *PRIOR, f"experiment_name={name}", *overrides)
    write_analysis(config, kind)
    return config


def recorder(into: list[torch.Tensor]):
    return lambda _module, _args, output: into.append(output_tensor(output).clone())


def run_recorded(pipe, config, schedule, kind: str, **steering) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The layer output of every UNet call before and after the steering hook, both results of channel 0."""
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    channel = int(schedule.channels[0])
    prior.steered_latents(
        pipe,
        config,
        prior.steering_directions(config, kind, [channel] * 2, pipe.device),
        torch.from_numpy(schedule.strength[:1]).repeat(2, 1),
        [11, 22],
        steered=torch.from_numpy(schedule.steered[:1]).repeat(2, 1),
        hooks_before=[recorder(before)],
        hooks_after=[recorder(after)],
        **steering,
    )
    return before, after


def test_window_steers_only_the_calls_inside_it_and_composes_with_the_timesteps_rule(data_root: Path) -> None:
    window = ["stages.prior.steer_start_t=700", "stages.prior.steer_end_t=300"]
    config = experiment(data_root, "window", "stages.prior.channels=[10]", *window)
    schedule = prior.build_schedule(config, "raw")
    assert scheduler_timesteps(config).tolist() == CALLS
    assert schedule.steered[0].tolist() == [False, True, True, True, True, False, False]  # 665, 665, 499, 333
    assert (schedule.strength[0, ~schedule.steered[0]] == 0).all() and (schedule.strength[0, 1:5] == 25.0).all()
    # activity_peaks alone: 600 -> both 665 calls, 100 -> 167; with the window only the 665 calls remain
    peaks = experiment(data_root, "window", "stages.prior.channels=[3]", "stages.prior.timesteps=activity_peaks")
    assert prior.build_schedule(peaks, "raw").steered[0].tolist() == [0, 1, 1, 0, 0, 1, 0]
    both = experiment(
        data_root, "window", "stages.prior.channels=[3]", "stages.prior.timesteps=activity_peaks", *window
    )
    assert prior.build_schedule(both, "raw").steered[0].tolist() == [0, 1, 1, 0, 0, 0, 0]
    outside = experiment(data_root, "window", "stages.prior.channels=[3]", "stages.prior.steer_start_t=200")
    assert prior.build_schedule(outside, "raw").steered[0].tolist() == [0, 0, 0, 0, 0, 1, 1]

    pipe = load_pipeline(config)
    before, after = run_recorded(pipe, config, schedule, "raw")
    plain = replace_schedule(schedule, steered=False)
    plain_before, plain_after = run_recorded(pipe, config, plain, "raw")
    assert len(before) == len(after) == len(plain_before) == 7
    added = torch.zeros(1, 64, 1, 1)
    added[0, 10] = 25.0
    for call in range(7):
        if schedule.steered[0, call]:
            assert torch.equal(after[call], before[call] + added), call
        else:
            assert torch.equal(after[call], before[call]), call  # the hook touched nothing outside the window
        assert torch.equal(plain_after[call], plain_before[call])
    # before the window (and at its first call, whose input is still unsteered) bit-identical to the plain run
    for call in (0, 1):
        assert torch.equal(before[call], plain_before[call]), call
    assert not torch.equal(before[5], plain_before[5])  # after the window the latent has been steered

    prior.run_prior(config, "raw")
    with xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).prior_store("raw"), chunks=None) as ds:
        assert ds["steered"].values[0].tolist() == schedule.steered[0].tolist()
        assert (ds.attrs["steer_start_t"], ds.attrs["steer_end_t"], ds.attrs["steer_mode"]) == (700, 300, "add")


def replace_schedule(schedule: prior.PriorSchedule, steered: bool) -> prior.PriorSchedule:
    """The same schedule steering every call (True) or none (False)."""
    flags = np.full_like(schedule.steered, steered)
    return prior.PriorSchedule(
        kind=schedule.kind,
        channels=schedule.channels,
        timesteps=schedule.timesteps,
        strength=schedule.strength,
        steered=flags,
    )


def test_cfg_aware_pushes_the_conditional_half_up_and_the_unconditional_half_down(data_root: Path) -> None:
    config = experiment(
        data_root,
        "cfg",
        "stages.prior.channels=[10]",
        "stages.prior.steer_mode=cfg_aware",
        "stages.prior.guidance_scale=2",
        "stages.prior.steer_end_t=400",
    )
    schedule = prior.build_schedule(config, "raw")
    assert schedule.steered[0].tolist() == [True, True, True, True, False, False, False]
    pipe = load_pipeline(config)
    before, after = run_recorded(pipe, config, schedule, "raw", mode="cfg_aware", guidance_scale=2.0, prompts=["", ""])
    assert before[0].shape[0] == 4, "the CFG batch: [uncond x 2, cond x 2]"
    others = [c for c in range(64) if c != 10]
    for call in range(7):
        assert torch.equal(after[call][:, others], before[call][:, others]), call
        if schedule.steered[0, call]:
            s = float(schedule.strength[0, call])
            assert s > 0
            assert torch.equal(after[call][:2, 10], before[call][:2, 10] - s), call  # unconditional: pushed down
            assert torch.equal(after[call][2:, 10], before[call][2:, 10] + s), call  # conditional: pushed up
        else:
            assert torch.equal(after[call], before[call]), call

    result = prior.run_prior(config, "raw")
    assert result["generated"] == 1 and result["mean_effect"] is None
    with xr.open_zarr(result["store"], chunks=None) as ds:
        assert ds.attrs["steer_mode"] == "cfg_aware" and ds.attrs["guidance_scale"] == 2.0
        assert "baseline_latent" not in ds and "effect" not in ds
        assert np.isfinite(ds["latent"].values).all()


def test_replace_sets_the_raw_channel_to_the_strength_at_every_position(data_root: Path) -> None:
    config = experiment(data_root, "replace", "stages.prior.channels=[3]", "stages.prior.steer_mode=replace")
    schedule = prior.build_schedule(config, "raw")
    codes = prior.feature_codes(config, "raw", [3, 3], torch.device("cpu"))
    before, after = run_recorded(load_pipeline(config), config, schedule, "raw", mode="replace", codes=codes)
    others = [c for c in range(64) if c != 3]
    for call in range(7):
        assert torch.equal(after[call][:, 3], torch.full_like(after[call][:, 3], float(schedule.strength[0, call])))
        assert torch.equal(after[call][:, others], before[call][:, others])
    assert not torch.equal(before[1][:, 3], after[1][:, 3])


def test_prompted_generation_at_zero_strength_is_the_plain_pipeline_with_that_prompt(data_root: Path) -> None:
    config = experiment(
        data_root,
        "prompted",
        "stages.prior.channels=[3]",
        "stages.prior.steer_strength_scale=0",
        "stages.prior.prompt=a red cat",
        "stages.prior.guidance_scale=2",
    )
    result = prior.run_prior(config, "raw")
    with xr.open_zarr(result["store"], chunks=None) as ds:
        latents = torch.from_numpy(ds["latent"].values[0])
        assert (ds.attrs["prompt"], ds.attrs["guidance_scale"], ds.attrs["prompt_source"]) == (
            "a red cat",
            2.0,
            "prompt",
        )
    pipe = load_pipeline(config)
    settings = config.model_copy(update={"guidance_scale": 2.0})
    assert torch.equal(latents, generate(pipe, ["a red cat"] * 2, [11, 22], settings, output_type="latent").images)
    empty = generate(pipe, [""] * 2, [11, 22], settings, output_type="latent").images
    assert not torch.allclose(latents, empty, atol=1e-3), "the prompt reaches the UNet"


def sae_codes_per_call(pipe, config) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tiny SAE's codes [calls, samples, tokens, features] of an unsteered generation, and its layer outputs."""
    sae = load_experiment_sae(config)
    _, outputs = run_recorded(pipe, config, replace_schedule(prior.build_schedule(config, "sae"), steered=False), "sae")
    return torch.stack([sae.encode(sae_tokens(o)) for o in outputs]), outputs


def test_sae_ablation_subtracts_the_feature_term_and_a_silent_feature_changes_nothing(data_root: Path) -> None:
    base = experiment(data_root, "ablate", "stages.prior.timesteps=all_timesteps", kind="sae")
    pipe = load_pipeline(base)
    sae = load_experiment_sae(base)
    codes, plain = sae_codes_per_call(pipe, base)
    firing = codes[0, 0].amax(dim=0)  # first call, first sample, max over tokens
    active = int(firing.argmax())
    silent = int(torch.nonzero(codes.amax(dim=(0, 1, 2)) == 0)[0])  # code 0 at every call, sample and token
    assert firing[active] > 0

    config = experiment(
        data_root,
        "ablate",
        "stages.prior.timesteps=all_timesteps",
        "stages.prior.steer_mode=ablate",
        f"stages.prior.channels=[{silent},{active}]",
        kind="sae",
    )
    schedule = prior.build_schedule(config, "sae")
    assert schedule.channels.tolist() == sorted([silent, active])
    assert schedule.steered.all() and (schedule.strength == 0).all()
    row = schedule.channels.tolist().index(active)
    one = prior.PriorSchedule(
        "sae", schedule.channels[row : row + 1], schedule.timesteps, schedule.strength, schedule.steered
    )
    feature_codes = prior.feature_codes(config, "sae", [active, active], torch.device("cpu"))
    before, after = run_recorded(pipe, config, one, "sae", mode="ablate", codes=feature_codes)
    assert torch.equal(before[0], plain[0])
    tokens = sae_tokens(before[0])
    a = sae.encode(tokens)[..., active]  # [samples, tokens], computed here, not by the hook
    want = tokens - a[..., None] * sae.W_dec[active].detach()
    torch.testing.assert_close(sae_tokens(after[0]), want, rtol=0, atol=1e-6)
    full = sae.encode(tokens)
    without = full.clone()
    without[..., active] = 0
    torch.testing.assert_close(
        sae_tokens(after[0]), sae.decode(without) + (tokens - sae.decode(full)), rtol=1e-5, atol=1e-5
    )
    assert not torch.equal(after[0], before[0])

    result = prior.run_prior(config, "sae")
    layout = stores.ExperimentLayout(config.experiment_dir)
    with xr.open_zarr(result["store"], chunks=None) as ds:
        rows = {int(c): i for i, c in enumerate(ds["channel"].values)}
        latent, baseline, effect = ds["latent"].values, ds["baseline_latent"].values, ds["effect"].values
        assert ds["baseline_latent"].dims == ds["latent"].dims and ds["effect"].dims == ("channel", "result")
        assert effect.dtype == np.float32 and ds.attrs["steer_mode"] == "ablate"
    assert np.array_equal(latent[rows[silent]], baseline[rows[silent]]), "a silent feature's ablation is a no-op"
    assert effect[rows[silent]].tolist() == [0.0, 0.0]
    assert (effect[rows[active]] > 0).all() and not np.allclose(latent[rows[active]], baseline[rows[active]])
    assert result["mean_effect"] == pytest.approx(float(effect.mean()))
    for channel in (silent, active):
        for k in range(2):
            assert stores.prior_baseline_image_path(layout, "sae", channel, k).is_file()
            assert stores.prior_image_path(layout, "sae", channel, k).is_file()


# --- toy-shapes end to end -------------------------------------------------------------------------

TOY = [
    *TOY_SHAPES,
    "stages.capture.dev_n_prompts=12",
    "stages.capture.samples_per_shard=12",
    "stages.capture.batch_size=4",
    "stages.timestep_analysis.top_k=8",
]
ABLATE = [
    "stages.prior.steer_mode=ablate",
    "stages.prior.prompt_source=top_examples",
    "stages.prior.guidance_scale=2",
    "stages.prior.n_results=2",
    "stages.prior.timesteps=all_timesteps",
]


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Captured (12 samples, guidance 2, 10 steps) and analysed toy-shapes, raw and SAE; ~2 s on CPU."""
    root = tmp_path_factory.mktemp("toy-steering")
    config = load_config([f"data_root={root}", *TOY])
    provision(config)
    run_capture(config)
    for kind in ("raw", "sae"):
        analysis.run_analysis(config, kind)
    return root


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int64)


@pytest.mark.parametrize("kind", ["sae", "raw"])
def test_toy_ablation_regenerates_the_top_examples_and_changes_them(toy_root: Path, kind: str) -> None:
    base = load_config([f"data_root={toy_root}", *TOY])
    layout = stores.ExperimentLayout(base.experiment_dir)
    with xr.open_zarr(layout.analysis_store(kind), chunks=None) as ds:
        feature = int(np.nanmax(ds["max_activation"].values, axis=1).argmax())  # the most active one
        timesteps, peak = ds["timestep"].values, int(ds["peak_t"].values[feature, 0])
        call = (
            int(np.argmin(np.abs(timesteps - peak)))
            if peak >= 0
            else int(ds["topk_frequency"].values[feature].argmax())
        )
        top = ds["top_sample"].values[feature, call, :2]
    config = load_config([f"data_root={toy_root}", *TOY, *ABLATE, f"stages.prior.channels=[{feature}]"])
    result = prior.run_prior(config, kind)
    assert result["generated"] == 1
    group = stores.open_store(stores.ExperimentLayout(config.experiment_dir).capture_store)
    with xr.open_zarr(result["store"], chunks=None) as ds:
        assert (ds.attrs["steer_mode"], ds.attrs["prompt_source"], ds.attrs["guidance_scale"]) == (
            "ablate",
            "top_examples",
            2.0,
        )
        assert ds["example_call"].values.tolist() == [call]
        samples = ds["example_sample"].values[0]
        assert samples.tolist() == top.tolist()
        assert ds["example_seed"].values[0].tolist() == group["seed"][:][samples].tolist()
        assert ds["example_prompt"].values[0].tolist() == [str(p) for p in group["prompt"][:][samples]]
        assert ds["seed"].values.tolist() == [-1, -1] and (ds["strength"].values == 0).all()
        effect = ds["effect"].values[0]
    assert (effect > 0).all(), effect
    for k, sample in enumerate(samples):
        dataset_image = pixels(layout.root / str(group["image"][sample]))
        baseline = pixels(stores.prior_baseline_image_path(layout, kind, feature, k))
        ablated = pixels(stores.prior_image_path(layout, kind, feature, k))
        # Same prompt, seed, steps, guidance and size as the capture: only the batch-mates differ, whose float
        # rounding may move a few pixels by a level or two (measured on CPU: identical). Two different samples
        # differ by ~0.35-0.6 on average.
        assert np.abs(baseline - dataset_image).max() <= 2
        assert np.abs(baseline - dataset_image).mean() < 0.5
        # effect is the mean |ablated - baseline| of the images in 0..1 before 8-bit rounding
        assert abs(np.abs(ablated - baseline).mean() / 255 - effect[k]) < 1 / 255

    assert prior.run_prior(config, kind)["generated"] == 0, "a rerun generates nothing"
    added = load_config([f"data_root={toy_root}", *TOY, *ABLATE[1:], f"stages.prior.channels=[{feature}]"])
    with pytest.raises(prior.PriorStoreMismatch, match="steer_mode \\(store 'ablate', now 'add'\\)"):
        prior.prepare_prior_store(added, kind)


def test_invalid_steering_settings_are_config_errors(toy_root: Path) -> None:
    root = f"data_root={toy_root}"
    for overrides, message in [
        (["stages.prior.steer_start_t=100", "stages.prior.steer_end_t=200"], r"steer_start_t \(100\) must be >= "),
        (["stages.prior.steer_mode=cfg_aware"], r"cfg_aware needs classifier-free guidance: .*\(got 1\.0\)"),
        (["stages.prior.guidance_scale=2", "stages.prior.sae={steer_mode: cfg_aware, guidance_scale: 1}"], "cfg_aware"),
        (["stages.prior.steer_end_t=-1"], "steer_end_t: Input should be greater than or equal to 0"),
        (["stages.prior.steer_mode=subtract"], "steer_mode: Input should be 'add', 'replace', 'cfg_aware' or 'ablate'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config([root, *TOY, *overrides])
    load_config([root, *TOY, *ABLATE, "stages.prior.n_results=7"])  # top examples need no seeds
    for overrides, message in [
        (["stages.prior.steer_start_t=1000"], r"steer_start_t: 1000 is out of range; allowed: 0\.\.999"),
        ([*ABLATE, "stages.prior.n_results=13"], r"n_results: 13 top examples per channel are needed but channel"),
    ]:
        with pytest.raises(ConfigError, match=message):
            prior.plan_prior(load_config([root, *TOY, "stages.prior.channels=[0,1,2,3]", *overrides]), "sae")


@pytest.mark.usefixtures("prefect_harness")
def test_prior_flow_logs_the_steering_settings_and_the_mean_effect_to_mlflow(data_root: Path) -> None:
    import mlflow

    from ddr.tracking import tracking_uri
    from flows.prior import prior_flow

    overrides = [
        f"data_root={data_root}",
        "experiment_name=flow",
        "use_sae=false",
        "infrastructure.n_workers=1",
        "infrastructure.processes=false",
        "stages.prior.channels=[3,10]",
        "stages.prior.steer_mode=ablate",
        "stages.prior.steer_start_t=700",
        "stages.prior.steer_end_t=100",
        "stages.prior.guidance_scale=1.5",
    ]
    config = tiny_config(data_root, *PRIOR, *overrides[1:])
    write_analysis(config, "raw")
    result = prior_flow(overrides=[*PRIOR, *overrides])
    assert result["raw"]["generated"] == 2
    run = mlflow.MlflowClient(tracking_uri(config)).get_run(result["mlflow_run_id"])
    params = run.data.params
    assert params["raw.steer_mode"] == params["stages.prior.steer_mode"] == "ablate"
    assert (params["raw.steer_start_t"], params["raw.steer_end_t"], params["raw.guidance_scale"]) == (
        "700",
        "100",
        "1.5",
    )
    assert params["raw.prompt"] == "" and params["raw.prompt_source"] == "prompt"
    with xr.open_zarr(result["raw"]["store"], chunks=None) as ds:
        effect = ds["effect"].values
    assert np.isfinite(effect).all()
    assert run.data.metrics["raw_mean_effect"] == pytest.approx(float(effect.mean()))
