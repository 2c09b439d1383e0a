"""Preemption on the real site: a running training job is requeued by Slurm (as a
preemption does); the payload checkpoints on SIGTERM, resumes in the requeued job, and over
all attempts the steps done equal the steps planned, as its ledger shows."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import time
from pathlib import Path

import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.doors.slurm import SlurmClient
from tests.site.conftest import AIF, REPO, child_environ, running_training

pytestmark = pytest.mark.site


def _state(slurm: SlurmClient, job: str) -> str:
    return slurm.run(["squeue", "-h", "-j", job, "-o", "%T"]).strip()


def test_requeued_job_resumes_and_the_ledger_adds_up(site_profile: Profile) -> None:
    slurm = SlurmClient(env=site_profile.child_env())
    epochs = 40
    env = {**child_environ(), "AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000 + 7)}
    cmd = [AIF, "run", "--profile", "site", "--epochs", str(epochs)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out: list[str] = []
    job = run_dir = ""
    try:
        job, run_dir = running_training(proc, out)
        ledger = Path(run_dir, "ledger.jsonl")
        slurm.run(["scontrol", "requeue", job])  # what a preemption with REQUEUE does
        deadline = time.monotonic() + 60
        while _state(slurm, job) not in ("PENDING",) and time.monotonic() < deadline:
            time.sleep(0.5)
        # Slurm holds a requeued job back for a while before it may start again; release it.
        slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
        rest, _ = proc.communicate(timeout=600)
        out.append(rest)
        text = "".join(out)
        assert proc.returncode == 0, text
        train_lines = "\n".join(ln for ln in text.splitlines() if "[train]" in ln)
        assert f"aif: job {job} on " in text and " restart 1 " in text, train_lines
        assert "training completed after 1 restart(s)" in text
        assert "resumed from checkpoint at epoch" in text
        entries = [json.loads(ln) for ln in ledger.read_text().splitlines()]
        attempts: dict[str, dict] = {}
        for e in entries:
            attempts[e["restart"]] = e  # the last line of each attempt covers all of it
        assert sorted(attempts) == ["0", "1"], entries
        first, second = attempts["0"], attempts["1"]
        assert first["from"] == [0, 0] and second["from"] == first["to"]  # no step lost
        metrics = json.loads(Path(run_dir, "metrics.json").read_text())
        steps_per_epoch = math.ceil(metrics["train_rows"] / 512)
        assert first["steps"] + second["steps"] == epochs * steps_per_epoch  # none repeated
        assert second["to"] == [epochs, 0]
    finally:
        if proc.poll() is None:
            proc.kill()
        if job and _state(slurm, job):
            slurm.cancel([job])


def test_time_limit_shorter_than_the_training(site_profile: Profile) -> None:
    """A 1-minute time limit with the warning 20 s before it, for about 70 s of
    training: every attempt checkpoints on USR1 and requeues itself; the run completes and
    the ledger covers every planned step exactly once."""
    slurm = SlurmClient(env=site_profile.child_env())
    epochs = 300  # about 70 s of training: at least two attempts, CI time kept short
    env = {**child_environ(), "AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000 + 11),
           "AIF_TRAINING__TIMEOUT_MIN": "1", "AIF_TRAINING__SIGNAL_BEFORE_END_S": "20"}  # fmt: skip
    cmd = [AIF, "run", "--profile", "site", "--epochs", str(epochs)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    job = run_dir = ""
    out: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            m = re.search(r"script (.+)/train\.sbatch", line)
            run_dir = m.group(1) if m else run_dir
            m = re.search(r"submitted Slurm job (\d+)", line)
            if m and run_dir:
                job = m.group(1)
                break
        assert job, "".join(out)
        ran = False
        while proc.poll() is None:  # release each requeued attempt at once (Slurm delays it)
            state = _state(slurm, job)
            ran = ran or state == "RUNNING"
            if ran and state == "PENDING":
                slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
                ran = False
            time.sleep(1)
        rest, _ = proc.communicate(timeout=60)
        text = "".join(out) + rest
        assert proc.returncode == 0, text[-3000:]
        assert "checkpointed at epoch" in text and "resumed from checkpoint" in text
        entries = [json.loads(ln) for ln in Path(run_dir, "ledger.jsonl").read_text().splitlines()]
        last: dict[str, dict] = {}
        for e in entries:
            last[e["restart"]] = e
        attempts = [last[k] for k in sorted(last, key=int)]
        assert len(attempts) >= 2, entries
        assert attempts[0]["from"] == [0, 0]
        for a, b in itertools.pairwise(attempts):
            assert b["from"] == a["to"]  # each attempt starts where the previous one stopped
        metrics = json.loads(Path(run_dir, "metrics.json").read_text())
        planned = epochs * math.ceil(metrics["train_rows"] / 512)
        assert sum(a["steps"] for a in attempts) == planned
        assert f"training completed after {len(attempts) - 1} restart(s)" in text
    finally:
        if proc.poll() is None:
            proc.kill()
        if job and _state(slurm, job):
            slurm.cancel([job])
