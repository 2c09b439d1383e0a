"""Ctrl-C during preprocessing on a LocalCluster (issue 16, item 4): the worker processes
ignore the terminal's SIGINT (each printed a 30-line KeyboardInterrupt traceback), and the
flow's process closes the cluster quietly and at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from aifactory.tasks.core.config import DaskSpec
from aifactory.tasks.doors.dask_cluster import open_cluster

SCRIPT = """
import sys, time
from aifactory.tasks.core.config import DaskSpec
from aifactory.tasks.doors.dask_cluster import open_cluster
from aifactory.tasks.doors.dask_dispatch import dispatch


def partition(i):
    print("PARTITION", i, flush=True)
    for _ in range(300):  # busy for 30 s: the close has to kill it
        time.sleep(0.1)
    return i


if __name__ == "__main__":
    spec = DaskSpec(kind="local", workers=2, cores=1, memory="1GiB")
    try:
        with open_cluster(spec, account="a", job_name="j", slurm=None,
                          log=lambda m: None) as (client, _):
            dispatch(client, partition, [(f"p-{i}", (i,)) for i in range(4)])
    except KeyboardInterrupt:
        print("aif: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
"""


def _sigint_handler() -> object:
    return signal.getsignal(signal.SIGINT)


def test_local_workers_ignore_sigint_and_the_flow_keeps_its_handler() -> None:
    before = signal.getsignal(signal.SIGINT)
    spec = DaskSpec(kind="local", workers=1, cores=1, memory="1GiB")
    with open_cluster(spec, account="a", job_name="j", slurm=None, log=lambda m: None) as (
        client,
        _,
    ):
        assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C still reaches the flow
        (seen,) = client.run(_sigint_handler).values()
    assert seen == signal.SIG_IGN


def test_ctrl_c_during_partitions_closes_the_cluster_quietly(tmp_path: Path) -> None:
    script = tmp_path / "interrupt_me.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("PARTITION"):
                time.sleep(1.0)
                os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
                break
        t0 = time.monotonic()
        lines += proc.stdout.readlines()
        proc.wait(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines)
    assert proc.returncode == 130, out
    assert [ln for ln in lines if not ln.startswith("PARTITION")] == ["aif: interrupted\n"], out
    assert took < 15, f"the cluster took {took:.1f} s to close"
    deadline = time.monotonic() + 10
    while _alive_in_group(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive_in_group(proc.pid), "a Dask worker process outlived the interrupted flow"


def _alive_in_group(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that still run (a zombie left to init is not)."""
    import psutil

    alive = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (OSError, psutil.Error):
            continue
    return alive
