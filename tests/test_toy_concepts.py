"""The concept check of issue 8 (ddr/toy/concepts.py): captions -> concepts, concept-pure channels, colour
read-back of generated images, agreement rates, and the end-to-end run on toy-shapes logged to MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image

from ddr import stores
from ddr.config import load_config
from ddr.toy import concepts, shapes

torch.set_num_threads(1)


def test_parse_concepts_uses_the_toy_vocabulary() -> None:
    assert concepts.parse_concepts("a red circle on a blue background") == {
        "colour": "red",
        "shape": "circle",
        "background": "blue",
    }
    assert concepts.parse_concepts("white stripes on a black background\n")["shape"] == "stripes"
    for a in shapes.all_attributes():
        assert concepts.parse_concepts(a.caption) == {"colour": a.colour, "shape": a.shape, "background": a.background}
    with pytest.raises(ValueError):
        concepts.parse_concepts("a purple dog on a beach")


def test_concept_of_takes_the_commonest_value_and_its_share() -> None:
    prompts = [
        "a red circle on a blue background",
        "a green circle on a blue background",
        "a red square on a blue background",
        "a yellow triangle on a white background",
    ]
    c = concepts.concept_of(7, prompts, purity=0.6)
    assert c.values == {"colour": "red", "shape": "circle", "background": "blue"}
    assert c.shares == {"colour": 0.5, "shape": 0.5, "background": 0.75}
    assert c.pure == {"background": "blue"}
    assert concepts.concept_of(7, prompts, purity=0.5).pure == {
        "colour": "red",
        "shape": "circle",
        "background": "blue",
    }
    assert concepts.concept_of(7, [], purity=0.5).pure == {}


def _hand_made_analysis() -> tuple[dict[str, np.ndarray], list[str]]:
    """3 channels, calls at timesteps [951, 901, 901, 1], 3 ranks; channel 2 is inactive."""
    prompts = [
        "a red circle on a blue background",  # 0
        "a green square on a blue background",  # 1
        "a red cross on a white background",  # 2
        "a white triangle on a red background",  # 3
        "a red circle on a green background",  # 4
        "a black square on a yellow background",  # 5
    ]
    top = np.full((3, 4, 3), -1, dtype=np.int64)
    top[0, 1] = [0, 1, 2]  # channel 0 peaks at 901 (calls 1 and 2): samples 0, 1, 2 and 4, 1
    top[0, 2] = [4, 1, -1]
    top[0, 0] = [5, 5, 5]  # not at its peak: ignored
    top[1, 3] = [3, 5, 2]  # channel 1 has no peak: its most frequent call (3)
    top[1, 0] = [0, 0, 0]
    analysis = {
        "channel": np.array([0, 1, 2]),
        "timestep": np.array([951, 901, 901, 1]),
        "top_sample": top,
        "peak_t": np.array([[900, -1], [-1, -1], [-1, -1]]),
        "active": np.array([[True, False], [False, True], [False, False]]),
        "topk_frequency": np.array([[0.1, 0.5, 0.4, 0.0], [0.1, 0.0, 0.0, 0.9], [0.0, 0.0, 0.0, 0.0]]),
    }
    return analysis, prompts


def test_channel_concepts_pool_the_peak_calls_and_skip_inactive_channels() -> None:
    analysis, prompts = _hand_made_analysis()
    found = concepts.channel_concepts(analysis, prompts, purity=0.6)
    assert sorted(found) == [0, 1]
    zero = found[0]
    assert zero.calls == [1, 2] and zero.n_examples == 4  # samples 0, 4, 1, 2 (1 counted once)
    assert zero.values["colour"] == "red" and zero.shares["colour"] == 0.75
    assert zero.pure == {"colour": "red"}
    one = found[1]
    assert one.calls == [3] and one.n_examples == 3 and one.pure == {}
    assert concepts.channel_concepts(analysis, prompts, purity=0.6, rank=1)[0].n_examples == 2  # samples 0, 4
    assert concepts.top_examples(analysis["top_sample"][0], [1, 2], 2) == [0, 4, 1]
    calls = concepts.peak_calls(np.array([1, 951]), analysis["timestep"], analysis["topk_frequency"][0], peaks=2)
    assert calls == [0, 3]


def _config(tmp_path: Path):
    return load_config([f"data_root={tmp_path}", "model=toy-shapes", "sae=toy-shapes-topk"])


def test_concept_pure_channels_read_the_experiment_stores(tmp_path: Path) -> None:
    config = _config(tmp_path)
    analysis, prompts = _hand_made_analysis()
    layout = stores.ExperimentLayout(config.experiment_dir)
    xr.Dataset(coords={"prompt": ("sample", np.array(prompts))}).to_zarr(layout.capture_store)
    dims = {
        "top_sample": ("channel", "timestep", "rank"),
        "peak_t": ("channel", "peak"),
        "active": ("channel", "t"),
        "topk_frequency": ("channel", "timestep"),
    }
    ds = xr.Dataset(
        {name: (d, analysis[name]) for name, d in dims.items()},
        coords={"channel": analysis["channel"], "timestep": ("timestep", analysis["timestep"])},
    )
    ds.to_zarr(layout.analysis_store("raw"))
    pure = concepts.concept_pure_channels(config, "raw", purity=0.6)
    assert list(pure) == [0] and pure[0].pure == {"colour": "red"}
    assert sorted(concepts.concept_pure_channels(config, "raw", purity=0.3)) == [0, 1]


def _save(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def test_classify_images_and_agreement_of_prior_images(tmp_path: Path) -> None:
    config = _config(tmp_path)
    layout = stores.ExperimentLayout(config.experiment_dir)
    red_on_blue = shapes.render(shapes.Sample("circle", "red", "blue", 16, 16, 9))
    green_on_white = shapes.render(shapes.Sample("square", "green", "white", 16, 16, 9))
    grey = np.full((32, 32, 3), 128, dtype=np.uint8)  # no palette colour at all
    paths = [_save(im, tmp_path / f"{i}.png") for i, im in enumerate((red_on_blue, green_on_white, grey))]
    assert concepts.classify_images(paths) == [
        {"colour": "red", "background": "blue"},
        {"colour": "green", "background": "white"},
        {"colour": "", "background": ""},
    ]
    # Channel 3 is pure for a blue background: 2 of its 3 priors show one. Channel 5, pure for a green
    # shape: 1 of 2. Channel 9 has no images.
    for k, image in enumerate((red_on_blue, red_on_blue, green_on_white)):
        _save(image, stores.prior_image_path(layout, "raw", 3, k))
    for k, image in enumerate((green_on_white, grey)):
        _save(image, stores.prior_image_path(layout, "raw", 5, k))
    chosen = {
        3: concepts.ChannelConcept(3, 20, {"colour": "red", "shape": "circle", "background": "blue"}, {}, 0.6),
        5: concepts.ChannelConcept(5, 20, {"colour": "green", "shape": "cross", "background": "red"}, {}, 0.6),
        9: concepts.ChannelConcept(9, 20, {"colour": "black", "shape": "cross", "background": "red"}, {}, 0.6),
    }
    chosen[3].shares = {"colour": 0.5, "shape": 0.1, "background": 0.9}
    chosen[5].shares = {"colour": 0.7, "shape": 0.1, "background": 0.2}
    chosen[9].shares = {"colour": 0.9, "shape": 0.1, "background": 0.2}
    found = concepts.agreement(config, "raw", chosen, source="prior")
    assert found["background"]["n_channels"] == 1 and found["background"]["rate"] == pytest.approx(2 / 3)
    assert found["background"]["per_channel"] == {3: pytest.approx(2 / 3)}
    assert found["colour"]["n_channels"] == 1 and found["colour"]["rate"] == pytest.approx(0.5)
    assert np.isnan(found["colour"]["baseline"])  # no other channel checked for a shape colour
    assert concepts.agreement(config, "raw", chosen, source="dream")["colour"]["n_channels"] == 0
    # The baseline: how often the other checked channels' images show this channel's concept.
    reads = {1: [{"colour": "red", "background": "blue"}] * 2, 2: [{"colour": "red", "background": "white"}] * 2}
    both = {
        1: concepts.ChannelConcept(1, 9, {"colour": "red", "shape": "x", "background": "blue"}, {}, 0.6),
        2: concepts.ChannelConcept(2, 9, {"colour": "red", "shape": "x", "background": "white"}, {}, 0.6),
    }
    for c in both.values():
        c.shares = {"colour": 0.8, "shape": 0.0, "background": 0.8}
    figures = concepts.agreement_from_reads(both, reads)
    assert figures["colour"]["rate"] == 1.0 and figures["colour"]["baseline"] == 1.0
    assert figures["background"]["rate"] == 1.0 and figures["background"]["baseline"] == 0.0


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], object]:
    """The benchmark's run (benchmarks/toy_concepts.py): 300 samples, priors, 10-step dreams; ~1 min on CPU."""
    root = tmp_path_factory.mktemp("concepts")
    overrides = [*concepts.TOY_OVERRIDES, f"data_root={root}"]
    results = concepts.run_concept_pipeline(overrides, kinds=("raw", "sae"), dream_steps=10, dream_results=2)
    print("\n" + concepts.format_table(results))
    return results, load_config(overrides)


