"""Fixtures for data-space tests: a local folder or an in-process S3 (moto) per module.

``store`` is parametrised over both backends: each test gets a fresh, empty location as
``Store(url, storage_options, fs, path)``. The moto server runs in this process on a free
loopback port (the way s3fs's own tests run it); no external service is needed.
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

CREDS = {"key": "testing", "secret": "testing"}
REGION = "us-east-1"


@dataclass
class Store:
    url: str  # fsspec URL of a fresh, empty location (s3://bucket/prefix or file:///dir)
    storage_options: dict[str, Any]
    fs: Any
    path: str  # the same location as the filesystem names it

    def sub(self, name: str) -> Store:
        return Store(f"{self.url}/{name}", self.storage_options, self.fs, f"{self.path}/{name}")

    @property
    def kind(self) -> str:
        return self.url.split("://", 1)[0]

    def rewrite(self, name: str, change: Any, **write_kwargs: Any) -> str:
        """Replace object ``name`` with ``change(table)``; return its URL."""
        path = f"{self.path}/{name}"
        table = change(pq.read_table(io.BytesIO(self.fs.cat_file(path))))
        buf = io.BytesIO()
        pq.write_table(table, buf, **write_kwargs)
        self.fs.pipe_file(path, buf.getvalue())
        return f"{self.url}/{name}"


@dataclass
class MotoS3:
    endpoint_url: str

    def storage_options(self) -> dict[str, Any]:
        return {
            **CREDS,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
            "config_kwargs": {"connect_timeout": 2, "retries": {"max_attempts": 1}},
        }

    def new_bucket(self) -> str:
        import boto3

        name = f"aif-test-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=CREDS["key"],
            aws_secret_access_key=CREDS["secret"],
            region_name=REGION,
        ).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield MotoS3(f"http://{host}:{port}")
    finally:
        server.stop()


def s3_store(moto: MotoS3, prefix: str = "space") -> Store:
    import fsspec

    bucket = moto.new_bucket()
    so = moto.storage_options()
    url = f"s3://{bucket}/{prefix}"
    fs, path = fsspec.core.url_to_fs(url, **so)
    return Store(url, so, fs, path)


def file_store(tmp_path: Path, name: str = "space") -> Store:
    import fsspec

    root = tmp_path / name
    root.mkdir(parents=True, exist_ok=True)
    url = f"file://{root}"
    fs, path = fsspec.core.url_to_fs(url)
    return Store(url, {}, fs, path)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    """A fresh, empty data-space location on the backend under test."""
    if backend == "s3":
        return s3_store(request.getfixturevalue("moto_s3"), "mobility/trips")
    return file_store(tmp_path, "dataspace")


@pytest.fixture()
def lake(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Store:
    """A fresh, empty lake on the same backend as ``store`` (a bucket of its own on S3)."""
    if backend == "s3":
        return s3_store(request.getfixturevalue("moto_s3"), "lake")
    return file_store(tmp_path, "lake")


def listing(s: Store) -> dict[str, Any]:
    """Every file under a store with what changes on a rewrite (mtime or LastModified/ETag)."""
    s.fs.invalidate_cache()
    if s.kind == "file":
        root = Path(s.path)
        return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")} if root.exists() else {}
    found = s.fs.find(s.path, detail=True)
    return {k: (v.get("ETag"), v.get("LastModified")) for k, v in found.items()}


@pytest.fixture(autouse=True)
def audit_lake_records(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, dict[str, Any]]]:
    """Unit tests touch no service: the audit's lake records (written with the start-up's
    own object-store identity, which on the site profile asks the gateway's STS) are kept
    here instead. A test marked ``real_audit`` writes them for real."""
    got: list[tuple[str, dict[str, Any]]] = []
    if request.node.get_closest_marker("real_audit") is None:
        from aifactory.tasks.core import audit

        monkeypatch.setattr(audit, "lake_record",
                            lambda cfg, sid, rec: got.append((sid, rec)) or "")  # fmt: skip
    return got
