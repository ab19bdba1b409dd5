"""Concept search throughput: one concept's streamed scoring beside the timestep analysis, at two store sizes.

Builds synthetic capture stores like benchmarks/analysis_throughput.py (51 UNet calls x 1280
channels of float32 per sample, as SD's up_blocks.1.attentions.1), with every tenth prompt naming
the concept ("red"), then runs each method in its own subprocess and prints wall time, MB/s
streamed and the peak RSS of that process, plus its increase over the baseline after imports.

    python benchmarks/concept_search_throughput.py                 # 0.25 GB and 1 GB stores
    python benchmarks/concept_search_throughput.py --gb 0.1 --small-gb 0.05

Methods:
  concept      `run_concept`: one concept (raw), streamed in `chunk_samples` chunks, store + JSON written
  analysis     `analysis.run_analysis` (raw), the timestep analysis's single streamed pass, for comparison
  in-memory    (small store only) the whole array in RAM and the effect size by whole-array NumPy; its
               scores are checked against the streamed store's
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from analysis_throughput import build_store, peak_rss, reset_peak_rss  # noqa: E402

CONCEPT = "red"


def _config(folder: Path, name: str, args: argparse.Namespace) -> Any:
    from ddr.config import load_config

    capture = folder / "capture"
    return load_config(
        [
            f"data_root={folder}",
            f"experiment_name={name}",
            "use_sae=false",
            f"stages.concept_search.capture_results_dir={capture}",
            f"stages.concept_search.chunk_samples={args.chunk_samples}",
            f"stages.timestep_analysis.capture_results_dir={capture}",
            f"stages.timestep_analysis.chunk_samples={args.chunk_samples}",
            "stages.timestep_analysis.channel_block=100000",
        ]
    )


def name_the_concept(folder: Path) -> int:
    """Every tenth sample's prompt names the concept; returns how many do."""
    from ddr import stores

    group = stores.open_store(folder / "capture" / "activations.zarr", mode="r+")
    n = group["prompt"].shape[0]
    group["prompt"][:] = np.array([f"prompt {i} {CONCEPT if i % 10 == 0 else 'blue'}" for i in range(n)])
    return len(range(0, n, 10))


def in_memory(config: Any) -> np.ndarray:
    """The straightforward version: the whole array, then the effect size in float64."""
    from ddr import stores
    from ddr.stages import concept_search

    group = stores.open_store(concept_search.capture_store_path(config))
    x = np.asarray(group["raw"][:], dtype=np.float64)
    mask = concept_search.concept_mask([str(p) for p in group["prompt"][:]], CONCEPT)
    inside, outside = x[mask], x[~mask]
    pooled = np.sqrt((inside.var(0) * len(inside) + outside.var(0) * len(outside)) / len(x))
    return ((inside.mean(0) - outside.mean(0)) / (pooled + concept_search.EPS)).T


def worker(args: argparse.Namespace) -> None:
    """One measured run in this (fresh) process; prints a JSON line."""
    from ddr import stores
    from ddr.stages import analysis, concept_search

    folder = Path(args.store)
    config = _config(folder, args.worker, args)
    shutil.rmtree(config.experiment_dir, ignore_errors=True)
    base = reset_peak_rss()
    started = time.perf_counter()
    if args.worker == "concept":
        concept_search.run_concept(config, "raw", concept_search.Concept(CONCEPT))
    elif args.worker == "analysis":
        analysis.run_analysis(config, "raw")
    else:
        score = in_memory(config)
    wall = time.perf_counter() - started
    peak = peak_rss()
    if args.worker == "in-memory":
        layout = stores.ExperimentLayout(_config(folder, "concept", args).experiment_dir)
        streamed = stores.open_store(layout.concept_store("raw", CONCEPT))["score"][:]
        if not np.allclose(streamed, score, rtol=1e-4, atol=1e-5):
            raise SystemExit("in-memory and streamed concept scores differ")
    print(json.dumps({"wall_s": wall, "rss_base_mb": base, "rss_peak_mb": peak}))


def run_worker(method: str, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, __file__, "--worker", method, "--store", str(folder)]
    command += ["--chunk-samples", str(args.chunk_samples)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="size of the large store (GB of float32)")
    parser.add_argument("--small-gb", type=float, default=0.25, help="size of the small store (also in-memory)")
    parser.add_argument("--calls", type=int, default=51)
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--capture-chunk", type=int, default=16, help="the capture store's sample chunk")
    parser.add_argument("--chunk-samples", type=int, default=256)
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores (default: a temp dir)")
    parser.add_argument("--worker", choices=["concept", "analysis", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    root = Path(tempfile.mkdtemp(prefix="ddr-bench-concepts-", dir=args.dir))
    rows = []
    try:
        for label, gb in (("small", args.small_gb), ("large", args.gb)):
            folder = root / label
            n = build_store(folder, gb, args.calls, args.channels, args.capture_chunk)
            n_concept = name_the_concept(folder)
            mb = n * args.calls * args.channels * 4 / 1e6
            print(f"built {label} store: {n} samples ({n_concept} of the concept), {mb:.0f} MB", flush=True)
            methods = ["concept", "analysis"] + (["in-memory"] if label == "small" else [])
            for method in methods:
                r = run_worker(method, folder, args)
                rows.append({"store": label, "MB": mb, "method": method, **r})
                print(f"  {method}: {r['wall_s']:.1f}s", flush=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nchunk_samples={args.chunk_samples}, {args.calls} calls x {args.channels} channels float32")
    header = f"{'store':6} {'MB':>7} {'method':10} {'wall s':>7} {'MB/s':>7} {'peak RSS MB':>12} {'RSS incr MB':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        increase = r["rss_peak_mb"] - r["rss_base_mb"]
        print(
            f"{r['store']:6} {r['MB']:7.0f} {r['method']:10} {r['wall_s']:7.1f} {r['MB'] / r['wall_s']:7.0f} "
            f"{r['rss_peak_mb']:12.0f} {increase:12.0f}"
        )
    print("\nin-memory and streamed concept scores are equal (checked on the small store)")


if __name__ == "__main__":
    main()
