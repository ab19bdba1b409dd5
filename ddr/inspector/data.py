"""Reading an experiment's representation (see `ddr.stages.representation` for the layout).

No Streamlit here: the app, notebooks and tests share it. Paths in the representation are
relative to the experiment folder, so everything resolves against the folder it is opened from
(a copied data root works); an image that is not there resolves to None.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

KINDS = ("raw", "sae")
KIND_LABELS = {"raw": "Raw channels", "sae": "SAE features"}
METRICS = {
    "dream_normalized_activation": "deep dream: normalised activation (best)",
    "dream_selectivity": "deep dream: selectivity (best)",
    "dream_activation": "deep dream: activation (best)",
    "activity": "activity: mean top-k frequency over t",
    "peak_frequency": "activity: peak top-k frequency",
    "max_activation": "max activation over timesteps",
    "n_active_t": "activity: active timesteps",
    "dream_diversity": "deep dream: mean pairwise similarity of a target's seeds (lowest; low = distinct facets)",
    "dream_seed_distance": "deep dream: distance from the seed example (largest)",
    "prior_effect": "prior ablation: mean image change against the baseline",
    "heatmap_max": "heatmaps: highest map value in the top examples",
}
LOWER_FIRST = {"dream_diversity"}  # metrics whose interesting end is the low one


class RepresentationMissing(FileNotFoundError):
    """No representation (or not for this kind); the message says what to run."""


@dataclass
class Example:
    rank: int
    sample: int
    value: float
    prompt: str
    image: Path | None


@dataclass
class MlflowLink:
    """Where to see an MLflow run: a URL for a tracking server, else the run id and the `mlflow ui` command."""

    run_id: str
    url: str | None = None
    command: str | None = None
    hint: str | None = None


def experiment_dir_of(data_root: Path | str, experiment: str) -> Path:
    return Path(data_root) / "experiments" / experiment


def representation_root(experiment_dir: Path | str) -> Path:
    return Path(experiment_dir) / "representation"


def available_kinds(experiment_dir: Path | str) -> dict[str, str | None]:
    """kind -> None when its representation exists, else why not (from the manifest when there is one)."""
    root = representation_root(experiment_dir)
    manifest = root / "index.json"
    reasons: dict[str, str] = {}
    if manifest.is_file():
        reasons = json.loads(manifest.read_text()).get("absent", {})
    out: dict[str, str | None] = {}
    for kind in KINDS:
        if (root / kind / "index.json").is_file():
            out[kind] = None
        elif not root.is_dir():
            out[kind] = f"no representation in {root}; run `ddr run representation`"
        else:
            out[kind] = reasons.get(kind) or f"no {kind} representation in {root}"
    return out


def mlflow_link(
    tracking_uri: str | None,
    run_id: str | None,
    experiment_id: str | None = None,
    *,
    tracking_path_relative: str | None = None,
    experiment_dir: Path | None = None,
) -> MlflowLink | None:
    """For http(s) servers `<uri>/#/experiments/<exp>/runs/<run>`; for sqlite/file stores the `mlflow ui` command.

    A store inside the data root is located relative to the experiment folder, so a copied data
    root points at its own copy of the database.
    """
    if not run_id:
        return None
    uri = tracking_uri or ""
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        if experiment_id:
            return MlflowLink(run_id, url=f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}")
        return MlflowLink(run_id, hint=f"open {uri} and search for run {run_id}")
    if tracking_path_relative and experiment_dir is not None:
        local = (Path(experiment_dir) / tracking_path_relative).resolve()
        uri = f"sqlite:///{local}" if scheme == "sqlite" else local.as_uri()
    command = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri else None
    if experiment_id:
        hint = f"then open http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    else:
        hint = f"then open http://127.0.0.1:5000 and search for run {run_id}"
    return MlflowLink(run_id, command=command, hint=hint)


@dataclass
class Channel:
    """Everything the inspector shows about one channel (or SAE feature)."""

    kind: str
    channel: int
    row: dict[str, Any]
    profile: np.ndarray  # [t]
    max_activation_profile: np.ndarray  # [t]
    max_activation: np.ndarray  # [calls]
    mean_activation: np.ndarray  # [calls]
    frequency: np.ndarray  # [calls]
    timesteps: np.ndarray  # [calls]
    peaks: list[tuple[int, float]]
    top_sample: np.ndarray  # [calls, rank]
    top_value: np.ndarray  # [calls, rank]
    details: dict[str, Any] = field(default_factory=dict)
    view: KindView | None = None

    @property
    def active(self) -> bool:
        return bool(self.row.get("active"))

    @property
    def prior(self) -> dict[str, Any] | None:
        return self.details.get("prior")

    @property
    def dreams(self) -> list[dict[str, Any]]:
        return list(self.details.get("dreams") or [])

    @property
    def heatmaps(self) -> dict[str, list[dict[str, Any]]]:
        """{"examples": [...], "priors": [...]}: where the channel fires in its top examples and priors."""
        found = self.details.get("heatmaps") or {}
        return {"examples": list(found.get("examples") or []), "priors": list(found.get("priors") or [])}

    def heatmap_timesteps(self) -> list[int]:
        """The timesteps (peaks) at which example maps exist, highest first."""
        return sorted({int(e["t"]) for e in self.heatmaps["examples"]}, reverse=True)

    def example_heatmaps(self, call: int) -> dict[int, dict[str, Any]]:
        """sample -> its map at one captured call (empty when the call is not a mapped peak)."""
        return {int(e["sample"]): e for e in self.heatmaps["examples"] if e["call"] == call}

    def prior_heatmaps(self) -> dict[int, dict[str, Any]]:
        """result -> the map of that prior."""
        return {int(entry["result"]): entry for entry in self.heatmaps["priors"]}

    def dream_timesteps(self) -> list[int]:
        return sorted({int(t["t"]) for run in self.dreams for t in run["targets"]})

    def result_timesteps(self) -> list[int]:
        """Timesteps with something to show: captured calls (dataset examples), dream targets, peaks."""
        found = {int(t) for t in self.timesteps} | set(self.dream_timesteps()) | {t for t, _ in self.peaks}
        return sorted(found, reverse=True)

    def calls_near(self, t: int) -> list[int]:
        """The captured UNet calls whose timestep is nearest t (several when a value repeats)."""
        distance = np.abs(self.timesteps - int(t))
        return [int(c) for c in np.flatnonzero(distance == distance.min())]

    def examples(self, call: int) -> list[Example]:
        """The ranked dataset examples at one captured call (highest activation first)."""
        assert self.view is not None
        out = []
        for rank, (sample, value) in enumerate(zip(self.top_sample[call], self.top_value[call], strict=True)):
            if sample < 0:
                continue
            out.append(
                Example(
                    rank=rank,
                    sample=int(sample),
                    value=float(value),
                    prompt=self.view.prompts[int(sample)],
                    image=self.view.path(self.view.images[int(sample)]),
                )
            )
        return out


class KindView:
    """One kind's representation: the index, the dense arrays and the channel files."""

    def __init__(self, experiment_dir: Path | str, kind: str) -> None:
        self.experiment_dir = Path(experiment_dir)
        self.kind = kind
        self.root = representation_root(experiment_dir) / kind
        index_path = self.root / "index.json"
        if not index_path.is_file():
            raise RepresentationMissing(available_kinds(experiment_dir)[kind] or f"{index_path} is missing")
        self.index: dict[str, Any] = json.loads(index_path.read_text())
        self.rows: dict[int, dict[str, Any]] = {int(r["channel"]): r for r in self.index["channels"]}
        self.order: list[int] = [int(r["channel"]) for r in self.index["channels"]]
        self.group = zarr.open_group(str(self.root / self.index.get("store", "channels.zarr")), mode="r")
        self.position = {int(c): i for i, c in enumerate(self.group["channel"][:])}
        self.timesteps = np.asarray(self.group["timestep"][:], dtype=np.int64)
        self.total_timesteps = int(self.index["total_timesteps"])

    @cached_property
    def prompts(self) -> list[str]:
        return [str(p) for p in self.group["prompt"][:]]

    @cached_property
    def images(self) -> list[str]:
        return [str(p) for p in self.group["image"][:]]

    @property
    def active_channels(self) -> list[int]:
        return [c for c in self.order if self.rows[c]["active"]]

    @property
    def dream_runs(self) -> list[dict[str, Any]]:
        return list(self.index.get("dream_runs") or [])

    @property
    def absent(self) -> dict[str, str]:
        return dict(self.index.get("absent") or {})

    @property
    def concepts(self) -> list[dict[str, Any]]:
        """Concept-search rankings: {name, slug, n_concept, n_rest, score, top: [{channel, score, best_timestep}]}."""
        return list(self.index.get("concepts") or [])

    def path(self, relative: str | None, *, folder: bool = False) -> Path | None:
        """An existing file (or folder, such as a Zarr store) for a stored path relative to the experiment folder."""
        if not relative:
            return None
        path = Path(relative)
        path = path if path.is_absolute() else self.experiment_dir / path
        return path if (path.is_dir() if folder else path.is_file()) else None

    def concept_scores(self, concept: dict[str, Any], channels: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """channel -> (timesteps, score per UNet call) from the concept's store; {} without a store."""
        store = self.path(concept.get("store"), folder=True)
        if store is None:
            return {}
        group = zarr.open_group(str(store), mode="r")
        dim = "feature" if "feature" in group else "channel"
        row_of = {int(c): i for i, c in enumerate(group[dim][:])}
        timesteps = np.asarray(group["timestep"][:], dtype=np.int64)
        return {c: (timesteps, np.asarray(group["score"][row_of[c]])) for c in channels if c in row_of}

    def channel(self, channel: int) -> Channel:
        if channel not in self.position:
            ids = self.order
            raise KeyError(
                f"{self.kind} channel {channel} is not in the representation; allowed: {min(ids)}..{max(ids)}"
            )
        i = self.position[channel]
        row = self.rows[channel]
        details = json.loads((self.root / row["file"]).read_text()) if row.get("file") else {}
        peak_t, peak_h = self.group["peak_t"][i], self.group["peak_height"][i]
        return Channel(
            kind=self.kind,
            channel=channel,
            row=row,
            profile=np.asarray(self.group["profile"][i], dtype=np.float64),
            max_activation_profile=np.asarray(self.group["max_activation_profile"][i], dtype=np.float64),
            max_activation=np.asarray(self.group["max_activation"][i], dtype=np.float64),
            mean_activation=np.asarray(self.group["mean_activation"][i], dtype=np.float64),
            frequency=np.asarray(self.group["topk_frequency"][i], dtype=np.float64),
            timesteps=self.timesteps,
            peaks=[(int(t), float(h)) for t, h in zip(peak_t, peak_h, strict=True) if t >= 0],
            top_sample=np.asarray(self.group["top_sample"][i]),
            top_value=np.asarray(self.group["top_value"][i]),
            details=details,
            view=self,
        )

    def neighbour(self, channel: int, step: int, only_active: bool = False) -> int:
        """The channel `step` places away in index order (active first), wrapping around."""
        order = self.active_channels if only_active and self.active_channels else self.order
        if channel not in order:
            return order[0]
        return order[(order.index(channel) + step) % len(order)]

    def metrics_available(self) -> list[str]:
        """The overview metrics that have a value for at least one channel."""
        return [m for m in METRICS if any(r.get(m) is not None for r in self.index["channels"])]

    def overview(self, metric: str, run: str | None = None, only_active: bool = False) -> list[dict[str, Any]]:
        """Channels sorted by a metric (highest first; channels without a value last), for finding interesting ones."""
        rows = []
        for r in self.index["channels"]:
            if only_active and not r["active"]:
                continue
            value = r.get(metric)
            if run is not None and metric.startswith("dream_"):
                value = (r.get("dreams") or {}).get(run, {}).get(metric.removeprefix("dream_"))
            rows.append(
                {
                    "channel": r["channel"],
                    "value": value,
                    "active": r["active"],
                    "peaks": ", ".join(str(p) for p in r["peaks"]),
                    "priors": r["n_priors"],
                    "dreams": r["n_dreams"],
                }
            )
        sign = 1.0 if metric in LOWER_FIRST else -1.0
        rows.sort(key=lambda x: (x["value"] is None, sign * (x["value"] or 0.0), x["channel"]))
        return rows

    def run_overview(self) -> list[dict[str, Any]]:
        """One row per deep-dream run: its settings summary and the means of its per-channel figures."""
        out = []
        for run in self.dream_runs:
            per_channel = [r["dreams"][run["run"]] for r in self.index["channels"] if run["run"] in r.get("dreams", {})]
            row = {"run": run["run"], "settings": run.get("summary") or "plain", "channels": len(per_channel)}
            for metric in ("normalized_activation", "selectivity", "diversity", "seed_distance"):
                values = [c[metric] for c in per_channel if c.get(metric) is not None]
                row[f"mean {metric.replace('_', ' ')}"] = float(np.mean(values)) if values else None
            out.append(row)
        return out

    def mlflow_link(self, run_id: str | None, experiment_id: str | None = None) -> MlflowLink | None:
        info = self.index.get("mlflow") or {}
        return mlflow_link(
            info.get("tracking_uri"),
            run_id,
            experiment_id or info.get("experiment_id"),
            tracking_path_relative=info.get("tracking_path_relative"),
            experiment_dir=self.experiment_dir,
        )
