"""The language model as a project (examples/tourism-lm, `aif train-lm`): a real Slurm GPU
job on the site's tourism text, registered like any model, and bit-identical to a run of
the same job script's command on this host."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.doors.slurm import SlurmClient
from tests.site.conftest import aif

pytestmark = pytest.mark.site


def test_train_lm_is_a_registered_project_model(site_profile: Profile, tmp_path: Path) -> None:
    steps = str(20 + int(time.time()) % 20)  # a new run key for each run of this test
    res = aif("train-lm", "--profile", "site", "--steps", steps)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    uri = res.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"models:/tourism-lm/\d+", uri), out[-2000:]
    assert "project " in out and "examples/tourism-lm/aifactory.yaml" in out
    job = re.search(r"submitted Slurm job (\d+) \(aif-train-", out)
    script = re.search(r"script (.+/train\.sbatch)$", out, re.MULTILINE)
    assert job and script, out[-3000:]
    rec = SlurmClient(env=site_profile.child_env()).sacct_record(job.group(1))
    assert rec is not None and rec["State"] == "COMPLETED", rec
    assert rec["Account"] == "startup-a" and "gres/gpu=1" in rec["AllocTRES"], rec
    run_dir = Path(script.group(1)).parent
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["tokens_per_second"] > 0 and metrics["val_bits_per_byte"] > 0

    # The job script's own command on this host, outside Slurm: identical weights.
    line = (run_dir / "train.sbatch").read_text().splitlines()[-1]
    argv = shlex.split(line.removeprefix("exec "))
    argv[argv.index("--run-dir") + 1] = str(tmp_path / "local")
    env = {**site_profile.child_env(), "PATH": "/usr/bin"}
    subprocess.run(argv, check=True, capture_output=True, env=env, timeout=600)
    assert (tmp_path / "local" / "weights.sha256").read_text() == (
        run_dir / "weights.sha256"
    ).read_text()

    # Registered with the pyfunc flavour: it scores reviews (bits per byte, lower: typical).
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(site_profile.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(uri)
    scores = model.predict(pd.DataFrame({"review_id": ["a", "b"], "text": [
        "Lovely old town, friendly guides and a great view from the tower.",
        "qx9 zz## vv~~ kkkk 0000 @@@@ jjjj"]}))  # fmt: skip
    assert 0 < scores[0] < scores[1]

    # The same command again: nothing trained, nothing registered.
    again = aif("train-lm", "--profile", "site", "--steps", steps)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Nothing changed" in again.stdout and again.stdout.strip().endswith(uri)
