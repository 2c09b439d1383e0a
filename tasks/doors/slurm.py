"""One door to the scheduler: every Slurm command goes through :func:`run`.

``run`` raises :class:`SlurmCommandError` with the command, exit code, stdout and stderr.
Job states come from squeue while the job is known there, then from sacct.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aifactory.tasks.core.errors import SlurmCommandError, SlurmError

# States in which a job is still alive (squeue's long names).
ACTIVE_STATES = {
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD",
    "STOPPED",
}  # fmt: skip
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT",
}  # fmt: skip

_JOB_ID = re.compile(r"^(\d+)(?:;\S+)?$")
# What a job's record holds (sacct_record): its state, ending and what it was given.
SACCT_FIELDS = (
    "JobID", "JobName", "Account", "Partition", "State", "ExitCode", "Elapsed", "ElapsedRaw",
    "AllocTRES", "MaxRSS", "NodeList", "Start", "End", "Submit",
)  # fmt: skip


@dataclass
class SlurmClient:
    """Slurm commands with a fixed environment (SLURM_CONF, PATH) and timeouts."""

    env: Mapping[str, str] = field(default_factory=dict)
    bin_dir: str | None = None
    timeout: float = 60.0

    def _exe(self, name: str) -> str:
        if self.bin_dir:
            return os.path.join(self.bin_dir, name)
        return name

    def run(self, cmd: Sequence[str], *, check: bool = True, timeout: float | None = None) -> str:
        """Run one Slurm command; raise with command, exit code, stdout and stderr."""
        argv = [self._exe(cmd[0]), *cmd[1:]]
        if shutil.which(argv[0]) is None:
            raise SlurmError(
                f"slurm command {cmd[0]!r} not found on PATH: is Slurm installed on this host? "
                "(for the local site: aif site up)"
            )
        env = {**os.environ, **self.env}
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, env=env, timeout=timeout or self.timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmCommandError(
                list(argv), -1, str(exc.stdout or ""), f"timed out after {exc.timeout}s"
            ) from None
        if check and proc.returncode != 0:
            raise SlurmCommandError(list(argv), proc.returncode, proc.stdout, proc.stderr)
        return proc.stdout

    # -- submission ---------------------------------------------------------------------
    def submit(self, script: str, extra_args: Sequence[str] = ()) -> str:
        """sbatch the script with the job's working directory set to the script's folder
        (given here, as an argument, not in the script: ``#SBATCH`` lines split at spaces,
        so a run folder such as ``/home/me/my runs/`` could not be written there). The
        scripts' ``--output`` names are relative to it, so they land beside the script."""
        chdir = f"--chdir={os.path.dirname(os.path.abspath(script))}"
        out = self.run(["sbatch", "--parsable", chdir, *extra_args, script])
        line = out.strip().splitlines()[-1] if out.strip() else ""
        m = _JOB_ID.match(line)
        if not m:
            raise SlurmError(f"sbatch {script}: could not parse a job id from its output {out!r}")
        return m.group(1)

    def cancel(self, job_ids: Sequence[str], signal: str | None = None) -> None:
        if not job_ids:
            return
        args = ["scancel"]
        if signal:
            args += ["--signal", signal]
        self.run([*args, *job_ids])

    # -- state --------------------------------------------------------------------------
    def squeue_states(self, job_ids: Sequence[str]) -> dict[str, str]:
        """Live jobs among ``job_ids`` and their states, in one squeue call (an array job's
        tasks show under the array's id). Jobs squeue no longer knows are absent."""
        if not job_ids:
            return {}
        out = self.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%A|%T"], check=False)
        states: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) != 3:
                continue
            shown, own_id, state = parts
            for jid in (shown.split("_", 1)[0], own_id):
                if jid in job_ids:
                    states.setdefault(jid, state)
        return states

    def squeue_state(self, job_id: str) -> str | None:
        """The job's state from squeue, or None when squeue no longer knows it."""
        return self.squeue_states([job_id]).get(job_id)

    def sacct(
        self, fields: Sequence[str], *, jobs: Sequence[str] = (), args: Sequence[str] = (),
        allocations: bool = True,
    ) -> list[dict[str, str]]:  # fmt: skip
        """sacct's records, each a dict keyed by sacct's own header row (never by position:
        a field sacct renames or adds cannot shift the others). ``jobs``: these job ids;
        ``args``: other filters (``-a``, ``--starttime``, ``--accounts``); ``allocations``:
        one record per allocation (``-X``), not per step. ``State`` keeps sacct's full text
        ("CANCELLED by 0") in ``StateDetail``; ``State`` itself is its first word."""
        argv = ["sacct", "-P", "--format", ",".join(fields)]
        if allocations:
            argv.append("-X")
        if jobs:
            argv += ["-j", ",".join(jobs)]
        out = self.run([*argv, *args])
        lines = [ln for ln in out.splitlines() if ln.strip()]
        if not lines:
            return []
        header = lines[0].split("|")
        if [h.strip() for h in header] != [f.split("%")[0] for f in fields]:
            raise SlurmError(f"sacct: unexpected header {lines[0]!r} for fields {list(fields)}")
        records = []
        for line in lines[1:]:
            parts = line.split("|")
            if len(parts) != len(header):
                continue
            rec = dict(zip(header, parts, strict=True))
            if "State" in rec:
                rec["StateDetail"] = rec["State"]
                rec["State"] = rec["State"].split()[0] if rec["State"] else ""
            records.append(rec)
        return records

    def sacct_record(self, job_id: str) -> dict[str, str] | None:
        """The allocation's sacct record (state, exit code, elapsed, TRES...), or None."""
        for rec in self.sacct(SACCT_FIELDS, jobs=[job_id]):
            if rec["JobID"] == job_id:
                return rec
        return None

    def array_records(self, job_id: str) -> dict[int, dict[str, str]]:
        """An array job's tasks that sacct knows (pending ones may be absent): task index ->
        JobID, State, ExitCode, Elapsed (one sacct call)."""
        found: dict[int, dict[str, str]] = {}
        for rec in self.sacct(("JobID", "State", "ExitCode", "Elapsed"), jobs=[job_id]):
            base, sep, idx = rec["JobID"].partition("_")
            if base == job_id and sep and idx.isdigit():
                found[int(idx)] = rec
        return found

    def state(self, job_id: str) -> str:
        """squeue while known, then sacct; 'UNKNOWN' if neither knows the job yet."""
        st = self.squeue_state(job_id)
        if st:
            return st
        rec = self.sacct_record(job_id)
        return rec["State"] if rec else "UNKNOWN"

    def jobs_named(self, name: str) -> list[str]:
        """Live job ids whose name is ``name`` (for reattachment and cleanup)."""
        out = self.run(["squeue", "-h", "--name", name, "-o", "%i"], check=False)
        return [j.strip() for j in out.splitlines() if j.strip()]

    def wait_gone(self, job_ids: Sequence[str], timeout: float = 30.0) -> list[str]:
        """Wait until none of ``job_ids`` is in squeue; return those still there."""
        deadline = time.monotonic() + timeout
        left = list(job_ids)
        while left and time.monotonic() < deadline:
            live = self.squeue_states(left)
            left = [j for j in left if j in live]
            if left:
                time.sleep(0.5)
        return left


def client_for(env: Mapping[str, str], bin_dir: str | None = None) -> SlurmClient:
    return SlurmClient(env=dict(env), bin_dir=bin_dir)
