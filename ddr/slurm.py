"""dask-jobqueue SLURMCluster arguments from the `slurm` block of an infrastructure config.

User- and site-specific values (partition, account, e-mail, group storage) come from the
environment or a `.env` file, as in the original (`${PLG_SLURM_PARTITION}` etc.), so the
committed configs hold no personal data. `$$` is a literal `$` left for the job's shell
(`$${SLURM_CPUS_PER_TASK}` is expanded on the compute node, not where the flow runs).

Besides SLURMCluster's own arguments (`queue`, `account`, `cores`, `memory`, `walltime`,
`job_extra_directives`, `job_script_prologue`, `interface`, `scheduler_options`, ...) the block
takes these ddr keys:

- `gpus_per_job`: the Dask `GPU` resource each worker advertises (GPU tasks ask for 1). The
  `--gres=gpu:N` directive itself belongs in `job_extra_directives`.
- `lifetime_margin` / `lifetime_stagger` / `lifetime`: a worker retires gracefully `lifetime`
  after it starts (default: `walltime - lifetime_margin`), staggered so that workers do not all
  leave at once; adaptive scaling then submits a fresh job and the scheduler reruns any shard the
  retiring worker had not finished. A worker SLURM kills at its walltime instead dies abruptly.
- `allowed_failures`: how many worker deaths a task may see before Dask gives up on it
  (`distributed.scheduler.allowed-failures`; a walltime kill counts as one).
"""

from __future__ import annotations

import os
import re
import shlex
from datetime import timedelta
from pathlib import Path
from typing import Any

from ddr.config import ConfigError, ExperimentConfig

LOOPBACK = "127.0.0.1"
VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
DDR_KEYS = ("gpus_per_job", "lifetime", "lifetime_margin", "lifetime_stagger", "allowed_failures")
DEFAULT_LIFETIME_MARGIN = "5m"
DEFAULT_LIFETIME_STAGGER = "2m"
DEFAULT_ALLOWED_FAILURES = 10
SECRET = re.compile(r"(token|secret|password|passwd|api[_-]?key|credential)", re.IGNORECASE)


def load_env_file(path: Path | str | None = None) -> None:
    """Read `.env` (default: `$DDR_ENV_FILE`, else `./.env`) without overriding what is already set."""
    from dotenv import load_dotenv

    load_dotenv(Path(path or os.environ.get("DDR_ENV_FILE", ".env")), override=False)


def expand(value: Any, key: str) -> Any:
    """Expand $VAR and ${VAR} in strings (recursively); `$$` stays a literal `$` for the job's shell.

    An unset variable is an error naming it and the key.
    """
    if isinstance(value, str):
        missing: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name = match.group(1) or match.group(2)
            if name not in os.environ:
                missing.append(name)
                return match.group(0)
            return os.environ[name]

        expanded = VARIABLE.sub(substitute, value)
        if missing:
            raise ConfigError(
                f"infrastructure.slurm.{key}: environment variable(s) {', '.join(dict.fromkeys(missing))} are not set "
                "(set them in the environment or in .env; see .env.example)"
            )
        return expanded
    if isinstance(value, list):
        return [expand(v, key) for v in value]
    if isinstance(value, dict):
        return {k: expand(v, f"{key}.{k}") for k, v in value.items()}
    return value


