"""Start-ups as tenants on the real site: admission before anything runs, the GPU-hour
budget, each start-up's own lake prefix and account, and Slurm's own GPU-minute caps."""

from __future__ import annotations

import time

import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.doors.slurm import SlurmClient
from tests.site.conftest import aif

pytestmark = pytest.mark.site


def _jobs_since(profile: Profile, account: str, since: float) -> list[str]:
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 2))
    args = ["sacct", "-a", "-X", "-n", "-P", "--accounts", account, "--starttime", start,
            "--format", "JobID,JobName"]  # fmt: skip
    out = SlurmClient(env=profile.child_env()).run(args)
    return [ln for ln in out.splitlines() if "|aif-" in ln]


def test_unapproved_declaration_is_refused_before_anything(site_profile: Profile) -> None:
    t0 = time.time()
    res = aif("run", "--profile", "site", "--startup", "startup-c", timeout=300)
    assert res.returncode == 5 and len(res.error_lines) == 1, res.stdout + res.stderr
    line = res.error_lines[0]
    assert "admission.declaration" in line and "startup-c (project readmission-risk)" in line
    assert "[1/4] ingest" not in res.stdout  # no byte ingested
    assert not _jobs_since(site_profile, "startup-c", t0), "a job was submitted for startup-c"


def test_gpu_hour_budget_smaller_than_one_job_is_refused(site_profile: Profile) -> None:
    budget = {
        "AIF_STARTUPS__STARTUP_A__GPU_HOURS_BUDGET": "0.1",  # one job asks 1 GPU x 20 min
        "AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000),  # a new run key: not reused
    }
    res = aif("run", "--profile", "site", "--epochs", "2", env=budget, timeout=600)
    assert res.returncode == 5 and len(res.error_lines) == 1, res.stdout + res.stderr
    line = res.error_lines[0]
    assert "refused by admission.budget: GPU-hours used " in line, line
    assert "since now-365days, remaining " in line and " of 0.1, requested 0.33 " in line, line
    assert "Slurm job aif-train-" not in res.stdout  # refused before sbatch


def test_site_up_set_the_gpu_minute_caps(site_profile: Profile) -> None:
    client = SlurmClient(env=site_profile.child_env())
    want = {"startup-a": 500, "startup-b": 500, "startup-c": 100}
    assert {k: site_profile.startups[k].gpu_hours_budget for k in want} == want
    for account, hours in want.items():
        out = client.run(["sacctmgr", "-n", "-P", "show", "assoc", f"account={account}",
                          "format=Account,User,GrpTRESMins"])  # fmt: skip
        assert f"{account}||gres/gpu={hours * 60}" in out.splitlines(), out


def test_another_startups_prefix_is_refused(site_profile: Profile) -> None:
    theirs = "s3://aif-lake/startup-b/objects/agriculture-fields"
    res = aif("ingest", "--profile", "site", "--dataspace", theirs)
    assert res.returncode == 6 and len(res.error_lines) == 1, res.stdout + res.stderr
    assert res.error_lines[0].startswith(
        "aif: error: isolation.s3_prefix: start-up startup-a may not use "
        "s3://aif-lake/startup-b/...: that prefix belongs to startup-b"
    )
    res = aif(
        "snapshot", "ls", "--profile", "site", env={"AIF_LAKE__URL": "s3://aif-lake/startup-c"}
    )
    assert res.returncode == 6 and "that prefix belongs to startup-c" in res.error_lines[0]


def test_another_spelling_of_another_startups_prefix_is_refused(site_profile: Profile) -> None:
    """Issue 15, item 4: the place fsspec would read is compared, not the URL's text, and a
    run's environment never changes tenancy (B was given A's prefix by two variables)."""
    url = "simplecache::s3a://aif-lake/startup-a/objects/mobility-trips"
    res = aif("ingest", "--profile", "site", "--startup", "startup-b", "--dataspace", url)
    assert res.returncode == 6 and len(res.error_lines) == 1, res.stdout + res.stderr
    assert res.error_lines[0].startswith(
        "aif: error: isolation.s3_prefix: start-up startup-b may not use "
        "s3://aif-lake/startup-a/...: that prefix belongs to startup-a"
    )
    moved = {"AIF_STARTUPS__STARTUP_A__S3_PREFIX": "moved",
             "AIF_STARTUPS__STARTUP_B__S3_PREFIX": "startup-a"}  # fmt: skip
    res = aif("ingest", "--profile", "site", "--startup", "startup-b", env=moved)
    assert res.returncode == 6 and len(res.error_lines) == 1, res.stdout + res.stderr
    assert res.error_lines[0].startswith(
        "aif: error: isolation.overrides: AIF_STARTUPS__STARTUP_A__S3_PREFIX, "
        "AIF_STARTUPS__STARTUP_B__S3_PREFIX may not change "
    )


def test_another_startups_account_is_refused(site_profile: Profile) -> None:
    t0 = time.time()
    res = aif("run", "--profile", "site", env={"AIF_STARTUPS__STARTUP_A__ACCOUNT": "startup-b"})
    assert res.returncode == 6 and len(res.error_lines) == 1, res.stdout + res.stderr
    assert res.error_lines[0].startswith(
        "aif: error: isolation.account: start-up startup-a may not run under Slurm account "
        "startup-b: that account belongs to startup-b"
    )
    assert not _jobs_since(site_profile, "startup-b", t0)


def test_snapshots_are_listed_per_startup(site_profile: Profile) -> None:
    args = ("--profile", "site", "--startup", "startup-b")
    assert aif("ingest", "agriculture-fields", *args).returncode == 0
    res = aif("snapshot", "ls", "--dataset", "agriculture-fields", *args)
    assert res.returncode == 0, res.stderr
    rows = res.stdout.splitlines()[1:]
    assert rows and all(ln.rstrip().split("  ")[-1].startswith("startup-b / ") for ln in rows)
