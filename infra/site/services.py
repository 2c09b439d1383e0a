"""Site services: the S3 buckets on the site's RADOS Gateway (infra/site/ceph.py), the
Prefect server and its worker, the MLflow tracking server."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aifactory.infra.site import postgres, procs
from aifactory.infra.site.layout import ACCOUNTS, BUCKETS, REGION, S3_KEY, Site
from aifactory.tasks.control.prefect_server import CLIENT_MAX_RETRIES
from aifactory.tasks.core.errors import SiteError
from aifactory.tasks.core.home import aif_home

DATASPACE_ROOT = "s3://aif-dataspace"


def bin_path(name: str) -> str:
    """A program of this installation's virtual environment (else the one on PATH)."""
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def _s3_client(site: Site):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=site.s3_url, aws_access_key_id=S3_KEY,
        aws_secret_access_key=site.platform_secret(), region_name=REGION,
        # A gateway just restarted answers GET / before its first bucket calls: the site's
        # set-up calls wait and retry (a policy PUT timed out once after kill -9 of rgw).
        config=Config(connect_timeout=2, read_timeout=30,
                      retries={"max_attempts": 5, "mode": "standard"}),
    )  # fmt: skip


def s3_ok(site: Site) -> bool:
    if not procs.port_open("127.0.0.1", site.s3_port):
        return False
    try:
        _s3_client(site).list_buckets()
    except Exception:
        return False
    return True


def ensure_buckets(site: Site) -> None:
    client = _s3_client(site)
    have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for b in BUCKETS:
        if b not in have:
            client.create_bucket(Bucket=b)


def site_grants() -> tuple[str, dict[str, list[str]], dict[str, list[str]]]:
    """(lake bucket, start-up -> its lake prefix, start-up -> the data-space prefixes that
    the catalog's usage policies allow it), from the site profile as written and the
    default catalog. Only the site's start-ups (layout.ACCOUNTS) are object-store users."""
    from aifactory.infra.site.slurm_parts import site_profile_as_written
    from aifactory.tasks.data.catalog import catalog_at, resolve_distribution
    from aifactory.tasks.data.dataspace import glob_base

    cfg = site_profile_as_written()
    bucket, _, base = cfg.lake.url.removeprefix("s3://").partition("/")
    lake = {sid: ["/".join(p for p in (base.strip("/"), st.s3_prefix or sid) if p)]
            for sid, st in cfg.startups.items() if sid in ACCOUNTS}  # fmt: skip
    data: dict[str, list[str]] = {sid: [] for sid in ACCOUNTS}
    for entry in catalog_at().datasets:
        url = resolve_distribution(entry, DATASPACE_ROOT)
        if not url.startswith(DATASPACE_ROOT + "/"):
            continue
        prefix = glob_base(url).removeprefix(DATASPACE_ROOT + "/").strip("/")
        allowed = entry.policy.allowed_startups
        for sid in ACCOUNTS:
            if "*" in allowed or sid in allowed:
                data[sid].append(prefix)
    return bucket, lake, data


def ensure_policies(site: Site) -> None:
    """Each start-up's rights, enforced by the gateway: read and write under its own lake
    prefix, read of the data sets its usage policy allows, temporary credentials (STS) for
    its jobs. Rewritten on every `up`, so a catalog or profile change takes effect."""
    import boto3

    from aifactory.infra.site import ceph

    bucket, lake, data = site_grants()
    client = _s3_client(site)
    for name, grants, actions in ((bucket, lake, ceph.WRITE),
                                  ("aif-dataspace", data, ceph.READ),
                                  ("aif-mlflow", {}, ceph.READ)):  # fmt: skip
        doc = ceph.bucket_policy(name, grants, actions)
        client.put_bucket_policy(Bucket=name, Policy=ceph.compact(doc))
    iam = boto3.client("iam", endpoint_url=site.s3_url, aws_access_key_id=S3_KEY,
                       aws_secret_access_key=site.platform_secret(),
                       region_name=REGION)  # fmt: skip
    for sid in ACCOUNTS:
        iam.put_user_policy(UserName=sid, PolicyName="aif-sts",
                            PolicyDocument=ceph.compact(ceph.STS_POLICY))  # fmt: skip


