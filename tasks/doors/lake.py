"""Lake writes that are atomic: readers see a whole file or none, never part of one.

Local filesystems: write a temporary sibling, fsync, rename, fsync the folder. Object
stores: one streamed PUT of the whole body, never multipart (S3 makes an object visible
only when its upload completes, and a killed single PUT leaves nothing behind). A
manifest written last is the commit point of a folder of data files: a folder without
its manifest is not there for readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from fsspec.implementations.local import LocalFileSystem

CHUNK = 1 << 20


def is_local(fs: Any) -> bool:
    return isinstance(fs, LocalFileSystem)


STAGING_PREFIX = "."


def _tmp_sibling(path: str) -> str:
    parent, name = os.path.split(path)
    return os.path.join(parent, f"{STAGING_PREFIX}{name}.tmp-{uuid.uuid4().hex[:8]}")


def is_staging(path: str) -> bool:
    """Whether ``path`` names a writer's hidden staging file. Decided by the file's own
    name only, never by a folder above it: a data space or lake under ``~/.local/`` or a
    clone's ``.aif/`` home is as visible as any other."""
    return path.rstrip("/").rsplit("/", 1)[-1].startswith(STAGING_PREFIX)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _commit_local(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def exists(fs: Any, path: str) -> bool:
    """Whether ``path`` exists; errors other than "not found" (an unreachable endpoint,
    denied access) are raised, unlike ``fs.exists`` which turns them into False."""
    if is_local(fs):
        return os.path.exists(path)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    try:
        fs.info(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        # An S3 store answers 403, not 404, for a missing key when the identity may list
        # only part of the bucket (a start-up's own prefix on the site's gateway): a
        # listing of that key, which its own prefix allows, tells. Denied too: raised.
        return _listed(fs, path)
    return True


def _listed(fs: Any, path: str) -> bool:
    """Whether an object ``path`` or a folder of that name is in an S3 listing."""
    bucket, _, key = fs._strip_protocol(path).partition("/")
    key = key.rstrip("/")
    if not key:
        raise PermissionError(f"access denied to bucket {bucket}")
    got = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=2)
    return any(o["Key"] == key or o["Key"].startswith(key + "/")
               for o in got.get("Contents", []))  # fmt: skip


def _write_local(path: str, fill: Callable[[BinaryIO], object]) -> None:
    """Fill a hidden sibling of ``path``, fsync it, then rename it into place."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _tmp_sibling(path)
    try:  # a new file of a random name, never through a link (run folders are the jobs')
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666)  # fmt: skip
        with os.fdopen(fd, "wb") as fh:
            fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        _commit_local(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def atomic_write_bytes(fs: Any, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old state or all of it."""
    if is_local(fs):
        _write_local(path, lambda fh: fh.write(data))
    else:
        fs.pipe_file(path, data)


def write_text_local(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a small text file on this host's filesystem (run directories)."""
    _write_local(os.fspath(path), lambda fh: fh.write(text.encode()))


SINGLE_PUT_MAX = 5 * 2**30  # S3's limit for one PUT


def put_single(fs: Any, local_path: str, path: str) -> None:
    """Upload a finished local file to an object store in one streamed PUT request.

    Never multipart: a process killed mid-upload leaves no object and no incomplete
    multipart upload behind, and memory stays flat (the body streams from the file).
    """
    size = os.path.getsize(local_path)
    if size > SINGLE_PUT_MAX:
        raise OSError(f"{path}: {size} bytes is more than one PUT request can hold (5 GiB)")
    if not hasattr(fs, "call_s3"):
        fs.put_file(local_path, path)
        return
    bucket, key, _ = fs.split_path(path)
    with open(local_path, "rb") as fh:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=fh, ContentLength=size)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)


def atomic_put_file(fs: Any, local_path: str, path: str) -> None:
    """Commit a finished local file to ``path``: copy+fsync+rename locally, one upload on S3."""
    if is_local(fs):

        def copy(dst: BinaryIO) -> None:
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, dst, CHUNK)

        _write_local(path, copy)
    else:
        put_single(fs, local_path, path)


@contextlib.contextmanager
def staged_file(fs: Any, path: str) -> Iterator[str]:
    """A local path to write ``path``'s content to; committed atomically on a clean exit.

    Locally the staging file is a hidden sibling (renamed into place, no copy); for object
    stores it is a temporary file uploaded in one request. On an exception nothing is
    committed and the staging file is removed.
    """
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = _tmp_sibling(path)
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            _commit_local(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    else:
        fd, tmp = tempfile.mkstemp(prefix="aif-stage-", suffix=os.path.splitext(path)[1])
        os.close(fd)
        try:
            yield tmp
            put_single(fs, tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def write_json_atomic(fs: Any, path: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write_bytes(fs, path, data)


def read_json(fs: Any, path: str) -> Any:
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def sha256_file(local_path: str) -> str:
    h = hashlib.sha256()
    with open(local_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(fs: Any, path: str) -> str:
    """Content hash of a file on any filesystem, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_quietly(fs: Any, paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(Exception):
            fs.rm_file(p)


def remove_tree_quietly(fs: Any, path: str, prune_up_to: str | None = None) -> None:
    """Remove the folder ``path`` and everything in it; never raise.

    With ``prune_up_to`` (an ancestor of ``path``), empty local folders between the two
    are removed as well, so a failed write leaves no empty folders behind.
    """
    with contextlib.suppress(Exception):
        if is_local(fs):
            shutil.rmtree(path, ignore_errors=True)
        elif exists(fs, path):
            fs.rm(path, recursive=True)
    with contextlib.suppress(Exception):
        fs.invalidate_cache(path)
    if prune_up_to and is_local(fs):
        stop = os.path.normpath(prune_up_to)
        parent = os.path.dirname(os.path.normpath(path))
        while parent.startswith(stop + os.sep):
            try:
                os.rmdir(parent)  # only succeeds when empty
            except OSError:
                break
            parent = os.path.dirname(parent)
