"""Usage report: GPU/CPU hours per account from sacct's allocations, priced."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aifactory.tasks.core.config import Startup
from aifactory.tasks.doors.slurm import SlurmClient
from aifactory.tasks.jobs.usage import collect, job_hours, owners, parse_tres, priced_rows


def test_parse_tres() -> None:
    t = parse_tres("billing=2,cpu=2,gres/gpu=1,mem=2G,node=1")
    assert t["cpu"] == 2 and t["gres/gpu"] == 1 and "mem" not in t


def test_collect_and_price(tmp_path: Path) -> None:
    sacct = tmp_path / "sacct"
    sacct.write_text(
        "#!/bin/sh\n"
        "echo 'JobID|Account|AllocTRES|ElapsedRaw'\n"
        "echo '10|startup-a|billing=1,cpu=1,gres/gpu=1,mem=2G,node=1|3600'\n"
        "echo '11|startup-a|billing=2,cpu=2,mem=2G,node=1|1800'\n"
        "echo '12|startup-b|billing=1,cpu=4,gres/gpu=2,mem=8G,node=1|900'\n"
        "echo '13|startup-b||0'\n"  # pending, never allocated
    )
    sacct.chmod(0o755)
    usages = collect(SlurmClient(bin_dir=str(tmp_path)), "now-1days")
    a, b = usages
    assert (a.account, a.jobs, a.cpu_hours, a.gpu_hours) == ("startup-a", 2, 2.0, 1.0)
    assert (b.account, b.gpu_hours, b.cpu_hours) == ("startup-b", 0.5, 1.0)
    rows = priced_rows(usages, gpu_rate=2.0, cpu_rate=0.1, cloud_gpu_rate=4.0)
    assert rows[0]["hpc_cost_eur"] == "2.2000" and rows[0]["cloud_gpu_cost_eur"] == "4.0000"
    assert (rows[0]["startup"], rows[0]["project"]) == ("-", "-")  # no profile given


def test_job_hours_of_a_run_in_one_sacct_call(tmp_path: Path) -> None:
    """A run's summary: its jobs' CPU- and GPU-hours and final states."""
    sacct = tmp_path / "sacct"
    sacct.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        "echo 'JobID|AllocTRES|ElapsedRaw|State'\n"
        "echo '21|billing=1,cpu=2,gres/gpu=1,mem=2G,node=1|5400|COMPLETED'\n"
        "echo '22|billing=1,cpu=1,mem=1G,node=1|1800|CANCELLED by 0'\n"
        "echo '99|billing=1,cpu=8,mem=1G,node=1|3600|COMPLETED'\n"  # not asked for
    )
    sacct.chmod(0o755)
    cpu_h, gpu_h, states = job_hours(SlurmClient(bin_dir=str(tmp_path)), ["21", "22"])
    assert (cpu_h, gpu_h) == (3.5, 1.5)
    assert states == {"21": "COMPLETED", "22": "CANCELLED"}
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 1 and "-j 21,22" in calls[0], calls
    assert job_hours(SlurmClient(bin_dir=str(tmp_path)), []) == (0.0, 0.0, {})


def test_rows_per_startup_and_project() -> None:
    """The project of each account comes from the profile's start-ups; a start-up that ran
    nothing has its row of zeros; an account no start-up owns is shown as such."""
    from aifactory.tasks.jobs.usage import Usage

    startups = {
        "startup-a": Startup(account="acct-a", project="mobility-eta"),
        "startup-b": Startup(account="acct-b", project="agri-yield"),
    }
    who = owners(startups)
    assert who == {"acct-a": ("startup-a", "mobility-eta"), "acct-b": ("startup-b", "agri-yield")}
    usages = [Usage("acct-a", jobs=3, cpu_hours=2.0, gpu_hours=1.0), Usage("stray", jobs=1)]
    rows = priced_rows(usages, gpu_rate=2.0, cpu_rate=0.1, cloud_gpu_rate=4.0, owner_of=who)
    assert [(r["startup"], r["project"], r["account"], r["jobs"]) for r in rows] == [
        ("startup-a", "mobility-eta", "acct-a", "3"),
        ("startup-b", "agri-yield", "acct-b", "0"),
        ("-", "-", "stray", "1"),
    ]
    assert list(rows[0]) == ["startup", "project", "account", "jobs", "cpu_hours", "gpu_hours",
                             "hpc_cost_eur", "cloud_gpu_cost_eur"]  # fmt: skip
    assert rows[0]["hpc_cost_eur"] == "2.2000" and rows[1]["gpu_hours"] == "0.0000"
    shared = owners({**startups, "startup-c": Startup(account="acct-a", project="x")})
    assert shared["acct-a"] == ("startup-a,startup-c", "mobility-eta,x")


def test_report_usage_table(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    from aifactory.tasks.cli import main

    sacct = tmp_path / "sacct"
    sacct.write_text(
        "#!/bin/sh\necho 'JobID|Account|AllocTRES|ElapsedRaw'\n"
        "echo '10|startup-c|billing=1,cpu=2,gres/gpu=1,mem=2G,node=1|3600'\n"
    )
    sacct.chmod(0o755)
    # The site profile reads the platform's object-store secret from a file that only a
    # site that is up has written: this test needs no site.
    monkeypatch.setenv("AIF_OBJECT_STORE__KEY", "platform")
    monkeypatch.setenv("AIF_OBJECT_STORE__SECRET", "platform-secret")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert main(["report", "usage", "--profile", "site", "--no-artifact"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["startup", "project", "account", "jobs", "cpu_hours", "gpu_hours",
                                "hpc_cost_eur", "cloud_gpu_cost_eur"]  # fmt: skip
    table = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert table["startup-c"][:6] == ["startup-c", "readmission-risk", "startup-c", "1", "2.0000",
                                      "1.0000"]  # fmt: skip
    assert table["startup-a"][1:4] == ["mobility-eta", "startup-a", "0"]
