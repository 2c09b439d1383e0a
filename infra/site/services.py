"""Site services: S3 endpoint (moto server), Prefect server, MLflow tracking server."""

from __future__ import annotations

import sys
from pathlib import Path

from infra.site import procs
from infra.site.layout import BUCKETS, REGION, S3_KEY, S3_SECRET, Site
from tasks.errors import SiteError

DATASPACE_URL = "s3://aif-dataspace/mobility/trips"
SEED = {"seed": 7, "rows": 200_000, "objects": 8}


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


def seed_dataspace(site: Site, progress) -> None:  # type: ignore[no-untyped-def]
    """Fill the data-space bucket with the deterministic mobility dataset when empty."""
    client = _s3_client(site)
    listing = client.list_objects_v2(Bucket="aif-dataspace", Prefix="mobility/trips/")
    if listing.get("KeyCount", 0) > 0:
        return
    from tasks.datagen import generate_mobility

    progress(f"seeding {DATASPACE_URL} ({SEED['rows']} trips in {SEED['objects']} objects, "
             f"seed {SEED['seed']})")  # fmt: skip
    try:
        generate_mobility(DATASPACE_URL, site.s3_storage_options(), **SEED)
    except Exception as exc:
        raise SiteError(f"site part s3: seeding {DATASPACE_URL} failed: {exc}") from None


def prefect_argv(site: Site) -> list[str]:
    return [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
            "--port", str(site.prefect_port)]  # fmt: skip


def prefect_env(site: Site) -> dict[str, str]:
    return {
        "PREFECT_HOME": str(site.root / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": site.prefect_api,
        "PREFECT_UI_API_URL": site.prefect_api,
    }


def prefect_ok(site: Site) -> bool:
    return procs.http_ok(f"{site.prefect_api}/health", b"true")


def mlflow_argv(site: Site) -> list[str]:
    d = site.root / "mlflow"
    d.mkdir(parents=True, exist_ok=True)
    return [_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}",
            "--artifacts-destination", "s3://aif-mlflow/artifacts", "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(site.mlflow_port), "--workers", "1"]  # fmt: skip


def mlflow_ok(site: Site) -> bool:
    return procs.http_ok(f"{site.mlflow_url}/health")
