"""Cancelling a pipeline run in Prefect stops its Slurm training job within 30 s."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

import pytest

from tasks.config import Profile
from tests.site.conftest import AIF, REPO

pytestmark = pytest.mark.site


def _train_jobs(profile: Profile) -> list[str]:
    from tasks.slurm import SlurmClient

    out = SlurmClient(env=profile.child_env()).run(["squeue", "-h", "-o", "%i %j %T"])
    return [ln for ln in out.splitlines() if " aif-train-" in ln]


def test_cancelling_the_flow_run_scancels_the_training_job(site_profile: Profile) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    env = {**os.environ, "AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000)}
    cmd = [AIF, "run", "--profile", "site", "--epochs", "400"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    out: list[str] = []
    try:
        for line in proc.stdout:  # wait for the training job to start
            out.append(line)
            if "[train] job " in line and ": RUNNING" in line:
                break
        else:
            pytest.fail("the run ended before its training job ran:\n" + "".join(out))
        assert _train_jobs(site_profile), "".join(out)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        api = site_profile.prefect.api_url
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["aif-pipeline"])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))
                ),
            )
            assert runs, "no running aif-pipeline flow run"
            run: Any = max(runs, key=lambda r: r.start_time or r.created)
            t0 = time.monotonic()
            client.set_flow_run_state(run.id, Cancelling(), force=True)
        while _train_jobs(site_profile) and time.monotonic() - t0 < 60:
            time.sleep(1)
        gone_after = time.monotonic() - t0
        assert not _train_jobs(site_profile), "the training job outlived its cancelled run"
        assert gone_after <= 30, f"the job was gone only {gone_after:.1f} s after the cancel"
        rest, _ = proc.communicate(timeout=120)
        out.append(rest)
        assert proc.returncode != 0
        text = "".join(out)
        assert "is being cancelled: stopping this stage" in text
        assert "cancelling Slurm job" in text
    finally:
        if proc.poll() is None:
            proc.kill()
        from tasks.slurm import SlurmClient

        left = [ln.split()[0] for ln in _train_jobs(site_profile)]
        if left:  # never leave a job behind, even when the test fails
            SlurmClient(env=site_profile.child_env()).cancel(left)


def _dask_jobs(profile: Profile) -> list[str]:
    from tasks.slurm import SlurmClient

    out = SlurmClient(env=profile.child_env()).run(["squeue", "-h", "-o", "%i %j %T"])
    return [ln for ln in out.splitlines() if " aif-dask-" in ln]


def test_cancelling_during_preprocessing_gives_back_every_worker_job(
    site_profile: Profile,
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    # A fresh, large data space prefix: preprocessing cannot come from the cache, and one
    # worker featurising 8 M rows takes long enough to be cancelled half-way.
    env = {**os.environ, "AIF_DATASPACE__URL": "s3://aif-dataspace/test/cancel-preprocess",
           "AIF_DASK__WORKERS": "1"}  # fmt: skip
    cmd = [AIF, "run", "--profile", "site", "--rows", "8000000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    assert proc.stdout is not None
    out: list[str] = []
    try:
        run_id = None
        for line in proc.stdout:
            out.append(line)
            if "[preprocess] Dask workers up" in line:
                break
        else:
            pytest.fail("the run ended before its Dask workers came up:\n" + "".join(out))
        assert _dask_jobs(site_profile), "".join(out)
        api = site_profile.prefect.api_url
        with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            from prefect.client.schemas.filters import FlowFilter, FlowFilterName

            runs = [r for r in client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["aif-pipeline"])))
                if r.state is not None and r.state.is_running()]  # fmt: skip
            assert runs, "no running aif-pipeline flow run"
            run: Any = max(runs, key=lambda r: r.start_time or r.created)
            run_id = run.id
            t0 = time.monotonic()
            client.set_flow_run_state(run.id, Cancelling(), force=True)
        while _dask_jobs(site_profile) and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        gone_after = time.monotonic() - t0
        assert not _dask_jobs(site_profile), "Dask worker jobs outlived the cancelled run"
        assert gone_after <= 30, f"worker jobs gone only {gone_after:.1f} s after the cancel"
        rest, _ = proc.communicate(timeout=120)
        out.append(rest)
        text = "".join(out)
        assert proc.returncode != 0, text
        assert "is being cancelled: stopping this stage" in text
        assert "featurised 8/8" not in text and "cancelling leftover Dask worker jobs" in text
        assert "aif: error: the run was cancelled" in text, text
        assert run_id is not None
    finally:
        if proc.poll() is None:
            proc.kill()
        from tasks.slurm import SlurmClient

        left = [ln.split()[0] for ln in _dask_jobs(site_profile)]
        if left:
            SlurmClient(env=site_profile.child_env()).cancel(left)
