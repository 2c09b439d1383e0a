"""Watching a Slurm job to its end: squeue while known, then sacct; the job's log streamed.

``submit_and_watch`` submits a rendered script (or reattaches to a live job of the same
name), follows its state and log, and returns the sacct record of a COMPLETED job; every
other ending raises :class:`TrainingError` with its own wording and the log's tail.
``watch_array`` does the same for a job array (a sweep's trials): one squeue and one sacct
per poll for all tasks, the same resubmission policy per task, the same cancellation.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from aifactory.tasks.core.errors import SlurmCommandError, SlurmError, TrainingError
from aifactory.tasks.core.jobfiles import read_job_bytes
from aifactory.tasks.doors.slurm import TERMINAL_STATES, SlurmClient, SlurmUnreachable

TAIL_LINES = 8
UNKNOWN_GRACE_S = 120.0
SACCT_WAIT_S = 30.0
OUTAGE_REPEAT_S = 30.0  # how often the watcher repeats that a Slurm daemon is unreachable
OUTAGE_LIMIT_S = 1800.0  # after which it leaves the job to a re-run
EXIT_REQUEUE = 99  # the payload checkpointed after SIGUSR1/SIGTERM
# Endings after which the same script is submitted again (it resumes from its checkpoint):
# the job ran out of time, was preempted, or its node failed. Out of memory, a failure
# with an exit code and a cancellation by someone are never retried.
RESUBMIT_STATES = ("TIMEOUT", "PREEMPTED", "NODE_FAIL", "BOOT_FAIL")


def resubmit_reason(rec: Mapping[str, str]) -> str | None:
    """Why an ended job should be submitted again, or None when it should not."""
    state = rec.get("State", "")
    if state in RESUBMIT_STATES:
        return {
            "TIMEOUT": "hit its time limit",
            "PREEMPTED": "was preempted",
            "NODE_FAIL": "lost its node",
            "BOOT_FAIL": "its node failed to boot",
        }[state]
    if state == "FAILED" and (rec.get("ExitCode") or "").split(":")[0] == str(EXIT_REQUEUE):
        return "checkpointed after a signal but was not requeued"
    return None


# The job script's first line: "aif: job 12 on node1 restart 1 gpus=0" (SLURM_RESTART_COUNT).
_RESTART_LINE = re.compile(r"^aif: job \S+ on \S+ restart (\d+)")


class _LogTail:
    """Follows a growing log file and hands each new complete line to ``log``."""

    def __init__(self, path: Path, log: Callable[[str], None]) -> None:
        self.path, self.log, self.pos, self.buf = path, log, 0, ""
        self.lines: list[str] = []
        self.restart = 0  # the highest SLURM_RESTART_COUNT the job script reported

    def poll(self) -> None:
        if not self.path.exists():
            return
        # The job's own log, in its folder: never read through a link the job planted.
        data = read_job_bytes(self.path, offset=self.pos)
        cut = data.rfind(b"\n") + 1  # whole lines only: a character is never split
        self.pos += cut
        *complete, _ = data[:cut].decode("utf-8", errors="replace").split("\n")
        self.buf = data[cut:].decode("utf-8", errors="replace")  # read again with its end
        for line in complete:
            self.lines.append(line)
            self.log(line)
            m = _RESTART_LINE.match(line)
            if m:
                self.restart = max(self.restart, int(m.group(1)))
        del self.lines[:-200]

    def tail(self, n: int = TAIL_LINES) -> str:
        lines = [ln.strip() for ln in [*self.lines, self.buf] if ln.strip()]
        return " | ".join(lines[-n:]) or "(empty log)"


def failure_message(job_id: str, rec: Mapping[str, str], tail: str) -> str:
    """One line for a job that ended in a state other than COMPLETED."""
    state = rec.get("State", "UNKNOWN")
    where = f"training job {job_id} on partition {rec.get('Partition') or '?'}"
    elapsed = rec.get("Elapsed") or "?"
    if state == "OUT_OF_MEMORY":
        mem = re.search(r"mem=([^,]+)", rec.get("AllocTRES", ""))
        return (f"{where} ran out of memory (allocated {mem.group(1) if mem else '?'}, MaxRSS "
                f"{rec.get('MaxRSS') or '?'}) after {elapsed}: raise training.mem_gb; "
                f"log tail: {tail}")  # fmt: skip
    if state == "TIMEOUT":
        return (f"{where} hit its time limit after {elapsed}: raise training.timeout_min; "
                f"log tail: {tail}")  # fmt: skip
    if state == "CANCELLED":
        by = re.search(r"by (\S+)", rec.get("StateDetail", ""))
        who = f" by {by.group(1)}" if by else ""
        when = f" at {rec['End']}" if rec.get("End") not in (None, "", "Unknown") else ""
        return f"{where} was CANCELLED{who}{when} after {elapsed}; log tail: {tail}"
    code = rec.get("ExitCode") or "?"
    hint = ""
    if code.split(":")[0] == str(EXIT_REQUEUE):
        hint = " (the payload checkpointed after a signal and was not requeued: re-run to resume)"
    return f"{where} ended {state} (exit code {code}){hint} after {elapsed}; log tail: {tail}"


class _Outage:
    """What the watcher says while a Slurm daemon does not answer: once when it starts,
    every ``OUTAGE_REPEAT_S`` while it lasts (the job itself runs on), once when it ends;
    after ``OUTAGE_LIMIT_S`` the watcher gives up, leaving the job to a re-run."""

    def __init__(self, job_id: str, log: Callable[[str], None]) -> None:
        self.job_id, self.log = job_id, log
        self.part: str | None = None
        self.since = self.said = 0.0
        self.wall = ""

    def ok(self) -> None:
        if self.part is not None:
            self.log(f"job {self.job_id}: Slurm's {self.part} answers again after "
                     f"{time.monotonic() - self.since:.0f}s")  # fmt: skip
            self.part = None

    def down(self, exc: SlurmUnreachable, last_state: str | None) -> None:
        now = time.monotonic()
        daemon = SlurmUnreachable.DAEMON.get(exc.part, exc.part)
        if self.part != exc.part:
            self.part, self.since, self.said = exc.part, now, now
            self.wall = time.strftime("%H:%M:%S")
            seen = f"; last seen {last_state}" if last_state else ""
            self.log(f"job {self.job_id}: Slurm's {exc.part} ({daemon}) is unreachable since "
                     f"{self.wall}{seen}; waiting for it, the job itself runs on "
                     f"({exc.reason[:200]})")  # fmt: skip
        elif now - self.said >= OUTAGE_REPEAT_S:
            self.said = now
            self.log(f"job {self.job_id}: Slurm's {exc.part} still unreachable after "
                     f"{now - self.since:.0f}s (since {self.wall}); waiting")  # fmt: skip
        if now - self.since > OUTAGE_LIMIT_S:
            raise TrainingError(
                f"training job {self.job_id}: Slurm's {exc.part} ({daemon}) has not answered "
                f"for {now - self.since:.0f}s (since {self.wall}); the job is left as it is: "
                f"re-run when it is back, the run reattaches to it or collects it with its "
                f"record (sacct -j {self.job_id})"
            )


def _poll_state(client: SlurmClient, job_id: str, outage: _Outage,
                last_state: str | None) -> str:  # fmt: skip
    """The job's state; while a Slurm daemon is unreachable, UNKNOWN (and said so)."""
    try:
        state = client.state(job_id)
    except SlurmUnreachable as exc:
        outage.down(exc, last_state)
        return "UNKNOWN"
    except SlurmCommandError as exc:
        outage.log(f"job {job_id}: state query failed, will retry ({exc})")
        return "UNKNOWN"
    outage.ok()
    return state