def seed_dataspace(site: Site, progress: Callable[[str], None]) -> None:
    """Fill the data-space bucket with every catalog dataset that has a generator and is
    missing (mobility trips, tourism reviews, health admissions, agriculture readings)."""
    from aifactory.tasks.data.catalog import catalog_at, resolve_distribution
    from aifactory.tasks.data.dataspace import glob_base
    from aifactory.tasks.data.generators import seed_entry

    client = _s3_client(site)
    for entry in catalog_at().datasets:
        if entry.generator is None:
            continue
        url = resolve_distribution(entry, DATASPACE_ROOT)
        prefix = glob_base(url).removeprefix(DATASPACE_ROOT + "/").rstrip("/") + "/"
        listing = client.list_objects_v2(Bucket="aif-dataspace", Prefix=prefix)
        if listing.get("KeyCount", 0) > 0:
            continue
        g = entry.generator
        progress(f"seeding {url} ({entry.id}: {g.rows} rows in {g.objects} objects, seed {g.seed})")
        try:
            seed_entry(entry, url, site.s3_storage_options())
        except Exception as exc:
            raise SiteError(f"site part s3: seeding {url} failed: {exc}") from None


# -- the moto era's objects ---------------------------------------------------------------
# Before the site ran Ceph, its S3 endpoint was moto (objects in memory), and ``down`` saved
# every object under <site>/s3 (index.json + one blob per object). The first ``up`` with the
# gateway imports that snapshot (objects put back whole, so single-part ETags are the same
# MD5s that manifests recorded), then renames the folder so it is never imported twice.
def _store(site: Site) -> Path:
    return site.root / "s3"


def import_moto_snapshot(site: Site, progress: Callable[[str], None]) -> int:
    """Put the objects of an old moto snapshot into the gateway's buckets (an object that
    is already there with the same size is skipped, so an interrupted import resumes)."""
    index_path = _store(site) / "index.json"
    if not index_path.exists():
        return 0
    client = _s3_client(site)
    try:
        index = json.loads(index_path.read_text())
        n = 0
        for bucket, objects in index.items():
            if bucket not in BUCKETS:
                continue
            for key, meta in objects.items():
                body = (_store(site) / "blobs" / meta["blob"]).read_bytes()
                try:
                    if client.head_object(Bucket=bucket, Key=key)["ContentLength"] == len(body):
                        continue
                except client.exceptions.ClientError:
                    pass
                client.put_object(
                    Bucket=bucket, Key=key, Body=body, ContentType=meta["content_type"],
                    Metadata=meta["metadata"],
                )  # fmt: skip
                n += 1
    except (OSError, ValueError, KeyError) as exc:
        raise SiteError(
            f"site part s3: importing the moto snapshot {_store(site)} failed: {exc}"
        ) from None
    done = site.root / f"s3.imported-{time.strftime('%Y%m%d-%H%M%S')}"
    _store(site).rename(done)
    progress(f"s3: imported {n} objects of the old moto snapshot into Ceph (kept in {done})")
    return n


def prefect_argv(site: Site) -> list[str]:
    return [bin_path("prefect"), "server", "start", "--host", "127.0.0.1",
            "--port", str(site.prefect_port)]  # fmt: skip


