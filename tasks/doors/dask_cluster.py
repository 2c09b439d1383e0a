"""Dask clusters from the profile: LocalCluster, or SLURMCluster whose workers are Slurm jobs.

``open_cluster`` is a context manager. On exit, by success, failure or cancellation, every
worker job it asked for is cancelled and awaited: none is left in squeue.

Ctrl-C: a LocalCluster's worker processes share the terminal's process group, so the
terminal's SIGINT reached them too, and each printed a 30-line KeyboardInterrupt
traceback. They now ignore SIGINT (inherited from their start, and set again by this
module's worker preload for a worker the nanny restarts); the flow's process gets the
KeyboardInterrupt and closes the cluster with Dask's logging silenced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aifactory.tasks.core.config import DaskSpec
from aifactory.tasks.core.errors import AifError, SlurmCommandError, SlurmError
from aifactory.tasks.core.jobfiles import read_job_text
from aifactory.tasks.doors.dask_dispatch import slurm_end_times
from aifactory.tasks.doors.slurm import TERMINAL_STATES, SlurmClient

WORKER_START_TIMEOUT_S = 180.0


@dataclass
class ClusterInfo:
    kind: str
    dashboard: str | None = None
    job_name: str | None = None
    job_ids: list[str] = field(default_factory=list)
    job_script: str | None = None
    workers: int = 0
    # For tasks.dask_dispatch: Slurm EndTime lookup, and retire-and-replace of a worker job.
    end_times: Callable[[list[str]], dict[str, float]] | None = None
    retire: Callable[[str, str, str], None] | None = None
    retired: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dashboard": self.dashboard,
            "job_name": self.job_name,
            "job_ids": list(self.job_ids),
            "workers": self.workers,
            "retired_for_walltime": list(self.retired),
        }


def door_cluster_class(slurm: SlurmClient, chdir: str | None = None) -> Any:
    """dask-jobqueue's SLURMCluster whose sbatch and scancel calls go through our Slurm door
    (its command, timeout, environment and one-line errors) instead of its own subprocess
    call: its Job class routes every command through ``Job._call`` (dask_jobqueue/core.py),
    which this subclass overrides. No process-wide environment is rewritten. ``chdir``: the
    worker jobs' working directory (their log files' folder), given to sbatch.
    tests/unit/test_dask_cluster.py fails if dask-jobqueue stops calling it."""
    import asyncio

    from dask_jobqueue import SLURMCluster
    from dask_jobqueue.slurm import SLURMJob

    class DoorJob(SLURMJob):  # type: ignore[misc]
        door = slurm

        @classmethod
        async def _call(cls, cmd: list[str], *, shell: bool = False, **_kw: Any) -> str:
            if shell:
                raise RuntimeError(f"aifactory runs no shell command for Dask: {cmd}")
            if chdir and cmd and cmd[0] == "sbatch":
                cmd = [cmd[0], f"--chdir={chdir}", *cmd[1:]]
            try:
                return await asyncio.to_thread(cls.door.run, list(cmd))
            except SlurmCommandError as exc:  # dask-jobqueue expects RuntimeError
                raise RuntimeError(str(exc)) from None

    class DoorSLURMCluster(SLURMCluster):  # type: ignore[misc]
        job_cls = DoorJob

    return DoorSLURMCluster


# -- Ctrl-C ------------------------------------------------------------------------------
WORKER_PRELOAD = __name__  # a LocalCluster's workers run this module's dask_setup


def dask_setup(worker: Any) -> None:
    """Dask worker preload of a LocalCluster's workers (run in each worker process): ignore
    SIGINT (the flow's process handles Ctrl-C and closes the cluster), and say nothing
    while closing (the partitions it cancels, a heartbeat cut short by the close)."""
    with contextlib.suppress(ValueError):  # only the main thread may set a handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    quiet = _WhileClosing(worker)
    for handler in logging.getLogger("distributed").handlers:
        handler.addFilter(quiet)


class _WhileClosing(logging.Filter):
    """Drops the log records of a worker that is closing."""

    def __init__(self, worker: Any) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        status = getattr(getattr(self.worker, "status", None), "name", "")
        return status not in ("closing", "closed", "closing_gracefully")


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block (in the main thread; elsewhere nothing changes):
    processes spawned meanwhile ignore it from their start (an ignored signal stays
    ignored across exec, and Python keeps it so). A Ctrl-C inside the block is lost, so
    keep it to the spawning of the workers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


DASK_LOGGERS = ("distributed", "tornado", "asyncio")


@contextlib.contextmanager
def dask_logs_silenced() -> Iterator[None]:
    """No log line from Dask, Tornado or asyncio in this process inside the block: closing
    a cluster on Ctrl-C (busy workers killed, connections dropped, futures cancelled)."""
    known = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in DASK_LOGGERS]
    loggers = [logging.getLogger(n) for n in {*DASK_LOGGERS, *known}]
    saved = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved, strict=True):
            lg.disabled = was


async def _close_nannies(nannies: list[Any], timeout: float = 1.0) -> None:
    """Close a LocalCluster's nannies at once: each asks its worker to stop and kills it
    after ``0.8 * timeout`` s if it is busy in a partition."""
    import asyncio

    await asyncio.gather(*(n.close(timeout=timeout) for n in nannies), return_exceptions=True)


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """Dask's nannies write their workers' variables (OMP_NUM_THREADS=1, MALLOC_…) into this
    process's environment before they spawn; put it back, so that what the flow starts
    later (a local training run) does not inherit them."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def drain_margin_s(spec: DaskSpec) -> float:
    from dask.utils import parse_timedelta

    return float(parse_timedelta(spec.drain_margin))


def worker_args(spec: DaskSpec) -> list[str]:
    args: list[str] = []  # dask-jobqueue already passes --nthreads (cores / processes)
    if spec.lifetime:
        # The worker leaves (its job ends) before the walltime; adaptive scaling replaces it.
        args += ["--lifetime", spec.lifetime, "--lifetime-stagger", spec.lifetime_stagger]
    return args


def worker_env(spec: DaskSpec) -> dict[str, str]:
    """Environment of the worker processes that aifactory sets itself (see malloc_top_pad)."""
    from dask.utils import parse_bytes

    if spec.malloc_top_pad is None:
        return {}
    return {"MALLOC_TOP_PAD_": str(parse_bytes(spec.malloc_top_pad))}


def job_prologue(spec: DaskSpec) -> list[str]:
    """Worker job script lines before the worker starts: aifactory's environment, then the
    profile's own lines (module loads, venv activation), which may override it."""
    return [f"export {k}={v}" for k, v in worker_env(spec).items()] + list(spec.job_script_prologue)


# Scheduler settings for the clusters whose scheduler runs in the flow's process. The
# dispatcher (tasks.dask_dispatch) places every partition itself, one running and one queued
# per worker thread, so Dask's work stealing only costs scheduler CPU (a balance pass every
# 100 ms while tasks run) on a host the flow shares: a login node, or the workers' own cores.
SCHEDULER_CONFIG = {"distributed.scheduler.work-stealing": False}


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
        "job_script_prologue": job_prologue(spec),
        "python": shlex.quote(sys.executable),  # a venv under "my work/" stays one word
        "scheduler_options": {"host": spec.scheduler_host, "dashboard_address": ":0"},
        "worker_extra_args": worker_args(spec),
    }
    if spec.interface:
        kwargs["interface"] = spec.interface
    if log_dir:
        # Relative names: the door submits with --chdir=<log_dir> (door_cluster_class), so a
        # log folder whose path has a space works (#SBATCH lines split at spaces).
        directives += [f"-e {job_name}-%J.err", f"-o {job_name}-%J.out"]
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
    import dask
    from distributed import Client, LocalCluster

    if spec.kind == "local":
        # The nannies read this when they are made, and use it for every worker they
        # (re)start.
        spawn_env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}),
                     **worker_env(spec)}  # fmt: skip
        preload = [*(dask.config.get("distributed.worker.preload", None) or []), WORKER_PRELOAD]
        config = {**SCHEDULER_CONFIG, "distributed.nanny.pre-spawn-environ": spawn_env,
                  "distributed.worker.preload": preload}  # fmt: skip
        with _environ_kept(), dask.config.set(config), sigint_ignored():
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
        except KeyboardInterrupt:
            # Quietly and at once (busy workers are killed after a second, not Dask's 4 s),
            # and a second Ctrl-C does not break off the close.
            with dask_logs_silenced(), sigint_ignored():
                with contextlib.suppress(Exception):
                    local_cluster.sync(_close_nannies, list(local_cluster.workers.values()))
                local_client.close()
                local_cluster.close()
            raise
        except BaseException:
            local_client.close()
            local_cluster.close()
            raise
        local_client.close()
        local_cluster.close()
        return

    if slurm is None:
        raise AifError("a Slurm Dask cluster needs a Slurm client")
    if spec.scheduler == "allocation":
        from aifactory.tasks.doors.dask_allocation import allocation_cluster

        if not log_dir:
            raise AifError("dask.scheduler allocation needs a directory on the shared filesystem")
        with allocation_cluster(spec, account=account, job_name=job_name, slurm=slurm,
                                run_dir=log_dir, log=log) as pair:  # fmt: skip
            yield pair
        return
    # Fail fast and clearly when Slurm is down, before dask-jobqueue's own sbatch call.
    slurm.run(["sinfo", "-h", "-o", "%P"])
    cluster_cls = door_cluster_class(slurm, str(Path(log_dir).resolve()) if log_dir else None)
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
    info = ClusterInfo(kind="slurm", job_name=job_name)
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    cluster: Any = None
    client: Any = None
    try:
        with dask.config.set(SCHEDULER_CONFIG):
            cluster = cluster_cls(**slurm_cluster_kwargs(spec, account, job_name, log_dir))
        info.job_script = str(cluster.job_script())
        info.dashboard = cluster.dashboard_link
        if spec.adaptive_min is not None and spec.adaptive_max is not None:
            cluster.adapt(minimum_jobs=spec.adaptive_min, maximum_jobs=spec.adaptive_max)
        else:
            cluster.scale(jobs=spec.workers)
        client = Client(cluster)
        info.end_times = lambda ids: slurm_end_times(slurm.run, ids)
        info.retire = _retirer(client, cluster, info, log)
        want = spec.workers if spec.adaptive_min is None else max(1, spec.adaptive_min)
        log(f"waiting for {want} Dask worker job(s) on partition {spec.partition}")
        _wait_for_workers(client, slurm, job_name, want, log_dir, since,
                          f"partition {spec.partition} (account {account})")  # fmt: skip
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


