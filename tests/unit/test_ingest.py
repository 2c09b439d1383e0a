"""Ingest: data space -> committed lake snapshot; increments; bad input leaves no trace."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aifactory.tasks.core.errors import DataError, StorageError
from aifactory.tasks.core.manifests import DataSnapshot
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.data.dataspace import contract, list_objects
from aifactory.tasks.stages import ingest as ingest_mod
from aifactory.tasks.stages.ingest import (
    ContractError,
    IngestOptions,
    duplicates_across,
    ingest,
    key_hashes,
    list_snapshots,
    load_snapshot,
    snapshot_url,
)
from tests.unit.conftest import MotoS3, Store, listing

DATASET = "mobility-trips"
ROWS, OBJECTS = 2_400, 3
OPTS = {"startup": "startup-a", "purpose": "trip-duration-prediction"}


def _seed(s: Store, rows: int = ROWS, objects: int = OBJECTS, seed: int = 11) -> list[str]:
    return generate_mobility(s.url, s.storage_options, seed=seed, rows=rows, objects=objects)


def _run(src: Store, lake: Store, progress: Any = None, **kw: Any) -> DataSnapshot:
    opts = IngestOptions(**{**OPTS, **kw})
    return ingest(src.url, lake.url, DATASET, src.storage_options, lake.storage_options,
                  opts, progress)  # fmt: skip


def snapshots_part(lake: Store) -> dict[str, Any]:
    return {k: v for k, v in listing(lake).items() if "/snapshots/" in k}


def assert_objects_complete(lake: Store) -> None:
    """Every lake object file is whole: its .parquet and .json record both exist, and no
    staging file is left."""
    names = [k.rsplit("/", 1)[-1] for k in listing(lake) if "/objects/" in k]
    names = [n for n in names if "." in n]  # not the folders
    assert not [n for n in names if n.startswith(".")], names
    stems: dict[str, set[str]] = {}
    for n in names:
        stem, ext = n.split(".", 1)
        stems.setdefault(stem, set()).add(ext)
    assert all(v == {"parquet", "json"} for v in stems.values()), stems


def _fails_cleanly(src: Store, lake: Store, *needles: str, **kw: Any) -> str:
    """Ingest raises one DataError line with ``needles``; no snapshot becomes visible and
    the lake holds only complete object files."""
    before = snapshots_part(lake)
    committed = list_snapshots(lake.url, DATASET, lake.storage_options)
    with pytest.raises(DataError) as e:
        _run(src, lake, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    assert snapshots_part(lake) == before, "the failed ingest left a snapshot behind"
    assert list_snapshots(lake.url, DATASET, lake.storage_options) == committed
    assert_objects_complete(lake)
    return msg


def _table(s: Store, name: str) -> pa.Table:
    return pq.read_table(io.BytesIO(s.fs.cat_file(f"{s.path}/{name}")))


# -- happy path ---------------------------------------------------------------------------
def test_ingest_commits_a_snapshot(store: Store, lake: Store) -> None:
    _seed(store)
    said: list[str] = []
    snap = _run(store, lake, said.append)
    objs = list_objects(store.url, store.storage_options)
    dc = contract(DATASET)
    assert len(snap.snapshot_id) == 16
    assert snap.dataset == DATASET and snap.startup == "startup-a"
    assert snap.purpose == "trip-duration-prediction"
    assert (snap.data_space, snap.license, snap.format) == ("mobility", "CC-BY-4.0", "parquet")
    assert snap.policy["allowed"] and snap.policy["rule"] == "all rules passed"
    assert snap.source_url == store.url
    assert snap.lake_url == snapshot_url(lake.url, DATASET, snap.snapshot_id)
    assert snap.rows == ROWS == sum(o.rows for o in snap.objects)
    assert snap.bytes == sum(o.size for o in objs) == snap.bytes_read
    assert snap.objects_read == [o.key for o in objs]
    assert snap.schema_fields == dc.schema_fields()
    assert [o.key for o in snap.objects] == [o.key for o in objs]
    assert [o.etag for o in snap.objects] == [o.etag for o in objs]
    assert all(o.decision == "all rules passed" for o in snap.objects)
    assert said and said[-1].startswith(f"snapshot {snap.snapshot_id} committed")

    source = pa.concat_tables(_table(store, o.key.rsplit("/", 1)[-1]) for o in objs)
    lake_tables = []
    for rec in snap.objects:
        assert rec.lake_path.startswith(f"{lake.kind}://{lake.path}/objects/{DATASET}/")
        data = lake.fs.cat_file(rec.lake_path.split("://", 1)[1])
        assert hashlib.sha256(data).hexdigest() == rec.lake_sha256
        t = pq.read_table(io.BytesIO(data))
        assert t.schema.equals(dc.schema)
        assert t.num_rows == rec.rows
        lake_tables.append(t)
    assert pa.concat_tables(lake_tables).equals(source)

    manifest = f"{lake.path}/snapshots/{DATASET}/{snap.snapshot_id}/manifest.json"
    assert DataSnapshot.model_validate_json(lake.fs.cat_file(manifest)) == snap
    assert load_snapshot(lake.url, DATASET, snap.snapshot_id, lake.storage_options) == snap
    assert list_snapshots(lake.url, DATASET, lake.storage_options) == [snap]
    assert_objects_complete(lake)


def _spy_opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every data-space object the ingest opens for reading."""
    opened: list[str] = []
    real = ingest_mod._Reader.copy

    def copy(self: Any, *a: Any) -> int:
        opened.append(self.obj.key.rsplit("/", 1)[-1])
        return real(self, *a)

    monkeypatch.setattr(ingest_mod._Reader, "copy", copy)
    return opened


