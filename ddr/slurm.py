"""dask-jobqueue SLURMCluster arguments from the `slurm` block of an infrastructure config.

User- and site-specific values (partition, account, e-mail, group storage) come from the
environment or a `.env` file, as in the original (`${PLG_SLURM_PARTITION}` etc.), so the
committed configs hold no personal data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ddr.config import ConfigError, ExperimentConfig

UNSET = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def load_env_file(path: Path = Path(".env")) -> None:
    """Read `.env` into the environment without overriding what is already set."""
    from dotenv import load_dotenv

    load_dotenv(path, override=False)


def expand(value: Any, key: str) -> Any:
    """Expand ${VAR} in strings (recursively); an unset variable is an error naming it and the key."""
    if isinstance(value, str):
        expanded = os.path.expandvars(value)
        missing = UNSET.findall(expanded)
        if missing:
            raise ConfigError(
                f"infrastructure.slurm.{key}: environment variable(s) {', '.join(missing)} are not set "
                "(set them in the environment or in .env; see .env.example)"
            )
        return expanded
    if isinstance(value, list):
        return [expand(v, key) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, f"{key}.{k}") for k, v in value.items()}
    return value


def slurm_cluster_kwargs(config: ExperimentConfig) -> dict[str, Any]:
    """SLURMCluster keyword arguments: one worker process per job, GPU resource advertised when it has one."""
    load_env_file()
    kwargs = {key: expand(value, key) for key, value in config.infrastructure.slurm.items() if value is not None}
    kwargs.setdefault("processes", 1)
    extra = list(kwargs.pop("worker_extra_args", []))
    gpus = int(kwargs.pop("gpus_per_job", 0))
    if gpus:
        extra += ["--resources", f"GPU={gpus}"]
    kwargs["worker_extra_args"] = extra
    return kwargs
