"""Concept search: the effect size by hand, chunk invariance, the store and its summary, generated prompts,
a planted concept channel on toy-shapes ranked first, and the flow with its MLflow run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import xarray as xr

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig, load_config
from ddr.hooks import find_layer, output_tensor, replace_output
from ddr.provision import provision
from ddr.stages import capture, concept_search
from ddr.stages.concept_search import Concept, concept_mask, score_concept
from ddr.tracking import experiment_name, tracking_uri
from tests.conftest import TINY, TOY_SHAPES, tiny_config
from tests.helpers import reference_capture, run_capture

torch.set_num_threads(1)

PLANTED_CHANNEL, PLANTED_FEATURE = 11, 5


def planted(tmp_path: Path, *overrides: str) -> tuple[ExperimentConfig, list[str], np.ndarray, np.ndarray, np.ndarray]:
    """A written capture store (36 samples, 5 calls, 16 channels, 8 features) where channel 11 and feature 5 fire
    on "red" prompts, and channel 4 is large but concept-blind."""
    config = load_config([f"data_root={tmp_path}", *overrides])
    rng = np.random.default_rng(0)
    prompts = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square", "cross", "star")] * 3
    n, calls = len(prompts), 5
    raw = rng.normal(size=(n, calls, 16)).astype(np.float32)
    sae = np.maximum(rng.normal(size=(n, calls, 8)), 0).astype(np.float32)
    red = concept_mask(prompts, "red")
    raw[red, :, PLANTED_CHANNEL] += 3.0
    sae[red, :, PLANTED_FEATURE] += 2.0
    raw[:, :, 4] *= 10.0
    layout = stores.ExperimentLayout(config.experiment_dir)
    group = stores.create_capture_store(
        layout.capture_store,
        prompts=prompts,
        seeds=np.arange(n),
        images=[""] * n,
        timesteps=np.array([900, 700, 500, 300, 100]),
        n_channels=16,
        n_features=8,
        chunk_samples=8,
        dtype="float32",
        attrs={},
    )
    stores.write_capture_rows(group, 0, raw, sae)
    return config, prompts, raw, sae, red


def effect_size(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[channel, call] by the formula, in float64 with np.var."""
    inside, outside = values[mask].astype(np.float64), values[~mask].astype(np.float64)
    pooled = np.sqrt((inside.var(0) * len(inside) + outside.var(0) * len(outside)) / len(values))
    return ((inside.mean(0) - outside.mean(0)) / (pooled + 1e-8)).T


def test_concept_mask_matches_whole_words_or_a_prompt_list() -> None:
    prompts = ["a red circle", "a reddish square", "RED cross", "a red  background"]
    assert concept_mask(prompts, "red").tolist() == [True, False, True, True]
    assert concept_mask(prompts, "red background").tolist() == [False, False, False, False]
    assert concept_mask(prompts, ["a reddish square"]).tolist() == [False, True, False, False]


def test_effect_size_by_hand(tmp_path: Path) -> None:
    """4 samples, 1 call, 1 channel: concept {2, 4}, rest {0, 2}: means 3 and 1, variances 1 and 1 -> 2 / 1."""
    config = load_config([f"data_root={tmp_path}", "use_sae=false"])
    group = stores.create_capture_store(
        stores.ExperimentLayout(config.experiment_dir).capture_store,
        prompts=["a cat", "a cat", "a dog", "a dog"],
        seeds=np.arange(4),
        images=[""] * 4,
        timesteps=np.array([500]),
        n_channels=1,
        n_features=None,
        chunk_samples=2,
        dtype="float32",
        attrs={},
    )
    stores.write_capture_rows(group, 0, np.array([2, 4, 0, 2], dtype=np.float32).reshape(4, 1, 1), None)
    scores = score_concept(config, "raw", "cat", chunk_samples=1)
    np.testing.assert_allclose(scores.score, [[2.0 / (1.0 + 1e-8)]], rtol=1e-12)
    np.testing.assert_allclose(scores.mean_concept, [[3.0]])
    np.testing.assert_allclose(scores.mean_rest, [[1.0]])
    assert (scores.n_concept, scores.n_rest) == (2, 2)


