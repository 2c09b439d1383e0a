"""`aif runs ls` and `aif logs` over Prefect's paged API (tasks/control/prefect_runs.py),
with a fake client: pages of LIST_LIMIT, runs found by the end of their id."""

from __future__ import annotations

import datetime as dt
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from aifactory.tasks.control import prefect_runs as pr
from aifactory.tasks.core.errors import AifError

FLOW = uuid.uuid4()


def _run(i: int) -> Any:
    state = SimpleNamespace(name="Completed", type=SimpleNamespace(value="COMPLETED"),
                            is_final=lambda: True)  # fmt: skip
    t = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    return SimpleNamespace(
        id=uuid.UUID(f"01a234df-0000-7000-8000-{i:012x}"), name=f"run-{i}", flow_id=FLOW,
        state=state, tags=["aif", f"startup:startup-{'a' if i % 2 else 'b'}"], parameters={},
        total_run_time=dt.timedelta(seconds=3), start_time=t, end_time=t,
        expected_start_time=t,
    )  # fmt: skip


class Client:
    def __init__(self, n: int) -> None:
        self.runs = [_run(i) for i in range(n)]
        self.logs = [SimpleNamespace(level=20, timestamp=None, flow_run_id=self.runs[0].id,
                                     message=f"line {i}") for i in range(450)]  # fmt: skip
        self.calls = 0

    def read_flows(self, **_: Any) -> list[Any]:
        return [SimpleNamespace(id=FLOW, name="aif-pipeline")]

    def read_flow_runs(self, limit: int, offset: int = 0, **q: Any) -> list[Any]:
        self.calls += 1
        if q.get("flow_run_filter") is not None and q["flow_run_filter"].name is not None:
            return []  # no run has the name asked for
        return self.runs[offset : offset + limit]

    def read_flow_run(self, run_id: Any) -> Any:
        raise AssertionError("not a full id: never asked")

    def read_logs(self, limit: int, offset: int, **_: Any) -> list[Any]:
        return self.logs[offset : offset + limit]


def test_list_runs_pages_through_and_keeps_the_startups_own() -> None:
    client = Client(2 * pr.LIST_LIMIT + 10)
    rows = pr.list_runs(client, "http://x/api", "/nowhere", "startup-a", limit=150)
    assert len(rows) == 150 and all(r.startup == "startup-a" for r in rows)
    assert client.calls == 2  # the second page held the 150th of start-up A's runs


def test_a_run_is_found_by_the_end_of_its_id_on_a_later_page() -> None:
    client = Client(pr.LIST_LIMIT + 50)
    last = client.runs[-1]
    assert pr.find_run(client, str(last.id)[-8:]) is last
    with pytest.raises(AifError, match="flow runs start with it"):
        pr.find_run(client, "01a234df")  # every id begins with the same time


def test_logs_of_every_page_in_order() -> None:
    client = Client(1)
    lines = list(pr.prefect_logs(client, client.runs))
    assert len(lines) == 450 and lines[-1].endswith("[run-0] line 449")
