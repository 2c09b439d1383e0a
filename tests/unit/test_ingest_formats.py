"""CSV and JSON Lines objects: normalised to the contract, bad files refused by column;
usage policies checked before any byte is read; personal data pseudonymised."""

from __future__ import annotations

import datetime as dt
import io
import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aifactory.tasks.core.errors import DataError
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