def _requeue_reason(client: SlurmClient, job_id: str) -> str:
    """Why the job's last attempt ended, from sacct's record of each attempt (-D): " after
    NODE_FAIL on aif-n2" (a node that died), " after REQUEUED on aif-n1" (scontrol requeue,
    a preemption); "" when the accounting does not say."""
    try:
        recs = client.sacct(("JobID", "State", "NodeList"), jobs=[job_id], args=["-D"])
    except SlurmError:
        return ""
    earlier = [r for r in recs if r.get("JobID") == job_id][:-1]
    if not earlier or not earlier[-1].get("State"):
        return ""
    last = earlier[-1]
    node = last.get("NodeList") or ""
    where = f" on {node}" if node and node != "None assigned" else ""
    return f" after {last['State']}{where}"


def _final_record(client: SlurmClient, job_id: str, outage: _Outage,
                  state: str) -> dict[str, str]:  # fmt: skip
    """sacct lags the end of a job by a few seconds, and its first record can lack fields
    (slurmdbd 22.05 fills Partition a second or two later): wait for a complete one. While
    the accounting does not answer (slurmdbd or its database down), wait for it, saying so:
    a job's record is its lineage, never skipped."""
    deadline = time.monotonic() + SACCT_WAIT_S
    rec: dict[str, str] | None = None
    while True:
        try:
            rec = client.sacct_record(job_id)
            outage.ok()
        except SlurmCommandError as exc:
            outage.down(SlurmUnreachable("accounting", exc), state)
            deadline = time.monotonic() + SACCT_WAIT_S
            rec = None
        if (
            rec
            and rec["State"] in TERMINAL_STATES
            and rec.get("End") not in ("", "Unknown")
            and rec.get("Partition")
        ):
            return rec
        if time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    return rec or {"JobID": job_id, "State": state}


