"""Data-space side: dataset contracts, object listing, schema checks before any data read.

Listing returns every object's key, size, ETag and version; a contract check reads only
the Parquet footer. Storage problems (unreachable endpoint, missing bucket or path) become
one :class:`StorageError` line naming the URL and the cause; an empty prefix or an object
that breaks its contract becomes one :class:`DataError` line naming object and column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import email.utils
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import fsspec
import pyarrow as pa

from aifactory.tasks.core.errors import ConfigError, DataError, StorageError
from aifactory.tasks.doors.lake import is_staging

MOBILITY_SCHEMA = pa.schema(
    [
        pa.field("trip_id", pa.string(), nullable=False),
        pa.field("pickup_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("pickup_zone", pa.int32(), nullable=False),
        pa.field("dropoff_zone", pa.int32(), nullable=False),
        pa.field("distance_km", pa.float64(), nullable=False),
        pa.field("passenger_count", pa.int8(), nullable=False),
        pa.field("vendor", pa.string(), nullable=False),
        pa.field("payment_type", pa.string(), nullable=True),
        pa.field("weather", pa.string(), nullable=False),
        pa.field("temperature_c", pa.float64(), nullable=True),
        pa.field("duration_min", pa.float64(), nullable=False),
    ]
)


REVIEW_SCHEMA = pa.schema(
    [
        pa.field("review_id", pa.string(), nullable=False),
        pa.field("place", pa.string(), nullable=False),
        pa.field("rating", pa.int8(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class DatasetContract:
    """What a data-space dataset promises: its columns, types, nullability and key.

    Built from the dataset's catalog entry (tasks/data/catalog.py)."""

    name: str
    data_space: str
    title: str
    schema: pa.Schema
    primary_key: str
    publisher: str = ""
    license: str = ""
    format: str = "parquet"
    descriptions: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)

    def schema_fields(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in self.schema]

    def fingerprint(self) -> str:
        """Hash of the columns' names, types and nullability, the key and the format (not of
        descriptions)."""
        blob = json.dumps(
            [self.schema_fields(), self.primary_key, self.format],
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def contract(name: str, catalog_path: str | None = None) -> DatasetContract:
    """The contract of catalog dataset ``name`` (default: the shipped catalog)."""
    from aifactory.tasks.data.catalog import catalog_at

    try:
        return catalog_at(catalog_path).get(name).contract()  # type: ignore[no-any-return]
    except ConfigError as exc:
        raise DataError(str(exc)) from None


@dataclass(frozen=True)
class SourceObject:
    """One object of a data space, as listed (no data read)."""

    key: str  # path as the filesystem knows it: bucket/prefix/name for s3, absolute path locally
    url: str  # full URL
    size: int
    etag: str | None = None
    version_id: str | None = None
    mtime: float | None = None

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def identity(self) -> str:
        """What changes when the content changes: version, ETag, or (locally) size+mtime."""
        if self.version_id:
            return f"version:{self.version_id}"
        if self.etag:
            return f"etag:{self.etag}"
        return f"mtime:{self.mtime}"


# -- storage errors ---------------------------------------------------------------------
def _endpoint(storage_options: dict[str, Any] | None) -> str | None:
    ck = (storage_options or {}).get("client_kwargs") or {}
    return ck.get("endpoint_url") or (storage_options or {}).get("endpoint_url")


def _one_line(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def options_of(fs: Any) -> dict[str, Any]:
    """Enough of a filesystem's options to name its endpoint in an error."""
    return {"client_kwargs": dict(getattr(fs, "client_kwargs", None) or {})}


def is_connection_error(exc: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError
    except ImportError:  # pragma: no cover - s3fs pulls botocore in
        boto: tuple[type[BaseException], ...] = ()
    else:
        boto = (BotoConnectionError, ConnectTimeoutError, EndpointConnectionError)
    try:  # fsspec's HTTP filesystem (and s3fs underneath) speak aiohttp
        from aiohttp import ClientConnectionError
    except ImportError:  # pragma: no cover
        web: tuple[type[BaseException], ...] = ()
    else:
        web = (ClientConnectionError,)
    if isinstance(exc, (*boto, *web, ConnectionError, TimeoutError)):
        return True
    text = str(exc).lower()
    return any(m in text for m in ("could not connect", "cannot connect", "connect timeout",
                                   "connection refused"))  # fmt: skip


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (fsspec's HTTP filesystem turns a
    failed connection into a FileNotFoundError raised from the aiohttp error)."""
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def http_error(where: str, url: str, exc: BaseException) -> StorageError:
    """One line for a failed HTTP(S) listing or read: the host unreachable (with the
    connection error's class), an HTTP status, or a missing path."""
    host = urlsplit(url).netloc or url
    for cause in _causes(exc):
        if is_connection_error(cause):
            return StorageError(
                f"{where}: host {host} unreachable ({type(cause).__name__}: {_one_line(cause)})"
            )
        status = getattr(cause, "status", None)
        if isinstance(status, int) and status >= 400:
            if status == 404:
                return StorageError(f"{where}: path does not exist (HTTP 404 from {host})")
            reason = getattr(cause, "message", "") or ""
            return StorageError(f"{where}: HTTP {status} {reason} from {host}".replace("  ", " "))
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{where}: path does not exist")
    return storage_error(where, exc)


def storage_error(
    where: str, exc: BaseException, storage_options: dict[str, Any] | None = None
) -> StorageError:
    """Turn an fsspec/botocore exception into one line: ``<where>: <why>``."""
    endpoint = _endpoint(storage_options)
    if is_connection_error(exc):
        ep = f"endpoint {endpoint}" if endpoint else "the S3 endpoint"
        return StorageError(f"{where}: {ep} unreachable ({_one_line(exc)})")
    name = type(exc).__name__
    if isinstance(exc, PermissionError) or name in (
        "NoCredentialsError",
        "PartialCredentialsError",
    ):
        why = _one_line(exc)
        detail = f" ({why})" if why and why != "None" else ""
        if (storage_options or {}).get("token"):
            return StorageError(
                f"{where}: access denied by the object store{detail}: this run's temporary "
                "credentials are the start-up's own, which reach only its lake prefix and "
                "the data sets that their usage policies grant it"
            )
        return StorageError(f"{where}: access denied{detail}")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{where}: path does not exist")
    return StorageError(f"{where}: {name}: {_one_line(exc, 200)}")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and path for ``url`` (no network call is made)."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        raise StorageError(f"{url}: cannot open the filesystem: {_one_line(exc)}") from None
    except OSError as exc:  # a filesystem that connects when made (ftp, sftp): host unknown
        raise StorageError(f"{url}: cannot reach the store ({type(exc).__name__}: "
                           f"{_one_line(exc)})") from None  # fmt: skip
    return fs, path.rstrip("/") or path


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def check_store(url: str, storage_options: dict[str, Any] | None, what: str) -> tuple[Any, str]:
    """Fail fast when the store behind ``url`` is unreachable or its bucket is missing.

    Local paths are not checked here (a missing lake folder is created on write).
    """
    fs, path = filesystem(url, storage_options)
    if protocol_of(url) in ("s3", "s3a"):
        bucket = path.split("/", 1)[0]
        where = f"{what} {url}"
        try:
            fs.call_s3("head_bucket", Bucket=bucket)
        except FileNotFoundError:
            raise StorageError(f"{where}: bucket {bucket!r} does not exist") from None
        except PermissionError:
            # 403: the bucket exists, and this identity may only use part of it (a start-up's
            # own prefix on a site with per-start-up identities): the store judges each access.
            pass
        except Exception as exc:  # botocore and aiohttp raise many types
            raise storage_error(where, exc, storage_options) from None
    return fs, path


# -- listing ----------------------------------------------------------------------------
def glob_base(url: str) -> str:
    """The folder above a glob's first wildcard (``url`` itself when it has none)."""
    cuts = [url.find(c) for c in "*?[" if c in url]
    return url[: min(cuts)].rsplit("/", 1)[0] if cuts else url


def list_objects(
    url: str,
    storage_options: dict[str, Any] | None = None,
    what: str = "data space",
    extension: str = ".parquet",
) -> list[SourceObject]:
    """Every ``*<extension>`` object under ``url`` (recursively), or matching ``url`` when it
    is a glob (``s3://bucket/health/*.jsonl``), sorted by key. Only a listing: no data read.

    Raises StorageError for an unreachable endpoint, a missing bucket or a missing local
    folder, and DataError when nothing matches.
    """
    where = f"{what} {url}"
    is_glob = glob_base(url) != url
    fs, root = check_store(glob_base(url), storage_options, what)
    protocol = protocol_of(url)
    try:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        if protocol == "file" and not os.path.isdir(root):
            what_is = "is not a folder" if os.path.exists(root) else "path does not exist"
            raise StorageError(f"{where}: {what_is}")
        if is_glob:
            found: dict[str, dict[str, Any]] = fs.glob(
                filesystem(url, storage_options)[1], detail=True
            )
        elif protocol in ("http", "https"):
            found = {root: fs.info(url)}
        else:
            found = fs.find(root, detail=True)
    except StorageError:
        raise
    except Exception as exc:
        if protocol in ("http", "https"):
            raise http_error(where, url, exc) from None
        if not isinstance(exc, FileNotFoundError):
            raise storage_error(where, exc, storage_options) from None
        bucket = root.split("/", 1)[0]
        why = f"bucket {bucket!r} does not exist" if protocol != "file" else "path does not exist"
        raise StorageError(f"{where}: {why}") from None
    objs = []
    for path, info in sorted(found.items()):
        if info.get("type") == "directory" or not path.endswith(extension):
            continue
        if is_staging(path):  # a writer's hidden staging file (its own name, not a folder's)
            continue
        if protocol in ("http", "https") and not info.get("size"):
            try:  # an HTML index gives names only: ask the server for size and validators
                info = fs.info(path)
            except Exception as exc:
                raise http_error(f"{where}: {path}", url, exc) from None
        full = path if "://" in path else f"{protocol}://{path}"
        objs.append(_to_object(path, full, info))
    if not objs:
        raise DataError(f"{where}: no *{extension} objects under this prefix")
    return objs


def _to_object(key: str, url: str, info: dict[str, Any]) -> SourceObject:
    """A listing entry as a SourceObject. Where the store gives no ETag, version or time
    (some HTTP servers), the object gets a one-off identity, so it is always read again:
    a change could not be told otherwise."""
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    version = info.get("VersionId") or info.get("version_id") or info.get("generation")
    mtime: Any = info.get("mtime") or info.get("created") or info.get("LastModified")
    if mtime is None and info.get("Last-Modified"):
        with contextlib.suppress(TypeError, ValueError):
            mtime = email.utils.parsedate_to_datetime(str(info["Last-Modified"]))
    if isinstance(mtime, dt.datetime):
        mtime = mtime.timestamp()
    etag = etag.strip('"') if isinstance(etag, str) else None
    version = str(version) if version and version != "null" else None
    mtime = float(mtime) if isinstance(mtime, int | float) else None
    if not (etag or version or mtime):
        etag = f"unverifiable-{uuid.uuid4().hex}"
    return SourceObject(key=key, url=url, size=int(info.get("size") or 0), etag=etag,
                        version_id=version, mtime=mtime)  # fmt: skip


def stat_object(fs: Any, obj: SourceObject) -> SourceObject | None:
    """The object as listed now (None if it is gone): to detect a change during a read."""
    try:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(obj.key)
        info = fs.info(obj.key)
    except FileNotFoundError:
        return None
    now = _to_object(obj.key, obj.url, info)
    if obj.etag and obj.etag.startswith("unverifiable-") and now.etag:
        now = dataclasses.replace(now, etag=obj.etag)  # nothing to compare but the size
    return now


def has_objects(
    url: str, storage_options: dict[str, Any] | None = None, extension: str = ".parquet"
) -> bool:
    """Whether ``url`` holds any Parquet object: False for an empty prefix or a local
    folder not created yet (a data space to seed); StorageError when the store itself is
    unreachable or its bucket is missing."""
    if protocol_of(url) == "file" and not os.path.exists(filesystem(glob_base(url))[1]):
        return False
    try:
        list_objects(url, storage_options, extension=extension)
    except DataError:
        return False
    return True


def display_url(url: str) -> str:
    """``url`` as an error line names it: a local path as an absolute ``file://`` URL
    (``~/trips`` -> ``file:///root/trips``); any other URL as it is."""
    if "://" in url or "::" in url:
        if url.startswith("file://"):
            return "file://" + os.path.abspath(os.path.expanduser(url[len("file://") :]))
        return url
    return "file://" + os.path.abspath(os.path.expanduser(url))


def why_empty(url: str, storage_options: dict[str, Any] | None = None,
              extension: str = ".parquet") -> str:  # fmt: skip
    """Why ``url`` holds no object to ingest, in a few words, e.g. ``no objects match
    *.parquet (missing folder)`` or ``no objects match *.csv (2 other files)``. A listing
    only; for the error line of a data space that :func:`has_objects` found empty."""
    base = glob_base(url)
    pattern = url[len(base) :].lstrip("/") if base != url else f"*{extension}"
    local = protocol_of(url) == "file"
    note = "empty folder" if local else "empty prefix"
    try:
        fs, path = filesystem(base, storage_options)
        if local and not os.path.isdir(path):
            note = "not a folder" if os.path.exists(path) else "missing folder"
        else:
            n = sum(1 for p, i in fs.find(path, detail=True).items()
                    if i.get("type") != "directory" and not is_staging(p))  # fmt: skip
            if n:
                note = f"{n} other {'file' if local else 'object'}{'s' if n > 1 else ''}"
    except Exception:  # the note only explains an emptiness already found
        pass
    return f"no objects match {pattern} ({note})"
