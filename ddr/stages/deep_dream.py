"""Deep dream: the latent that most excites a channel (or SAE feature) at a timestep, by gradient ascent.

Targets are (channel, t) pairs. For each selected channel (`channels`, or
[start_channel, end_channel) of the analysis store's ids) the configured `timesteps` list is
resolved in order, duplicates dropped:

- an int: that timestep (0 <= t < the scheduler's num_train_timesteps);
- `activity_peaks`: the channel's `peak_t` (highest peak first);
- `active_timesteps`: the captured timestep values (UNet-call order, each value once) at which
  `active[channel, value]` holds. As in the original, `activity_peaks` takes precedence: when
  both are listed, `active_timesteps` is ignored (the store's `timestep_rule` attribute says so).

`use_just_one_timestep` keeps the first. Channels left with no timestep are skipped and logged;
so are channels the prior store has no row for when starting from priors (as the original
skipped them), and targets with no dataset example near t when starting from examples.

Each target is optimised `n_results` times, from (`start_from`; None: `use_prior` decides):

- `prior`: the prior store's latents of the channel;
- `noise`: seeded noise (`torch.randn` from `torch.Generator().manual_seed(seed)`, the initial
  latent a generation with that seed would start from);
- `example` (feature accentuation): result k starts from the channel's k-th top dataset example
  at t (`ddr.dream.sources.example_starts`: the capture image, VAE-encoded; `start_sample` records
  which). With see-through noise on (the default) the optimised latent is a clean latent that the
  loop noises to t at every step, so the clean example is the start; with it off the UNet sees
  the latent as it is, so the example is noised to t once (`sources.noised`, the sample's seed).
  `seed_distance_penalty_weight` (mean squared distance to the start) and `seed_distance_max`
  (an L2 ball around the start that every step is projected into) keep the dream near its seed.

Sample (target, result k) draws its augmentation and noise from a generator seeded with
`SeedSequence([seeds[k], channel, t])`, so its result does not depend on its batch-mates (the
diversity penalty couples only the n_results samples of one target, always in one batch).
The UNet is called with the latent (augmented, optionally noised by `scheduler.add_noise` at
t) and timestep t, the empty prompt at guidance 1, and stopped after the target layer
(`ddr.dream.objectives`); the loop itself is `ddr.dream.optimise`. `parameterisation`
`phase_fourier` optimises the phase of the latent's spectrum with the magnitude fixed at the mean
spectrum of real latents (`spectrum_source`: the capture images' or the priors' latents, at most
`spectrum_max_images`; computed once by `prepare_dream_store`). `negative` minimises.

Recorded per target and result (`dream/<run>/<kind>/dreams.zarr`, DESIGN.md): the final latent;
`activation` (the final latent's, un-augmented; raw, also for a negative run);
`normalized_activation` = activation / `dataset_max_activation`, the channel's `max_activation`
in the analysis store at the UNet call whose timestep value is t (the max over calls sharing that
value; the nearest captured value when t was not captured; NaN when that maximum is 0 or
missing); `selectivity` (target minus the mean of the other channels,
`ddr.dream.optimise.selectivity`; for a negative run, lower is more selective);
`penalty_<name>` (unweighted, of the final latent); `failed_step` (-1, or the step at which the
sample's loss or gradient stopped being finite; its latent is the last finite one);
`history_activation` at every `intermediate_opt_results_every_n_steps` steps (coordinate
`step`); `attribution` (summed |d activation / d latent| over the steps, on the latent grid);
`seed_distance` (L2 norm of final - start latent); `start_sample` (the capture sample an
example start came from, else -1). Per target: `diversity`, the mean pairwise cosine of the
final results' Gram matrices of the layer output (whatever the penalty's weight; NaN with one
result). Images: the final decode (`images/channel_NNNNN_t_TTTT_result_K.png`), each snapshot
(`images/snapshots/..._step_SSSS.png`), min-max normalised per image (the original normalised
over the batch); the attribution overlay (`images/attribution/...`: the final image blended with
the inferno colour of the attribution summed over latent channels, divided by its maximum and
upsampled bilinearly, blend weight 0.6 x that value); with example starts the decoded start
latent (`images/start/...`).

Stage API (the flow calls these): `plan_dream`, `prepare_dream_store`, `dream_shard`,
`summarise_dreams`, and `run_dream` for all of it in-process.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from PIL import Image, ImageDraw

from ddr import stores
from ddr.config import ConfigError, DeepDreamConfig, ExperimentConfig
from ddr.dream.objectives import (
    DEFAULT_OBJECTIVE,
    LayerActivation,
    autocast_dtype,
    empty_prompt_embedding,
    make_objective,
)
from ddr.dream.optimise import DreamResult, DreamSettings, optimise
from ddr.dream.parameterisations import Parameterisation, make_parameterisation
from ddr.dream.regularisers import penalties_from_config
from ddr.dream.sources import example_starts, latent_spectrum, noised, ranked_examples
from ddr.models.pipeline import decode_latents, latent_shape, load_experiment_sae, load_pipeline, num_train_timesteps
from ddr.progress import log_progress
from ddr.stores import Kind

log = logging.getLogger(__name__)
DECODE_BATCH = 8
FP16_LOSS_SCALE = 1024.0
SELECTIVITY_RULE = (
    "activation of the target minus the mean activation of the layer's other channels (same forward pass)"
)
NORMALIZATION_RULE = (
    "activation / dataset_max_activation: the analysis max_activation of the channel at the UNet call whose timestep "
    "value is t (max over calls sharing the value; nearest captured value when t was not captured)"
)
DIVERSITY_RULE = (
    "mean pairwise cosine similarity of the final results' Gram matrices (layer output [C, H*W] times its "
    "transpose, flattened) per target; NaN with one result"
)
SEED_DISTANCE_RULE = "L2 norm of final latent - start latent (the latent the optimisation started from)"
ATTRIBUTION_RULE = "sum over steps of |d activation / d latent| (the target activation only, not the penalties)"
# Settings that do not change a target's result (batching is exact) or are not about the contents.
_NOT_CONTENT = {
    "log_every_n_steps",
    "targets_per_batch",
    "channels_per_shard",
    "start_channel",
    "end_channel",
    "channels",
}


class DreamStoreMismatch(RuntimeError):
    """An existing dream store was made with other settings; nothing is overwritten unless asked."""


@dataclass
class DreamPlan:
    """Every target of the selection, resolved from the analysis (and prior) store; reads no weights."""

    kind: Kind
    targets: list[tuple[int, int]]  # (channel, t), grouped by channel, channels ascending
    dataset_max: np.ndarray  # [targets] float64
    skipped: dict[int, str] = field(default_factory=dict)
    n_channels: int = 0
    analysis_store: Path = Path()
    prior_store: Path | None = None
    timestep_rule: str = ""

    @property
    def channels(self) -> list[int]:
        return list(dict.fromkeys(c for c, _ in self.targets))


# --- settings and paths -------------------------------------------------------------------------


def dream_settings(config: ExperimentConfig, kind: Kind) -> DeepDreamConfig:
    """The deep-dream settings for this kind (the `sae` block applied for SAE features)."""
    config.require_kind(kind)
    settings = config.stages.deep_dream.for_kind(kind)
    if len(settings.seeds) < settings.n_results:
        raise ConfigError(
            f"stages.deep_dream.n_results: {settings.n_results} needs at least that many seeds, "
            f"got {len(settings.seeds)} ({settings.seeds})"
        )
    if kind == "raw" and settings.objective not in (None, "channel_mean"):
        raise ConfigError(
            f"stages.deep_dream.objective: {settings.objective!r} needs SAE features; raw channels allow "
            "'channel_mean' (set SAE objectives in the sae block: stages.deep_dream.sae.objective=...)"
        )
    if settings.diversity_penalty_weight > 0 and settings.n_results < 2:
        raise ConfigError(
            f"stages.deep_dream.diversity_penalty_weight: {settings.diversity_penalty_weight} needs n_results >= 2 "
            f"(the penalty compares a target's results), got n_results={settings.n_results}"
        )
    if settings.seed_distance_max is not None and settings.parameterisation != "latent":
        raise ConfigError(
            f"stages.deep_dream.seed_distance_max: {settings.seed_distance_max} projects latents, which "
            f"parameterisation {settings.parameterisation!r} cannot follow; use parameterisation=latent or "
            "seed_distance_penalty_weight"
        )
    return settings  # type: ignore[return-value]


def start_kind(settings: DeepDreamConfig) -> str:
    """Where the optimisation starts: `start_from`, or (None) the original's `use_prior` switch."""
    return settings.start_from or ("prior" if settings.use_prior else "noise")


