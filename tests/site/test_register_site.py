"""Registration on the site's MLflow: two registrations of the same trained model at the
same moment leave exactly one model version."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.config import Profile
from tests.site.conftest import REPO, child_environ

pytestmark = pytest.mark.site

SCRIPT = """
import json, sys, time
from aifactory.tasks.core.config import load_profile
from aifactory.tasks.stages.ingest import load_snapshot
from aifactory.tasks.core.manifests import FeatureSet, TrainedModel
from aifactory.tasks.stages.preprocess import load_cached
from aifactory.tasks.doors.registry import register_model, registry_identity
rec, name, start = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
base = load_profile("site")
lake = base.lake_url_for(rec["startup"])
cfg = base.for_startup(rec["startup"])  # its own store and registry identity, as a run's
so = cfg.storage_options(lake)
snap = load_snapshot(lake, "mobility-trips", rec["snapshot"]["id"], so)
fset = load_cached(lake, rec["featureset"]["id"], so)
trained = TrainedModel.model_validate_json(open(rec["trained"]["run_dir"] + "/trained.json").read())
time.sleep(max(0.0, start - time.time()))  # both processes start registering together
with registry_identity(cfg.mlflow):
    mv = register_model(trained, fset, snap, tracking_uri=cfg.mlflow.tracking_uri,
                        model_name=name, experiment=cfg.mlflow.run_experiment,
                        artifact_location=None, lineage={},
                        feature_config=fset.feature_config, log=lambda m: None)
print(json.dumps({"version": mv.version, "reused": mv.reused}))
"""


def test_concurrent_registrations_leave_one_version(
    site_run: dict[str, Any], site_profile: Profile
) -> None:
    from mlflow.tracking import MlflowClient

    rec = site_run["record"]
    assert Path(rec["trained"]["run_dir"], "trained.json").exists()
    name = f"aif-concurrency-{uuid.uuid4().hex[:8]}"
    start = time.time() + 8  # after both interpreters have imported MLflow
    procs = [
        subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(rec), name, str(start)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_environ())
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert results[0]["version"] == results[1]["version"], results
    client = MlflowClient(tracking_uri=site_profile.mlflow.tracking_uri)
    versions = client.search_model_versions(f"name='{name}'")
    assert [v.version for v in versions] == [results[0]["version"]]
    # and a retry (after a timeout, say) finds it instead of creating another
    again = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(rec), name, "0"], cwd=REPO,
                           capture_output=True, text=True, timeout=300,
                           env=child_environ())  # fmt: skip
    assert json.loads(again.stdout.strip().splitlines()[-1]) == {
        "version": results[0]["version"],
        "reused": True,
    }
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    client.delete_registered_model(name)
