"""Ingestion: data-space objects -> a committed, immutable lake snapshot (DataSnapshot).

Order of work, so that a failure leaves the lake as it was:
1. list the objects (key, ETag/version, size) and derive the snapshot id from them;
2. if that snapshot is already committed, return it (a listing only, no data read);
3. check every object's footer against the contract; any bad object fails the whole
   snapshot before a byte is written, and the error lists each one;
4. stream each object by record batches into a local temporary Parquet file, then commit
   it to the lake in one step (rename or single PUT);
5. write the manifest last: it is the commit point. On any failure, the files written so
   far are removed and no manifest exists, so readers never see the partial snapshot.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.dataspace import (
    SourceObject,
    contract,
    describe_error,
    filesystem,
    list_objects,
    validate_objects,
)
from tasks.errors import DataError, StorageError
from tasks.lake import atomic_put_file, read_json, remove_quietly, sha256_file, write_json_atomic
from tasks.manifests import DataSnapshot, ObjectRecord
from tasks.provenance import now_iso

BATCH_ROWS = 65_536


def snapshot_id(dataset: str, objs: list[SourceObject]) -> str:
    h = hashlib.sha256(dataset.encode())
    for o in sorted(objs, key=lambda o: o.path):
        h.update(f"\n{o.path}|{o.identity()}|{o.size}".encode())
    return h.hexdigest()[:16]


def snapshot_root(lake_url: str, dataset: str, sid: str) -> str:
    return f"{lake_url.rstrip('/')}/snapshots/{dataset}/{sid}"


def _copy_object(
    src_fs: Any, obj: SourceObject, schema: pa.Schema, tmp_path: str, dataset: str
) -> int:
    """Stream one object into a local Parquet file with the contract's exact schema."""
    required = [f.name for f in schema if not f.nullable]
    rows = 0
    try:
        with (
            src_fs.open(obj.path, "rb") as fh,
            pq.ParquetWriter(tmp_path, schema, compression="zstd") as writer,
        ):
            pf = pq.ParquetFile(fh)
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=schema.names):
                table = pa.Table.from_batches([batch])
                for name in required:
                    nulls = table.column(name).null_count
                    if nulls:
                        raise DataError(
                            f"ingest {dataset}: object {obj.url}: column {name!r} has {nulls} "
                            "null value(s) but the contract says not null"
                        )
                table = table.select(schema.names).cast(schema, safe=True)
                writer.write_table(table)
                rows += table.num_rows
    except DataError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as exc:
        raise DataError(
            f"ingest {dataset}: object {obj.url}: unreadable or inconsistent data "
            f"({' '.join(str(exc).split())[:200]})"
        ) from None
    return rows


def ingest(
    source_url: str,
    lake_url: str,
    dataset: str,
    storage_options_source: dict[str, Any],
    storage_options_lake: dict[str, Any],
    startup: str,
    progress: Callable[[str], None] | None = None,
) -> DataSnapshot:
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    dc = contract(dataset)
    objs = list_objects(source_url, storage_options_source, "data space")
    sid = snapshot_id(dataset, objs)
    root_url = snapshot_root(lake_url, dataset, sid)
    lake_fs, root = filesystem(root_url, storage_options_lake)
    list_objects_lake_ok(lake_fs, lake_url, storage_options_lake)
    manifest_path = f"{root}/manifest.json"
    if lake_fs.exists(manifest_path):
        say(f"snapshot {sid} is already committed: nothing changed, no data read")
        return DataSnapshot.model_validate(read_json(lake_fs, manifest_path))

    src_fs, _ = filesystem(source_url, storage_options_source)
    footer_rows = validate_objects(src_fs, objs, dc)
    say(f"{len(objs)} objects match the contract of {dataset} ({sum(footer_rows.values())} rows)")

    written: list[str] = []
    records: list[ObjectRecord] = []
    try:
        with tempfile.TemporaryDirectory(prefix="aif-ingest-") as tmp:
            for i, o in enumerate(objs):
                local = os.path.join(tmp, f"part-{i:05d}.parquet")
                rows = _copy_object(src_fs, o, dc.schema, local, dataset)
                dest = f"{root}/data/part-{i:05d}.parquet"
                digest = sha256_file(local)
                atomic_put_file(lake_fs, local, dest)
                written.append(dest)
                os.unlink(local)
                records.append(
                    ObjectRecord(
                        key=o.path, etag=o.etag, version_id=o.version_id, size=o.size,
                        rows=rows, lake_path=f"{root_url}/data/part-{i:05d}.parquet",
                        lake_sha256=digest,
                    )
                )  # fmt: skip
                if (i + 1) == len(objs) or (i + 1) % max(1, len(objs) // 4) == 0:
                    say(f"copied {i + 1}/{len(objs)} objects to the lake")
        snap = DataSnapshot(
            snapshot_id=sid,
            dataset=dataset,
            source_url=source_url,
            lake_url=root_url,
            schema_fields=dc.schema_fields(),
            objects=records,
            rows=sum(r.rows for r in records),
            bytes=sum(r.size for r in records),
            startup=startup,
            created_at=now_iso(),
            duration_s=round(time.monotonic() - t0, 3),
        )
        write_json_atomic(lake_fs, manifest_path, snap.model_dump(mode="json"))
    except BaseException:
        remove_quietly(lake_fs, written)
        raise
    return snap


def list_objects_lake_ok(fs: Any, lake_url: str, storage_options: dict[str, Any]) -> None:
    """Fail before reading when the lake's bucket is missing or unreachable."""
    if lake_url.startswith("s3://"):
        bucket = lake_url[len("s3://") :].split("/", 1)[0]
        try:
            ok = fs.exists(bucket)
        except Exception as exc:
            raise StorageError(f"lake {lake_url}: {describe_error(exc)}") from None
        if not ok:
            raise StorageError(f"lake {lake_url}: bucket {bucket!r} does not exist")


def load_snapshot(
    lake_url: str, dataset: str, sid: str, storage_options: dict[str, Any]
) -> DataSnapshot:
    fs, root = filesystem(snapshot_root(lake_url, dataset, sid), storage_options)
    path = f"{root}/manifest.json"
    if not fs.exists(path):
        raise DataError(f"snapshot {sid} of {dataset}: no committed manifest at {path}")
    return DataSnapshot.model_validate(read_json(fs, path))
