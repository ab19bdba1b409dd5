"""Priors: what the model paints when one channel (or SAE feature) is steered during generation.

For each selected channel a steering schedule says which UNet calls of the sampling loop are
steered and by how much (`build_schedule`):

- `timesteps=active_timesteps`: the calls whose timestep value t has `active[channel, t]`;
  `all_timesteps`: every call; `activity_peaks`: for each of the channel's peaks, the calls
  whose timestep value is nearest to it (every call at the minimal distance, so a repeated
  value such as PNDM's second visit is steered on both calls).
- the window `steer_end_t <= t <= steer_start_t` (either end None: open) must hold as well;
  denoising runs from high t to low t, so the window starts at the larger t. A channel with no
  steered call left is skipped and logged.
- strength at a steered call = `max_activation[channel, call] * steer_strength_scale`, 0
  elsewhere (and 0 everywhere for `ablate`, which has no strength). Strengths are per UNet call.
  When the prior runs at the step count the analysis was captured at, call i takes the
  analysis's call i. At another step count the calls differ; then each call takes
  `max_activation` averaged over the analysis calls that share a timestep value and linearly
  interpolated by timestep value (np.interp, clamped at the ends), and the store's
  `strength_mapping` attribute says so. `active` is looked up by value in either case.

At a steered call, `steer_mode` says what happens to the target layer's output at every spatial
position, with d the channel's direction (a one-hot vector for a raw channel, the feature's decoder
row `sae.decoder_directions[feature]` for an SAE feature) and s the call's strength (`STEER_RULES`):
`add` x + s d (the original); `replace` the channel's map becomes s everywhere (an SAE feature's
code becomes s at every token); `cfg_aware` +s d on the conditional and -s d on the unconditional
half of the CFG batch (needs guidance_scale > 1); `ablate` removes the feature: x - a_f W_dec[f]
with a_f the feature's code of x, so the SAE error term is kept (a raw channel is set to 0).
`ablate` also generates each result unsteered (the baseline, same prompt and seed) and stores
`baseline_latent` and `effect`, the mean absolute difference of the two decoded images (pixels in
0..1).

Generation uses `prompt` (the original: the empty prompt) at `guidance_scale` (the original: 1.0)
and the experiment's step count and image size; each sample draws its initial latent from its own
seeded CPU generator (`seeds`). With `prompt_source=top_examples`, result k instead regenerates the
channel's k-th top dataset example: the capture sample `top_sample[channel, peak call, k]` of the
analysis (peak call: the captured call nearest the channel's highest peak, the first of equals; a
channel without a peak takes the call of its highest top-k frequency), with that sample's capture
prompt and seed. With the capture's guidance scale, step count and image size the baseline is the
capture image of that sample (up to the float rounding of another batch). One pipeline call holds
several channels x results, each sample steering its own channel, and a sample's result does not
depend on its batch-mates (up to float rounding of batched matmuls).

Stage API: `plan_prior` (channel shards; inactive channels are skipped and logged),
`prepare_prior_store` (lays out `prior/<kind>/priors.zarr`, rows for every scheduled channel,
`strength`/`steered` (and the `example_*` arrays) written up front), `prior_shard` (generates a
shard's missing channels, writes their latents and PNGs, marks each channel done, returns a contact
sheet path), `run_prior` (all of it in-process), `mean_effect` (the ablation's mean effect).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from PIL import Image, ImageDraw

from ddr import stores
from ddr.config import ConfigError, ExperimentConfig, PriorConfig
from ddr.hooks import ChannelCodes, FeatureCodes, SaeFeatureCodes, SteeringHook, SteerMode, TimestepTracker, hooked
from ddr.models.pipeline import decode_latents, latent_shape, load_experiment_sae, load_pipeline, num_train_timesteps
from ddr.models.sae import SparseAutoencoder
from ddr.progress import log_progress
from ddr.stages.analysis import capture_store_path
from ddr.stages.capture import generate, layer_width, sae_width, scheduler_timesteps
from ddr.stores import Kind

log = logging.getLogger(__name__)
DECODE_BATCH = 8
STRENGTH_MAPPINGS = {
    "per_call": "the analysis was captured at these UNet calls: call i takes max_activation[:, i]",
    "interpolated": (
        "the analysis was captured at another step count: max_activation averaged over calls sharing a "
        "timestep value, linearly interpolated by timestep value onto these calls (clamped at the ends)"
    ),
}
STEER_RULES: dict[str, str] = {
    "add": "x + s*d at every position (d: one-hot channel or SAE decoder row; s: strength), both CFG halves",
    "replace": "x - a*d + s*d: a raw channel's map becomes s everywhere; an SAE feature's code a becomes s at "
    "every token (the rest of x, SAE error included, unchanged)",
    "cfg_aware": "conditional CFG half x + s*d, unconditional half x - s*d",
    "ablate": "x - a*d: a raw channel set to 0; an SAE feature removed with the SAE error kept "
    "(= decode(codes with a = 0) + x - decode(codes)); strength does not apply (stored as 0)",
}
EFFECT_RULE = "mean absolute difference of the decoded ablated and baseline images, pixels in 0..1"
KIND_PARAMS = (
    "steer_strength_scale",
    "steer_mode",
    "steer_start_t",
    "steer_end_t",
    "prompt",
    "guidance_scale",
    "prompt_source",
)
"""Settings logged per kind as MLflow params (`<kind>.<name>`): the `sae` block may set them apart."""
LEGACY_PARAMS = {"steer_mode": "add", "steer_start_t": None, "steer_end_t": None, "prompt_source": "prompt"}
"""What a store made before the steering modes was made with (its params lack these keys)."""


class PriorStoreMismatch(RuntimeError):
    """An existing prior store was made with other settings; nothing is overwritten unless asked."""


@dataclass
class PriorSchedule:
    """Which UNet calls each scheduled channel steers, and by how much."""

    kind: Kind
    channels: np.ndarray  # [n] int64: selected channels that are steered somewhere, ascending
    timesteps: np.ndarray  # [calls] int64: the prior's UNet calls (scheduler at num_inference_steps)
    strength: np.ndarray  # [n, calls] float32, 0 where not steered
    steered: np.ndarray  # [n, calls] bool
    skipped: dict[int, str] = field(default_factory=dict)  # selected channel -> why it is not generated
    n_channels: int = 0  # channels in the analysis store
    strength_mapping: str = "per_call"
    analysis_store: Path = Path()
    analysis_calls: int = 0
    examples: dict[str, np.ndarray] | None = None  # prompt_source=top_examples: stores.PRIOR_EXAMPLE_ARRAYS rows


# --- schedule ----------------------------------------------------------------------------------


def prior_settings(config: ExperimentConfig, kind: Kind) -> PriorConfig:
    """The prior settings for this kind (the `sae` block applied for SAE features)."""
    config.require_kind(kind)
    return config.stages.prior.for_kind(kind)  # type: ignore[return-value]


def analysis_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    """`timestep_analysis_results_dir` (relative to the experiment folder, or absolute) or this experiment's."""
    folder = prior_settings(config, kind).timestep_analysis_results_dir
    return stores.ExperimentLayout(config.experiment_dir).analysis_store_from(kind, folder)


