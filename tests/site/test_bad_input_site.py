"""Bad input on the real site: one clear line, non-zero exit, nothing half-written,
no Slurm job left behind."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from aifactory.tasks.core.config import Profile
from tests.site.conftest import aif

pytestmark = pytest.mark.site


def _lake_listing(profile: Profile) -> set[str]:
    """What readers can see: everything but the content-addressed object files (a failed
    snapshot may leave whole, committed objects there for the next run to reuse) and the
    policy audit trail (every decision is appended, also for failed runs)."""
    lake = profile.lake.url
    fs, root = fsspec.core.url_to_fs(lake, **profile.storage_options(lake))
    fs.invalidate_cache()
    return {p for p in fs.find(root) if "/objects/" not in p and "/audit/" not in p}


def _our_jobs(profile: Profile) -> list[str]:
    from aifactory.tasks.doors.slurm import SlurmClient

    out = SlurmClient(env=profile.child_env()).run(["squeue", "-h", "-o", "%i %j"])
    return [ln for ln in out.splitlines() if "aif-" in ln]


@pytest.fixture()
def bad_prefix(site_profile: Profile, request: pytest.FixtureRequest) -> Any:
    """A copy of two data-space objects under a fresh prefix, for the test to spoil."""
    src = site_profile.dataset_url(site_profile.dataset_entry())
    so = site_profile.storage_options(src)
    fs, src_path = fsspec.core.url_to_fs(src, **so)
    objs = sorted(fs.glob(f"{src_path}/*.parquet"))[:2]
    dest = f"aif-lake/startup-a/inbox/{request.node.name}"
    fs.rm(dest, recursive=True) if fs.exists(dest) else None
    for o in objs:
        fs.copy(o, f"{dest}/{o.rsplit('/', 1)[-1]}")
    yield fs, dest
    fs.rm(dest, recursive=True)


def _assert_clean_failure(res: Any, before: set[str], profile: Profile, *needles: str) -> None:
    assert res.returncode != 0, res.stdout
    assert len(res.error_lines) == 1, res.stderr
    line = res.error_lines[0]
    for n in needles:
        assert n in line, line
    assert _lake_listing(profile) == before, "the failed run added to the lake"
    assert not _our_jobs(profile), "a failed run left Slurm jobs behind"


def test_corrupt_object_fails_ingest(site_profile: Profile, bad_prefix: Any) -> None:
    fs, dest = bad_prefix
    victim = sorted(fs.glob(f"{dest}/*.parquet"))[1]
    data = fs.cat_file(victim)
    fs.pipe_file(victim, data[: len(data) // 2])  # truncated: footer gone
    before = _lake_listing(site_profile)
    res = aif("run", "--profile", "site", "--dataspace", f"s3://{dest}")
    _assert_clean_failure(res, before, site_profile, victim.rsplit("/", 1)[-1])


def test_missing_column_fails_ingest(site_profile: Profile, bad_prefix: Any) -> None:
    fs, dest = bad_prefix
    victim = sorted(fs.glob(f"{dest}/*.parquet"))[0]
    table = pq.read_table(io.BytesIO(fs.cat_file(victim))).drop(["distance_km"])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe_file(victim, buf.getvalue())
    before = _lake_listing(site_profile)
    res = aif("run", "--profile", "site", "--dataspace", f"s3://{dest}")
    _assert_clean_failure(res, before, site_profile, victim.rsplit("/", 1)[-1], "distance_km")


def test_missing_bucket(site_profile: Profile) -> None:
    before = _lake_listing(site_profile)
    res = aif("run", "--profile", "site", "--dataspace", "s3://no-such-bucket/trips")
    _assert_clean_failure(res, before, site_profile, "no-such-bucket")


def test_unreachable_s3_endpoint(site_profile: Profile) -> None:
    res = aif("run", "--profile", "site", env={"AIF_S3_ENDPOINT": "http://127.0.0.1:9"})
    assert res.returncode != 0 and len(res.error_lines) == 1, res.stderr
    assert "127.0.0.1:9" in res.error_lines[0]


def test_unknown_profile_and_startup() -> None:
    res = aif("run", "--profile", "nope")
    assert res.returncode == 2 and "unknown profile 'nope'" in res.error_lines[0]
    res = aif("run", "--profile", "site", "--startup", "startup-z")
    assert res.returncode == 2 and "unknown start-up 'startup-z'" in res.error_lines[0]


def test_slurm_down(site_profile: Profile, tmp_path: Path) -> None:
    """slurmctld unreachable (a copy of slurm.conf with a dead port): clear error, no jobs."""
    assert site_profile.slurm.conf
    conf = Path(site_profile.slurm.conf).read_text()
    dead = tmp_path / "slurm.conf"
    lines = [ln for ln in conf.splitlines() if not ln.startswith("SlurmctldPort")]
    dead.write_text("\n".join([*lines, "SlurmctldPort=6999"]) + "\n")
    for name in ("gres.conf", "cgroup.conf"):
        p = Path(site_profile.slurm.conf).with_name(name)
        if p.exists():
            (tmp_path / name).write_text(p.read_text())
    res = aif(
        "run",
        "--profile",
        "site",
        "--epochs",
        "2",
        env={"AIF_SLURM__CONF": str(dead), "AIF_TRAINING__LR": "0.0031"},
    )
    assert res.returncode != 0 and len(res.error_lines) == 1, res.stderr
    assert "slurm" in res.error_lines[0].lower()
    assert not _our_jobs(site_profile)


def test_failing_training_job(site_profile: Profile) -> None:
    res = aif(
        "run",
        "--profile",
        "site",
        "--epochs",
        "2",
        env={"AIF_TRAINING__SETUP": '["echo about to fail", "exit 3"]'},
    )
    assert res.returncode != 0 and len(res.error_lines) == 1, res.stderr
    line = res.error_lines[0]
    assert "FAILED" in line and "3" in line and "about to fail" in line, line
    assert not _our_jobs(site_profile)
