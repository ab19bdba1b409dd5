"""MLflow tracking: one run per stage execution, the resolved config as params.

The tracking URI comes from the config, else `MLFLOW_TRACKING_URI`, else an embedded sqlite
store in the data root with artifacts beside it, so a laptop needs no server and a cluster can
point every worker at a shared one. Secrets never become params: keys that look like
credentials are dropped and a URI's user:password part is removed.
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from ddr.config import ExperimentConfig, flatten

SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)
MAX_PARAM_LENGTH = 6000


def tracking_uri(config: ExperimentConfig) -> str:
    uri = config.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{config.data_root.resolve() / 'mlflow.db'}"


def experiment_name(config: ExperimentConfig) -> str:
    return config.mlflow.experiment or f"ddr-{config.experiment_name}"


def redact_uri(uri: str) -> str:
    """The URI without its user:password part, for logs and params."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def safe_params(config: ExperimentConfig) -> dict[str, str]:
    """The resolved config as flat params, without anything that looks like a secret."""
    params = {}
    for key, value in flatten(config).items():
        if SECRET_KEY.search(key):
            continue
        if "://" in value:
            value = redact_uri(value)
        params[key] = value[:MAX_PARAM_LENGTH]
    return params


def _ensure_experiment(config: ExperimentConfig) -> str:
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(config))
    # mlflow also exports the URI to the environment; restore the user's, so that a later config in this
    # process (another data root) does not inherit this one's store.
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous
    name = experiment_name(config)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri(config).startswith("sqlite:"):
        artifacts = (config.data_root / "mlartifacts").resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        location = artifacts.as_uri()
    return mlflow.create_experiment(name, artifact_location=location)


@contextmanager
def stage_run(
    config: ExperimentConfig,
    stage: str,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run for one stage execution, with the resolved config (and extra params) logged."""
    import mlflow

    config.data_root.mkdir(parents=True, exist_ok=True)
    experiment_id = _ensure_experiment(config)
    run_tags = {"ddr.stage": stage, "ddr.experiment": config.experiment_name, **(tags or {})}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, tags=run_tags, nested=bool(parent_run_id)
    ) as run:
        items = list({**safe_params(config), **{k: str(v) for k, v in (params or {}).items()}}.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start : start + 100]))
        yield run


def contact_sheet(images: Sequence[Image.Image | Path], columns: int = 8, size: int = 128) -> Image.Image:
    """A grid of thumbnails, for a quick look at a stage's outputs in the MLflow UI."""
    loaded = [Image.open(i).convert("RGB") if isinstance(i, Path) else i.convert("RGB") for i in images]
    columns = max(1, min(columns, len(loaded)))
    rows = max(1, math.ceil(len(loaded) / columns))
    sheet = Image.new("RGB", (columns * size, rows * size), "white")
    for index, image in enumerate(loaded):
        thumb = image.resize((size, size))
        sheet.paste(thumb, ((index % columns) * size, (index // columns) * size))
    return sheet