def open_analysis(config: ExperimentConfig, kind: Kind) -> xr.Dataset:
    folder = prior_settings(config, kind).timestep_analysis_results_dir
    path = stores.require_analysis_store(analysis_store_path(config, kind), "prior", folder)
    return xr.open_zarr(path, chunks=None)


def call_strengths(
    max_activation: np.ndarray, analysis_timesteps: np.ndarray, timesteps: np.ndarray
) -> tuple[np.ndarray, str]:
    """max_activation [n, analysis calls] -> [n, calls] of the prior's calls, and the mapping used."""
    analysis_timesteps = np.asarray(analysis_timesteps, dtype=np.int64)
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if np.array_equal(analysis_timesteps, timesteps):
        return max_activation.astype(np.float64), "per_call"
    values, inverse = np.unique(analysis_timesteps, return_inverse=True)  # ascending
    mean = np.zeros((len(analysis_timesteps), len(values)))
    mean[np.arange(len(analysis_timesteps)), inverse] = 1.0
    mean /= mean.sum(axis=0, keepdims=True)
    interp = np.zeros((len(values), len(timesteps)))
    for j, v in enumerate(timesteps):
        if v <= values[0]:
            interp[0, j] = 1.0
        elif v >= values[-1]:
            interp[-1, j] = 1.0
        else:
            i = int(np.searchsorted(values, v, side="right")) - 1
            frac = (v - values[i]) / (values[i + 1] - values[i])
            interp[i, j], interp[i + 1, j] = 1.0 - frac, frac
    return max_activation.astype(np.float64) @ mean @ interp, "interpolated"


def steered_calls(
    mode: str, active: np.ndarray, t_values: np.ndarray, peak_t: np.ndarray | None, timesteps: np.ndarray
) -> np.ndarray:
    """[n, calls] bool: which of the prior's UNet calls each channel steers (see the module docstring)."""
    n, calls = active.shape[0], len(timesteps)
    if mode == "all_timesteps":
        return np.ones((n, calls), dtype=bool)
    if mode == "active_timesteps":
        pos = np.searchsorted(t_values, timesteps)
        on_grid = (pos < len(t_values)) & (t_values[np.minimum(pos, len(t_values) - 1)] == timesteps)
        steered = np.zeros((n, calls), dtype=bool)
        steered[:, on_grid] = active[:, pos[on_grid]]
        return steered
    if mode == "activity_peaks":
        if peak_t is None:
            raise ValueError("timesteps=activity_peaks needs the analysis store's peak_t array")
        steered = np.zeros((n, calls), dtype=bool)
        for row in range(n):
            for peak in peak_t[row]:
                if peak < 0:
                    continue
                steered[row, stores.nearest_calls(timesteps, peak)] = True
        return steered
    raise ValueError(f"unknown timesteps mode {mode!r}")


