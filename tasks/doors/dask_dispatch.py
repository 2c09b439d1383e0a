"""Feed partitions to Dask workers so that no worker starts work it cannot finish.

A Dask worker on Slurm has a deadline: its job's walltime (Slurm's EndTime) and, when the
profile sets ``dask.lifetime``, the moment Dask retires it. Submitting every partition at
once lets the scheduler queue work on a worker that then leaves mid-partition: the
partition starts again elsewhere (repeated work), and a walltime kill loses it outright.

``dispatch`` keeps the queue on the client instead. A worker thread holds at most one
running and one queued partition, and gets one only while it has time left for it (the
slowest partition seen so far, timed on its worker, with head-room, plus ``margin_s``);
otherwise it is drained and retired, and the cluster brings a replacement job up. Results are small
dicts gathered as soon as they finish, so a retiring worker holds no data. A worker that
dies anyway (scancel, node failure) has its running partition re-run on another worker
by Dask itself; a partition's output has fixed names, so that run overwrites, and the
counts come only from the run that finished.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from math import inf
from typing import Any

from aifactory.tasks.core.errors import AifError

HEADROOM = 1.5  # a partition may take this much longer than the slowest seen so far
QUEUED = 2  # partitions handed to a worker thread at once: the running one and the next


class StageCancelled(AifError):
    """The flow run was cancelled while the stage ran; its work was stopped."""


@dataclass
class Clock:
    address: str
    job_id: str | None
    deadline: float | None  # epoch seconds; None: no known end
    nthreads: int
    draining: bool = False


def worker_facts(dask_worker: Any) -> dict[str, Any]:
    """Runs on each worker: its Slurm job id and the moment its Dask lifetime ends."""
    import os

    import psutil

    life = getattr(dask_worker, "lifetime", None)
    created = psutil.Process().create_time()  # slightly before the lifetime timer started
    return {
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "lifetime_deadline": created + float(life) if life else None,
    }


def parse_end_time(text: str) -> float | None:
    """squeue's %e (local time, e.g. 2026-11-27T06:40:00) -> epoch seconds; None if unset."""
    text = text.strip()
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None  # N/A, NONE, Unknown: a job with no end


