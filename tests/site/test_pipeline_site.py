"""The whole pipeline on the real local site, checked with real clients."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import fsspec
import pandas as pd
import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.core.errors import SlurmCommandError
from aifactory.tasks.doors.slurm import SlurmClient

pytestmark = pytest.mark.site


def _sacct(profile: Profile, job_id: str) -> dict[str, str]:
    rec = SlurmClient(env=profile.child_env()).sacct_record(job_id)
    assert rec is not None, f"sacct knows nothing of job {job_id}"
    return rec


def test_last_line_is_model_uri(site_run: dict[str, Any]) -> None:
    res = site_run["result"]
    assert res.last_line.startswith("models:/mobility-trip-duration/")
    for n, stage in enumerate(["ingest", "preprocess", "train", "register"], 1):
        assert f"[{n}/4] {stage}" in res.stdout


def test_training_job_completed_with_gpu(site_run: dict[str, Any], site_profile: Profile) -> None:
    jobs = site_run["record"]["trained"]["slurm_job_ids"]
    assert jobs, "the training ran without a Slurm job"
    rec = _sacct(site_profile, jobs[-1])
    assert rec["State"] == "COMPLETED", rec
    assert rec["Account"] == "startup-a"
    assert rec["Partition"] == "gpu"
    assert "gres/gpu=1" in rec["AllocTRES"], rec["AllocTRES"]


def test_dask_workers_were_slurm_jobs_on_cpu(
    site_run: dict[str, Any], site_profile: Profile
) -> None:
    import json

    fset_id = site_run["record"]["featureset"]["id"]
    url = f"{site_profile.lake_url_for('startup-a')}/features/{fset_id}/manifest.json"
    fs, path = fsspec.core.url_to_fs(url, **site_profile.storage_options(url))
    manifest = json.loads(fs.cat_file(path))
    jobs = manifest["slurm_job_ids"]
    assert len(jobs) >= 2, manifest["cluster"]
    client = SlurmClient(env=site_profile.child_env())
    for job in jobs:
        rec = _sacct(site_profile, job)
        assert rec["Partition"] == "cpu" and rec["Account"] == "startup-a", rec
        assert client.squeue_state(job) is None, f"worker job {job} left in squeue"


def test_model_loads_with_pyfunc_and_predicts(
    site_run: dict[str, Any],
    site_profile: Profile,
    site_env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    import mlflow

    for k, v in site_profile.child_env().items():
        monkeypatch.setenv(k, v)
    mlflow.set_tracking_uri(site_profile.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{site_profile.mlflow.model_name}@candidate")
    fset_id = site_run["record"]["featureset"]["id"]
    url = f"{site_profile.lake_url_for('startup-a')}/features/{fset_id}/manifest.json"
    so = site_profile.storage_options(url)
    fs, path = fsspec.core.url_to_fs(url, **so)
    manifest = json.loads(fs.cat_file(path))
    test_file = manifest["splits"]["test"]["files"][0]
    df = pd.read_parquet(test_file, storage_options=so)
    pred = model.predict(df[manifest["feature_columns"]])
    assert len(pred) == len(df)
    rmse = float(((pd.Series(pred) - df["duration_min"].astype(float)) ** 2).mean() ** 0.5)
    assert rmse < df["duration_min"].astype(float).std(), "model no better than the mean"
    # raw data-space rows work too: the preprocessing travels with the model
    snap = site_run["record"]["snapshot"]["id"]
    raw_url = (
        f"{site_profile.lake_url_for('startup-a')}/snapshots/mobility-trips/{snap}/manifest.json"
    )
    fs2, p2 = fsspec.core.url_to_fs(raw_url, **so)
    first = json.loads(fs2.cat_file(p2))["objects"][0]["lake_path"]
    raw = pd.read_parquet(first, storage_options=so).head(50).drop(columns=["duration_min"])
    assert len(model.predict(raw)) == 50


def test_prefect_shows_completed_run_with_four_subflows(
    site_run: dict[str, Any], site_profile: Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read() -> tuple[Any, list[Any]]:
        async with get_client() as client:
            run = await client.read_flow_run(site_run["flow_run_id"])
            subs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])
                )
            )
            names = []
            for s in subs:
                flow = await client.read_flow(s.flow_id)
                names.append((flow.name, s.state_type.value))
            return run, names

    # Settings, not the environment: Prefect may have read its settings already in this
    # process (another test imported it), and would then ignore a changed variable.
    with temporary_settings({PREFECT_API_URL: site_profile.prefect.api_url}):
        run, subs = asyncio.run(read())
    assert run.state_type.value == "COMPLETED"
    assert sorted(subs) == sorted(
        [(n, "COMPLETED") for n in ("ingest", "preprocess", "train", "register")]
    )


def test_lake_holds_manifests_and_parquet(site_run: dict[str, Any], site_profile: Profile) -> None:
    lake = site_profile.lake_url_for("startup-a")  # the run's start-up keeps to its prefix
    assert lake == f"{site_profile.lake.url}/startup-a"
    fs, root = fsspec.core.url_to_fs(lake, **site_profile.storage_options(lake))
    snap = site_run["record"]["snapshot"]["id"]
    fset = site_run["record"]["featureset"]["id"]
    manifest = json.loads(fs.cat_file(f"{root}/snapshots/mobility-trips/{snap}/manifest.json"))
    assert manifest["objects"] and manifest["policy"]["allowed"]
    for o in manifest["objects"]:  # content-addressed lake objects, each with its record
        assert o["lake_path"].startswith(f"{lake}/objects/mobility-trips/")
        assert fs.size(o["lake_path"]) > 0
        assert fs.exists(o["lake_path"].removesuffix(".parquet") + ".json")
    assert fs.exists(f"{root}/features/{fset}/manifest.json")
    for split in ("train", "val", "test"):
        assert fs.glob(f"{root}/features/{fset}/{split}/*.parquet")


def test_unknown_account_is_refused(site_profile: Profile, tmp_path: Any) -> None:
    script = tmp_path / "x.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    with pytest.raises(SlurmCommandError) as err:
        SlurmClient(env=site_profile.child_env()).submit(str(script), ["--account=nosuch"])
    assert "account" in str(err.value).lower() or "association" in str(err.value).lower()


def test_usage_report_counts_the_gpu_job(site_run: dict[str, Any]) -> None:
    from tests.site.conftest import aif

    res = aif("report", "usage", "--profile", "site", "--startup", "startup-a")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    head = next(ln.split() for ln in lines if ln.startswith("startup "))
    assert head[:6] == ["startup", "project", "account", "jobs", "cpu_hours", "gpu_hours"]
    row = dict(zip(head, next(ln.split() for ln in lines if ln.startswith("startup-a")),
                   strict=True))  # fmt: skip
    assert (row["project"], row["account"]) == ("mobility-eta", "startup-a"), res.stdout
    assert int(row["jobs"]) >= 3 and float(row["gpu_hours"]) > 0, res.stdout
    assert "Prefect artifact usage-report: " in res.stdout  # the same table, in the UI


def test_status_and_logs_of_the_site_run(site_run: dict[str, Any]) -> None:
    """`aif status --profile site` shows the site's parts and the run; `aif logs` of the run
    gives its Prefect logs and the training job's Slurm log (issue 16)."""
    from tests.site.conftest import aif

    res = aif("status", "--profile", "site", "--json", "--limit", "50")
    assert res.returncode == 0, res.stdout + res.stderr
    info = json.loads(res.stdout)
    assert {p["part"] for p in info["site"] if p["healthy"]} >= {"slurmctld", "prefect", "s3"}
    run = next(r for r in info["runs"] if r["id"] == site_run["flow_run_id"])
    assert run["state"] == "Completed" and run["model"] == site_run["result"].last_line
    logs = aif("logs", site_run["flow_run_id"][:10], "--profile", "site")
    assert logs.returncode == 0, logs.stderr
    job = site_run["record"]["trained"]["slurm_job_ids"][0]
    assert f"/slurm-{job}.out" in logs.stdout and "[1/4]" not in logs.stdout.splitlines()[0]
