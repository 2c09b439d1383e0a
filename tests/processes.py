"""Processes that tests start and must not leave behind."""

from __future__ import annotations

from pathlib import Path

import psutil


def prefect_servers_under(folder: Path) -> list[int]:
    """Pids of running Prefect servers whose PREFECT_HOME lies under ``folder``."""
    root = str(folder.resolve())
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if "prefect" not in " ".join(cmd) or "server" not in cmd:
                continue
            home = proc.environ().get("PREFECT_HOME", "")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if home == root or home.startswith(root + "/"):
            found.append(proc.pid)
    return found