def _wait_for_workers(client: Any, slurm: SlurmClient, job_name: str, want: int,
                      log_dir: str | None, since: str, where: str) -> None:  # fmt: skip
    """Wait for ``want`` workers; a worker job that died (a bad Python path, a crash at
    start) is reported dead with its state and log as soon as no job of ours is left in
    the queue, not as 'still queued' when the time is up."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while True:
        try:
            client.wait_for_workers(want, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            return
        except TimeoutError:
            pass
        live = slurm.jobs_named(job_name)
        if not live:
            dead = dead_worker_jobs(slurm, job_name, since, log_dir)
            if dead:
                raise SlurmError(f"Dask worker job(s) on {where} ended before a worker "
                                 f"started: {dead}")  # fmt: skip
        if time.monotonic() >= deadline:
            raise SlurmError(
                f"Dask workers did not start within {WORKER_START_TIMEOUT_S:.0f}s on {where}; "
                f"jobs {live} still queued: check sinfo / squeue"
            )


def dead_worker_jobs(slurm: SlurmClient, job_name: str, since: str, log_dir: str | None,
                     most: int = 3) -> str:  # fmt: skip
    """'job 12 FAILED (exit 127:0) after 00:00:01, log: <tail>; ...' for our worker jobs
    that ended since ``since`` ('' when none did, or the accounting cannot tell)."""
    try:
        recs = slurm.sacct(("JobID", "State", "ExitCode", "Elapsed"),
                           args=["--name", job_name, "-S", since])  # fmt: skip
    except SlurmCommandError:
        return ""
    ended = [r for r in recs if r["State"] in TERMINAL_STATES]
    parts = []
    for r in ended[:most]:
        tail = ""
        if log_dir:
            for suffix in (".err", ".out"):
                p = Path(log_dir) / f"{job_name}-{r['JobID']}{suffix}"
                with contextlib.suppress(OSError):
                    lines = [ln.strip() for ln in read_job_text(p, 2**20).splitlines()
                             if ln.strip()]  # fmt: skip
                    if lines:
                        tail = " | ".join(lines[-3:])[-300:]
                        break
        state = r.get("StateDetail") or r["State"]
        parts.append(f"job {r['JobID']} {state} (exit {r['ExitCode']}) after {r['Elapsed']}, "
                     f"log: {tail or '(empty)'}")  # fmt: skip
    more = f"; and {len(ended) - most} more" if len(ended) > most else ""
    return "; ".join(parts) + more


def _spec_name(specs: dict[str, Any], worker_name: str) -> str | None:
    """The cluster's job spec a worker belongs to (``processes`` > 1 adds ``-N``)."""
    if worker_name in specs:
        return worker_name
    return next((k for k in specs if worker_name.startswith(f"{k}-")), None)


def _retirer(
    client: Any, cluster: Any, info: ClusterInfo, log: Callable[[str], None]
) -> Callable[[str, str, str], None]:
    """Retire a drained worker job gracefully, then have the cluster submit a replacement."""

    def retire(address: str, name: str, job_id: str) -> None:
        spec = _spec_name(cluster.worker_spec, name)
        members = [
            a
            for a, w in client.scheduler_info(n_workers=-1).get("workers", {}).items()
            if spec is not None and _spec_name({spec: None}, str(w.get("name"))) == spec
        ] or [address]
        log(
            f"worker job {job_id} ({name or address}) is near its deadline: retiring it and "
            "asking for a replacement"
        )
        with contextlib.suppress(Exception):
            client.retire_workers(members, close_workers=True)
        info.retired.append(job_id)
        if spec is None:
            return

        def swap() -> None:  # on the cluster's event loop: worker_spec is not thread-safe
            jobs = len(cluster.worker_spec)
            cluster.worker_spec.pop(spec, None)
            cluster.scale(jobs=jobs)

        cluster.loop.add_callback(swap)

    return retire


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
