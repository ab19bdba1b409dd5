"""Dask clusters for each infrastructure: a LocalCluster, one worker per GPU, or SLURM jobs.

The flows hand a `ClusterSpec` to prefect-dask's DaskTaskRunner; this module holds no Prefect.
GPU workers advertise a `GPU` resource, so tasks that need a GPU only run there while CPU
stages may use any worker.
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


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def uses_gpus(config: ExperimentConfig) -> bool:
    return config.infrastructure.kind in ("local-gpus", "slurm") and config.infrastructure.device != "cpu"


def _thread_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def cluster_spec(config: ExperimentConfig, workers: int) -> ClusterSpec:
    infra = config.infrastructure
    if infra.kind == "local":
        cores = os.cpu_count() or 1
        workers = max(1, min(workers, cores))
        threads = infra.threads_per_worker or max(1, cores // workers)
        kwargs: dict[str, Any] = {
            "n_workers": workers,
            "threads_per_worker": 1,
            "processes": infra.processes,
            "host": LOOPBACK,
            "dashboard_address": f"{LOOPBACK}:0",
        }
        if infra.processes:
            kwargs["env"] = _thread_env(threads)
        if infra.memory_limit:
            kwargs["memory_limit"] = infra.memory_limit
        return ClusterSpec("distributed.LocalCluster", kwargs)
    if infra.kind == "local-gpus":
        return ClusterSpec("ddr.cluster.local_gpu_cluster", {"n_gpus": infra.n_workers or visible_gpus()})
    from ddr.slurm import slurm_cluster_kwargs

    return ClusterSpec(
        "dask_jobqueue.SLURMCluster",
        slurm_cluster_kwargs(config),
        {"minimum": infra.adapt_minimum, "maximum": infra.adapt_maximum},
    )


def local_gpu_cluster(n_gpus: int) -> Any:
    """One single-threaded worker process per GPU, each seeing only its own device."""
    from distributed import Nanny, Scheduler, SpecCluster

    if n_gpus < 1:
        raise RuntimeError("infrastructure local-gpus: no CUDA device is visible")
    workers = {
        f"gpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": 1,
                "env": {"CUDA_VISIBLE_DEVICES": str(i)},
                "resources": {"GPU": 1},
                "host": LOOPBACK,
            },
        }
        for i in range(n_gpus)
    }
    scheduler = {"cls": Scheduler, "options": {"host": LOOPBACK, "dashboard_address": f"{LOOPBACK}:0"}}
    return SpecCluster(workers=workers, scheduler=scheduler)