def walltime_seconds(walltime: str) -> int:
    """SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    text = str(walltime).strip()
    try:
        days = 0
        if "-" in text:
            day_text, text = text.split("-", 1)
            days = int(day_text)
            parts = [int(p) for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError(text)
            hours, minutes, seconds = [*parts, 0, 0][:3]
        else:
            parts = [int(p) for p in text.split(":")]
            if len(parts) == 1:
                hours, minutes, seconds = 0, parts[0], 0
            elif len(parts) == 2:
                hours, minutes, seconds = 0, parts[0], parts[1]
            elif len(parts) == 3:
                hours, minutes, seconds = parts
            else:
                raise ValueError(text)
    except ValueError:
        raise ConfigError(
            f"infrastructure.slurm.walltime: {walltime!r} is not a SLURM time (MM, HH:MM:SS or D-HH:MM:SS)"
        ) from None
    return int(timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds).total_seconds())


def _seconds(value: Any, key: str) -> int:
    from dask.utils import parse_timedelta

    try:
        return int(parse_timedelta(value, default="s"))
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"infrastructure.slurm.{key}: {value!r} is not a duration such as 90s, 5m or 1h") from None


def lifetime_args(slurm: dict[str, Any]) -> list[str]:
    """`--lifetime`/`--lifetime-stagger` worker arguments so a worker leaves cleanly before its walltime."""
    if slurm.get("lifetime") is None and not slurm.get("walltime"):
        return []
    if slurm.get("lifetime") is not None:
        lifetime = _seconds(slurm["lifetime"], "lifetime")
    else:
        margin = _seconds(slurm.get("lifetime_margin") or DEFAULT_LIFETIME_MARGIN, "lifetime_margin")
        lifetime = walltime_seconds(slurm["walltime"]) - margin
    stagger = _seconds(slurm.get("lifetime_stagger") or DEFAULT_LIFETIME_STAGGER, "lifetime_stagger")
    if lifetime - stagger <= 0:
        raise ConfigError(
            f"infrastructure.slurm: walltime {slurm.get('walltime')!r} leaves no worker lifetime after the margin "
            f"and stagger (lifetime {lifetime}s, stagger {stagger}s); lengthen walltime or shorten lifetime_margin"
        )
    return ["--lifetime", f"{lifetime}s", "--lifetime-stagger", f"{stagger}s"]


def export_lines(env: dict[str, str]) -> list[str]:
    """`export KEY=value` job-script lines; secrets are left to sbatch's environment propagation."""
    return [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items()) if not SECRET.search(k)]


def slurm_cluster_kwargs(config: ExperimentConfig, env: dict[str, str] | None = None) -> dict[str, Any]:
    """SLURMCluster keyword arguments: one worker process per job, GPU resource advertised when it has one.

    `env` is exported at the top of every job script (e.g. the Prefect API the workers report to).
    """
    load_env_file()
    raw = {key: value for key, value in config.infrastructure.slurm.items() if value is not None}
    if "walltime" in raw and not isinstance(raw["walltime"], str):
        raise ConfigError(
            f"infrastructure.slurm.walltime: {raw['walltime']!r} is not a string; quote it "
            "(YAML reads an unquoted 2:00:00 as the number 7200): infrastructure.slurm.walltime='\"2:00:00\"'"
        )
    slurm = {key: expand(value, key) for key, value in raw.items()}
    kwargs = {key: value for key, value in slurm.items() if key not in DDR_KEYS}
    kwargs.setdefault("processes", 1)
    extra = list(kwargs.pop("worker_extra_args", []))
    gpus = int(slurm.get("gpus_per_job") or 0)
    if gpus:
        extra += ["--resources", f"GPU={gpus}"]
    extra += lifetime_args(slurm)
    kwargs["worker_extra_args"] = extra
    kwargs["job_script_prologue"] = export_lines(env or {}) + list(kwargs.get("job_script_prologue", []))
    scheduler = dict(kwargs.pop("scheduler_options", {}) or {})
    scheduler.setdefault("dashboard_address", f"{LOOPBACK}:0")
    kwargs["scheduler_options"] = scheduler
    kwargs.setdefault("log_directory", str((config.data_root / "slurm-logs").resolve()))
    return kwargs


def dask_config(config: ExperimentConfig) -> dict[str, Any]:
    """Dask settings the SLURM scheduler needs: how many worker deaths a task survives."""
    failures = config.infrastructure.slurm.get("allowed_failures", DEFAULT_ALLOWED_FAILURES)
    return {"distributed.scheduler.allowed-failures": int(failures)}
