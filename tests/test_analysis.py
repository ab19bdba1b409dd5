"""Timestep analysis: planted stores with known answers, the tiny model's real capture against a
straightforward in-memory reference, chunk/block invariance, resumability and bounded memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from scipy.signal import find_peaks

from ddr import stores
from ddr.config import ExperimentConfig, load_config
from ddr.stages import analysis

# calls of a 10-step PNDM run: 801 is visited twice (calls 1 and 2)
TIMESTEPS = np.array([901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1])
TOP_EXAMPLES = 14  # more than the planted store's 12 samples: the last ranks are padding
PLANTED_V = np.array([3, 11, 0, 7, 5, 1, 9, 2, 10, 4, 8, 6], dtype=np.float32)
INT_ARRAYS = ("top_sample", "peak_t", "active")
FLOAT_ARRAYS = ("topk_frequency", "max_activation", "mean_activation", "profile", "peak_height", "top_value")


def make_config(
    root: Path, name: str = "exp", capture: Path | None = None, **analysis_settings: object
) -> ExperimentConfig:
    overrides = [f"data_root={root}", f"experiment_name={name}"]
    if capture is not None:
        overrides.append(f"stages.timestep_analysis.capture_results_dir={capture}")
    overrides += [f"stages.timestep_analysis.{k}={v}" for k, v in analysis_settings.items()]
    return load_config(overrides)


def build_capture(
    folder: Path,
    raw: np.ndarray,
    sae: np.ndarray | None = None,
    timesteps: np.ndarray = TIMESTEPS,
    chunk: int = 4,
    mark: bool = True,
) -> Path:
    """A capture store at folder/activations.zarr written shard by shard, like the capture stage does."""
    n = raw.shape[0]
    path = folder / "activations.zarr"
    group = stores.create_capture_store(
        path,
        prompts=[f"prompt number {i}" for i in range(n)],
        seeds=np.arange(n, dtype=np.int64),
        images=[f"capture/images/{i:06d}.png" for i in range(n)],
        timesteps=timesteps,
        n_channels=raw.shape[2],
        n_features=None if sae is None else sae.shape[2],
        chunk_samples=chunk,
        dtype="float32",
        attrs={"settings": "planted"},
    )
    for shard, start in enumerate(range(0, n, chunk)):
        stores.write_capture_rows(
            group, start, raw[start : start + chunk], None if sae is None else sae[start : start + chunk]
        )
        if mark:
            stores.mark_shard_done(folder / "shards", shard, {})
    return path


def planted_arrays() -> tuple[np.ndarray, np.ndarray]:
    """raw: 12 samples x 11 calls x 10 channels; sae: 12 x 11 x 6 (see the asserts for what is planted)."""
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, (12, len(TIMESTEPS), 10)).astype(np.float32)
    raw[:, :, 7:] = -1.0
    raw[:, 0, 8] = 10 + PLANTED_V  # channel 8: every sample at 901, ranked by PLANTED_V
    raw[:6, 7, 8] = 5.0  # ... and half the samples at 301
    raw[:, 2, 7] = 10.0  # channel 7: only the second call at 801; all tie
    sae = np.zeros((12, len(TIMESTEPS), 6), dtype=np.float32)
    sae[:, 3:5, 2] = 1.0  # feature 2 fires at 701 and 601 in every sample
    sae[:4, 3, 4] = 0.5  # feature 4 at 701 in a third of the samples
    return raw, sae


@pytest.fixture
def planted(tmp_path: Path) -> ExperimentConfig:
    raw, sae = planted_arrays()
    config = make_config(tmp_path, top_k=2, top_examples=TOP_EXAMPLES, peak_separation=100, chunk_samples=5)
    build_capture(config.experiment_dir / "capture", raw, sae)
    return config


def read(config: ExperimentConfig, kind: str) -> dict[str, np.ndarray]:
    group = stores.open_store(analysis.analysis_store_path(config, kind))
    return {name: np.asarray(group[name][:]) for name in stores.ANALYSIS_ARRAYS}


def test_planted_windows_peaks_and_examples(planted: ExperimentConfig) -> None:
    summary = analysis.run_analysis(planted, "raw")
    ds = xr.open_zarr(analysis.analysis_store_path(planted, "raw"))
    assert ds["profile"].dims == ("channel", "t")
    assert ds["top_sample"].dims == ("channel", "timestep", "rank")
    assert ds["peak_t"].dims == ("channel", "peak")
    assert ds["timestep"].values.tolist() == TIMESTEPS.tolist()
    assert ds["t"].values.tolist() == list(range(1001))
    assert ds["channel"].values.tolist() == list(range(10))
    assert ds.attrs["top_k"] == 2 and ds.attrs["top_examples"] == TOP_EXAMPLES
    assert ds.attrs["capture_store"] == str((planted.experiment_dir / "capture" / "activations.zarr").resolve())

    t = np.arange(1001)
    # channel 8: frequency 1 at 901, 0.5 at 301, 0 at every other call
    assert ds["topk_frequency"].sel(channel=8).values.tolist() == [1, 0, 0, 0, 0, 0, 0, 0.5, 0, 0, 0]
    assert np.array_equal(ds["active"].sel(channel=8).values, ((t > 801) & (t <= 901)) | ((t > 201) & (t < 401)))
    assert ds["peak_t"].sel(channel=8).values.tolist() == [901, 301, -1]
    assert np.allclose(ds["peak_height"].sel(channel=8).values, [1.0, 0.5, np.nan], equal_nan=True)
    # channel 7: only the second call at 801 -> the two 801 calls average to 0.5
    assert ds["topk_frequency"].sel(channel=7).values[1:3].tolist() == [0, 1]
    assert float(ds["profile"].sel(channel=7, t=801)) == 0.5
    assert np.array_equal(ds["active"].sel(channel=7).values, (t > 701) & (t < 901))
    assert ds["peak_t"].sel(channel=7).values.tolist() == [801, -1, -1]

    # ranked examples: channel 8 at 901 by PLANTED_V, padded past the 12 samples
    order = np.argsort(-PLANTED_V, kind="stable")
    assert ds["top_sample"].values[8, 0].tolist() == [*order.tolist(), -1, -1]
    values = ds["top_value"].values[8, 0]
    assert values[:12].tolist() == (10 + PLANTED_V[order]).tolist() and np.isnan(values[12:]).all()
    assert ds["top_sample"].values[7, 2, :12].tolist() == list(range(12))  # all tie: lower sample first
    assert ds["max_activation"].values[8, 0] == 21.0
    assert ds["mean_activation"].values[8, 0] == pytest.approx(10 + PLANTED_V.mean())

    # channel 9 is never in the top k: inactive, no peaks, listed dead
    assert not ds["active"].values[9].any() and (ds["topk_frequency"].values[9] == 0).all()
    assert ds["peak_t"].values[9].tolist() == [-1, -1, -1] and np.isnan(ds["peak_height"].values[9]).all()
    assert summary["dead_channels"] == [9]
    assert summary["channels"] == 10 and summary["active_channels"] == 9
    assert summary["timesteps"] == TIMESTEPS.tolist()
    assert summary["parameters"]["top_k"] == 2 and summary["parameters"]["peak_separation"] == 100
    on_disk = json.loads(stores.ExperimentLayout(planted.experiment_dir).analysis_summary("raw").read_text())
    assert on_disk == summary


def test_sae_counts_only_firing_features(planted: ExperimentConfig) -> None:
    summary = analysis.run_analysis(planted, "sae")
    out = read(planted, "sae")
    expected = np.zeros((6, len(TIMESTEPS)))
    expected[2, 3:5] = 1.0
    expected[4, 3] = 4 / 12
    # zeros tie at the k-th value whenever fewer than k features fire; they must not count
    assert np.array_equal(out["topk_frequency"], expected)
    assert summary["dead_channels"] == [0, 1, 3, 5]
    assert out["peak_t"][2].tolist() == [651, -1, -1]  # the middle of the 701..601 plateau


def test_ties_at_the_kth_value_all_count(tmp_path: Path) -> None:
    raw = np.zeros((3, 2, 5), dtype=np.float32)
    raw[0, 0] = [5, 5, 5, 1, 0]  # k=2: three channels tie at the k-th value
    raw[1, 0] = [5, 4, 3, 2, 1]
    raw[2, 0] = [1, 2, 3, 4, 5]
    raw[:, 1] = [1, 2, 3, 4, 5]
    config = make_config(tmp_path, top_k=2, top_examples=3)
    build_capture(config.experiment_dir / "capture", raw, timesteps=np.array([900, 100]))
    analysis.run_analysis(config, "raw")
    freq = read(config, "raw")["topk_frequency"]
    assert np.allclose(freq[:, 0], [2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert np.allclose(freq[:, 1], [0, 0, 0, 1, 1])


# --- the tiny model's real capture against a reference --------------------------------------------


def reference(x: np.ndarray, timesteps: np.ndarray, config: ExperimentConfig, positive_only: bool) -> dict:
    """The definitions of DESIGN.md written as plainly as possible, on the whole array in memory."""
    s = config.stages.timestep_analysis
    n, calls, channels = x.shape
    k = min(s.top_k, channels)
    count = np.zeros((channels, calls))
    for i in range(n):
        for c in range(calls):
            kth = np.sort(x[i, c])[::-1][k - 1]
            member = x[i, c] >= kth
            if positive_only:
                member &= x[i, c] > 0
            count[member, c] += 1
    freq = count / n
    values = sorted(set(timesteps.tolist()))
    t = np.arange(s.total_timesteps + 1)
    profile = np.zeros((channels, len(t)))
    peak_t = np.full((channels, s.top_peak_count), -1)
    peak_height = np.full((channels, s.top_peak_count), np.nan)
    top_sample = np.full((channels, calls, s.top_examples), -1)
    top_value = np.full((channels, calls, s.top_examples), np.nan, dtype=np.float32)
    for ch in range(channels):
        per_value = [freq[ch, timesteps == v].mean() for v in values]
        profile[ch] = np.interp(t, values, per_value, left=0, right=0)
        positions, props = find_peaks(profile[ch], height=s.peak_threshold, distance=s.peak_separation, plateau_size=1)
        best = sorted(range(len(positions)), key=lambda i: (-props["peak_heights"][i], positions[i]))
        best = best[: s.top_peak_count]
        peak_t[ch, : len(best)] = positions[best]
        peak_height[ch, : len(best)] = props["peak_heights"][best]
        for c in range(calls):
            order = np.argsort(-x[:, c, ch], kind="stable")[: s.top_examples]
            top_sample[ch, c, : len(order)] = order
            top_value[ch, c, : len(order)] = x[order, c, ch]
    return {
        "topk_frequency": freq,
        "max_activation": x.max(axis=0).T,
        "mean_activation": x.astype(np.float64).mean(axis=0).T,
        "profile": profile,
        "active": profile > 0,
        "peak_t": peak_t,
        "peak_height": peak_height,
        "top_sample": top_sample,
        "top_value": top_value,
    }


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name in INT_ARRAYS:
        assert np.array_equal(got[name], want[name]), name
    for name in FLOAT_ARRAYS:
        assert got[name].shape == want[name].shape, name
        assert np.allclose(got[name], want[name], rtol=1e-6, atol=1e-7, equal_nan=True), name


@pytest.fixture(scope="module")
def tiny_capture(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """The tiny model's real capture: 4 prompts x 10 steps (11 UNet calls, one value visited twice)."""
    from ddr.provision import provision
    from tests.helpers import run_capture

    root = tmp_path_factory.mktemp("tiny")
    config = load_config(
        [
            f"data_root={root}",
            "num_inference_steps=10",
            "image_size=64",  # the layer's channels are the same; 4x less compute
            "stages.capture.batch_size=2",
            "stages.capture.dev_n_prompts=4",
            "stages.capture.samples_per_shard=2",
            "stages.timestep_analysis.top_k=5",
            "stages.timestep_analysis.top_examples=3",
            "stages.timestep_analysis.chunk_samples=3",
            "stages.timestep_analysis.channel_block=24",
        ]
    )
    provision(config)
    run_capture(config)
    return config