def test_unchanged_reingest_reads_nothing(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(store)
    first = _run(store, lake)
    before = listing(lake)
    opened = _spy_opens(monkeypatch)
    said: list[str] = []
    again = _run(store, lake, said.append)
    assert opened == []
    assert again.reused and not first.reused
    assert again.snapshot_id == first.snapshot_id
    assert (again.bytes_read, again.objects_read) == (0, [])
    assert again.content_hash() == first.content_hash()
    assert listing(lake) == before  # no new file, no rewrite (mtime / LastModified)
    assert any("already committed" in m for m in said)


def test_one_changed_or_added_object_is_the_only_one_read(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(store)
    first = _run(store, lake)
    opened = _spy_opens(monkeypatch)
    # change one object (other rows, same key range is irrelevant: new content)
    store.rewrite("part-00001.parquet", lambda t: t.slice(0, 500))
    second = _run(store, lake)
    assert opened == ["part-00001.parquet"]
    assert second.snapshot_id != first.snapshot_id
    assert second.objects_read == [first.objects[1].key]
    assert second.objects[0] == first.objects[0] and second.objects[2] == first.objects[2]
    assert second.objects[1].rows == 500 and second.rows == ROWS - 800 + 500
    # add one object
    opened.clear()
    extra = generate_mobility(f"{store.url}/more", store.storage_options, seed=99, rows=300,
                              objects=1)  # fmt: skip
    store.rewrite(
        "more/part-00000.parquet",
        lambda t: _set(t, "trip_id", pa.array([f"X{i:010d}" for i in range(len(t))])),
    )
    third = _run(store, lake)
    assert opened == ["part-00000.parquet"] and extra[0].endswith("more/part-00000.parquet")
    assert len(third.objects) == 4 and third.rows == second.rows + 300
    # the first snapshot is untouched and still readable
    again = load_snapshot(lake.url, DATASET, first.snapshot_id, lake.storage_options)
    assert again == first
    for rec in first.objects:
        data = lake.fs.cat_file(rec.lake_path.split("://", 1)[1])
        assert hashlib.sha256(data).hexdigest() == rec.lake_sha256


def test_removed_object_drops_out(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(store)
    first = _run(store, lake)
    store.fs.rm_file(f"{store.path}/part-00002.parquet")
    opened = _spy_opens(monkeypatch)
    second = _run(store, lake)
    assert opened == []  # nothing new to read
    assert [o.key for o in second.objects] == [o.key for o in first.objects[:2]]
    assert second.rows == first.objects[0].rows + first.objects[1].rows
    assert second.snapshot_id != first.snapshot_id


def test_lake_bytes_are_reproducible(store: Store, lake: Store, tmp_path: Any) -> None:
    """The same source gives the same lake files in a fresh lake (same lake_sha256)."""
    _seed(store)
    a = _run(store, lake)
    b = ingest(store.url, f"file://{tmp_path}/lake2", DATASET, store.storage_options, {},
               IngestOptions(**OPTS))  # fmt: skip
    assert [o.lake_sha256 for o in a.objects] == [o.lake_sha256 for o in b.objects]
    assert a.snapshot_id == b.snapshot_id


# -- bad Parquet input: one line, names object and column, no snapshot ---------------------
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
    _fails_cleanly(store, lake, f"{store.url}/part-00002.parquet", "not a readable Parquet")


def test_corrupt_page_names_the_column(store: Store, lake: Store) -> None:
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
                   "corrupt or truncated")  # fmt: skip


def test_zero_row_object(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite("part-00000.parquet", lambda t: t.slice(0, 0))
    _fails_cleanly(store, lake, url, "holds no rows")


def test_extra_column_is_refused(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite(
        "part-00001.parquet", lambda t: t.append_column("driver_name", pa.array(["x"] * len(t)))
    )
    _fails_cleanly(store, lake, url, "column 'driver_name': expected no such column, actual string",
                   "not in the contract")  # fmt: skip


def test_missing_required_column(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite("part-00001.parquet", lambda t: t.drop_columns(["distance_km"]))
    msg = _fails_cleanly(store, lake)
    assert msg == (
        f"ingest mobility-trips: object {url}: column 'distance_km': expected double, "
        "actual no such column (missing)"
    )


def _set(t: pa.Table, name: str, arr: pa.Array) -> pa.Table:
    return t.set_column(t.schema.get_field_index(name), name, arr)


def _cast(t: pa.Table, name: str, to: pa.DataType, safe: bool = True) -> pa.Table:
    return _set(t, name, t.column(name).cast(to, safe=safe))


def test_int_to_double_drift_is_normalised(store: Store, lake: Store) -> None:
    """An integer column where the contract has double is a safe cast: ingested as double."""
    _seed(store)
    store.rewrite("part-00000.parquet",
                  lambda t: _set(t, "distance_km", pa.compute.round(t.column("distance_km"))
                                 .cast(pa.int64())))  # fmt: skip
    snap = _run(store, lake)
    t = pq.read_table(snap.objects[0].lake_path.split("://", 1)[1], filesystem=lake.fs)
    assert t.schema.field("distance_km").type == pa.float64()


def test_int_to_double_losing_digits_is_refused(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite(
        "part-00000.parquet",
        lambda t: _set(t, "distance_km", pa.array([2**53 + 1] * len(t), pa.int64())),
    )
    _fails_cleanly(store, lake, url, "column 'distance_km': expected double, actual int64",
                   "not in range")  # fmt: skip


def test_int_to_string_drift_is_refused(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite(
        "part-00002.parquet", lambda t: _set(t, "vendor", pa.array(range(len(t)), pa.int64()))
    )
    _fails_cleanly(store, lake, url, "column 'vendor': expected string, actual int64",
                   "where the contract has text")  # fmt: skip
    url = store.rewrite("part-00002.parquet",
                        lambda t: _set(t, "passenger_count", pa.array(["2"] * len(t))))  # fmt: skip


def test_string_where_int_expected_is_refused(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite("part-00002.parquet",
                        lambda t: _set(t, "passenger_count", pa.array(["2"] * len(t))))  # fmt: skip
    _fails_cleanly(store, lake, url, "column 'passenger_count': expected int8, actual string")


def test_timestamp_unit_mismatch(store: Store, lake: Store) -> None:
    """ms -> us is exact and accepted; ns values with sub-microsecond digits are refused."""
    _seed(store)
    store.rewrite(
        "part-00000.parquet", lambda t: _cast(t, "pickup_ts", pa.timestamp("ms", "UTC"), safe=False)
    )
    snap = _run(store, lake)
    assert snap.rows == ROWS
    got = pq.read_table(snap.objects[0].lake_path.split("://", 1)[1], filesystem=lake.fs)
    assert got.schema.field("pickup_ts").type == pa.timestamp("us", "UTC")

    def ns(t: pa.Table) -> pa.Table:
        v = t.column("pickup_ts").cast(pa.int64()).to_numpy() * 1000 + 1
        return _set(t, "pickup_ts", pa.array(v, pa.timestamp("ns", "UTC")))

    url = store.rewrite("part-00001.parquet", ns, coerce_timestamps=None,
                        use_deprecated_int96_timestamps=False, version="2.6")  # fmt: skip
    _fails_cleanly(store, lake, url, "column 'pickup_ts': expected timestamp[us, tz=UTC], "
                   "actual timestamp[ns, tz=UTC]")  # fmt: skip


def test_timezone_mismatch(store: Store, lake: Store) -> None:
    """Another zone is the same instant (accepted); a naive timestamp is refused."""
    _seed(store)
    src = _table(store, "part-00000.parquet").column("pickup_ts")
    store.rewrite(
        "part-00000.parquet", lambda t: _cast(t, "pickup_ts", pa.timestamp("us", "Europe/Paris"))
    )
    snap = _run(store, lake)
    got = pq.read_table(snap.objects[0].lake_path.split("://", 1)[1], filesystem=lake.fs)
    assert got.column("pickup_ts").equals(src)  # same instants, stored as UTC
    url = store.rewrite("part-00001.parquet", lambda t: _cast(t, "pickup_ts", pa.timestamp("us")))
    _fails_cleanly(store, lake, url, "column 'pickup_ts': expected timestamp[us, tz=UTC], "
                   "actual timestamp[us]", "time zone mismatch")  # fmt: skip


def _with_null_vendor(t: pa.Table) -> pa.Table:
    vendor = t.column("vendor").to_pylist()
    vendor[3] = None
    return _set(t, "vendor", pa.array(vendor, pa.string()))


def test_nulls_in_not_null_column(store: Store, lake: Store) -> None:
    _seed(store)
    url = store.rewrite("part-00001.parquet", _with_null_vendor, write_statistics=False)
    _fails_cleanly(store, lake, url, "column 'vendor': expected not null, actual nulls",
                   "1 null value(s)")  # fmt: skip


def test_duplicate_primary_keys_within_an_object(store: Store, lake: Store) -> None:
    _seed(store)

    def dup(t: pa.Table) -> pa.Table:
        ids = t.column("trip_id").to_pylist()
        ids[10] = ids[11] = ids[0]
        return _set(t, "trip_id", pa.array(ids))

    url = store.rewrite("part-00001.parquet", dup)
    _fails_cleanly(store, lake, url, "column 'trip_id': expected unique (primary key)",
                   "2 duplicate value(s) within the object")  # fmt: skip


def test_duplicate_primary_keys_across_objects(store: Store, lake: Store) -> None:
    _seed(store)
    first = _table(store, "part-00000.parquet").column("trip_id").to_pylist()

    def dup(t: pa.Table) -> pa.Table:
        ids = t.column("trip_id").to_pylist()
        ids[:5] = first[:5]
        return _set(t, "trip_id", pa.array(ids))

    url = store.rewrite("part-00002.parquet", dup)
    _fails_cleanly(store, lake, url, "column 'trip_id'",
                   f"5 shared with {store.url}/part-00000.parquet (e.g. 'T")  # fmt: skip


def test_object_changing_while_read(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object is rewritten between its listing and the end of its read: refused."""
    _seed(store)
    real = ingest_mod._Reader.copy

    def copy(self: Any, *a: Any) -> int:
        rows = real(self, *a)
        if self.obj.key.endswith("part-00001.parquet"):
            store.rewrite("part-00001.parquet", lambda t: t.slice(0, 10))
        return rows

    monkeypatch.setattr(ingest_mod._Reader, "copy", copy)
    _fails_cleanly(store, lake, f"{store.url}/part-00001.parquet", "changed while being read")


def test_all_bad_objects_in_one_line(store: Store, lake: Store) -> None:
    _seed(store)
    a = store.rewrite("part-00000.parquet", lambda t: t.drop_columns(["vendor"]))
    store.fs.pipe_file(f"{store.path}/part-00002.parquet", b"PAR1 nothing else")
    msg = _fails_cleanly(store, lake, "2 of 3 objects break the contract", a,
                         f"{store.url}/part-00002.parquet", "column 'vendor'")  # fmt: skip
    assert msg.count(" | ") == 1


def test_quarantine_commits_good_objects_and_reports_bad(store: Store, lake: Store) -> None:
    _seed(store)
    bad = store.rewrite("part-00001.parquet", lambda t: t.drop_columns(["weather"]))
    snap = _run(store, lake, quarantine=True)
    assert [o.key.rsplit("/", 1)[-1] for o in snap.objects] == ["part-00000.parquet",
                                                               "part-00002.parquet"]  # fmt: skip
    assert len(snap.quarantined) == 1
    q = snap.quarantined[0]
    assert f"{q.key}" in bad and "column 'weather'" in q.reason
    assert q.problems == [{"column": "weather", "expected": "string", "actual": "no such column",
                           "message": "missing"}]  # fmt: skip
    report = lake.fs.cat_file(f"{lake.path}/snapshots/{DATASET}/{snap.snapshot_id}/quarantine.json")
    assert b"weather" in report
    # strict mode refuses the same listing without reading anything
    with pytest.raises(DataError, match=r"1 quarantined object.*strict mode refuses it"):
        _run(store, lake)
    again = _run(store, lake, quarantine=True)
    assert again.reused and again.snapshot_id == snap.snapshot_id


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
    with pytest.raises(StorageError, match=r"OSError: disk full"):
        _run(store, lake, workers=1)
    assert list_snapshots(lake.url, DATASET, lake.storage_options) == []
    assert_objects_complete(lake)


# -- many problems: one capped line, every problem in a file -------------------------------
def _wide(t: pa.Table, n: int = 2998) -> pa.Table:
    """Two columns of the wrong type and ``n`` undeclared ones: n + 2 problems."""
    t = _cast(_cast(t, "pickup_zone", pa.string()), "passenger_count", pa.string())
    for i in range(n):
        value = pa.array([i] * len(t)) if i % 2 else pa.array([f"v{i}"] * len(t))
        t = t.append_column(f"extra_{i:04d}", value)
    return t


def _shown_and_more(text: str) -> tuple[int, int]:
    m = re.search(r"\.\.\. and (\d+) more problems", text)
    assert m, text
    return text[: m.start()].count("column '"), int(m.group(1))


def test_many_bad_columns_make_one_capped_line(store: Store, lake: Store, tmp_path: Any) -> None:
    """A Parquet with thousands of wrong columns: the first few problems and a count, in a
    line of bounded length; every problem in a local report the line names."""
    _seed(store)
    url = store.rewrite("part-00001.parquet", _wide)
    reports = tmp_path / "reports"
    msg = _fails_cleanly(store, lake, url, "column 'pickup_zone': expected int32, actual string",
                         str(reports), report_dir=str(reports))  # fmt: skip
    assert len(msg) < 1000, len(msg)
    shown, more = _shown_and_more(msg)
    assert 1 <= shown <= 5 and shown + more == 3000
    assert "all 3000 problems of 1 object(s)" in msg
    report = json.loads(next(reports.iterdir()).read_text())
    assert report["dataset"] == DATASET and len(report["objects"]) == 1
    assert report["objects"][0]["url"] == url
    problems = report["objects"][0]["problems"]
    assert len(problems) == 3000 and problems[2999]["column"] == "extra_2997"
    with pytest.raises(ContractError) as e:  # the caller gets them too
        _run(store, lake, report_dir=str(reports))
    assert e.value.report == str(next(reports.iterdir()))
    assert len(e.value.problems[url]) == 3000


def test_many_bad_objects_make_one_capped_line(store: Store, lake: Store, tmp_path: Any) -> None:
    _seed(store, objects=8)
    urls = [store.rewrite(f"part-{i:05d}.parquet", lambda t: t.drop_columns(["vendor"]))
            for i in range(8)]  # fmt: skip
    msg = _fails_cleanly(store, lake, "8 of 8 objects break the contract", *urls[:5],
                         "... and 3 more objects", report_dir=str(tmp_path))  # fmt: skip
    assert urls[5] not in msg and msg.count(" | ") == 5
    report = json.loads(next(tmp_path.glob("*-problems.json")).read_text())
    assert [o["url"] for o in report["objects"]] == urls


def test_few_problems_write_no_report(store: Store, lake: Store, tmp_path: Any) -> None:
    """A line that holds every problem is the whole story: no report file."""
    _seed(store)
    url = store.rewrite("part-00000.parquet", lambda t: t.drop_columns(["vendor"]))
    msg = _fails_cleanly(store, lake, url, report_dir=str(tmp_path / "r"))
    assert "more problem" not in msg and "all " not in msg
    assert not (tmp_path / "r").exists()


def test_quarantine_keeps_every_problem(store: Store, lake: Store) -> None:
    _seed(store)
    store.rewrite("part-00001.parquet", _wide)
    said: list[str] = []
    snap = _run(store, lake, said.append, quarantine=True)
    q = snap.quarantined[0]
    assert len(q.reason) <= 500 and _shown_and_more(q.reason)[1] > 2990
    assert len(q.problems) == 3000
    report = json.loads(
        lake.fs.cat_file(f"{lake.path}/snapshots/{DATASET}/{snap.snapshot_id}/quarantine.json")
    )
    assert len(report["objects"][0]["problems"]) == 3000
    line = next(m for m in said if m.startswith("quarantined"))
    assert len(line) < 1000 and "quarantine.json" in line
    with pytest.raises(DataError) as e:  # strict mode on the same listing: capped, too
        _run(store, lake)
    assert len(str(e.value)) < 1200 and "quarantine.json" in str(e.value)


# -- primary-key hashing ----------------------------------------------------------------
def test_key_hashes_spill_to_disk(store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch,
                                  tmp_path: Any) -> None:  # fmt: skip
    """An object's key hashes beyond HASH_CHUNK go to local bucket files: the same
    snapshot, and duplicates are still found within and across objects."""
    _seed(store)
    small = _run(store, lake)
    monkeypatch.setattr(ingest_mod, "HASH_CHUNK", 100)
    spilled = ingest(store.url, f"file://{tmp_path}/lake2", DATASET, store.storage_options,
                     {}, IngestOptions(**OPTS))  # fmt: skip
    assert [o.lake_sha256 for o in spilled.objects] == [o.lake_sha256 for o in small.objects]

    def dup(t: pa.Table) -> pa.Table:
        ids = t.column("trip_id").to_pylist()
        ids[-1] = ids[0]
        return _set(t, "trip_id", pa.array(ids))

    url = store.rewrite("part-00001.parquet", dup)
    _fails_cleanly(store, lake, url, "1 duplicate value(s) within the object")
    first = _table(store, "part-00000.parquet").column("trip_id").to_pylist()
    shared = pa.array(first[-300:] + first[:500])
    url = store.rewrite("part-00001.parquet", lambda t: _set(t, "trip_id", shared))
    _fails_cleanly(store, lake, url, "800 shared with")


def test_hash_spill_sorts_every_hash(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ingest_mod, "HASH_CHUNK", 1000)
    rng = np.random.default_rng(3)
    parts = [rng.integers(0, 2**63, 700, dtype=np.int64).view(np.uint64) for _ in range(9)]
    spill = ingest_mod._HashSpill()
    try:
        for h in parts:
            spill.add(h)
        assert spill.dir is not None  # spilled
        assert not spill.finish(str(tmp_path / "pk"))
    finally:
        spill.close()
    assert spill.dir is not None
    assert not os.path.exists(spill.dir)
    got = np.fromfile(tmp_path / "pk", dtype="<u8")
    assert np.array_equal(got, np.sort(np.concatenate(parts)))


def test_duplicates_across_buckets() -> None:
    a = key_hashes(pa.array([f"k{i}" for i in range(5000)]))
    b = key_hashes(pa.array([f"k{i}" for i in range(4990, 6000)]))
    c = key_hashes(pa.array([f"x{i}" for i in range(100)] + ["k1", "k2"]))
    found = duplicates_across([lambda: a, lambda: b, lambda: c])
    assert {k: {o: len(h) for o, h in v.items()} for k, v in found.items()} == {
        1: {0: 10},
        2: {0: 2},
    }
    assert duplicates_across([lambda: a, lambda: key_hashes(pa.array(["z"]))]) == {}


def test_key_hashes_do_not_depend_on_the_batch() -> None:
    """A key hashes alike whatever else is in its batch (short, long and very long keys),
    so that duplicates are found however objects are cut into batches."""
    keys = ["k1", "abcdefghijklmnopq", "", "x" * 300, "y" * 5000, "k1-but-longer"]
    alone = [key_hashes(pa.array([k]))[0] for k in keys]
    assert list(key_hashes(pa.array(keys))) == alone
    assert list(key_hashes(pa.array(["pad", *keys]).slice(1))) == alone
    assert len(set(alone)) == len(keys)
    found = duplicates_across([lambda: key_hashes(pa.array(["k1", "a-much-longer-key"])),
                               lambda: key_hashes(pa.array(["k2", "k1"]))])  # fmt: skip
    assert {k: {o: len(h) for o, h in v.items()} for k, v in found.items()} == {1: {0: 1}}


def test_hash_collision_is_not_a_duplicate(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal hashes are only candidates: distinct keys that collide are not refused."""
    _seed(store)
    monkeypatch.setattr(ingest_mod, "key_hashes", lambda col: np.zeros(len(col), dtype="<u8"))
    snap = _run(store, lake)
    assert snap.rows == ROWS and not snap.quarantined


# -- storage problems -----------------------------------------------------------------
def test_missing_source_bucket(moto_s3: MotoS3, tmp_path: Any) -> None:
    url = "s3://aif-missing-bucket/mobility/trips"
    with pytest.raises(StorageError, match="bucket 'aif-missing-bucket' does not exist"):
        ingest(url, f"file://{tmp_path}", DATASET, moto_s3.storage_options(), {},
               IngestOptions(**OPTS))  # fmt: skip


def test_missing_lake_bucket(store: Store, moto_s3: MotoS3) -> None:
    _seed(store)
    with pytest.raises(StorageError) as e:
        ingest(store.url, "s3://aif-missing-lake/lake", DATASET, store.storage_options,
               moto_s3.storage_options(), IngestOptions(**OPTS))  # fmt: skip
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
        ingest("s3://aif-dataspace/trips", f"file://{tmp_path}", DATASET, so, {},
               IngestOptions(**OPTS))  # fmt: skip


def test_load_missing_snapshot(lake: Store) -> None:
    with pytest.raises(DataError, match="snapshot 0123456789abcdef of mobility-trips"):
        load_snapshot(lake.url, DATASET, "0123456789abcdef", lake.storage_options)
    assert list_snapshots(lake.url, DATASET, lake.storage_options) == []


def test_a_failing_object_leaves_no_local_key_hash_file(
    store: Store, lake: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: /tmp/aif-pk-*.bin files piled up. When one object failed, the objects that
    other threads had finished were never read from the pool, so their key-hash files were
    never removed."""
    import tempfile
    import time as _time

    from aifactory.tasks.core.errors import AifError
    from aifactory.tasks.stages import ingest as ingest_mod

    keys = _seed(store)
    real = ingest_mod._ingest_object
    first = sorted(keys)[0].rsplit("/", 1)[-1]

    def flaky(o: Any, *a: Any, **k: Any) -> Any:
        if o.key.endswith(first):
            _time.sleep(0.5)  # the other objects finish first
            raise AifError(f"lake: connection reset while writing {first}")
        return real(o, *a, **k)

    monkeypatch.setattr(ingest_mod, "_ingest_object", flaky)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(AifError, match="connection reset"):
        _run(store, lake, workers=2)
    assert not list(tmp_path.glob("aif-pk-*")), list(tmp_path.iterdir())
