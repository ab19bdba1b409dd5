"""The experiment configuration: one pydantic schema, composed from the YAML groups in `configs/`.

A config is built from `configs/config.yaml`, whose group fields (`model`, `sae`,
`infrastructure`, `robustness`) name files in `configs/<group>/`, then from command-line
overrides: `group=name` picks another file of a group, and dotted `key=value` sets any field
(`stages.capture.num_images_per_prompt=2`, `model.revision=main`). Everything is validated
before any work starts; an error names the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_DIR = Path(os.environ.get("DDR_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))
GROUP_FOLDERS = {
    "dataset": "datasets",
    "model": "models",
    "sae": "saes",
    "infrastructure": "infrastructure",
    "robustness": "robustness",
}
GROUPS = ("model", "sae", "infrastructure", "robustness")
DEFAULT_SEEDS = [1024, 1111, 4359, 3248, 1026]


class ConfigError(ValueError):
    """A config value a user gave is wrong; the message says which, what it was and what is allowed."""


class Strict(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AssetSource(Strict):
    """Where an asset comes from. `provision` turns it into a folder under `<data_root>/assets/`."""

    name: str
    source: Literal["generated", "hub", "url", "gdrive", "local"]
    generator: str | None = Field(None, description="generated assets: the generator's name")
    generator_args: dict[str, Any] = Field(default_factory=dict)
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    allow_patterns: list[str] | None = None
    repo_type: Literal["model", "dataset"] = "model"
    url: str | None = None
    sha256: str | None = None
    gdrive_id: str | None = None
    gdrive_folder: bool = False
    path: Path | None = None

    @model_validator(mode="after")
    def _source_fields(self) -> AssetSource:
        needed = {
            "generated": "generator",
            "hub": "repo_id",
            "url": "url",
            "gdrive": "gdrive_id",
            "local": "path",
        }[self.source]
        if getattr(self, needed) in (None, ""):
            raise ValueError(f"asset {self.name!r} has source {self.source!r} and needs {needed!r}")
        return self


class ModelConfig(AssetSource):
    image_size: int = Field(512, gt=0, description="default image size in pixels")
    base_model: str | None = Field(
        None, description="model whose components fill in what this asset lacks (e.g. a UNet-only fine-tune)"
    )


class SaeConfig(AssetSource):
    hookpoint: str = Field("unet.up_blocks.1.attentions.1", description="subfolder of the SAE asset")


class DatasetConfig(AssetSource):
    file: str | None = Field(None, description="prompt file inside the asset folder (default: the only file)")
    format: Literal["auto", "jsonl", "text"] = "auto"
    text_field: str = "text"


class Overridable(Strict):
    """A stage config with an `sae` block: values that replace this stage's fields for SAE features."""

    sae: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_sae_block(self) -> Overridable:
        unknown = set(self.sae) - (set(type(self).model_fields) - {"sae"})
        if unknown:
            raise ValueError(
                f"unknown keys in the sae override block: {sorted(unknown)}; "
                f"allowed: {sorted(set(type(self).model_fields) - {'sae'})}"
            )
        if self.sae:
            self.for_kind("sae")
        return self

    def for_kind(self, kind: Literal["raw", "sae"]) -> Overridable:
        """This stage's settings for raw channels, or with the `sae` block applied."""
        if kind == "raw" or not self.sae:
            return self
        return type(self).model_validate({**self.model_dump(exclude={"sae"}), **self.sae, "sae": {}})


class CaptureConfig(Overridable):
    prompt_dataset: str = Field("demo", description="a dataset name from configs/datasets/ or a prompt file path")
    num_images_per_prompt: int = Field(1, gt=0)
    batch_size: int = Field(1, gt=0, description="samples per pipeline call")
    num_workers: int | None = Field(None, gt=0, description="Dask workers for this stage (None: infrastructure's)")
    log_every_n_steps: int = Field(1, gt=0, description="log progress every n batches")
    dev_n_prompts: int | None = Field(None, gt=0, description="use only the first n prompts (debugging)")
    samples_per_shard: int = Field(16, gt=0, description="samples per shard; also the store's sample chunk")
    seed: int = Field(0, ge=0, description="sample i draws its initial latent from torch.Generator(seed + i)")
    branch: Literal["conditional", "unconditional"] = "conditional"
    store_dtype: Literal["float32", "float16"] = "float32"
    save_images: bool = True
    overwrite: bool = Field(False, description="replace a store made with different settings")