def steer_window(settings: PriorConfig, timesteps: np.ndarray, n_train: int) -> np.ndarray:
    """[calls] bool: the calls with steer_end_t <= t <= steer_start_t (an end that is None does not limit)."""
    for key in ("steer_start_t", "steer_end_t"):
        value = getattr(settings, key)
        if value is not None and not 0 <= value < n_train:
            raise ConfigError(
                f"stages.prior.{key}: {value} is out of range; allowed: 0..{n_train - 1} "
                f"(the scheduler's num_train_timesteps is {n_train})"
            )
    start = n_train - 1 if settings.steer_start_t is None else settings.steer_start_t
    end = 0 if settings.steer_end_t is None else settings.steer_end_t
    return (timesteps >= end) & (timesteps <= start)


def peak_call(peak_t: np.ndarray, timesteps: np.ndarray, topk_frequency: np.ndarray) -> int:
    """The captured call nearest the channel's highest peak (the first of equals); without a peak, the
    (first) call of its highest top-k frequency."""
    peaks = [int(p) for p in peak_t if p >= 0]
    if peaks:
        return int(stores.nearest_calls(timesteps, peaks[0])[0])
    return int(np.argmax(np.nan_to_num(np.asarray(topk_frequency, dtype=np.float64), nan=-1.0)))


def top_example_table(
    ds: xr.Dataset, rows: np.ndarray, channels: np.ndarray, n_results: int, capture_store: Path
) -> dict[str, np.ndarray]:
    """Per channel, the capture samples of its first `n_results` top examples at its peak call, with their
    seeds and prompts (`stores.PRIOR_EXAMPLE_ARRAYS`)."""
    missing = [name for name in ("top_sample", "topk_frequency", "peak_t") if name not in ds]
    if missing:
        raise ValueError(f"prompt_source=top_examples needs the analysis store's {missing}; rerun timestep_analysis")
    timesteps = ds["timestep"].values
    peak_t, frequency = ds["peak_t"].values[rows], ds["topk_frequency"].values[rows]
    calls = np.array([peak_call(p, timesteps, f) for p, f in zip(peak_t, frequency, strict=True)], dtype=np.int64)
    samples = ds["top_sample"].values[rows][np.arange(len(rows)), calls, :n_results]
    found = (samples >= 0).sum(axis=1) if samples.size else np.zeros(len(rows), dtype=np.int64)
    if samples.shape[1] < n_results or (found < n_results).any():
        i = int(np.argmin(found))
        raise ConfigError(
            f"stages.prior.n_results: {n_results} top examples per channel are needed but channel "
            f"{int(channels[i])} has {int(found[i])} at its peak call {int(calls[i])}; lower n_results (or raise "
            "stages.timestep_analysis.top_examples)"
        )
    capture = stores.open_store(capture_store)
    prompts, seeds = capture["prompt"][:], capture["seed"][:]
    return {
        "example_sample": samples.astype(np.int64),
        "example_seed": np.asarray(seeds)[samples].astype(np.int64),
        "example_prompt": np.asarray(prompts, dtype=object)[samples],
        "example_call": calls,
    }


def _warn_if_capture_differs(config: ExperimentConfig, settings: PriorConfig, capture_store: Path) -> None:
    """Top examples regenerate their capture images only with the capture's settings: say when they differ."""
    attrs = stores.open_store(capture_store).attrs
    ours = {
        "guidance_scale": settings.guidance_scale,
        "num_inference_steps": config.num_inference_steps,
        "image_size": config.resolved_image_size,
    }
    differing = {k: (attrs[k], v) for k, v in ours.items() if k in attrs and attrs[k] != v}
    if differing:
        log.warning(
            "prior: prompt_source=top_examples with settings other than the capture's (%s); the unsteered "
            "generations will not reproduce the dataset images",
            ", ".join(f"{k}: capture {a}, prior {b}" for k, (a, b) in differing.items()),
        )


