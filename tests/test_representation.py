"""Representation: the index the inspector reads, checked against the stores it is built from.

`demo_root` builds a small but complete data root once per session (tiny model: capture,
analysis, priors, two deep-dream runs tracked in MLflow, the representation); the inspector and
notebook tests reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import xarray as xr
import zarr
from PIL import Image

from ddr import stores, tracking
from ddr.config import ExperimentConfig, load_config
from ddr.inspector.data import KindView, available_kinds, mlflow_link
from ddr.stages import analysis, deep_dream, prior, representation
from tests.conftest import TINY, tiny_config
from tests.helpers import run_capture

DEMO = [
    *TINY,
    "image_size=64",
    "stages.timestep_analysis.top_examples=4",
    "stages.prior.n_results=2",
    "stages.prior.seeds=[1,2]",
    "stages.prior.channels_per_batch=4",
    "stages.deep_dream.num_steps=4",
    "stages.deep_dream.n_results=2",
    "stages.deep_dream.seeds=[1,2]",
    "stages.deep_dream.intermediate_opt_results_every_n_steps=2",
]
# Two deep-dream runs of a small sweep: different regularisation, with and without schedule noise.
DREAM_RUNS = {
    "default": ["stages.deep_dream.total_variation_penalty_weight=0.5"],
    "no-noise": [
        "stages.deep_dream.see_through_schedule_noise=false",
        "stages.deep_dream.total_variation_penalty_weight=2.0",
    ],
}
PICKS = {"raw": 3, "sae": 2}  # channels given priors and dreams: the first active ones


def _first_active(config: ExperimentConfig, kind: str, n: int) -> list[int]:
    with xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).analysis_store(kind)) as ds:
        active = ds["active"].values.any(axis=1)
        return [int(c) for c in ds["channel"].values[active][:n]]


def demo_overrides(root: Path, picks: dict[str, list[int]]) -> list[str]:
    def ids(kind: str) -> str:
        return "[" + ",".join(str(c) for c in picks[kind]) + "]"

    return [
        f"data_root={root}",
        *DEMO,
        f"stages.prior.channels={ids('raw')}",
        f"stages.prior.sae.channels={ids('sae')}",
        f"stages.deep_dream.channels={ids('raw')}",
        f"stages.deep_dream.sae.channels={ids('sae')}",
    ]


def build_demo(root: Path) -> ExperimentConfig:
    """Every stage on the tiny model into `root`, reusing the stage functions (as `ddr demo` does, smaller)."""
    config = tiny_config(root, *DEMO)
    run_capture(config)
    for kind in config.kinds:
        analysis.run_analysis(config, kind)
    picks = {kind: _first_active(config, kind, n) for kind, n in PICKS.items()}
    config = load_config(demo_overrides(root, picks))
    for kind in config.kinds:
        prior.run_prior(config, kind)
    for run_name, extra in DREAM_RUNS.items():
        run_config = load_config([*demo_overrides(root, picks), f"stages.deep_dream.run_name={run_name}", *extra])
        with tracking.stage_run(run_config, "deep_dream", tags={"ddr.dream_run": run_name}) as run:
            for kind in run_config.kinds:
                result = deep_dream.run_dream(run_config, kind, mlflow_run_id=run.info.run_id)
                numbers = {f"{kind}_{k}": float(v) for k, v in result["summary"].items() if isinstance(v, int | float)}
                mlflow.log_metrics(numbers)
    representation.run_representation(config, channels_per_shard=16)
    (root / "picks.json").write_text(json.dumps(picks))
    return config


def demo_root(factory: pytest.TempPathFactory) -> Path:
    """The session's demo data root, built on first use (shared by the representation, inspector and notebook tests)."""
    cache = os.environ.get("DDR_TEST_DEMO_ROOT")  # while developing: keep one demo root across sessions
    root = Path(cache) if cache else factory.getbasetemp() / "ddr-demo-root"
    if not (root / ".complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build_demo(root)
        (root / ".complete").write_text("ok")
    return root


def demo_config(root: Path, *extra: str) -> ExperimentConfig:
    return load_config([*demo_overrides(root, json.loads((root / "picks.json").read_text())), *extra])


def bare_experiment(root: Path, name: str = "bare") -> ExperimentConfig:
    """Capture and analysis only (copied from the demo experiment), raw channels only: no priors, dreams or SAE."""
    config = load_config([f"data_root={root}", *DEMO, f"experiment_name={name}", "use_sae=false"])
    source = demo_config(root).experiment_dir
    if not config.experiment_dir.exists():
        shutil.copytree(source / "capture", config.experiment_dir / "capture")
        config.experiment_dir.joinpath("analysis").mkdir(parents=True)
        for item in ("raw.zarr", "raw.summary.json"):
            src, dst = source / "analysis" / item, config.experiment_dir / "analysis" / item
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return config


# --- hand-written stores of every new kind (issue 9): no model, fast ---------------------------------------

HAND_PROMPTS = ["a red circle", "a blue square", "a red square", "a green circle"]
HAND_TIMESTEPS = [900, 500, 100]
HAND_TOTAL = 999
HAND_CHANNELS = 4
HAND_RUN = "accent"
# The planted ranking: channel, mean score, the call (and its timestep) scoring highest; no best timestep is
# where the inspector would open the channel by itself (its peak, or the first call when it has none).
HAND_CONCEPT = [
    {"channel": 2, "score": 1.5, "best_call": 0, "best_timestep": 900, "best_score": 4.5},
    {"channel": 0, "score": 0.75, "best_call": 1, "best_timestep": 500, "best_score": 2.25},
    {"channel": 1, "score": 0.25, "best_call": 2, "best_timestep": 100, "best_score": 0.75},
]


def _png(path: Path, value: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 255 - value, 0)).save(path)
    return path.as_posix()


