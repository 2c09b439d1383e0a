"""Replay on the real site: a freshly registered version rebuilt from its record (Dask
workers and the training job on Slurm) gives identical weights."""

from __future__ import annotations

import time

import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.core.provenance import git_info
from tests.site.conftest import aif

pytestmark = pytest.mark.site


def test_replay_on_site_matches(site_profile: Profile) -> None:
    fresh = {"AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000)}  # a new version
    run = aif("run", "--profile", "site", "--epochs", "2", env=fresh)
    assert run.returncode == 0, run.stdout + run.stderr
    uri = run.last_line
    assert uri.startswith("models:/mobility-trip-duration/")
    dirty = ["--allow-dirty"] if git_info()["dirty"] else []  # CI replays a clean checkout
    res = aif("replay", uri, "--profile", "site", *dirty)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.last_line.startswith(f"MATCH {uri}: weights sha256 "), res.stdout
    assert "submitted" in res.stdout or "Slurm job" in res.stdout  # rebuilt on Slurm