class TimestepAnalysisConfig(Overridable):
    top_k: int = Field(20, gt=0, description="a channel is active in a sample if it is among its top k")
    total_timesteps: int = Field(1000, gt=0)
    peak_threshold: float = 0.0
    peak_separation: int = Field(100, gt=0)
    top_peak_count: int = Field(3, gt=0)
    top_examples: int = Field(20, gt=0, description="ranked dataset examples kept per channel and timestep")
    capture_results_dir: Path | None = Field(
        None, description="capture folder to read (relative to the experiment folder or absolute; default: capture)"
    )
    chunk_samples: int = Field(256, gt=0, description="samples read per chunk: bounds memory")
    channel_block: int = Field(4096, gt=0, description="channels per task")


class PlotsConfig(Overridable):
    frame_duration: float = Field(2.0, gt=0, description="seconds per GIF frame")
    timestep_analysis_results_dir: Path | None = Field(None, description="default: this experiment's analysis")
    channels_per_shard: int = Field(64, gt=0)
    dpi: int = Field(80, gt=0)


class ChannelSelection(Overridable):
    start_channel: int | None = Field(None, ge=0)
    end_channel: int | None = Field(None, ge=0)
    channels: list[int] | None = None

    @model_validator(mode="after")
    def _range(self) -> ChannelSelection:
        if self.start_channel is not None and self.end_channel is not None and self.end_channel <= self.start_channel:
            raise ValueError(
                f"end_channel ({self.end_channel}) must be greater than start_channel ({self.start_channel})"
            )
        if self.channels is not None and (self.start_channel is not None or self.end_channel is not None):
            raise ValueError(
                f"set either channels or start_channel/end_channel, not both (got channels={self.channels}, "
                f"start_channel={self.start_channel}, end_channel={self.end_channel})"
            )
        if self.channels is not None and not self.channels:
            raise ValueError("channels: the list is empty")
        return self

    def select(self, channel_ids: Sequence[int], key: str, where: str) -> np.ndarray:
        """The selected ids (ascending): `channels`, or positions [start_channel, end_channel) of `channel_ids`.

        `key` (e.g. "stages.prior") and `where` (the store the ids come from) make errors name what was wrong.
        """
        ids = np.asarray(channel_ids, dtype=np.int64)
        n = len(ids)
        allowed = f"allowed: {ids.min()}..{ids.max()} ({n} channels in {where})" if n else f"{where} has no channels"
        if self.channels is not None:
            chosen = np.unique(np.asarray(self.channels, dtype=np.int64))
            outside = sorted(set(chosen.tolist()) - set(ids.tolist()))
            if outside:
                raise ConfigError(f"{key}.channels: {outside} out of range; {allowed}")
            return chosen
        start = self.start_channel or 0
        end = n if self.end_channel is None else self.end_channel
        if start >= n:
            raise ConfigError(f"{key}.start_channel: {start} is out of range; {allowed}")
        if end > n:
            raise ConfigError(f"{key}.end_channel: {end} is out of range (exclusive end, at most {n}); {allowed}")
        return np.sort(ids[start:end])