@pytest.mark.parametrize("kind", ["raw", "sae"])
def test_real_capture_matches_reference(tiny_capture: ExperimentConfig, kind: str) -> None:
    summary = analysis.run_analysis(tiny_capture, kind)
    group = stores.open_store(analysis.capture_store_path(tiny_capture))
    x = np.asarray(group[kind][:])
    timesteps = group["timestep"][:]
    assert len(timesteps) > len(set(timesteps.tolist())), "expected a repeated timestep value"
    want = reference(x, timesteps, tiny_capture, positive_only=kind == "sae")
    assert_same(read(tiny_capture, kind), want)
    assert summary["dead_channels"] == np.flatnonzero(~want["active"].any(axis=1)).tolist()
    assert (
        xr.open_zarr(analysis.analysis_store_path(tiny_capture, kind))["timestep"].values.tolist() == timesteps.tolist()
    )


# --- chunking, blocks, resuming --------------------------------------------------------------------


@pytest.fixture
def quantised(tmp_path: Path) -> Path:
    """Random activations rounded to 0.1: many exact ties, the hard case for order independence."""
    rng = np.random.default_rng(1)
    raw = np.round(rng.normal(0, 1, (23, len(TIMESTEPS), 13)), 1).astype(np.float32)
    sae = np.maximum(np.round(rng.normal(0, 1, (23, len(TIMESTEPS), 9)), 1), 0).astype(np.float32)
    folder = tmp_path / "shared_capture"
    build_capture(folder, raw, sae, chunk=5)
    return folder


