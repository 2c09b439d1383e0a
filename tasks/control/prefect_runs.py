"""A start-up's runs as Prefect knows them: the listing of `aif runs ls` and `aif status`,
and the logs of one run (`aif logs RUN`) with the Slurm job logs it wrote.

A run started by `aif` carries the tags ``aif``, ``startup:<id>`` and ``profile:<name>``; a
deployment's run is found by its ``startup`` parameter. Only top-level runs are listed (a
pipeline's four stages are its subflows). Nothing here starts a server: the caller points
the process at the profile's API first.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from aifactory.tasks.core.errors import AifError

# Flows whose top-level runs are a start-up's runs (aif run, aif ingest, aif sweep, ...).
RUN_FLOWS = ("aif-pipeline", "ingest", "aif-sweep")
LIST_LIMIT = 200  # the Prefect API's largest page


def run_tags(startup: str, profile: str) -> list[str]:
    """The tags `aif` puts on a run it starts (the UI filters by them)."""
    return ["aif", f"startup:{startup}", f"profile:{profile}"]


@dataclass
class RunRow:
    id: str
    name: str
    flow: str
    state: str
    startup: str
    started: str  # ISO time, "" if it never started
    seconds: float | None
    model: str  # models:/NAME/VER from the run's record, "" if none (yet)
    url: str

    def public(self) -> dict[str, Any]:
        return asdict(self)


def _iso(t: Any) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _tag(fr: Any, key: str) -> str:
    for t in fr.tags or []:
        if t.startswith(f"{key}:"):
            return str(t.split(":", 1)[1])
    return ""


def _startup_of(fr: Any) -> str:
    return _tag(fr, "startup") or str((fr.parameters or {}).get("startup") or "")


def _record_of(runs_dir: str, run_id: str) -> dict[str, Any]:
    try:
        return dict(json.loads((Path(runs_dir) / "pipeline" / f"{run_id}.json").read_text()))
    except (OSError, ValueError):
        return {}


def _model_of(runs_dir: str, run_id: str) -> str:
    return str((_record_of(runs_dir, run_id).get("model") or {}).get("uri") or "")


def ui_base(api_url: str) -> str:
    return api_url[: -len("/api")] if api_url.endswith("/api") else api_url


def _paged(read: Callable[..., list[Any]], pages: int | None = None,
           **query: Any) -> Iterator[Any]:  # fmt: skip
    """Every item ``read(**query)`` gives, page by page (the API's pages are at most
    LIST_LIMIT long); at most ``pages`` pages."""
    offset = 0
    for _ in itertools.count() if pages is None else range(pages):
        page = read(**query, limit=LIST_LIMIT, offset=offset)
        yield from page
        if len(page) < LIST_LIMIT:
            return
        offset += LIST_LIMIT


def _top_level_runs(client: Any, flows: tuple[str, ...] | None = None,
                    pages: int | None = None) -> Iterator[Any]:  # fmt: skip
    """Flow runs that are no other run's subflow (of ``flows`` if given), newest first."""
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    yield from _paged(
        client.read_flow_runs, pages,
        flow_filter=FlowFilter(name=FlowFilterName(any_=list(flows))) if flows else None,
        flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
        sort=FlowRunSort.EXPECTED_START_TIME_DESC,
    )  # fmt: skip


