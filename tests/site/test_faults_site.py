"""Faults a hostile test of the site found (issue 15), each on the real site:

- two runs of the same input at the same moment: one training job, one model version, the
  version's lineage complete (before: versions 7 and 8, one with ``aif.slurm_job_ids=none``);
- MariaDB (slurmdbd's database) killed while the training job runs: the run waits for the
  accounting, saying so, and registers the version with its job ids and sacct record
  (before: the run failed after 120 retry lines and a re-run registered no lineage).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from aifactory.tasks.core.config import Profile
from tests.site.conftest import AIF, REPO, aif, child_environ

pytestmark = pytest.mark.site


def _fresh(tag: str) -> dict[str, str]:
    """A data-space prefix and seed no other run used: every stage runs. The prefix is
    seeded on request (AIF_DATASPACE__SEED): it is not the profile's demo data space."""
    t = int(time.time())
    return {"AIF_DATASPACE__URL": f"s3://aif-lake/startup-a/inbox/{tag}-{t}",
            "AIF_DATASPACE__SEED": "true",
            "AIF_TRAINING__SEED": str(t % 100_000 + 7)}  # fmt: skip


def _version_tags(profile: Profile, uri: str) -> dict[str, str]:
    name, version = uri.removeprefix("models:/").split("/")
    return dict(MlflowClient(profile.mlflow.tracking_uri).get_model_version(name, version).tags)


def _train_jobs(out: str) -> set[str]:
    return set(re.findall(r"\[train\] (?:submitted|reattaching to live) Slurm job (\d+)", out))


def test_two_runs_at_once_train_once_and_register_one_version(site_profile: Profile) -> None:
    # The rows as configuration, not --rows: the run that finds the other's objects in the
    # prefix would refuse --rows (nothing left to generate).
    env = {**_fresh("twice"), "AIF_DATASPACE__GENERATE__ROWS": "20000"}
    runs: list[object] = [None, None]

    def go(i: int) -> None:
        runs[i] = aif("run", "--profile", "site", "--epochs", "2", env=env)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = runs
    for r in (a, b):
        assert r.returncode == 0, r.stdout + r.stderr  # type: ignore[attr-defined]
    assert a.last_line == b.last_line and a.last_line.startswith("models:/")  # type: ignore[attr-defined]
    jobs = _train_jobs(a.stdout) | _train_jobs(b.stdout)  # type: ignore[attr-defined]
    assert len(jobs) == 1, (jobs, a.stdout, b.stdout)  # type: ignore[attr-defined]
    tags = _version_tags(site_profile, a.last_line)  # type: ignore[attr-defined]
    assert tags["aif.executor"] == "slurm", tags
    assert tags["aif.slurm_job_ids"] == jobs.pop(), tags
    assert tags["aif.sacct"] != "none" and "State=COMPLETED" in tags["aif.sacct"], tags


def test_accounting_database_killed_during_training(site_profile: Profile) -> None:
    site_root = Path(site_profile.slurm.conf or "").resolve().parents[1]
    env = {**child_environ(), **_fresh("nodb")}
    proc = subprocess.Popen(
        [AIF, "run", "--profile", "site", "--rows", "20000", "--epochs", "2"], cwd=REPO,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    killed = restarted = False
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if not killed and re.search(r"\[train\] submitted Slurm job \d+", line):
                pid = int((site_root / "pids" / "mariadb.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                killed = True
            elif killed and not restarted and "accounting (slurmdbd or its database) is " \
                    "unreachable since" in line:  # fmt: skip
                time.sleep(5)  # the outage lasts a while: the run keeps waiting, quietly
                up = aif("site", "up", timeout=300)  # restarts MariaDB
                assert up.returncode == 0, up.stdout + up.stderr
                restarted = True
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if not restarted:
            aif("site", "up", timeout=300)
    out = "\n".join(lines)
    assert killed and restarted, out
    assert rc == 0, out
    said = [ln for ln in lines if "accounting (slurmdbd or its database)" in ln]
    assert len(said) <= 4, said  # said once, repeated every 30 s: not one line per poll
    assert any("accounting answers again" in ln for ln in lines), out
    jobs = _train_jobs(out)
    assert len(jobs) == 1, out
    tags = _version_tags(site_profile, lines[-1])
    assert tags["aif.slurm_job_ids"] == next(iter(jobs)), tags
    assert "State=COMPLETED" in tags["aif.sacct"] and "NodeList=" in tags["aif.sacct"], tags


def test_a_killed_run_is_marked_crashed_without_any_deployment(site_profile: Profile) -> None:
    """Before: the crash detector was an automation made only by `aif deploy`, and only
    deployed runs sent heartbeats, so a killed `aif run` stayed Running for ever. Now
    `aif site up` makes the detector and every run sends heartbeats."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    from aifactory.deployments.deploy import CRASH_DETECTOR
    from tests.site.conftest import prefect_client

    with prefect_client(site_profile) as client:
        for old in client.read_automations_by_name(CRASH_DETECTOR):
            client.delete_automation(old.id)
    up = aif("site", "up", timeout=300)
    assert up.returncode == 0 and f"crash detection: {CRASH_DETECTOR}" in up.stdout, up.stdout
    proc = subprocess.Popen(
        [AIF, "run", "--profile", "site", "--rows", "20000", "--epochs", "2"], cwd=REPO,
        env={**child_environ(), **_fresh("killed")}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if "[2/4] preprocess" in line:
                break
        with prefect_client(site_profile) as client:
            running = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["aif-pipeline"])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.RUNNING]))),
            )  # fmt: skip
            run = max(running, key=lambda r: r.start_time or r.created)
            os.killpg(proc.pid, signal.SIGKILL)  # the run's process dies: nothing ends the run
            t0 = time.monotonic()
            while time.monotonic() - t0 < 240:
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    break
                time.sleep(3)
        assert state is not None and state.is_crashed(), state
        assert CRASH_DETECTOR in (state.message or ""), state.message
        print(f"marked Crashed {time.monotonic() - t0:.0f} s after the kill")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        slurm = site_profile.slurm_client()
        left = [j for j in slurm.run(["squeue", "-h", "-o", "%i %j"]).splitlines()
                if " aif-dask-" in j]  # fmt: skip
        if left:
            slurm.cancel([j.split()[0] for j in left])
