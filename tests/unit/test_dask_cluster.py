"""Worker environment and scheduler settings of the Dask clusters made from the profile."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from aifactory.tasks.cli import main
from aifactory.tasks.core.config import DaskSpec
from aifactory.tasks.doors.dask_allocation import render_allocation_script
from aifactory.tasks.doors.dask_cluster import job_prologue, open_cluster, render_worker_script

PAD = "export MALLOC_TOP_PAD_=67108864"


def test_worker_job_sets_the_malloc_pad_before_the_profiles_own_lines() -> None:
    spec = DaskSpec(kind="slurm", job_script_prologue=["module load python/3.11"])
    for script in (
        render_worker_script(spec, "startup-a", "aif-dask"),
        render_allocation_script(spec, "startup-a", "aif-dask", "/shared/s.json", "/shared"),
    ):
        lines = script.splitlines()
        starts = [i for i, line in enumerate(lines) if "distributed.cli.dask_worker" in line]
        assert starts, script
        # aifactory's line first, so that a profile line can override it
        assert lines.index(PAD) < lines.index("module load python/3.11") < starts[0]


def test_pad_is_a_size_or_off() -> None:
    assert job_prologue(DaskSpec(malloc_top_pad="16MiB")) == ["export MALLOC_TOP_PAD_=16777216"]
    off = DaskSpec(kind="slurm", malloc_top_pad=None, job_script_prologue=["true"])
    assert job_prologue(off) == ["true"]
    assert "MALLOC_TOP_PAD_" not in render_worker_script(off, "startup-a", "aif-dask")


def test_bad_pad_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIF_DASK__MALLOC_TOP_PAD", "lots")
    assert main(["run", "--profile", "site", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aif: error: environment variable AIF_DASK__MALLOC_TOP_PAD: "
                          "dask.malloc_top_pad: ")  # fmt: skip
    assert "not a size such as 64MiB (got 'lots')" in err and "\n" not in err


def _env() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")}


def test_local_workers_get_the_pad_and_the_flow_keeps_its_environment() -> None:
    before = dict(os.environ)
    spec = DaskSpec(kind="local", workers=1, cores=1, memory="1GiB", malloc_top_pad="32MiB")
    with open_cluster(spec, account="a", job_name="j", slurm=None, log=lambda m: None) as (
        client,
        _,
    ):
        (seen,) = client.run(_env).values()
        extensions = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.extensions))
    assert seen == {"MALLOC_TOP_PAD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": "65536"}
    assert "stealing" not in extensions  # the dispatcher places partitions itself
    # Dask's nannies set OMP_NUM_THREADS=1 and MALLOC_* in this process before spawning;
    # a local training run started later must not inherit them.
    assert dict(os.environ) == before


def test_dask_jobqueue_submits_and_cancels_through_our_door(tmp_path: Any) -> None:
    """dask-jobqueue's sbatch and scancel calls go through the Slurm door (its environment,
    its errors), and the flow's own environment is never rewritten. Fails if dask-jobqueue
    stops routing its commands through ``Job._call`` (the override would no longer apply)."""
    from aifactory.tasks.doors.dask_cluster import door_cluster_class, slurm_cluster_kwargs
    from aifactory.tasks.doors.slurm import SlurmClient

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", 'echo "Submitted batch job 4242"'), ("scancel", "true")):
        exe = bin_dir / name
        exe.write_text(
            f'#!/bin/sh\necho "{name} $* conf=$SLURM_CONF" >> "{tmp_path}/calls"\n{body}\n'
        )
        exe.chmod(0o755)
    door = SlurmClient(env={"SLURM_CONF": "/site/slurm.conf"}, bin_dir=str(bin_dir))
    before = dict(os.environ)
    spec = DaskSpec(kind="slurm", workers=1)
    logs = tmp_path / "logs with space"
    kwargs = slurm_cluster_kwargs(spec, "startup-a", "aif-dask-t", str(logs))
    cluster = door_cluster_class(door, str(logs))(**kwargs)
    script = cluster.job_script()
    assert "#SBATCH -e aif-dask-t-%J.err" in script and str(logs) not in script
    try:
        cluster.scale(jobs=1)
        deadline = time.monotonic() + 20
        while "sbatch" not in _read(tmp_path / "calls") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dict(os.environ) == before
    finally:
        cluster.close(timeout=20)
    calls = _read(tmp_path / "calls")
    assert f" --chdir={logs} " in calls and "conf=/site/slurm.conf" in calls, calls
    assert calls.startswith("sbatch --export=PATH,"), calls  # the allowed environment only
    assert "scancel 4242 conf=/site/slurm.conf" in calls, calls


def _read(path: Any) -> str:
    return path.read_text() if path.exists() else ""


def test_worker_scripts_quote_a_python_path_with_a_space(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clone under a folder with a space: its venv's python must stay one word in the
    worker job scripts (dask-jobqueue and the allocation template do not quote it)."""
    import sys

    monkeypatch.setattr(sys, "executable", "/tmp/ci final/aif/.venv/bin/python")
    spec = DaskSpec(kind="slurm", workers=1)
    script = render_worker_script(spec, "startup-a", "aif-dask-x")
    assert "'/tmp/ci final/aif/.venv/bin/python' -m distributed.cli.dask_worker" in script
    alloc = render_allocation_script(spec, "startup-a", "aif-dask-x", "/s/sched.json", "/s")
    assert "'/tmp/ci final/aif/.venv/bin/python' -m distributed.cli.dask_scheduler" in alloc


def test_a_dead_worker_job_is_reported_dead_with_its_log(tmp_path: Any) -> None:
    """Issue 15: a worker job that died at start (exit 127: its Python not found) was
    reported after 180 s as 'jobs [] still queued'. Now: its state, exit code and log."""
    from aifactory.tasks.doors.dask_cluster import dead_worker_jobs
    from aifactory.tasks.doors.slurm import SlurmClient

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(
        '#!/bin/sh\necho "JobID|State|ExitCode|Elapsed"\n'
        'echo "31|FAILED|127:0|00:00:01"\necho "32|FAILED|127:0|00:00:01"\n'
        'echo "33|RUNNING|0:0|00:00:09"\n'
    )
    (bin_dir / "sacct").chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "aif-dask-t-31.err").write_text("line one\n/x/my venv/bin/python: not found\n\n")
    got = dead_worker_jobs(SlurmClient(bin_dir=str(bin_dir)), "aif-dask-t", "2026-01-01",
                           str(logs))  # fmt: skip
    assert got.startswith("job 31 FAILED (exit 127:0) after 00:00:01, log: line one | /x/my "
                          "venv/bin/python: not found; job 32 FAILED")  # fmt: skip
    assert "33" not in got and "(empty)" in got
    (bin_dir / "sacct").write_text('#!/bin/sh\necho "sacct: error: no database" >&2; exit 1\n')
    assert dead_worker_jobs(SlurmClient(bin_dir=str(bin_dir)), "aif-dask-t", "x", None) == ""
