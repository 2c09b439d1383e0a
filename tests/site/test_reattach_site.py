"""The flow's process dies while its training job runs: the job runs on, and the same run
again reattaches to it (found by the run key in its name) instead of submitting a second
one; once it has finished, a further run collects it without running it again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.doors.slurm import SlurmClient
from tests.site.conftest import AIF, REPO, aif, child_environ

pytestmark = pytest.mark.site


def test_dead_orchestrator_reattaches_then_collects(site_profile: Profile) -> None:
    slurm = SlurmClient(env=site_profile.child_env())
    seed = {"AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000 + 23)}
    cmd = [AIF, "run", "--profile", "site", "--epochs", "30"]
    env = {**child_environ(), **seed}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    job = ""
    for line in proc.stdout:
        m = re.search(r"\[train\] job (\d+): RUNNING", line)
        if m:
            job = m.group(1)
            break
    assert job
    os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator dies, nothing cleans up
    proc.wait(timeout=30)
    time.sleep(2)
    assert slurm.run(["squeue", "-h", "-j", job, "-o", "%T"]).strip() == "RUNNING"
    again = aif("run", "--profile", "site", "--epochs", "30", env=seed)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"reattaching to live Slurm job {job}" in again.stdout
    assert "submitted Slurm job" not in again.stdout.split("[3/4] train", 1)[1]
    third = aif("run", "--profile", "site", "--epochs", "30", env=seed)
    assert third.returncode == 0 and "already finished: collecting it, nothing submitted" in (
        third.stdout
    ), third.stdout[-3000:]
    assert third.last_line == again.last_line  # the same model version
