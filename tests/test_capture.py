"""Capture: the store's layout and values, hooks that change nothing, resumable shards, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig
from ddr.hooks import UnknownLayerError
from ddr.models.pipeline import load_pipeline
from ddr.stages import capture
from tests.conftest import tiny_config
from tests.helpers import reference_capture, run_capture


def test_store_layout_and_values_match_independent_recomputation(tiny: ExperimentConfig) -> None:
    plan = run_capture(tiny)
    layout = stores.ExperimentLayout(tiny.experiment_dir)
    ds = xr.open_zarr(layout.capture_store)
    assert ds.raw.dims == ("sample", "timestep", "channel")
    assert ds.sae.dims == ("sample", "timestep", "feature")
    assert ds.sizes["sample"] == 5 and ds.sizes["timestep"] == len(plan.timesteps) == 7  # PNDM: steps + 1 calls
    assert ds.raw.dtype == np.float32 and ds.timestep.dtype == np.int64 and ds.seed.dtype == np.int64
    assert list(ds.timestep.values) == list(plan.timesteps)
    assert len(set(ds.timestep.values.tolist())) == 6, "the repeated PNDM timestep keeps both calls"
    assert ds.attrs["branch"] == "conditional" and ds.attrs["guidance_scale"] == 7.5
    assert list(ds.prompt.values) == sorted(ds.prompt.values) and len(set(ds.prompt.values)) == 5
    raw = ds.raw.values
    assert not np.isnan(raw).any() and not np.isnan(ds.sae.values).any()
    for sample in (0, 3):
        expected = reference_capture(tiny, str(ds.prompt.values[sample]), int(ds.seed.values[sample]))
        np.testing.assert_allclose(raw[sample], expected, rtol=1e-4, atol=1e-5)
    for image in ds.image.values:
        assert (tiny.experiment_dir / str(image)).is_file()


def test_unconditional_branch_is_recorded_when_asked(tmp_path: Path) -> None:
    cond = tiny_config(tmp_path / "a", "stages.capture.dev_n_prompts=2")
    uncond = tiny_config(tmp_path / "b", "stages.capture.dev_n_prompts=2", "stages.capture.branch=unconditional")
    run_capture(cond)
    run_capture(uncond)
    a = xr.open_zarr(stores.ExperimentLayout(cond.experiment_dir).capture_store).raw.values
    b = xr.open_zarr(stores.ExperimentLayout(uncond.experiment_dir).capture_store).raw.values
    assert not np.allclose(a, b), "the two CFG halves see different prompts, so they must differ"


def test_capturing_does_not_change_the_images(tiny: ExperimentConfig) -> None:
    pipe = load_pipeline(tiny)
    prompts, seeds = ["a red circle on a blue background", "a dog"], [3, 4]
    plain = capture.generate(pipe, prompts, seeds, tiny, output_type="pil").images
    hooked_images, raw, features, seen = capture.capture_batch(pipe, prompts, seeds, tiny, n_calls=7, sae=None)
    assert len(seen) == 7 and raw.shape == (2, 7, 64) and features is None
    for a, b in zip(plain, hooked_images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "hooks must not change a single pixel"
    other_seed = capture.generate(pipe, prompts, [5, 6], tiny, output_type="pil").images
    assert not np.array_equal(np.asarray(other_seed[0]), np.asarray(plain[0])), "the comparison can tell images apart"


def test_interrupted_capture_resumes_without_recomputing(tiny: ExperimentConfig, monkeypatch) -> None:
    plan = capture.plan_capture(tiny)
    capture.prepare_store(tiny, plan)
    assert len(plan.shards) == 2
    capture.capture_shard(tiny, plan.shards[0])
    layout = stores.ExperimentLayout(tiny.experiment_dir)
    first = stores.open_store(layout.capture_store)["raw"][0:4]

    def crash(*_args, **_kwargs):
        raise KeyboardInterrupt("worker killed")

    monkeypatch.setattr(stores, "write_capture_rows", crash)
    with pytest.raises(KeyboardInterrupt):
        capture.capture_shard(tiny, plan.shards[1])
    monkeypatch.undo()
    assert stores.done_shards(layout.capture_shards) == {0}, "a crashed shard must not be marked complete"

    calls: list[list[str]] = []
    original = capture.capture_batch

    def counting(pipe, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return original(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(capture, "capture_batch", counting)
    rerun = capture.plan_capture(tiny)
    capture.prepare_store(tiny, rerun)
    todo = capture.pending_shards(tiny, rerun)
    assert [s.index for s in todo] == [1]
    for shard in todo:
        capture.capture_shard(tiny, shard)
    assert sum(len(c) for c in calls) == 1, "only the missing sample is generated again"
    done_again = capture.capture_shard(tiny, plan.shards[0])
    marker = json.loads(stores.marker_path(layout.capture_shards, 0).read_text())
    assert done_again["skipped"] and done_again["samples"] == marker["samples"] == 4
    assert done_again["seconds"] == marker["seconds"] > 0
    group = stores.open_store(layout.capture_store)
    np.testing.assert_array_equal(group["raw"][0:4], first)
    assert not np.isnan(group["raw"][:]).any()
    markers = sorted(p.name for p in layout.capture_shards.iterdir())
    assert markers == ["shard_00000.json", "shard_00001.json"]


def test_unknown_layer_names_nearest_layers_and_writes_nothing(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "target_layer_name=up_blocks.1.attention.1")
    with pytest.raises(UnknownLayerError, match=r"nearest valid names: up_blocks\.1\.attentions\.1"):
        capture.plan_capture(config)
    assert not stores.ExperimentLayout(config.experiment_dir).capture_store.exists()


def test_missing_prompt_file_is_a_config_error(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    config.stages.capture.prompt_dataset = str(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        capture.plan_capture(config)


def test_malformed_prompt_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"text": "b cat"}\nnot json\n{"text": "a dog"}\n{"txt": "x"}\n\n{"text": "a dog"}\n')
    config = tiny_config(tmp_path, f"stages.capture.prompt_dataset={prompts}")
    plan = run_capture(config)
    assert plan.prompt_file.prompts == ["a dog", "b cat"]
    assert [n for n, _ in plan.prompt_file.malformed] == [2, 4]
    report = plan.prompt_file.report()
    assert "line 2" in report and "line 4" in report
    ds = xr.open_zarr(stores.ExperimentLayout(config.experiment_dir).capture_store)
    assert list(ds.attrs["malformed_prompt_lines"]) == [2, 4]


def test_store_made_with_other_settings_is_kept_and_refused(tiny: ExperimentConfig) -> None:
    run_capture(tiny)
    layout = stores.ExperimentLayout(tiny.experiment_dir)
    before = stores.open_store(layout.capture_store)["raw"][:]
    changed = tiny.model_copy(update={"guidance_scale": 3.0})
    with pytest.raises(capture.CaptureStoreMismatch, match="guidance_scale"):
        capture.prepare_store(changed, capture.plan_capture(changed))
    np.testing.assert_array_equal(stores.open_store(layout.capture_store)["raw"][:], before)
    assert stores.done_shards(layout.capture_shards) == {0, 1}


def test_bad_values_fail_before_any_work(tmp_path: Path) -> None:
    from ddr.config import load_config

    with pytest.raises(ConfigError, match=r"stages.capture.batch_size: Input should be greater than 0 \(got 0\)"):
        load_config([f"data_root={tmp_path}", "stages.capture.batch_size=0"])
    with pytest.raises(ConfigError, match="image_size 100 is not a multiple of 8"):
        load_config([f"data_root={tmp_path}", "image_size=100"])
    assert not (tmp_path / "experiments").exists()


def test_shard_marker_records_its_rows(tiny: ExperimentConfig) -> None:
    run_capture(tiny)
    marker = stores.marker_path(stores.ExperimentLayout(tiny.experiment_dir).capture_shards, 1)
    info = json.loads(marker.read_text())
    assert (info["start"], info["stop"], info["samples"]) == (4, 5, 1)
