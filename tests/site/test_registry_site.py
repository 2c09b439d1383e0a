"""The site's MLflow enforces tenancy itself (issue 17): start-up B gets 403 from the
tracking server on everything of start-up A's (experiment, run, artifacts, registered
model, version, alias, new versions) and its searches show none of it; the operators' user
reads everything and writes nothing; an anonymous call is 401. A registration by B into
A's model is refused by the server before anything is logged, and the refusal is audited."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import requests

from aifactory.tasks.core.config import Profile
from aifactory.tasks.doors.registry import OPERATOR, read_password

pytestmark = pytest.mark.site


def _as(profile: Profile, user: str | None) -> Any:
    """A requests session on the tracking server's REST API as ``user`` (None: anonymous),
    with the password the site keeps for it: the server decides, not aifactory."""
    s = requests.Session()
    if user is not None:
        assert profile.mlflow.tenant_credentials
        s.auth = (user, read_password(profile.mlflow.tenant_credentials, user))
    base = profile.mlflow.tracking_uri.rstrip("/")

    def call(method: str, path: str, **kw: Any) -> requests.Response:
        return s.request(method, f"{base}/api/2.0/mlflow/{path}", timeout=30, **kw)

    return call


def _a_version(site_run: dict[str, Any]) -> tuple[str, str]:
    name, version = site_run["record"]["model"]["uri"].removeprefix("models:/").split("/")
    return name, version


def test_the_registry_refuses_one_startup_the_others_things(
    site_run: dict[str, Any], site_profile: Profile
) -> None:
    name, version = _a_version(site_run)
    a, b, op, anon = (_as(site_profile, u) for u in ("startup-a", "startup-b", OPERATOR, None))
    mv = a("GET", "model-versions/get", params={"name": name, "version": version})
    assert mv.status_code == 200, mv.text
    run_id = mv.json()["model_version"]["run_id"]
    run = a("GET", "runs/get", params={"run_id": run_id}).json()["run"]
    exp_id = run["info"]["experiment_id"]
    exp = a("GET", "experiments/get", params={"experiment_id": exp_id}).json()["experiment"]
    assert exp["name"] == "aifactory-startup-a"  # A's own experiment, made by `aif site up`

    reads = {
        "experiment": ("GET", "experiments/get", {"params": {"experiment_id": exp_id}}),
        "run": ("GET", "runs/get", {"params": {"run_id": run_id}}),
        "artifacts": ("GET", "artifacts/list", {"params": {"run_id": run_id, "path": "docs"}}),
        "model": ("GET", "registered-models/get", {"params": {"name": name}}),
        "version": ("GET", "model-versions/get", {"params": {"name": name, "version": version}}),
        "alias": ("GET", "registered-models/alias", {"params": {"name": name,
                                                                "alias": "candidate"}}),
    }  # fmt: skip
    writes = {
        "move an alias": ("POST", "registered-models/alias",
                          {"json": {"name": name, "alias": "champion", "version": version}}),
        "register a version": ("POST", "model-versions/create",
                               {"json": {"name": name, "source": f"runs:/{run_id}/model",
                                         "run_id": run_id}}),
        "tag a version": ("POST", "model-versions/set-tag",
                          {"json": {"name": name, "version": version, "key": "x",
                                    "value": "y"}}),
        "tag the run": ("POST", "runs/set-tag", {"json": {"run_id": run_id, "key": "x",
                                                          "value": "y"}}),
        "delete the model": ("DELETE", "registered-models/delete", {"json": {"name": name}}),
    }  # fmt: skip
    before = _model_state(a, name)
    for what, (method, path, kw) in {**reads, **writes}.items():
        got = b(method, path, **kw)
        assert got.status_code == 403, f"startup-b {what}: {got.status_code} {got.text[:200]}"
        assert anon(method, path, **kw).status_code == 401, f"anonymous {what}"
    for what, (method, path, kw) in reads.items():
        got = op(method, path, **kw)
        assert got.status_code == 200, f"operator {what}: {got.status_code} {got.text[:200]}"
    for what, (method, path, kw) in writes.items():
        got = op(method, path, **kw)
        assert got.status_code == 403, f"operator {what}: {got.status_code} {got.text[:200]}"
    # B's searches leave A's things out; the operator's show them.
    q = {"params": {"filter": f"name='{name}'", "max_results": 100}}
    assert not b("GET", "model-versions/search", **q).json().get("model_versions")
    assert op("GET", "model-versions/search", **q).json().get("model_versions")
    exps = b("GET", "experiments/search", params={"max_results": 1000}).json()
    names = {e["name"] for e in exps.get("experiments", [])}
    assert "aifactory-startup-a" not in names and "aifactory-startup-b" in names
    models = b("GET", "registered-models/search", params={"max_results": 1000}).json()
    assert name not in {m["name"] for m in models.get("registered_models", [])}
    # Nothing refused happened: the aliases and versions are as they were, no tag was set.
    assert _model_state(a, name) == before
    tags = a("GET", "model-versions/get", params={"name": name, "version": version}).json()
    assert "x" not in {t["key"] for t in tags["model_version"].get("tags", [])}


def _model_state(user: Any, name: str) -> tuple[Any, ...]:
    model = user("GET", "registered-models/get", params={"name": name}).json()["registered_model"]
    found = user("GET", "model-versions/search",
                 params={"filter": f"name='{name}'", "max_results": 1000}).json()  # fmt: skip
    aliases = sorted((x["alias"], x["version"]) for x in model.get("aliases", []))
    return aliases, sorted(int(v["version"]) for v in found.get("model_versions", []))


# B's registration runs in a process of its own, as a run's does: register_model sets
# MLflow's process-wide tracking and registry URIs, which must not leak into later tests.
REFUSED_SCRIPT = """
import json, sys, uuid
from pathlib import Path
from aifactory.tasks.core.audit import refusals_audited
from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.manifests import TrainedModel
from aifactory.tasks.doors.registry import RegistryRefused, register_model, registry_identity
from aifactory.tasks.stages.ingest import load_snapshot
from aifactory.tasks.stages.preprocess import load_cached
rec, name, action = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = load_profile("site")
lake = cfg.lake_url_for("startup-a")
so = cfg.storage_options(lake)
snap = load_snapshot(lake, "mobility-trips", rec["snapshot"]["id"], so)
fset = load_cached(lake, rec["featureset"]["id"], so)
trained = TrainedModel.model_validate_json(
    Path(rec["trained"]["run_dir"], "trained.json").read_text()
).model_copy(update={"weights_sha256": uuid.uuid4().hex})  # a new model: no cache hit
b = cfg.for_startup("startup-b")
try:
    with refusals_audited(cfg, "startup-b", action), registry_identity(b.mlflow):
        register_model(trained, fset, snap, tracking_uri=b.mlflow.tracking_uri,
                       model_name=name, experiment=b.mlflow.run_experiment,
                       artifact_location=None, lineage={},
                       feature_config=fset.feature_config, log=lambda m: None)
