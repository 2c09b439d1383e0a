"""A sweep on the real site: one sbatch call, one job array, every trial recorded and the
best chosen by its validation metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.doors.slurm import SlurmClient
from tests.site.conftest import aif

pytestmark = pytest.mark.site


def test_sweep_is_one_job_array(site_profile: Profile) -> None:
    res = aif("sweep", "--profile", "site", "--random", "5", "--seed", "4", "--grid",
              "hidden=32x16", "--max-parallel", "2", "--epochs", "2")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "(one sbatch call)" in res.stdout
    sweep_dir = Path(res.last_line.rsplit(", ", 1)[1].rstrip(")"))
    record = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(record["trials"]) == 6 and len(record["job_ids"]) == 1  # one sbatch call
    assert record["executor"] == "slurm" and "admission:" in res.stdout
    assert "#SBATCH --array=0-5%2" in (sweep_dir / "sweep.sbatch").read_text()
    done = [t for t in record["trials"] if t["state"] == "COMPLETED"]
    assert len(done) == 6
    assert record["best"]["val_rmse"] == min(t["val_rmse"] for t in done)
    assert all(t["job"].startswith(f"{record['job_array']}_") for t in record["trials"])
    out = SlurmClient(env=site_profile.child_env()).run(
        ["sacct", "-j", record["job_array"], "-X", "-n", "-P", "-o", "JobID,State"]
    )
    tasks = [ln for ln in out.splitlines() if ln.startswith(f"{record['job_array']}_")]
    assert len(tasks) == 6 and all(ln.endswith("|COMPLETED") for ln in tasks)
