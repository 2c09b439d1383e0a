"""Training: render the sbatch script, submit it (or run locally), watch it to the end.

Generic resource names from :class:`TrainingSpec` are translated to Slurm's here. The run
directory (``<runs_dir>/train/<run_key>``) keeps the rendered script, the config, the job's
log, checkpoints and outputs. The job's name carries the run key, so a second call with the
same key reattaches to a live job, and a finished run is collected instead of run again.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from tasks.config import TrainingSpec
from tasks.errors import ConfigError, SlurmCommandError, TrainingError
from tasks.lake import atomic_write_bytes
from tasks.manifests import FeatureSet, TrainedModel
from tasks.provenance import environment_hash, now_iso
from tasks.slurm import TERMINAL_STATES, SlurmClient

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "templates" / "train.sbatch"
PAYLOADS = {"tabular": "train_tabular", "lm": "train_lm"}
SIGNAL_BEFORE_END_S = 60
TAIL_LINES = 8
UNKNOWN_GRACE_S = 120.0
SACCT_WAIT_S = 30.0
EXIT_REQUEUE = 99  # the payload checkpointed after SIGUSR1/SIGTERM
HYPERPARAMS = ("epochs", "batch_size", "hidden", "lr", "seed")
# Environment names that must never be written into a job script (they travel with sbatch's
# default --export=ALL from the submitting environment instead).
_SECRET_NAME = re.compile(r"SECRET|PASSW|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LOCAL = LocalFileSystem()


def slurm_time(minutes: int) -> str:
    """Minutes as Slurm's --time: HH:MM:SS, or D-HH:MM:SS from one day on."""
    d, rem = divmod(minutes, 24 * 60)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def sbatch_options(spec: TrainingSpec) -> dict[str, str]:
    """Generic resource names in, Slurm's names out (only the options the spec sets)."""
    opts = {
        "partition": spec.partition,
        "nodes": str(spec.nodes),
        "ntasks-per-node": "1",
        "cpus-per-task": str(spec.cpus_per_task),
        "mem": f"{int(spec.mem_gb * 1024)}M",
        "time": slurm_time(spec.timeout_min),
    }
    if spec.gpus_per_node:
        opts["gres"] = f"gpu:{spec.gpus_per_node}"
    if spec.qos:
        opts["qos"] = spec.qos
    if spec.constraint:
        opts["constraint"] = spec.constraint
    return opts


def _check_env(env: Mapping[str, str]) -> None:
    for name in env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"training.env: {name!r} is not a valid environment variable name")
        if _SECRET_NAME.search(name):
            raise ConfigError(
                f"training.env.{name} looks like a secret: job scripts are kept with the run, "
                "so pass it through the submitting environment (sbatch exports it) instead"
            )


def render_sbatch(
    spec: TrainingSpec, *, account: str, job_name: str, run_dir: str, python: str,
    featureset_path: str, config_path: str, run_key: str | None = None,
    payload_args: Sequence[str] | None = None,
) -> str:  # fmt: skip
    """The job script for this spec (generic names in, Slurm's names out); no secrets.

    ``payload_args`` replaces the tabular payload's arguments (--featureset, --run-dir,
    --config) for payloads that take other inputs, such as the language model's --data.
    """
    if payload_args is None:
        payload_args = ["--featureset", featureset_path, "--run-dir", run_dir,
                        "--config", config_path]  # fmt: skip
    if any(c.isspace() for c in run_dir):
        raise ConfigError(f"run directory {run_dir!r} contains whitespace: Slurm's --output "
                          "cannot hold it; choose a runs_dir without spaces")  # fmt: skip
    _check_env(spec.env)
    opts = sbatch_options(spec)
    optional = [f"#SBATCH --{k}={opts[k]}" for k in ("qos", "constraint") if k in opts]
    values = {
        "run_key": run_key or job_name,
        "job_name": job_name,
        "account": account,
        "partition": opts["partition"],
        "gres_line": f"#SBATCH --gres={opts['gres']}\n" if "gres" in opts else "",
        "nodes": opts["nodes"],
        "cpus_per_task": opts["cpus-per-task"],
        "mem": opts["mem"],
        "time": opts["time"],
        "run_dir": run_dir,
        "signal_s": SIGNAL_BEFORE_END_S,
        "optional_lines": "\n".join(optional),
        "module_lines": "".join(f"module load {m}\n" for m in spec.modules),
        "setup_lines": "".join(f"{line}\n" for line in spec.setup),
        "env_lines": "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(spec.env.items())),
        "run_dir_sh": shlex.quote(run_dir),
        "python": shlex.quote(python),
        "payload": PAYLOADS[spec.payload],
        "payload_args": " ".join(shlex.quote(a) for a in payload_args),
    }
    text = string.Template(TEMPLATE.read_text()).substitute(values)
    return "\n".join(line for line in text.splitlines() if line != "") + "\n"


