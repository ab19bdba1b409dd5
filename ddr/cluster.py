"""Dask clusters for each infrastructure: a LocalCluster, one worker per GPU, or SLURM jobs.

The flows hand a `ClusterSpec` to prefect-dask's DaskTaskRunner; this module holds no Prefect.
GPU workers advertise a `GPU` resource, so tasks that need a GPU only run there while CPU
stages may use any worker. Every scheduler and local worker binds to 127.0.0.1; a SLURM
scheduler binds where the profile's `interface`/`scheduler_options` say (compute nodes must
reach it), its dashboard to 127.0.0.1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from ddr.config import ExperimentConfig

LOOPBACK = "127.0.0.1"


@dataclass
class ClusterSpec:
    cluster_class: str
    cluster_kwargs: dict[str, Any]
    adapt_kwargs: dict[str, Any] | None = field(default=None)
    dask_config: dict[str, Any] = field(default_factory=dict)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def uses_gpus(config: ExperimentConfig) -> bool:
    """Whether this infrastructure's workers advertise a `GPU` resource (GPU tasks then ask for one)."""
    infra = config.infrastructure
    if infra.kind == "local-gpus":
        return infra.device != "cpu"
    if infra.kind == "slurm":
        return int(infra.slurm.get("gpus_per_job") or 0) > 0
    return False


def _thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def cluster_spec(config: ExperimentConfig, workers: int, env: dict[str, str] | None = None) -> ClusterSpec:
    """How to build this infrastructure's Dask cluster; `env` is set in every worker process."""
    infra = config.infrastructure
    env = dict(env or {})
    if infra.kind == "local":
        cores = os.cpu_count() or 1
        # Threads of one process share its models (and their hooks), so in-process means one worker.
        workers = max(1, min(workers, cores)) if infra.processes else 1
        threads = infra.threads_per_worker or max(1, cores // workers)
        kwargs: dict[str, Any] = {
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": infra.processes,
            "host": LOOPBACK,
            "protocol": "tcp://",  # also for in-process workers: inproc:// would look up a routable IP
            "dashboard_address": f"{LOOPBACK}:0",
        }
        if infra.processes:
            kwargs["env"] = {**_thread_env(threads), **env}
        if infra.memory_limit:
            kwargs["memory_limit"] = infra.memory_limit
        return ClusterSpec("distributed.LocalCluster", kwargs)
    if infra.kind == "local-gpus":
        n_gpus = infra.n_workers or visible_gpus()
        threads = infra.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, n_gpus))
        kwargs = {"n_gpus": n_gpus, "env": {**_thread_env(threads), **env}}
        if infra.memory_limit:
            kwargs["memory_limit"] = infra.memory_limit
        return ClusterSpec("ddr.cluster.local_gpu_cluster", kwargs)
    from ddr.slurm import dask_config, slurm_cluster_kwargs

    return ClusterSpec(
        "dask_jobqueue.SLURMCluster",
        slurm_cluster_kwargs(config, env),
        {"minimum": infra.adapt_minimum, "maximum": infra.adapt_maximum},
        dask_config(config),
    )


def gpu_ids(n_gpus: int) -> list[str]:
    """The device of each GPU worker: the first n of this process's CUDA_VISIBLE_DEVICES (or 0..n-1)."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible:
        return [str(i) for i in range(n_gpus)]
    if n_gpus > len(visible):
        raise RuntimeError(
            f"infrastructure local-gpus: n_workers={n_gpus} but CUDA_VISIBLE_DEVICES={','.join(visible)} "
            f"shows {len(visible)} device(s)"
        )
    return visible[:n_gpus]


def local_gpu_cluster(n_gpus: int, env: dict[str, str] | None = None, memory_limit: str | None = None) -> Any:
    """One single-threaded worker process per GPU, each seeing only its own device."""
    from distributed import Nanny, Scheduler, SpecCluster

    if n_gpus < 1:
        raise RuntimeError("infrastructure local-gpus: no CUDA device is visible")
    options: dict[str, Any] = {"nthreads": 1, "resources": {"GPU": 1}, "host": LOOPBACK}
    if memory_limit:
        options["memory_limit"] = memory_limit
    devices = gpu_ids(n_gpus)
    workers = {
        f"gpu-{i}": {"cls": Nanny, "options": {**options, "env": {**(env or {}), "CUDA_VISIBLE_DEVICES": device}}}
        for i, device in enumerate(devices)
    }
    scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}}
    return SpecCluster(workers=workers, scheduler=scheduler)