def prefect_env(site: Site) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(site.root / "prefect"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(site.prefect_port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": site.prefect_api,
        "PREFECT_UI_API_URL": site.prefect_api,
        # A nightly held back by its deployment's concurrency limit asks again after 10 s
        # (Prefect's default, 30 s, leaves the site idle for most of that after a run ends).
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "10",
        # PostgreSQL (infra/site/postgres.py), not SQLite: many start-ups' nightlies write
        # at once. The password comes from PGPASSFILE.
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.url(
            site, postgres.PREFECT.role, "prefect", driver="asyncpg"
        ),
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE": "20",
        "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW": "20",
        **postgres.env(site),
        # What the server keeps (the site profile's prefect.retention): Prefect's own
        # database-vacuum service deletes older flow runs, logs, artifacts and events.
        **_site_profile().prefect.retention.server_env(),
    }


def _site_profile() -> Any:
    from aifactory.infra.site.slurm_parts import site_profile_as_written

    return site_profile_as_written()


def prefect_ok(site: Site) -> bool:
    return procs.http_ok(f"{site.prefect_api}/health", b"true")


def work_pool(startup: str) -> str:
    """A start-up's own work pool on the site (the profile's prefect.work_pools:
    per-startup; deployments/deploy.py: work_pool_for)."""
    return f"aif-site-{startup}"


def worker_name(startup: str) -> str:
    return f"aif-site-worker-{startup}"


def worker_argv_for(startup: str) -> Callable[[Site], list[str]]:
    def argv(site: Site) -> list[str]:
        return [bin_path("prefect"), "worker", "start", "--pool", work_pool(startup), "--type",
                "process", "--name", worker_name(startup)]  # fmt: skip

    return argv


def ensure_work_pools(site: Site, progress: Callable[[str], None]) -> None:
    """Each start-up's work pool with its concurrency limit (startups.<id>.flow_runs of the
    site profile as written: a run's environment never lifts it), set on every `up`."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from aifactory.infra.site.slurm_parts import site_profile_as_written
    from aifactory.tasks.control.worker import ensure_work_pool

    cfg = site_profile_as_written()
    for sid in ACCOUNTS:
        limit = cfg.startups[sid].flow_runs if sid in cfg.startups else 1
        if ensure_work_pool(site.prefect_api, work_pool(sid), limit):
            progress(f"work pool {work_pool(sid)}: created, {limit} flow run(s) at once")
    with temporary_settings({PREFECT_API_URL: site.prefect_api}), \
            get_client(sync_client=True) as client:  # fmt: skip
        from prefect.client.schemas.actions import WorkPoolUpdate
        from prefect.exceptions import ObjectNotFound

        try:  # the shared pool of before: its deployments now run on the start-ups' pools
            old = client.read_work_pool("aif-site")
        except ObjectNotFound:
            old = None
        if old is not None and not old.is_paused:
            client.update_work_pool("aif-site", WorkPoolUpdate(is_paused=True))
            progress(
                "work pool aif-site (shared, before per-start-up pools): paused; "
                "`aif deploy` moves its deployments to the start-ups' pools"
            )


def saved_search_name(startup: str) -> str:
    return f"{startup}: runs of the last 7 days"


def ensure_saved_searches(site: Site, progress: Callable[[str], None]) -> None:
    """One saved filter of the runs page per start-up (the UI's filter menu): its runs, by
    the tag every run of it carries (tasks/doors/console.py), of the last 7 days. Upserted
    by name on every `up`."""
    import httpx

    for sid in ACCOUNTS:
        body = {"name": saved_search_name(sid), "filters": [
            {"object": "flowRun", "property": "tag", "type": "", "operation": "",
             "value": [f"startup:{sid}"]},
            {"object": "flowRun", "property": "range", "type": "", "operation": "",
             "value": {"type": "span", "seconds": -7 * 86400}},
        ]}  # fmt: skip
        r = httpx.put(f"{site.prefect_api}/saved_searches/", json=body, timeout=30)
        if r.status_code >= 400:
            raise SiteError(f"site part prefect: saved search for {sid}: HTTP {r.status_code} "
                            f"{r.text[:200]}")  # fmt: skip


def worker_env(site: Site) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(site.root / "prefect-worker"),
        "PREFECT_API_URL": site.prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Flow runs send a heartbeat every 30 s (Prefect's minimum); the crash automation
        # (aif deploy) marks a run Crashed when they stop.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        # The worker and its flow runs outlive an outage of the server (prefect_server.py).
        "PREFECT_CLIENT_MAX_RETRIES": CLIENT_MAX_RETRIES,
        # A deployment's run (in the platform's checkout or a project's clone) uses the
        # home and the site of whoever started the site, wherever it runs.
        "AIF_SITE_DIR": str(site.root),
        "AIF_HOME": str(aif_home()),
    }


def worker_ok_for(startup: str) -> Callable[[Site], bool]:
    def ok(site: Site) -> bool:
        """The start-up's worker is polling its pool (Prefect shows it ONLINE)."""
        from aifactory.tasks.control.worker import worker_online

        return worker_online(site.prefect_api, work_pool(startup), worker_name(startup))

    return ok


def mlflow_argv(site: Site) -> list[str]:
    """The tracking server with MLflow's permissions on (infra/site/mlflow_auth.py)."""
    return [bin_path("mlflow"), "server", "--app-name", "basic-auth",
            "--backend-store-uri", postgres.url(site, postgres.MLFLOW.role, "mlflow"),
            "--artifacts-destination", "s3://aif-mlflow/artifacts", "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(site.mlflow_port), "--workers", "1"]  # fmt: skip


def mlflow_env(site: Site) -> dict[str, str]:
    from aifactory.infra.site import mlflow_auth

    # The job runner (8 huey worker processes, ~250 MB each) serves GenAI features the
    # registry does not use; on a 2-core site it costs ~2 GB and slows start-up.
    return {**site.s3_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **mlflow_auth.server_env(site), **postgres.env(site)}  # fmt: skip


def mlflow_ok(site: Site) -> bool:
    """Serving, and with its permissions on: an anonymous call is refused (401). A server
    of an earlier site, without them, is not healthy, so ``up`` restarts it with them."""
    if not procs.http_ok(f"{site.mlflow_url}/health"):
        return False
    return procs.http_status(f"{site.mlflow_url}/api/2.0/mlflow/users/current") == 401


def ensure_registry_access(site: Site, progress: Callable[[str], None]) -> None:
    """The registry's users, the operators' role and the start-ups' own experiments
    (infra/site/mlflow_auth.py), named after the site profile's mlflow.experiment."""
    from aifactory.infra.site import mlflow_auth
    from aifactory.infra.site.slurm_parts import site_profile_as_written

    mlflow_auth.ensure_access(site, site_profile_as_written().mlflow.experiment, progress)


def ensure_crash_detector(site: Site, progress: Callable[[str], None]) -> None:
    """The site's Prefect server marks a flow run Crashed when its heartbeats stop, from
    `aif site up` on (before, only once `aif deploy` had run: a killed run stayed Running)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from aifactory.deployments.deploy import CRASH_AFTER_S, CRASH_DETECTOR, ensure_crash_detector

    with temporary_settings({PREFECT_API_URL: site.prefect_api}), \
            get_client(sync_client=True) as client:  # fmt: skip
        if ensure_crash_detector(client):
            progress(f"crash detection: {CRASH_DETECTOR} (no heartbeat for {CRASH_AFTER_S} s)")


def relay_dir(site: Site) -> Path:
    """The relay's spools (the site profile's allocation.relay_dir: ${AIF_SITE_DIR}/relay)."""
    return site.root / "relay"


def relay_argv(site: Site) -> list[str]:
    """The relay (tasks/control/relay.py): a flow run inside an allocation reaches Prefect
    and MLflow through it, as files on the shared filesystem."""
    from aifactory.infra.site import mlflow_auth

    return [sys.executable, "-m", "aifactory.tasks.control.relay", "--root", str(relay_dir(site)),
            "--prefect", f"http://127.0.0.1:{site.prefect_port}", "--mlflow", site.mlflow_url,
            "--mlflow-secrets", str(mlflow_auth.secrets_dir(site))]  # fmt: skip


def relay_ok(site: Site) -> bool:
    from aifactory.tasks.control.relay import relay_alive

    return relay_alive(relay_dir(site), max_age_s=5.0)
