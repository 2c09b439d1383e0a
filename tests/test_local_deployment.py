"""Nightly deployments on the local profile, for real (issue 16): the home's managed Prefect
server, `prefect deploy --all` at the repository root as Prefect's docs say, `aif deploy`'s
deploy_all with profile local, the home's background worker, one deployment run with a
small override, then the dry-run plan says that a re-run would reuse every stage. About 2
minutes on 2 cores; the worker and the server are stopped at the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aifactory.deployments import deploy as dp
from aifactory.infra.site import procs
from aifactory.tasks.control import prefect_server as ps
from aifactory.tasks.control import worker as wk

REPO = Path(__file__).resolve().parents[1]
PORT = 4223
OVERRIDES = {"training.epochs": 1, "dataspace.generate.rows": 20000}


def _deployments(url: str) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return {d.name: d for d in client.read_deployments()}


def _hold_the_nightlies(url: str) -> int:
    """Turn the deployments' schedules off and delete their scheduled runs: near a nightly's
    time (02:00 Europe/Berlin, 01:00 UTC) the worker would otherwise start it first, and its
    seeding of the empty data space makes the test's own run with --rows a refusal. The
    number of scheduled runs deleted."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        deps = client.read_deployments()
        for d in deps:
            for sched in d.schedules:
                client.update_deployment_schedule(d.id, sched.id, active=False)
        scheduled = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[d.id for d in deps]),
            state=scheduled))  # fmt: skip
        for run in runs:
            client.delete_flow_run(run.id)
        return len(runs)


def test_deployments_run_on_the_local_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("AIF_HOME", str(home))
    url = ps.ensure_managed_server(str(home), PORT, lambda s: None)
    try:
        # `prefect deploy --all` by hand at the root: the site's deployments, each on its
        # start-up's own pool (they exist on a site; here they are made first), the pull
        # step set to this checkout.
        for sid in ("startup-a", "startup-b"):
            wk.ensure_work_pool(url, f"aif-site-{sid}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(PREFECT_API_URL=url, PREFECT_HOME=str(tmp_path / "prefect-cli"))
        prefect = str(Path(sys.executable).with_name("prefect"))
        out = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        deps = _deployments(url)
        assert sorted(deps) == ["startup-a-nightly", "startup-b-nightly"]
        for d in deps.values():
            assert d.parameters["profile"] == "site"
            assert d.work_pool_name == f"aif-site-{d.parameters['startup']}"
            assert d.entrypoint == "flows/pipeline.py:pipeline"
            assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                     {"directory": str(REPO)}}]  # fmt: skip

        # `aif deploy --profile local`: the same deployments, replaced, with profile local
        dp.deploy_all(url, lambda s: None, profile="local")
        deps = _deployments(url)
        assert sorted(deps) == ["startup-a-nightly", "startup-b-nightly"]
        for d in deps.values():
            assert d.work_pool_name == "aif-local" and d.parameters["profile"] == "local"

        _hold_the_nightlies(url)  # only the test's own run goes to the worker
        rec = wk.ensure_worker(str(home), url, "aif-local", lambda s: None)
        assert wk.worker_running(str(home)) == rec

        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: url}):
            run = run_deployment("aif-pipeline/startup-a-nightly", timeout=300, poll_interval=2,
                                 parameters={"overrides": OVERRIDES})  # fmt: skip
        log = procs.log_tail(ps.state_dir(str(home)) / "worker.log", 30)
        assert run.state is not None and run.state.is_completed(), (run.state, log)
        assert (home / "local" / "mlflow.db").exists()  # the run worked in this home

        # The dry run's plan: a re-run of the same inputs reuses every stage.
        from aifactory.tasks.core.config import load_profile
        from aifactory.tasks.stages.plan import plan, render_plan
        from tests.unit.test_plan import _tree

        cfg = load_profile("local", OVERRIDES)
        before = _tree(home / "local")  # lake, data space, runs, registry (not the server's)
        plans = plan(cfg, "startup-a")
        assert _tree(home / "local") == before  # read only, the registry too
        assert [p.action for p in plans] == ["reuse"] * 4, render_plan(plans)
        assert plans[3].line().startswith("register: reuse version 1 of mobility-trip-duration")
    finally:
        ps.stop_managed_server(str(home))  # and the home's worker
    assert wk.worker_running(str(home)) is None and ps.running(str(home)) is None