def job_record(client: SlurmClient, job_id: str, log: Callable[[str], None]) -> dict[str, str]:
    """An ended job's sacct record, waited for (and said so) while the accounting is down."""
    return _final_record(client, job_id, _Outage(job_id, log), "UNKNOWN")


def _script_option(script_path: str, name: str) -> str:
    """The value of ``#SBATCH --name=value`` in the job script ('' if absent/unreadable)."""
    try:
        text = Path(script_path).read_text()
    except OSError:
        return ""
    m = re.search(rf"^#SBATCH --{re.escape(name)}=(\S+)", text, re.MULTILINE)
    return m.group(1) if m else ""


def _submit_or_reattach(
    client: SlurmClient, script_path: str, job_name: str, log: Callable[[str], None], what: str,
    detail: str = "",
) -> str:  # fmt: skip
    """The live job of this name (a re-run reattaches to it) or a new submission."""
    live = client.jobs_named(job_name)
    if live:
        log(f"reattaching to live {what} {live[0]} ({job_name}) instead of submitting")
        return live[0]
    job_id = client.submit(script_path)
    log(f"submitted {what} {job_id} ({job_name}){detail}")
    return job_id


def submit_and_watch(
    client: SlurmClient,
    script_path: str,
    run_dir: str,
    job_name: str,
    log: Callable[[str], None],
    poll_s: float = 1.0,
    cancel_event: threading.Event | None = None,
    max_resubmits: int = 0,
    on_job: Callable[[str], None] | None = None,
) -> tuple[str, dict[str, str]]:
    """Submit (or reattach to a live job of the same name), stream its log, wait for its end.

    A job that ends TIMEOUT, PREEMPTED, NODE_FAIL or after checkpointing without being
    requeued is submitted again, up to ``max_resubmits`` times (the payload resumes from its
    checkpoint); a requeue by Slurm keeps the same job and is followed through. Every job id
    goes to ``on_job``; the returned record carries ``aif_restarts`` (requeues seen plus
    resubmissions) and ``aif_jobs``.

    Returns (job id, sacct record) when the job COMPLETED; raises TrainingError otherwise.
    If the watcher is interrupted (KeyboardInterrupt, Prefect's termination, ``cancel_event``)
    the job is cancelled with it; if a Slurm command keeps failing, the job is left running
    and a re-run reattaches to it.
    """
    job_id = _submit_or_reattach(client, script_path, job_name, log, "Slurm job")
    jobs, restarts = [job_id], 0
    if on_job:
        on_job(job_id)
    while True:
        job_id, rec, requeues = _watch_one(client, job_id, script_path, run_dir, log, poll_s,
                                           cancel_event)  # fmt: skip
        restarts += requeues
        why = resubmit_reason(rec)
        if why is None or len(jobs) > max_resubmits:
            break
        log(f"job {job_id} {why} after {rec.get('Elapsed') or '?'}: resubmitting from its "
            f"checkpoint (resubmission {len(jobs)} of at most {max_resubmits})")  # fmt: skip
        job_id = client.submit(script_path)
        log(f"submitted Slurm job {job_id} ({job_name})")
        jobs.append(job_id)
        restarts += 1
        if on_job:
            on_job(job_id)
    rec = {**rec, "aif_restarts": str(restarts), "aif_jobs": ",".join(jobs)}
    if rec.get("State") != "COMPLETED":
        msg = failure_message(job_id, rec, rec.pop("aif_tail", ""))
        if len(jobs) > 1:
            msg += f" (after {len(jobs) - 1} resubmission(s): jobs {', '.join(jobs)})"
        raise TrainingError(msg)
    rec.pop("aif_tail", None)
    if restarts:
        log(f"training completed after {restarts} restart(s): jobs {', '.join(jobs)}")
    return job_id, rec


