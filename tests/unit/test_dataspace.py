"""Listing a data space and checking objects' footers against the dataset contract."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.datagen import generate_mobility
from tasks.dataspace import (
    DATASETS,
    contract,
    has_objects,
    list_objects,
    validate_object,
    validate_objects,
)
from tasks.errors import DataError, StorageError
from tests.unit.conftest import MotoS3, Store

DC = DATASETS["mobility-trips"]


def _seed(s: Store, rows: int = 900, objects: int = 3) -> list[str]:
    return generate_mobility(s.url, s.storage_options, seed=7, rows=rows, objects=objects)


def _one(s: Store, name: str) -> Any:
    return next(o for o in list_objects(s.url, s.storage_options) if o.name == name)


def test_list_objects(store: Store) -> None:
    _seed(store)
    store.fs.pipe_file(f"{store.path}/README.txt", b"not data")
    store.fs.makedirs(f"{store.path}/more", exist_ok=True)
    first = store.fs.cat_file(f"{store.path}/part-00000.parquet")
    store.fs.pipe_file(f"{store.path}/more/part-extra.parquet", first)
    objs = list_objects(store.url, store.storage_options)
    assert [o.key.removeprefix(store.path + "/") for o in objs] == [
        "more/part-extra.parquet",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    for o in objs:
        assert o.url == f"{store.kind}://{o.key}"
        assert o.size == len(store.fs.cat_file(o.key))
    if store.kind == "s3":
        assert all(o.etag and '"' not in o.etag for o in objs)
        assert objs[0].etag == objs[1].etag  # same bytes, same ETag (MD5)
    else:
        assert all(o.mtime for o in objs)


def test_empty_prefix_is_a_data_error(store: Store) -> None:
    store.fs.pipe_file(f"{store.path}/notes.txt", b"x")
    with pytest.raises(DataError, match=r"no Parquet objects") as e:
        list_objects(store.url, store.storage_options)
    assert store.url in str(e.value)


def test_missing_bucket(moto_s3: MotoS3) -> None:
    url = "s3://aif-no-such-bucket/mobility/trips"
    with pytest.raises(StorageError) as e:
        list_objects(url, moto_s3.storage_options())
    assert str(e.value) == f"data space {url}: bucket 'aif-no-such-bucket' does not exist"


def test_unreachable_endpoint() -> None:
    so = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "us-east-1"},
        "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
    }
    with pytest.raises(StorageError) as e:
        list_objects("s3://aif-dataspace/mobility/trips", so)
    msg = str(e.value)
    assert msg.startswith("data space s3://aif-dataspace/mobility/trips: endpoint ")
    assert "http://127.0.0.1:9 unreachable" in msg and "\n" not in msg


def test_has_objects(store: Store, tmp_path: Path) -> None:
    assert not has_objects(store.url, store.storage_options)
    assert not has_objects(f"file://{tmp_path}/not/created/yet")
    _seed(store, objects=1)
    assert has_objects(store.url, store.storage_options)


def test_missing_local_path(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/nowhere"
    with pytest.raises(StorageError, match="path does not exist") as e:
        list_objects(url, {})
    assert url in str(e.value)


def test_valid_object(store: Store) -> None:
    _seed(store)
    objs = list_objects(store.url, store.storage_options)
    assert validate_object(objs[0], DC, store.fs).equals(DC.schema)
    assert validate_objects(objs, DC, store.fs) == {o.key: 300 for o in objs}


def test_missing_column(store: Store) -> None:
    _seed(store)
    url = store.rewrite("part-00001.parquet", lambda t: t.drop_columns(["distance_km"]))
    with pytest.raises(DataError) as e:
        validate_object(_one(store, "part-00001.parquet"), DC, store.fs)
    assert str(e.value) == (
        f"ingest mobility-trips: object {url}: column 'distance_km' missing (expected double)"
    )


def test_wrong_types(store: Store) -> None:
    _seed(store)

    def change(t: pa.Table) -> pa.Table:
        t = t.set_column(t.schema.get_field_index("pickup_zone"), "pickup_zone",
                         t.column("pickup_zone").cast(pa.int64()))  # fmt: skip
        i = t.schema.get_field_index("distance_km")
        return t.set_column(i, "distance_km", t.column("distance_km").cast(pa.float32()))

    url = store.rewrite("part-00000.parquet", change)
    with pytest.raises(DataError) as e:
        validate_object(_one(store, "part-00000.parquet"), DC, store.fs)
    msg = str(e.value)
    assert msg.startswith(f"ingest mobility-trips: object {url}: ")
    assert "column 'pickup_zone' has type int64 (expected int32)" in msg
    assert "column 'distance_km' has type float (expected double)" in msg


def test_large_string_and_extra_columns_are_accepted(store: Store) -> None:
    _seed(store)

    def change(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("vendor")
        t = t.set_column(i, "vendor", t.column("vendor").cast(pa.large_string()))
        return t.append_column("extra", pa.array([1] * t.num_rows))

    store.rewrite("part-00000.parquet", change)
    schema = validate_object(_one(store, "part-00000.parquet"), DC, store.fs)
    assert schema.field("vendor").type == pa.large_string()


def test_nulls_in_not_null_column_from_statistics(store: Store) -> None:
    _seed(store)

    def change(t: pa.Table) -> pa.Table:
        vendor = t.column("vendor").to_pylist()
        vendor[5] = vendor[7] = None
        i = t.schema.get_field_index("vendor")
        return t.set_column(i, pa.field("vendor", pa.string()), pa.array(vendor, pa.string()))

    url = store.rewrite("part-00002.parquet", change)
    with pytest.raises(DataError) as e:
        validate_object(_one(store, "part-00002.parquet"), DC, store.fs)
    assert str(e.value) == (
        f"ingest mobility-trips: object {url}: column 'vendor' has 2 null value(s) "
        "(expected not null)"
    )


def test_corrupt_footer(store: Store) -> None:
    _seed(store)
    path = f"{store.path}/part-00001.parquet"
    data = store.fs.cat_file(path)
    store.fs.pipe_file(path, data[:-40] + b"\x00" * 36 + b"PAR1")
    with pytest.raises(DataError) as e:
        validate_object(_one(store, "part-00001.parquet"), DC, store.fs)
    msg = str(e.value)
    assert msg.startswith(f"ingest mobility-trips: object {store.url}/part-00001.parquet: ")
    assert "not a readable Parquet file" in msg and "\n" not in msg


def test_truncated_body_with_footer(store: Store) -> None:
    _seed(store)
    path = f"{store.path}/part-00000.parquet"
    data = store.fs.cat_file(path)
    footer = pq.ParquetFile(io.BytesIO(data)).metadata.serialized_size + 8
    store.fs.pipe_file(path, data[: len(data) // 2] + data[-footer:])
    with pytest.raises(DataError, match=r"truncated or corrupt: column '\w+' in row group 0"):
        validate_object(_one(store, "part-00000.parquet"), DC, store.fs)


def test_several_bad_objects_in_one_line(store: Store) -> None:
    _seed(store, objects=3)
    store.rewrite("part-00000.parquet", lambda t: t.drop_columns(["weather"]))
    store.fs.pipe_file(f"{store.path}/part-00002.parquet", b"garbage, not parquet")
    objs = list_objects(store.url, store.storage_options)
    with pytest.raises(DataError) as e:
        validate_objects(objs, DC, store.fs)
    msg = str(e.value)
    assert msg.startswith("ingest mobility-trips: 2 of 3 objects break the contract: ")
    parts = msg.split(": ", 2)[2].split("; ")
    assert parts[0] == (
        f"object {store.url}/part-00000.parquet: column 'weather' missing (expected string)"
    )
    assert parts[1].startswith(f"object {store.url}/part-00002.parquet: not a readable Parquet")
    assert "part-00001" not in msg


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="dataset 'nope': no contract declared"):
        contract("nope")


def test_contract_fingerprint_ignores_descriptions() -> None:
    import dataclasses

    other = dataclasses.replace(DC, descriptions={}, title="x")
    assert other.fingerprint() == DC.fingerprint()
    changed = dataclasses.replace(DC, schema=DC.schema.remove(0))
    assert changed.fingerprint() != DC.fingerprint()