# -- watching a Slurm job -----------------------------------------------------------------
class _LogTail:
    """Follows a growing log file and hands each new complete line to ``log``."""

    def __init__(self, path: Path, log: Callable[[str], None]) -> None:
        self.path, self.log, self.pos, self.buf = path, log, 0, ""
        self.lines: list[str] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, errors="replace") as fh:
            fh.seek(self.pos)
            chunk = fh.read()
            self.pos = fh.tell()
        self.buf += chunk
        *complete, self.buf = self.buf.split("\n")
        for line in complete:
            self.lines.append(line)
            self.log(line)
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
        return f"{where} was CANCELLED{who} after {elapsed}; log tail: {tail}"
    code = rec.get("ExitCode") or "?"
    hint = ""
    if code.split(":")[0] == str(EXIT_REQUEUE):
        hint = " (the payload checkpointed after a signal and was not requeued: re-run to resume)"
    return f"{where} ended {state} (exit code {code}){hint} after {elapsed}; log tail: {tail}"


def _poll_state(client: SlurmClient, job_id: str, log: Callable[[str], None]) -> str:
    """The job's state; a failing squeue/sacct (slurmdbd restarting) reads as UNKNOWN."""
    try:
        return client.state(job_id)
    except SlurmCommandError as exc:
        log(f"job {job_id}: state query failed, will retry ({exc})")
        return "UNKNOWN"


def _final_record(client: SlurmClient, job_id: str) -> dict[str, str]:
    """sacct lags the end of a job by a few seconds, and its first record can lack fields
    (slurmdbd 22.05 fills Partition a second or two later): wait for a complete one."""
    deadline = time.monotonic() + SACCT_WAIT_S
    rec: dict[str, str] | None = None
    while True:
        try:
            rec = client.sacct_record(job_id)
        except SlurmCommandError:
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
    return rec or {"JobID": job_id, "State": _poll_state(client, job_id, lambda _m: None)}


def _script_option(script_path: str, name: str) -> str:
    """The value of ``#SBATCH --name=value`` in the job script ('' if absent/unreadable)."""
    try:
        text = Path(script_path).read_text()
    except OSError:
        return ""
    m = re.search(rf"^#SBATCH --{re.escape(name)}=(\S+)", text, re.MULTILINE)
    return m.group(1) if m else ""


def submit_and_watch(
    client: SlurmClient,
    script_path: str,
    run_dir: str,
    job_name: str,
    log: Callable[[str], None],
    poll_s: float = 1.0,
    cancel_event: threading.Event | None = None,
) -> tuple[str, dict[str, str]]:
    """Submit (or reattach to a live job of the same name), stream its log, wait for its end.

    Returns (job id, sacct record) when the job COMPLETED; raises TrainingError otherwise.
    If the watcher is interrupted (KeyboardInterrupt, Prefect's termination, ``cancel_event``)
    the job is cancelled with it; if a Slurm command keeps failing, the job is left running
    and a re-run reattaches to it.
    """
    live = client.jobs_named(job_name)
    if live:
        job_id = live[0]
        log(f"reattaching to live Slurm job {job_id} ({job_name}) instead of submitting")
    else:
        job_id = client.submit(script_path)
        log(f"submitted Slurm job {job_id} ({job_name})")
    tail = _LogTail(Path(run_dir) / f"slurm-{job_id}.out", log)
    last_state = None
    unknown_since: float | None = None
    cancelled = False
    try:
        while True:
            state = _poll_state(client, job_id, log)
            if state == "UNKNOWN":
                unknown_since = unknown_since or time.monotonic()
                if time.monotonic() - unknown_since > UNKNOWN_GRACE_S:
                    raise TrainingError(
                        f"training job {job_id}: neither squeue nor sacct has known it for "
                        f"{UNKNOWN_GRACE_S:.0f}s (is slurmdbd up? sacct -j {job_id})"
                    )
            else:
                unknown_since = None
            if state != last_state:
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
            rec = _final_record(client, job_id)
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
    if rec.get("State") != "COMPLETED":
        raise TrainingError(failure_message(job_id, rec, tail.tail()))
    return job_id, rec


# -- running locally ------------------------------------------------------------------------
def payload_command(
    spec: TrainingSpec, python: str, featureset_path: str, run_dir: str, config_path: str
) -> list[str]:
    module = f"tasks.payloads.{PAYLOADS[spec.payload]}"
    return [python, "-m", module, "--featureset", featureset_path, "--run-dir", run_dir,
            "--config", config_path]  # fmt: skip


