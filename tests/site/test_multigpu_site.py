"""Two GPUs on the local site: the training job runs one torchrun worker per GPU (srun,
c10d rendezvous; Gloo on this machine's CPUs, NCCL where the GPUs are real)."""

from __future__ import annotations

import time

import pytest

from aifactory.tasks.core.config import Profile
from tests.site.conftest import aif

pytestmark = pytest.mark.site


def test_two_gpu_data_parallel_training(site_profile: Profile) -> None:
    env = {"AIF_TRAINING__GPUS_PER_NODE": "2", "AIF_TRAINING__CPUS_PER_TASK": "2",
           "AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000 + 31)}  # fmt: skip
    res = aif("run", "--profile", "site", "--epochs", "2", env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "gres gpu:2" in out and "gpus=0,1" in out
    assert "rank 0 of 2" in out and "rank 1 of 2" in out
    assert res.last_line.startswith("models:/mobility-trip-duration/")