def analyse(config: ExperimentConfig, kind: str, tasks: bool) -> dict[str, np.ndarray]:
    if tasks:  # as the flow runs it: plan, one call per block, finalize
        for block in analysis.plan_analysis(config, kind):
            analysis.analyse_block(config, kind, block.start, block.stop)
        analysis.finalize_analysis(config, kind)
    else:
        analysis.run_analysis(config, kind)
    return read(config, kind)


@pytest.mark.parametrize("kind", ["raw", "sae"])
def test_chunk_and_block_sizes_do_not_change_results(tmp_path: Path, quantised: Path, kind: str) -> None:
    settings = {"top_k": 3, "top_examples": 5, "peak_separation": 50}
    base = analyse(
        make_config(tmp_path, "base", quantised, chunk_samples=1000, channel_block=1000, **settings), kind, False
    )
    x = np.asarray(stores.open_store(quantised / "activations.zarr")[kind][:])
    config = make_config(tmp_path, "ref", quantised, **settings)
    assert_same(base, reference(x, TIMESTEPS, config, positive_only=kind == "sae"))
    for i, (chunk, block, tasks) in enumerate(
        [(1, 1, True), (3, 4, True), (3, 4, False), (1000, 5, True), (7, 2, False)]
    ):
        got = analyse(
            make_config(tmp_path, f"run{i}", quantised, chunk_samples=chunk, channel_block=block, **settings),
            kind,
            tasks,
        )
        for name in (*INT_ARRAYS, "topk_frequency", "max_activation", "top_value", "profile", "peak_height"):
            assert np.array_equal(got[name], base[name], equal_nan=got[name].dtype.kind == "f"), (name, chunk, block)
        assert np.allclose(got["mean_activation"], base["mean_activation"], rtol=1e-6), (chunk, block)