class PriorConfig(ChannelSelection):
    timesteps: Literal["active_timesteps", "all_timesteps", "activity_peaks"] = "active_timesteps"
    n_results: int = Field(5, gt=0)
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS))
    steer_strength_scale: float = 50.0
    sae: dict[str, Any] = Field(default_factory=lambda: {"steer_strength_scale": 500.0})
    channels_per_batch: int = Field(4, gt=0, description="channels steered together in one pipeline call")
    channels_per_shard: int = Field(16, gt=0)
    log_every_n_steps: int = Field(10, gt=0)
    timestep_analysis_results_dir: Path | None = None
    steer_mode: Literal["add", "replace", "cfg_aware", "ablate"] = Field(
        "add",
        description="add: +s*direction; replace: the channel (SAE code) becomes s; cfg_aware: +s on the conditional, "
        "-s on the unconditional CFG half; ablate: remove the feature (SAE error kept; raw: channel = 0; no strength)",
    )
    steer_start_t: int | None = Field(None, ge=0, description="steer only at calls with t <= this (None: no limit)")
    steer_end_t: int | None = Field(None, ge=0, description="steer only at calls with t >= this (None: no limit)")
    prompt: str = Field("", description="the prompt of every generation (prompt_source=prompt)")
    guidance_scale: float = Field(1.0, ge=0, description="classifier-free guidance of the generations (> 1: on)")
    prompt_source: Literal["prompt", "top_examples"] = Field(
        "prompt",
        description="prompt: `prompt` with `seeds`; top_examples: result k regenerates the channel's k-th top "
        "dataset example (its capture prompt and seed) at its peak call",
    )

    @model_validator(mode="after")
    def _enough_seeds(self) -> PriorConfig:
        if self.prompt_source == "prompt" and len(self.seeds) < self.n_results:
            raise ValueError(f"n_results ({self.n_results}) needs at least that many seeds, got {len(self.seeds)}")
        if self.steer_start_t is not None and self.steer_end_t is not None and self.steer_start_t < self.steer_end_t:
            raise ValueError(
                f"steer_start_t ({self.steer_start_t}) must be >= steer_end_t ({self.steer_end_t}): denoising runs "
                "from high t to low t, so the window starts at the larger t"
            )
        if self.steer_mode == "cfg_aware" and self.guidance_scale <= 1.0:
            raise ValueError(
                f"steer_mode=cfg_aware needs classifier-free guidance: guidance_scale > 1 (got {self.guidance_scale})"
            )
        return self


TimestepChoice = int | Literal["activity_peaks", "active_timesteps"]


class DeepDreamConfig(ChannelSelection):
    objective: Literal["channel_mean", "sae_mean", "sae_pre_activation_mean", "sae_dot_cosine"] | None = Field(
        None,
        description="what is maximised (None: channel_mean for raw channels, sae_mean for SAE features; "
        "sae_pre_activation_mean and sae_dot_cosine give a dead-at-start feature a gradient)",
    )
    cosine_power: float = Field(
        1.0, ge=0, description="p of sae_dot_cosine: dot x max(cosine, 0.1)^p with the decoder direction"
    )
    negative: bool = Field(False, description="minimise the activation instead (the negative view)")
    diversity_penalty_weight: float = Field(
        0.0, ge=0, description="weight of the Gram-matrix diversity penalty over a target's n_results samples"
    )
    start_from: Literal["prior", "noise", "example"] | None = Field(
        None, description="start latents (None: use_prior decides); example: the channel's top dataset examples"
    )
    seed_distance_penalty_weight: float = Field(
        0.0, ge=0, description="weight of the mean squared distance of the latent to its start latent"
    )
    seed_distance_max: float | None = Field(
        None, gt=0, description="project each step's latent into this L2 ball around its start latent (None: off)"
    )
    parameterisation: Literal["latent", "phase_fourier"] = Field(
        "latent", description="latent: optimise the latent; phase_fourier: its Fourier phase, magnitude fixed"
    )
    spectrum_source: Literal["capture", "prior"] = Field(
        "capture", description="phase_fourier's magnitude: mean spectrum of the capture images' or the priors' latents"
    )
    spectrum_max_images: int = Field(64, gt=0, description="latents averaged into phase_fourier's magnitude")
    timesteps: list[TimestepChoice] = Field(default_factory=lambda: [0, "activity_peaks"])
    use_just_one_timestep: bool = False
    see_through_schedule_noise: bool = True
    use_prior: bool = True
    total_variation_penalty_weight: float = Field(0.5, ge=0)
    range_penalty_weight: float = Field(0.5, ge=0)
    range_penalty_threshold: float = Field(3.0, gt=0)
    moment_penalty_weight: float = Field(0.0, ge=0)
    gradient_smoothing_sigma_start: float = Field(0.5, ge=0)
    gradient_smoothing_sigma_end: float = Field(0.0, ge=0)
    gradient_smoothing_kernel_size: int = Field(9, gt=0)
    use_gradient_spectral_filtering: bool = True
    jitter_max: int = Field(1, ge=0)
    rotate_max: float = Field(5.0, ge=0)
    scale_max: float = Field(1.1, ge=1.0)
    num_steps: int = Field(100, gt=0)
    learning_rate: float = Field(0.05, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    n_results: int = Field(5, gt=0)
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS))
    log_every_n_steps: int = Field(10, gt=0)
    intermediate_opt_results_every_n_steps: int = Field(10, gt=0, description="snapshot interval")
    targets_per_batch: int = Field(8, gt=0)
    channels_per_shard: int = Field(16, gt=0)
    run_name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    prior_results_dir: Path | None = None
    timestep_analysis_results_dir: Path | None = None
    sae: dict[str, Any] = Field(
        default_factory=lambda: {
            "total_variation_penalty_weight": 0.0,
            "moment_penalty_weight": 0.5,
            "gradient_smoothing_sigma_start": 0.0,
        }
    )

    @field_validator("gradient_smoothing_kernel_size")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd (a centred Gaussian kernel)")
        return v


