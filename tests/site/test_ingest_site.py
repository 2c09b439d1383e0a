"""Ingestion on the real site's S3 endpoint: a killed ingest leaves nothing partial and no
multipart upload, and the next one resumes; unchanged data is not read again; quarantine
and policy refusals through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

import boto3
import fsspec
import pytest

from aifactory.tasks.core.config import Profile
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.stages.ingest import list_snapshots
from tests.site.conftest import AIF, REPO, aif, child_environ

pytestmark = pytest.mark.site


def _s3(profile: Profile) -> Any:
    so = profile.storage_options("s3://aif-lake")  # the platform's (its secret: a file)
    return boto3.client("s3", endpoint_url=so["client_kwargs"]["endpoint_url"],
                        aws_access_key_id=so.get("key"), aws_secret_access_key=so.get("secret"),
                        region_name=so["client_kwargs"]["region_name"])  # fmt: skip


def _fs(profile: Profile) -> Any:
    fs, _ = fsspec.core.url_to_fs("s3://aif-lake", **profile.storage_options("s3://aif-lake"))
    fs.invalidate_cache()
    return fs


@pytest.fixture()
def prefix(site_profile: Profile, request: pytest.FixtureRequest) -> Any:
    fs = _fs(site_profile)
    dest = f"aif-lake/startup-a/inbox/{request.node.name}"
    if fs.exists(dest):
        fs.rm(dest, recursive=True)
    yield dest
    if fs.exists(dest):
        fs.rm(dest, recursive=True)


def test_killed_ingest_leaves_no_partial_file_and_resumes(
    site_profile: Profile, prefix: str
) -> None:
    so = site_profile.storage_options("s3://x")
    seed = int(time.time() * 1000) % 1_000_000  # new content: the lake keeps old snapshots
    generate_mobility(f"s3://{prefix}", so, seed=seed, rows=2_400_000, objects=6)
    s3 = _s3(site_profile)
    lake = site_profile.lake_url_for("startup-a")  # the default start-up's prefix
    before = {s.snapshot_id for s in list_snapshots(lake, "mobility-trips", so)}
    proc = subprocess.Popen(
        [AIF, "ingest", "--profile", "site", "--dataspace", f"s3://{prefix}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env=child_environ(),
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[1/6]" in line:  # one object committed, another one in flight
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    time.sleep(0.5)
    # no incomplete multipart upload anywhere in the lake, no new snapshot visible
    assert not s3.list_multipart_uploads(Bucket="aif-lake").get("Uploads")
    after = {s.snapshot_id for s in list_snapshots(lake, "mobility-trips", so)}
    assert after == before
    # the next run resumes: the committed object is not read again
    res = aif("ingest", "--profile", "site", "--dataspace", f"s3://{prefix}")
    assert res.returncode == 0, res.stdout + res.stderr
    listed = next(ln for ln in res.stdout.splitlines() if "objects listed" in ln)
    reused = int(listed.split("objects listed: ")[1].split(" unchanged")[0])
    assert 1 <= reused < 6, listed
    snap = next(s for s in list_snapshots(lake, "mobility-trips", so)
                if s.snapshot_id not in before)  # fmt: skip
    assert snap.lake_url.startswith("s3://aif-lake/startup-a/snapshots/"), snap.lake_url
    assert snap.rows == 2_400_000 and len(snap.objects_read) == 6 - reused
    fs = _fs(site_profile)
    for o in snap.objects:  # every object whole: data and record
        base = o.lake_path.removeprefix("s3://").removesuffix(".parquet")
        assert fs.exists(f"{base}.json") and fs.size(o.lake_path) > 0


def test_unchanged_reingest_reads_nothing(site_profile: Profile) -> None:
    args = ("ingest", "agriculture-fields", "--profile", "site", "--startup", "startup-b")
    first = aif(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    again = aif(*args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already committed: nothing changed, no object read" in again.stdout
    assert "(0 objects read)" in again.stdout.splitlines()[-1]


def test_quarantine_and_strict_on_site(site_profile: Profile, prefix: str) -> None:
    fs = _fs(site_profile)
    prefix = prefix.replace("/startup-a/", "/startup-b/")  # startup-b's own area
    if fs.exists(prefix):
        fs.rm(prefix, recursive=True)
    src = sorted(fs.glob("aif-dataspace/agriculture/fields/*.csv"))
    for o in src:
        fs.copy(o, f"{prefix}/{o.rsplit('/', 1)[-1]}")
    victim = f"{prefix}/part-00001.csv"
    nonce = str(time.time_ns()).encode()  # new content: the lake keeps old snapshots
    fs.pipe_file(victim, fs.cat_file(victim).replace(b'"maize"', b'"ma\xefze' + nonce + b'"', 1))
    args = ("ingest", "agriculture-fields", "--profile", "site", "--startup", "startup-b",
            "--dataspace", f"s3://{prefix}/*.csv")  # fmt: skip
    strict = aif(*args)
    assert strict.returncode == 1 and len(strict.error_lines) == 1, strict.stderr
    assert "part-00001.csv: column 'crop': expected UTF-8 text" in strict.error_lines[0]
    res = aif(*args, "--quarantine")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "quarantined 1 object(s)" in res.stdout and "1 quarantined" in res.stdout
    snaps = list_snapshots(  # startup-b's snapshots live under its own prefix
        site_profile.lake_url_for("startup-b"), "agriculture-fields",
        site_profile.storage_options("s3://x"),
    )  # fmt: skip
    snap = next(s for s in snaps if s.source_url.endswith(f"{prefix}/*.csv"))
    assert [q.key for q in snap.quarantined] == [victim] and len(snap.objects) == len(src) - 1
    assert fs.exists(f"{snap.lake_url.removeprefix('s3://')}/quarantine.json")


def test_policy_refusal_on_site(site_profile: Profile) -> None:
    res = aif("ingest", "health-records", "--profile", "site", "--startup", "startup-b")
    assert res.returncode == 3 and len(res.error_lines) == 1, res.stderr
    assert "refused by policy.allowed_startups" in res.error_lines[0]
    res = aif("ingest", "health-records", "--profile", "site", "--startup", "startup-c",
              "--purpose", "insurance-pricing")  # fmt: skip
    assert res.returncode == 3 and "refused by startup.purposes" in res.error_lines[0]