def _put(group: zarr.Group, name: str, data: Any, dims: list[str]) -> None:
    data = np.asarray(data)
    dtype = str if data.dtype.kind in "UO" else data.dtype
    group.create_array(name, shape=data.shape, dtype=dtype, dimension_names=dims)[...] = data


def _hand_analysis(config: ExperimentConfig) -> None:
    """Capture (4 samples, 3 calls) and analysis of 4 channels: 1 peaks at t=500, 2 at t=100, 0 and 3 inactive."""
    layout = stores.ExperimentLayout(config.experiment_dir)
    images = [f"capture/images/sample_{i:05d}.png" for i in range(len(HAND_PROMPTS))]
    for i, image in enumerate(images):
        _png(config.experiment_dir / image, 40 * i)
    stores.create_capture_store(
        layout.capture_store,
        prompts=HAND_PROMPTS,
        seeds=np.arange(len(HAND_PROMPTS)),
        images=images,
        timesteps=np.asarray(HAND_TIMESTEPS),
        n_channels=HAND_CHANNELS,
        n_features=None,
        chunk_samples=4,
        dtype="float32",
        attrs={},
    )
    n, calls, t = HAND_CHANNELS, len(HAND_TIMESTEPS), HAND_TOTAL + 1
    profile = np.zeros((n, t))
    profile[1, 400:601], profile[2, 50:151] = 0.5, 0.25
    peak_t = np.full((n, 2), -1)
    peak_t[1, 0], peak_t[2, 0] = 500, 100
    peak_height = np.where(peak_t >= 0, 0.5, np.nan)
    top_sample = np.tile(np.array([0, 1]), (n, calls, 1))
    top_sample[1, 1] = [2, 0]  # channel 1's ranked examples at call 1 (t = 500)
    group = stores.create_analysis_store(
        layout.analysis_store("raw"),
        channels=np.arange(n),
        timesteps=np.asarray(HAND_TIMESTEPS),
        total_timesteps=HAND_TOTAL,
        top_peak_count=2,
        top_examples=2,
        channel_block=n,
        attrs={"capture_store": str(layout.capture_store)},
    )
    stores.write_analysis_block(
        group,
        0,
        {
            "topk_frequency": np.full((n, calls), 0.25),
            "max_activation": np.arange(n * calls, dtype=np.float32).reshape(n, calls),
            "mean_activation": np.zeros((n, calls)),
            "profile": profile,
            "active": profile > 0,
            "peak_t": peak_t,
            "peak_height": peak_height,
            "top_sample": top_sample,
            "top_value": np.ones((n, calls, 2)),
        },
    )
    stores.consolidate(layout.analysis_store("raw"))


def _hand_heatmaps(config: ExperimentConfig) -> None:
    """Channel 1: maps of its two examples at peak 0 (t=500, call 1) and of its two priors."""
    store = config.experiment_dir / "heatmaps" / "raw.zarr"
    group = zarr.open_group(str(store), mode="w")
    n = HAND_CHANNELS
    example_map = np.full((n, 2, 2, 4, 4), np.nan, dtype=np.float32)
    example_map[1, 0, 0] = 0.0
    example_map[1, 0, 0, 1, 2] = 3.0
    example_map[1, 0, 1] = 2.0
    example_sample = np.full((n, 2, 2), -1)
    example_sample[1, 0] = [2, 0]
    example_sample[2, 0] = [0, 1]  # listed but not mapped yet (NaN): left out
    example_call = np.full((n, 2), -1)
    example_call[1, 0], example_call[2, 0] = 1, 2
    prior_map = np.full((n, 2, 4, 4), np.nan, dtype=np.float32)
    prior_map[1, 0], prior_map[1, 1] = 1.0, 4.0
    _put(group, "example_map", example_map, ["channel", "peak", "rank", "y", "x"])
    _put(group, "example_sample", example_sample, ["channel", "peak", "rank"])
    _put(group, "example_call", example_call, ["channel", "peak"])
    _put(group, "peak_t", np.asarray([[-1, -1], [500, -1], [100, -1], [-1, -1]]), ["channel", "peak"])
    _put(group, "prior_map", prior_map, ["channel", "result", "y", "x"])
    _put(group, "prior_t", np.asarray([-1, 500, -1, -1]), ["channel"])
    _put(group, "channel", np.arange(n), ["channel"])
    overlays = store.with_suffix("") / "overlays"
    for rank in range(2):
        _png(overlays / f"channel_00001_peak_0_rank_{rank}.png", 200)
        _png(overlays / f"prior_channel_00001_result_{rank}.png", 220)


