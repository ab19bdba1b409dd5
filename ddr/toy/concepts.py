"""Do a channel's priors and deep dreams show the concept its top dataset examples share? (toy-shapes)

On toy-shapes every capture sample's prompt names three concept attributes: the shape colour
(`colour`), the `shape` and the background colour (`background`) ("a red circle on a blue
background"). After capture and analysis:

- `concept_pure_channels`: for each active channel, the prompts of its top dataset examples
  (`top_sample[channel, call, :rank]`) at the UNet call(s) nearest its highest peak(s)
  (`peak_t`; a channel without a peak uses the call where it is most often in the top k) give,
  per attribute, the most common value and its share. The channel is *pure* for an attribute
  when that share is >= `purity`.
- `classify_images`: the attributes read back from generated images. Only the two colours can
  be read back (`shapes.read_colours`: the commonest palette colour on the border is the
  background, the commonest other palette colour inside is the shape's); pixels far from every
  palette colour are not counted, so an image may read "" (nothing recognised). The shape is
  not read back: shape-pure channels (the majority on this layer) are counted, not checked.
- `agreement`: for each channel pure for a colour attribute, the fraction of its prior (or
  deep-dream) images whose read-back value of that attribute equals the channel's concept,
  averaged over channels. Chance is 1 / number of colours. A stricter, empirical baseline is
  also reported: how often the *other* checked channels' images of the same source show this
  channel's concept (so a colour the generator paints anyway does not count as agreement).
- `concept_check`: both sources, every colour attribute, logged to MLflow.

Priors are generated from the empty prompt while steering the channel, so how strongly they
show a concept depends on `stages.prior.steer_strength_scale` (see benchmarks/toy_concepts.py
for the scale used on toy-shapes). Deep dreams are optimised latents decoded with a per-image
min-max normalisation, so their colours are shifted and they agree less; the figures are
reported as measured.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ddr import stores
from ddr.config import ExperimentConfig
from ddr.stores import Kind
from ddr.toy import shapes

ATTRIBUTES = ("colour", "shape", "background")  # shape colour, shape, background colour
COLOUR_ATTRIBUTES = ("colour", "background")  # the ones `classify_images` can read back
CHANCE = 1.0 / len(shapes.COLOURS)
Source = Literal["prior", "dream"]
_PRIOR_NAME = re.compile(r"channel_(\d+)_result_(\d+)\.png$")
_DREAM_NAME = re.compile(r"channel_(\d+)_t_(\d+)_result_(\d+)\.png$")


def parse_concepts(text: str) -> dict[str, str]:
    """A toy-shapes caption's concept attributes: {"colour", "shape", "background"} (ValueError otherwise)."""
    a = shapes.parse_caption(text.strip())
    return {"colour": a.colour, "shape": a.shape, "background": a.background}


@dataclass
class ChannelConcept:
    """What a channel's top dataset examples share."""

    channel: int
    n_examples: int
    values: dict[str, str]  # attribute -> most common value among the examples' captions
    shares: dict[str, float]  # attribute -> that value's share of the examples
    purity: float
    calls: list[int] = field(default_factory=list)  # the UNet calls the examples come from

    @property
    def pure(self) -> dict[str, str]:
        """The attributes the channel is pure for (share >= purity), with their values."""
        return {a: self.values[a] for a in ATTRIBUTES if self.n_examples and self.shares[a] >= self.purity}


def concept_of(channel: int, prompts: Sequence[str], purity: float, calls: Sequence[int] = ()) -> ChannelConcept:
    """The commonest value (and its share) of each attribute over `prompts`; ties: the first value seen."""
    parsed = [parse_concepts(p) for p in prompts]
    values, shares = {}, {}
    for attribute in ATTRIBUTES:
        counts = Counter(p[attribute] for p in parsed)
        if counts:
            value, n = counts.most_common(1)[0]
            values[attribute], shares[attribute] = value, n / len(parsed)
        else:
            values[attribute], shares[attribute] = "", 0.0
    return ChannelConcept(int(channel), len(parsed), values, shares, purity, [int(c) for c in calls])


