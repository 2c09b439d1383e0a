"""The job layer: one way to run a job in its run directory, locally or on Slurm.

A :class:`JobRequest` names the job (its name carries the run key), its run directory, the
rendered sbatch script (kept with the run whichever executor runs it) and the command the
script execs. :func:`executor_for` gives the executor of a training spec; the stages call
``executor.run(request)`` and never branch on where the job runs:

- :class:`SlurmExecutor` submits the script (or reattaches to a live job of the same
  name), passes the admission gate before a first submission, follows the job with the one
  watcher (tasks/jobs/slurm_watch.py: requeue, resubmission, OOM, failure, cancellation) and
  returns its sacct record.
- :class:`LocalExecutor` runs the command as a child process, streaming its log.

``executor.run_array(request, n, max_parallel)`` runs ``n`` tasks of one script (a sweep's
trials): one ``sbatch --array`` on Slurm, followed by the same watcher (admission before
the first submission, reattachment, resubmission of the tasks that ran out of time or were
preempted, cancellation with the flow); locally, up to ``max_parallel`` child processes.
A task's ending is its record (State, ExitCode, Elapsed, JobID), not an exception: the
caller decides what a failed trial means.

Either way one process owns a run directory at a time: ``owner()`` takes an exclusive lock
on ``<run_dir>/.owner.lock`` (released when the owner ends, however it ends), so a second
run of the same key waits and then collects the first one's result instead of training a
second time into the same folder. Locally the training process shares that lock (it
inherits the locked file): the lock lasts as long as the owner or its training process, so
a flow killed mid-training does not let a second run train beside its orphaned payload.
On Slurm the job's name gives the run its one owner.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from aifactory.tasks.core.errors import TrainingError
from aifactory.tasks.doors.slurm import SlurmClient
from aifactory.tasks.jobs.slurm_watch import (
    EXIT_REQUEUE,
    TAIL_LINES,
    job_record,
    submit_and_watch,
    watch_array,
)

LOCK_NAME = ".owner.lock"


@dataclass
class JobRequest:
    name: str
    run_dir: Path
    script_path: Path
    command: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    log: Callable[[str], None] = print
    cancel_event: threading.Event | None = None
    admit: Callable[[], str] | None = None  # called before a first submission; may refuse
    # An array's task i (run_array): its folder and the command run there (local executor;
    # on Slurm the script itself finds its task by SLURM_ARRAY_TASK_ID).
    task: Callable[[int], tuple[Path, Sequence[str]]] | None = None
    # Told each Slurm job id as soon as it is submitted (or reattached to), so the run
    # directory names its jobs even if the watcher dies before the job ends.
    on_job: Callable[[str], None] | None = None


@dataclass
class JobResult:
    executor: str
    job_ids: list[str]
    sacct: dict[str, str]


@dataclass
class ArrayResult:
    executor: str
    job_ids: list[str]
    tasks: dict[int, dict[str, str]]  # task index -> State, ExitCode, Elapsed, JobID


class Executor(Protocol):
    kind: str

    def run(self, req: JobRequest) -> JobResult: ...

    def run_array(self, req: JobRequest, n: int, max_parallel: int) -> ArrayResult: ...


@dataclass
class LocalExecutor:
    """The job's command as a local process (the embedded default, tests, a laptop)."""

    kind: str = "local"

    def run(self, req: JobRequest) -> JobResult:
        req.log(f"running {req.name} locally in {req.run_dir}")
        # The run directory's owner lock goes with the process: held while it trains, even
        # if this (owning) process dies first.
        lock = held_lock(req.run_dir)
        run_local(list(req.command), str(req.run_dir), req.env, req.log, req.cancel_event,
                  keep_fds=() if lock is None else (lock,))  # fmt: skip
        return JobResult(self.kind, [], {})

    def run_array(self, req: JobRequest, n: int, max_parallel: int) -> ArrayResult:
        """Each task as a child process in its own folder, at most ``max_parallel`` at once;
        a cancelled flow stops the ones running (they checkpoint) and starts no other."""
        from concurrent.futures import ThreadPoolExecutor

        if req.task is None:
            raise TrainingError(f"{req.name}: an array needs its tasks' folders and commands")
        task = req.task
        cancel = req.cancel_event or threading.Event()
        req.log(f"running {n} tasks of {req.name} locally, at most {max(1, max_parallel)} at once")

        def one(i: int) -> dict[str, str]:
            if cancel.is_set():
                return {"State": "CANCELLED", "ExitCode": "", "Elapsed": "", "JobID": f"local_{i}"}
            folder, cmd = task(i)
            t0 = time.monotonic()
            env = {**req.env, "SLURM_ARRAY_TASK_ID": str(i)}
            try:
                run_local(list(cmd), str(folder), env, lambda line: req.log(f"[task {i}] {line}"),
                          cancel)  # fmt: skip
                state, code = "COMPLETED", "0:0"
            except TrainingError as exc:
                state, code = ("CANCELLED", "") if cancel.is_set() else ("FAILED", "1:0")
                req.log(f"[task {i}] {exc}")
            took = int(time.monotonic() - t0)
            elapsed = f"{took // 3600:02d}:{took // 60 % 60:02d}:{took % 60:02d}"
            return {"State": state, "ExitCode": code, "JobID": f"local_{i}", "Elapsed": elapsed}

        with ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool:
            tasks = dict(enumerate(pool.map(one, range(n))))
        if cancel.is_set():
            raise TrainingError(f"{req.name}: cancelled; the running tasks checkpointed")
        return ArrayResult(self.kind, [], tasks)


