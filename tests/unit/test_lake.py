"""Atomic lake writes and small helpers, on a local folder and on S3 (moto)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fsspec
import pytest

from aifactory.tasks.doors import lake as L
from tests.unit.conftest import Store, listing


def test_atomic_write_json_and_hash(store: Store) -> None:
    path = f"{store.path}/a/b/manifest.json"
    assert not L.exists(store.fs, path)
    L.write_json_atomic(store.fs, path, {"b": 1, "a": [1, 2]})
    assert L.exists(store.fs, path)
    assert L.read_json(store.fs, path) == {"a": [1, 2], "b": 1}
    data = store.fs.cat_file(path)
    assert L.sha256_of(store.fs, path) == hashlib.sha256(data).hexdigest()
    L.atomic_write_bytes(store.fs, path, b"new")
    assert store.fs.cat_file(path) == b"new"
    assert not [k for k in listing(store) if ".tmp-" in k]  # no staging file left behind


def test_staged_file_commits_only_on_success(store: Store) -> None:
    path = f"{store.path}/data/part-00000.parquet"
    with pytest.raises(RuntimeError), L.staged_file(store.fs, path) as local:
        Path(local).write_bytes(b"half")
        raise RuntimeError("boom")
    assert not L.exists(store.fs, path)
    if store.kind == "file":
        assert os.listdir(f"{store.path}/data") == []  # the staging sibling is gone
    with L.staged_file(store.fs, path) as local:
        Path(local).write_bytes(b"whole")
    assert store.fs.cat_file(path) == b"whole"


def test_atomic_put_file(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "local.bin"
    src.write_bytes(b"x" * 3_000_000)
    L.atomic_put_file(store.fs, str(src), f"{store.path}/big.bin")
    assert L.sha256_of(store.fs, f"{store.path}/big.bin") == L.sha256_file(str(src))


def test_remove_tree_quietly(store: Store) -> None:
    for name in ("x/1", "x/y/2", "keep"):
        L.atomic_write_bytes(store.fs, f"{store.path}/snap/{name}", b"1")
    L.remove_tree_quietly(store.fs, f"{store.path}/snap/x", prune_up_to=store.path)
    assert not L.exists(store.fs, f"{store.path}/snap/x/1")
    assert L.exists(store.fs, f"{store.path}/snap/keep")
    L.remove_tree_quietly(store.fs, f"{store.path}/no/such/folder")  # never raises


def test_prune_removes_empty_parents_only_below_the_root(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    L.atomic_write_bytes(fs, f"{tmp_path}/lake/snapshots/ds/abc/data/p", b"1")
    L.remove_tree_quietly(fs, f"{tmp_path}/lake/snapshots/ds/abc", prune_up_to=f"{tmp_path}/lake")
    assert os.listdir(tmp_path / "lake") == []


def test_exists_raises_when_unreachable() -> None:
    fs = fsspec.filesystem(
        "s3",
        key="k",
        secret="s",
        client_kwargs={"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}},
    )
    with pytest.raises(Exception, match=r"127\.0\.0\.1:9"):
        L.exists(fs, "bucket/key")