def _hand_prior(config: ExperimentConfig) -> None:
    """Channel 1 ablated on a prompt, two seeds: ablated and baseline images, an effect per seed."""
    folder = stores.ExperimentLayout(config.experiment_dir).prior_dir("raw")
    attrs = {
        "steer_mode": "ablate",
        "steer_start_t": 800,
        "steer_end_t": 200,
        "prompt": "a red circle",
        "guidance_scale": 2.0,
        "prompt_source": "prompt",
    }
    group = zarr.open_group(str(folder / "priors.zarr"), mode="w", attributes=attrs)
    _put(
        group, "latent", np.zeros((1, 2, 4, 8, 8), dtype=np.float32), ["channel", "result", "latent_channel", "y", "x"]
    )
    _put(group, "seed", np.asarray([1, 2]), ["result"])
    _put(group, "strength", np.zeros((1, 3), dtype=np.float32), ["channel", "timestep"])
    _put(group, "steered", np.asarray([[False, True, False]]), ["channel", "timestep"])
    _put(group, "channel", np.asarray([1]), ["channel"])
    _put(group, "timestep", np.asarray(HAND_TIMESTEPS), ["timestep"])
    _put(group, "effect", np.asarray([[-0.5, -0.25]], dtype=np.float32), ["channel", "result"])
    for result in range(2):
        _png(folder / "images" / f"channel_00001_result_{result}.png", 90)
        _png(folder / "images" / f"channel_00001_result_{result}_baseline.png", 10)


def _hand_dreams(config: ExperimentConfig) -> None:
    """One run accentuating channels 1 (t=500, from examples 2 and 0) and 2 (t=100, not from examples)."""
    folder = stores.ExperimentLayout(config.experiment_dir).dream_dir(HAND_RUN, "raw")
    attrs = {
        "objective": "channel_mean",
        "negative": True,
        "start_from": "example",
        "parameterisation": "phase_fourier",
        "diversity_penalty_weight": 0.5,
        "seed_distance_max": 3.0,
        "seed_distance_penalty_weight": 0.0,
        "image_pattern": "images/channel_{channel:05d}_t_{t:04d}_result_{result}.png",
        "snapshot_pattern": "images/snapshots/channel_{channel:05d}_t_{t:04d}_result_{result}_step_{step:04d}.png",
    }
    group = zarr.open_group(str(folder / "dreams.zarr"), mode="w", attributes=attrs)
    per_result = np.asarray([[1.0, 2.0], [0.5, 0.25]], dtype=np.float32)
    _put(group, "target_channel", np.asarray([1, 2]), ["target"])
    _put(group, "target_t", np.asarray([500, 100]), ["target"])
    _put(group, "seed", np.asarray([1, 2]), ["result"])
    _put(group, "step", np.asarray([2]), ["step"])
    for name in ("activation", "normalized_activation", "selectivity"):
        _put(group, name, per_result, ["target", "result"])
    _put(group, "failed_step", np.full((2, 2), -1), ["target", "result"])
    _put(group, "history_activation", per_result[..., None], ["target", "result", "step"])
    _put(group, "latent", np.zeros((2, 2, 4, 8, 8), dtype=np.float32), ["target", "result", "latent_channel", "y", "x"])
    _put(
        group,
        "attribution",
        np.ones((2, 2, 4, 8, 8), dtype=np.float32),
        ["target", "result", "latent_channel", "y", "x"],
    )
    _put(group, "seed_distance", np.asarray([[1.0, 2.5], [np.nan, 0.5]], dtype=np.float32), ["target", "result"])
    _put(group, "start_sample", np.asarray([[2, 0], [-1, -1]]), ["target", "result"])
    _put(group, "diversity", np.asarray([0.3, 0.8], dtype=np.float32), ["target"])
    for channel, t in ((1, 500), (2, 100)):
        for result in range(2):
            name = f"channel_{channel:05d}_t_{t:04d}_result_{result}.png"
            _png(folder / "images" / name, 120)
            if channel == 1:  # only channel 1's results have attribution overlays and start images
                _png(folder / "images" / "attribution" / name, 250)
                _png(folder / "images" / "start" / name, 30)