def build_schedule(config: ExperimentConfig, kind: Kind) -> PriorSchedule:
    """The steering schedule of every selected channel, from the analysis store; reads no weights."""
    settings = prior_settings(config, kind)
    path = analysis_store_path(config, kind)
    timesteps = scheduler_timesteps(config)
    window = steer_window(settings, timesteps, num_train_timesteps(config))
    with open_analysis(config, kind) as ds:
        ids = ds["channel"].values.astype(np.int64)
        chosen = settings.select(ids, "stages.prior", str(path))
        rows = (
            np.searchsorted(ids, chosen) if np.all(np.diff(ids) > 0) else np.array([list(ids).index(c) for c in chosen])
        )
        analysis_ts = ds["timestep"].values.astype(np.int64)
        t_values = ds["t"].values.astype(np.int64)
        active = ds["active"].values[rows].astype(bool)
        max_act = ds["max_activation"].values[rows].astype(np.float64)
        peak_t = ds["peak_t"].values[rows] if "peak_t" in ds else None
        unwritten = chosen[np.isnan(max_act).all(axis=1)] if max_act.size else chosen[:0]
        if len(unwritten):
            raise ValueError(
                f"{path} holds no values for {kind} channels {unwritten.tolist()[:20]}"
                f"{' ...' if len(unwritten) > 20 else ''} ({len(unwritten)} channels): the timestep_analysis "
                "stage has not finished; run it before the prior stage"
            )
        if len(analysis_ts) != max_act.shape[1]:
            raise ValueError(f"{path}: max_activation has {max_act.shape[1]} calls but timestep has {len(analysis_ts)}")
        strength_per_call, mapping = call_strengths(max_act, analysis_ts, timesteps)
        if mapping == "interpolated":
            log.warning(
                "prior %s: the analysis has %d UNet calls (timesteps %s) but num_inference_steps=%d makes %d calls "
                "(timesteps %s); strengths are interpolated by timestep value",
                kind,
                len(analysis_ts),
                analysis_ts.tolist(),
                config.num_inference_steps,
                len(timesteps),
                timesteps.tolist(),
            )
        by_mode = steered_calls(settings.timesteps, active, t_values, peak_t, timesteps)
        steered = by_mode & window[None, :]
        skipped: dict[int, str] = {}
        keep = np.ones(len(chosen), dtype=bool)
        for i, channel in enumerate(chosen.tolist()):
            if not active[i].any():
                skipped[channel] = "inactive: no active timesteps"
            elif not by_mode[i].any():
                why = (
                    "no activity peaks" if settings.timesteps == "activity_peaks" else "active only between UNet calls"
                )
                skipped[channel] = f"{why} at num_inference_steps={config.num_inference_steps}"
            elif not steered[i].any():
                skipped[channel] = (
                    f"no steered call inside the window steer_end_t={settings.steer_end_t} <= t <= "
                    f"steer_start_t={settings.steer_start_t}"
                )
            else:
                bad = steered[i] & ~np.isfinite(strength_per_call[i])
                if bad.any() and settings.steer_mode != "ablate":
                    raise ValueError(
                        f"{path}: max_activation of {kind} channel {channel} is not finite at steered calls "
                        f"{np.flatnonzero(bad).tolist()}; rerun the timestep_analysis stage"
                    )
                continue
            keep[i] = False
        examples = None
        if settings.prompt_source == "top_examples" and keep.any():
            capture_store = Path(ds.attrs.get("capture_store") or capture_store_path(config))
            examples = top_example_table(ds, rows[keep], chosen[keep], settings.n_results, capture_store)
            _warn_if_capture_differs(config, settings, capture_store)
    scale = 0.0 if settings.steer_mode == "ablate" else settings.steer_strength_scale
    strength = np.where(steered, np.nan_to_num(strength_per_call) * scale, 0.0)
    return PriorSchedule(
        kind=kind,
        channels=chosen[keep],
        timesteps=timesteps,
        strength=strength[keep].astype(np.float32),
        steered=steered[keep],
        skipped=skipped,
        n_channels=len(ids),
        strength_mapping=mapping,
        analysis_store=path,
        analysis_calls=len(analysis_ts),
        examples=examples,
    )


def _log_skipped(schedule: PriorSchedule) -> None:
    if schedule.skipped:
        log.warning(
            "prior %s: %d selected channels skipped: %s",
            schedule.kind,
            len(schedule.skipped),
            ", ".join(f"{c} ({why})" for c, why in schedule.skipped.items()),
        )


def plan_prior(config: ExperimentConfig, kind: Kind) -> list[list[int]]:
    """Shards of `channels_per_shard` scheduled channels; skipped (inactive) channels are logged, not errors."""
    schedule = build_schedule(config, kind)
    _log_skipped(schedule)
    per_shard = prior_settings(config, kind).channels_per_shard
    ids = schedule.channels.tolist()
    return [ids[i : i + per_shard] for i in range(0, len(ids), per_shard)]


# --- store --------------------------------------------------------------------------------------


def _direction_width(config: ExperimentConfig, kind: Kind) -> int:
    return layer_width(config) if kind == "raw" else int(sae_width(config) or 0)


def _params(config: ExperimentConfig, kind: Kind, schedule: PriorSchedule) -> dict[str, Any]:
    """Everything (but the channel selection) that decides a row's contents; a store is reused when these match."""
    settings = prior_settings(config, kind)
    return {
        "kind": kind,
        "model": config.model.model_dump(mode="json"),
        "target_layer_name": config.target_layer_name,
        "sae": config.sae.model_dump(mode="json") if kind == "sae" and config.sae else None,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "prompt": settings.prompt,
        "prompt_source": settings.prompt_source,
        "image_size": config.resolved_image_size,
        "timesteps": settings.timesteps,
        "steer_mode": settings.steer_mode,
        "steer_start_t": settings.steer_start_t,
        "steer_end_t": settings.steer_end_t,
        "steer_strength_scale": settings.steer_strength_scale,
        "seeds": _store_seeds(settings),
        "unet_timesteps": schedule.timesteps.tolist(),
    }


