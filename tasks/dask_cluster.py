"""Dask clusters from the profile: LocalCluster, or SLURMCluster whose workers are Slurm jobs.

``open_cluster`` is a context manager. On exit, by success, failure or cancellation, every
worker job it asked for is cancelled and awaited: none is left in squeue.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import DaskSpec
from tasks.errors import AifError, SlurmError
from tasks.slurm import SlurmClient

WORKER_START_TIMEOUT_S = 180.0


@dataclass
class ClusterInfo:
    kind: str
    dashboard: str | None = None
    job_name: str | None = None
    job_ids: list[str] = field(default_factory=list)
    job_script: str | None = None
    workers: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dashboard": self.dashboard,
            "job_name": self.job_name,
            "job_ids": list(self.job_ids),
            "workers": self.workers,
        }


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_args(spec: DaskSpec) -> list[str]:
    args: list[str] = []  # dask-jobqueue already passes --nthreads (cores / processes)
    if spec.lifetime:
        # The worker leaves (its job ends) before the walltime; adaptive scaling replaces it.
        args += ["--lifetime", spec.lifetime, "--lifetime-stagger", spec.lifetime_stagger]
    return args


def slurm_cluster_kwargs(
    spec: DaskSpec, account: str, job_name: str, log_dir: str | None
) -> dict[str, Any]:
    """Profile's dask section -> dask-jobqueue SLURMCluster arguments."""
    directives = list(spec.job_extra_directives)
    if spec.qos:
        directives.append(f"--qos={spec.qos}")
    kwargs: dict[str, Any] = {
        "cores": spec.cores,
        "processes": spec.processes,
        "memory": spec.memory,
        "walltime": spec.walltime,
        "queue": spec.partition,
        "account": account,
        "job_name": job_name,
        "job_extra_directives": directives,
        "job_script_prologue": list(spec.job_script_prologue),
        "python": sys.executable,
        "scheduler_options": {"host": spec.scheduler_host, "dashboard_address": ":0"},
        "worker_extra_args": worker_args(spec),
    }
    if spec.interface:
        kwargs["interface"] = spec.interface
    if log_dir:
        kwargs["log_directory"] = log_dir
    return kwargs


def render_worker_script(spec: DaskSpec, account: str, job_name: str) -> str:
    """The worker job script as Slurm would receive it (for --dry-run and artifacts)."""
    from dask_jobqueue.slurm import SLURMJob

    kwargs = slurm_cluster_kwargs(spec, account, job_name, None)
    kwargs.pop("scheduler_options")
    job = SLURMJob(scheduler="tcp://SCHEDULER:8786", name="dask-worker", **kwargs)
    return str(job.job_script())


@contextlib.contextmanager
def open_cluster(
    spec: DaskSpec,
    *,
    account: str,
    job_name: str,
    slurm: SlurmClient | None,
    log_dir: str | None = None,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[Any, ClusterInfo]]:
    from distributed import Client, LocalCluster

    if spec.kind == "local":
        local_cluster = LocalCluster(
            n_workers=spec.workers,
            threads_per_worker=spec.cores,
            processes=True,
            memory_limit=spec.memory,
            dashboard_address="127.0.0.1:0",
            host="127.0.0.1",
        )
        local_client = Client(local_cluster)
        info = ClusterInfo(
            kind="local", dashboard=local_client.dashboard_link, workers=spec.workers
        )
        try:
            yield local_client, info
        finally:
            local_client.close()
            local_cluster.close()
        return

    if slurm is None:
        raise AifError("a Slurm Dask cluster needs a Slurm client")
    # Fail fast and clearly when Slurm is down, before dask-jobqueue's own sbatch call.
    slurm.run(["sinfo", "-h", "-o", "%P"])
    from dask_jobqueue import SLURMCluster

    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    info = ClusterInfo(kind="slurm", job_name=job_name)
    with _env(dict(slurm.env)):
        cluster: Any = None
        client: Any = None
        try:
            cluster = SLURMCluster(**slurm_cluster_kwargs(spec, account, job_name, log_dir))
            info.job_script = str(cluster.job_script())
            info.dashboard = cluster.dashboard_link
            if spec.adaptive_min is not None and spec.adaptive_max is not None:
                cluster.adapt(minimum_jobs=spec.adaptive_min, maximum_jobs=spec.adaptive_max)
            else:
                cluster.scale(jobs=spec.workers)
            client = Client(cluster)
            want = spec.workers if spec.adaptive_min is None else max(1, spec.adaptive_min)
            log(f"waiting for {want} Dask worker job(s) on partition {spec.partition}")
            try:
                client.wait_for_workers(want, timeout=WORKER_START_TIMEOUT_S)
            except TimeoutError:
                pending = slurm.jobs_named(job_name)
                raise SlurmError(
                    f"Dask workers did not start within {WORKER_START_TIMEOUT_S:.0f}s on "
                    f"partition {spec.partition} (account {account}); jobs {pending} still "
                    "queued: check sinfo / squeue"
                ) from None
            info.job_ids = sorted(set(slurm.jobs_named(job_name)))
            info.workers = len(client.scheduler_info().get("workers", {}))
            log(f"Dask workers up: jobs {', '.join(info.job_ids)}; dashboard {info.dashboard}")
            yield client, info
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            if cluster is not None:
                with contextlib.suppress(Exception):
                    cluster.close(timeout=30)
            _reap(slurm, job_name, info, log)


def _reap(slurm: SlurmClient, job_name: str, info: ClusterInfo, log: Callable[[str], None]) -> None:
    """Cancel whatever worker job is still queued or running under our job name."""
    leftover = slurm.jobs_named(job_name)
    if leftover:
        log(f"cancelling leftover Dask worker jobs {', '.join(leftover)}")
        slurm.cancel(leftover)
    still = slurm.wait_gone(leftover or [], timeout=60)
    if still:
        raise SlurmError(f"Dask worker jobs {still} are still in squeue after scancel")
    for jid in leftover:
        if jid not in info.job_ids:
            info.job_ids.append(jid)
