"""Nothing lost when daemons of the site are killed: after `kill -9` of the OSD, the
gateway, slurmctld, MariaDB, the Prefect server and MLflow at once (as a power loss of the
login node would), `aif site up` brings the site back with every committed snapshot, model
version and run record intact."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from aifactory.infra.site.manager import site_root
from aifactory.tasks.core.config import Profile
from aifactory.tasks.core.home import site_dir
from tests.site.conftest import aif, prefect_client

pytestmark = pytest.mark.site

# One round: the storage daemons, the scheduling ones and the control plane killed at once,
# then one `aif site up` (each `up` costs CI about a minute).
KILLED = (("ceph-osd", "s3", "slurmctld", "mariadb", "prefect", "mlflow"),)


def _inventory(profile: Profile) -> dict[str, Any]:
    """What must survive: the lake's objects, model versions, run records, Slurm jobs."""
    import boto3
    from mlflow.tracking import MlflowClient

    so = profile.storage_options("s3://aif-lake")
    s3 = boto3.client("s3", endpoint_url=so["client_kwargs"]["endpoint_url"],
                      aws_access_key_id=so["key"], aws_secret_access_key=so["secret"],
                      region_name="us-east-1")  # fmt: skip
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="aif-lake"):
        for o in page.get("Contents", []):
            objects[o["Key"]] = o["ETag"]
    versions = MlflowClient(profile.mlflow.tracking_uri).search_model_versions(
        f"name='{profile.mlflow.model_name}'")  # fmt: skip
    with prefect_client(profile) as client:
        runs = len(client.read_flow_runs(limit=200))
    jobs = aif("runs", "ls", "--profile", "site", "--all", "--json")
    records = sorted(p.name for p in (Path(profile.runs_dir) / "pipeline").glob("*.json"))
    return {"objects": objects, "versions": sorted(v.version for v in versions),
            "flow_runs": runs, "records": records, "runs_ls": jobs.returncode}  # fmt: skip


def _pid(part: str) -> int:
    state = json.loads((site_root(site_dir()) / "site.json").read_text())
    return int(state[part]["pid"])


def test_site_up_after_kill_9_of_each_daemon_loses_nothing(
    site_profile: Profile, site_run: dict[str, Any]
) -> None:
    # site_run: a whole pipeline run has committed a snapshot, a version and a run record
    # (on a fresh site, as in CI, nothing else may have yet).
    before = _inventory(site_profile)
    assert before["objects"] and before["versions"] and before["records"]
    for killed in KILLED:
        pids = {part: _pid(part) for part in killed}
        for part, pid in pids.items():
            if part in ("prefect", "mlflow"):  # the server and its workers, as a crash would
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)
        res = aif("site", "up", timeout=600)
        assert res.returncode == 0, f"after kill -9 of {killed}:\n{res.stdout}\n{res.stderr}"
        for part, pid in pids.items():
            assert f"{part}: recorded pid {pid} is gone" in res.stdout, res.stdout
            assert _pid(part) != pid
    after = _inventory(site_profile)
    assert after["objects"] == before["objects"]
    assert after["versions"] == before["versions"]
    assert after["records"] == before["records"]
    assert after["flow_runs"] >= before["flow_runs"]
    assert after["runs_ls"] == 0
    # And it still works end to end: a run reads the lake and reaches Slurm and MLflow.
    res = aif("run", "--profile", "site", "--epochs", "2", timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