def analysis_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    folder = dream_settings(config, kind).timestep_analysis_results_dir
    return stores.ExperimentLayout(config.experiment_dir).analysis_store_from(kind, folder)


def prior_store_path(config: ExperimentConfig, kind: Kind) -> Path:
    """`prior_results_dir` (a priors.zarr, a `prior/<kind>` folder or a `prior` folder) or this experiment's."""
    folder = dream_settings(config, kind).prior_results_dir
    return stores.ExperimentLayout(config.experiment_dir).prior_store_from(kind, folder)


def _objective_width(config: ExperimentConfig, kind: Kind) -> int:
    if kind == "sae":
        from ddr.stages.capture import sae_width

        width = sae_width(config)
        assert width is not None
        return width
    from ddr.stages.capture import layer_width

    return layer_width(config)


# --- targets ------------------------------------------------------------------------------------


def resolve_timesteps(
    choices: Sequence[int | str],
    *,
    peaks: np.ndarray,
    active: np.ndarray,
    t_values: np.ndarray,
    captured: np.ndarray,
    just_one: bool = False,
) -> list[int]:
    """One channel's target timesteps, in the order of `choices` (module docstring); no duplicates.

    `peaks` [peak] (-1 padded), `active` [t] bool over `t_values`, `captured` the UNet calls' timestep values.
    """
    use_peaks = "activity_peaks" in choices
    out: list[int] = []
    for choice in choices:
        if isinstance(choice, int) and not isinstance(choice, bool):
            out.append(int(choice))
        elif choice == "activity_peaks":
            out.extend(int(p) for p in peaks if p >= 0)
        elif choice == "active_timesteps" and not use_peaks:
            index = {int(t): i for i, t in enumerate(t_values)}
            for value in dict.fromkeys(int(v) for v in captured):
                if value in index and active[index[value]]:
                    out.append(value)
        elif choice not in ("active_timesteps", "activity_peaks"):
            raise ConfigError(
                f"stages.deep_dream.timesteps: {choice!r} is not allowed; use ints, activity_peaks or active_timesteps"
            )
    unique = list(dict.fromkeys(out))
    return unique[:1] if just_one else unique


