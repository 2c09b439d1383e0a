"""Daemons the site starts: detached, logged, recorded by pid, stopped by that pid only.

A started daemon is identified by its pid *and* what the kernel says about that pid: the
command line we launched and the process's start time (clock ticks since boot, plus the
boot id). A pid that the kernel has since handed to another program never matches, so
``stop`` can never signal a stranger.
"""

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
from typing import Any

from aifactory.tasks.core.errors import SiteError

PROC = Path("/proc")


def log_tail(path: Path, n: int = 5) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(ln.strip() for ln in lines[-n:]) or "(empty log)"


def cmdline(pid: int, proc: Path = PROC) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def _stat_fields(pid: int, proc: Path = PROC) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, pgrp, session, ...]."""
    try:
        return (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def start_time(pid: int, proc: Path = PROC) -> int | None:
    """The process's start time in clock ticks since boot (stat field 22)."""
    fields = _stat_fields(pid, proc)
    return int(fields[19]) if len(fields) > 19 else None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def argv_matches(actual: Sequence[str], argv: Sequence[str]) -> bool:
    """True if a running command line is the one we launched.

    A script started through its ``#!`` line runs as ``<interpreter> [opts] <script> args``,
    so the launched argv must be the tail of the kernel's command line.
    """
    n = len(argv)
    return n > 0 and len(actual) >= n and list(actual[-n:]) == list(argv)


def alive(pid: int | None, proc: Path = PROC) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if not pid:
        return False
    fields = _stat_fields(pid, proc)
    return bool(fields) and fields[0] != "Z"


def owns(rec: Mapping[str, object], proc: Path = PROC) -> bool:
    """True if the process recorded in ``rec`` (pid, argv, start_time, boot) still runs."""
    pid = rec.get("pid")
    argv = rec.get("argv")
    if not isinstance(pid, int) or not isinstance(argv, list) or not alive(pid, proc):
        return False
    if not argv_matches(cmdline(pid, proc), [str(a) for a in argv]):
        return False
    recorded = rec.get("start_time")
    if recorded is None:  # recorded before start times were kept: the command line decides
        return True
    return rec.get("boot") == boot_id() and start_time(pid, proc) == recorded


def session_members(sid: int, proc: Path = PROC) -> list[int]:
    """Live pids whose session id is ``sid`` (our daemons each lead their own session)."""
    out = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name), proc)
            if len(fields) > 3 and fields[3] == str(sid) and fields[0] != "Z":
                out.append(int(entry.name))
    return sorted(out)


def start(
    name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
    cwd: Path | None = None, launcher: Sequence[str] = (),
) -> dict[str, Any]:  # fmt: skip
    """Start a daemon in its own session; return its record (pid, argv, identity).

    ``launcher`` runs first and execs ``argv`` in the same process (nsenter, unshare): the
    record names ``argv``, the command line that the pid then has."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n== aif site: starting {name}: {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                [*launcher, *argv], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})}, cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )  # fmt: skip
        except OSError as exc:
            raise SiteError(f"site part {name}: cannot start {argv[0]}: {exc}") from None
    return {
        "pid": proc.pid, "argv": list(argv), "start_time": start_time(proc.pid),
        "boot": boot_id(),
    }  # fmt: skip


def _signal_session(sid: int, sig: int, only: Callable[[int], bool] | None = None) -> None:
    for pid in session_members(sid):
        if only is None or only(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def stop(rec: Mapping[str, object], expect: str, timeout: float = 20.0) -> bool:
    """SIGTERM what we started, wait, then SIGKILL what is left; True if anything ran.

    While the recorded leader still runs (same pid, command line and start time) its whole
    session is ours and is signalled. If the leader is gone, only session members whose
    command line names ``expect`` (e.g. mlflow's uvicorn workers) are stopped.
    """
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 1 or not rec.get("argv"):
        return False  # a bare pid (no recorded command line) is never signalled
    if owns(rec):
        only: Callable[[int], bool] | None = None
    else:
        only = lambda p: any(expect in part for part in cmdline(p))  # noqa: E731
    if not [p for p in session_members(pid) if only is None or only(p)]:
        return False
    _signal_session(pid, signal.SIGTERM, only)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not [p for p in session_members(pid) if only is None or only(p)]:
            return True
        time.sleep(0.2)
    _signal_session(pid, signal.SIGKILL, only)
    time.sleep(0.3)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def write_pidfile(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def read_pidfile(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


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


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The HTTP status of a GET of ``url`` (an error status included); None if no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until(
    name: str, check: Callable[[], bool], pid: int | None, log_path: Path, timeout: float,
) -> None:  # fmt: skip
    """Poll ``check`` until true; fail naming the part with its log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        # Only existence here: right after fork the child's cmdline is still ours.
        if pid is not None and not alive(pid):
            _reap(pid)
            raise SiteError(f"site part {name} exited during start-up: {log_tail(log_path)}")
        time.sleep(0.5)
    raise SiteError(f"site part {name} not healthy after {timeout:.0f}s: {log_tail(log_path)}")


def run(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 60,
    check: bool = True, input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
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
