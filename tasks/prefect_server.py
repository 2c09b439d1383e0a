"""The Prefect API a run talks to: a configured URL, or a local server aif manages.

Profile ``prefect.api_url: managed`` means: use the server this checkout started before
(recorded in ``<home_dir>/prefect-local/server.json``) if it answers, else start one detached on
127.0.0.1:<managed_port> with SQLite, wait until healthy, and reuse it next time.
Prefect's ephemeral mode is avoided on purpose (slow first start, SQLite lock errors).
Processes are started, awaited and stopped by the same helpers as the site's daemons.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from infra.site import procs
from tasks.errors import SiteError

STARTUP_TIMEOUT_S = 240.0


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    return procs.http_ok(f"{api_url.rstrip('/')}/health", b"true", timeout)


def _prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def ensure_managed_server(home_dir: str, port: int, progress=print) -> str:  # type: ignore[no-untyped-def]
    """Start (or reuse) the local Prefect server; return its API URL."""
    api_url = f"http://127.0.0.1:{port}/api"
    if healthy(api_url):
        return api_url
    state = Path(home_dir) / "prefect-local"
    log_path = state / "server.log"
    env = {
        "PREFECT_HOME": str(state),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    argv = [_prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    progress(f"starting a local Prefect server on 127.0.0.1:{port} (state in {state})")
    rec = procs.start("local Prefect server", argv, log_path, env=env)
    (state / "server.json").write_text(json.dumps(rec))
    try:
        procs.wait_until("local Prefect server", lambda: healthy(api_url), int(rec["pid"]),
                         log_path, STARTUP_TIMEOUT_S)  # fmt: skip
    except SiteError:
        procs.stop(rec, "prefect")
        raise
    return api_url


def resolve_api_url(api_url: str, home_dir: str, port: int, progress=print) -> str:  # type: ignore[no-untyped-def]
    if api_url == "managed":
        return ensure_managed_server(home_dir, port, progress)
    if not healthy(api_url, timeout=5.0):
        raise SiteError(
            f"Prefect API {api_url} is not reachable: is the site up? "
            "(aif site up; aif site status)"
        )
    return api_url