def hand_concept(config: ExperimentConfig, name: str = "red") -> None:
    """A concept ranking (store, then summary) whose top list is HAND_CONCEPT."""
    layout = stores.ExperimentLayout(config.experiment_dir)
    scores = np.zeros((HAND_CHANNELS, len(HAND_TIMESTEPS)), dtype=np.float32)
    for entry in HAND_CONCEPT:
        scores[entry["channel"], entry["best_call"]] = entry["best_score"]
    stores.write_concept_store(
        layout.concept_store("raw", name),
        dim="channel",
        channels=np.arange(HAND_CHANNELS),
        timesteps=np.asarray(HAND_TIMESTEPS),
        arrays={
            "score": scores,
            "mean_concept": scores,
            "mean_rest": np.zeros_like(scores),
            "mean_score": scores.mean(axis=1),
            "ranking": np.argsort(-scores.mean(axis=1), kind="stable"),
        },
        attrs={"concept": name},
    )
    summary = {"concept": name, "n_concept": 2, "n_rest": 2, "score_rule": "effect size", "top": HAND_CONCEPT}
    stores.write_concept_summary(layout.concept_summary("raw", name), summary)


def hand_experiment(root: Path, name: str = "hand", *, new_results: bool = True) -> ExperimentConfig:
    """Capture and analysis by hand; with `new_results` also heatmaps, an ablation prior, an accentuation run
    and a concept ranking, written as their stages lay them out."""
    config = load_config([f"data_root={root}", f"experiment_name={name}", "use_sae=false"])
    _hand_analysis(config)
    if new_results:
        _hand_heatmaps(config)
        _hand_prior(config)
        _hand_dreams(config)
        hand_concept(config)
    return config


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_root(tmp_path_factory)


@pytest.fixture(scope="module")
def config(root: Path) -> ExperimentConfig:
    return demo_config(root)


def test_index_matches_the_analysis_prior_and_dream_stores(config: ExperimentConfig) -> None:
    layout = stores.ExperimentLayout(config.experiment_dir)
    picks = json.loads((config.data_root / "picks.json").read_text())
    for kind in ("raw", "sae"):
        folder = layout.representation_dir / kind
        index = json.loads((folder / "index.json").read_text())
        ds = xr.open_zarr(layout.analysis_store(kind))
        rep = xr.open_zarr(folder / "channels.zarr")
        n = ds.sizes["channel"]
        rows = index["channels"]
        assert [r["channel"] for r in rows if r["active"]] == sorted(
            int(c) for c in ds["channel"].values[ds["active"].values.any(axis=1)]
        )
        assert len(rows) == n and all(r["active"] for r in rows[: index["n_active"]])
        assert not any(r["active"] for r in rows[index["n_active"] :]), "active channels come first"
        for name in ("profile", "active", "max_activation", "top_sample", "top_value", "peak_t"):
            np.testing.assert_array_equal(rep[name].values, ds[name].values, err_msg=name)
        # max activation on t: exact at a captured timestep visited once, NaN outside the captured range
        calls = ds["timestep"].values
        once = [i for i, v in enumerate(calls) if (calls == v).sum() == 1]
        np.testing.assert_allclose(
            rep["max_activation_profile"].values[:, calls[once]], ds["max_activation"].values[:, once], rtol=1e-6
        )
        assert np.isnan(rep["max_activation_profile"].values[:, calls.max() + 1 :]).all()
        capture_ds = xr.open_zarr(layout.capture_store)
        assert list(rep["prompt"].values) == list(capture_ds["prompt"].values)
        assert all((config.experiment_dir / p).is_file() for p in rep["image"].values)

        prior_ds = xr.open_zarr(layout.prior_store(kind))
        with_prior = sorted(r["channel"] for r in rows if r["n_priors"])
        assert with_prior == sorted(picks[kind]) == sorted(int(c) for c in prior_ds["channel"].values)
        assert index["sources"]["prior"] == f"prior/{kind}/priors.zarr" and "prior" not in index["absent"]
        assert sorted(d["run"] for d in index["dream_runs"]) == sorted(DREAM_RUNS)

        for channel in picks[kind]:
            row = next(r for r in rows if r["channel"] == channel)
            details = json.loads((folder / row["file"]).read_text())
            assert [r["seed"] for r in details["prior"]["results"]] == [1, 2]
            assert details["prior"]["steered_timesteps"], "a prior is steered somewhere"
            for run in details["dreams"]:
                group = stores.open_store(layout.dream_store(run["run"], kind))
                assert run["mlflow_run_id"] == group.attrs["mlflow_run_id"]
                assert run["see_through_schedule_noise"] == (run["run"] == "default")
                targets = np.flatnonzero(group["target_channel"][:] == channel)
                assert sorted(t["target"] for t in run["targets"]) == sorted(targets.tolist())
                for target in run["targets"]:
                    assert target["t"] == int(group["target_t"][target["target"]])
                    assert target["diversity"] == pytest.approx(float(group["diversity"][target["target"]]))
                    for r, result in enumerate(target["results"]):
                        for metric in ("activation", "normalized_activation", "selectivity"):
                            stored = float(group[metric][target["target"], r])
                            assert result[metric] == (None if np.isnan(stored) else pytest.approx(stored)), metric
                        assert result["failed_step"] == int(group["failed_step"][target["target"], r])
                        assert (config.experiment_dir / result["image"]).is_file()
                        assert (config.experiment_dir / result["attribution"]).is_file(), "the stage's overlay"
                        distance = float(group["seed_distance"][target["target"], r])
                        assert result["seed_distance"] == pytest.approx(distance)
                        steps = [s["step"] for s in result["snapshots"]]
                        assert steps == [int(s) for s in group["step"][:]]
                        assert all((config.experiment_dir / s["image"]).is_file() for s in result["snapshots"])
            n_dreams = sum(len(t["results"]) for run in details["dreams"] for t in run["targets"])
            assert row["n_dreams"] == n_dreams > 0
            values = [
                r["normalized_activation"]
                for run in details["dreams"]
                for t in run["targets"]
                for r in t["results"]
                if r["failed_step"] < 0 and r["normalized_activation"] is not None
            ]
            assert row["dream_normalized_activation"] == (pytest.approx(max(values)) if values else None)

        text = (folder / "index.json").read_text() + "".join(p.read_text() for p in (folder / "channels").glob("*"))
        assert str(config.data_root) not in text.replace(index["mlflow"]["tracking_uri"], ""), "paths are relative"
    manifest = json.loads((layout.representation_dir / "index.json").read_text())
    assert set(manifest["kinds"]) == {"raw", "sae"} and not manifest["absent"]


