"""Deployments on the site: `aif deploy`, the worker `aif site up` starts, the overlap
guard, notifications to a webhook, the crashed-run detector, and the UI in Chromium."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.config import Profile
from tests.site.conftest import aif, prefect_client

pytestmark = pytest.mark.site
NIGHTLY_A = "aif-pipeline/startup-a-nightly"


class Receiver:
    """A local webhook: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                with_body = self.rfile.read(n)
                try:
                    outer.bodies.append(json.loads(with_body or b"{}"))
                except ValueError:
                    outer.bodies.append({"raw": with_body.decode(errors="replace")})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook/canary-token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, text: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for b in self.bodies:
                if text in json.dumps(b):
                    return b
            time.sleep(0.5)
        raise AssertionError(f"no notification containing {text!r} in {timeout:.0f} s: "
                             f"{self.bodies}")  # fmt: skip


@pytest.fixture(scope="module")
def deployed(site_profile: Profile) -> Receiver:
    rec = Receiver()
    env = {"AIF_NOTIFY_WEBHOOK": rec.url}
    for _ in range(2):  # a redeploy must not duplicate deployments, runs or automations
        res = aif("deploy", "--profile", "site", env=env, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
    want = (
        "deployment startup-a-nightly: pool aif-site-startup-a, schedule 0 2 * * * "
        "Europe/Brussels, "
    )
    assert want + "concurrency 1" in res.stdout, res.stdout
    assert "aif-notify-failure" in res.stdout and "aif-notify-promotion" in res.stdout
    yield rec
    rec.server.shutdown()


def _start(profile: Profile, name: str, parameters: dict[str, Any] | None = None) -> Any:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: profile.prefect.api_url}):
        return run_deployment(name, parameters=parameters or {}, timeout=0)


def _wait_final(profile: Profile, run_id: Any, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    with prefect_client(profile) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {run_id} did not finish in {timeout:.0f} s")


def test_deployments_schedules_and_no_duplicate_ticks(site_profile: Profile,
                                                       deployed: Receiver) -> None:  # fmt: skip
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with prefect_client(site_profile) as client:
        deps = {d.name: d for d in client.read_deployments()}
        assert {"startup-a-nightly", "startup-b-nightly"} <= set(deps)
        for name, d in deps.items():
            if name in ("startup-a-nightly", "startup-b-nightly"):  # each start-up's own pool
                assert d.work_pool_name == f"aif-site-{d.parameters['startup']}", d
            assert d.parameters["profile"] == "site" and d.parameters["promote"] is True
            sched = d.schedules[0].schedule
            assert getattr(sched, "timezone", None) == "Europe/Brussels", (name, sched)
            assert d.global_concurrency_limit is not None
            assert d.global_concurrency_limit.limit == 1
            assert str(d.concurrency_options.collision_strategy).endswith("ENQUEUE")
        # A redeploy replaces the future runs; Prefect's scheduler service makes them again
        # on its next loop.
        deadline = time.monotonic() + 120
        ticks: Counter[Any] = Counter()
        while not ticks and time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["startup-a-nightly"])))  # fmt: skip
            ticks = Counter(r.expected_start_time for r in runs if r.state_name == "Scheduled")
            time.sleep(2)
        assert ticks, "no scheduled nightly run"
        assert max(ticks.values()) == 1, f"duplicated scheduled runs after a redeploy: {ticks}"
        assert client.read_automations_by_name("aif-crashed-run-detector")
        assert len(client.read_automations_by_name("aif-notify-failure")) == 1