def peak_calls(peak_t: np.ndarray, timesteps: np.ndarray, topk_frequency: np.ndarray, peaks: int = 1) -> list[int]:
    """The UNet calls nearest the channel's `peaks` highest peaks (every call at the minimal distance, so a
    repeated timestep value counts on both calls); without a peak, the calls of its highest top-k frequency."""
    timesteps = np.asarray(timesteps, dtype=np.int64)
    calls: set[int] = set()
    for p in [int(p) for p in peak_t if p >= 0][:peaks]:
        distance = np.abs(timesteps - p)
        calls |= set(np.flatnonzero(distance == distance.min()).tolist())
    if not calls:
        freq = np.nan_to_num(np.asarray(topk_frequency, dtype=np.float64), nan=-1.0)
        calls = set(np.flatnonzero(freq == freq.max()).tolist())
    return sorted(calls)


def top_examples(top_sample: np.ndarray, calls: Sequence[int], rank: int) -> list[int]:
    """The distinct samples among the first `rank` ranks of `top_sample[call, rank]` at `calls`, in rank order."""
    ranked = np.asarray(top_sample)[list(calls), :rank].T.ravel()  # rank-major: best of every call first
    return list(dict.fromkeys(int(s) for s in ranked if s >= 0))


def channel_concepts(
    analysis: Any, prompts: Sequence[str], purity: float = 0.6, rank: int | None = None, peaks: int = 1
) -> dict[int, ChannelConcept]:
    """Every active channel's concept, from an analysis Dataset (or mapping of arrays) and the capture prompts."""
    channels = np.asarray(analysis["channel"]).astype(np.int64)
    top_sample = np.asarray(analysis["top_sample"])
    rank = top_sample.shape[-1] if rank is None else rank
    active = np.asarray(analysis["active"]).astype(bool).any(axis=1)
    peak_t = np.asarray(analysis["peak_t"])
    freq = np.asarray(analysis["topk_frequency"])
    timesteps = np.asarray(analysis["timestep"])
    out = {}
    for row, channel in enumerate(channels.tolist()):
        if not active[row]:
            continue
        calls = peak_calls(peak_t[row], timesteps, freq[row], peaks)
        samples = top_examples(top_sample[row], calls, rank)
        out[channel] = concept_of(channel, [str(prompts[s]) for s in samples], purity, calls)
    return out


def concept_pure_channels(
    config: ExperimentConfig, kind: Kind, purity: float = 0.6, rank: int | None = None, peaks: int = 1
) -> dict[int, ChannelConcept]:
    """The active channels of this experiment's analysis that are pure for at least one attribute.

    `rank`: top examples per call (default: all the analysis kept); `peaks`: how many of the
    channel's highest peaks pool their examples.
    """
    import xarray as xr

    from ddr.stages.analysis import analysis_store_path, capture_store_path

    with xr.open_zarr(capture_store_path(config), chunks=None) as capture:
        prompts = [str(p) for p in capture["prompt"].values]
    with xr.open_zarr(analysis_store_path(config, kind), chunks=None) as ds:
        concepts = channel_concepts(ds, prompts, purity, rank, peaks)
    return {c: concept for c, concept in concepts.items() if concept.pure}


def classify_images(paths: Iterable[Path | str]) -> list[dict[str, str]]:
    """The colour attributes read back from each image: {"colour", "background"} ("" where none is recognised).

    The shape is not read back (see the module docstring).
    """
    out = []
    for path in paths:
        with Image.open(path) as image:
            colour, background = shapes.read_colours(np.asarray(image.convert("RGB")))
        out.append({"colour": colour, "background": background})
    return out


def channel_images(config: ExperimentConfig, kind: Kind, source: Source, run: str = "default") -> dict[int, list[Path]]:
    """channel -> its prior images, or its deep-dream final images of `run` (snapshots excluded)."""
    layout = stores.ExperimentLayout(config.experiment_dir)
    if source == "prior":
        folder, pattern = stores.prior_images_dir(layout, kind), _PRIOR_NAME
    elif source == "dream":
        folder, pattern = stores.dream_images_dir(layout, run, kind), _DREAM_NAME
    else:
        raise ValueError(f"source: unknown value {source!r}; allowed: prior, dream")
    out: dict[int, list[Path]] = {}
    for path in sorted(folder.glob("channel_*.png")) if folder.is_dir() else []:
        match = pattern.search(path.name)
        if match:
            out.setdefault(int(match.group(1)), []).append(path)
    return out


