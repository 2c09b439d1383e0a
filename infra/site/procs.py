"""Daemons the site starts: detached, logged, recorded by pid, stopped by that pid only."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tasks.errors import SiteError


def log_tail(path: Path, n: int = 5) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:]) or "(empty log)"


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def alive(pid: int | None, expect: str | None = None) -> bool:
    """True if ``pid`` runs and (when given) its command line still contains ``expect``."""
    if not pid:
        return False
    cl = cmdline(pid)
    if not cl:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        return False
    return expect is None or any(expect in part for part in cl)


def start(
    name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:  # fmt: skip
    """Start a daemon in its own session (so its children go with it on stop)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n== aif site: starting {name}: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise SiteError(f"site part {name}: cannot start {argv[0]}: {exc}") from None
    return proc.pid


def stop(pid: int, expect: str, timeout: float = 20.0) -> bool:
    """SIGTERM the process group we started, then SIGKILL; never touch a recycled pid."""
    if not alive(pid, expect):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid, expect):
            _reap(pid)
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    time.sleep(0.3)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, expect: bytes | None = None, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = r.read()
            return r.status == 200 and (expect is None or expect in body)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(
    name: str, check: Callable[[], bool], pid: int | None, expect: str | None, log_path: Path,
    timeout: float,
) -> None:  # fmt: skip
    """Poll ``check`` until true; fail naming the part with its log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        # Only existence here: right after fork the child's cmdline is still ours.
        if pid is not None and not alive(pid):
            raise SiteError(f"site part {name} exited during start-up: {log_tail(log_path)}")
        time.sleep(0.5)
    raise SiteError(f"site part {name} not healthy after {timeout:.0f}s: {log_tail(log_path)}")


def run(argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60,
        check: bool = True, input_text: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input_text,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SiteError(f"`{' '.join(argv)}` failed: {exc}") from None
    if check and proc.returncode != 0:
        out = " ".join((proc.stderr or proc.stdout).split())[:300]
        raise SiteError(f"`{' '.join(argv)}` exited {proc.returncode}: {out}")
    return proc