def dataset_max_at(max_row: np.ndarray, captured: np.ndarray, t: int) -> float:
    """The channel's max dataset activation at t: over calls whose value is t, else the nearest captured value."""
    values = np.asarray(max_row, dtype=np.float64)[stores.nearest_calls(captured, t)]
    return float(np.nanmax(values)) if np.isfinite(values).any() else float("nan")


def build_plan(config: ExperimentConfig, kind: Kind) -> DreamPlan:
    settings = dream_settings(config, kind)
    path = stores.require_analysis_store(
        analysis_store_path(config, kind), "deep_dream", settings.timestep_analysis_results_dir
    )
    max_t = num_train_timesteps(config)
    for choice in settings.timesteps:
        if isinstance(choice, int) and not 0 <= choice < max_t:
            raise ConfigError(f"stages.deep_dream.timesteps: {choice} is out of range; allowed: 0..{max_t - 1}")
    with xr.open_zarr(path, chunks=None) as ds:
        ids = ds["channel"].values.astype(np.int64)
        chosen = settings.select(ids, "stages.deep_dream", str(path))
        row_of = {int(c): i for i, c in enumerate(ids)}
        rows = [row_of[int(c)] for c in chosen]
        captured = ds["timestep"].values.astype(np.int64)
        t_values = ds["t"].values.astype(np.int64)
        active = ds["active"].values[rows].astype(bool)
        max_act = ds["max_activation"].values[rows].astype(np.float64)
        peak_t = ds["peak_t"].values[rows].astype(np.int64)
        start = start_kind(settings)
        if start == "example":
            top_sample = ds["top_sample"].values[rows].astype(np.int64)
            top_value = ds["top_value"].values[rows].astype(np.float64)
    prior_path: Path | None = None
    prior_channels: set[int] = set()
    if start == "prior":
        prior_path = prior_store_path(config, kind)
        prior = stores.open_store(prior_path)
        prior_channels = set(prior["channel"][:].tolist())
        n_prior = prior["latent"].shape[1]
        if n_prior < settings.n_results:
            raise ConfigError(
                f"stages.deep_dream.n_results: {settings.n_results} but {prior_path} holds {n_prior} priors per channel"
            )
        if tuple(prior["latent"].shape[2:]) != latent_shape(config):
            raise ConfigError(
                f"{prior_path} holds latents of shape {tuple(prior['latent'].shape[2:])}, this config's image_size "
                f"{config.resolved_image_size} needs {latent_shape(config)}; set stages.deep_dream.use_prior=false "
                "(or start_from=noise/example) or match the image size"
            )
    targets: list[tuple[int, int]] = []
    maxima: list[float] = []
    skipped: dict[int, str] = {}
    clamped: list[int] = []
    without_examples: list[tuple[int, int]] = []
    for i, channel in enumerate(chosen.tolist()):
        if start == "prior" and channel not in prior_channels:
            skipped[channel] = f"no prior in {prior_path}"
            continue
        ts = resolve_timesteps(
            settings.timesteps,
            peaks=peak_t[i],
            active=active[i],
            t_values=t_values,
            captured=captured,
            just_one=settings.use_just_one_timestep,
        )
        if any(t >= max_t for t in ts):
            clamped.append(channel)
            ts = list(dict.fromkeys(min(t, max_t - 1) for t in ts))
        if start == "example":
            lacking = [t for t in ts if not ranked_examples(top_sample[i], top_value[i], captured, t)]
            without_examples += [(channel, t) for t in lacking]
            if ts and len(lacking) == len(ts):
                skipped[channel] = f"no dataset examples near t in {lacking}"
                continue
            ts = [t for t in ts if t not in lacking]
        if not ts:
            skipped[channel] = f"no timesteps ({settings.timesteps} resolved to none)"
            continue
        for t in ts:
            targets.append((channel, t))
            maxima.append(dataset_max_at(max_act[i], captured, t))
    if clamped:
        log.warning("deep_dream %s: peaks at t >= %d clamped to %d for channels %s", kind, max_t, max_t - 1, clamped)
    if without_examples:
        log.warning("deep_dream %s: (channel, t) targets without dataset examples dropped: %s", kind, without_examples)
    rule = "in the listed order"
    if "activity_peaks" in settings.timesteps and "active_timesteps" in settings.timesteps:
        rule = "activity_peaks takes precedence: active_timesteps ignored"
        log.warning("deep_dream %s: timesteps lists both activity_peaks and active_timesteps; %s", kind, rule)
    return DreamPlan(
        kind=kind,
        targets=targets,
        dataset_max=np.asarray(maxima, dtype=np.float64),
        skipped=skipped,
        n_channels=len(ids),
        analysis_store=path,
        prior_store=prior_path,
        timestep_rule=rule,
    )


