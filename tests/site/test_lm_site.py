"""The language-model payload as a real Slurm GPU job on the site's tourism text."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aifactory.tasks.config import Profile
from aifactory.tasks.slurm import SlurmClient
from tests.site.conftest import aif

pytestmark = pytest.mark.site


def test_train_lm_on_slurm_matches_a_local_run(site_profile: Profile, tmp_path: Path) -> None:
    fresh = {"AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000)}  # a new run key
    res = aif("train-lm", "--profile", "site", "--steps", "30", env=fresh)
    assert res.returncode == 0, res.stdout + res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("run dir:"))
    m = re.fullmatch(r"run dir: (.+?)  Slurm jobs: (\S+)", line)  # the folder may hold spaces
    assert m, line
    run_dir, job = Path(m.group(1)), m.group(2)
    rec = SlurmClient(env=site_profile.child_env()).sacct_record(job)
    assert rec is not None and rec["State"] == "COMPLETED", rec
    assert rec["Account"] == "startup-a" and "gres/gpu=1" in rec["AllocTRES"], rec
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["tokens_per_second"] > 0

    # The same data, seed and config on this host, outside Slurm: identical weights.
    script = (run_dir / "train.sbatch").read_text().splitlines()[-1]
    args = shlex.split(script.split("-m aifactory.tasks.payloads.train_lm ", 1)[1])
    args[args.index("--run-dir") + 1] = str(tmp_path / "local")
    env = {**site_profile.child_env(), "PATH": "/usr/bin"}
    cmd = [sys.executable, "-m", "aifactory.tasks.payloads.train_lm", *args]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    assert (tmp_path / "local" / "weights.sha256").read_text() == (
        run_dir / "weights.sha256"
    ).read_text()

    # The same command again collects the finished run: no second job, same weights.
    again = aif("train-lm", "--profile", "site", "--steps", "30", env=fresh)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stdout and f"Slurm jobs: {job}" in again.stdout