def test_startup_b_nightly_trains_its_own_project(site_profile: Profile,
                                                   deployed: Receiver) -> None:  # fmt: skip
    """B's nightly deployment runs B's project (examples/agriculture-yield) through the worker:
    its feature function on Dask-on-Slurm, its train.py as a Slurm job on the GPU partition,
    its model registered with the pytorch flavour and its lineage."""
    from mlflow.tracking import MlflowClient

    run = _start(site_profile, "aif-pipeline/startup-b-nightly",
                 {"overrides": {"training.config.epochs": 2}})  # fmt: skip
    done = _wait_final(site_profile, run.id, timeout=900)
    assert done.state.is_completed(), done.state
    client = MlflowClient(site_profile.mlflow.tracking_uri)
    mv = client.get_model_version_by_alias("agriculture-yield", "candidate")
    assert mv.tags["aif.startup"] == "startup-b" and mv.tags["aif.executor"] == "slurm"
    assert mv.tags["aif.slurm_job_ids"] not in ("", "none")
    assert mv.tags["aif.dataset"] == "agriculture-fields"
    params = client.get_run(mv.run_id).data.params
    assert params["script"] == "train.py" and params["epochs"] == "2", params


def test_a_projects_deployment_pulls_its_pinned_commit(tmp_path: Path, site_profile: Profile,
                                                       deployed: Receiver) -> None:  # fmt: skip
    """`aif deploy --project` on a project in its own git repository (a local bare repository
    stands in for the start-up's git server), with its own flows/ and tasks/ folders as a
    Prefect project has: a dirty tree is refused; the deployment pins the commit checked
    out, so a later push does not change what the nightly trains; the worker runs it end to
    end on the site without importing the project's folders for ours."""
    import subprocess

    from mlflow.tracking import MlflowClient

    proj, bare = tmp_path / "crop site", tmp_path / "server" / "crop.git"
    assert aif("init", "crop-site", "--dir", str(proj)).returncode == 0
    for own in ("flows", "tasks"):  # a Prefect project's folders must not shadow ours
        (proj / own).mkdir()
        (proj / own / "__init__.py").write_text("raise ImportError('the project\\'s own')\n")

    def git(*args: str, cwd: Path = proj) -> str:
        who = ["-c", "user.name=B", "-c", "user.email=b@example.org"]
        out = subprocess.run(["git", *who, *args], cwd=cwd, capture_output=True, text=True,
                             check=True)  # fmt: skip
        return out.stdout.strip()

    git("init", "-q", "-b", "main")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    bare.parent.mkdir()
    git("clone", "-q", "--bare", str(proj), str(bare), cwd=tmp_path)
    git("remote", "add", "origin", str(bare))
    pinned = git("rev-parse", "HEAD")

    (proj / "train.py").write_text((proj / "train.py").read_text() + "\n# wip\n")
    dirty = aif("deploy", "--project", str(proj))
    assert dirty.returncode == 2 and "uncommitted changes (train.py)" in dirty.stderr, dirty
    git("checkout", "train.py")
    res = aif("deploy", "--project", str(proj))
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"deployment aif-pipeline/crop-site-nightly: {bare} at {pinned}" in res.stdout

    spec = proj / "aifactory.yaml"  # a later push renames the model: not what the nightly runs
    spec.write_text(spec.read_text().replace("name: crop-site\n", "name: crop-site-later\n"))
    git("commit", "-q", "-am", "later")
    git("push", "-q", "origin", "main")

    run = _start(site_profile, "aif-pipeline/crop-site-nightly",
                 {"overrides": {"training.config.epochs": 2}})  # fmt: skip
    done = _wait_final(site_profile, run.id, timeout=900)
    assert done.state.is_completed(), done.state
    client = MlflowClient(site_profile.mlflow.tracking_uri)
    mv = client.get_model_version_by_alias("crop-site", "candidate")
    assert mv.tags["aif.project_commit"] == pinned and mv.tags["aif.startup"] == "startup-b"
    assert mv.tags["aif.project_dirty"] == "false"
    assert not client.search_registered_models("name = 'crop-site-later'")