def list_runs(client: Any, api_url: str, runs_dir: str, startup: str | None,
              limit: int = 20) -> list[RunRow]:  # fmt: skip
    """The newest ``limit`` top-level aif runs (of ``startup`` if given), newest first."""
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    flows = {f.id: f.name for f in client.read_flows(
        flow_filter=FlowFilter(name=FlowFilterName(any_=list(RUN_FLOWS))))}  # fmt: skip
    if not flows:
        return []
    rows: list[RunRow] = []
    for fr in _top_level_runs(client, RUN_FLOWS):
        if fr.state and fr.state.name == "Scheduled" and fr.expected_start_time and \
                fr.expected_start_time > dt.datetime.now(dt.UTC):  # fmt: skip
            continue  # a nightly's future run: not a run yet (one waiting for a slot is)
        who = _startup_of(fr)
        if startup and who != startup:
            continue
        secs = fr.total_run_time.total_seconds() if fr.total_run_time else None
        if fr.start_time and not fr.end_time and fr.state and not fr.state.is_final():
            secs = (dt.datetime.now(dt.UTC) - fr.start_time).total_seconds()
        rows.append(RunRow(
            id=str(fr.id), name=fr.name, flow=flows.get(fr.flow_id, "?"),
            state=fr.state.name if fr.state else "?", startup=who,
            started=_iso(fr.start_time), seconds=round(secs, 1) if secs else None,
            model=_model_of(runs_dir, str(fr.id)),
            url=f"{ui_base(api_url)}/runs/flow-run/{fr.id}",
        ))  # fmt: skip
        if len(rows) >= limit:
            break
    return rows


def find_run(client: Any, ref: str) -> Any:
    """The flow run ``ref`` names: its id, a unique prefix or end of the id (`aif runs ls`
    prints the end), or its name (e.g. ``witty-cat``). AifError when none or several match."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    ref = ref.strip()
    try:
        return client.read_flow_run(uuid.UUID(ref))
    except ValueError:
        pass  # not a full id
    except Exception as exc:
        if type(exc).__name__ == "ObjectNotFound":
            raise AifError(f"run {ref}: no such flow run on this Prefect server") from None
        raise
    by_name = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[ref])), limit=2
    )
    if len(by_name) == 1:
        return by_name[0]
    if not re.fullmatch(r"[0-9a-fA-F-]{4,36}", ref):
        raise AifError(f"run {ref!r}: no flow run of that name (give a run id, a prefix of "
                       "one, or a name; `aif runs ls` lists them)")  # fmt: skip
    matches = [
        fr
        for fr in _top_level_runs(client, pages=11)  # the newest 2,200 runs
        if str(fr.id).startswith(ref.lower()) or str(fr.id).endswith(ref.lower())
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise AifError(f"run {ref}: no flow run id starts or ends with it (`aif runs ls` lists "
                       "them)")  # fmt: skip
    some = ", ".join(str(m.id) for m in matches[:3])
    raise AifError(f"run {ref}: {len(matches)} flow runs start with it ({some}); give more")


def run_tree(client: Any, root: Any) -> list[Any]:
    """The flow run and every subflow run under it (a pipeline's four stages)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, frontier = [root], [root.id]
    while frontier:
        kids = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
            ),
            limit=LIST_LIMIT,
        )
        frontier = [k.id for k in kids if k.id not in {f.id for f in found}]
        found += [k for k in kids if k.id in frontier]
    return found