def plan_dream(config: ExperimentConfig, kind: Kind) -> list[list[int]]:
    """Shards of `channels_per_shard` channels that have targets; skipped channels are logged, not errors."""
    plan = build_plan(config, kind)
    if plan.skipped:
        log.warning(
            "deep_dream %s: %d selected channels skipped: %s",
            kind,
            len(plan.skipped),
            ", ".join(f"{c} ({why})" for c, why in plan.skipped.items()),
        )
    per_shard = dream_settings(config, kind).channels_per_shard
    channels = plan.channels
    return [channels[i : i + per_shard] for i in range(0, len(channels), per_shard)]


# --- store --------------------------------------------------------------------------------------


def _params(config: ExperimentConfig, kind: Kind, plan: DreamPlan) -> dict[str, Any]:
    """Everything that decides the store's contents; an existing store is reused only when these match."""
    settings = dream_settings(config, kind)
    content = {k: v for k, v in settings.model_dump(mode="json").items() if k not in _NOT_CONTENT | {"sae"}}
    content["seeds"] = settings.seeds[: settings.n_results]
    return {
        "kind": kind,
        "model": config.model.model_dump(mode="json"),
        "target_layer_name": config.target_layer_name,
        "sae": config.sae.model_dump(mode="json") if kind == "sae" and config.sae else None,
        "image_size": config.resolved_image_size,
        "objective": settings.objective or DEFAULT_OBJECTIVE[kind],
        "settings": content,
        "targets": [list(t) for t in plan.targets],
        "analysis_store": str(plan.analysis_store),
        "prior_store": str(plan.prior_store) if plan.prior_store else None,
    }