class HeatmapsConfig(ChannelSelection):
    top_examples: int = Field(
        4, gt=0, description="ranked dataset examples mapped per peak (at most the analysis store's top_examples)"
    )
    peaks: int = Field(1, gt=0, description="the channel's highest peaks mapped (at most the analysis's peak count)")
    include_priors: bool = Field(True, description="also map each prior result, noised to the channel's first peak")
    samples_per_batch: int = Field(8, gt=0, description="samples per pipeline call (and prior maps per UNet forward)")
    channels_per_shard: int = Field(
        256, gt=0, description="channels per task; a task regenerates each of its channels' samples once"
    )
    timestep_analysis_results_dir: Path | None = Field(None, description="default: this experiment's analysis")
    prior_results_dir: Path | None = Field(None, description="a priors.zarr or prior folder (default: this experiment)")
    overlay_alpha: float = Field(0.5, ge=0, le=1, description="opacity of the heat colour map over the image")


class RepresentationConfig(Strict):
    timestep_analysis_results_dir: Path | None = None
    prior_results_dir: Path | None = None
    deep_dream_results_dir_noise: Path | None = Field(None, description="a deep-dream run folder (default: all runs)")
    deep_dream_results_dir_no_noise: Path | None = None
    channels_per_shard: int = Field(512, gt=0)


class ConceptSearchConfig(Overridable):
    concepts: list[str] = Field(
        default_factory=list,
        description="phrases; a concept's samples are the capture prompts holding the phrase as whole words "
        "(any case), the rest are the other samples ([]: nothing to search)",
    )
    concept_prompts: dict[str, list[str]] = Field(
        default_factory=dict,
        description="named prompt lists; captured samples of these prompts are the concept, prompts not in the "
        "dataset are generated with the capture settings (samples_per_prompt seeds each)",
    )
    samples_per_prompt: int = Field(4, gt=0, description="samples generated per concept prompt not in the dataset")
    top: int = Field(50, gt=0, description="channels listed in each concept's JSON summary")
    chunk_samples: int | None = Field(
        None, gt=0, description="samples read per chunk: bounds memory (None: stages.timestep_analysis.chunk_samples)"
    )
    capture_results_dir: Path | None = Field(
        None, description="capture folder to read (relative to the experiment folder or absolute; default: capture)"
    )

    @model_validator(mode="after")
    def _named_concepts(self) -> ConceptSearchConfig:
        names = [*self.concepts, *self.concept_prompts]
        blank = [c for c in names if not c.strip()]
        if blank:
            raise ValueError(f"concept names must not be blank (got {blank})")
        repeated = sorted({c for c in names if names.count(c) > 1})
        if repeated:
            raise ValueError(f"concepts {repeated} are named more than once (in concepts or concept_prompts)")
        empty = sorted(n for n, ps in self.concept_prompts.items() if not ps or not all(map(str.strip, ps)))
        if empty:
            raise ValueError(f"concept_prompts {empty}: each needs a list of non-blank prompts")
        shared = sorted(set(self.sae) - {"top", "chunk_samples"})
        if shared:
            raise ValueError(f"sae block: {shared} are the same for both kinds; allowed: ['chunk_samples', 'top']")
        return self


