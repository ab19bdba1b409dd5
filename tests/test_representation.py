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

import mlflow
import numpy as np
import pytest
import xarray as xr

from ddr import stores, tracking
from ddr.config import ExperimentConfig, load_config
from ddr.inspector.data import KindView, available_kinds, mlflow_link
from ddr.stages import analysis, capture, deep_dream, prior, representation
from tests.conftest import TINY, tiny_config

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
    plan = capture.plan_capture(config)
    capture.prepare_store(config, plan)
    for shard in capture.pending_shards(config, plan):
        capture.capture_shard(config, shard)
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
                    for r, result in enumerate(target["results"]):
                        for metric in ("activation", "normalized_activation", "selectivity"):
                            stored = float(group[metric][target["target"], r])
                            assert result[metric] == (None if np.isnan(stored) else pytest.approx(stored)), metric
                        assert result["failed_step"] == int(group["failed_step"][target["target"], r])
                        assert (config.experiment_dir / result["image"]).is_file()
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