def test_overlap_guard_runs_one_at_a_time(site_profile: Profile, deployed: Receiver) -> None:
    first = _start(site_profile, NIGHTLY_A)
    second = _start(site_profile, NIGHTLY_A)
    runs = [_wait_final(site_profile, r.id, timeout=600) for r in (first, second)]
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    a, b = sorted(runs, key=lambda r: r.start_time)
    assert b.start_time >= a.end_time, (
        f"two runs of one deployment overlapped: {a.start_time}..{a.end_time} and "
        f"{b.start_time}..{b.end_time}"
    )
    with prefect_client(site_profile) as client:
        names = [s.name for s in client.read_flow_run_states(b.id)]
    assert "AwaitingConcurrencySlot" in names, names
    test_overlap_guard_runs_one_at_a_time.completed = a.id  # type: ignore[attr-defined]


def test_failure_is_notified_to_the_webhook(site_profile: Profile, deployed: Receiver) -> None:
    run = _start(site_profile, NIGHTLY_A, {"startup": "no-such-startup"})
    final = _wait_final(site_profile, run.id, timeout=180)
    assert final.state.is_failed(), final.state
    body = deployed.wait_for(str(final.name), timeout=60)
    assert "Failed" in body["subject"], body
    assert "canary-token" not in json.dumps(body)  # the webhook's own address stays secret


def test_promotion_is_notified_to_the_webhook(site_profile: Profile, deployed: Receiver) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from aifactory.tasks.models.promotion import Decision, announce

    d = Decision(True, "999", "998", 5.0, 6.0, "test_rmse", 0.0, "test announcement", [])
    with temporary_settings({PREFECT_API_URL: site_profile.prefect.api_url}):
        assert announce("aif-test-model", d, site_profile.mlflow.tracking_uri)
    body = deployed.wait_for("aif-test-model version 999 promoted to champion", timeout=60)
    assert body["body"] == "test announcement"


def _descendants(root: int) -> list[int]:
    """The process tree under ``root`` (the worker and the flow run it started; not the
    Slurm job, which slurmd runs)."""
    import psutil

    return [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]


def _train_jobs(profile: Profile) -> list[tuple[str, str]]:
    from aifactory.tasks.doors.slurm import SlurmClient

    out = SlurmClient(env=profile.child_env()).run(["squeue", "-h", "-o", "%i %j"])
    return [tuple(ln.split()[:2]) for ln in out.splitlines() if " aif-train-" in ln]  # type: ignore[misc]


def test_dead_worker_and_flow_process_are_marked_crashed(
    site_profile: Profile, deployed: Receiver
) -> None:
    """Kill the worker and the flow run's process (SIGKILL): the crash detector marks the
    run Crashed; `aif site up` restarts the worker; the next run reattaches to the Slurm
    job the dead run left (never a second job), and cancelling it scancels that job."""
    from prefect.states import Cancelling

    from aifactory.tasks.doors.slurm import SlurmClient

    slurm = SlurmClient(env=site_profile.child_env())
    params = {"overrides": {"training.epochs": 2000, "training.seed": int(time.time()) % 100000}}
    before = set(_train_jobs(site_profile))
    run = _start(site_profile, NIGHTLY_A, params)
    deadline = time.monotonic() + 240
    jobs: list[tuple[str, str]] = []
    with prefect_client(site_profile) as client:
        while time.monotonic() < deadline and not jobs:
            state = client.read_flow_run(run.id).state
            if state is not None and state.is_running():
                jobs = [j for j in _train_jobs(site_profile) if j not in before]
            time.sleep(1)
    assert len(jobs) == 1, f"expected the run's training job: {jobs}"
    try:
        site = json.loads((Path(site_profile.runs_dir).parent / "site.json").read_text())
        tree = _descendants(int(site["worker-startup-a"]["pid"]))
        assert len(tree) > 1, "the worker has no flow-run process"
        for pid in tree:  # the worker first, then the flow run's processes
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        final = _wait_final(site_profile, run.id, timeout=180)
        took = time.monotonic() - t0
        assert final.state.is_crashed(), final.state
        assert "aif-crashed-run-detector" in (final.state.message or ""), final.state.message
        print(f"marked Crashed {took:.0f} s after the kill")
        assert deployed.wait_for(str(final.name), timeout=60)["subject"].endswith("Crashed")

        up = aif("site", "up")
        assert up.returncode == 0 and "starting worker-startup-a" in up.stdout, up.stdout
        from prefect.client.schemas.filters import LogFilter, LogFilterTimestamp
        from prefect.types._datetime import now

        since = now("UTC")
        again = _start(site_profile, NIGHTLY_A, params)
        want = f"reattaching to live Slurm job {jobs[0][0]}"
        deadline = time.monotonic() + 240
        seen = False
        with prefect_client(site_profile) as client:
            while time.monotonic() < deadline and not seen:
                logs = client.read_logs(log_filter=LogFilter(
                    timestamp=LogFilterTimestamp(after_=since)))  # fmt: skip
                seen = any(want in lg.message for lg in logs)
                time.sleep(2)
            assert seen, f"the next run did not reattach to job {jobs[0][0]}"
            now_jobs = [j for j in _train_jobs(site_profile) if j not in before]
            assert now_jobs == jobs, "a second training job was submitted"
            client.set_flow_run_state(again.id, Cancelling(), force=True)
        assert not slurm.wait_gone([jobs[0][0]], timeout=60), "the cancelled run left its job"
    finally:
        left = [j for j, _ in _train_jobs(site_profile) if (j, _) not in before]
        if left:
            slurm.cancel(left)
        aif("site", "up")