def slurm_end_times(run: Callable[[list[str]], str], job_ids: Sequence[str]) -> dict[str, float]:
    """EndTime of each (running) job from squeue."""
    if not job_ids:
        return {}
    out = run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %e"])
    ends: dict[str, float] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and (end := parse_end_time(parts[1])) is not None:
            ends[parts[0]] = end
    return ends


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Runs on the worker: ``fn(*args)`` and the seconds it took there (no queueing)."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def dispatch(
    client: Any,
    fn: Callable[..., Any],
    calls: Sequence[tuple[str, tuple[Any, ...]]],
    *,
    margin_s: float = 10.0,
    end_times: Callable[[list[str]], dict[str, float]] | None = None,
    retire: Callable[[str, str, str], None] | None = None,
    cancel: threading.Event | None = None,
    on_result: Callable[[int, int], None] | None = None,
    poll_s: float = 0.25,
    no_worker_timeout_s: float = 300.0,
) -> list[Any]:
    """Run ``fn(*args)`` for each ``(key, args)`` in ``calls``; results in call order.

    ``end_times`` maps Slurm job ids to their EndTime; ``retire(address, name, job_id)`` retires a
    worker and asks for its replacement (without it, deadlines are ignored); ``cancel``
    stops everything (``StageCancelled``); ``on_result(done, total)`` reports progress.
    A task's own exception is raised as is. The workers of one job (``processes`` > 1)
    drain together and the job is retired once all of them are idle.

    The scheduler runs in this process, often on the workers' own cores: each finished
    partition costs one queue hand-off here, and the cluster's workers are looked up at
    most every ``poll_s`` (not once per partition).
    """
    total = len(calls)
    pending: deque[int] = deque(range(total))
    running: dict[Any, tuple[int, str]] = {}
    finished_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    results: list[Any] = [None] * total
    finished = 0
    slowest = 0.0  # the longest a partition has run on a worker (measured there)
    clocks: dict[str, Clock] = {}
    workers: dict[str, Any] = {}
    looked = -inf
    retiring: list[threading.Thread] = []
    idle_since = time.monotonic()
    try:
        while finished < total:
            if cancel is not None and cancel.is_set():
                raise StageCancelled(f"stage cancelled with {total - finished} of {total} "
                                     "partitions not done")  # fmt: skip
            if time.monotonic() - looked >= poll_s:
                workers = client.scheduler_info(n_workers=-1).get("workers", {})
                _learn(client, clocks, workers, end_times)
                looked = time.monotonic()
            now = time.time()
            busy = Counter(addr for _, addr in running.values())
            job_end: dict[str, float] = {}
            for c in clocks.values():
                if c.job_id and c.deadline is not None:
                    job_end[c.job_id] = min(job_end.get(c.job_id, c.deadline), c.deadline)
            for addr, clock in clocks.items():
                end = job_end.get(clock.job_id or "", clock.deadline)
                # Time left for partitions (unbounded without a deadline or a way to retire).
                left = end - now - margin_s if retire is not None and end is not None else inf
                if left < HEADROOM * slowest:
                    clock.draining = True  # no new work; it leaves holding nothing
                if clock.draining:
                    continue
                # One partition running and one queued per thread, so that a worker never
                # waits for the client between two; a queued one must fit too.
                while pending and busy[addr] < QUEUED * clock.nthreads:
                    if left < HEADROOM * slowest * (busy[addr] // clock.nthreads + 1):
                        break
                    i = pending.popleft()
                    key, args = calls[i]
                    fut = client.submit(timed, fn, *args, key=key, workers=[addr],
                                        allow_other_workers=True, pure=False)  # fmt: skip
                    running[fut] = (i, addr)
                    fut.add_done_callback(finished_q.put)
                    busy[addr] += 1
            if retire is not None:
                for job, members in _jobs(clocks).items():
                    if all(c.draining and busy[c.address] == 0 for c in members):
                        for c in members:
                            c.draining = True
                            c.job_id = None  # retired once
                        name = str(workers.get(members[0].address, {}).get("name", ""))
                        t = threading.Thread(target=retire, args=(members[0].address, name, job),
                                             daemon=True, name=f"aif-retire-{job}")  # fmt: skip
                        t.start()
                        retiring.append(t)
            if any(not c.draining for c in clocks.values()) or running:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > no_worker_timeout_s:
                raise AifError(
                    f"no Dask worker available for {no_worker_timeout_s:.0f}s with "
                    f"{total - finished} of {total} partitions to do: check squeue"
                )
            try:  # also the wait for a (replacement) worker when nothing runs
                done = [finished_q.get(timeout=poll_s)]
            except queue.Empty:
                continue  # nothing finished yet: look at the workers again
            while not finished_q.empty():
                done.append(finished_q.get_nowait())
            for fut in done:
                if fut not in running:
                    continue  # already handled
                i, _addr = running.pop(fut)
                if fut.status == "cancelled":  # e.g. a lost worker's task was released
                    pending.appendleft(i)
                    continue
                results[i], took = fut.result()  # raises the task's own exception
                fut.release()
                slowest = max(slowest, took)
                finished += 1
                if on_result is not None:
                    on_result(finished, total)
    except BaseException:
        for fut in running:
            with contextlib.suppress(Exception):
                fut.cancel()
        raise
    finally:
        for t in retiring:
            t.join(timeout=30)
    return results


def _jobs(clocks: dict[str, Clock]) -> dict[str, list[Clock]]:
    jobs: dict[str, list[Clock]] = {}
    for c in clocks.values():
        if c.job_id:
            jobs.setdefault(c.job_id, []).append(c)
    return jobs


def _learn(
    client: Any,
    clocks: dict[str, Clock],
    workers: dict[str, Any],
    end_times: Callable[[list[str]], dict[str, float]] | None,
) -> None:
    """Record the deadline of every worker that joined since the last look."""
    for gone in [a for a in clocks if a not in workers]:
        del clocks[gone]
    new = [a for a in workers if a not in clocks]
    if not new:
        return
    try:
        facts: dict[str, Any] = client.run(worker_facts, workers=new)
    except Exception:
        return  # a worker left between the two calls: look again next round
    jobs = [f["job_id"] for f in facts.values() if f.get("job_id")]
    ends = end_times(jobs) if end_times is not None and jobs else {}
    for addr, f in facts.items():
        limits = [f.get("lifetime_deadline"), ends.get(f.get("job_id") or "")]
        known = [x for x in limits if x is not None]
        clocks[addr] = Clock(
            address=addr,
            job_id=f.get("job_id"),
            deadline=min(known) if known else None,
            nthreads=int(workers[addr].get("nthreads", 1)),
        )
