"""Site services: S3 endpoint (moto server), Prefect server, MLflow tracking server."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from aifactory.infra.site import procs
from aifactory.infra.site.layout import BUCKETS, REGION, S3_KEY, S3_SECRET, Site
from aifactory.tasks.core.errors import SiteError
from aifactory.tasks.core.home import aif_home

DATASPACE_ROOT = "s3://aif-dataspace"


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def s3_argv(site: Site) -> list[str]:
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(site.s3_port)]


def _s3_client(site: Site):  # type: ignore[no-untyped-def]
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=site.s3_url, aws_access_key_id=S3_KEY,
        aws_secret_access_key=S3_SECRET, region_name=REGION,
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
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


# -- S3 contents across restarts --------------------------------------------------------
# moto keeps objects in memory. ``down`` saves every object of the site's buckets under
# <site>/s3 (index.json + one blob per object) and a fresh moto gets them back on ``up``, so
# the lake and MLflow's artifacts survive with MLflow's SQLite registry. Objects are put
# back whole, so single-part ETags (MD5) are unchanged.
def _store(site: Site) -> Path:
    return site.root / "s3"


def save_s3(site: Site) -> int:
    """Snapshot all objects of the site's buckets; the previous snapshot is replaced last."""
    client = _s3_client(site)
    store, tmp = _store(site), site.root / "s3.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blobs").mkdir(parents=True)
    index: dict[str, dict[str, dict[str, object]]] = {}
    for bucket in BUCKETS:
        index[bucket] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                got = client.get_object(Bucket=bucket, Key=obj["Key"])
                blob = hashlib.sha256(f"{bucket}/{obj['Key']}".encode()).hexdigest()
                (tmp / "blobs" / blob).write_bytes(got["Body"].read())
                index[bucket][obj["Key"]] = {
                    "blob": blob, "etag": got.get("ETag", ""),
                    "content_type": got.get("ContentType", "binary/octet-stream"),
                    "metadata": got.get("Metadata", {}),
                }  # fmt: skip
    (tmp / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    old = site.root / "s3.old"
    shutil.rmtree(old, ignore_errors=True)
    if store.exists():
        store.rename(old)
    tmp.rename(store)
    shutil.rmtree(old, ignore_errors=True)
    return sum(len(v) for v in index.values())


def restore_s3(site: Site, progress: Callable[[str], None]) -> int:
    """Put a saved snapshot back into empty buckets (a freshly started moto)."""
    index_path = _store(site) / "index.json"
    if not index_path.exists():
        return 0
    client = _s3_client(site)
    if any(client.list_objects_v2(Bucket=b, MaxKeys=1).get("KeyCount", 0) for b in BUCKETS):
        return 0
    try:
        index = json.loads(index_path.read_text())
        n = 0
        for bucket, objects in index.items():
            for key, meta in objects.items():
                body = (_store(site) / "blobs" / meta["blob"]).read_bytes()
                client.put_object(
                    Bucket=bucket, Key=key, Body=body, ContentType=meta["content_type"],
                    Metadata=meta["metadata"],
                )  # fmt: skip
                n += 1
    except (OSError, ValueError, KeyError) as exc:
        raise SiteError(
            f"site part s3: restoring objects from {_store(site)} failed: {exc}"
        ) from None
    progress(f"s3: restored {n} objects saved by the last `down` ({_store(site)})")
    return n


def prefect_argv(site: Site) -> list[str]:
    return [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
            "--port", str(site.prefect_port)]  # fmt: skip


def prefect_env(site: Site) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(site.root / "prefect"),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(site.prefect_port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": site.prefect_api,
        "PREFECT_UI_API_URL": site.prefect_api,
    }


def prefect_ok(site: Site) -> bool:
    return procs.http_ok(f"{site.prefect_api}/health", b"true")


WORK_POOL = "aif-site"  # prefect.yaml (the repository root's) sends its deployments here


def worker_argv(site: Site) -> list[str]:
    return [_bin("prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process",
            "--name", "aif-site-worker"]  # fmt: skip


def worker_env(site: Site) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(site.root / "prefect-worker"),
        "PREFECT_API_URL": site.prefect_api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Flow runs send a heartbeat every 30 s (Prefect's minimum); the crash automation
        # (aif deploy) marks a run Crashed when they stop.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        # A deployment's run (in the platform's checkout or a project's clone) uses the
        # home and the site of whoever started the site, wherever it runs.
        "AIF_SITE_DIR": str(site.root),
        "AIF_HOME": str(aif_home()),
    }


def worker_ok(site: Site) -> bool:
    """The site's worker is polling the work pool (Prefect shows it ONLINE)."""
    import json
    import urllib.request

    req = urllib.request.Request(
        f"{site.prefect_api}/work_pools/{WORK_POOL}/workers/filter", data=b"{}",
        headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=2.0) as r:
            workers = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return any(w.get("name") == "aif-site-worker" and w.get("status") == "ONLINE"
               for w in workers)  # fmt: skip


def mlflow_argv(site: Site) -> list[str]:
    d = site.root / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    return [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination", "s3://aif-mlflow/artifacts", "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(site.mlflow_port), "--workers", "1"]  # fmt: skip


def mlflow_env(site: Site) -> dict[str, str]:
    # The job runner (8 huey worker processes, ~250 MB each) serves GenAI features the
    # registry does not use; on a 2-core site it costs ~2 GB and slows start-up.
    return {**site.s3_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_ok(site: Site) -> bool:
    return procs.http_ok(f"{site.mlflow_url}/health")


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
