"""The Prefect API a run talks to: a configured URL, or a local server aif manages.

Profile ``prefect.api_url: managed`` means: the server that *this home* started, recorded
in ``<home_dir>/prefect-local/server.json`` (pid, command line, start time, address). It is
reused only while that very process runs and answers. A server of another home (another
clone, another user) on the preferred port is never reused: its database is not ours. Then
aif starts its own, on ``managed_port`` if free, else on a free loopback port, and says so.
``aif server status|stop`` shows and stops it (and the home's worker, tasks/control/worker.py).
Prefect's ephemeral mode is avoided on purpose (slow first start, SQLite lock errors):
:func:`use_server` points this process at the chosen server and turns that mode off.
Processes are started, awaited and stopped by the same helpers as the site's daemons
(infra/site/procs.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aifactory.infra.site import procs
from aifactory.tasks.core.errors import SiteError
from aifactory.tasks.doors.lake import write_text_local

STARTUP_TIMEOUT_S = 240.0
STATE = "prefect-local"


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    return procs.http_ok(f"{api_url.rstrip('/')}/health", b"true", timeout)


def _prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def state_dir(home_dir: str) -> Path:
    return Path(home_dir).resolve() / STATE


def record(home_dir: str) -> dict[str, Any] | None:
    """This home's server record, or None if it never started one (or the file is bad)."""
    try:
        rec = json.loads((state_dir(home_dir) / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _live(rec: dict[str, Any] | None) -> bool:
    """Whether the recorded server process still runs and answers."""
    return bool(rec and isinstance(rec.get("api_url"), str) and procs.owns(rec)
                and healthy(rec["api_url"]))  # fmt: skip


def running(home_dir: str) -> dict[str, Any] | None:
    """This home's server record if that process still runs and answers, else None."""
    rec = record(home_dir)
    return rec if _live(rec) else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind it
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def note(message: str) -> None:
    """A note about the server (starting it, a busy port) goes to stderr: stdout is the
    command's own output (`--json`)."""
    print(message, file=sys.stderr, flush=True)


def ensure_managed_server(
    home_dir: str, port: int, progress: Callable[[str], object] = note
) -> str:
    """Reuse this home's running server, or start one; return its API URL. Two commands
    of one home starting at once share one server (a lock file serialises the start)."""
    state = state_dir(home_dir)
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "server.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_locked(home_dir, state, port, progress)


def _ensure_locked(home_dir: str, state: Path, port: int, progress: Callable[[str], object]) -> str:
    old = record(home_dir)
    if old and _live(old):
        return str(old["api_url"])
    if old:  # recorded but not answering: stop whatever of it is left, then start afresh
        procs.stop(old, "prefect")
        from aifactory.tasks.control.worker import stop_worker

        stop_worker(home_dir)  # a worker of the old server: its pool and runs are gone
    if not _port_free(port):
        chosen = _free_port()
        progress(f"port {port} is in use by another program (not this home's Prefect server);"
                 f" using 127.0.0.1:{chosen}")  # fmt: skip
        port = chosen
    log_path = state / "server.log"
    api_url = f"http://127.0.0.1:{port}/api"
    env = {
        "PREFECT_HOME": str(state),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    argv = [_prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    progress(f"starting a local Prefect server on 127.0.0.1:{port} (state in {state}; "
             "stop it with `aif server stop`)")  # fmt: skip
    rec = procs.start("local Prefect server", argv, log_path, env=env)
    rec.update(api_url=api_url, port=port, home=str(Path(home_dir).resolve()))
    write_text_local(state / "server.json", json.dumps(rec))
    try:
        procs.wait_until("local Prefect server", lambda: healthy(api_url), int(rec["pid"]),
                         log_path, STARTUP_TIMEOUT_S)  # fmt: skip
    except SiteError:
        procs.stop(rec, "prefect")
        raise
    return api_url


def stop_managed_server(home_dir: str) -> bool:
    """Stop this home's server (only the process it recorded) and its worker, if any; True
    if the server was running."""
    from aifactory.tasks.control.worker import stop_worker

    stop_worker(home_dir)
    rec = record(home_dir)
    if not rec:
        return False
    stopped = procs.stop(rec, "prefect")
    with contextlib.suppress(FileNotFoundError):
        (state_dir(home_dir) / "server.json").unlink()
    return stopped


def resolve_api_url(
    api_url: str, home_dir: str, port: int, progress: Callable[[str], object] = note
) -> str:
    if api_url == "managed":
        return ensure_managed_server(home_dir, port, progress)
    if not healthy(api_url, timeout=5.0):
        raise SiteError(
            f"Prefect API {api_url} is not reachable: is the site up? "
            "(aif site up; aif site status)"
        )
    return api_url


# A run outlives a restart or an outage of its Prefect server (or of its database): the
# client retries a refused connection or a 502/503 with exponential back-off, 2 s, 4 s, ...
# 256 s (Prefect's default, 5 retries, gives up after about a minute: a 60 s outage failed
# the run's next state change, tests/site/test_outage_site.py).
CLIENT_MAX_RETRIES = "8"


def use_server(api_url: str) -> str:
    """Point this process's Prefect (API client, events, flow runs) at ``api_url``; return it.

    Setting ``PREFECT_API_URL`` in the environment is not enough once prefect was imported:
    its process-wide settings were read then (a run of aif in a process that imported
    prefect before, e.g. tests, or a second server in one process), and with no API URL the
    events client, like the API client, silently starts a temporary server of its own
    (``aif.model.promoted`` then lands in ~/.prefect). So this sets the environment (also
    for child processes), turns the temporary server mode off (the API client then refuses
    an unset URL instead of starting one), refreshes prefect's global settings, and drains
    any events worker that was started for another server. Any other ``PREFECT_*`` variable
    set before the call takes effect with it. Settings entered with ``temporary_settings``
    keep their own values inside their block."""
    os.environ["PREFECT_API_URL"] = api_url
    os.environ["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] = "false"
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", CLIENT_MAX_RETRIES)
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        # Events (and API log) workers already running send to the server of then: drain
        # and stop them; the next event starts one for this server.
        if getattr(EventsWorker, "_instances", None):
            EventsWorker.drain_all(timeout=10)
    return api_url
