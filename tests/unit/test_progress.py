"""Progress of ingest and preprocessing for the terminal (issue 16, item 3): the stages call
the process's reporter with (stage, done, total, unit); none is installed by default."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.data import progress as P
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.data.dataspace import list_objects
from aifactory.tasks.stages.ingest import IngestOptions, ingest
from tests.unit.conftest import Store

OPTS = IngestOptions(startup="startup-a", purpose="trip-duration-prediction")
Call = tuple[str, int, int, str]


@pytest.fixture()
def calls() -> Iterator[list[Call]]:
    seen: list[Call] = []
    lock = threading.Lock()

    def record(stage: str, done: int, total: int, unit: str) -> None:
        with lock:
            seen.append((stage, done, total, unit))

    with P.reporting(record):
        yield seen
    assert P.current_reporter() is None  # the previous (none) is back


def _ingest(src: Store, lake: Store) -> Any:
    return ingest(src.url, lake.url, "mobility-trips", src.storage_options,
                  lake.storage_options, OPTS)  # fmt: skip


def test_ingest_reports_the_bytes_it_reads(store: Store, lake: Store, calls: list[Call]) -> None:
    generate_mobility(store.url, store.storage_options, seed=3, rows=240_000, objects=3)
    total = sum(o.size for o in list_objects(store.url, store.storage_options))
    _ingest(store, lake)
    mine = [c for c in calls if c[0] == "ingest"]
    assert {(c[2], c[3]) for c in mine} == {(total, "B")}  # one total: the bytes to read
    done = [c[1] for c in mine]
    assert done[0] == 0 and done[-1] == total and done == sorted(done)
    assert len(done) > 3 + 1  # within objects too (80 000 rows: more than one batch each)
    calls.clear()
    snap = _ingest(store, lake)  # unchanged: nothing read, no bar
    assert snap.reused and not calls


def test_preprocess_reports_the_partitions(tmp_path: Path, calls: list[Call]) -> None:
    from distributed import Client, LocalCluster

    from aifactory.tasks.core.config import default_features
    from aifactory.tasks.stages import features as F
    from aifactory.tasks.stages.preprocess import plan, run_preprocess

    src, lake = f"file://{tmp_path}/space", f"file://{tmp_path}/lake"
    generate_mobility(src, None, seed=3, rows=3_000, objects=3)
    snap = ingest(src, lake, "mobility-trips", None, None, OPTS)
    fs_id, config = plan(snap, F.resolve_config(default_features()))
    calls.clear()
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,  # fmt: skip
        Client(cluster) as client,
    ):
        run_preprocess(snap, lake_url=lake, storage_options={}, client=client, config=config,
                       fs_id=fs_id, cluster_info={"kind": "local"},
                       progress=lambda _m: None)  # fmt: skip
    assert calls == [("preprocess", n, 3, "partitions") for n in range(4)]


def test_no_reporter_by_default_and_a_failing_one_never_fails_a_stage(
    store: Store, lake: Store
) -> None:
    assert P.current_reporter() is None
    P.report("ingest", 1, 2, "B")  # a no-op

    def broken(*_a: Any) -> None:
        raise RuntimeError("the terminal is gone")

    generate_mobility(store.url, store.storage_options, seed=5, rows=900, objects=2)
    with P.reporting(broken):
        assert _ingest(store, lake).rows == 900


def test_tracker_counts_from_threads_and_stops_at_the_total(calls: list[Call]) -> None:
    t = P.Tracker("ingest", 5_000, "B")

    def work() -> None:
        for _ in range(100):
            t.advance(10)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t.advance(0)
    t.advance(-5)
    t.finish()
    done = [c[1] for c in calls]
    assert done[0] == 0 and done[-1] == 5_000 and max(done) == 5_000 and t.done == 5_000
    assert {c[2] for c in calls} == {5_000}


def test_rich_reporter_shows_a_bar_per_stage_with_eta() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120)
    with P.rich_reporter(console) as show, P.reporting(show):
        P.report("ingest", 0, 8_000_000, "B")
        P.report("ingest", 2_000_000, 8_000_000, "B")
        P.report("preprocess", 0, 8, "partitions")
        P.report("preprocess", 3, 8, "partitions")
        P.report("ingest", 8_000_000, 8_000_000, "B")
    text = out.getvalue()
    ingest_line = next(ln for ln in text.splitlines() if ln.startswith("ingest"))
    pre_line = next(ln for ln in text.splitlines() if ln.startswith("preprocess"))
    assert "8.0 MB/8.0 MB" in ingest_line and "100%" in ingest_line and "ETA" in ingest_line
    assert "3/8 partitions" in pre_line and "38%" in pre_line and "ETA" in pre_line
    assert P.current_reporter() is None