@dataclass
class SlurmExecutor:
    """The job's script through sbatch, watched to its end by the one watcher."""

    slurm: SlurmClient
    poll_seconds: float = 1.0
    max_resubmits: int = 0
    describe: str = ""
    kind: str = "slurm"

    def _admit(self, req: JobRequest, what: str) -> None:
        """Admission before a first submission (a live job of this name is reattached to)."""
        if req.admit is not None and not self.slurm.jobs_named(req.name):
            req.log(req.admit())  # refuses (AdmissionError) before anything is submitted
        if self.describe:
            req.log(f"Slurm {what} {req.name}: {self.describe}, script {req.script_path}")

    def run(self, req: JobRequest) -> JobResult:
        self._admit(req, "job")
        job_ids: list[str] = []

        def on_job(job_id: str) -> None:
            job_ids.append(job_id)
            if req.on_job is not None:
                req.on_job(job_id)

        _, sacct = submit_and_watch(self.slurm, str(req.script_path), str(req.run_dir), req.name,
                                    req.log, self.poll_seconds, req.cancel_event,
                                    max_resubmits=self.max_resubmits,
                                    on_job=on_job)  # fmt: skip
        return JobResult(self.kind, job_ids, sacct)

    def record(self, job_id: str, log: Callable[[str], None]) -> dict[str, str]:
        """An ended job's sacct record (a run collected after its owner died)."""
        return job_record(self.slurm, job_id, log)

    def run_array(self, req: JobRequest, n: int, max_parallel: int) -> ArrayResult:
        """One ``sbatch --array`` for the ``n`` tasks (or a live array of the same name)."""
        self._admit(req, "job array")
        job_ids: list[str] = []
        tasks = watch_array(self.slurm, str(req.script_path), req.name, n, max_parallel, req.log,
                            self.poll_seconds, req.cancel_event, self.max_resubmits,
                            on_job=job_ids.append)  # fmt: skip
        return ArrayResult(self.kind, job_ids, tasks)


def executor_for(
    kind: str, slurm: SlurmClient | None, *, poll_seconds: float = 1.0, max_resubmits: int = 0,
    describe: str = "",
) -> Executor:  # fmt: skip
    """The executor a spec names (``training.executor``: local or slurm)."""
    if kind == "local":
        return LocalExecutor()
    if kind == "slurm":
        if slurm is None:
            raise TrainingError("training.executor is slurm but no Slurm client was given")
        return SlurmExecutor(slurm, poll_seconds, max_resubmits, describe)
    raise TrainingError(f"training.executor {kind!r}: expected local or slurm")


_HELD: dict[str, int] = {}  # run directory -> the file descriptor of its owner lock, held here


def held_lock(run_dir: Path) -> int | None:
    """The descriptor of ``run_dir``'s owner lock if this process holds it (``owner()``)."""
    return _HELD.get(str(Path(run_dir).resolve()))


@contextlib.contextmanager
def owner(run_dir: Path, log: Callable[[str], None] = print,
          doing: str = "trained") -> Iterator[int]:  # fmt: skip
    """Hold the run directory's owner lock; wait (saying so) while another process has it.

    Yields the lock file's descriptor: a child process given it (``run_local``'s
    ``keep_fds``) holds the same lock, so it stays taken until the child ends too."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_NAME, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            log(f"run {run_dir.name} is being {doing} by {holder}: waiting for it to finish "
                f"(its result is collected, nothing is {doing} twice)")  # fmt: skip
            t0 = time.monotonic()
            fcntl.flock(fh, fcntl.LOCK_EX)
            log(f"run {run_dir.name}: the other owner finished after "
                f"{time.monotonic() - t0:.0f}s")  # fmt: skip
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        key = str(run_dir.resolve())
        _HELD[key] = fh.fileno()
        try:
            yield fh.fileno()
        finally:
            _HELD.pop(key, None)
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_local(cmd: list[str], run_dir: str, env: Mapping[str, str],
              log: Callable[[str], None],
              cancel_event: threading.Event | None = None,
              keep_fds: Sequence[int] = ()) -> None:  # fmt: skip
    """Run the job's command as a local process, streaming its output to ``log`` and local.out.

    Raises TrainingError with the exit code and the log tail on failure. Interrupted (or
    ``cancel_event`` set), it sends the payload SIGTERM (it checkpoints and exits 99).
    ``keep_fds`` stay open in the process (the run directory's owner lock).
    """
    lines: list[str] = []
    with open(Path(run_dir) / "local.out", "a") as out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env}, cwd=run_dir, pass_fds=tuple(keep_fds),
        )  # fmt: skip
        if cancel_event is not None:

            def _stop() -> None:  # ends with the process
                while proc.poll() is None:
                    if cancel_event.wait(0.5):
                        if proc.poll() is None:
                            proc.send_signal(signal.SIGTERM)
                        return

            threading.Thread(target=_stop, daemon=True).start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                out.write(line + "\n")
                out.flush()
                lines.append(line)
                del lines[:-200]
                log(line)
            rc = proc.wait()
        except BaseException:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
    if rc != 0:
        tail = " | ".join([ln.strip() for ln in lines if ln.strip()][-TAIL_LINES:])
        why = " (interrupted; checkpointed: re-run to resume)" if rc == EXIT_REQUEUE else ""
        raise TrainingError(f"local training process exited with code {rc}{why}; "
                            f"log tail: {tail or '(no output)'}")  # fmt: skip