def test_planted_concept_channel_ranks_first_and_chunks_do_not_matter(tmp_path: Path) -> None:
    config, _prompts, raw, sae, red = planted(tmp_path)
    scores = score_concept(config, "raw", "red", chunk_samples=7)
    assert scores.channel[scores.ranking[0]] == PLANTED_CHANNEL and scores.n_concept == red.sum() == 12
    np.testing.assert_allclose(scores.score, effect_size(raw, red), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.mean_concept, raw[red].mean(0).T, rtol=1e-5, atol=1e-6)
    whole = score_concept(config, "raw", "red", chunk_samples=100)
    np.testing.assert_allclose(whole.score, scores.score, atol=1e-9)
    features = score_concept(config, "sae", "red", chunk_samples=5)
    assert features.channel[features.ranking[0]] == PLANTED_FEATURE
    np.testing.assert_allclose(features.score, effect_size(sae, red), rtol=1e-5, atol=1e-6)


def test_store_and_summary_round_trip_and_a_rerun_skips(tmp_path: Path) -> None:
    config, *_ = planted(tmp_path, "stages.concept_search.top=3")
    layout = stores.ExperimentLayout(config.experiment_dir)
    red = Concept("red")
    for kind, dim in (("raw", "channel"), ("sae", "feature")):
        expected = score_concept(config, kind, red)
        summary = concept_search.run_concept(config, kind, red)
        assert not summary["skipped"]
        ds = xr.open_zarr(layout.concept_store(kind, "red"))
        assert ds.score.dims == (dim, "timestep") and ds.score.dtype == np.float32
        assert ds.mean_score.dims == (dim,) and ds.ranking.dims == ("rank",)
        np.testing.assert_allclose(ds.score.values, expected.score, rtol=1e-6)
        np.testing.assert_allclose(ds.mean_score.values, expected.score.mean(1), rtol=1e-6)
        assert ds.ranking.values.tolist() == expected.channel[expected.ranking].tolist()
        assert ds[dim].values.tolist() == expected.channel.tolist()
        assert ds.timestep.values.tolist() == [900, 700, 500, 300, 100]
        assert (ds.attrs["concept"], ds.attrs["kind"], ds.attrs["n_concept"], ds.attrs["n_rest"]) == (
            "red",
            kind,
            12,
            24,
        )
        assert "pooled std" in ds.attrs["score_rule"]
        top = json.loads(layout.concept_summary(kind, "red").read_text())["top"]
        assert [t["channel"] for t in top] == ds.ranking.values[:3].tolist()
        for row in top:
            channel_scores = ds.score.sel({dim: row["channel"]}).values
            assert row["score"] == pytest.approx(float(ds.mean_score.sel({dim: row["channel"]})), rel=1e-6)
            assert row["best_timestep"] == ds.timestep.values[channel_scores.argmax()]
            assert row["best_score"] == pytest.approx(float(channel_scores.max()), rel=1e-6)
    store = layout.concept_store("raw", "red")
    written = (store / "zarr.json").stat().st_mtime_ns
    assert concept_search.run_concept(config, "raw", red)["skipped"]
    assert (store / "zarr.json").stat().st_mtime_ns == written
    more = load_config([f"data_root={tmp_path}", "stages.concept_search.top=5"])
    again = concept_search.run_concept(more, "raw", red)
    assert not again["skipped"] and len(again["top"]) == 5


