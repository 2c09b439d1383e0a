"""Data-space side: dataset contracts, object listing, schema checks before any data read.

Listing returns every object's key, size, ETag and version; a contract check reads only
the Parquet footer. Storage problems (unreachable endpoint, missing bucket or path) become
one :class:`StorageError` line naming the URL and the cause; an empty prefix or an object
that breaks its contract becomes one :class:`DataError` line naming object and column.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import DataError, StorageError

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
    """What a data-space dataset promises: its columns, types, nullability and key."""

    name: str
    data_space: str
    title: str
    schema: pa.Schema
    primary_key: str
    publisher: str = ""
    license: str = ""
    descriptions: dict[str, str] = field(default_factory=dict)

    def schema_fields(self) -> list[dict[str, Any]]:
        return [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in self.schema]

    def fingerprint(self) -> str:
        """Hash of the columns' names, types and nullability (not of descriptions)."""
        blob = json.dumps(self.schema_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DATASETS: dict[str, DatasetContract] = {
    "mobility-trips": DatasetContract(
        name="mobility-trips",
        data_space="mobility",
        title="Urban ride trips (synthetic, deterministic)",
        schema=MOBILITY_SCHEMA,
        primary_key="trip_id",
        publisher="aifactory generator (tasks/datagen.py)",
        license="CC-BY-4.0",
        descriptions={
            "trip_id": "unique trip identifier, 'T' + 10 digits",
            "pickup_ts": "pickup time (UTC), within 2025",
            "pickup_zone": "pickup zone 1..60, numbered outwards from the city centre",
            "dropoff_zone": "dropoff zone 1..60",
            "distance_km": "driven distance in km",
            "passenger_count": "passengers, 1..6",
            "vendor": "operator: V1, V2 or V3",
            "payment_type": "card, cash or app; null when unknown",
            "weather": "clear, rain or snow at pickup",
            "temperature_c": "air temperature at pickup in °C; null when the sensor failed",
            "duration_min": "trip duration in minutes (the prediction target)",
        },
    ),
    "tourism-reviews": DatasetContract(
        name="tourism-reviews",
        data_space="tourism",
        title="Visitor reviews of tourist sites (synthetic, deterministic)",
        schema=REVIEW_SCHEMA,
        primary_key="review_id",
        publisher="aifactory generator (tasks/textgen.py)",
        license="CC-BY-4.0",
        descriptions={"text": "free-text review in English", "rating": "1..5 stars"},
    ),
}


def contract(name: str) -> DatasetContract:
    if name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise DataError(f"dataset {name!r}: no contract declared (known datasets: {known})")
    return DATASETS[name]


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
    if isinstance(exc, (*boto, ConnectionError, TimeoutError)):
        return True
    text = str(exc).lower()
    return any(m in text for m in ("could not connect", "connect timeout", "connection refused"))


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
        return StorageError(f"{where}: access denied ({_one_line(exc)})")
    if isinstance(exc, FileNotFoundError):
        return StorageError(f"{where}: path does not exist")
    return StorageError(f"{where}: {name}: {_one_line(exc, 200)}")


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """The fsspec filesystem and path for ``url`` (no network call is made)."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError, TypeError) as exc:
        raise StorageError(f"{url}: cannot open the filesystem: {_one_line(exc)}") from None
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
        except Exception as exc:  # botocore and aiohttp raise many types
            raise storage_error(where, exc, storage_options) from None
    return fs, path


# -- listing ----------------------------------------------------------------------------
def list_objects(
    url: str, storage_options: dict[str, Any] | None = None, what: str = "data space"
) -> list[SourceObject]:
    """Every ``*.parquet`` object under ``url`` (recursively), sorted by key.

    Raises StorageError for an unreachable endpoint, a missing bucket or a missing local
    folder, and DataError when the prefix holds no Parquet object.
    """
    where = f"{what} {url}"
    fs, root = check_store(url, storage_options, what)
    protocol = protocol_of(url)
    try:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        if protocol == "file" and not os.path.isdir(root):
            what_is = "is not a folder" if os.path.exists(root) else "path does not exist"
            raise StorageError(f"{where}: {what_is}")
        found: dict[str, dict[str, Any]] = fs.find(root, detail=True)
    except StorageError:
        raise
    except FileNotFoundError:
        bucket = root.split("/", 1)[0]
        why = f"bucket {bucket!r} does not exist" if protocol != "file" else "path does not exist"
        raise StorageError(f"{where}: {why}") from None
    except Exception as exc:
        raise storage_error(where, exc, storage_options) from None
    objs = []
    for path, info in sorted(found.items()):
        if info.get("type") == "directory" or not path.endswith(".parquet"):
            continue
        etag = info.get("ETag") or info.get("etag")
        version = info.get("VersionId") or info.get("version_id")
        mtime = info.get("mtime")
        objs.append(
            SourceObject(
                key=path,
                url=f"{protocol}://{path}",
                size=int(info.get("size") or 0),
                etag=etag.strip('"') if isinstance(etag, str) else None,
                version_id=str(version) if version and version != "null" else None,
                mtime=float(mtime) if isinstance(mtime, int | float) else None,
            )
        )
    if not objs:
        raise DataError(f"{where}: no Parquet objects (*.parquet) under this prefix")
    return objs


def has_objects(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` holds any Parquet object: False for an empty prefix or a local
    folder not created yet (a data space to seed); StorageError when the store itself is
    unreachable or its bucket is missing."""
    if protocol_of(url) == "file" and not os.path.exists(filesystem(url, storage_options)[1]):
        return False
    try:
        list_objects(url, storage_options)
    except DataError:
        return False
    return True


# -- contract checks (footer only) ------------------------------------------------------
def _normalise(t: pa.DataType) -> pa.DataType:
    """The only leniencies: large_string reads as string, dictionary<string> as string."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if t == pa.large_string():
        return pa.string()
    return t


def check_schema(actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Every difference between a file's schema and the contract, one phrase each.

    Types must match exactly (up to :func:`_normalise`). A column the contract declares
    not-null may be declared nullable in the file: its nulls are counted from the footer's
    statistics and again while the data streams. Extra columns are allowed and not ingested.
    """
    problems = []
    for f in expected:
        idx = actual.get_field_index(f.name)
        if idx < 0:
            problems.append(f"column {f.name!r} missing (expected {f.type})")
            continue
        got = actual.field(idx)
        if _normalise(got.type) != f.type:
            problems.append(f"column {f.name!r} has type {got.type} (expected {f.type})")
    return problems


def _footer_problems(md: pq.FileMetaData, size: int, expected: pa.Schema) -> list[str]:
    """Truncation (column chunks beyond the data region) and nulls counted in statistics."""
    problems: list[str] = []
    data_end = size - md.serialized_size - 8  # footer + its 4-byte length + magic "PAR1"
    required = {f.name for f in expected if not f.nullable}
    nulls: dict[str, int] = {}
    truncated: str | None = None
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        for j in range(rg.num_columns):
            col = rg.column(j)
            start = col.data_page_offset
            if col.has_dictionary_page and col.dictionary_page_offset:
                start = min(start, col.dictionary_page_offset)
            if truncated is None and (start < 4 or start + col.total_compressed_size > data_end):
                truncated = (
                    f"truncated or corrupt: column {col.path_in_schema!r} in row group {i} "
                    f"lies beyond the data region (object is {size} bytes)"
                )
            stats = col.statistics
            if col.path_in_schema in required and stats is not None and stats.has_null_count:
                nulls[col.path_in_schema] = nulls.get(col.path_in_schema, 0) + stats.null_count
    if truncated:
        problems.append(truncated)
    for name in expected.names:
        if nulls.get(name):
            problems.append(f"column {name!r} has {nulls[name]} null value(s) (expected not null)")
    return problems


def _open_footer(fs: Any, obj: SourceObject) -> tuple[pa.Schema, pq.FileMetaData]:
    with fs.open(obj.key, "rb") as fh:
        pf = pq.ParquetFile(fh)
        return pf.schema_arrow, pf.metadata


def object_problems(
    obj: SourceObject, dc: DatasetContract, fs: Any
) -> tuple[list[str], pa.Schema | None, int]:
    """(problems, file schema or None, rows) of one object, from its footer only."""
    try:
        schema, md = _open_footer(fs, obj)
    except FileNotFoundError:
        return [f"vanished while being read (listed with {obj.size} bytes)"], None, 0
    except Exception as exc:
        if is_connection_error(exc):
            raise storage_error(f"data space object {obj.url}", exc, options_of(fs)) from None
        return [f"not a readable Parquet file ({_one_line(exc)})"], None, 0
    problems = check_schema(schema, dc.schema)
    problems += _footer_problems(md, obj.size, dc.schema)
    return problems, schema, md.num_rows


def validate_object(obj: SourceObject, contract: DatasetContract, fs: Any) -> pa.Schema:
    """Check one object's footer against the contract; return the file's Arrow schema.

    Raises DataError, e.g. ``ingest mobility-trips: object s3://b/p/part-00003.parquet:
    column 'distance_km' missing (expected double)``.
    """
    problems, schema, _ = object_problems(obj, contract, fs)
    if problems or schema is None:
        raise DataError(f"ingest {contract.name}: object {obj.url}: " + ", ".join(problems))
    return schema


def validate_objects(
    objs: list[SourceObject], contract: DatasetContract, fs: Any
) -> dict[str, int]:
    """Check every object's footer; raise one DataError line listing each bad object.

    Returns the rows of each object (by key), as its footer states them.
    """
    bad: list[str] = []
    rows: dict[str, int] = {}
    for o in objs:
        problems, _, n = object_problems(o, contract, fs)
        if problems:
            bad.append(f"object {o.url}: " + ", ".join(problems))
        rows[o.key] = n
    if len(bad) == 1:
        raise DataError(f"ingest {contract.name}: {bad[0]}")
    if bad:
        raise DataError(
            f"ingest {contract.name}: {len(bad)} of {len(objs)} objects break the contract: "
            + "; ".join(bad)
        )
    return rows