def agreement_from_reads(
    concepts: Mapping[int, ChannelConcept], reads: Mapping[int, Sequence[Mapping[str, str]]]
) -> dict[str, dict[str, Any]]:
    """Per colour attribute: the mean over pure channels with images of the fraction of their images whose
    read-back value is the channel's concept (`rate`), the same for the other checked channels' images
    (`baseline`), the channel count and per-channel rates."""
    out: dict[str, dict[str, Any]] = {}
    for attribute in COLOUR_ATTRIBUTES:
        checked = [c for c, k in concepts.items() if attribute in k.pure and reads.get(c)]
        per_channel, baseline = {}, {}
        for c in checked:
            want = concepts[c].values[attribute]
            per_channel[c] = float(np.mean([r[attribute] == want for r in reads[c]]))
            others = [r[attribute] == want for o in checked if o != c for r in reads[o]]
            baseline[c] = float(np.mean(others)) if others else float("nan")
        rates, bases = list(per_channel.values()), [b for b in baseline.values() if np.isfinite(b)]
        out[attribute] = {
            "rate": float(np.mean(rates)) if rates else float("nan"),
            "baseline": float(np.mean(bases)) if bases else float("nan"),
            "n_channels": len(checked),
            "n_images": sum(len(reads[c]) for c in checked),
            "per_channel": per_channel,
        }
    return out


def agreement(
    config: ExperimentConfig,
    kind: Kind,
    channels: Mapping[int, ChannelConcept],
    source: Source = "prior",
    run: str = "default",
) -> dict[str, dict[str, Any]]:
    """Agreement of the channels' prior (or deep-dream `run`) images with their colour concepts; see
    `agreement_from_reads`. Channels without images are left out (their count is `n_channels`)."""
    images = channel_images(config, kind, source, run)
    reads = {c: classify_images(images[c]) for c in channels if c in images}
    return agreement_from_reads(channels, reads)


def concept_check(
    config: ExperimentConfig,
    kind: Kind,
    mlflow: bool = True,
    purity: float = 0.6,
    rank: int | None = None,
    peaks: int = 1,
    run: str | None = None,
) -> dict[str, Any]:
    """Agreement rates of priors and deep dreams (those present) with the concepts of the pure channels.

    Returns {"kind", "chance", "n_pure": {attribute: channels}, "prior"/"dream": `agreement` (when that
    source has images), "metrics": the flat figures}. With `mlflow`, logs `metrics` in a
    `concept_check` run (`ddr.tracking.stage_run`) and returns its id as "mlflow_run_id".
    """
    run = run or config.stages.deep_dream.for_kind(kind).run_name
    concepts = concept_pure_channels(config, kind, purity, rank, peaks)
    result: dict[str, Any] = {
        "kind": kind,
        "chance": CHANCE,
        "purity": purity,
        "n_pure": {a: sum(a in k.pure for k in concepts.values()) for a in ATTRIBUTES},
        "concepts": concepts,
    }
    metrics: dict[str, float] = {"chance": CHANCE}
    metrics |= {f"n_pure_{a}": float(n) for a, n in result["n_pure"].items()}
    for source in ("prior", "dream"):
        if not channel_images(config, kind, source, run):  # type: ignore[arg-type]
            continue
        found = agreement(config, kind, concepts, source, run)  # type: ignore[arg-type]
        result[source] = found
        for attribute, figures in found.items():
            metrics[f"{source}_n_channels_{attribute}"] = float(figures["n_channels"])
            if figures["n_channels"]:
                metrics[f"{source}_agreement_{attribute}"] = figures["rate"]
                if np.isfinite(figures["baseline"]):
                    metrics[f"{source}_baseline_{attribute}"] = figures["baseline"]
    result["metrics"] = metrics
    if mlflow:
        import mlflow as mlflow_lib

        from ddr.tracking import stage_run

        params = {"concept.kind": kind, "concept.purity": purity, "concept.rank": rank, "concept.peaks": peaks}
        with stage_run(config, "concept_check", tags={"ddr.kind": kind}, params=params) as active:
            mlflow_lib.log_metrics(metrics)
            result["mlflow_run_id"] = active.info.run_id
    return result


