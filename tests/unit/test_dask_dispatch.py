"""The client-side partition feeder: drains workers before their deadline, runs each once."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest

from aifactory.tasks.doors import dask_dispatch as D

RUNS: Counter[int] = Counter()
LOCK = threading.Lock()


def _work(i: int, seconds: float) -> dict[str, Any]:
    from distributed import get_worker

    with LOCK:
        RUNS[i] += 1
    time.sleep(seconds)
    return {"index": i, "worker": get_worker().address}


@pytest.fixture
def client() -> Any:
    from distributed import Client, LocalCluster

    RUNS.clear()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                           dashboard_address=None)  # fmt: skip
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_results_in_call_order_each_run_once(client: Any) -> None:
    calls = [(f"w-{i}", (i, 0.01)) for i in range(20)]
    seen: list[tuple[int, int]] = []
    out = D.dispatch(client, _work, calls, on_result=lambda n, t: seen.append((n, t)))
    assert [r["index"] for r in out] == list(range(20))
    assert all(RUNS[i] == 1 for i in range(20))
    assert seen[-1] == (20, 20)


def test_worker_near_its_deadline_is_drained_and_retired(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    addrs = sorted(client.scheduler_info()["workers"])
    short = addrs[0]
    deadline = time.time() + 1.2

    def facts(dask_worker: Any) -> dict[str, Any]:
        mine = dask_worker.address == short
        return {"job_id": "101" if mine else "102", "lifetime_deadline": deadline if mine else None}

    monkeypatch.setattr(D, "worker_facts", facts)
    retired: list[str] = []
    calls = [(f"d-{i}", (i, 0.4)) for i in range(12)]
    out = D.dispatch(client, _work, calls, margin_s=0.3, retire=lambda a, n, j: retired.append(a))
    assert retired == [short]
    assert all(RUNS[i] == 1 for i in range(12)), RUNS
    late = [r for r in out if r["worker"] == short]
    assert late and len(late) < 6, "the short-lived worker should have done a few, then stopped"


def test_workers_are_looked_up_per_poll_not_per_partition(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler shares the flow's process (and often the workers' cores): finishing a
    partition must not cost a scheduler round trip."""
    looks: Counter[str] = Counter()
    real = client.scheduler_info

    def counted(*args: Any, **kwargs: Any) -> Any:
        looks["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(client, "scheduler_info", counted)
    t0 = time.monotonic()
    out = D.dispatch(client, _work, [(f"p-{i}", (i, 0.005)) for i in range(60)], poll_s=0.25)
    took = time.monotonic() - t0
    assert len(out) == 60 and all(RUNS[i] == 1 for i in range(60))
    assert looks["n"] <= took / 0.25 + 2, (looks["n"], took)


def test_partition_time_is_measured_where_it_runs() -> None:
    """Not from submission: a queued partition's wait behind the running one is not part
    of its time, so workers are not drained earlier than they must be."""
    out, took = D.timed(lambda s: time.sleep(s) or "done", 0.05)
    assert out == "done" and 0.05 <= took < 1.0


def test_without_retire_deadlines_are_ignored(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    facts = {"job_id": None, "lifetime_deadline": 0.0}
    monkeypatch.setattr(D, "worker_facts", lambda dask_worker: facts)
    out = D.dispatch(client, _work, [(f"n-{i}", (i, 0.0)) for i in range(4)])
    assert len(out) == 4


def test_cancel_stops_the_stage(client: Any) -> None:
    ev = threading.Event()
    ev.set()
    with pytest.raises(D.StageCancelled, match="cancelled with 3 of 3"):
        D.dispatch(client, _work, [(f"c-{i}", (i, 0.0)) for i in range(3)], cancel=ev)


def _boom(i: int) -> None:
    raise ValueError(f"bad partition {i}")


def test_task_error_is_raised(client: Any) -> None:
    with pytest.raises(ValueError, match="bad partition"):
        D.dispatch(client, _boom, [("b-0", (0,))])


def test_no_worker_timeout(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    facts = {"job_id": "7", "lifetime_deadline": 0.0}
    monkeypatch.setattr(D, "worker_facts", lambda dask_worker: facts)
    with pytest.raises(D.AifError, match="no Dask worker available"):
        D.dispatch(client, _work, [("t-0", (0, 0.0))], retire=lambda a, n, j: None,
                   no_worker_timeout_s=0.5)  # fmt: skip


def test_parse_end_time() -> None:
    assert D.parse_end_time("N/A") is None
    assert D.parse_end_time("Unknown") is None
    t = D.parse_end_time("2026-11-27T06:40:00")
    assert t is not None and t > 1.7e9
    ends = D.slurm_end_times(lambda cmd: "12 2026-11-27T06:40:00\n13 N/A\n", ["12", "13"])
    assert list(ends) == ["12"]