def _watch_one(
    client: SlurmClient, job_id: str, script_path: str, run_dir: str, log: Callable[[str], None],
    poll_s: float, cancel_event: threading.Event | None,
) -> tuple[str, dict[str, str], int]:  # fmt: skip
    """Follow one job to its end: (job id, sacct record with the log tail, requeues seen)."""
    tail = _LogTail(Path(run_dir) / f"slurm-{job_id}.out", log)
    requeues = 0
    ran = left = False
    last_state = None
    unknown_since: float | None = None
    cancelled = False
    outage = _Outage(job_id, log)
    try:
        while True:
            state = _poll_state(client, job_id, outage, last_state)
            if state == "UNKNOWN" and outage.part is not None:
                unknown_since = None  # a daemon is down: the job is not lost, wait for it
            elif state == "UNKNOWN":
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since > UNKNOWN_GRACE_S:
                    raise TrainingError(
                        f"training job {job_id}: neither squeue nor sacct has known it for "
                        f"{UNKNOWN_GRACE_S:.0f}s (is slurmdbd up? sacct -j {job_id})"
                    )
            else:
                unknown_since = None
            if state != last_state and state != "UNKNOWN":
                if state == "RUNNING":
                    if ran and left:  # running again after it had stopped: a requeue
                        requeues += 1
                        log(f"job {job_id}: requeued{_requeue_reason(client, job_id)} (restart "
                            f"{requeues}); it resumes from its checkpoint")  # fmt: skip
                    ran, left = True, False
                elif ran and state not in TERMINAL_STATES:
                    left = True  # COMPLETING, PENDING, REQUEUED…: it stopped running
                log(f"job {job_id}: {state}")
                last_state = state
            tail.poll()
            if state in TERMINAL_STATES:
                break
            if cancel_event is None:
                time.sleep(poll_s)
            elif cancel_event.wait(poll_s):
                cancelled = True
                break
        if not cancelled:
            rec = _final_record(client, job_id, outage, state)
            if not rec.get("Partition"):
                rec["Partition"] = _script_option(script_path, "partition")
            tail.poll()
    except Exception:
        # The watcher failed, not the job: leave it; the next run reattaches by name.
        if last_state not in TERMINAL_STATES:
            log(f"watcher stopped; Slurm job {job_id} left as it is (a re-run reattaches)")
        raise
    except BaseException:
        # Ctrl-C, Prefect cancellation (TerminationSignal), SystemExit: take the job with us.
        log(f"watcher interrupted: cancelling Slurm job {job_id}")
        try:
            client.cancel([job_id])
        except Exception as exc:  # report, but re-raise the interruption itself
            log(f"scancel {job_id} failed: {exc}")
        raise
    if cancelled:
        log(f"watcher cancelled: cancelling Slurm job {job_id}")
        client.cancel([job_id])
        raise TrainingError(f"training job {job_id} was cancelled with its watcher")
    # The job script reports SLURM_RESTART_COUNT: requeues too quick for a poll to see count.
    return job_id, {**rec, "aif_tail": tail.tail()}, max(requeues, tail.restart)


