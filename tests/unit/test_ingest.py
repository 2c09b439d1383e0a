"""Ingest: data space -> committed lake snapshot; idempotent; bad input leaves no trace."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import ingest as ingest_mod
from tasks.datagen import generate_mobility
from tasks.dataspace import DATASETS, list_objects
from tasks.errors import DataError, StorageError
from tasks.ingest import ingest, list_snapshots, load_snapshot, snapshot_id, snapshot_url
from tasks.manifests import DataSnapshot
from tests.unit.conftest import MotoS3, Store, listing

DATASET = "mobility-trips"
ROWS, OBJECTS = 2_400, 3


def _seed(s: Store, rows: int = ROWS, objects: int = OBJECTS) -> list[str]:
    return generate_mobility(s.url, s.storage_options, seed=11, rows=rows, objects=objects)


def _run(src: Store, lake: Store, **kw: Any) -> DataSnapshot:
    return ingest(src.url, lake.url, DATASET, src.storage_options, lake.storage_options,
                  "startup-a", **kw)  # fmt: skip


def _fails_cleanly(src: Store, lake: Store, *needles: str, copied: int = 0) -> str:
    """Ingest must raise one DataError line containing ``needles`` and add nothing, even
    when ``copied`` objects had already been written to the lake before the failure."""
    before = listing(lake)
    said: list[str] = []
    with pytest.raises(DataError) as e:
        _run(src, lake, progress=said.append)
    assert sum(m.startswith("copied ") for m in said) == copied, said
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert listing(lake) == before, "the failed ingest left files in the lake"
    return msg


# -- happy path ---------------------------------------------------------------------------
def test_ingest_commits_a_snapshot(store: Store, lake: Store) -> None:
    _seed(store)
    said: list[str] = []
    snap = _run(store, lake, progress=said.append)
    objs = list_objects(store.url, store.storage_options)
    assert snap.snapshot_id == snapshot_id(DATASET, objs, DATASETS[DATASET])
    assert len(snap.snapshot_id) == 16
    assert snap.dataset == DATASET and snap.startup == "startup-a"
    assert snap.source_url == store.url
    assert snap.lake_url == snapshot_url(lake.url, DATASET, snap.snapshot_id)
    assert snap.rows == ROWS == sum(o.rows for o in snap.objects)
    assert snap.bytes == sum(o.size for o in objs)
    assert snap.schema_fields == DATASETS[DATASET].schema_fields()
    assert [o.key for o in snap.objects] == [o.key for o in objs]
    assert [o.etag for o in snap.objects] == [o.etag for o in objs]
    assert said and said[-1].startswith(f"snapshot {snap.snapshot_id} committed")

    source = pa.concat_tables(pq.read_table(io.BytesIO(store.fs.cat_file(o.key))) for o in objs)
    lake_tables = []
    for i, rec in enumerate(snap.objects):
        path = f"{lake.path}/snapshots/{DATASET}/{snap.snapshot_id}/data/part-{i:05d}.parquet"
        assert rec.lake_path == f"{lake.kind}://{path}"
        data = lake.fs.cat_file(path)
        assert hashlib.sha256(data).hexdigest() == rec.lake_sha256
        t = pq.read_table(io.BytesIO(data))
        assert t.schema.equals(DATASETS[DATASET].schema)
        assert t.num_rows == rec.rows
        lake_tables.append(t)
    assert pa.concat_tables(lake_tables).equals(source)

    manifest = f"{lake.path}/snapshots/{DATASET}/{snap.snapshot_id}/manifest.json"
    assert DataSnapshot.model_validate_json(lake.fs.cat_file(manifest)) == snap
    assert load_snapshot(lake.url, DATASET, snap.snapshot_id, lake.storage_options) == snap
    assert list_snapshots(lake.url, DATASET, lake.storage_options) == [snap]


def test_reingest_is_idempotent_and_reads_nothing(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(store)
    first = _run(store, lake)
    before = listing(lake)

    def no_read(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a committed snapshot must not read objects")

    monkeypatch.setattr(ingest_mod, "validate_objects", no_read)
    monkeypatch.setattr(ingest_mod, "copy_object", no_read)
    said: list[str] = []
    again = _run(store, lake, progress=said.append)
    assert again.reused and not first.reused
    assert again.model_copy(update={"reused": False}) == first
    assert again.content_hash() == first.content_hash()
    assert listing(lake) == before  # no new file, no rewrite (mtime / LastModified)
    assert any("already committed" in m for m in said)


def test_lake_bytes_are_reproducible(store: Store, lake: Store, tmp_path: Any) -> None:
    """The same source gives the same lake files in a fresh lake (same lake_sha256)."""
    _seed(store)
    a = _run(store, lake)
    b = ingest(store.url, f"file://{tmp_path}/lake2", DATASET, store.storage_options, {}, "a")
    assert [o.lake_sha256 for o in a.objects] == [o.lake_sha256 for o in b.objects]
    assert a.snapshot_id == b.snapshot_id


def test_changed_source_gives_a_new_snapshot(store: Store, lake: Store) -> None:
    _seed(store)
    first = _run(store, lake)
    generate_mobility(store.url, store.storage_options, seed=12, rows=ROWS, objects=OBJECTS)
    second = _run(store, lake)
    assert second.snapshot_id != first.snapshot_id
    ids = {s.snapshot_id for s in list_snapshots(lake.url, DATASET, lake.storage_options)}
    assert ids == {first.snapshot_id, second.snapshot_id}
    assert load_snapshot(lake.url, DATASET, first.snapshot_id, lake.storage_options) == first


# -- bad input: one line, names object (and column), nothing written ----------------------
def test_corrupt_footer(store: Store, lake: Store) -> None:
    _seed(store)
    path = f"{store.path}/part-00001.parquet"
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[:-40] + b"\xff" * 36 + b"PAR1")
    _fails_cleanly(store, lake, f"{store.url}/part-00001.parquet", "not a readable Parquet")


def test_truncated_object(store: Store, lake: Store) -> None:
    _seed(store)
    path = f"{store.path}/part-00002.parquet"
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[: len(data) // 2])
    _fails_cleanly(store, lake, f"{store.url}/part-00002.parquet")


def test_truncated_body_with_intact_footer(store: Store, lake: Store) -> None:
    _seed(store)
    path = f"{store.path}/part-00000.parquet"
    data = store.fs.cat_file(path)
    footer = pq.ParquetFile(io.BytesIO(data)).metadata.serialized_size + 8
    store.fs.pipe_file(path, data[: len(data) // 2] + data[-footer:])
    _fails_cleanly(store, lake, f"{store.url}/part-00000.parquet", "truncated or corrupt",
                   "column '")  # fmt: skip


def test_corrupt_page_found_while_streaming(store: Store, lake: Store) -> None:
    """A damaged page with a valid footer is found mid-copy, after earlier objects were
    already written to the lake: those are removed and the error names the column."""
    _seed(store)
    path = f"{store.path}/part-00002.parquet"
    data = bytearray(store.fs.cat_file(path))
    rg = pq.ParquetFile(io.BytesIO(bytes(data))).metadata.row_group(0)
    col = next(rg.column(j) for j in range(rg.num_columns)
               if rg.column(j).path_in_schema == "distance_km")  # fmt: skip
    off = col.dictionary_page_offset or col.data_page_offset
    data[off : off + 8] = b"\x00" * 8
    store.fs.pipe_file(path, bytes(data))
    _fails_cleanly(store, lake, f"{store.url}/part-00002.parquet", "column 'distance_km'",
                   "corrupt or truncated", copied=2)  # fmt: skip


def test_missing_column(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite("part-00001.parquet", lambda t: t.drop_columns(["distance_km"]))
    msg = _fails_cleanly(store, lake)
    assert msg == (
        f"ingest mobility-trips: object {url}: column 'distance_km' missing (expected double)"
    )


def test_wrong_type(store: Store, lake: Store) -> None:
    _seed(store)

    def change(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("passenger_count")
        return t.set_column(i, "passenger_count", t.column("passenger_count").cast(pa.int64()))

    url = store.rewrite("part-00000.parquet", change)
    _fails_cleanly(store, lake, url, "column 'passenger_count' has type int64 (expected int8)")


def _with_null_vendor(t: pa.Table) -> pa.Table:
    vendor = t.column("vendor").to_pylist()
    vendor[3] = None
    i = t.schema.get_field_index("vendor")
    return t.set_column(i, pa.field("vendor", pa.string()), pa.array(vendor, pa.string()))


def test_nulls_in_not_null_column(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite("part-00001.parquet", _with_null_vendor)
    _fails_cleanly(store, lake, url, "column 'vendor' has 1 null value(s)", "expected not null")


def test_nulls_without_statistics_found_while_streaming(store: Store, lake: Store) -> None:
    """No statistics in the footer: the nulls are found mid-copy, in the last object."""
    _seed(store)
    url = store.rewrite("part-00002.parquet", _with_null_vendor, write_statistics=False)
    _fails_cleanly(store, lake, url, "column 'vendor' has 1 null value(s) in row group 0", copied=2)


def test_all_bad_objects_in_one_line(store: Store, lake: Store) -> None:
    _seed(store)
    a = store.rewrite("part-00000.parquet", lambda t: t.drop_columns(["vendor"]))
    store.fs.pipe_file(f"{store.path}/part-00002.parquet", b"PAR1 nothing else")
    msg = _fails_cleanly(store, lake, "2 of 3 objects break the contract", a,
                         f"{store.url}/part-00002.parquet")  # fmt: skip
    assert msg.count("; ") == 1


def test_failed_lake_write_removes_what_was_written(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(store)
    real = ingest_mod.sha256_file
    calls = {"n": 0}

    def flaky(path: str) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(ingest_mod, "sha256_file", flaky)
    before = listing(lake)
    with pytest.raises(StorageError, match=r"part-00002\.parquet: OSError: disk full"):
        _run(store, lake)
    assert listing(lake) == before


# -- storage problems -----------------------------------------------------------------
def test_missing_source_bucket(moto_s3: MotoS3, tmp_path: Any) -> None:
    url = "s3://aif-missing-bucket/mobility/trips"
    with pytest.raises(StorageError, match="bucket 'aif-missing-bucket' does not exist"):
        ingest(url, f"file://{tmp_path}", DATASET, moto_s3.storage_options(), {}, "a")


def test_missing_lake_bucket(store: Store, moto_s3: MotoS3) -> None:
    _seed(store)
    with pytest.raises(StorageError) as e:
        ingest(store.url, "s3://aif-missing-lake/lake", DATASET, store.storage_options,
               moto_s3.storage_options(), "a")  # fmt: skip
    assert (
        str(e.value) == "lake s3://aif-missing-lake/lake: bucket 'aif-missing-lake' does not exist"
    )


def test_unreachable_endpoint(tmp_path: Any) -> None:
    so = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(StorageError, match=r"endpoint http://127\.0\.0\.1:9 unreachable"):
        ingest("s3://aif-dataspace/trips", f"file://{tmp_path}", DATASET, so, {}, "a")


def test_load_missing_snapshot(lake: Store) -> None:
    with pytest.raises(DataError, match="snapshot 0123456789abcdef of mobility-trips"):
        load_snapshot(lake.url, DATASET, "0123456789abcdef", lake.storage_options)
    assert list_snapshots(lake.url, DATASET, lake.storage_options) == []
