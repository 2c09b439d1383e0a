"""Secrets never leak: known canary values for the S3 keys, the pseudonymisation key and
the webhook address are planted (and the site's registry passwords are known), a whole
pipeline run (Dask workers, a training job, registration) and a pseudonymising ingest are
made on the site, then every place an
operator or another tenant could read is searched for them: the commands' output, Prefect
flow-run parameters, logs and artifacts, MLflow params, tags, version tags and logged
files, Slurm job scripts and environments (as slurmctld keeps them) and every file the runs
wrote."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.config import Profile
from tests.site.conftest import aif, prefect_client

pytestmark = pytest.mark.site

CANARIES = {
    "s3 key": "CANARYKEY7Q2W9E4R",
    "s3 secret": "canary-secret-5f8a1c2e9d7b4a6f",
    "pseudonymisation key": "canary-pseudo-key-3e7d9a1f5b2c8e4a",
    "webhook": "http://127.0.0.1:9/hook/canary-webhook-token-8c1d",
}


# The site's real registry passwords (infra/site/mlflow_auth.py), searched for too.
REGISTRY_PASSWORDS: dict[str, str] = {}


def _hits(where: str, blob: str | bytes, found: list[str]) -> None:
    data = blob if isinstance(blob, bytes) else blob.encode(errors="replace")
    for what, value in {**CANARIES, **REGISTRY_PASSWORDS}.items():
        token = value.rsplit("/", 1)[-1]
        if value.encode() in data or token.encode() in data:
            found.append(f"{what} in {where}")


@pytest.fixture
def canary_platform_key() -> Iterator[None]:
    """The canary S3 key made a real key of the platform on the site's gateway (RGW checks
    keys, unlike moto), for this test only (`aif site up` also removes stray keys)."""
    from aifactory.infra.site import ceph
    from aifactory.infra.site.layout import Site
    from aifactory.infra.site.manager import site_root
    from aifactory.tasks.core.home import site_dir

    site = Site(site_root(site_dir()))
    ceph.rgw_admin(site, "key", "create", "--uid", ceph.PLATFORM_USER, "--key-type", "s3",
                   "--access-key", CANARIES["s3 key"],
                   "--secret-key", CANARIES["s3 secret"])  # fmt: skip
    try:
        yield
    finally:
        ceph.rgw_admin(site, "key", "rm", "--uid", ceph.PLATFORM_USER, "--key-type", "s3",
                       "--access-key", CANARIES["s3 key"])  # fmt: skip


@pytest.mark.usefixtures("canary_platform_key")
def test_canary_secrets_appear_nowhere(site_profile: Profile, tmp_path: Path) -> None:
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterStartTime,
        LogFilter,
        LogFilterTimestamp,
    )
    from prefect.types._datetime import now

    from aifactory.infra.site.mlflow_auth import ADMIN
    from aifactory.tasks.doors.registry import OPERATOR, read_password

    folder = site_profile.mlflow.tenant_credentials
    assert folder, "the site profile names the registry's credentials"
    REGISTRY_PASSWORDS.update({f"registry password of {u}": read_password(folder, u)
                               for u in ("startup-a", "startup-c", OPERATOR, ADMIN)})  # fmt: skip
    since = now("UTC")
    t0 = time.time()
    env = {
        "AWS_ACCESS_KEY_ID": CANARIES["s3 key"],
        "AWS_SECRET_ACCESS_KEY": CANARIES["s3 secret"],
        "AIF_PSEUDONYMISATION_KEY": CANARIES["pseudonymisation key"],
        "AIF_NOTIFY_WEBHOOK": CANARIES["webhook"],
        # A fresh data-space prefix and seed: every stage runs (Dask workers, a Slurm job).
        "AIF_DATASPACE__URL": f"s3://aif-lake/startup-a/inbox/canary-{int(t0)}",
        "AIF_DATASPACE__SEED": "true",  # seeded there: not the profile's demo data space
        "AIF_TRAINING__SEED": str(int(t0) % 100_000),
    }
    found: list[str] = []
    run = aif("run", "--profile", "site", "--rows", "60000", "--epochs", "2", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    _hits("`aif run` output", run.stdout + run.stderr, found)
    # Health data has personal-data columns: the ingest pseudonymises them with the key.
    ing_env = {k: v for k, v in env.items() if k != "AIF_DATASPACE__URL"}
    ing = aif("ingest", "health-records", "--profile", "site", "--startup", "startup-c",
              env=ing_env)  # fmt: skip
    assert ing.returncode == 0, ing.stdout + ing.stderr
    _hits("`aif ingest` output", ing.stdout + ing.stderr, found)
    dry = aif("run", "--profile", "site", "--dry-run", env=env)
    _hits("`aif run --dry-run` output", dry.stdout + dry.stderr, found)

    # Prefect: parameters, logs and artifacts of every run since the test began.
    with prefect_client(site_profile) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=since)))  # fmt: skip
        assert len(runs) >= 5, "the pipeline's flow runs were not found"
        for r in runs:
            _hits(f"Prefect parameters of flow run {r.name}", json.dumps(r.parameters), found)
        logs: list[Any] = []
        while batch := client.read_logs(
            log_filter=LogFilter(timestamp=LogFilterTimestamp(after_=since)),
            limit=200, offset=len(logs),
        ):  # fmt: skip
            logs += batch
        assert len(logs) > 20, logs
        _hits("Prefect logs", "\n".join(lg.message for lg in logs), found)
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs])))  # fmt: skip
        assert len(arts) >= 5, arts
        _hits("Prefect artifacts", json.dumps([a.data for a in arts], default=str), found)

    # MLflow: the new version's run params, tags, version tags and logged files.
    from mlflow import MlflowClient

    ml = MlflowClient(site_profile.mlflow.tracking_uri)
    uri = run.last_line
    name, version = uri.removeprefix("models:/").split("/")
    mv = ml.get_model_version(name, version)
    _hits("MLflow model version", json.dumps({"tags": mv.tags, "desc": mv.description}), found)
    mrun = ml.get_run(mv.run_id)
    _hits("MLflow params and tags", json.dumps({"p": mrun.data.params,
                                                "t": mrun.data.tags}), found)  # fmt: skip
    files = 0
    todo = [""]
    while todo:
        for f in ml.list_artifacts(mv.run_id, todo.pop()):
            if f.is_dir:
                todo.append(f.path)
            elif (f.file_size or 0) < 2_000_000:
                local = ml.download_artifacts(mv.run_id, f.path, str(tmp_path))
                _hits(f"MLflow artifact {f.path}", Path(local).read_bytes(), found)
                files += 1
    assert files >= 3, "the run's logged files were not found"

    # Slurm: the batch scripts slurmctld holds for every job since the test began, and
    # every file the runs wrote (job scripts, job output, Dask worker logs, manifests).
    from aifactory.tasks.doors.slurm import SlurmClient

    slurm = SlurmClient(env=site_profile.child_env())
    out = slurm.run(["sacct", "-a", "-X", "-n", "-P", "-S", time.strftime(
        "%Y-%m-%dT%H:%M:%S", time.localtime(t0 - 1)), "--format", "JobID"])  # fmt: skip
    jobs = sorted({ln.strip() for ln in out.splitlines() if ln.strip().isdigit()})
    assert jobs, "no Slurm job ran"
    scripts = 0
    for jid in jobs:
        text = slurm.run(["scontrol", "write", "batch_script", jid, "-"], check=False)
        if text.strip():
            scripts += 1
            _hits(f"Slurm batch script of job {jid}", text, found)
    assert scripts, "no batch script could be read back from slurmctld"
    written: list[Path] = []
    for p in Path(site_profile.runs_dir).rglob("*"):
        if p.is_file() and p.stat().st_mtime >= t0 - 1 and p.stat().st_size < 50_000_000:
            written.append(p)
            _hits(f"file {p}", p.read_bytes(), found)
    assert any(p.suffix == ".out" for p in written), "no job output file was written"

    # The jobs' own environment, as slurmctld keeps it for each job (what the job starts
    # with, where a start-up's code reads it): an allow-list, not the flow's environment.
    # The platform's object-store key (here the canary) never: the jobs get the start-up's
    # temporary credentials (issue 17).
    envs = [p for p in (Path(site_profile.slurm.conf or "").parent / "state").glob(
        "hash.*/job.*/environment") if p.stat().st_mtime >= t0 - 1]  # fmt: skip
    assert len(envs) >= 2, "the Dask worker and training jobs' environments were not found"
    job_env = b"\n".join(p.read_bytes() for p in envs)
    assert b"SLURM_EXPORT_ENV=" in job_env and b"AWS_ENDPOINT_URL" in job_env
    assert b"AWS_SESSION_TOKEN=" in job_env
    _hits("a Slurm job's environment", job_env, found)
    for name in (
        b"PREFECT_API_URL",
        b"AIF_PSEUDONYMISATION_KEY",
        b"AIF_NOTIFY_WEBHOOK",
        b"MLFLOW_TRACKING_PASSWORD",
        b"MLFLOW_TRACKING_USERNAME",
    ):
        if name in job_env:
            found.append(f"{name.decode()} in a Slurm job's environment")
    assert not found, "secrets leaked:\n" + "\n".join(found)
    print(f"searched {len(runs)} flow runs, {len(logs)} log lines, {len(arts)} artifacts, "
          f"{files} MLflow files, {scripts} job scripts, {len(written)} run files")  # fmt: skip