def watch_array(
    client: SlurmClient, script_path: str, job_name: str, n: int, max_parallel: int,
    log: Callable[[str], None], poll_s: float = 1.0, cancel_event: threading.Event | None = None,
    max_resubmits: int = 0, on_job: Callable[[str], None] | None = None,
) -> dict[int, dict[str, str]]:  # fmt: skip
    """Submit the array script (or reattach to a live array of the same name) and follow its
    ``n`` tasks to their end: task index -> sacct record (State, ExitCode, Elapsed, JobID).

    Tasks that ran out of time, were preempted or lost their node are submitted again
    together (``sbatch --array=<those>``, resuming from their checkpoints) up to
    ``max_resubmits`` times; other endings are the caller's to judge. Interrupted or
    cancelled, every array job is cancelled with the watcher.
    """
    first = _submit_or_reattach(client, script_path, job_name, log, "job array",
                                f": {n} tasks, at most {max(1, max_parallel)} at once "
                                "(one sbatch call)")  # fmt: skip
    jobs = [first]
    owner = dict.fromkeys(range(n), first)  # which array job runs each task now
    if on_job:
        on_job(first)
    records: dict[int, dict[str, str]] = {}
    outage = _Outage(f"array {first}", log)
    gone_since: float | None = None  # out of the queue, with tasks sacct has no end for yet
    last = ""
    try:
        while True:
            try:
                queued = client.squeue_states(jobs)
                for job in jobs:
                    for i, rec in client.array_records(job).items():
                        if owner.get(i) == job:
                            records[i] = rec
                outage.ok()
            except SlurmCommandError as exc:  # the jobs run on: wait for the daemon, saying so
                down = exc if isinstance(exc, SlurmUnreachable) else SlurmUnreachable(
                    "accounting", exc)  # fmt: skip
                outage.down(down, None)
                queued = dict.fromkeys(jobs, "UNKNOWN")
            ended = {i for i, r in records.items() if r["State"] in TERMINAL_STATES}
            summary = f"job array {first}: {len(ended)}/{n} tasks ended"
            if summary != last:
                log(summary)
                last = summary
            if not queued and len(ended) == n:
                again = sorted(i for i in ended if resubmit_reason(records[i]))
                if not again or len(jobs) > max_resubmits:
                    break
                spec = ",".join(str(i) for i in again) + f"%{max(1, max_parallel)}"
                job = client.submit(script_path, [f"--array={spec}"])
                log(f"tasks {spec.split('%')[0]} ended {records[again[0]]['State']}: "
                    f"resubmitted as job array {job} from their checkpoints "
                    f"(resubmission {len(jobs)} of at most {max_resubmits})")  # fmt: skip
                jobs.append(job)
                for i in again:
                    owner[i] = job
                    records.pop(i)
                if on_job:
                    on_job(job)
            elif not queued:  # sacct lags the queue by a few seconds
                gone_since = gone_since or time.monotonic()
                if time.monotonic() - gone_since > SACCT_WAIT_S:
                    gone = sorted(set(range(n)) - ended)
                    raise TrainingError(
                        f"job array {first}: left the queue but sacct has "
                        f"no end for tasks {gone[:10]} (sacct -j {first})"
                    )
            else:
                gone_since = None
            if cancel_event is None:
                time.sleep(poll_s)
            elif cancel_event.wait(poll_s):
                log(f"watcher cancelled: cancelling job array(s) {', '.join(jobs)}")
                client.cancel(jobs)
                raise TrainingError(f"job array {first} was cancelled with its watcher")
    except Exception:
        raise  # the watcher failed, not the jobs: a re-run reattaches by name
    except BaseException:
        log(f"watcher interrupted: cancelling job array(s) {', '.join(jobs)}")
        try:
            client.cancel(jobs)
        except Exception as exc:
            log(f"scancel {' '.join(jobs)} failed: {exc}")
        raise
    return records
