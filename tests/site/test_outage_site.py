"""Outages of the control plane (issue 19), each on the real site: PostgreSQL, the Prefect
server or MLflow stopped for 60 s while a run trains, then started again by `aif site up`.
The run goes on and ends Completed with exactly one training job and one model version; a
nightly that was due during the Prefect outage runs once the server is back."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from typing import Any

import pytest
from mlflow import MlflowClient

from aifactory.tasks.core.config import Profile
from tests.site.conftest import AIF, REPO, aif, child_environ, prefect_client

pytestmark = pytest.mark.site
OUTAGE_S = 60


def _fresh(tag: str) -> dict[str, str]:
    t = int(time.time())
    return {"AIF_DATASPACE__URL": f"s3://aif-lake/startup-a/inbox/outage-{tag}-{t}",
            "AIF_DATASPACE__SEED": "true", "AIF_TRAINING__SEED": str(t % 100_000 + 11)}  # fmt: skip


def _stop_part(name: str) -> None:
    from aifactory.infra.site import manager, procs
    from aifactory.infra.site.layout import Site
    from aifactory.infra.site.manager import site_root
    from aifactory.tasks.core.home import site_dir

    site = Site(site_root(site_dir()))
    rec = manager._load(site)[name]
    expect = next(p.expect for p in manager.PARTS if p.name == name)
    assert procs.stop(rec, expect), f"{name} was not running"


def _run_through_outage(part: str, tag: str,
                        before_stop: Any = None) -> tuple[int, list[str], float]:  # fmt: skip
    """`aif run --profile site` of fresh data; once its training job is submitted, ``part``
    is stopped for OUTAGE_S seconds (``before_stop()`` runs just before), then `aif site up`
    starts it again. Returns the exit code, the output, and when the part was back."""
    proc = subprocess.Popen(
        [AIF, "run", "--profile", "site", "--rows", "20000", "--epochs", "3"], cwd=REPO,
        env={**child_environ(), **_fresh(tag)}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    back: list[float] = []

    def outage() -> None:
        if before_stop is not None:
            before_stop()
        _stop_part(part)
        stopped = time.time()
        time.sleep(max(0.0, OUTAGE_S - (time.time() - stopped)))
        up = aif("site", "up", timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        back.append(time.time())

    thread = None
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if thread is None and re.search(r"\[train\] submitted Slurm job \d+", line):
                thread = threading.Thread(target=outage)
                thread.start()
        rc = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if thread is not None:
            thread.join(timeout=400)
        if not back:
            aif("site", "up", timeout=300)
    assert thread is not None and back, "\n".join(lines)
    return rc, lines, back[0]


def _completed_once(profile: Profile, rc: int, lines: list[str]) -> None:
    """Exit 0; the flow run Completed; one training job; one version whose lineage names
    it; no second version of the same training."""
    out = "\n".join(lines)
    assert rc == 0, out
    jobs = set(re.findall(r"\[train\] (?:submitted|reattaching to live) Slurm job (\d+)", out))
    assert len(jobs) == 1, out
    uri = lines[-1]
    assert uri.startswith("models:/"), out
    name, version = uri.removeprefix("models:/").split("/")
    client = MlflowClient(profile.mlflow.tracking_uri)
    mv = client.get_model_version(name, version)
    assert mv.tags["aif.slurm_job_ids"] == next(iter(jobs)), mv.tags
    same = [v for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get("aif.fingerprint") == mv.tags.get("aif.fingerprint")]  # fmt: skip
    assert len(same) == 1, [(v.version, v.tags.get("aif.fingerprint")) for v in same]
    run_id = re.findall(r"/runs/flow-run/([0-9a-f-]{36})", out)[0]
    with prefect_client(profile) as pc:
        assert pc.read_flow_run(run_id).state.type.value == "COMPLETED"


def test_postgresql_down_for_a_minute_while_training(site_profile: Profile) -> None:
    """PostgreSQL (Prefect's and MLflow's database) stops: the server answers 503 for a
    minute, the run's client retries, nothing is lost or done twice."""
    rc, lines, _ = _run_through_outage("postgres", "pg")
    _completed_once(site_profile, rc, lines)


def test_mlflow_down_for_a_minute_while_training(site_profile: Profile) -> None:
    """The tracking server stops while the job trains and stays down into the register
    stage: registration waits for it (saying so) and registers one version."""
    rc, lines, _ = _run_through_outage("mlflow", "mlflow")
    _completed_once(site_profile, rc, lines)


def test_prefect_down_for_a_minute_while_training_and_a_nightly_due_meanwhile(
    site_profile: Profile,
) -> None:
    """The Prefect server stops while the job trains. The run goes on (its client retries
    until the server is back) and completes; a nightly run that was scheduled for the
    middle of the outage runs once the server is back, and ends Completed."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Scheduled

    with prefect_client(site_profile) as client:
        deps = {d.name: d for d in client.read_deployments()}
    if "startup-b-nightly" not in deps:
        res = aif("deploy", "--profile", "site", timeout=600,
                  env={"AIF_NOTIFY_WEBHOOK": "http://127.0.0.1:9/"})  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        with prefect_client(site_profile) as client:
            deps = {d.name: d for d in client.read_deployments()}
    nightly = deps["startup-b-nightly"]
    due: list[Any] = []

    def due_during_the_outage() -> None:
        """The scheduler makes a nightly's runs ahead of time: one is due 20 s into it."""
        import datetime as dt

        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
        with prefect_client(site_profile) as client:
            due.append(client.create_flow_run_from_deployment(
                nightly.id, state=Scheduled(scheduled_time=when)))  # fmt: skip

    rc, lines, back = _run_through_outage("prefect", "prefect", due_during_the_outage)
    _completed_once(site_profile, rc, lines)
    deadline = time.monotonic() + 600
    with prefect_client(site_profile) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(due[0].id)
            if run.state is not None and run.state.is_final():
                break
            time.sleep(2)
    assert run.state is not None and run.state.type == StateType.COMPLETED, run.state
    assert run.start_time is not None and run.start_time.timestamp() >= back - 5, (
        run.start_time,
        back,
    )
    print(json.dumps({"nightly": str(run.id), "started_after_outage_s":
                      round(run.start_time.timestamp() - back, 1)}))  # fmt: skip
