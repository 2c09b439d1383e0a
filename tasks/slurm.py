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

from aifactory.tasks.errors import SlurmCommandError, SlurmError

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
    def squeue_state(self, job_id: str) -> str | None:
        """The job's state from squeue, or None when squeue no longer knows it."""
        out = self.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False)
        states = [s.strip() for s in out.splitlines() if s.strip()]
        return states[0] if states else None

    def sacct_record(self, job_id: str) -> dict[str, str] | None:
        """The allocation's sacct record (state, exit code, elapsed, TRES...), or None."""
        fields = [
            "JobID", "JobName", "Account", "Partition", "State", "ExitCode", "Elapsed",
            "AllocTRES", "MaxRSS", "NodeList", "Start", "End", "Submit",
        ]  # fmt: skip
        out = self.run(["sacct", "-n", "-P", "-X", "-j", job_id, "--format", ",".join(fields)])
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) == len(fields) and parts[0] == job_id:
                rec = dict(zip(fields, parts, strict=True))
                rec["State"] = rec["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
                rec["StateDetail"] = line.split("|")[4]
                return rec
        return None

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
            left = [j for j in left if self.squeue_state(j)]
            if left:
                time.sleep(0.5)
        return left


def client_for(env: Mapping[str, str], bin_dir: str | None = None) -> SlurmClient:
    return SlurmClient(env=dict(env), bin_dir=bin_dir)