def format_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per (kind, colour attribute): pure channels, prior and dream agreement, baselines, chance."""
    columns = ("prior", "(base)", "dream", "(base)", "chance")
    lines = [f"{'kind':<5} {'attribute':<11} {'n pure':>6} " + " ".join(f"{c:>7}" for c in columns)]

    def fmt(x: Any) -> str:
        return f"{x:7.3f}" if isinstance(x, float) and np.isfinite(x) else f"{'-':>7}"

    for r in results:
        for attribute in ATTRIBUTES:
            prior = r.get("prior", {}).get(attribute, {})
            dream = r.get("dream", {}).get(attribute, {})
            lines.append(
                f"{r['kind']:<5} {attribute:<11} {r['n_pure'][attribute]:>6} {fmt(prior.get('rate'))} "
                f"{fmt(prior.get('baseline'))} {fmt(dream.get('rate'))} {fmt(dream.get('baseline'))} "
                f"{fmt(r['chance'])}"
            )
    return "\n".join(lines)


# Settings of the end-to-end check on toy-shapes (benchmarks/toy_concepts.py, tests/test_toy_concepts.py).
TOY_OVERRIDES = [
    "model=toy-shapes",
    "sae=toy-shapes-topk",
    "stages.capture.prompt_dataset=toy-shapes",
    "guidance_scale=2",
    "num_inference_steps=20",
    "stages.capture.num_images_per_prompt=2",
    "stages.capture.samples_per_shard=60",
    "stages.capture.batch_size=30",
    # Steering strengths measured on toy-shapes (benchmarks/toy_concepts.py --scales): raw channels agree best
    # at ~1000 x max_activation (50, the default, hardly changes the empty-prompt image), SAE features at the
    # default 500; from 5 to 50 the images stay the unsteered ones, whose colours read back as "" or at chance.
    "stages.prior.steer_strength_scale=1000",
    "stages.prior.sae.steer_strength_scale=500",
    "stages.prior.channels_per_batch=16",
]


def run_concept_pipeline(
    overrides: Sequence[str],
    kinds: Sequence[Kind] = ("raw", "sae"),
    purity: float = 0.6,
    rank: int | None = None,
    dream_steps: int | None = 10,
    dream_results: int = 2,
    mlflow: bool = True,
) -> list[dict[str, Any]]:
    """Capture and analysis (skipped when done), priors of the colour-pure channels of each kind, deep dreams
    of them (`dream_steps` optimisation steps, `dream_results` per channel, one timestep; None: no dreams),
    then `concept_check` per kind. `overrides` are config overrides (e.g. TOY_OVERRIDES + data_root=...)."""
    from ddr.config import load_config
    from ddr.provision import provision
    from ddr.stages import analysis, capture, deep_dream, prior

    config = load_config(list(overrides))
    provision(config)
    plan = capture.plan_capture(config)
    capture.prepare_store(config, plan)
    for shard in capture.pending_shards(config, plan):
        capture.capture_shard(config, shard)
    results = []
    for kind in kinds:
        analysis.run_analysis(config, kind)
        pure = concept_pure_channels(config, kind, purity, rank)
        channels = sorted(c for c, k in pure.items() if set(k.pure) & set(COLOUR_ATTRIBUTES))
        if channels:
            listed = f"[{','.join(str(c) for c in channels)}]"
            stage_config = load_config([*overrides, f"stages.prior.channels={listed}"])
            prior.run_prior(stage_config, kind)
            if dream_steps:
                dream = [
                    f"stages.deep_dream.channels={listed}",
                    f"stages.deep_dream.num_steps={dream_steps}",
                    f"stages.deep_dream.n_results={dream_results}",
                    f"stages.deep_dream.intermediate_opt_results_every_n_steps={dream_steps}",
                    "stages.deep_dream.use_just_one_timestep=true",
                ]
                stage_config = load_config([*overrides, *dream])
                deep_dream.run_dream(stage_config, kind)
        results.append(concept_check(config, kind, mlflow=mlflow, purity=purity, rank=rank))
    return results