def test_missing_stages_and_sae_are_recorded_absent(root: Path) -> None:
    config = bare_experiment(root)
    result = representation.run_representation(config)
    assert set(result) == {"raw", "manifest"}
    absent = result["raw"]["absent"]
    assert "prior" in absent and "dreams" in absent
    manifest = json.loads(Path(result["manifest"]).read_text())
    assert manifest["kinds"]["sae"] is None and "no SAE" in manifest["absent"]["sae"]
    assert available_kinds(config.experiment_dir)["sae"] == manifest["absent"]["sae"]
    view = KindView(config.experiment_dir, "raw")
    channel = view.channel(view.order[0])
    assert channel.prior is None and channel.dreams == [] and channel.examples(0)
    with pytest.raises(FileNotFoundError, match="timestep_analysis"):
        representation.run_representation(load_config([f"data_root={root}", *DEMO, "experiment_name=nothing"]))


def test_rerun_is_a_no_op_until_an_input_changes_and_shards_resume(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("assets", "mlflow.db", "mlartifacts"))
    config = demo_config(copy)
    kind = "raw"
    assert representation.plan_representation(config, kind, channels_per_shard=16) == [], "inputs unchanged"
    before = json.loads((representation.representation_dir(config, kind) / "index.json").read_text())

    # a new deep-dream run appears: the representation is rebuilt in shards, resumably
    layout = stores.ExperimentLayout(config.experiment_dir)
    shutil.copytree(layout.root / "dream" / "default", layout.root / "dream" / "again")
    shards = representation.plan_representation(config, kind, channels_per_shard=16)
    assert [s.index for s in shards] == [0, 1, 2, 3]
    for shard in shards[:2]:
        representation.representation_shard(config, kind, shard)
    assert (representation.representation_dir(config, kind) / "index.json").read_text() == json.dumps(
        before, indent=1
    ), "readers see the old representation until the new one is complete"
    with pytest.raises(RuntimeError, match="2 of 4 shards not done"):
        representation.finalize_representation(config, kind)
    remaining = representation.plan_representation(config, kind, channels_per_shard=16)
    assert [s.index for s in remaining] == [2, 3], "an interrupted build resumes"
    for shard in remaining:
        representation.representation_shard(config, kind, shard)
    representation.finalize_representation(config, kind)
    after = json.loads((representation.representation_dir(config, kind) / "index.json").read_text())
    assert sorted(d["run"] for d in after["dream_runs"]) == sorted([*DREAM_RUNS, "again"])
    assert not representation.partial_dir(config, kind).exists()

    # the shard split does not change the result
    one = representation.run_representation(config, [kind], channels_per_shard=1000, force=True)
    assert one[kind]["shards"] == 1
    single = json.loads((representation.representation_dir(config, kind) / "index.json").read_text())
    assert single["channels"] == after["channels"]


