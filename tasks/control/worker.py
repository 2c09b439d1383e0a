"""A local Prefect process worker for a work pool, owned by the home like the managed server.

On the local profile nothing else runs the deployments' flow runs (the site has its own
worker, started by `aif site up`), so `aif deploy` starts one in the background:
``prefect worker start --pool <pool> --type process``, recorded in
``<home_dir>/prefect-local/worker.json`` (pid, command line, start time, API URL, pool,
name, log), its log in ``worker.log`` beside it. It is reused only while that very process
runs and was started for the same server and pool; otherwise it is replaced. Its flow runs
get the home (``AIF_HOME``, absolute), so a deployment's run writes where `aif run` of that
home does. Stopping the home's managed server (`aif server stop`) stops its worker too.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aifactory.infra.site import procs
from aifactory.tasks.control.prefect_server import _prefect_exe, state_dir
from aifactory.tasks.core.errors import SiteError
from aifactory.tasks.doors.lake import write_text_local

STARTUP_TIMEOUT_S = 120.0
RECORD = "worker.json"


def worker_name(pool: str) -> str:
    return f"{pool}-worker"


def record(home_dir: str) -> dict[str, Any] | None:
    """This home's worker record, or None if it never started one (or the file is bad)."""
    try:
        rec = json.loads((state_dir(home_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def worker_running(home_dir: str) -> dict[str, Any] | None:
    """This home's worker record if that process still runs, else None."""
    rec = record(home_dir)
    return rec if rec and procs.owns(rec) else None


def worker_online(api_url: str, pool: str, name: str, timeout: float = 2.0) -> bool:
    """Whether the worker ``name`` polls ``pool`` (Prefect shows it ONLINE)."""
    req = urllib.request.Request(
        f"{api_url.rstrip('/')}/work_pools/{urllib.parse.quote(pool)}/workers/filter",
        data=b"{}", headers={"Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            workers = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return any(w.get("name") == name and w.get("status") == "ONLINE" for w in workers)


def ensure_work_pool(api_url: str, pool: str, concurrency_limit: int | None = None) -> bool:
    """Create the process work pool ``pool`` on ``api_url`` unless it exists, with its
    ``concurrency_limit`` (flow runs at once; None: none), also set on a pool that exists;
    True if created. (``prefect deploy`` refuses a deployment whose pool does not exist.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            found = None
        if found is None:
            template = ProcessWorker.get_default_base_job_template()
            try:
                made = WorkPoolCreate(name=pool, type="process", base_job_template=template,
                                      concurrency_limit=concurrency_limit)  # fmt: skip
                client.create_work_pool(made)
                return True
            except ObjectAlreadyExists:  # created meanwhile (another deploy, the worker itself)
                found = client.read_work_pool(pool)
        if found.concurrency_limit != concurrency_limit:
            client.update_work_pool(pool, WorkPoolUpdate(concurrency_limit=concurrency_limit))
    return False


def _env(home_dir: str, api_url: str) -> dict[str, str]:
    state = state_dir(home_dir)
    return {
        "PREFECT_HOME": str(state / "worker-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Flow runs send a heartbeat every 30 s (Prefect's minimum): the crash detector of
        # `aif deploy` marks a run Crashed when they stop.
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        # The flow runs work in the repository (the deployments' pull step); the profile's
        # relative paths (${AIF_HOME:-.aif}) must still resolve to this home.
        "AIF_HOME": str(Path(home_dir).resolve()),
    }


def ensure_worker(
    home_dir: str, api_url: str, pool: str, progress: Callable[[str], object] = print
) -> dict[str, Any]:
    """Reuse this home's worker for ``api_url`` and ``pool``, or start one and wait until it
    polls the pool; return its record. A lock file serialises two starts of one home."""
    state = state_dir(home_dir)
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "worker.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(home_dir, state, api_url, pool, progress)


def _ensure_locked(home_dir: str, state: Path, api_url: str, pool: str,
                   progress: Callable[[str], object]) -> dict[str, Any]:  # fmt: skip
    name = worker_name(pool)
    old = record(home_dir)
    if old and procs.owns(old) and old.get("api_url") == api_url and old.get("pool") == pool:
        return old
    if old:  # another server or pool, or dead: stop whatever of it is left
        procs.stop(old, "prefect")
    log_path = state / "worker.log"
    argv = [_prefect_exe(), "worker", "start", "--pool", pool, "--type", "process",
            "--name", name]  # fmt: skip
    progress(f"starting a local Prefect worker for work pool {pool} ({api_url}; log "
             f"{log_path}; `aif server stop` stops it)")  # fmt: skip
    rec = procs.start(f"Prefect worker ({pool})", argv, log_path, env=_env(home_dir, api_url),
                      cwd=state)  # fmt: skip
    rec.update(
        api_url=api_url, pool=pool, name=name, log=str(log_path), home=str(Path(home_dir).resolve())
    )
    write_text_local(state / RECORD, json.dumps(rec))
    try:
        procs.wait_until(f"Prefect worker ({pool})", lambda: worker_online(api_url, pool, name),
                         int(rec["pid"]), log_path, STARTUP_TIMEOUT_S)  # fmt: skip
    except SiteError:
        stop_worker(home_dir)
        raise
    return rec


def stop_worker(home_dir: str) -> bool:
    """Stop this home's worker (only the process it recorded); True if one was running."""
    rec = record(home_dir)
    if not rec:
        return False
    stopped = procs.stop(rec, "prefect")
    with contextlib.suppress(FileNotFoundError):
        (state_dir(home_dir) / RECORD).unlink()
    return stopped