def test_priors_of_concept_pure_channels_show_their_background_colour(toy_results) -> None:
    """Measured: raw 0.48 (5 channels), SAE 0.347 (15 features), chance 1/6; the shape colour is at chance
    for SAE features, so only backgrounds are held to a bar (see benchmarks/toy_concepts.py)."""
    results = toy_results[0]
    by_kind = {r["kind"]: r for r in results}
    chance = concepts.CHANCE
    assert by_kind["sae"]["n_pure"]["background"] >= 8 and by_kind["raw"]["n_pure"]["background"] >= 3
    assert by_kind["sae"]["metrics"]["prior_agreement_background"] >= 1.5 * chance, by_kind["sae"]["metrics"]
    assert by_kind["raw"]["metrics"]["prior_agreement_background"] >= 2 * chance, by_kind["raw"]["metrics"]
    for r in results:  # dreams of every background-pure channel; measured raw 0.5, SAE 0.4
        assert r["metrics"]["dream_n_channels_background"] == r["n_pure"]["background"]
        assert r["metrics"]["dream_agreement_background"] >= 1.5 * chance, r["metrics"]


def test_concept_check_logs_the_agreement_to_mlflow(toy_results) -> None:
    import mlflow

    from ddr.tracking import tracking_uri

    results, config = toy_results
    mlflow.set_tracking_uri(tracking_uri(config))
    for r in results:
        run = mlflow.get_run(r["mlflow_run_id"])
        assert run.data.tags["ddr.stage"] == "concept_check"
        assert run.data.metrics["prior_agreement_background"] == pytest.approx(
            r["metrics"]["prior_agreement_background"]
        )
        assert run.data.metrics["chance"] == pytest.approx(1 / 6)
        assert "dream_agreement_background" in run.data.metrics