def test_an_interrupted_write_is_not_taken_for_done(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, *_ = planted(tmp_path, "use_sae=false")
    layout = stores.ExperimentLayout(config.experiment_dir)
    red = Concept("red")

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(stores, "write_concept_summary", crash)
    with pytest.raises(KeyboardInterrupt):
        concept_search.run_concept(config, "raw", red)
    assert layout.concept_store("raw", "red").exists() and not concept_search.concept_done(config, "raw", red)
    monkeypatch.undo()
    (layout.concepts_dir("raw") / "red.zarr.partial").mkdir()
    assert not concept_search.run_concept(config, "raw", red)["skipped"]
    assert concept_search.concept_done(config, "raw", red)
    assert not (layout.concepts_dir("raw") / "red.zarr.partial").exists()


def test_a_concept_on_one_side_only_is_a_clear_error(tmp_path: Path) -> None:
    config, *_ = planted(tmp_path)
    with pytest.raises(ConfigError, match="matches 0 of 36 samples"):
        score_concept(config, "raw", "purple")


def test_config_lists_from_the_command_line_and_clear_errors() -> None:
    config = load_config(
        ["stages.concept_search.concepts=[red,circle]", "stages.concept_search.concept_prompts={p: [a red cat]}"]
    )
    assert config.stages.concept_search.concepts == ["red", "circle"]
    assert config.stages.concept_search.concept_prompts == {"p": ["a red cat"]}
    assert load_config([]).stages.concept_search.concepts == []
    for overrides, message in [
        (["stages.concept_search.concepts=[red, red]"], r"\['red'\] are named more than once"),
        (["stages.concept_search.concepts=[' ']"], "must not be blank"),
        (["stages.concept_search.concept_prompts={p: []}"], "needs a list of non-blank prompts"),
        (["stages.concept_search.sae={concepts: [x]}"], r"sae block: \['concepts'\]"),
        (["stages.concept_search.samples_per_prompt=0"], "greater than 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(overrides)
    clash = load_config(["stages.concept_search.concepts=[red car, red/car]"])
    with pytest.raises(ConfigError, match="would share the files concepts/<kind>/red_car"):
        concept_search.planned_concepts(clash)


# --- generated prompts on the tiny model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_capture(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides of a tiny experiment whose capture (5 prompts, with the SAE) is complete."""
    root = tmp_path_factory.mktemp("tiny")
    run_capture(tiny_config(root))
    return [f"data_root={root}", *TINY]


def test_a_prompt_not_in_the_dataset_is_generated_like_a_capture(tiny_capture: list[str]) -> None:
    novel = "a purple giraffe reading a newspaper"
    config = load_config(
        [
            *tiny_capture,
            f"stages.concept_search.concept_prompts={{novel: ['{novel}']}}",
            "stages.concept_search.samples_per_prompt=2",
        ]
    )
    (concept,) = concept_search.planned_concepts(config)
    layout = stores.ExperimentLayout(config.experiment_dir)
    captured = xr.open_zarr(layout.capture_store)
    assert novel not in captured.prompt.values.tolist()
    with pytest.raises(FileNotFoundError, match="run generate_concept"):
        score_concept(config, "raw", concept)
    assert concept_search.generation_pending(config, concept)
    assert not concept_search.generate_concept(config, concept)["skipped"]
    assert concept_search.generate_concept(config, concept)["skipped"] and not concept_search.generation_pending(
        config, concept
    )
    generated = xr.open_zarr(layout.concept_generated_store("novel"))
    first_seed = int(captured.seed.values.max()) + 1
    assert generated.seed.values.tolist() == [first_seed, first_seed + 1]
    assert generated.prompt.values.tolist() == [novel, novel]
    for row, seed in enumerate(generated.seed.values):
        np.testing.assert_allclose(
            generated.raw.values[row], reference_capture(config, novel, int(seed)), rtol=1e-4, atol=1e-5
        )
    for kind in ("raw", "sae"):
        scores = score_concept(config, kind, concept)
        assert (scores.n_concept, scores.n_rest) == (2, 5)
        np.testing.assert_allclose(scores.mean_concept, generated[kind].values.mean(0).T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(scores.mean_rest, captured[kind].values.mean(0).T, rtol=1e-5, atol=1e-6)
    other_steps = load_config(
        [*tiny_capture, "num_inference_steps=4", "stages.concept_search.concept_prompts={x: [a moon]}"]
    )
    with pytest.raises(ConfigError, match=r"differs from those recorded .* in num_inference_steps"):
        concept_search.generate_concept(other_steps, concept_search.planned_concepts(other_steps)[0])


def test_the_flow_from_the_command_line_writes_stores_and_an_mlflow_run(
    tiny_capture: list[str], prefect_harness: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.cli import main
    from flows.concept_search import concept_search_flow

    capture_dir = load_config(tiny_capture).experiment_dir / "capture"
    overrides = [
        *tiny_capture,
        "experiment_name=flow",
        f"stages.concept_search.capture_results_dir={capture_dir}",
        "stages.concept_search.concepts=[circle,cat]",
        "stages.concept_search.concept_prompts={moon: [a full moon over the sea]}",
        "stages.concept_search.samples_per_prompt=1",
        "stages.concept_search.top=4",
        "infrastructure.n_workers=1",
        "infrastructure.processes=false",
    ]
    assert main(["run", "concept_search", *overrides]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    config = load_config(overrides)
    layout = stores.ExperimentLayout(config.experiment_dir)
    assert layout.concept_generated_store("moon").exists()
    client = mlflow.MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(experiment_name(config))
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`ddr.stage` = 'concept_search'")
    assert result["mlflow_run_id"] == run.info.run_id and run.data.tags["prefect.flow_run_id"]
    assert run.data.params["stages.concept_search.concepts"] == "['circle', 'cat']"
    assert run.data.params["stages.concept_search.top"] == "4"
    assert run.data.params["concept_search.kinds"] == "raw,sae"
    assert run.data.metrics["generated_samples"] == 1
    artifacts = {a.path for kind in ("raw", "sae") for a in client.list_artifacts(run.info.run_id, f"concepts/{kind}")}
    for kind in ("raw", "sae"):
        for name in ("circle", "cat", "moon"):
            summary = json.loads(layout.concept_summary(kind, name).read_text())
            ds = xr.open_zarr(layout.concept_store(kind, name))
            assert [t["channel"] for t in summary["top"]] == ds.ranking.values[:4].tolist()
            assert run.data.metrics[f"{kind}.{name}.top_score"] == pytest.approx(summary["top"][0]["score"])
            assert run.data.metrics[f"{kind}.{name}.n_concept"] == summary["n_concept"]
            assert f"concepts/{kind}/{name}.json" in artifacts
    assert json.loads(layout.concept_summary("raw", "moon").read_text())["n_concept"] == 1
    assert result["raw"]["circle"]["top"].startswith(f"{summary_top(layout, 'raw', 'circle')} (")
    with get_client(sync_client=True) as prefect:
        key = ArtifactFilterKey(any_=["ddr-concept-search-flow"])
        (artifact,) = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=key))
    assert result["raw"]["circle"]["top"] in artifact.data and run.info.run_id in artifact.data
    again = concept_search_flow(overrides=overrides)
    assert concept_search_flow(overrides=tiny_capture) == {"concepts": 0}, "no concepts configured: nothing to do"
    assert all(again[kind][name]["skipped"] for kind in ("raw", "sae") for name in ("circle", "cat", "moon"))


def summary_top(layout: stores.ExperimentLayout, kind: str, name: str) -> int:
    return json.loads(layout.concept_summary(kind, name).read_text())["top"][0]["channel"]


# --- end to end on toy-shapes ---------------------------------------------------------------------

TOY = [
    *TOY_SHAPES,
    "stages.capture.samples_per_shard=50",
    "stages.capture.batch_size=50",
    "stages.capture.save_images=false",
]
TOY_PLANTED_CHANNEL, TOY_PLANT = 10, 1.5  # channel 10's natural "circle" score is about 0, its std about 0.6


def test_toy_shapes_ranks_a_planted_concept_channel_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture on toy-shapes while a hook raises channel 10 by 1.5 in the conditional half of "circle" samples;
    the stage ranks it first for "circle". A real concept (red background) runs too: its top channel's
    concept - rest mean difference at its best call is positive, by numpy from the capture store."""
    config = load_config([f"data_root={tmp_path}", *TOY, "stages.concept_search.concepts=[circle, red background]"])
    provision(config)
    unplanted_batch = capture.capture_batch
    word = re.compile(r"\bcircle\b")

    def planted_batch(pipe, prompts, seeds, config, n_calls, sae=None):  # type: ignore[no-untyped-def]
        rows = torch.tensor([bool(word.search(p)) for p in prompts], dtype=torch.float32)

        def plant(_module: object, _args: object, output: object) -> object:
            activation = output_tensor(output).clone()
            conditional = activation[len(prompts) :]
            conditional[:, TOY_PLANTED_CHANNEL] += TOY_PLANT * rows[:, None, None]
            return replace_output(output, activation)

        handle = find_layer(pipe.unet, config.target_layer_name).register_forward_hook(plant)
        try:
            return unplanted_batch(pipe, prompts, seeds, config, n_calls, sae)
        finally:
            handle.remove()

    monkeypatch.setattr(capture, "capture_batch", planted_batch)
    run_capture(config)
    monkeypatch.undo()

    results = {(r["kind"], r["concept"]): r for r in concept_search.run_concept_search(config)}
    assert set(results) == {(k, c) for k in ("raw", "sae") for c in ("circle", "red background")}
    assert results["raw", "circle"]["top"][0]["channel"] == TOY_PLANTED_CHANNEL
    assert results["raw", "circle"]["n_concept"] == 30

    layout = stores.ExperimentLayout(config.experiment_dir)
    captured = xr.open_zarr(layout.capture_store)
    background = np.array(["red background" in p for p in captured.prompt.values])
    assert background.sum() == results["raw", "red background"]["n_concept"] == 25
    for kind, dim in (("raw", "channel"), ("sae", "feature")):
        best = results[kind, "red background"]["top"][0]
        values = captured[kind].sel({dim: best["channel"]}).values[:, best["best_call"]].astype(np.float64)
        difference = values[background].mean() - values[~background].mean()
        assert difference > 0
        pooled = np.sqrt((values[background].var() * 25 + values[~background].var() * 125) / 150)
        assert best["best_score"] == pytest.approx(difference / pooled, rel=1e-4)
        ds = xr.open_zarr(layout.concept_store(kind, "red background"))
        stored = ds.mean_concept - ds.mean_rest
        assert float(stored.sel({dim: best["channel"]}).isel(timestep=best["best_call"])) == pytest.approx(
            difference, rel=1e-4
        )
