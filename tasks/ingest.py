"""Ingestion: data-space objects -> a committed, immutable lake snapshot (DataSnapshot).

Order of work, so that a failure leaves the lake as it was:

1. list the objects (key, ETag/version, size) and derive the snapshot id from them, the
   dataset and its contract's columns;
2. if that snapshot is already committed, return its manifest: no object byte is read;
3. check every object's footer against the contract; any bad object fails the whole
   snapshot before a byte is written, and the one error line lists each bad object;
4. stream each object by record batches into a local temporary Parquet file with the
   contract's exact schema (nulls in not-null columns fail here too), then commit it to
   ``<lake>/snapshots/<dataset>/<id>/data/part-NNNNN.parquet`` in one step (rename or
   single upload), so the lake never holds a partial file;
5. write ``manifest.json`` last: it is the commit point. On any failure the snapshot's
   folder is removed and no manifest exists, so readers never see a partial snapshot.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.dataspace import (
    DatasetContract,
    SourceObject,
    check_store,
    contract,
    filesystem,
    is_connection_error,
    list_objects,
    options_of,
    storage_error,
    validate_objects,
)
from tasks.errors import AifError, DataError, StorageError
from tasks.lake import (
    exists,
    read_json,
    remove_tree_quietly,
    sha256_file,
    staged_file,
    write_json_atomic,
)
from tasks.manifests import DataSnapshot, ObjectRecord
from tasks.provenance import now_iso

BATCH_ROWS = 65_536
# Fixed writer options: the same source bytes give the same lake bytes (and lake_sha256).
LAKE_WRITER: dict[str, Any] = {
    "compression": "zstd",
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
}

Progress = Callable[[str], None]


def snapshot_id(dataset: str, objs: list[SourceObject], dc: DatasetContract | None = None) -> str:
    """First 16 hex of sha256 over the dataset, its contract and the sorted object identities
    (key, ETag or version — size and mtime for local files — and size)."""
    h = hashlib.sha256(dataset.encode())
    if dc is not None:
        h.update(f"\ncontract:{dc.fingerprint()}".encode())
    for o in sorted(objs, key=lambda o: o.key):
        h.update(f"\n{o.key}|{o.identity()}|{o.size}".encode())
    return h.hexdigest()[:16]


def snapshot_url(lake_url: str, dataset: str, sid: str) -> str:
    return f"{lake_url.rstrip('/')}/snapshots/{dataset}/{sid}"


def _column_at_fault(pf: pq.ParquetFile, names: list[str], row_group: int) -> str | None:
    """After a read failure: the first contract column whose chunk cannot be read."""
    for name in names:
        try:
            pf.read_row_group(row_group, columns=[name])
        except Exception:
            return name
    return None


def copy_object(src_fs: Any, obj: SourceObject, dc: DatasetContract, local_path: str) -> int:
    """Stream one object into a local Parquet file with the contract's exact schema.

    Reads one row group at a time (in batches of at most BATCH_ROWS rows), so memory
    stays bounded whatever the object's size. Returns the number of rows written.
    """
    schema = dc.schema
    required = [f.name for f in schema if not f.nullable]
    prefix = f"ingest {dc.name}: object {obj.url}"
    rows = 0
    try:
        fh = src_fs.open(obj.key, "rb")
    except FileNotFoundError:
        raise DataError(f"{prefix}: vanished after it was listed") from None
    except Exception as exc:
        raise storage_error(f"data space object {obj.url}", exc, options_of(src_fs)) from None
    with fh:
        try:
            pf = pq.ParquetFile(fh)
        except Exception as exc:
            raise DataError(f"{prefix}: not a readable Parquet file ({_short(exc)})") from None
        with pq.ParquetWriter(local_path, schema, **LAKE_WRITER) as writer:
            for rg in range(pf.num_row_groups):
                batches = pf.iter_batches(
                    batch_size=BATCH_ROWS, row_groups=[rg], columns=schema.names
                )
                while True:
                    try:
                        batch = next(batches, None)
                    except Exception as exc:
                        if is_connection_error(exc):
                            raise storage_error(
                                f"data space object {obj.url}", exc, options_of(src_fs)
                            ) from None
                        col = _column_at_fault(pf, schema.names, rg)
                        where = f"column {col!r} in row group {rg}" if col else f"row group {rg}"
                        raise DataError(
                            f"{prefix}: {where} is corrupt or truncated ({_short(exc)})"
                        ) from None
                    if batch is None:
                        break
                    for name in required:
                        nulls = batch.column(name).null_count
                        if nulls:
                            raise DataError(
                                f"{prefix}: column {name!r} has {nulls} null value(s) in row "
                                f"group {rg} (expected not null)"
                            )
                    try:
                        table = pa.Table.from_batches([batch]).select(schema.names).cast(schema)
                    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
                        raise DataError(
                            f"{prefix}: does not fit the contract ({_short(exc)})"
                        ) from None
                    writer.write_table(table)
                    rows += table.num_rows
    return rows


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ingest(
    source_url: str,
    lake_url: str,
    dataset: str,
    storage_options_source: dict[str, Any] | None,
    storage_options_lake: dict[str, Any] | None,
    startup: str,
    progress: Progress | None = None,
) -> DataSnapshot:
    """Snapshot ``dataset`` at ``source_url`` into the lake; return its committed manifest.

    Idempotent: an unchanged data space gives the same snapshot id, and an already
    committed snapshot is returned as it is, without reading any object.
    """
    say = progress or (lambda _m: None)
    t0 = time.monotonic()
    dc = contract(dataset)
    objs = list_objects(source_url, storage_options_source, "data space")
    sid = snapshot_id(dataset, objs, dc)
    root_url = snapshot_url(lake_url, dataset, sid)
    lake_fs, _ = check_store(lake_url, storage_options_lake, "lake")
    _, root = filesystem(root_url, storage_options_lake)
    manifest_path = f"{root}/manifest.json"
    try:
        committed = exists(lake_fs, manifest_path)
    except Exception as exc:
        raise storage_error(f"lake {lake_url}", exc, storage_options_lake) from None
    if committed:
        say(f"snapshot {sid} is already committed: nothing changed, no object read")
        return load_snapshot(lake_url, dataset, sid, storage_options_lake).model_copy(
            update={"reused": True}
        )

    src_fs, _ = filesystem(source_url, storage_options_source)
    footer_rows = validate_objects(objs, dc, src_fs)
    total = sum(footer_rows.values())
    say(f"{len(objs)} objects match the contract of {dataset} ({total} rows): snapshot {sid}")

    records: list[ObjectRecord] = []
    try:
        for i, o in enumerate(objs):
            name = f"part-{i:05d}.parquet"
            dest_url = f"{root_url}/data/{name}"
            try:
                with staged_file(lake_fs, f"{root}/data/{name}") as local:
                    rows = copy_object(src_fs, o, dc, local)
                    if rows != footer_rows[o.key]:
                        raise DataError(
                            f"ingest {dataset}: object {o.url}: read {rows} rows but its "
                            f"footer says {footer_rows[o.key]} (changed while being read?)"
                        )
                    digest = sha256_file(local)
            except AifError:
                raise
            except Exception as exc:
                raise storage_error(f"lake {dest_url}", exc, storage_options_lake) from None
            records.append(
                ObjectRecord(
                    key=o.key, etag=o.etag, version_id=o.version_id, size=o.size,
                    rows=rows, lake_path=dest_url, lake_sha256=digest,
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
        try:
            write_json_atomic(lake_fs, manifest_path, snap.model_dump(mode="json"))
        except Exception as exc:
            raise storage_error(f"lake {root_url}/manifest.json", exc) from None
    except BaseException:
        # Nothing was committed: remove what this attempt wrote, unless a concurrent run
        # of the same snapshot committed it in the meantime.
        committed_now = False
        try:
            committed_now = exists(lake_fs, manifest_path)
        except Exception:
            committed_now = False
        if not committed_now:
            remove_tree_quietly(lake_fs, root, prune_up_to=_path_of(lake_url, storage_options_lake))
        raise
    say(f"snapshot {sid} committed: {snap.rows} rows in {len(records)} files")
    return snap


def _path_of(url: str, storage_options: dict[str, Any] | None) -> str:
    return filesystem(url, storage_options)[1]


def load_snapshot(
    lake_url: str, dataset: str, snapshot_id: str, storage_options: dict[str, Any] | None = None
) -> DataSnapshot:
    """The committed manifest of one snapshot; DataError if it was never committed."""
    url = snapshot_url(lake_url, dataset, snapshot_id)
    fs, root = filesystem(url, storage_options)
    path = f"{root}/manifest.json"
    try:
        if not exists(fs, path):
            raise DataError(
                f"snapshot {snapshot_id} of {dataset}: no committed manifest at {url}/manifest.json"
            )
        data = read_json(fs, path)
    except (DataError, StorageError):
        raise
    except Exception as exc:
        raise storage_error(f"lake {url}/manifest.json", exc, storage_options) from None
    try:
        return DataSnapshot.model_validate(data)
    except ValueError as exc:
        raise DataError(
            f"lake {url}/manifest.json: not a valid DataSnapshot ({_short(exc)})"
        ) from None


def list_snapshots(
    lake_url: str, dataset: str, storage_options: dict[str, Any] | None = None
) -> list[DataSnapshot]:
    """Committed snapshots of ``dataset`` (folders without a manifest are skipped), oldest
    first."""
    url = f"{lake_url.rstrip('/')}/snapshots/{dataset}"
    fs, root = check_store(lake_url, storage_options, "lake")
    _, root = filesystem(url, storage_options)
    try:
        if not exists(fs, root):
            return []
        entries = fs.ls(root, detail=False)
    except Exception as exc:
        raise storage_error(f"lake {url}", exc, storage_options) from None
    out = []
    for entry in sorted(entries):
        sid = entry.rstrip("/").rsplit("/", 1)[-1]
        if exists(fs, f"{root}/{sid}/manifest.json"):
            out.append(load_snapshot(lake_url, dataset, sid, storage_options))
    return sorted(out, key=lambda s: (s.created_at, s.snapshot_id))