except RegistryRefused as exc:
    print(json.dumps({"refused": str(exc)}))
else:
    print(json.dumps({"refused": None}))
"""


def test_a_startups_registration_into_another_startups_model_is_refused_and_audited(
    site_run: dict[str, Any], site_profile: Profile
) -> None:
    """B's run, acting as B, tries to add a version to A's model: the server refuses before
    anything is logged (B's experiment gains no run), one line, and the refusal is in the
    operator log and in B's own audit area."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    from aifactory.tasks.core.audit import operator_log
    from tests.site.conftest import REPO, child_environ

    name, _ = _a_version(site_run)
    exp_name = f"{site_profile.mlflow.experiment}-startup-b"
    admin = MlflowClient(site_profile.mlflow.tracking_uri, site_profile.mlflow.tracking_uri)
    b_exp = admin.get_experiment_by_name(exp_name)
    assert b_exp is not None
    runs_before = len(admin.search_runs([b_exp.experiment_id], max_results=1000))
    log = operator_log(site_profile.runs_dir)
    lines_before = log.read_text().count("\n") if log.exists() else 0
    action = f"register test {uuid.uuid4().hex[:6]}"
    proc = subprocess.run([sys.executable, "-c", REFUSED_SCRIPT, json.dumps(site_run["record"]),
                           name, action], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=child_environ())  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    msg = json.loads(proc.stdout.strip().splitlines()[-1])["refused"]
    assert msg, proc.stdout
    assert f"registered model {name!r} is not registry user startup-b's" in msg, msg
    assert "\n" not in msg and "choose another mlflow.model_name" in msg
    assert len(admin.search_runs([b_exp.experiment_id], max_results=1000)) == runs_before
    new = [json.loads(x) for x in log.read_text().splitlines()[lines_before:]]
    mine = [r for r in new if r["action"] == action]
    assert mine and mine[0]["by"] == "registry" and mine[0]["decision"] == "refused"
    assert mine[0]["startup"] == "startup-b"


def test_a_site_that_ran_before_permissions_gets_them_and_keeps_its_models(
    site_profile: Profile,
) -> None:
    """A site of an earlier version runs MLflow without its auth app: `aif site up` sees it
    is not healthy, restarts it with permissions, and each model registered before, whose
    versions name one start-up, becomes that start-up's (readable by it and the operator,
    403 for the others)."""
    import time

    from aifactory.infra.site import manager, postgres, procs, services
    from aifactory.infra.site.layout import Site
    from aifactory.infra.site.manager import site_root
    from aifactory.tasks.core.home import site_dir
    from tests.site.conftest import aif

    site = Site(site_root(site_dir()))
    state = manager._load(site)
    assert procs.stop(state["mlflow"], "mlflow")
    old = [a for a in services.mlflow_argv(site) if a not in ("--app-name", "basic-auth")]
    env = {**site.s3_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **postgres.env(site)}
    state["mlflow"] = {**state["mlflow"], **procs.start("mlflow", old, site.logs / "mlflow.log",
                                                        env=env, cwd=site.root)}  # fmt: skip
    manager._save(site, state)
    deadline = time.monotonic() + 120
    while not procs.http_ok(f"{site.mlflow_url}/health") and time.monotonic() < deadline:
        time.sleep(1)
    anon = _as(site_profile, None)
    assert anon("GET", "users/current").status_code == 404  # no auth app: anyone writes
    name = f"legacy-{uuid.uuid4().hex[:8]}"
    exp = anon("POST", "experiments/create", json={"name": name}).json()["experiment_id"]
    run = anon("POST", "runs/create", json={"experiment_id": exp}).json()["run"]["info"]
    assert anon("POST", "registered-models/create", json={"name": name}).status_code == 200
    made = anon("POST", "model-versions/create", json={
        "name": name, "source": f"runs:/{run['run_id']}/model", "run_id": run["run_id"],
        "tags": [{"key": "aif.startup", "value": "startup-b"}]})  # fmt: skip
    assert made.status_code == 200, made.text

    up = aif("site", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "restarting mlflow" in up.stdout and f"{name} -> startup-b" in up.stdout, up.stdout
    assert anon("GET", "registered-models/get", params={"name": name}).status_code == 401
    for user, code in (("startup-b", 200), (OPERATOR, 200), ("startup-a", 403)):
        got = _as(site_profile, user)("GET", "registered-models/get", params={"name": name})
        assert got.status_code == code, f"{user}: {got.status_code}"
    again = aif("site", "up")
    assert again.returncode == 0 and name not in again.stdout  # adopted once
