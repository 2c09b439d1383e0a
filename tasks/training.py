"""Training: render the sbatch script, submit it (or run locally), watch it to the end.

Generic resource names from :class:`TrainingSpec` are translated to Slurm's here. The run
directory (``<runs_dir>/<run_key>``) keeps the rendered script, the config, the job's log,
checkpoints and outputs. The job's name carries the run key, so a second call with the same
key reattaches to a live job, and a finished run is collected instead of run again.
"""

from __future__ import annotations

import json
import shlex
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tasks.config import TrainingSpec
from tasks.errors import TrainingError
from tasks.manifests import FeatureSet, TrainedModel
from tasks.provenance import environment_hash, now_iso
from tasks.slurm import TERMINAL_STATES, SlurmClient

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "templates" / "train.sbatch"
PAYLOADS = {"tabular": "train_tabular"}
SIGNAL_BEFORE_END_S = 60
TAIL_LINES = 8
UNKNOWN_GRACE_S = 120.0
HYPERPARAMS = ("epochs", "batch_size", "hidden", "lr", "seed")


def slurm_time(minutes: int) -> str:
    d, rem = divmod(minutes, 24 * 60)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def render_sbatch(
    spec: TrainingSpec, *, account: str, job_name: str, run_key: str, run_dir: str,
    python: str, featureset_path: str, config_path: str,
) -> str:  # fmt: skip
    """The job script for this spec (generic names in, Slurm's names out)."""
    optional = []
    if spec.qos:
        optional.append(f"#SBATCH --qos={spec.qos}")
    if spec.constraint:
        optional.append(f"#SBATCH --constraint={spec.constraint}")
    env_lines = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(spec.env.items()))
    values = {
        "run_key": run_key,
        "job_name": job_name,
        "account": account,
        "partition": spec.partition,
        "gres_line": f"#SBATCH --gres=gpu:{spec.gpus_per_node}\n" if spec.gpus_per_node else "",
        "nodes": spec.nodes,
        "cpus_per_task": spec.cpus_per_task,
        "mem_mb": int(spec.mem_gb * 1024),
        "time": slurm_time(spec.timeout_min),
        "run_dir": run_dir,
        "signal_s": SIGNAL_BEFORE_END_S,
        "optional_lines": "\n".join(optional),
        "module_lines": "".join(f"module load {m}\n" for m in spec.modules),
        "setup_lines": "".join(f"{line}\n" for line in spec.setup),
        "env_lines": env_lines,
        "python": python,
        "payload": PAYLOADS[spec.payload],
        "featureset": featureset_path,
        "config": config_path,
    }
    text = string.Template(TEMPLATE.read_text()).substitute(values)
    return "\n".join(line for line in text.splitlines() if line != "") + "\n"


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

    def tail(self, n: int = TAIL_LINES) -> str:
        lines = [ln for ln in [*self.lines, self.buf] if ln.strip()]
        return " | ".join(lines[-n:]) or "(empty log)"


def _failure(job_id: str, spec: TrainingSpec, rec: Mapping[str, str], tail: str) -> str:
    state = rec.get("State", "UNKNOWN")
    where = f"training job {job_id} on partition {spec.partition}"
    if state == "OUT_OF_MEMORY":
        rss = rec.get("MaxRSS") or "?"
        return (f"{where} ran out of memory (requested {spec.mem_gb} GB, MaxRSS {rss}): "
                f"raise training.mem_gb; log tail: {tail}")  # fmt: skip
    if state == "TIMEOUT":
        limit, elapsed = slurm_time(spec.timeout_min), rec.get("Elapsed", "?")
        return (f"{where} hit its time limit of {limit} after {elapsed}: "
                f"raise training.timeout_min; log tail: {tail}")  # fmt: skip
    if state == "CANCELLED":
        detail = rec.get("StateDetail", "CANCELLED")
        return (f"{where} was cancelled ({detail}, at {rec.get('End', '?')}); "
                f"log tail: {tail}")  # fmt: skip
    return (f"{where} ended {state} (exit code {rec.get('ExitCode', '?')}, elapsed "
            f"{rec.get('Elapsed', '?')}); log tail: {tail}")  # fmt: skip


def submit_and_watch(
    client: SlurmClient, script_path: str, run_dir: str, job_name: str, spec: TrainingSpec,
    log: Callable[[str], None], cancel_event: threading.Event | None = None,
) -> tuple[str, dict[str, str]]:  # fmt: skip
    """Submit (or reattach), follow the log, return (job id, sacct record) on COMPLETED."""
    live = client.jobs_named(job_name)
    if live:
        job_id = live[0]
        log(f"reattaching to live Slurm job {job_id} ({job_name}) instead of submitting")
    else:
        job_id = client.submit(script_path)
        log(f"submitted Slurm job {job_id} ({job_name}) to partition {spec.partition}")
    tail = _LogTail(Path(run_dir) / f"slurm-{job_id}.out", log)
    last_state = None
    unknown_since: float | None = None
    try:
        while True:
            state = client.state(job_id)
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
            if cancel_event is not None and cancel_event.is_set():
                raise KeyboardInterrupt
            time.sleep(spec.poll_seconds)
        rec = _final_record(client, job_id)
        tail.poll()
    except BaseException:
        # The watcher stops (Prefect cancellation, Ctrl-C, crash): take the job with it.
        if client.squeue_state(job_id):
            log(f"cancelling Slurm job {job_id}")
            client.cancel([job_id])
        raise
    if rec.get("State") != "COMPLETED":
        raise TrainingError(_failure(job_id, spec, rec, tail.tail()))
    return job_id, rec