def _store_seeds(settings: PriorConfig) -> list[int]:
    """The store's `seed` per result; -1 with top_examples, whose seeds are per channel (`example_seed`)."""
    if settings.prompt_source == "top_examples":
        return [-1] * settings.n_results
    return settings.seeds[: settings.n_results]


def prepare_prior_store(config: ExperimentConfig, kind: Kind, *, overwrite: bool = False) -> Path:
    """Create `prior/<kind>/priors.zarr` with rows for every scheduled channel, or reuse a matching one.

    A store made with the same parameters is reused (a rerun resumes); channels the selection adds
    are appended as new rows. A store made with other parameters, or whose rows' schedules differ
    (the analysis changed), is refused unless `overwrite`, which deletes it with its images.
    """
    layout = stores.ExperimentLayout(config.experiment_dir)
    path = layout.prior_store(kind)
    schedule = build_schedule(config, kind)
    _log_skipped(schedule)
    params = _params(config, kind, schedule)
    if path.exists():
        problem = _reuse_problem(path, params, schedule)
        if problem is None:
            _append_new_rows(path, schedule)
            group = stores.open_store(path, mode="r+")
            skipped = {**json.loads(group.attrs.get("skipped_channels", "{}"))}
            skipped.update({str(c): why for c, why in schedule.skipped.items()})
            group.attrs["skipped_channels"] = json.dumps(skipped)
            stores.consolidate(path)
            return path
        if not overwrite:
            raise PriorStoreMismatch(
                f"{path} was made with other settings ({problem}); use another experiment_name, delete "
                f"{layout.prior_dir(kind)}, or prepare_prior_store(..., overwrite=True) to replace it"
            )
        shutil.rmtree(layout.prior_dir(kind))
    width = _direction_width(config, kind)
    if width != schedule.n_channels:
        raise ValueError(
            f"{schedule.analysis_store} has {schedule.n_channels} {kind} channels but the "
            f"{'layer ' + config.target_layer_name if kind == 'raw' else 'SAE'} has {width}; "
            "the analysis was made for another layer or SAE"
        )
    layout.prior_dir(kind).mkdir(parents=True, exist_ok=True)
    settings = prior_settings(config, kind)
    ablate = settings.steer_mode == "ablate"
    stores.create_prior_store(
        path,
        channels=schedule.channels,
        seeds=np.asarray(params["seeds"], dtype=np.int64),
        timesteps=schedule.timesteps,
        strength=schedule.strength,
        steered=schedule.steered,
        latent_shape=latent_shape(config),
        baseline=ablate,
        examples=schedule.examples,
        attrs={
            **{k: v for k, v in params.items() if k not in ("model", "sae", "unet_timesteps")},
            "model": config.model.name,
            "sae": config.sae.name if kind == "sae" and config.sae else None,
            "sae_hookpoint": config.sae.hookpoint if kind == "sae" and config.sae else None,
            "direction": "SAE decoder row (sae.decoder_directions[feature])" if kind == "sae" else "one-hot channel",
            "direction_width": width,
            "steer_rule": STEER_RULES[settings.steer_mode],
            "effect_rule": EFFECT_RULE if ablate else None,
            "strength_mapping": schedule.strength_mapping,
            "strength_mapping_rule": STRENGTH_MAPPINGS[schedule.strength_mapping],
            "analysis_store": str(schedule.analysis_store),
            "analysis_calls": schedule.analysis_calls,
            "skipped_channels": json.dumps({str(c): why for c, why in schedule.skipped.items()}),
            "params": json.dumps(params, sort_keys=True),
            "prior_config": json.dumps(settings.model_dump(mode="json"), sort_keys=True),
            "config": json.dumps(config.model_dump(mode="json"), default=str),
        },
    )
    return path


def _reuse_problem(path: Path, params: dict[str, Any], schedule: PriorSchedule) -> str | None:
    """Why the existing store cannot hold this schedule (None: it can)."""
    try:
        group = stores.open_store(path)
        existing = {**LEGACY_PARAMS, **json.loads(group.attrs["params"])}
    except (KeyError, FileNotFoundError, ValueError):
        return "unreadable or incomplete store"
    differing = sorted(k for k in params if existing.get(k) != params[k])
    if differing:
        shown = [
            k if isinstance(params[k], dict | list) else f"{k} (store {existing.get(k)!r}, now {params[k]!r})"
            for k in differing
        ]
        return "differing: " + ", ".join(shown)
    ids = group["channel"][:].tolist()
    row_of = {c: i for i, c in enumerate(ids)}
    shared = [(i, row_of[c]) for i, c in enumerate(schedule.channels.tolist()) if c in row_of]
    if shared:
        mine, theirs = (list(x) for x in zip(*shared, strict=True))
        same = np.array_equal(group["strength"][:][theirs], schedule.strength[mine]) and np.array_equal(
            group["steered"][:][theirs], schedule.steered[mine]
        )
        if not same:
            return "the steering schedule of channels already in the store differs (the analysis changed)"
        if schedule.examples is not None and not np.array_equal(
            group["example_sample"][:][theirs], schedule.examples["example_sample"][mine]
        ):
            return "the top examples of channels already in the store differ (the analysis changed)"
    return None