def run_local(cmd: list[str], run_dir: str, env: Mapping[str, str],
              log: Callable[[str], None]) -> None:  # fmt: skip
    """Run the payload as a local process, streaming its output to ``log`` and local.out.

    Raises TrainingError with the exit code and the log tail on failure. Interrupted, it
    sends the payload SIGTERM (it checkpoints and exits 99), then re-raises.
    """
    import os

    lines: list[str] = []
    with open(Path(run_dir) / "local.out", "a") as out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env}, cwd=run_dir,
        )  # fmt: skip
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


# -- the stage --------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    atomic_write_bytes(_LOCAL, str(path), text.encode())


def _collect(run_dir: Path, run_key: str, fset: FeatureSet, spec: TrainingSpec, executor: str,
             job_ids: list[str], sacct: dict[str, str], t0: float) -> TrainedModel:  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    env_path = run_dir / "environment.json"
    env: dict[str, Any] = json.loads(env_path.read_text()) if env_path.exists() else {}
    # The software, not the host or the job: the same packages give the same hash anywhere.
    software: dict[str, Any] = {k: env[k] for k in ("python", "packages") if k in env}
    return TrainedModel(
        run_key=run_key,
        featureset_id=fset.featureset_id,
        featureset_hash=fset.content_hash(),
        run_dir=str(run_dir),
        model_path=str(run_dir / "model.pt"),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        params={
            **{k: getattr(spec, k) for k in HYPERPARAMS},
            "partition": spec.partition,
            "gpus_per_node": spec.gpus_per_node,
            "payload": spec.payload,
            "device": str(metrics.get("device", env.get("device", "?"))),
        },
        executor=executor,
        slurm_job_ids=job_ids,
        sacct=sacct,
        environment_hash=environment_hash(software) if software else "",
        weights_sha256=(run_dir / "weights.sha256").read_text().strip(),
        created_at=now_iso(),
        duration_s=round(time.monotonic() - t0, 3),
    )


def train(
    *, spec: TrainingSpec, account: str, featureset: FeatureSet, runs_dir: str, run_key: str,
    slurm: SlurmClient | None, env: Mapping[str, str], log: Callable[[str], None] = print,
    cancel_event: threading.Event | None = None, python: str = sys.executable,
) -> TrainedModel:  # fmt: skip
    """Train once per run key: reuse a finished run, reattach to a live job, or start one.

    ``env`` (object-store credentials, SLURM_CONF) goes to the local process or to the
    Slurm client's environment, from which sbatch exports it: never into the script.
    """
    if spec.payload != "tabular":
        raise ConfigError(
            f"training.payload {spec.payload!r}: the pipeline trains the tabular payload; "
            "run the language model with `aif train-lm`"
        )
    t0 = time.monotonic()
    run_dir = Path(runs_dir) / "train" / run_key
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "aif-train.json"
    done = run_dir / "metrics.json"
    if done.exists() and (run_dir / "model.pt").exists():
        prior = json.loads(state_path.read_text()) if state_path.exists() else {}
        log(f"run {run_key} already finished: collecting it, nothing submitted")
        return _collect(run_dir, run_key, featureset, spec, prior.get("executor", "?"),
                        prior.get("job_ids", []), prior.get("sacct", {}), t0)  # fmt: skip

    fs_path = run_dir / "featureset.json"
    _write(fs_path, featureset.to_json())
    cfg_path = run_dir / "config.json"
    _write(cfg_path, json.dumps({k: getattr(spec, k) for k in HYPERPARAMS}, indent=2))
    job_name = f"aif-train-{run_key}"
    script = render_sbatch(
        spec, account=account, job_name=job_name, run_key=run_key, run_dir=str(run_dir),
        python=python, featureset_path=str(fs_path), config_path=str(cfg_path),
    )  # fmt: skip
    script_path = run_dir / "train.sbatch"
    _write(script_path, script)

    job_ids: list[str] = []
    sacct: dict[str, str] = {}
    if spec.executor == "local":
        log(f"training locally in {run_dir}")
        cmd = payload_command(spec, python, str(fs_path), str(run_dir), str(cfg_path))
        run_local(cmd, str(run_dir), env, log)
    else:
        if slurm is None:
            raise TrainingError("training.executor is slurm but no Slurm client was given")
        log(f"Slurm job {job_name}: account {account}, partition {spec.partition}, "
            f"gres gpu:{spec.gpus_per_node}, script {script_path}")  # fmt: skip
        job_id, sacct = submit_and_watch(slurm, str(script_path), str(run_dir), job_name, log,
                                         spec.poll_seconds, cancel_event)  # fmt: skip
        job_ids = [job_id]
    _write(state_path, json.dumps({"executor": spec.executor, "job_ids": job_ids,
                                   "sacct": sacct}, indent=2))  # fmt: skip
    if not done.exists():
        raise TrainingError(f"training in {run_dir} ended without writing metrics.json")
    return _collect(run_dir, run_key, featureset, spec, spec.executor, job_ids, sacct, t0)
