"""Activity plots over a planted analysis: GIF per multi-peak channel, PNG otherwise, none for dead ones."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ddr import stores
from ddr.config import ExperimentConfig, load_config
from ddr.stages import analysis, plots

TIMESTEPS = np.array([901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1])
N_SAMPLES, N_CHANNELS = 12, 10
TWO_PEAKS, ONE_PEAK, DEAD = 8, 7, 9


def planted_capture(folder: Path) -> None:
    """Channel 8 peaks at 901 and 301, channel 7 only at 801, channel 9 never; images are small PNGs."""
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, (N_SAMPLES, len(TIMESTEPS), N_CHANNELS)).astype(np.float32)
    raw[:, :, 7:] = -1.0
    raw[:, 0, TWO_PEAKS] = 10 + np.arange(N_SAMPLES)  # top example at 901: sample 11
    raw[:6, 7, TWO_PEAKS] = 5.0 + np.arange(6)  # at 301: sample 5
    raw[:, 2, ONE_PEAK] = 10.0  # all tie: sample 0
    group = stores.create_capture_store(
        folder / "capture" / "activations.zarr",
        prompts=[f"a planted prompt number {i}" for i in range(N_SAMPLES)],
        seeds=np.arange(N_SAMPLES),
        images=[f"capture/images/{i:06d}.png" for i in range(N_SAMPLES)],
        timesteps=TIMESTEPS,
        n_channels=N_CHANNELS,
        n_features=None,
        chunk_samples=4,
        dtype="float32",
        attrs={},
    )
    stores.write_capture_rows(group, 0, raw, None)
    for shard in range(3):
        stores.mark_shard_done(folder / "capture" / "shards", shard, {})
    (folder / "capture" / "images").mkdir()
    for i in range(N_SAMPLES):
        Image.new("RGB", (16, 16), (20 * i, 100, 200)).save(folder / "capture" / "images" / f"{i:06d}.png")


@pytest.fixture
def analysed(tmp_path: Path) -> ExperimentConfig:
    config = load_config(
        [
            f"data_root={tmp_path}",
            "use_sae=false",
            "stages.timestep_analysis.top_k=2",
            "stages.plots.frame_duration=0.5",
            "stages.plots.channels_per_shard=4",
            "stages.plots.dpi=40",
        ]
    )
    planted_capture(config.experiment_dir)
    analysis.run_analysis(config, "raw")
    return config


def test_gif_per_peak_png_for_one_peak_and_no_plot_for_dead(analysed: ExperimentConfig) -> None:
    shards = plots.plan_plots(analysed, "raw")
    assert [len(s) for s in shards] == [4, 4, 1]
    assert sorted(c for s in shards for c in s) == [c for c in range(N_CHANNELS) if c != DEAD]

    (analysed.experiment_dir / "capture" / "images" / "000000.png").unlink()  # ONE_PEAK's example: placeholder
    written = plots.plot_channels(analysed, "raw", [TWO_PEAKS, ONE_PEAK, DEAD])
    folder = analysed.experiment_dir / "plots" / "raw"
    assert written == [folder / "channel_00008.gif", folder / "channel_00007.png"]
    with Image.open(folder / "channel_00008.gif") as gif:
        assert gif.n_frames == 2
        durations = []
        for frame in range(gif.n_frames):
            gif.seek(frame)
            durations.append(gif.info["duration"])
        assert durations == [500, 500]
    with Image.open(folder / "channel_00007.png") as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]
    assert not list(folder.glob("channel_00009.*"))

    mtime = (folder / "channel_00008.gif").stat().st_mtime_ns
    assert plots.plot_channels(analysed, "raw", [TWO_PEAKS]) == [folder / "channel_00008.gif"]
    assert (folder / "channel_00008.gif").stat().st_mtime_ns == mtime  # a rerun keeps what is done

    index = json.loads(plots.write_plot_index(analysed, "raw").read_text())
    entries = {e["channel"]: e for e in index["channels"]}
    assert DEAD not in entries and index["active_channels"] == N_CHANNELS - 1
    assert entries[TWO_PEAKS]["plot"] == "channel_00008.gif"
    assert [p["t"] for p in entries[TWO_PEAKS]["peaks"]] == [901, 301]
    assert entries[TWO_PEAKS]["peaks"][0]["height"] == 1.0
    assert entries[ONE_PEAK]["plot"] == "channel_00007.png"
    assert sorted(index["missing_plots"]) == [c for c in range(7)]


def test_frames_show_each_peaks_top_example(analysed: ExperimentConfig) -> None:
    group = stores.open_store(plots.analysis_store_path(analysed, "raw"))
    (info,) = plots._read_channels(group, [TWO_PEAKS])
    assert info.frames() == [901, 301]
    assert info.example_at(901, TIMESTEPS)[1:] == (11, 21.0)
    assert info.example_at(301, TIMESTEPS)[1:] == (5, 10.0)
    (single,) = plots._read_channels(group, [ONE_PEAK])
    assert single.example_at(801, TIMESTEPS)[:2] == (2, 0)  # the repeated 801: the call where it fired


def test_unknown_kind_and_missing_analysis(tmp_path: Path) -> None:
    config = load_config([f"data_root={tmp_path}"])
    with pytest.raises(ValueError, match=r"kind: unknown value 'rgb'; allowed: raw, sae"):
        plots.plan_plots(config, "rgb")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=r"run the timestep_analysis stage first"):
        plots.plan_plots(config, "raw")


def test_a_mapped_top_example_is_drawn_as_its_heat_overlay(analysed: ExperimentConfig, monkeypatch) -> None:
    drawn: dict[int, list[tuple[np.ndarray, str]]] = {}
    render = plots.render_frame

    def recording(info: Any, **kwargs: Any) -> Image.Image:
        drawn.setdefault(info.channel, []).append((np.asarray(kwargs["image"]), kwargs["caption"]))
        return render(info, **kwargs)

    monkeypatch.setattr(plots, "render_frame", recording)
    plots.plot_channels(analysed, "raw", [ONE_PEAK])  # no heatmaps yet: the plain image
    plain = drawn.pop(ONE_PEAK)[0][0]

    layout = stores.ExperimentLayout(analysed.experiment_dir)
    group = stores.create_heatmap_store(
        layout.heatmap_store("raw"),
        channels=np.arange(N_CHANNELS),
        peaks=1,
        ranks=1,
        results=0,
        map_shape=(2, 2),
        attrs={},
    )
    # ONE_PEAK's frame shows sample 0 at call 2 (the repeated 801); TWO_PEAKS' first frame sample 11 at call 0,
    # but its store row names sample 3: a stale mapping, not drawn.
    stores.write_heatmap_tables(
        group,
        np.array([ONE_PEAK, TWO_PEAKS]),
        {"example_call": np.array([[2], [0]]), "example_sample": np.array([[[0]], [[3]]])},
    )
    stores.write_heatmap_maps(group, "example_map", ONE_PEAK, np.array([[[[0.0, 2.5], [-1.0, 0.0]]]]))
    for channel in (ONE_PEAK, TWO_PEAKS):
        path = stores.heatmap_overlay_path(layout, "raw", channel, 0, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (255, 0, 255)).save(path)
        stores.mark_heatmap_done(layout, "raw", "examples", channel, {})
        marker = stores.heatmap_marker_path(layout, "raw", "examples", channel)
        os.utime(marker, (marker.stat().st_atime, marker.stat().st_mtime + 10))  # mapped after the plot

    plots.plot_channels(analysed, "raw", [ONE_PEAK, TWO_PEAKS])  # no overwrite: redrawn since newly mapped
    ((image, caption),) = drawn[ONE_PEAK]
    assert (image == (255, 0, 255)).all() and not (plain == (255, 0, 255)).all(axis=-1).any()
    assert caption.endswith("heat: its spatial map at this call (0..2.5)")
    assert all("heat" not in c and not (i == (255, 0, 255)).all(axis=-1).any() for i, c in drawn[TWO_PEAKS])