def test_blocks_resume_and_finalize_names_missing(tmp_path: Path, quantised: Path) -> None:
    config = make_config(tmp_path, "resume", quantised, channel_block=4, top_k=3)
    blocks = analysis.plan_analysis(config, "raw")
    assert [(b.start, b.stop) for b in blocks] == [(0, 4), (4, 8), (8, 12), (12, 13)]
    assert analysis.analyse_block(config, "raw", 4, 8)["skipped"] is False
    with pytest.raises(RuntimeError, match=r"3 of 4 channel blocks not done"):
        analysis.finalize_analysis(config, "raw")
    assert [b.index for b in analysis.plan_analysis(config, "raw")] == [0, 2, 3]
    assert analysis.analyse_block(config, "raw", 4, 8)["skipped"] is True
    with pytest.raises(ValueError, match=r"not a block"):
        analysis.analyse_block(config, "raw", 2, 6)
    for block in analysis.plan_analysis(config, "raw"):
        analysis.analyse_block(config, "raw", block.start, block.stop)
    analysis.finalize_analysis(config, "raw")
    assert analysis.plan_analysis(config, "raw") == []
    # another parameter: the old store no longer matches and is recomputed from scratch
    changed = make_config(tmp_path, "resume", quantised, channel_block=4, top_k=4)
    with pytest.raises(analysis.AnalysisStoreMismatch):
        analysis.analyse_block(changed, "raw", 0, 4)
    assert len(analysis.plan_analysis(changed, "raw")) == 4
    assert not stores.ExperimentLayout(changed.experiment_dir).analysis_summary("raw").exists()