def _final_record(client: SlurmClient, job_id: str, wait_s: float = 30.0) -> dict[str, str]:
    """sacct can lag the end of a job by a few seconds: wait for a terminal record."""
    deadline = time.monotonic() + wait_s
    rec: dict[str, str] | None = None
    while time.monotonic() < deadline:
        rec = client.sacct_record(job_id)
        if rec and rec["State"] in TERMINAL_STATES and rec.get("End") not in ("", "Unknown"):
            return rec
        time.sleep(1.0)
    return rec or {"JobID": job_id, "State": client.state(job_id)}


def run_local(cmd: list[str], run_dir: str, env: Mapping[str, str],
              log: Callable[[str], None]) -> None:  # fmt: skip
    """Run the payload as a local process, streaming its output to ``log``."""
    import os

    log_path = Path(run_dir) / "local.out"
    lines: list[str] = []
    with open(log_path, "a") as out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **env}, cwd=run_dir,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                out.write(line + "\n")
                lines.append(line)
                log(line)
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait(timeout=30)
            raise
    if rc != 0:
        tail = " | ".join([ln for ln in lines if ln.strip()][-TAIL_LINES:]) or "(no output)"
        raise TrainingError(f"local training process exited with code {rc}; log tail: {tail}")


def _collect(run_dir: Path, run_key: str, fset: FeatureSet, spec: TrainingSpec, executor: str,
             job_ids: list[str], sacct: dict[str, str], t0: float) -> TrainedModel:  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    env_path = run_dir / "environment.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    return TrainedModel(
        run_key=run_key,
        featureset_id=fset.featureset_id,
        featureset_hash=fset.content_hash(),
        run_dir=str(run_dir),
        model_path=str(run_dir / "model.pt"),
        metrics={k: float(v) for k, v in metrics.items()},
        params={
            **{k: getattr(spec, k) for k in HYPERPARAMS},
            "partition": spec.partition,
            "gpus_per_node": spec.gpus_per_node,
            "payload": spec.payload,
        },
        executor=executor,
        slurm_job_ids=job_ids,
        sacct=sacct,
        environment_hash=environment_hash(env) if env else "",
        weights_sha256=(run_dir / "weights.sha256").read_text().strip(),
        created_at=now_iso(),
        duration_s=round(time.monotonic() - t0, 3),
    )


def train(
    *, spec: TrainingSpec, account: str, featureset: FeatureSet, runs_dir: str, run_key: str,
    slurm: SlurmClient | None, env: Mapping[str, str], log: Callable[[str], None] = print,
    cancel_event: threading.Event | None = None,
) -> TrainedModel:  # fmt: skip
    """Train once per run key: reuse a finished run, reattach to a live job, or start one."""
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
    fs_path.write_text(featureset.to_json())
    cfg_path = run_dir / "config.json"
    cfg_path.write_text(json.dumps({k: getattr(spec, k) for k in HYPERPARAMS}, indent=2))
    job_name = f"aif-train-{run_key}"
    script = render_sbatch(
        spec, account=account, job_name=job_name, run_key=run_key, run_dir=str(run_dir),
        python=sys.executable, featureset_path=str(fs_path), config_path=str(cfg_path),
    )  # fmt: skip
    script_path = run_dir / "train.sbatch"
    script_path.write_text(script)

    if spec.executor == "local":
        cmd = [
            sys.executable,
            "-m",
            f"tasks.payloads.{PAYLOADS[spec.payload]}",
            "--featureset",
            str(fs_path),
            "--run-dir",
            str(run_dir),
            "--config",
            str(cfg_path),
        ]
        log(f"training locally in {run_dir}")
        run_local(cmd, str(run_dir), env, log)
        job_ids: list[str] = []
        sacct: dict[str, str] = {}
    else:
        if slurm is None:
            raise TrainingError("training.executor is slurm but no Slurm client was given")
        job_id, sacct = submit_and_watch(slurm, str(script_path), str(run_dir), job_name, spec,
                                         log, cancel_event)  # fmt: skip
        job_ids = [job_id]
    state_path.write_text(json.dumps({"executor": spec.executor, "job_ids": job_ids,
                                      "sacct": sacct}, indent=2))  # fmt: skip
    if not done.exists():
        raise TrainingError(f"training in {run_dir} ended without writing metrics.json")
    return _collect(run_dir, run_key, featureset, spec, spec.executor, job_ids, sacct, t0)