def _append_new_rows(path: Path, schedule: PriorSchedule) -> None:
    group = stores.open_store(path)
    present = set(group["channel"][:].tolist())
    new = [i for i, c in enumerate(schedule.channels.tolist()) if c not in present]
    if new:
        log.info("prior %s: adding %d channels to %s", schedule.kind, len(new), path)
        examples = {k: v[new] for k, v in schedule.examples.items()} if schedule.examples is not None else None
        stores.append_prior_channels(
            path, schedule.channels[new], schedule.strength[new], schedule.steered[new], examples
        )


# --- generation ---------------------------------------------------------------------------------


def steering_directions(
    config: ExperimentConfig, kind: Kind, channels: Sequence[int], device: torch.device, width: int | None = None
) -> torch.Tensor:
    """[len(channels), width] float32: one-hot rows for raw channels, decoder rows for SAE features.

    `width` is the layer's channel count for raw channels (default: from the model config).
    """
    if kind == "sae":
        rows = _experiment_sae(config).decoder_directions
        if max(channels) >= rows.shape[0]:
            raise ValueError(f"SAE feature {max(channels)} is out of range; the SAE has {rows.shape[0]} features")
        return rows.detach()[torch.as_tensor(list(channels), device=rows.device)].float().to(device)
    width = layer_width(config) if width is None else width
    if max(channels) >= width:
        raise ValueError(f"channel {max(channels)} is out of range; {config.target_layer_name} has {width} channels")
    directions = torch.zeros(len(channels), width, device=device)
    directions[torch.arange(len(channels)), torch.as_tensor(list(channels))] = 1.0
    return directions


def feature_codes(config: ExperimentConfig, kind: Kind, channels: Sequence[int], device: torch.device) -> FeatureCodes:
    """What replace/ablate read from the layer output: each sample's channel value, or its SAE feature's code."""
    ids = torch.as_tensor(list(channels), dtype=torch.long, device=device)
    return SaeFeatureCodes(_experiment_sae(config), ids) if kind == "sae" else ChannelCodes(ids)


def _experiment_sae(config: ExperimentConfig) -> SparseAutoencoder:
    sae = load_experiment_sae(config)
    if sae is None:
        raise ConfigError("kind 'sae' needs an SAE: set use_sae=true and sae=<name>")
    return sae


