"""CSV and JSON Lines objects: normalised to the contract, bad files refused by column;
usage policies checked before any byte is read; personal data pseudonymised."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from aifactory.tasks.core.errors import DataError
from aifactory.tasks.data import formats
from aifactory.tasks.data.catalog import catalog_at
from aifactory.tasks.data.generators import generate_agriculture, generate_health
from aifactory.tasks.data.policy import PolicyError, key_fingerprint
from aifactory.tasks.stages import ingest as ingest_mod
from aifactory.tasks.stages.ingest import IngestOptions, ingest, list_snapshots
from tests.unit.conftest import Store, listing

KEY = b"0123456789abcdef-test-pseudonymisation-key"
AGRI = {"startup": "startup-b", "purpose": "crop-yield-forecasting"}
HEALTH = {"startup": "startup-c", "purpose": "readmission-risk-research",
          "pseudonymisation_key": KEY}  # fmt: skip
DATASETS = {"csv": "agriculture-fields", "jsonl": "health-records"}


def _agri(store: Store, lake: Store, **kw: Any) -> Any:
    return ingest(f"{store.url}/*.csv", lake.url, "agriculture-fields", store.storage_options,
                  lake.storage_options, IngestOptions(**{**AGRI, **kw}))  # fmt: skip


def _health(store: Store, lake: Store, progress: Any = None, **kw: Any) -> Any:
    return ingest(f"{store.url}/*.jsonl", lake.url, "health-records", store.storage_options,
                  lake.storage_options, IngestOptions(**{**HEALTH, **kw}), progress)  # fmt: skip


def _lake_table(lake: Store, snap: Any) -> pa.Table:
    return pa.concat_tables(
        pq.read_table(io.BytesIO(lake.fs.cat_file(o.lake_path.split("://", 1)[1])))
        for o in snap.objects
    )


def _edit(store: Store, name: str, change: Any) -> str:
    path = f"{store.path}/{name}"
    store.fs.pipe_file(path, change(store.fs.cat_file(path)))
    return f"{store.url}/{name}"


def _refused(run: Any, store: Store, lake: Store, *needles: str) -> str:
    with pytest.raises(DataError) as e:
        run(store, lake)
    msg = str(e.value)
    for n in needles:
        assert n in msg, msg
    assert "\n" not in msg
    assert not [k for k in listing(lake) if "/snapshots/" in k and k.endswith("manifest.json")]
    return msg


# -- CSV ---------------------------------------------------------------------------------
def test_csv_is_normalised_to_the_contract(store: Store, lake: Store) -> None:
    generate_agriculture(store.url, store.storage_options, rows=3000, objects=2)
    snap = _agri(store, lake)
    t = _lake_table(lake, snap)
    assert t.schema.equals(catalog_at().get("agriculture-fields").schema_.arrow())
    assert t.num_rows == 3000 == snap.rows and snap.format == "csv"
    assert t.column("sensor_ts").type == pa.timestamp("us", "UTC")
    assert t.column("yield_t_ha").null_count > 0  # empty CSV fields are nulls


def test_csv_non_utf8(store: Store, lake: Store) -> None:
    generate_agriculture(store.url, store.storage_options, rows=2000, objects=2)
    url = _edit(store, "part-00001.csv", lambda b: b.replace(b'"wheat"', b'"wh\xe9at"', 1))
    _refused(_agri, store, lake, url, "column 'crop': expected UTF-8 text, actual invalid bytes")


def test_csv_truncated(store: Store, lake: Store) -> None:
    generate_agriculture(store.url, store.storage_options, rows=2000, objects=2)
    url = _edit(store, "part-00000.csv", lambda b: b[: len(b) - 30])
    _refused(_agri, store, lake, url, "truncated or malformed CSV")


def test_csv_header_only(store: Store, lake: Store) -> None:
    generate_agriculture(store.url, store.storage_options, rows=2000, objects=2)
    url = _edit(store, "part-00001.csv", lambda b: b.split(b"\n", 1)[0] + b"\n")
    _refused(_agri, store, lake, url, "holds no rows")


def test_csv_extra_and_missing_columns(store: Store, lake: Store) -> None:
    generate_agriculture(store.url, store.storage_options, rows=2000, objects=2)

    def extra(b: bytes) -> bytes:
        lines = b.split(b"\n")
        return (
            b"\n".join([lines[0] + b',"farmer"'] + [ln + b',"Jo"' for ln in lines[1:] if ln])
            + b"\n"
        )

    url = _edit(store, "part-00000.csv", extra)
    _refused(_agri, store, lake, url, "column 'farmer': expected no such column, actual string")

    def drop_ndvi(b: bytes) -> bytes:
        t = pa.csv.read_csv(io.BytesIO(b))
        out = io.BytesIO()
        pa.csv.write_csv(t.drop_columns(["ndvi"]), out)
        return out.getvalue()

    generate_agriculture(store.url, store.storage_options, rows=2000, objects=2)
    url = _edit(store, "part-00001.csv", drop_ndvi)
    _refused(_agri, store, lake, url, "column 'ndvi': expected double, actual no such column")


def test_csv_text_in_a_number_column_and_naive_timestamps(store: Store, lake: Store) -> None:
    generate_agriculture(store.url, store.storage_options, rows=2000, objects=2)
    url0 = _edit(store, "part-00000.csv",
                 lambda b: b.replace(b',"wheat",', b',"wheat","n/a"-', 1))  # fmt: skip
    url1 = _edit(store, "part-00001.csv", lambda b: b.replace(b".000000Z,", b".000000,", 1))
    msg = _refused(_agri, store, lake, "2 of 2 objects break the contract", url0, url1,
                   "column 'sensor_ts'", "time zone mismatch")  # fmt: skip
    assert "column 'soil_moisture_pct': expected double" in msg


# -- JSON Lines --------------------------------------------------------------------------
def test_jsonl_is_normalised_and_pseudonymised(store: Store, lake: Store) -> None:
    generate_health(store.url, store.storage_options, rows=2000, objects=2)
    raw = b"".join(store.fs.cat_file(f"{store.path}/part-0000{i}.jsonl") for i in range(2))
    first = json.loads(raw.split(b"\n", 1)[0])
    said: list[str] = []
    snap = _health(store, lake, said.append)
    t = _lake_table(lake, snap)
    assert t.schema.equals(catalog_at().get("health-records").schema_.arrow())
    assert t.num_rows == 2000 and t.column("admission_ts").type == pa.timestamp("us", "UTC")
    assert (
        snap.pseudonymisation
        == f"hmac-sha256:{key_fingerprint(KEY)}:patient_id,patient_name,postcode"
    )
    assert snap.policy["pseudonymised"] == ["patient_id", "patient_name", "postcode"]
    assert all(o.pseudonymised == ["patient_id", "patient_name", "postcode"] for o in snap.objects)
    pid = t.column("patient_id").to_pylist()
    assert all(p.startswith("ps_") and len(p) == 35 for p in pid)
    assert t.column("record_id").to_pylist()[0] == first["record_id"]  # not personal: kept
    # the same patient gets the same pseudonym (joins still work), raw values never land
    lake_bytes = b"".join(lake.fs.cat_file(k) for k in lake.fs.find(lake.path))
    for value in (first["patient_id"], first["patient_name"], first["postcode"]):
        assert value.encode() not in lake_bytes
    assert KEY not in lake_bytes and not any(KEY.decode() in m for m in said)
    decoded = lake_bytes.decode("latin-1")
    assert first["patient_id"] not in decoded


def test_jsonl_pseudonyms_depend_on_the_key(store: Store, lake: Store, tmp_path: Any) -> None:
    generate_health(store.url, store.storage_options, rows=1000, objects=1)
    a = _lake_table(lake, _health(store, lake))
    b_snap = _health(store, lake, pseudonymisation_key=b"another-key-of-enough-length")
    b = _lake_table(lake, b_snap)
    assert a.column("patient_id") != b.column("patient_id")
    assert a.column("ward").equals(b.column("ward"))


def test_jsonl_without_a_key_is_refused(store: Store, lake: Store) -> None:
    generate_health(store.url, store.storage_options, rows=500, objects=1)
    with pytest.raises(PolicyError, match="must be pseudonymised, and no pseudonymisation key"):
        _health(store, lake, pseudonymisation_key=None)


def test_jsonl_bad_values(store: Store, lake: Store) -> None:
    generate_health(store.url, store.storage_options, rows=2000, objects=4)
    u0 = _edit(
        store,
        "part-00000.jsonl",
        lambda b: b.replace(b'"heart_rate":', b'"heart_rate":3.5,"x":', 1),
    )
    u1 = _edit(
        store, "part-00001.jsonl", lambda b: re.sub(rb'"ward":"[^"]*"', b'"ward":null', b, count=1)
    )
    u2 = _edit(store, "part-00002.jsonl", lambda b: b.replace(b'.000000Z"', b'.000000"', 1))
    u3 = _edit(store, "part-00003.jsonl", lambda b: b[: len(b) - 20])
    msg = _refused(_health, store, lake, "4 of 4 objects", u0, u1, u2, u3,
                   "column 'ward': expected not null, actual nulls",
                   "column 'admission_ts'", "time zone mismatch",
                   "not valid JSON Lines")  # fmt: skip
    assert "column 'x'" in msg or "heart_rate" in msg


def test_jsonl_missing_required_key_and_non_utf8(store: Store, lake: Store) -> None:
    generate_health(store.url, store.storage_options, rows=1000, objects=2)

    def drop_sex(b: bytes) -> bytes:
        rows = [json.loads(x) for x in b.splitlines()]
        for r in rows:
            r.pop("sex")
        return b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"

    u0 = _edit(store, "part-00000.jsonl", drop_sex)
    u1 = _edit(store, "part-00001.jsonl", lambda b: b.replace(b'"ward":"', b'"ward":"\xff\xfe', 1))
    _refused(_health, store, lake, u0, u1, "column 'sex': expected string, actual no such key",
             "column 'ward': expected UTF-8 text, actual invalid bytes")  # fmt: skip


# -- policies, before any byte is read ----------------------------------------------------
@pytest.mark.parametrize(
    ("kw", "rule"),
    [
        ({"startup": "startup-a"}, "refused by policy.allowed_startups: start-up 'startup-a'"),
        ({"purpose": "marketing"}, "refused by policy.allowed_purposes: purpose 'marketing'"),
        ({"purpose": "marketing", "declared_purposes": ["readmission-risk-research"]},
         "refused by startup.purposes: purpose 'marketing' is not one that start-up"),
        ({"today": dt.date(2027, 4, 1)},
         "refused by policy.valid_until: the policy expired on 2027-03-31"),
    ],
)  # fmt: skip
def test_policy_refusals_read_nothing(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], rule: str
) -> None:
    generate_health(store.url, store.storage_options, rows=500, objects=1)

    def no_listing(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a refused ingest must not list or read the data space")

    monkeypatch.setattr(ingest_mod, "list_objects", no_listing)
    decisions: list[Any] = []
    with pytest.raises(PolicyError) as e:
        _health(store, lake, on_decision=decisions.append, **kw)
    assert rule in str(e.value) and str(e.value).startswith("ingest health-records: ")
    assert e.value.exit_code == 3
    assert len(decisions) == 1 and not decisions[0].allowed
    assert decisions[0].rule == rule.split(": ")[0].removeprefix("refused by ")
    assert listing(lake) == {} or not [k for k in listing(lake) if "." in k.rsplit("/", 1)[-1]]


def test_policy_decision_is_recorded(store: Store, lake: Store) -> None:
    generate_agriculture(store.url, store.storage_options, rows=1000, objects=1)
    snap = _agri(store, lake, today=dt.date(2027, 12, 31))  # the last valid day
    assert snap.policy["allowed"] and snap.policy["checked_on"] == "2027-12-31"
    assert (
        snap.policy["startup"] == "startup-b" and snap.policy["purpose"] == "crop-yield-forecasting"
    )
    assert (
        list_snapshots(lake.url, "agriculture-fields", lake.storage_options)[0].policy
        == snap.policy
    )


# -- other distributions: memory:// and http(s):// -----------------------------------------
def test_memory_distribution(lake: Store) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/aif-{lake.kind}-{id(lake)}"
    generate_agriculture(f"memory://{root}", None, rows=900, objects=3)
    first = ingest(f"memory://{root}/*.csv", lake.url, "agriculture-fields", None,
                   lake.storage_options, IngestOptions(**AGRI))  # fmt: skip
    assert first.rows == 900 and len(first.objects_read) == 3
    again = ingest(f"memory://{root}/*.csv", lake.url, "agriculture-fields", None,
                   lake.storage_options, IngestOptions(**AGRI))  # fmt: skip
    assert again.reused and again.snapshot_id == first.snapshot_id
    fs.rm(root, recursive=True)


def test_http_distribution(tmp_path: Any, lake: Store) -> None:
    """An HTTP server's index page is listed; sizes and Last-Modified come from HEAD."""
    import functools
    import http.server
    import threading

    generate_agriculture(f"file://{tmp_path}/site/agri", None, rows=600, objects=2)
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "site")
    )
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/agri/*.csv"
        snap = ingest(url, lake.url, "agriculture-fields", None, lake.storage_options,
                      IngestOptions(**AGRI))  # fmt: skip
        assert snap.rows == 600 and [o.key.rsplit("/", 1)[-1] for o in snap.objects] == [
            "part-00000.csv",
            "part-00001.csv",
        ]
        again = ingest(url, lake.url, "agriculture-fields", None, lake.storage_options,
                       IngestOptions(**AGRI))  # fmt: skip
        assert again.reused
    finally:
        server.shutdown()


# -- streamed in blocks of whole lines: memory flat in the object's size ----------------------
SMALL_BLOCK = 64 << 10
ROWS_OF_SMALL_BLOCKS = {"csv": 12_000, "jsonl": 3_500}  # about 1 MB: 16 blocks


def _object_bytes(tmp_path: Any, fmt: str, rows: int) -> bytes:
    gen = generate_agriculture if fmt == "csv" else generate_health
    gen(f"file://{tmp_path}/{fmt}", None, rows=rows, objects=1)
    return (tmp_path / fmt / f"part-00000.{fmt}").read_bytes()


def _arrow_streaming(fmt: str, data: bytes, schema: pa.Schema) -> list[pa.RecordBatch]:
    """What Arrow's own streaming readers give (read-ahead and all), normalised the same."""
    if fmt == "csv":
        reader = pa.csv.open_csv(
            io.BytesIO(data),
            read_options=pa.csv.ReadOptions(block_size=SMALL_BLOCK),
            convert_options=pa.csv.ConvertOptions(
                column_types={f.name: f.type for f in schema}, strings_can_be_null=True
            ),
        )
        return [formats.cast_batch(b, schema) for b in reader]
    text = pa.schema([pa.field(f.name, pa.string()) for f in schema
                      if pa.types.is_string(f.type) or pa.types.is_timestamp(f.type)])  # fmt: skip
    reader = pajson.open_json(
        io.BytesIO(data),
        read_options=pajson.ReadOptions(block_size=SMALL_BLOCK),
        parse_options=pajson.ParseOptions(explicit_schema=text, unexpected_field_behavior="infer"),
    )
    return [
        formats.cast_batch(
            formats._parse_timestamps(formats._add_missing_nullable(b, schema), schema), schema
        )
        for b in reader
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_blocks_are_arrow_streaming_batches(
    fmt: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same batches (rows, values, types) as Arrow's streaming reader: same lake bytes."""
    data = _object_bytes(tmp_path, fmt, ROWS_OF_SMALL_BLOCKS[fmt])
    schema = catalog_at().get(DATASETS[fmt]).schema_.arrow()
    monkeypatch.setattr(formats, "BLOCK_BYTES", SMALL_BLOCK)
    ours = list(formats.READERS[fmt](io.BytesIO(data), schema))
    theirs = _arrow_streaming(fmt, data, schema)
    assert len(ours) > 10 and [b.num_rows for b in ours] == [b.num_rows for b in theirs]
    assert all(a.equals(b) for a, b in zip(ours, theirs, strict=True))


def test_csv_in_small_blocks_gives_the_whole_file(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingested in 64 KiB blocks: the lake holds the file's rows, in order, as one read of
    the whole file gives them."""
    generate_agriculture(store.url, store.storage_options, rows=12_000, objects=1)
    monkeypatch.setattr(formats, "BLOCK_BYTES", SMALL_BLOCK)
    schema = catalog_at().get("agriculture-fields").schema_.arrow()
    whole = pa.csv.read_csv(
        io.BytesIO(store.fs.cat_file(f"{store.path}/part-00000.csv")),
        convert_options=pa.csv.ConvertOptions(
            column_types={f.name: f.type for f in schema}, strings_can_be_null=True
        ),
    )
    snap = _agri(store, lake)
    assert snap.rows == 12_000
    assert _lake_table(lake, snap).equals(whole.select(schema.names).cast(schema))


def test_duplicate_key_in_another_block_is_found(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repeated key in a later block, where the first block also holds a longer key."""
    generate_agriculture(store.url, store.storage_options, rows=12_000, objects=1)
    monkeypatch.setattr(formats, "BLOCK_BYTES", SMALL_BLOCK)

    def change(b: bytes) -> bytes:
        b = b.replace(b'"R000000005"', b'"R000000005-with-a-longer-id"', 1)
        return b.replace(b'"R000011990"', b'"R000000001"', 1)

    url = _edit(store, "part-00000.csv", change)
    _refused(_agri, store, lake, url, "column 'reading_id': expected unique (primary key)",
             "1 duplicate value(s) within the object, e.g. 'R000000001'")  # fmt: skip


class _Counting(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self.inner, self.read_bytes = io.BytesIO(data), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.inner.readinto(b)
        self.read_bytes += n
        return n


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_read_ahead_is_bounded(fmt: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """When a batch is handed over, at most a few blocks beyond its rows have been read
    (Arrow's own readers read up to 32 blocks ahead)."""
    data = _object_bytes(tmp_path, fmt, ROWS_OF_SMALL_BLOCKS[fmt])
    schema = catalog_at().get(DATASETS[fmt]).schema_.arrow()
    monkeypatch.setattr(formats, "BLOCK_BYTES", SMALL_BLOCK)
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n")) + 1
    fh = _Counting(data)
    rows = 1 if fmt == "csv" else 0  # the header
    ahead = []
    for batch in formats.READERS[fmt](io.BufferedReader(fh, SMALL_BLOCK), schema):
        time.sleep(0.01)  # a slow consumer: a reader may read ahead meanwhile
        rows += batch.num_rows
        ahead.append(fh.read_bytes - int(ends[rows - 1]))
    assert len(ahead) > 10 and max(ahead) <= 4 * SMALL_BLOCK, ahead


def _long_line(store: Store, fmt: str, at: int, size: int) -> str:
    """Make line ``at`` (from 1) of the object ``size`` bytes long (in a text value)."""
    name = f"part-00000.{fmt}"

    def change(b: bytes) -> bytes:
        lines = b.split(b"\n")
        if fmt == "jsonl":
            rec = json.loads(lines[at - 1])
            rec["patient_name"] = "x" * size
            lines[at - 1] = json.dumps(rec).encode()
        else:
            lines[at - 1] = lines[at - 1].replace(b'"wheat"', b'"' + b"w" * size + b'"', 1)
            lines[at - 1] = re.sub(rb'"(maize|barley|sunflower)"', b'"' + b"w" * size + b'"',
                                   lines[at - 1], count=1)  # fmt: skip
        return b"\n".join(lines)

    return _edit(store, name, change)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_line_longer_than_a_block_is_read(
    store: Store, lake: Store, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 5.5 MB line over 1 MiB blocks (Arrow's readers refuse a line over 2 blocks): its
    block grows to hold it."""
    monkeypatch.setattr(formats, "BLOCK_BYTES", 1 << 20)
    run = _health if fmt == "jsonl" else _agri
    (generate_health if fmt == "jsonl" else generate_agriculture)(
        store.url, store.storage_options, rows=400, objects=1
    )
    _long_line(store, fmt, 101, 5_500_000)
    snap = run(store, lake)
    assert snap.rows == 400
    if fmt == "csv":
        crops = _lake_table(lake, snap).column("crop").to_pylist()
        assert max(len(c) for c in crops) == 5_500_000


@pytest.mark.parametrize("size", [5_500_000, 12_000_000])  # ends in the next read, or later
def test_line_longer_than_the_limit_is_named(
    store: Store, lake: Store, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    monkeypatch.setattr(formats, "MAX_LINE_BYTES", 5 << 20)
    generate_health(store.url, store.storage_options, rows=400, objects=1)
    url = _long_line(store, "jsonl", 101, size)
    what = "line 101 is 5.5 MB" if size < 10e6 else "line 101 is over "  # (as far as read)
    _refused(_health, store, lake, url, what, "MB, longer than the longest line read (5 MiB)")


def test_capped() -> None:
    assert formats.capped(["a", "b"]) == "a; b"
    assert formats.capped(list("abcdefg")) == "a; b; c; d; e; ... and 2 more problems"
    assert formats.capped(list("abcdef"), " | ", 5, noun="object").endswith("and 1 more object")
    long = formats.capped(["x" * 400] * 4000)
    assert len(long) <= 500 and long.endswith("; ... and 3999 more problems")
    cut = formats.capped(["y" * 10_000, "z"])
    assert len(cut) <= 500 and cut.endswith("…; ... and 1 more problem")
    assert formats.capped(["one\nline\t here"]) == "one line here"