def prepare_dream_store(
    config: ExperimentConfig, kind: Kind, mlflow_run_id: str | None = None, *, overwrite: bool = False
) -> Path:
    """Create `dream/<run>/<kind>/dreams.zarr` with a row for every target, or reuse a matching one.

    A store made with the same parameters and targets is reused (a rerun resumes; the MLflow run
    id is updated and the earlier ones kept in `mlflow_run_ids`). One made otherwise is refused
    unless `overwrite`, which deletes the run's folder for this kind, images included.
    """
    settings = dream_settings(config, kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    path = layout.dream_store(settings.run_name, kind)
    plan = build_plan(config, kind)
    params = _params(config, kind, plan)
    if path.exists():
        problem = _reuse_problem(path, params)
        if problem is None:
            group = stores.open_store(path, mode="r+")
            if mlflow_run_id is not None:
                ids = json.loads(group.attrs.get("mlflow_run_ids", "[]"))
                group.attrs["mlflow_run_ids"] = json.dumps([*ids, mlflow_run_id])
                group.attrs["mlflow_run_id"] = mlflow_run_id
                stores.consolidate(path)
            return path
        if not overwrite:
            raise DreamStoreMismatch(
                f"{path} was made with other settings ({problem}); use another stages.deep_dream.run_name, "
                f"delete {layout.dream_dir(settings.run_name, kind)}, or prepare_dream_store(..., overwrite=True)"
            )
        shutil.rmtree(layout.dream_dir(settings.run_name, kind))
    if not plan.targets:
        raise ConfigError(
            f"deep_dream {kind}: the selection has no targets (skipped: {plan.skipped}); check the channel "
            "selection, timesteps and start_from/use_prior"
        )
    width = _objective_width(config, kind)
    if width != plan.n_channels:
        raise ValueError(
            f"{plan.analysis_store} has {plan.n_channels} {kind} channels but the "
            f"{'layer ' + config.target_layer_name if kind == 'raw' else 'SAE'} has {width}; "
            "the analysis was made for another layer or SAE"
        )
    spectrum = phase_spectrum(config, kind) if settings.parameterisation == "phase_fourier" else None
    layout.dream_dir(settings.run_name, kind).mkdir(parents=True, exist_ok=True)
    dream = DreamSettings.from_config(settings)
    penalties = penalties_from_config(settings)
    resolved = {k: v for k, v in settings.model_dump(mode="json").items() if k != "sae"}
    stores.create_dream_store(
        path,
        target_channel=np.asarray([c for c, _ in plan.targets], dtype=np.int64),
        target_t=np.asarray([t for _, t in plan.targets], dtype=np.int64),
        seeds=np.asarray(settings.seeds[: settings.n_results], dtype=np.int64),
        steps=np.asarray(dream.snapshot_steps, dtype=np.int64),
        latent_shape=latent_shape(config),
        penalties=[p.name for p in penalties],
        dataset_max_activation=plan.dataset_max,
        attrs={
            **resolved,
            "kind": kind,
            "model": config.model.name,
            "target_layer_name": config.target_layer_name,
            "sae": config.sae.name if kind == "sae" and config.sae else None,
            "sae_hookpoint": config.sae.hookpoint if kind == "sae" and config.sae else None,
            "image_size": config.resolved_image_size,
            "robustness": config.robustness.name,
            "objective": settings.objective or DEFAULT_OBJECTIVE[kind],
            "penalties": {p.name: p.weight for p in penalties},
            "penalty_values": "unweighted",
            "selectivity": SELECTIVITY_RULE,
            "normalization": NORMALIZATION_RULE,
            "timestep_rule": plan.timestep_rule,
            "n_channels": plan.n_channels,
            "analysis_store": str(plan.analysis_store),
            "prior_store": str(plan.prior_store) if plan.prior_store else None,
            "skipped_channels": json.dumps({str(c): why for c, why in plan.skipped.items()}),
            "image_pattern": "images/channel_{channel:05d}_t_{t:04d}_result_{result}.png",
            "snapshot_pattern": "images/snapshots/channel_{channel:05d}_t_{t:04d}_result_{result}_step_{step:04d}.png",
            "attribution_pattern": "images/attribution/channel_{channel:05d}_t_{t:04d}_result_{result}.png",
            "start_pattern": "images/start/channel_{channel:05d}_t_{t:04d}_result_{result}.png",
            "start": start_kind(settings),
            "direction": "minimise" if settings.negative else "maximise",
            "diversity_rule": DIVERSITY_RULE,
            "seed_distance_rule": SEED_DISTANCE_RULE,
            "attribution_rule": ATTRIBUTION_RULE,
            "spectrum_store": str(spectrum) if spectrum else None,
            "mlflow_run_id": mlflow_run_id,
            "mlflow_run_ids": json.dumps([mlflow_run_id] if mlflow_run_id else []),
            "params": json.dumps(params, sort_keys=True),
            "deep_dream_config": json.dumps(settings.model_dump(mode="json"), sort_keys=True),
            "config": json.dumps(config.model_dump(mode="json"), default=str),
        },
    )
    return path


def _reuse_problem(path: Path, params: dict[str, Any]) -> str | None:
    try:
        existing = json.loads(stores.open_store(path).attrs["params"])
    except (KeyError, FileNotFoundError, ValueError):
        return "unreadable or incomplete store"
    differing = sorted(k for k in params if existing.get(k) != params[k])
    if "settings" in differing:
        inner = sorted(k for k in params["settings"] if existing["settings"].get(k) != params["settings"][k])
        differing = [d for d in differing if d != "settings"] + [f"settings.{k}" for k in inner]
    return "differing: " + ", ".join(differing) if differing else None


# --- optimisation -------------------------------------------------------------------------------


def sample_seed(seed: int, channel: int, t: int) -> int:
    """The seed of the generator of sample (target (channel, t), result with `seed`): independent of batching."""
    return int(np.random.SeedSequence([int(seed), int(channel), int(t)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def noise_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """[len(seeds), *shape]: `torch.randn` from `Generator().manual_seed(seed)`, as a generation's first latent."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def spectrum_magnitude(config: ExperimentConfig, kind: Kind) -> torch.Tensor:
    """phase_fourier's fixed magnitude [c, h, w//2+1]: the mean spectrum of real latents (cached by `sources`)."""
    settings = dream_settings(config, kind)
    magnitude = latent_spectrum(config, settings.spectrum_source, kind, settings.spectrum_max_images)
    c, h, w = latent_shape(config)
    if tuple(magnitude.shape) != (c, h, w // 2 + 1):
        raise ConfigError(
            f"stages.deep_dream.spectrum_source: the {settings.spectrum_source} spectrum has shape "
            f"{tuple(magnitude.shape)}, latents of this config ({c}, {h}, {w}) need {(c, h, w // 2 + 1)}"
        )
    return magnitude


def phase_spectrum(config: ExperimentConfig, kind: Kind) -> Path:
    """Compute (once, in the preparing process) or find the cached magnitude of phase-only dreams; its store path."""
    settings = dream_settings(config, kind)
    spectrum_magnitude(config, kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    source = settings.spectrum_source
    return layout.spectrum_store(source, kind if source == "prior" else None)


def dream_parameterisation(config: ExperimentConfig, kind: Kind) -> Parameterisation:
    settings = dream_settings(config, kind)
    if settings.parameterisation == "latent":
        return make_parameterisation("latent")
    return make_parameterisation(settings.parameterisation, spectrum_magnitude(config, kind))


@torch.no_grad()
def decode_minmax(pipe: Any, latents: torch.Tensor, batch: int = DECODE_BATCH) -> list[Image.Image]:
    """Latents -> RGB images with the pipeline's VAE, each min-max normalised to [0, 255]."""
    images: list[Image.Image] = []
    for decoded in decode_latents(pipe, latents, batch):
        decoded = decoded.float()
        low = decoded.flatten(1).amin(1).view(-1, 1, 1, 1)
        high = decoded.flatten(1).amax(1).view(-1, 1, 1, 1)
        scaled = ((decoded - low) / (high - low).clamp_min(1e-8)).nan_to_num(0.0)
        pixels = (scaled * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(p) for p in pixels)
    return images


def attribution_overlay(image: Image.Image, attribution: torch.Tensor, strength: float = 0.6) -> Image.Image:
    """The image blended with the inferno colour of `attribution` [c, h, w] summed over latent channels.

    The map is divided by its maximum (all zero stays zero), upsampled bilinearly to the image and
    used both as the colour and, times `strength`, as the blend weight: where the gradient was
    small the image shows through, where it was largest it is 60 % heat colour.
    """
    from matplotlib import colormaps

    heat = attribution.float().sum(0)
    heat = heat / heat.max() if heat.max() > 0 else torch.zeros_like(heat)
    width, height = image.size
    heat = torch.nn.functional.interpolate(heat[None, None], size=(height, width), mode="bilinear", align_corners=False)
    weight = heat[0, 0].clamp(0, 1).numpy()
    colour = colormaps["inferno"](weight)[..., :3]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    alpha = strength * weight[..., None]
    blended = (1 - alpha) * pixels + alpha * colour
    return Image.fromarray((blended * 255).round().clip(0, 255).astype(np.uint8))


def _target_arrays(
    result: DreamResult, n_targets: int, n_results: int, dataset_max: np.ndarray, start_sample: np.ndarray
) -> dict[str, np.ndarray]:
    def per_target(x: torch.Tensor) -> np.ndarray:
        return x.numpy().reshape(n_targets, n_results, *x.shape[1:])

    activation = per_target(result.activation).astype(np.float64)
    maxima = np.asarray(dataset_max, dtype=np.float64)[:, None]
    valid = np.isfinite(maxima) & (maxima != 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalized = np.where(valid, activation / np.where(valid, maxima, 1.0), np.nan)
    spread = per_target(result.diversity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # one result: all NaN, the mean is NaN
        diversity = np.nanmean(spread, axis=1)
    arrays = {
        "latent": per_target(result.latents),
        "activation": activation,
        "normalized_activation": normalized,
        "selectivity": per_target(result.selectivity),
        "failed_step": per_target(result.failed_step),
        "history_activation": per_target(result.history_activation),
        "attribution": per_target(result.attribution),
        "seed_distance": per_target(result.seed_distance),
        "start_sample": np.asarray(start_sample, dtype=np.int64).reshape(n_targets, n_results),
        "diversity": diversity,
    }
    arrays |= {f"penalty_{name}": per_target(value) for name, value in result.penalties.items()}
    return arrays


def _contiguous_runs(rows: list[int]) -> list[tuple[int, int]]:
    """(position in `rows`, length) of each run of consecutive row numbers."""
    runs: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        if runs and rows[runs[-1][0]] + runs[-1][1] == row:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def contact_sheet(
    layout: stores.ExperimentLayout,
    run: str,
    kind: Kind,
    channels: list[int],
    targets: list[tuple[int, int]],
    n_results: int,
    thumb: int = 128,
) -> Path:
    """A grid of the shard's final images: a row per target, a column per result, labelled channel and t."""
    label = 96
    sheet = Image.new("RGB", (label + n_results * thumb, max(1, len(targets)) * thumb), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (channel, t) in enumerate(targets):
        draw.text((4, r * thumb + thumb // 2 - 6), f"{kind} {channel} t={t}", fill="black")
        for k in range(n_results):
            png = stores.dream_image_path(layout, run, kind, channel, t, k)
            if png.is_file():
                with Image.open(png) as image:
                    sheet.paste(image.convert("RGB").resize((thumb, thumb)), (label + k * thumb, r * thumb))
    path = stores.dream_contact_sheet_path(layout, run, kind, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _metrics(group: Any, rows: list[int]) -> dict[str, float]:
    """Aggregates over the given target rows (done or not: unwritten rows are NaN and ignored)."""
    if not rows:
        return {"targets": 0}
    lo, hi = min(rows), max(rows) + 1
    take = np.asarray(rows) - lo
    activation = group["activation"][lo:hi][take]
    normalized = group["normalized_activation"][lo:hi][take]
    sel = group["selectivity"][lo:hi][take]
    failed = group["failed_step"][lo:hi][take]
    seed_distance = group["seed_distance"][lo:hi][take]
    spread = group["diversity"][lo:hi][take]
    written = np.isfinite(activation)

    def stat(fn: Any, x: np.ndarray) -> float:
        x = x[np.isfinite(x)]
        return float(fn(x)) if x.size else float("nan")

    ok = written & (failed < 0)
    return {
        "targets": len(rows),
        "samples": int(written.sum()),
        "mean_activation": stat(np.mean, activation[ok]),
        "mean_normalized_activation": stat(np.mean, normalized[ok]),
        "median_normalized_activation": stat(np.median, normalized[ok]),
        "mean_selectivity": stat(np.mean, sel[ok]),
        "mean_seed_distance": stat(np.mean, seed_distance[ok]),
        "mean_diversity": stat(np.mean, spread),
        "failed": int((failed >= 0).sum()),
    }


@dataclass
class _Starts:
    """A batch's start latents [B, c, h, w] on the device and the capture sample of each (-1: none)."""

    latents: torch.Tensor
    samples: np.ndarray


@dataclass
class _PriorLatents:
    """The prior store a shard starts from (`start_from=prior`), opened once per shard."""

    path: Path
    group: Any
    row_of: dict[int, int]

    @classmethod
    def open(cls, path: Path) -> _PriorLatents:
        group = stores.open_store(path)
        return cls(path, group, {c: i for i, c in enumerate(group["channel"][:].tolist())})

    def latents(self, kind: Kind, channels: list[int], n_res: int) -> torch.Tensor:
        """[len(channels) * n_res, c, h, w] float32 on the CPU: each channel's first `n_res` priors."""
        parts = []
        for channel in channels:
            latents = self.group["latent"][self.row_of[channel], :n_res]
            if not np.isfinite(latents).all():
                raise RuntimeError(
                    f"the prior of {kind} channel {channel} in {self.path} is not written yet; "
                    "run the prior stage for it first"
                )
            parts.append(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)))
        return torch.cat(parts)


def _batch_starts(
    config: ExperimentConfig,
    kind: Kind,
    settings: DeepDreamConfig,
    targets: list[tuple[int, int]],
    seeds: list[int],
    pipe: Any,
    prior: _PriorLatents | None,
    shape: tuple[int, ...],
) -> _Starts:
    """The start latents of the batch's samples (target-major, results within), by `start_kind` (module docstring)."""
    n_res = len(seeds)
    none = np.full(len(targets) * n_res, -1, dtype=np.int64)
    start = start_kind(settings)
    if start == "prior":
        assert prior is not None
        return _Starts(prior.latents(kind, [c for c, _ in targets], n_res).to(pipe.device), none)
    if start == "noise":
        return _Starts(noise_latents(seeds * len(targets), shape).to(pipe.device), none)  # type: ignore[arg-type]
    clean, samples = example_starts(config, kind, targets, n_res)
    clean = clean.flatten(0, 1).float()
    if settings.see_through_schedule_noise:
        return _Starts(clean, samples.ravel())
    timesteps = [t for _, t in targets for _ in range(n_res)]
    noise_seeds = [sample_seed(s, c, t) for c, t in targets for s in seeds]
    return _Starts(noised(pipe.scheduler, clean, torch.as_tensor(timesteps), noise_seeds), samples.ravel())


def dream_shard(config: ExperimentConfig, kind: Kind, channels: list[int]) -> dict[str, Any]:
    """Optimise every target of `channels` not yet done; write rows, PNGs and a contact sheet.

    Targets are batched `targets_per_batch` at a time (x `n_results` samples). Each target is
    marked done after its rows and images are written, each channel once all its targets are,
    so a rerun optimises only what is missing. Returns `step_metrics` (per-step means over the
    samples optimised here of the activation and each penalty: for MLflow step metrics),
    `metrics` (aggregates over the shard's targets) and the contact sheet path.
    """
    settings = dream_settings(config, kind)
    run = settings.run_name
    layout = stores.ExperimentLayout(config.experiment_dir)
    path = layout.dream_store(run, kind)
    group = stores.open_store(path, mode="r+")
    plan = build_plan(config, kind)
    problem = _reuse_problem(path, _params(config, kind, plan))
    if problem is not None:
        raise DreamStoreMismatch(f"{path} was prepared with other settings ({problem}); run prepare_dream_store")
    target_channel = group["target_channel"][:].tolist()
    target_t = group["target_t"][:].tolist()
    wanted = set(channels)
    rows = [i for i, c in enumerate(target_channel) if c in wanted]
    unknown = sorted(wanted - {target_channel[r] for r in rows})
    if unknown:
        raise ValueError(f"{kind} channels {unknown} have no targets in {path} (skipped or not selected)")
    done_dir = stores.dream_done_dir(layout, run, kind)
    done = stores.dream_done_targets(done_dir)
    todo = [r for r in rows if r not in done]
    seeds = group["seed"][:].tolist()
    n_res = len(seeds)
    dataset_max = group["dataset_max_activation"][:]
    dream = DreamSettings.from_config(settings)
    started = time.perf_counter()
    sums = np.zeros((1 + len(dream.penalty_names), dream.num_steps))
    counts = np.zeros_like(sums)
    device_info: dict[str, str] = {}
    if todo:
        pipe = load_pipeline(config)
        sae = load_experiment_sae(config) if kind == "sae" else None
        amp = autocast_dtype(pipe.device, config.infrastructure.precision)
        if amp == torch.float16:
            dream = DreamSettings.from_config(settings, loss_scale=FP16_LOSS_SCALE)
        device_info = {"device": str(pipe.device), "autocast": str(amp).removeprefix("torch.") if amp else "fp32"}
        activation_fn = LayerActivation(
            pipe.unet,
            config.target_layer_name,
            make_objective(kind, sae, settings.objective, cosine_power=settings.cosine_power),
            empty_prompt_embedding(pipe),
            amp,
        )
        parameterisation = dream_parameterisation(config, kind)
        shape = tuple(group["latent"].shape[2:])
        images_dir = stores.dream_images_dir(layout, run, kind)
        start = start_kind(settings)
        from_examples = start == "example"
        prior = _PriorLatents.open(plan.prior_store) if start == "prior" and plan.prior_store else None
        for folder in ("snapshots", "attribution", *(["start"] if from_examples else [])):
            (images_dir / folder).mkdir(parents=True, exist_ok=True)
        per_batch = settings.targets_per_batch
        batches = [todo[i : i + per_batch] for i in range(0, len(todo), per_batch)]
        for b, batch in enumerate(batches):
            targets = [(target_channel[r], target_t[r]) for r in batch]
            starts = _batch_starts(config, kind, settings, targets, seeds, pipe, prior, shape)
            result = optimise(
                activation_fn,
                starts.latents,
                [c for c, _ in targets for _ in range(n_res)],
                [t for _, t in targets for _ in range(n_res)],
                [sample_seed(s, c, t) for c, t in targets for s in seeds],
                dream,
                add_noise=pipe.scheduler.add_noise,
                groups=[j for j in range(len(targets)) for _ in range(n_res)],
                parameterisation=parameterisation,
            )
            if result.channel_activations.shape[1] != group.attrs["n_channels"]:
                raise ValueError(
                    f"the {kind} objective has width {result.channel_activations.shape[1]}, the store expects "
                    f"{group.attrs['n_channels']} channels"
                )
            curves = [result.step_activation] + [result.step_penalties[n] for n in dream.penalty_names]
            for i, curve in enumerate(curves):
                values = curve.numpy()
                sums[i] += np.nansum(values, axis=1)
                counts[i] += np.isfinite(values).sum(axis=1)
            finals = decode_minmax(pipe, result.latents)
            snaps = decode_minmax(pipe, result.snapshots.flatten(0, 1)) if result.snapshots.shape[1] else []
            start_images = decode_minmax(pipe, result.start_latents) if from_examples else []
            n_snap = result.snapshots.shape[1]
            for j, (channel, t) in enumerate(targets):
                for k in range(n_res):
                    sample = j * n_res + k
                    finals[sample].save(stores.dream_image_path(layout, run, kind, channel, t, k))
                    overlay = attribution_overlay(finals[sample], result.attribution[sample])
                    overlay.save(stores.dream_attribution_path(layout, run, kind, channel, t, k))
                    if start_images:
                        start_images[sample].save(stores.dream_start_image_path(layout, run, kind, channel, t, k))
                    for s, step in enumerate(result.snapshot_steps):
                        snaps[sample * n_snap + s].save(
                            stores.dream_snapshot_path(layout, run, kind, channel, t, k, step)
                        )
            arrays = _target_arrays(result, len(batch), n_res, dataset_max[batch], starts.samples)
            for pos, length in _contiguous_runs(batch):
                stores.write_dream_rows(group, batch[pos], {k: v[pos : pos + length] for k, v in arrays.items()})
            for j, row in enumerate(batch):
                channel, t = targets[j]
                failed = arrays["failed_step"][j]
                stores.mark_dream_target_done(
                    done_dir, row, {"channel": channel, "t": t, "failed_step": failed.tolist(), **device_info}
                )
                done.add(row)
            if (b + 1) % settings.log_every_n_steps == 0 or b + 1 == len(batches):
                n_done = sum(len(x) for x in batches[: b + 1])
                log_progress(log, f"deep_dream {kind}", n_done, len(todo), "targets", started)
    for channel in channels:
        channel_rows = [r for r in rows if target_channel[r] == channel]
        if all(r in done for r in channel_rows):
            stores.mark_dream_channel_done(done_dir, channel, {"channel": channel, "rows": channel_rows})
    seconds = time.perf_counter() - started
    sheet = stores.dream_contact_sheet_path(layout, run, kind, channels)
    if todo or not sheet.is_file():
        targets_here = [(target_channel[r], target_t[r]) for r in rows]
        sheet = contact_sheet(layout, run, kind, channels, targets_here, n_res)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    names = ["activation", *(f"penalty_{n}" for n in dream.penalty_names)]
    metrics = _metrics(group, rows)
    metrics |= {"optimised": len(todo), "seconds": seconds}
    if todo:
        metrics["targets_per_minute"] = 60 * len(todo) / seconds
    return {
        "kind": kind,
        "channels": list(channels),
        "optimised": len(todo),
        "optimised_targets": [(target_channel[r], target_t[r]) for r in todo],
        "skipped": not todo,
        "step_metrics": {name: means[i].tolist() for i, name in enumerate(names)} if todo else {},
        "metrics": metrics,
        "contact_sheet": str(sheet),
    }


def summarise_dreams(config: ExperimentConfig, kind: Kind) -> dict[str, Any]:
    """Aggregates over the store's done targets: mean and median normalised activation, selectivity, failures."""
    settings = dream_settings(config, kind)
    layout = stores.ExperimentLayout(config.experiment_dir)
    path = layout.dream_store(settings.run_name, kind)
    group = stores.open_store(path)
    done = sorted(stores.dream_done_targets(stores.dream_done_dir(layout, settings.run_name, kind)))
    n_targets = group["target_channel"].shape[0]
    summary = _metrics(group, done)
    failed_rows = [r for r in done if (group["failed_step"][r] >= 0).any()]
    return {
        **summary,
        "targets": n_targets,
        "targets_done": len(done),
        "failed_targets": len(failed_rows),
        "store": str(path),
        "mlflow_run_id": group.attrs.get("mlflow_run_id"),
    }


def run_dream(config: ExperimentConfig, kind: Kind, mlflow_run_id: str | None = None) -> dict[str, Any]:
    """The whole stage in this process: plan, prepare, every shard (completed targets are skipped), summary."""
    shards = plan_dream(config, kind)
    path = prepare_dream_store(config, kind, mlflow_run_id)
    results = [dream_shard(config, kind, shard) for shard in shards]
    return {
        "store": str(path),
        "shards": results,
        "optimised": sum(r["optimised"] for r in results),
        "summary": summarise_dreams(config, kind),
        "skipped_channels": {
            int(c): why for c, why in json.loads(stores.open_store(path).attrs["skipped_channels"]).items()
        },
        "contact_sheets": [r["contact_sheet"] for r in results],
    }