def test_operators_console_in_a_real_browser(site_profile: Profile, deployed: Receiver) -> None:
    """Headless Chromium opens the Prefect UI, finds the nightly deployment and a completed
    run of it with the operators' artifacts; screenshots go to test-output/ui/."""

    from tests.site.browser import check_prefect_ui
    from tests.site.conftest import REPO

    # A run of this version of the code (an earlier test's may be older): mostly reused.
    run = _wait_final(site_profile, _start(site_profile, NIGHTLY_A).id, timeout=600)
    assert run.state.is_completed(), run.state
    ui = site_profile.prefect.api_url.removesuffix("/api")
    out = REPO / "test-output" / "ui"
    out.mkdir(parents=True, exist_ok=True)
    series = "startup-a-mobility-eta"  # the start-up and its project: the keys' prefix
    found = check_prefect_ui(ui, "startup-a-nightly", str(run.id),
                             [f"{series}-pipeline-summary", f"{series}-pipeline-metrics",
                              f"{series}-mlflow-model-version"], out, timeout_s=90)  # fmt: skip
    assert found["flow_run_state"] == "Completed", found
    day = run.expected_start_time.astimezone(dt.UTC).date().isoformat()
    assert found["flow_run_name"] == f"startup-a/mobility-eta nightly {day}", found
    for shot in found["screenshots"].values():
        assert Path(shot).stat().st_size > 10_000, shot
    print(f"UI screenshots: {', '.join(str(p) for p in found['screenshots'].values())}")
    _console_pages(site_profile, ui, run, out)