def test_refuses_incomplete_capture(tmp_path: Path) -> None:
    raw, _ = planted_arrays()
    config = make_config(tmp_path)
    folder = config.experiment_dir / "capture"
    build_capture(folder, raw, chunk=4)
    stores.marker_path(folder / "shards", 1).unlink()
    with pytest.raises(analysis.CaptureIncomplete, match=r"1 of 3 shards not done \(shards 1;"):
        analysis.run_analysis(config, "raw")
    # a store without markers: never-written rows are NaN and refused while streaming
    other = make_config(tmp_path, "other")
    stores.create_capture_store(
        other.experiment_dir / "capture" / "activations.zarr",
        prompts=["a"] * 6,
        seeds=np.arange(6),
        images=[""] * 6,
        timesteps=TIMESTEPS,
        n_channels=3,
        n_features=None,
        chunk_samples=2,
        dtype="float32",
        attrs={},
    )
    group = stores.open_store(other.experiment_dir / "capture" / "activations.zarr", mode="r+")
    stores.write_capture_rows(group, 0, np.ones((2, len(TIMESTEPS), 3), np.float32), None)
    with pytest.raises(analysis.CaptureIncomplete, match=r"capture shards \[1, 2\]"):
        analysis.run_analysis(other, "raw")


def test_clear_errors(planted: ExperimentConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"kind: unknown value 'pixels'; allowed: raw, sae"):
        analysis.plan_analysis(planted, "pixels")  # type: ignore[arg-type]
    short = make_config(tmp_path, "exp", total_timesteps=500)
    with pytest.raises(ValueError, match=r"total_timesteps: 500 does not cover"):
        analysis.plan_analysis(short, "raw")
    with pytest.raises(FileNotFoundError, match=r"run the capture stage first"):
        analysis.plan_analysis(make_config(tmp_path, "nothing"), "raw")
    raw_only = make_config(tmp_path, "rawonly")
    build_capture(raw_only.experiment_dir / "capture", planted_arrays()[0])
    with pytest.raises(ValueError, match=r"kind: 'sae' is not in capture store .*allowed: \['raw'\]"):
        analysis.plan_analysis(raw_only, "sae")


# --- bounded memory -------------------------------------------------------------------------------

MEMORY_CHILD = textwrap.dedent(
    """
    import contextlib, json, resource, sys
    from pathlib import Path
    from ddr.config import load_config
    from ddr.stages import analysis

    def status(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    config = load_config(sys.argv[1:])
    # ru_maxrss survives exec (a child of pytest reports pytest's peak); VmHWM is this process's own
    # and writing 5 to clear_refs resets it, so measure the peak from here on
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    base = status("VmRSS")
    analysis.run_analysis(config, "raw")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"increase": status("VmHWM") - base, "ru_maxrss_kb": maxrss}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM from /proc (Linux)")
def test_streaming_memory_is_bounded_by_the_chunk(tmp_path: Path) -> None:
    calls, channels, n = 51, 256, 6000  # 6000 x 51 x 256 float32 = 313 MB; outputs stay small
    folder = tmp_path / "big" / "capture"
    folder.mkdir(parents=True)
    group = stores.create_capture_store(
        folder / "activations.zarr",
        prompts=[""] * n,
        seeds=np.arange(n),
        images=[""] * n,
        timesteps=np.linspace(981, 1, calls).astype(int),
        n_channels=channels,
        n_features=None,
        chunk_samples=16,
        dtype="float32",
        attrs={},
    )
    rng = np.random.default_rng(0)
    for a in range(0, n, 320):
        stores.write_capture_rows(group, a, rng.standard_normal((min(320, n - a), calls, channels), np.float32), None)
    for shard in range(math.ceil(n / 16)):
        stores.mark_shard_done(folder / "shards", shard, {})
    size = n * calls * channels * 4
    args = [f"data_root={tmp_path}", "use_sae=false", f"stages.timestep_analysis.capture_results_dir={folder}"]
    args.append("stages.timestep_analysis.chunk_samples=64")  # 3.3 MB per chunk
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, *args], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    increase = json.loads(done.stdout.strip().splitlines()[-1])["increase"]
    assert increase < 0.2 * size, f"peak RSS grew by {increase / 1e6:.0f} MB analysing a {size / 1e6:.0f} MB store"
    assert stores.open_store(tmp_path / "experiments" / "default" / "analysis" / "raw.zarr")["top_sample"][0, 0, 0] >= 0
