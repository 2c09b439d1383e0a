"""Data-space side: dataset contracts, object listing, schema checks before any read.

Listing returns every object's key, size, ETag and version; a contract check reads only
the Parquet footer. Storage problems (unreachable endpoint, missing bucket or prefix)
become one :class:`StorageError` line naming the URL and the cause.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class DatasetContract:
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


DATASETS: dict[str, DatasetContract] = {
    "mobility-trips": DatasetContract(
        name="mobility-trips",
        data_space="mobility",
        title="Urban ride trips (synthetic, deterministic)",
        schema=MOBILITY_SCHEMA,
        primary_key="trip_id",
        publisher="aifactory generator",
        license="CC-BY-4.0",
    )
}


def contract(name: str) -> DatasetContract:
    if name not in DATASETS:
        raise DataError(f"dataset {name!r}: no contract declared (known: {', '.join(DATASETS)})")
    return DATASETS[name]


@dataclass(frozen=True)
class SourceObject:
    path: str  # path as the filesystem knows it (bucket/key for s3)
    url: str  # full URL
    size: int
    etag: str | None
    version_id: str | None
    mtime: float | None = None

    def identity(self) -> str:
        """What changes when the object's content changes: ETag, version, or size+mtime."""
        if self.version_id:
            return f"version:{self.version_id}"
        if self.etag:
            return f"etag:{self.etag}"
        return f"size:{self.size}/mtime:{self.mtime}"


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    for marker in ("Could not connect", "Connect timeout", "Connection refused", "connect"):
        if marker.lower() in text.lower():
            return f"endpoint unreachable ({text[:160]})"
    return f"{type(exc).__name__}: {text[:200]}"


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    try:
        return fsspec.core.url_to_fs(url, **storage_options)
    except (ValueError, ImportError) as exc:
        raise StorageError(f"{url}: cannot open the filesystem: {exc}") from None


def list_objects(
    url: str, storage_options: dict[str, Any], what: str = "data space"
) -> list[SourceObject]:
    """Every *.parquet object under ``url``, sorted by key, with size/ETag/version."""
    fs, root = filesystem(url, storage_options)
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    endpoint = storage_options.get("client_kwargs", {}).get("endpoint_url")
    where = f"{what} {url}" + (f" (endpoint {endpoint})" if endpoint else "")
    try:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache()
        if protocol == "s3":
            bucket = root.split("/", 1)[0]
            if not fs.exists(bucket):
                raise StorageError(f"{where}: bucket {bucket!r} does not exist")
        found = fs.find(root, detail=True)
    except StorageError:
        raise
    except FileNotFoundError:
        raise StorageError(f"{where}: path does not exist") from None
    except PermissionError as exc:
        raise StorageError(f"{where}: access denied ({exc})") from None
    except Exception as exc:  # botocore / aiohttp errors surface in many types
        raise StorageError(f"{where}: {describe_error(exc)}") from None
    objs = []
    for path, info in sorted(found.items()):
        if not path.endswith(".parquet") or info.get("type") == "directory":
            continue
        etag = info.get("ETag") or info.get("etag")
        objs.append(
            SourceObject(
                path=path,
                url=f"{protocol}://{path}" if protocol != "file" else f"file://{path}",
                size=int(info.get("size") or 0),
                etag=etag.strip('"') if isinstance(etag, str) else None,
                version_id=info.get("VersionId") or info.get("version_id"),
                mtime=float(info["mtime"]) if isinstance(info.get("mtime"), int | float) else None,
            )
        )
    if not objs:
        raise DataError(f"{where}: no Parquet objects found")
    return objs


def check_schema(obj_url: str, actual: pa.Schema, expected: pa.Schema) -> list[str]:
    """Every difference between an object's schema and the contract, one string each."""
    problems = []
    names = set(actual.names)
    for f in expected:
        if f.name not in names:
            problems.append(f"column {f.name!r} missing (expected {f.type})")
            continue
        got = actual.field(f.name)
        got_type = pa.string() if got.type == pa.large_string() else got.type
        if got_type != f.type:
            problems.append(f"column {f.name!r} has type {got.type} (expected {f.type})")
    extra = sorted(names - set(expected.names))
    if extra:
        problems.append(f"unexpected column(s) {', '.join(repr(e) for e in extra)}")
    return [f"object {obj_url}: {p}" for p in problems]


def read_footer(fs: Any, obj: SourceObject) -> pq.ParquetFile:
    try:
        with fs.open(obj.path, "rb") as fh:
            pf = pq.ParquetFile(fh)
            _ = pf.metadata.num_rows
            return pf
    except Exception as exc:
        raise DataError(
            f"object {obj.url}: not a readable Parquet file ({' '.join(str(exc).split())[:160]})"
        ) from None


def validate_objects(fs: Any, objs: list[SourceObject], dc: DatasetContract) -> dict[str, int]:
    """Check every object's footer against the contract; raise listing all bad objects.

    Returns rows per object path (from the footers).
    """
    problems: list[str] = []
    rows: dict[str, int] = {}
    for o in objs:
        try:
            with fs.open(o.path, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
                schema = md.schema.to_arrow_schema()
                rows[o.path] = md.num_rows
        except Exception as exc:
            msg = " ".join(str(exc).split())[:160]
            problems.append(f"object {o.url}: not a readable Parquet file ({msg})")
            continue
        problems += check_schema(o.url, schema, dc.schema)
    if problems:
        n = len({p.split(":", 1)[0] for p in problems})
        raise DataError(f"ingest {dc.name}: {n} bad object(s): " + "; ".join(problems))
    return rows