class StagesConfig(Strict):
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    timestep_analysis: TimestepAnalysisConfig = Field(default_factory=TimestepAnalysisConfig)
    heatmaps: HeatmapsConfig = Field(default_factory=HeatmapsConfig)
    plots: PlotsConfig = Field(default_factory=PlotsConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    deep_dream: DeepDreamConfig = Field(default_factory=DeepDreamConfig)
    representation: RepresentationConfig = Field(default_factory=RepresentationConfig)
    concept_search: ConceptSearchConfig = Field(default_factory=ConceptSearchConfig)


class InfrastructureConfig(Strict):
    name: str
    kind: Literal["local", "local-gpus", "slurm"] = "local"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    n_workers: int | None = Field(None, gt=0, description="Dask workers (None: sized to the machine)")
    threads_per_worker: int | None = Field(None, gt=0)
    processes: bool = True
    memory_limit: str | None = None
    slurm: dict[str, Any] = Field(default_factory=dict, description="dask-jobqueue SLURMCluster arguments")
    adapt_minimum: int = Field(0, ge=0)
    adapt_maximum: int = Field(4, ge=1)
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="dotted defaults for this infrastructure, applied before the command line's",
    )


class RobustnessConfig(Strict):
    name: str
    jitter_max: int = Field(ge=0)
    rotate_max: float = Field(ge=0)
    scale_max: float = Field(ge=1.0)


class MlflowConfig(Strict):
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite in data_root")
    experiment: str | None = Field(None, description="default: the experiment name")


class ExperimentConfig(Strict):
    data_root: Path = Path("./ddr-data")
    experiment_name: str = Field("default", pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig
    sae: SaeConfig | None = None
    use_sae: bool = False
    target_layer_name: str = "up_blocks.1.attentions.1"
    infrastructure: InfrastructureConfig
    robustness: RobustnessConfig
    num_inference_steps: int = Field(50, gt=0)
    guidance_scale: float = Field(7.5, ge=0)
    image_size: int | None = Field(None, gt=0, description="pixels (default: the model's)")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)

    @model_validator(mode="after")
    def _sae_present(self) -> ExperimentConfig:
        if self.use_sae and self.sae is None:
            raise ValueError("use_sae is true but no sae is configured (set sae=<name> or use_sae=false)")
        size = self.image_size or self.model.image_size
        if size % 8:
            raise ValueError(f"image_size {size} is not a multiple of 8 (the VAE's downsampling factor)")
        return self

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or self.model.image_size

    def require_kind(self, kind: str) -> None:
        """Fail clearly for an unknown kind, or for SAE features without an SAE."""
        if kind not in ("raw", "sae"):
            raise ConfigError(f"kind: {kind!r} is not a kind of activation; allowed: raw, sae")
        if kind == "sae" and not (self.use_sae and self.sae is not None):
            raise ConfigError("kind 'sae' needs an SAE: set use_sae=true and sae=<name>")

    @property
    def kinds(self) -> list[Literal["raw", "sae"]]:
        """The activation kinds this experiment records: raw channels, and SAE features if configured."""
        return ["raw", "sae"] if self.use_sae else ["raw"]

    @property
    def experiment_dir(self) -> Path:
        return self.data_root / "experiments" / self.experiment_name

    @property
    def assets_dir(self) -> Path:
        return self.data_root / "assets"