def test_copied_data_root_resolves_every_path_inside_the_copy(root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "moved"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("assets"))
    experiment = demo_config(copy).experiment_dir
    for kind in ("raw", "sae"):
        view = KindView(experiment, kind)
        for c in json.loads((copy / "picks.json").read_text())[kind]:
            channel = view.channel(c)
            paths = [view.path(r["image"]) for r in channel.prior["results"]]
            paths += [view.path(r["image"]) for d in channel.dreams for t in d["targets"] for r in t["results"]]
            paths += [e.image for call in range(len(view.timesteps)) for e in channel.examples(call)]
            assert paths and all(p is not None and copy in p.parents for p in paths)
        link = view.mlflow_link(view.dream_runs[0]["mlflow_run_id"])
        assert link is not None and str(copy / "mlflow.db") in link.command, "the copy's own MLflow store"


def test_dream_images_are_found_by_name_when_a_store_has_no_patterns() -> None:
    assert representation.parse_image_name("snapshots/channel_00012_t_0500_result_1_step_0010.png") == {
        "channel": 12,
        "t": 500,
        "result": 1,
        "step": 10,
    }
    assert representation.parse_image_name("feature-7/timestep-999/seed_1024.png") == {
        "channel": 7,
        "t": 999,
        "seed": 1024,
    }
    assert representation.parse_image_name("target_3_result_0_final.png") == {"target": 3, "result": 0}


def test_mlflow_links_for_servers_and_local_stores(tmp_path: Path) -> None:
    link = mlflow_link("https://mlflow.example.org/", "abc", "7")
    assert link is not None and link.url == "https://mlflow.example.org/#/experiments/7/runs/abc"
    local = mlflow_link(
        "sqlite:////old/place/mlflow.db", "abc", "7", tracking_path_relative="../../mlflow.db", experiment_dir=tmp_path
    )
    assert local is not None and local.url is None
    assert f"sqlite:///{(tmp_path / '../../mlflow.db').resolve()}" in local.command
    assert local.hint.endswith("#/experiments/7/runs/abc")
    assert mlflow_link("sqlite:///x.db", None) is None


@pytest.mark.usefixtures("prefect_harness")
def test_representation_flow_builds_every_kind_and_logs_an_mlflow_run(root: Path, tmp_path: Path) -> None:
    from flows.representation import representation_flow

    copy = tmp_path / "flow"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("representation"))
    picks = json.loads((copy / "picks.json").read_text())
    # raw: 4 shards mapped on Dask
    overrides = [
        *demo_overrides(copy, picks),
        "infrastructure.n_workers=2",
        "stages.representation.channels_per_shard=16",
    ]
    config = load_config(overrides)
    result = representation_flow(overrides=overrides)
    assert result["raw"]["n_channels"] == 64 and result["sae"]["n_with_dreams"] == len(picks["sae"])
    client = mlflow.MlflowClient(tracking.tracking_uri(config))
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["ddr.stage"] == "representation"
    assert run.data.metrics["raw_channels"] == 64 and run.data.metrics["raw_channels_with_dreams"] >= 1
    index = json.loads((representation.representation_dir(config, "raw") / "index.json").read_text())
    assert index["mlflow"]["experiment_id"] == run.info.experiment_id
    link = KindView(config.experiment_dir, "raw").mlflow_link(index["dream_runs"][0]["mlflow_run_id"])
    assert link is not None and f"experiments/{run.info.experiment_id}/runs/" in link.hint


# --- issue 9: heatmaps, accentuation / attribution, steering modes, concept search -----------------------


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    config = hand_experiment(tmp_path_factory.mktemp("hand"))
    representation.run_representation(config)
    return config


def _index_and_details(config: ExperimentConfig) -> tuple[dict[str, Any], dict[int, dict[str, Any]]]:
    folder = representation.representation_dir(config, "raw")
    index = json.loads((folder / "index.json").read_text())
    details = {r["channel"]: json.loads((folder / r["file"]).read_text()) for r in index["channels"] if r["file"]}
    return index, details


def test_heatmaps_reach_the_channel_json_as_overlays_at_their_peaks(hand: ExperimentConfig) -> None:
    index, details = _index_and_details(hand)
    overlays = "heatmaps/raw/overlays"
    assert details[1]["heatmaps"] == {
        "examples": [
            {
                "peak": 0,
                "t": 500,
                "call": 1,
                "rank": 0,
                "sample": 2,
                "map_max": 3.0,
                "overlay": f"{overlays}/channel_00001_peak_0_rank_0.png",
            },
            {
                "peak": 0,
                "t": 500,
                "call": 1,
                "rank": 1,
                "sample": 0,
                "map_max": 2.0,
                "overlay": f"{overlays}/channel_00001_peak_0_rank_1.png",
            },
        ],
        "priors": [
            {"result": 0, "t": 500, "map_max": 1.0, "overlay": f"{overlays}/prior_channel_00001_result_0.png"},
            {"result": 1, "t": 500, "map_max": 4.0, "overlay": f"{overlays}/prior_channel_00001_result_1.png"},
        ],
    }
    assert details[2]["heatmaps"] is None, "channel 2's examples are listed but not mapped yet"
    rows = {r["channel"]: r for r in index["channels"]}
    assert (rows[1]["n_heatmaps"], rows[1]["heatmap_max"]) == (4, 3.0)
    assert (rows[2]["n_heatmaps"], rows[2]["heatmap_max"]) == (0, None)
    assert index["n_with_heatmaps"] == 1 and index["sources"]["heatmaps"] == "heatmaps/raw.zarr"
    channel = KindView(hand.experiment_dir, "raw").channel(1)
    assert sorted(channel.example_heatmaps(1)) == [0, 2] and channel.example_heatmaps(0) == {}
    assert channel.heatmap_timesteps() == [500]


def test_dream_results_carry_attribution_start_image_seed_distance_and_diversity(hand: ExperimentConfig) -> None:
    index, details = _index_and_details(hand)
    images = f"dream/{HAND_RUN}/raw/images"
    (run,) = details[1]["dreams"]
    assert run["summary"] == "negative · accentuation from examples (distance ≤ 3) · phase-only · diversity w=0.5"
    assert run["settings"]["start_from"] == "example" and index["dream_runs"][0]["summary"] == run["summary"]
    (target,) = run["targets"]
    assert target["diversity"] == pytest.approx(0.3)
    name = "channel_00001_t_0500_result_{}.png"
    assert [r["attribution"] for r in target["results"]] == [f"{images}/attribution/{name.format(r)}" for r in (0, 1)]
    assert [r["start_image"] for r in target["results"]] == [f"{images}/start/{name.format(r)}" for r in (0, 1)]
    assert [r["image"] for r in target["results"]] == [f"{images}/{name.format(r)}" for r in (0, 1)]
    assert [(r["start_sample"], r["seed_distance"]) for r in target["results"]] == [(2, 1.0), (0, 2.5)]
    (other,) = details[2]["dreams"][0]["targets"]
    assert [(r["attribution"], r["start_image"], r["start_sample"]) for r in other["results"]] == [(None,) * 3] * 2
    assert [r["seed_distance"] for r in other["results"]] == [None, 0.5], "NaN (not recorded) becomes null"
    rows = {r["channel"]: r for r in index["channels"]}
    assert rows[1]["dream_diversity"] == pytest.approx(0.3) and rows[1]["dream_seed_distance"] == 2.5
    assert rows[2]["dreams"][HAND_RUN]["diversity"] == pytest.approx(0.8)


def test_ablation_priors_carry_mode_window_baselines_and_effects(hand: ExperimentConfig) -> None:
    index, details = _index_and_details(hand)
    prior = details[1]["prior"]
    assert (prior["mode"], prior["window"], prior["prompt"]) == ("ablate", [800, 200], "a red circle")
    assert (prior["guidance_scale"], prior["prompt_source"]) == (2.0, "prompt")
    images = "prior/raw/images"
    assert [(r["image"], r["baseline"], r["effect"]) for r in prior["results"]] == [
        (f"{images}/channel_00001_result_{r}.png", f"{images}/channel_00001_result_{r}_baseline.png", effect)
        for r, effect in ((0, -0.5), (1, -0.25))
    ]
    assert next(r for r in index["channels"] if r["channel"] == 1)["prior_effect"] == -0.375


def test_priors_regenerating_dataset_examples_carry_their_sample_seed_and_prompt(tmp_path: Path) -> None:
    config = hand_experiment(tmp_path, new_results=False)
    _hand_prior(config)
    group = zarr.open_group(str(stores.ExperimentLayout(config.experiment_dir).prior_store("raw")), mode="r+")
    group.attrs["prompt_source"] = "top_examples"
    _put(group, "example_sample", np.asarray([[2, 0]]), ["channel", "result"])
    _put(group, "example_seed", np.asarray([[12, 10]]), ["channel", "result"])
    _put(group, "example_prompt", np.asarray([["a red square", "a red circle"]]), ["channel", "result"])
    representation.run_representation(config)
    prior = _index_and_details(config)[1][1]["prior"]
    assert prior["prompt_source"] == "top_examples"
    assert [(r["sample"], r["seed"], r["prompt"]) for r in prior["results"]] == [
        (2, 12, "a red square"),
        (0, 10, "a red circle"),
    ]


def test_concept_rankings_are_listed_per_kind(hand: ExperimentConfig) -> None:
    index, _ = _index_and_details(hand)
    assert index["concepts"] == [
        {
            "name": "red",
            "slug": "red",
            "n_concept": 2,
            "n_rest": 2,
            "score_rule": "effect size",
            "top": HAND_CONCEPT,
            "json": "concepts/raw/red.json",
            "store": "concepts/raw/red.zarr",
        }
    ]
    assert "concepts" not in index["absent"] and "heatmaps" not in index["absent"]
    assert KindView(hand.experiment_dir, "raw").concepts[0]["top"][0]["channel"] == 2


def test_every_new_path_is_relative_and_exists(hand: ExperimentConfig) -> None:
    _, details = _index_and_details(hand)
    paths = [e["overlay"] for d in details.values() if d["heatmaps"] for e in d["heatmaps"]["examples"]]
    paths += [e["overlay"] for d in details.values() if d["heatmaps"] for e in d["heatmaps"]["priors"]]
    paths += [r["baseline"] for d in details.values() if d["prior"] for r in d["prior"]["results"]]
    results = [r for d in details.values() for run in d["dreams"] for t in run["targets"] for r in t["results"]]
    paths += [r[key] for r in results for key in ("attribution", "start_image") if r[key]]
    assert len(paths) == 10
    assert all(not p.startswith("/") and (hand.experiment_dir / p).is_file() for p in paths)


def test_without_the_new_stores_old_experiments_keep_working(tmp_path: Path) -> None:
    config = hand_experiment(tmp_path, new_results=False)
    # a dream run and a prior store from before issue 9: none of the new arrays, attributes or images
    _hand_dreams(config)
    dream_folder = stores.ExperimentLayout(config.experiment_dir).dream_dir(HAND_RUN, "raw")
    group = zarr.open_group(str(dream_folder / "dreams.zarr"), mode="r+")
    for name in ("attribution", "seed_distance", "start_sample", "diversity"):
        del group[name]
    for name in ("negative", "start_from", "parameterisation", "diversity_penalty_weight", "seed_distance_max"):
        del group.attrs[name]
    for side in ("attribution", "start"):
        shutil.rmtree(dream_folder / "images" / side)
    _hand_prior(config)
    prior_store = stores.ExperimentLayout(config.experiment_dir).prior_store("raw")
    group = zarr.open_group(str(prior_store), mode="r+")
    del group["effect"]
    for name in ("steer_mode", "steer_start_t", "steer_end_t", "prompt_source"):
        del group.attrs[name]
    for baseline in prior_store.parent.glob("images/*_baseline.png"):
        baseline.unlink()
    representation.run_representation(config)
    index, details = _index_and_details(config)
    assert index["concepts"] == [] and {"heatmaps", "concepts"} <= set(index["absent"])
    assert index["dream_runs"][0]["summary"] == "" and index["n_with_heatmaps"] == 0
    (result, _) = details[1]["dreams"][0]["targets"][0]["results"]
    assert result["image"] and (result["attribution"], result["start_image"], result["seed_distance"]) == (None,) * 3
    assert details[1]["dreams"][0]["targets"][0]["diversity"] is None and details[1]["heatmaps"] is None
    prior = details[1]["prior"]
    assert (prior["mode"], prior["window"]) == ("add", None), "a store from before the modes only added"
    assert [(r["baseline"], r["effect"], r["sample"]) for r in prior["results"]] == [(None, None, None)] * 2
    assert all(r["dream_diversity"] is None and r["heatmap_max"] is None for r in index["channels"])
    view = KindView(config.experiment_dir, "raw")
    assert view.channel(1).heatmaps == {"examples": [], "priors": []} and view.concepts == []
    assert "dream_diversity" not in view.metrics_available()


def test_a_changed_heatmap_or_concept_store_triggers_a_rebuild(tmp_path: Path) -> None:
    config = hand_experiment(tmp_path)
    representation.run_representation(config)
    assert representation.plan_representation(config, "raw") == [], "inputs unchanged"
    heatmaps = zarr.open_group(str(config.experiment_dir / "heatmaps" / "raw.zarr"), mode="r+")
    heatmaps["example_map"][1, 0, 1, 0, 0] = 9.0
    assert representation.plan_representation(config, "raw"), "a changed heatmap store is a new input"
    representation.run_representation(config)
    index, _ = _index_and_details(config)
    assert next(r for r in index["channels"] if r["channel"] == 1)["heatmap_max"] == 9.0
    hand_concept(config, "circle")
    assert representation.plan_representation(config, "raw"), "a new concept ranking is a new input"
    representation.run_representation(config)
    assert [c["slug"] for c in _index_and_details(config)[0]["concepts"]] == ["circle", "red"]
    # once the stage writes done markers, only finished parts count: here channel 1's examples, not its priors
    stores.mark_heatmap_done(stores.ExperimentLayout(config.experiment_dir), "raw", "examples", 1, {})
    assert representation.plan_representation(config, "raw"), "a done marker is a new input"
    representation.run_representation(config)
    heatmaps = _index_and_details(config)[1][1]["heatmaps"]
    assert len(heatmaps["examples"]) == 2 and heatmaps["priors"] == []
    # a ranking that cannot be read is left out and said so; the others stay
    (stores.ExperimentLayout(config.experiment_dir).concepts_dir("raw") / "broken.json").write_text("{")
    representation.run_representation(config)
    index = _index_and_details(config)[0]
    assert [c["slug"] for c in index["concepts"]] == ["circle", "red"]
    assert index["absent"]["concept:broken"].startswith("unreadable ranking concepts/raw/broken.json")
