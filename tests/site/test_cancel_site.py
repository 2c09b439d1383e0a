"""Cancelling a pipeline run in Prefect stops its Slurm jobs within 30 s: the training job,
and the Dask worker jobs of a run cancelled during preprocessing."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from aifactory.tasks.core.config import Profile
from tests.site.conftest import AIF, REPO, child_environ, prefect_client

pytestmark = pytest.mark.site


def _jobs(profile: Profile, prefix: str) -> list[str]:
    """squeue lines (id, name, state) of the jobs whose name starts with ``prefix``."""
    from aifactory.tasks.doors.slurm import SlurmClient

    out = SlurmClient(env=profile.child_env()).run(["squeue", "-h", "-o", "%i %j %T"])
    return [ln for ln in out.splitlines() if f" {prefix}" in ln]


@dataclass
class Cancelled:
    text: str  # the run's whole output
    returncode: int
    gone_after: float  # seconds from the cancel until no such job was in squeue
    run_id: Any


def _cancel_mid_stage(
    profile: Profile,
    env: dict[str, str],
    args: list[str],
    started: Callable[[str], bool],
    prefix: str,
    what: str,
) -> Cancelled:
    """Start `aif run ARGS`; once an output line says ``started`` and jobs named
    ``prefix``* are in squeue, cancel the newest running aif-pipeline run in Prefect and
    wait for those jobs to leave squeue. Never leaves a job or the process behind."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    proc = subprocess.Popen(
        [AIF, "run", *args], cwd=REPO, env={**child_environ(), **env},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    out: list[str] = []
    try:
        for line in proc.stdout:
            out.append(line)
            if started(line):
                break
        else:
            pytest.fail(f"the run ended before its {what}:\n" + "".join(out))
        assert _jobs(profile, prefix), "".join(out)
        with prefect_client(profile) as client:
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
        while _jobs(profile, prefix) and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        gone_after = time.monotonic() - t0
        assert not _jobs(profile, prefix), f"{prefix}* jobs outlived the cancelled run"
        rest, _ = proc.communicate(timeout=120)
        out.append(rest)
        return Cancelled("".join(out), proc.returncode, gone_after, run.id)
    finally:
        if proc.poll() is None:
            proc.kill()
        from aifactory.tasks.doors.slurm import SlurmClient

        left = [ln.split()[0] for ln in _jobs(profile, prefix)]
        if left:  # never leave a job behind, even when the test fails
            SlurmClient(env=profile.child_env()).cancel(left)


def test_cancelling_the_flow_run_scancels_the_training_job(site_profile: Profile) -> None:
    c = _cancel_mid_stage(
        site_profile,
        {"AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000)},
        ["--profile", "site", "--epochs", "400"],
        lambda line: "[train] job " in line and ": RUNNING" in line,
        "aif-train-",
        "training job ran",
    )
    assert c.gone_after <= 30, f"the job was gone only {c.gone_after:.1f} s after the cancel"
    assert c.returncode != 0
    assert "is being cancelled: stopping this stage" in c.text
    assert "cancelling Slurm job" in c.text


def test_cancelling_during_preprocessing_gives_back_every_worker_job(
    site_profile: Profile,
) -> None:
    # A fresh, large data space prefix: preprocessing cannot come from the cache, and one
    # worker featurising 8 M rows takes long enough to be cancelled half-way.
    c = _cancel_mid_stage(
        site_profile,
        {
            "AIF_DATASPACE__URL": "s3://aif-lake/startup-a/inbox/cancel-preprocess",
            # Seeded there once (not the profile's demo data space: asked for), 8 M rows;
            # --rows would be refused on the next run, when the prefix has its objects.
            "AIF_DATASPACE__SEED": "true",
            "AIF_DATASPACE__GENERATE__ROWS": "8000000",
            "AIF_DASK__WORKERS": "1",
        },
        ["--profile", "site"],
        lambda line: "[preprocess] Dask workers up" in line,
        "aif-dask-",
        "Dask workers came up",
    )
    assert c.gone_after <= 30, f"worker jobs gone only {c.gone_after:.1f} s after the cancel"
    assert c.returncode != 0, c.text
    assert "is being cancelled: stopping this stage" in c.text
    assert "featurised 8/8" not in c.text and "cancelling leftover Dask worker jobs" in c.text
    assert "aif: error: the run was cancelled" in c.text, c.text
    assert c.run_id is not None