def available(group: str) -> list[str]:
    folder = CONFIG_DIR / GROUP_FOLDERS.get(group, group)
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_group(group: str, name: str) -> dict[str, Any]:
    """The YAML of one group member, e.g. `load_group("model", "tiny")`."""
    folder = CONFIG_DIR / GROUP_FOLDERS.get(group, group)
    path = folder / f"{name}.yaml"
    if not path.is_file():
        options = available(group)
        close = difflib.get_close_matches(name, options, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{group}: unknown value {name!r}{hint}; allowed: {', '.join(options)}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", name)
    return data


def parse_value(text: str) -> Any:
    """A command-line value as YAML: `2` is an int, `[1, 2]` a list, `null` None, `a,b` a string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part!r} is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


ENV_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _load_env_file() -> None:
    """Site variables (`.env` as in the original) fill ${VAR} in infrastructure configs; the environment wins."""
    from dotenv import load_dotenv

    load_dotenv(Path(".env"), override=False)


def _expand_env(value: Any, key: str) -> Any:
    """${VAR} expanded from the environment; an unset variable is an error naming it and the key."""
    if not isinstance(value, str):
        return value
    missing = [a or b for a, b in ENV_VARIABLE.findall(value) if (a or b) not in os.environ]
    if missing:
        raise ConfigError(
            f"{key}: environment variable(s) {', '.join(dict.fromkeys(missing))} are not set "
            "(set them in the environment or in .env; see .env.example)"
        )
    return os.path.expandvars(value)


def split_overrides(overrides: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"override {item!r} has an empty key")
        pairs.append((key.strip(), value))
    return pairs


def compose(overrides: list[str] | None = None, base: Path | None = None) -> dict[str, Any]:
    """The raw config tree: base YAML, then group choices, then infrastructure defaults, then dotted overrides."""
    base_path = base or CONFIG_DIR / "config.yaml"
    if not base_path.is_file():
        raise ConfigError(f"config file {base_path} does not exist")
    tree: dict[str, Any] = yaml.safe_load(base_path.read_text()) or {}
    stages = tree.setdefault("stages", {})
    for stage in StagesConfig.model_fields:
        path = CONFIG_DIR / "stages" / f"{stage}.yaml"
        if path.is_file():
            stages[stage] = _merge(yaml.safe_load(path.read_text()) or {}, stages.get(stage) or {})
    pairs = split_overrides(overrides or [])
    for key, value in pairs:
        if key in GROUPS:
            tree[key] = parse_value(value)
    for group in GROUPS:
        choice = tree.get(group)
        if isinstance(choice, str):
            tree[group] = load_group(group, choice)
        elif choice is not None and not isinstance(choice, dict):
            raise ConfigError(f"{group}: {choice!r} is not a name from configs/{GROUP_FOLDERS[group]}/")
    robustness = tree.get("robustness") or {}
    for field in ("jitter_max", "rotate_max", "scale_max"):
        if field in robustness:
            set_dotted(tree, f"stages.deep_dream.{field}", robustness[field])
    overrides_of_infrastructure = (tree.get("infrastructure") or {}).get("overrides", {})
    if overrides_of_infrastructure:
        _load_env_file()
    for key, value in overrides_of_infrastructure.items():
        set_dotted(tree, key, _expand_env(value, f"infrastructure.overrides.{key}"))
    for key, value in pairs:
        if key not in GROUPS:
            set_dotted(tree, key, parse_value(value))
    return tree


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the field at `loc`, for suggesting near names."""
    model: type[BaseModel] | None = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(part) if model and isinstance(part, str) else None
        if field is None:
            return None
        candidates = getattr(field.annotation, "__args__", (field.annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        key = ".".join(str(p) for p in loc) or "config"
        if item["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            fields = list(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), fields, n=3)
            hint = f"did you mean {', '.join(close)}?" if close else f"allowed: {', '.join(fields)}"
            lines.append(f"{key}: unknown key; {hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            value = item.get("input")
            lines.append(f"{key}: {message}" + ("" if isinstance(value, dict) else f" (got {value!r})"))
    return "invalid config:\n  " + "\n  ".join(lines)


def load_config(overrides: list[str] | None = None, base: Path | None = None) -> ExperimentConfig:
    """Compose and validate the experiment config; raises ConfigError with every problem listed."""
    tree = compose(overrides, base)
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(_format_errors(error)) from None


def flatten(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted key -> string value, for MLflow params and store attributes."""
    data = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat
