"""Listing a data space (no data read) and the dataset contracts from the catalog."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.errors import DataError, StorageError
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.data.dataspace import contract, has_objects, list_objects
from tests.unit.conftest import MotoS3, Store

DC = contract("mobility-trips")


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
    with pytest.raises(DataError, match=r"no \*\.parquet objects") as e:
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


def test_glob_lists_matching_objects_only(store: Store) -> None:
    _seed(store)
    store.fs.makedirs(f"{store.path}/sub", exist_ok=True)
    store.fs.pipe_file(f"{store.path}/sub/x.csv", b"a\n1\n")
    store.fs.pipe_file(f"{store.path}/.part-9.csv.tmp-1", b"a\n")
    objs = list_objects(f"{store.url}/*.parquet", store.storage_options)
    assert [o.name for o in objs] == [f"part-0000{i}.parquet" for i in range(3)]
    csv = list_objects(f"{store.url}/sub/*.csv", store.storage_options, extension=".csv")
    assert [o.name for o in csv] == ["x.csv"]
    assert has_objects(f"{store.url}/sub/*.csv", store.storage_options, extension=".csv")
    assert not has_objects(f"{store.url}/none/*.csv", store.storage_options, extension=".csv")


def test_unknown_dataset() -> None:
    with pytest.raises(DataError, match="no dataset 'nope' \\(known datasets: mobility-trips"):
        contract("nope")


def test_contract_fingerprint_ignores_descriptions() -> None:
    import dataclasses

    other = dataclasses.replace(DC, descriptions={}, title="x")
    assert other.fingerprint() == DC.fingerprint()
    changed = dataclasses.replace(DC, schema=DC.schema.remove(0))
    assert changed.fingerprint() != DC.fingerprint()


@pytest.mark.parametrize("above", [".aif/local", ".work/my data", ".local/src/aif ü'q"])
def test_a_dotted_folder_above_the_data_space_hides_nothing(tmp_path: Path, above: str) -> None:
    """Issue 13: a data space under ``.aif/`` (the default home) listed nothing. Staging files
    are told by their own name; the folders above them never hide an object."""
    root = tmp_path / above / "dataspace" / "trips"
    url = f"file://{root}"
    names = generate_mobility(url, {}, seed=7, rows=300, objects=2)
    (root / ".part-00009.parquet.tmp-1a2b").write_bytes(b"half-written")
    objs = list_objects(url, {})
    assert sorted(o.name for o in objs) == sorted(Path(n).name for n in names)
    assert has_objects(url, {})
    glob = list_objects(f"{url}/*.parquet", {})
    assert [o.name for o in glob] == [o.name for o in objs]


def test_is_staging_reads_the_own_name_only() -> None:
    from aifactory.tasks.doors.lake import _tmp_sibling, is_staging

    assert is_staging(_tmp_sibling("/home/me/.work/aif/lake/objects/x.parquet"))
    assert is_staging("s3://lake/objects/ds/.abc.parquet.tmp-1")
    assert not is_staging("/home/me/.work/aif/.aif/lake/objects/ds/abc.parquet")
    assert not is_staging("s3://.hidden-bucket/a/.b/c.parquet")
    assert not is_staging("/x/.snapshots/sid/")


# -- issue 16: an unreachable HTTP(S) data space; why a data space is empty ----------------
@pytest.mark.parametrize("path", ["trips/", "trips/part-00000.parquet", "health/*.jsonl"])
def test_unreachable_http_data_space_names_the_host(path: str) -> None:
    """It was `bucket 'http:' does not exist`."""
    url = f"http://127.0.0.1:9/{path}"  # nothing listens on the discard port
    for call in (lambda: list_objects(url, {}), lambda: has_objects(url, {})):
        with pytest.raises(StorageError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"data space {url}: host 127.0.0.1:9 unreachable (Client"), msg
        assert "Error: " in msg and "bucket" not in msg and "\n" not in msg


def test_missing_http_path_is_a_404_not_a_bucket() -> None:
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory="/"))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/no/such/trips/part-0.parquet"
        with pytest.raises(StorageError) as e:
            list_objects(url, {})
        host = f"127.0.0.1:{srv.server_address[1]}"
        assert str(e.value) == f"data space {url}: path does not exist (HTTP 404 from {host})"
    finally:
        srv.shutdown()
        srv.server_close()


def test_why_empty_names_the_pattern_and_what_is_there(store: Store, tmp_path: Path) -> None:
    from aifactory.tasks.data.dataspace import display_url, why_empty

    so = store.storage_options
    kind = "folder" if store.kind == "file" else "prefix"
    assert why_empty(store.url, so) == f"no objects match *.parquet (empty {kind})"
    store.fs.makedirs(f"{store.path}/a", exist_ok=True)
    store.fs.pipe_file(f"{store.path}/a/notes.txt", b"x")
    store.fs.pipe_file(f"{store.path}/b.csv", b"x")
    other = "files" if store.kind == "file" else "objects"
    assert why_empty(store.url, so) == f"no objects match *.parquet (2 other {other})"
    assert why_empty(f"{store.url}/a/*.jsonl", store.storage_options).startswith(
        "no objects match *.jsonl (1 other"
    )
    assert why_empty(f"file://{tmp_path}/gone") == "no objects match *.parquet (missing folder)"
    assert display_url("~/nothing") == f"file://{os.path.expanduser('~')}/nothing"
    assert display_url("s3://b/x") == "s3://b/x"


def test_a_store_that_connects_when_made_is_one_line() -> None:
    """`--dataspace ftp://x/y` was `aif: error: gaierror: [Errno -2] Name or service not
    known` (fsspec's FTP filesystem connects in its constructor)."""
    from aifactory.tasks.core.errors import StorageError
    from aifactory.tasks.data.dataspace import filesystem

    with pytest.raises(StorageError, match=r"^ftp://nowhere\.invalid/y: cannot reach the store"):
        filesystem("ftp://nowhere.invalid/y")