def prefect_logs(client: Any, runs: list[Any]) -> Iterator[str]:
    """The runs' Prefect log lines, oldest first: ``time level [flow run] message``."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    names = {fr.id: fr.name for fr in runs}
    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=list(names)))
    for log in _paged(client.read_logs, log_filter=flt, sort=LogSort.TIMESTAMP_ASC):
        level = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}.get(
            log.level, str(log.level)
        )
        yield f"{_iso(log.timestamp)} {level:<7} [{names.get(log.flow_run_id, '?')}] " \
              f"{log.message}"  # fmt: skip


def job_log_files(runs_dir: str, run_id: str, log_lines: list[str]) -> list[Path]:
    """The Slurm job logs (``slurm-<job>.out``) and local training logs of a run: from its
    record (a finished pipeline) or the run folders its Prefect logs name (a failed one)."""
    dirs: list[Path] = []
    try:
        rec = json.loads((Path(runs_dir) / "pipeline" / f"{run_id}.json").read_text())
        if (rec.get("trained") or {}).get("run_dir"):
            dirs.append(Path(rec["trained"]["run_dir"]))
    except (OSError, ValueError):
        pass
    root = re.escape(str(Path(runs_dir).resolve()))
    for line in log_lines:
        for m in re.finditer(rf"{root}/(?:train|dask|sweeps?)/[\w.@+-]+", line):
            dirs.append(Path(m.group(0)))
    files: list[Path] = []
    for d in dict.fromkeys(dirs):
        if d.is_dir():
            files += sorted(p for p in d.iterdir()
                            if p.is_file() and (p.suffix in (".out", ".err", ".log")))  # fmt: skip
    return files


def records(runs_dir: str, startup: str | None, limit: int) -> list[dict[str, Any]]:
    """Finished pipeline runs from their records (``<runs_dir>/pipeline/<id>.json``), newest
    first, in the shape of RunRow.public(): what `aif status` shows while no server runs."""
    rows = []
    for path in (Path(runs_dir) / "pipeline").glob("*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(rec, dict) or (startup and rec.get("startup") != startup):
            continue
        secs = round(sum((rec.get("stage_seconds") or {}).values()), 1) or None
        rows.append(RunRow(
            id=str(rec.get("flow_run_id") or path.stem), name="", flow="aif-pipeline",
            state="Completed", startup=str(rec.get("startup") or ""),
            started=str(rec.get("finished_at") or ""), seconds=secs,
            model=str((rec.get("model") or {}).get("uri") or ""), url="",
        ).public())  # fmt: skip
    rows.sort(key=lambda r: r["started"], reverse=True)
    return rows[:limit]


# -- the operators' nightly report -----------------------------------------------------
def nightly_rows(client: Any, api_url: str, runs_dir: str, startups: list[str],
                 day: dt.date | None, gpu_hours: Callable[[list[str]], float],
                 ) -> tuple[dt.date | None, list[dict[str, Any]]]:  # fmt: skip
    """One row per nightly run of ``day`` (UTC; default: the newest night that has one),
    plus one for each start-up without any: start-up, project, run, state, reason,
    GPU-hours and the model version it produced."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterParentTaskRunId,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    def runs_of(start: dt.datetime | None, end: dt.datetime | None, pages: int | None) -> Any:
        when = (FlowRunFilterExpectedStartTime(after_=start, before_=end)  # type: ignore[arg-type]
                if start else None)  # fmt: skip
        return _paged(
            client.read_flow_runs, pages,
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["trigger:nightly"]), expected_start_time=when,
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True)),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
        )  # fmt: skip

    if day is None:
        newest = next(iter(runs_of(None, None, 1)), None)
        if newest is None or newest.expected_start_time is None:
            return None, [{"startup": s, "state": "no nightly run yet"} for s in startups]
        day = newest.expected_start_time.astimezone(dt.UTC).date()
    start = dt.datetime.combine(day, dt.time(), dt.UTC)
    base = ui_base(api_url)
    rows: list[dict[str, Any]] = []
    for fr in runs_of(start, start + dt.timedelta(days=1), None):
        rec = _record_of(runs_dir, str(fr.id))
        jobs = list((rec.get("trained") or {}).get("slurm_job_ids") or [])
        hours = gpu_hours(jobs) if jobs else 0.0
        state = fr.state.name if fr.state else "unknown"
        failed = fr.state is not None and fr.state.is_final() and not fr.state.is_completed()
        rows.append({
            "startup": _startup_of(fr), "project": _tag(fr, "project"),
            "run": fr.name, "state": state,
            "reason": " ".join(str(fr.state.message or "").split())[:200] if failed else "",
            "gpu_hours": round(hours, 3), "model": str((rec.get("model") or {}).get("uri") or ""),
            "url": f"{base}/runs/flow-run/{fr.id}",
        })  # fmt: skip
    seen = {r["startup"] for r in rows}
    empty = {"project": "", "run": "", "state": "no nightly run", "reason": "",
             "gpu_hours": 0.0, "model": "", "url": ""}  # fmt: skip
    rows += [{"startup": s, **empty} for s in startups if s not in seen]
    rows.sort(key=lambda r: (r["startup"], r["run"]))
    return day, rows
