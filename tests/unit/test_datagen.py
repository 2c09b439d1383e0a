"""The mobility-trips generator: deterministic bytes, declared schema, plausible data."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from aifactory.tasks.core.errors import ConfigError, StorageError
from aifactory.tasks.data import datagen
from aifactory.tasks.data.datagen import MOBILITY_SCHEMA, generate_mobility
from aifactory.tasks.data.dataspace import contract
from tests.unit.conftest import MotoS3, Store

ROWS, OBJECTS = 3_000, 3


def _bytes(s: Store, urls: list[str]) -> list[bytes]:
    return [s.fs.cat_file(f"{s.path}/{u.rsplit('/', 1)[-1]}") for u in urls]


def _read_all(s: Store, urls: list[str]) -> pa.Table:
    return pa.concat_tables(pq.read_table(io.BytesIO(b)) for b in _bytes(s, urls))


def test_writes_objects_and_returns_urls(store: Store) -> None:
    urls = generate_mobility(store.url, store.storage_options, seed=7, rows=ROWS, objects=OBJECTS)
    assert urls == [f"{store.url}/part-{i:05d}.parquet" for i in range(OBJECTS)]
    store.fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in store.fs.find(store.path))
    assert names == [f"part-{i:05d}.parquet" for i in range(OBJECTS)]  # no temp files left


def test_same_inputs_give_identical_bytes(store: Store, tmp_path: Path) -> None:
    a = generate_mobility(store.url, store.storage_options, seed=7, rows=ROWS, objects=OBJECTS)
    first = _bytes(store, a)
    b = generate_mobility(store.url, store.storage_options, seed=7, rows=ROWS, objects=OBJECTS)
    assert _bytes(store, b) == first
    # ... and on another backend/location too: the bytes depend on (seed, rows, objects) only.
    other = tmp_path / "other"
    c = generate_mobility(f"file://{other}", None, seed=7, rows=ROWS, objects=OBJECTS)
    assert [Path(u[len("file://") :]).read_bytes() for u in c] == first


def test_seed_changes_the_data(tmp_path: Path) -> None:
    a = generate_mobility(f"file://{tmp_path}/a", seed=7, rows=500, objects=1)
    b = generate_mobility(f"file://{tmp_path}/b", seed=8, rows=500, objects=1)
    digest = [hashlib.sha256(Path(u[7:]).read_bytes()).hexdigest() for u in (a[0], b[0])]
    assert digest[0] != digest[1]


def test_schema_and_contract(store: Store) -> None:
    urls = generate_mobility(store.url, store.storage_options, seed=3, rows=ROWS, objects=OBJECTS)
    for data in _bytes(store, urls):
        schema = pq.ParquetFile(io.BytesIO(data)).schema_arrow
        assert schema.equals(MOBILITY_SCHEMA)
    assert contract("mobility-trips").schema.equals(MOBILITY_SCHEMA)
    nullable = {f.name for f in MOBILITY_SCHEMA if f.nullable}
    assert nullable == {"payment_type", "temperature_c"}


def test_values_are_plausible(tmp_path: Path) -> None:
    urls = generate_mobility(f"file://{tmp_path}", seed=7, rows=6_000, objects=4)
    t = pa.concat_tables(pq.read_table(u[7:]) for u in urls)
    assert t.num_rows == 6_000
    ids = t.column("trip_id")
    assert pc.count_distinct(ids).as_py() == 6_000
    assert ids[0].as_py() == "T0000000000" and ids[-1].as_py() == "T0000005999"
    ts = t.column("pickup_ts").cast(pa.int64()).to_numpy()
    assert ts.min() >= datagen.YEAR_START_US
    assert ts.max() < datagen.YEAR_START_US + 365 * datagen.DAY_US
    for col in ("pickup_zone", "dropoff_zone"):
        z = t.column(col).to_numpy()
        assert z.min() >= 1 and z.max() <= 60
    assert set(t.column("vendor").to_pylist()) == {"V1", "V2", "V3"}
    assert set(t.column("weather").to_pylist()) == {"clear", "rain", "snow"}
    assert 0 < t.column("payment_type").null_count < 0.1 * t.num_rows
    assert 0 < t.column("temperature_c").null_count < 0.1 * t.num_rows
    for f in MOBILITY_SCHEMA:
        if not f.nullable:
            assert t.column(f.name).null_count == 0, f.name
    pax = t.column("passenger_count").to_numpy()
    assert pax.min() >= 1 and pax.max() <= 6
    # Snow comes with cold days.
    snow = pc.equal(t.column("weather"), "snow")
    snow_temp = pc.mean(pc.filter(t.column("temperature_c"), snow)).as_py()
    assert snow_temp is not None and snow_temp < 3


def test_target_is_learnable(tmp_path: Path) -> None:
    """A least-squares fit on a few hand-made features explains most of the variance; the
    rest needs nonlinear terms (and some is noise): R² well above 0.6, well below 1."""
    urls = generate_mobility(f"file://{tmp_path}", seed=7, rows=20_000, objects=2)
    t = pa.concat_tables(pq.read_table(u[7:]) for u in urls)
    y = t.column("duration_min").to_numpy()
    d = t.column("distance_km").to_numpy()
    keep = (y > 1) & (d > 0.05)
    hour = (t.column("pickup_ts").cast(pa.int64()).to_numpy() // datagen.HOUR_US) % 24
    rush = ((hour >= 7) & (hour < 10)) | ((hour >= 16) & (hour < 19))
    snow = t.column("weather").to_numpy(zero_copy_only=False) == "snow"
    x = np.column_stack([np.ones_like(d), d, d * rush, d * snow, np.sqrt(d)])[keep]
    coef, *_ = np.linalg.lstsq(x, y[keep], rcond=None)
    resid = y[keep] - x @ coef
    r2 = 1 - resid.var() / y[keep].var()
    assert 0.6 < r2 < 0.95, r2


def test_chunks_become_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datagen, "CHUNK_ROWS", 400)
    urls = generate_mobility(f"file://{tmp_path}", seed=7, rows=1_000, objects=1)
    md = pq.ParquetFile(urls[0][7:]).metadata
    assert md.num_row_groups == 3 and md.num_rows == 1_000


def test_rows_must_cover_objects(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rows=2, objects=3"):
        generate_mobility(f"file://{tmp_path}", rows=2, objects=3)


def test_missing_bucket(moto_s3: MotoS3) -> None:
    with pytest.raises(StorageError, match="bucket 'aif-no-bucket' does not exist"):
        generate_mobility("s3://aif-no-bucket/trips", moto_s3.storage_options(), rows=10)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"file://{tmp_path}/cli"
    assert datagen.main([url, "--rows", "300", "--objects", "2", "--seed", "5"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [f"{url}/part-00000.parquet", f"{url}/part-00001.parquet"]
    assert sum(pq.read_metadata(u[7:]).num_rows for u in out) == 300
    assert datagen.main([url, "--rows", "1", "--objects", "2"]) == 2
    assert "rows=1, objects=2" in capsys.readouterr().err
