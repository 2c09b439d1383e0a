"""The Prefect API a run talks to: a configured URL, or a local server aif manages.

Profile ``prefect.api_url: managed`` means: use the server this checkout started before
(pid file under ``<home_dir>/prefect-local``) if it answers, else start one detached on
127.0.0.1:<managed_port> with SQLite, wait until healthy, and reuse it next time.
Prefect's ephemeral mode is avoided on purpose (slow first start, SQLite lock errors).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.errors import SiteError

STARTUP_TIMEOUT_S = 240.0


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:
            return r.status == 200 and r.read().strip() == b"true"
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def ensure_managed_server(home_dir: str, port: int, progress=print) -> str:  # type: ignore[no-untyped-def]
    """Start (or reuse) the local Prefect server; return its API URL."""
    api_url = f"http://127.0.0.1:{port}/api"
    if healthy(api_url):
        return api_url
    state = Path(home_dir) / "prefect-local"
    state.mkdir(parents=True, exist_ok=True)
    log_path = state / "server.log"
    env = {
        **os.environ,
        "PREFECT_HOME": str(state),
        "PREFECT_API_URL": "",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    }
    env.pop("PREFECT_API_URL")
    progress(f"starting a local Prefect server on 127.0.0.1:{port} (state in {state})")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [_prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    (state / "server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if healthy(api_url):
            return api_url
        if proc.poll() is not None:
            break
        time.sleep(1.0)
    tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    raise SiteError(f"local Prefect server on 127.0.0.1:{port} did not become healthy: {tail}")


def stop_managed_server(home_dir: str) -> bool:
    pid_file = Path(home_dir) / "prefect-local" / "server.pid"
    if not pid_file.exists():
        return False
    pid = int(pid_file.read_text().strip() or 0)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        pid_file.unlink(missing_ok=True)
        return False
    if b"prefect" not in cmdline:
        pid_file.unlink(missing_ok=True)
        return False
    os.killpg(pid, signal.SIGTERM)
    pid_file.unlink(missing_ok=True)
    return True


def resolve_api_url(api_url: str, home_dir: str, port: int, progress=print) -> str:  # type: ignore[no-untyped-def]
    if api_url == "managed":
        return ensure_managed_server(home_dir, port, progress)
    if not healthy(api_url, timeout=5.0):
        raise SiteError(
            f"Prefect API {api_url} is not reachable: is the site up? "
            "(aif site up; aif site status)"
        )
    return api_url