def steered_latents(
    pipe: Any,
    config: ExperimentConfig,
    directions: torch.Tensor,
    strengths: torch.Tensor,
    seeds: Sequence[int],
    *,
    prompts: Sequence[str] | None = None,
    guidance_scale: float = 1.0,
    steered: torch.Tensor | None = None,
    mode: SteerMode = "add",
    codes: FeatureCodes | None = None,
    hooks_before: Sequence[Callable[..., Any]] = (),
    hooks_after: Sequence[Callable[..., Any]] = (),
    tracker: TimestepTracker | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """One pipeline call, sample i steered along `directions[i]` by `strengths[i]` at the calls `steered[i]`.

    `directions` [B, width], `strengths` and `steered` [B, calls] (steered default: every call),
    `seeds` [B], `prompts` [B] (default: the empty prompt), `mode` and `codes` as `SteeringHook`
    takes them; the defaults are the original's (empty prompt, guidance 1.0, add). Extra layer hooks
    run before and after the steering hook (tests read the layer output there; pass the `tracker`
    they use). Returns the final latents [B, 4, h, w] (float32, CPU) and the timestep of every UNet call.
    """
    if not len(seeds) == directions.shape[0] == strengths.shape[0]:
        raise ValueError(f"{len(seeds)} seeds, {directions.shape[0]} directions, {strengths.shape[0]} strength rows")
    tracker = tracker or TimestepTracker()
    steer = SteeringHook(
        tracker,
        directions.to(pipe.device),
        strengths.to(pipe.device, torch.float32),
        None if steered is None else steered.to(pipe.device),
        mode,
        codes,
    )
    return _latents(pipe, config, prompts, seeds, guidance_scale, tracker, [*hooks_before, steer, *hooks_after])


def unsteered_latents(
    pipe: Any, config: ExperimentConfig, seeds: Sequence[int], *, prompts: Sequence[str] | None, guidance_scale: float
) -> tuple[torch.Tensor, list[int]]:
    """The same generation as `steered_latents` with no hook on the layer (the ablation's baseline)."""
    return _latents(pipe, config, prompts, seeds, guidance_scale, TimestepTracker(), [])


def _latents(
    pipe: Any,
    config: ExperimentConfig,
    prompts: Sequence[str] | None,
    seeds: Sequence[int],
    guidance_scale: float,
    tracker: TimestepTracker,
    layer_hooks: list[Callable[..., Any]],
) -> tuple[torch.Tensor, list[int]]:
    prompts = [""] * len(seeds) if prompts is None else list(prompts)
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
    settings = config.model_copy(update={"guidance_scale": guidance_scale})
    with hooked(pipe.unet, config.target_layer_name, tracker, *layer_hooks):
        latents = generate(pipe, prompts, list(seeds), settings, output_type="latent").images
    return latents.float().cpu(), list(tracker.timesteps)


@torch.no_grad()
def decode_pixels(pipe: Any, latents: torch.Tensor, batch: int = DECODE_BATCH) -> torch.Tensor:
    """Final latents -> images [B, 3, H, W] float32 in 0..1 (before 8-bit rounding), on the CPU."""
    chunks = [pipe.image_processor.postprocess(d, output_type="pt") for d in decode_latents(pipe, latents, batch)]
    return torch.cat(chunks).float().cpu()


def to_pil(pipe: Any, pixels: torch.Tensor) -> list[Image.Image]:
    """Images in 0..1 -> PIL, rounded as the pipeline rounds its own output."""
    return pipe.image_processor.numpy_to_pil(pipe.image_processor.pt_to_numpy(pixels))


def contact_sheet(
    layout: stores.ExperimentLayout,
    kind: Kind,
    channels: list[int],
    n_results: int,
    thumb: int = 128,
    baseline: bool = False,
) -> Path:
    """A grid of the shard's prior images (a row per channel, a column per result), labelled by channel;
    with `baseline`, each result is followed by its unablated baseline."""
    label = 72
    per_result = (stores.prior_image_path, stores.prior_baseline_image_path) if baseline else (stores.prior_image_path,)
    sheet = Image.new("RGB", (label + n_results * len(per_result) * thumb, len(channels) * thumb), "white")
    draw = ImageDraw.Draw(sheet)
    for r, channel in enumerate(channels):
        draw.text((4, r * thumb + thumb // 2 - 6), f"{kind} {channel}", fill="black")
        pngs = [path_of(layout, kind, channel, k) for k in range(n_results) for path_of in per_result]
        for column, png in enumerate(pngs):
            if png.is_file():
                with Image.open(png) as image:
                    sheet.paste(image.convert("RGB").resize((thumb, thumb)), (label + column * thumb, r * thumb))
    path = stores.prior_contact_sheet_path(layout, kind, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


@dataclass
class Baseline:
    """The unsteered generations beside a batch of ablated ones, and the ablation's effect on each."""

    latents: np.ndarray  # [B, 4, h, w]
    images: list[Image.Image]
    effect: np.ndarray  # [B]: mean |ablated - baseline| of the images, pixels in 0..1


def _ablation_baseline(
    pipe: Any,
    config: ExperimentConfig,
    settings: PriorConfig,
    seeds: list[int],
    prompts: list[str],
    ablated_pixels: torch.Tensor,
) -> Baseline:
    latents, _ = unsteered_latents(pipe, config, seeds, prompts=prompts, guidance_scale=settings.guidance_scale)
    pixels = decode_pixels(pipe, latents)
    effect = (ablated_pixels - pixels).abs().mean(dim=(1, 2, 3))
    return Baseline(latents.numpy(), to_pil(pipe, pixels), effect.numpy())


def prior_shard(config: ExperimentConfig, kind: Kind, channels: list[int]) -> dict[str, Any]:
    """Generate the priors of `channels` not yet done: latents into the store, PNGs, a contact sheet.

    Channels are batched `channels_per_batch` at a time (x `n_results` results per pipeline call;
    ablation adds one unsteered call of the same batch for the baselines); each channel is marked
    done after its latents and images are written, so a rerun after an interruption generates only
    the missing ones.
    """
    settings = prior_settings(config, kind)
    if not channels:
        raise ValueError("prior_shard: no channels given")
    layout = stores.ExperimentLayout(config.experiment_dir)
    path = layout.prior_store(kind)
    group = stores.open_store(path, mode="r+")
    ids = group["channel"][:].tolist()
    row_of = {c: i for i, c in enumerate(ids)}
    unknown = [c for c in channels if c not in row_of]
    if unknown:
        raise ValueError(
            f"{kind} channels {unknown} have no row in {path} (skipped or not selected); run prepare_prior_store"
        )
    for key, value in (
        ("num_inference_steps", config.num_inference_steps),
        ("image_size", config.resolved_image_size),
        ("steer_mode", settings.steer_mode),
        ("prompt_source", settings.prompt_source),
        ("prompt", settings.prompt),
        ("guidance_scale", settings.guidance_scale),
    ):
        if group.attrs.get(key, LEGACY_PARAMS.get(key)) != value:
            raise PriorStoreMismatch(
                f"{path} was prepared with {key}={group.attrs.get(key)!r}, this config has {value!r}"
            )
    ablate = settings.steer_mode == "ablate"
    done_dir = stores.prior_done_dir(layout, kind)
    done = stores.prior_done_channels(done_dir)
    todo = [c for c in channels if c not in done]
    seeds = group["seed"][:].tolist()
    n_res = len(seeds)
    timesteps = group["timestep"][:].tolist()
    started = time.perf_counter()
    calls = 0
    if todo:
        pipe = load_pipeline(config)
        strength_table, steered_table = group["strength"][:], group["steered"][:]
        examples = settings.prompt_source == "top_examples"
        example_seed = group["example_seed"][:] if examples else None
        example_prompt = group["example_prompt"][:] if examples else None
        width = int(group.attrs["direction_width"])
        stores.prior_images_dir(layout, kind).mkdir(parents=True, exist_ok=True)
        per_batch = settings.channels_per_batch
        batches = [todo[i : i + per_batch] for i in range(0, len(todo), per_batch)]
        for b, batch in enumerate(batches):
            rows = [row_of[c] for c in batch]
            per_sample = [c for c in batch for _ in range(n_res)]
            if example_seed is not None and example_prompt is not None:
                batch_seeds = example_seed[rows].ravel().tolist()
                prompts = [str(p) for p in example_prompt[rows].ravel()]
            else:
                batch_seeds, prompts = seeds * len(batch), [settings.prompt] * len(per_sample)
            latents, seen = steered_latents(
                pipe,
                config,
                steering_directions(config, kind, batch, pipe.device, width).repeat_interleave(n_res, dim=0),
                torch.from_numpy(strength_table[rows]).repeat_interleave(n_res, dim=0),
                batch_seeds,
                prompts=prompts,
                guidance_scale=settings.guidance_scale,
                steered=torch.from_numpy(steered_table[rows]).repeat_interleave(n_res, dim=0),
                mode=settings.steer_mode,
                codes=feature_codes(config, kind, per_sample, pipe.device)
                if settings.steer_mode in ("replace", "ablate")
                else None,
            )
            if seen != timesteps:
                raise RuntimeError(f"prior {kind}: the UNet visited timesteps {seen}, the store expects {timesteps}")
            pixels = decode_pixels(pipe, latents)
            images = to_pil(pipe, pixels)
            baseline = _ablation_baseline(pipe, config, settings, batch_seeds, prompts, pixels) if ablate else None
            calls += 2 if ablate else 1  # an ablation generates its baselines in a second call
            for j, channel in enumerate(batch):
                mine = slice(j * n_res, (j + 1) * n_res)
                stores.write_prior_latents(group, rows[j], latents[mine].numpy())
                for k, image in enumerate(images[mine]):
                    image.save(stores.prior_image_path(layout, kind, channel, k))
                if baseline is not None:
                    stores.write_prior_baseline(group, rows[j], baseline.latents[mine], baseline.effect[mine])
                    for k, image in enumerate(baseline.images[mine]):
                        image.save(stores.prior_baseline_image_path(layout, kind, channel, k))
                info = {"channel": channel, "row": rows[j], "seeds": batch_seeds[mine]}
                stores.mark_prior_channel_done(done_dir, channel, info)
            if (b + 1) % settings.log_every_n_steps == 0 or b + 1 == len(batches):
                n_done = sum(len(x) for x in batches[: b + 1])
                log_progress(log, f"prior {kind}", n_done, len(todo), "channels", started)
    sheet = stores.prior_contact_sheet_path(layout, kind, channels)
    if todo or not sheet.is_file():
        sheet = contact_sheet(layout, kind, channels, n_res, baseline=ablate)
    return {
        "kind": kind,
        "channels": list(channels),
        "generated": todo,
        "skipped": not todo,
        "pipeline_calls": calls,
        "seconds": time.perf_counter() - started,
        "contact_sheet": str(sheet),
    }


def mean_effect(path: Path) -> float | None:
    """The ablation's mean `effect` over every written result of a prior store (None: not an ablation or none
    written yet)."""
    group = stores.open_store(path)
    if "effect" not in group:
        return None
    effect = np.asarray(group["effect"][:], dtype=np.float64)
    return float(np.nanmean(effect)) if np.isfinite(effect).any() else None


def run_prior(config: ExperimentConfig, kind: Kind) -> dict[str, Any]:
    """The whole stage in this process: plan, prepare, every shard (completed channels are skipped)."""
    shards = plan_prior(config, kind)
    path = prepare_prior_store(config, kind)
    results = [prior_shard(config, kind, shard) for shard in shards]
    schedule_skipped = json.loads(stores.open_store(path).attrs["skipped_channels"])
    return {
        "store": str(path),
        "shards": results,
        "generated": sum(len(r["generated"]) for r in results),
        "skipped_channels": {int(c): why for c, why in schedule_skipped.items()},
        "contact_sheets": [r["contact_sheet"] for r in results],
        "mean_effect": mean_effect(path),
    }