def _console_pages(profile: Profile, ui: str, run: Any, out: Path) -> None:
    """What else an operator opens (issue 19): the model card and training-data summary
    the top-level summary links to; one start-up's runs by its tag; a refused run, which
    says why in one line, no traceback; the nightly report."""
    import re

    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        FlowRunFilter,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    from tests.site.browser import page_texts

    failed = {"type": FlowRunFilterStateType(any_=[StateType.FAILED])}
    failed_c = FlowRunFilter(tags=FlowRunFilterTags(all_=["startup:startup-c"]), state=failed)
    with prefect_client(profile) as client:
        summary = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["startup-a-mobility-eta-pipeline-summary"])), limit=50)  # fmt: skip
        refused = client.read_flow_runs(flow_run_filter=failed_c, limit=1)
    mine = [a for a in summary if str(a.flow_run_id) == str(run.id)]
    assert mine, [a.flow_run_id for a in summary]
    links = dict(re.findall(r"\[(model card|training-data summary)\]\((http[^)]+)\)",
                            str(mine[0].data)))  # fmt: skip
    assert set(links) == {"model card", "training-data summary"}, mine[0].data
    if not refused:  # a run of startup-c: its declaration is not approved (exit 5)
        made = aif("run", "--profile", "site", "--startup", "startup-c")
        assert made.returncode == 5, made.stdout + made.stderr
        with prefect_client(profile) as client:
            refused = client.read_flow_runs(flow_run_filter=failed_c, limit=1)
    assert refused[0].state.type == StateType.FAILED, refused[0].state
    report = aif("report", "nightly", "--profile", "site")
    assert report.returncode == 0, report.stdout + report.stderr
    table = re.findall(r"Prefect artifact nightly-report: ([0-9a-f-]{36})", report.stdout)
    assert table, report.stdout
    pages = [
        ("model-card", links["model card"], lambda t: "Model card:" in t and "Intended use" in t),
        ("training-data-summary", links["training-data summary"],
         lambda t: "summary of the training data" in t),
        ("runs-of-startup-b", f"{ui}/runs?tag=startup:startup-b",
         lambda t: "startup-b/" in t and "startup-a/" not in t),
        ("refused-run", f"{ui}/runs/flow-run/{refused[0].id}",
         lambda t: "Failed" in t and "AdmissionError" in t),
        ("nightly-report", f"{ui}/artifacts/artifact/{table[0]}",
         lambda t: all(s in t for s in ("startup-a", "startup-b", "startup-c"))),
    ]  # fmt: skip
    texts = page_texts(pages, out, timeout_s=90)
    assert "Traceback" not in texts["refused-run"], texts["refused-run"][:2000]


def test_each_startup_has_its_own_pool_worker_and_limit(site_profile: Profile,
                                                        deployed: Receiver) -> None:  # fmt: skip
    """Each start-up's deployments run on its own work pool, polled by its own worker, with
    its own concurrency limit (startups.<id>.flow_runs): two runs of two deployments of
    startup-c (limit 1) never run side by side, while nothing limits them per deployment."""
    from prefect.client.schemas.objects import WorkerStatus

    from tests.site.conftest import REPO

    with prefect_client(site_profile) as client:
        limits = {p.name: p.concurrency_limit for p in client.read_work_pools()
                  if p.name.startswith("aif-site-")}  # fmt: skip
        assert limits == {"aif-site-startup-a": 2, "aif-site-startup-b": 2,
                          "aif-site-startup-c": 1}, limits  # fmt: skip
        for pool in limits:
            workers = client.read_workers_for_work_pool(pool)
            assert [w.name for w in workers if w.status == WorkerStatus.ONLINE] == \
                [f"aif-site-worker-{pool.removeprefix('aif-site-')}"], (pool, workers)  # fmt: skip
        flow_id = client.create_flow_from_name("aif-pipeline")
        pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        params = {"profile": "site", "startup": "startup-c",
                  "project": "examples/health-readmission/aifactory.yaml"}  # fmt: skip
        deps = [client.create_deployment(flow_id=flow_id, name=f"c-pool-limit-{i}",
                                         entrypoint="flows/pipeline.py:pipeline",
                                         work_pool_name="aif-site-startup-c",
                                         parameters=params, pull_steps=pull)
                for i in (1, 2)]  # fmt: skip
    try:
        runs = [_start(site_profile, f"aif-pipeline/c-pool-limit-{i}") for i in (1, 2)]
        done = [_wait_final(site_profile, r.id, timeout=300) for r in runs]
        # Both end (refused by admission: startup-c's declaration is not approved), one
        # after the other: the pool's limit of 1 held the second back.
        assert all(d.state.is_final() and d.start_time and d.end_time for d in done), done
        first, second = sorted(done, key=lambda d: d.start_time)
        assert second.start_time >= first.end_time, (first.start_time, first.end_time,
                                                      second.start_time)  # fmt: skip
    finally:
        with prefect_client(site_profile) as client:
            for dep in deps:
                client.delete_deployment(dep)
