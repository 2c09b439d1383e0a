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
from pathlib import Path
from typing import ClassVar

from aifactory.tasks.core.errors import SlurmCommandError, SlurmError


class SlurmUnreachable(SlurmCommandError):
    """A Slurm daemon did not answer: ``part`` is "controller" (slurmctld, squeue failed)
    or "accounting" (slurmdbd or its database, sacct failed). The jobs themselves go on."""

    DAEMON: ClassVar[dict[str, str]] = {"controller": "slurmctld",
                                        "accounting": "slurmdbd or its database"}  # fmt: skip

    def __init__(self, part: str, exc: SlurmCommandError) -> None:
        super().__init__(exc.cmd, exc.returncode, exc.stdout, exc.stderr)
        self.part = part
        said = (exc.stderr.strip() or exc.stdout.strip()).splitlines()
        self.reason = f"{Path(exc.cmd[0]).name if exc.cmd else 'slurm'}: " + (
            said[-1] if said else f"exit code {exc.returncode}")  # fmt: skip


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


# What every job gets from the submitting environment besides SLURM_* (which Slurm always
# passes) and the client's own ``env`` (object-store endpoint and keys, SLURM_CONF): what a
# shell, Python and module-built software stacks need, never a secret.
JOB_ENV = (
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
    "TERM", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "MODULEPATH", "MODULESHOME",
)  # fmt: skip


def run_as_args(user: str, cmd: Sequence[str], env: dict[str, str]) -> list[str]:
    """sbatch's --uid/--gid for ``user``; ``env`` gets the user's HOME, USER and LOGNAME;
    the job's --chdir folder is handed to the user (owner, mode 700: no other start-up can
    read its checkpoints, logs or outputs). Raises SlurmError if the user does not exist."""
    import grp
    import pwd

    try:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(user).gr_gid
    except KeyError:
        raise SlurmError(
            f"start-up Unix user {user!r} does not exist on this host (the site makes one per "
            "start-up at `aif site up`; startups.<id>.user)"
        ) from None
    env.update(HOME=pw.pw_dir, USER=user, LOGNAME=user)
    for a in cmd:
        if str(a).startswith("--chdir="):
            hand_over(str(a).split("=", 1)[1], pw.pw_uid, gid)
    return [f"--uid={user}", f"--gid={user}"]


def hand_over(folder: str, uid: int, gid: int) -> None:
    """Make ``folder`` and everything in it the start-up's (links are changed themselves,
    never followed: a link planted in the folder cannot hand over what it points to)."""
    os.makedirs(folder, exist_ok=True)
    os.chown(folder, uid, gid, follow_symlinks=False)
    os.chmod(folder, 0o700)
    # By descriptor: a folder that the start-up's running code swaps for a link while this
    # walks (a resubmission hands the folder over again) is not followed.
    for _root, dirs, files, dir_fd in os.fwalk(folder, follow_symlinks=False):
        for name in dirs + files:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


@dataclass
class SlurmClient:
    """Slurm commands with a fixed environment (SLURM_CONF, PATH) and timeouts.

    Every ``sbatch`` gets ``--export=<names>``: a job sees only the variables in
    :data:`JOB_ENV`, the client's ``env`` and ``export`` (a profile's ``slurm.export``), with
    their values from the submitting environment, never the rest of it (sbatch's default,
    ``--export=ALL``, copied every secret of the flow's process into every job, where a
    start-up's own code could read it)."""

    env: Mapping[str, str] = field(default_factory=dict)
    bin_dir: str | None = None
    timeout: float = 60.0
    export: Sequence[str] = ()
    # The start-up's Unix user (and group of that name) its jobs run as: sbatch gets
    # --uid/--gid (root only), HOME/USER/LOGNAME are the user's, and the job's folder
    # (--chdir) is handed to it, mode 700, before the job starts.
    run_as: str | None = None

    def export_option(self, environ: Mapping[str, str]) -> str:
        """sbatch's ``--export`` for ``environ``: the allowed names that it sets (values
        travel in sbatch's environment, never on its command line)."""
        names = [n for n in dict.fromkeys([*JOB_ENV, *self.env, *self.export])
                 if n in environ and not n.startswith("SLURM_")]  # fmt: skip
        return "--export=" + ",".join(names or ["PATH"])

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
        if cmd[0] == "sbatch" and self.run_as:
            argv[1:1] = run_as_args(self.run_as, cmd, env)
        if cmd[0] == "sbatch" and not any(str(a).startswith("--export") for a in cmd):
            argv.insert(1, self.export_option(env))
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
    def squeue_states(self, job_ids: Sequence[str], all_states: bool = False) -> dict[str, str]:
        """Jobs among ``job_ids`` that the controller knows and their states, in one squeue
        call (an array job's tasks show under the array's id). Jobs squeue no longer knows
        are absent; ``all_states`` includes the ended jobs it still keeps (MinJobAge), so a
        job's end is known even while the accounting is down. A controller that does not
        answer raises :class:`SlurmUnreachable` (``part`` "controller")."""
        if not job_ids:
            return {}
        argv = ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%A|%T"]
        try:
            out = self.run([*argv, *(["-t", "all"] if all_states else [])])
        except SlurmCommandError as exc:
            if "invalid job id" in exc.stderr.lower():
                return {}  # none of them is known any more
            raise SlurmUnreachable("controller", exc) from None
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

    def squeue_state(self, job_id: str, all_states: bool = False) -> str | None:
        """The job's state from squeue, or None when squeue no longer knows it."""
        return self.squeue_states([job_id], all_states).get(job_id)

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
        """squeue while the controller knows the job (ended ones too), then sacct; 'UNKNOWN'
        if neither knows it yet. Raises :class:`SlurmUnreachable` naming the part that did
        not answer (the controller, or the accounting once the controller forgot the job)."""
        st = self.squeue_state(job_id, all_states=True)
        if st:
            return st
        try:
            rec = self.sacct_record(job_id)
        except SlurmCommandError as exc:
            raise SlurmUnreachable("accounting", exc) from None
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
            try:
                live = self.squeue_states(left)
            except SlurmUnreachable:
                live = dict.fromkeys(left, "UNKNOWN")  # not known to be gone
            left = [j for j in left if j in live]
            if left:
                time.sleep(0.5)
        return left
