"""Lake writes that are atomic: readers see a whole file or none, never part of one.

Local filesystems: write a temporary sibling, fsync, rename. Object stores: one PUT of the
whole body (S3 makes an object visible only when its upload completes). A manifest written
last is the commit point of a folder of data files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import Any

from fsspec.implementations.local import LocalFileSystem


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


def atomic_write_bytes(fs: Any, path: str, data: bytes) -> None:
    if is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:
        fs.pipe_file(path, data)


def atomic_put_file(fs: Any, local_path: str, path: str) -> None:
    """Commit a finished local file to ``path`` (a rename locally, a single upload on S3)."""
    if is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            fs.put_file(local_path, tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:
        fs.put_file(local_path, path)


def write_json_atomic(fs: Any, path: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    atomic_write_bytes(fs, path, data)


def read_json(fs: Any, path: str) -> Any:
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def sha256_file(local_path: str) -> str:
    h = hashlib.sha256()
    with open(local_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_quietly(fs: Any, paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(Exception):
            fs.rm_file(p)
