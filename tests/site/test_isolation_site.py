"""Tenancy enforced by the site's object store (Ceph RGW), not by aifactory's checks: a
start-up's own identity, with the temporary credentials its runs get, is refused by the
gateway everywhere outside its lake prefix and the data sets its usage policies grant;
a training script that tries to read another start-up's lake fails, and the run says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from aifactory.infra.site.layout import Site
from aifactory.infra.site.manager import site_root
from aifactory.tasks.core.config import Profile
from aifactory.tasks.core.home import site_dir
from tests.site.conftest import REPO, aif, child_environ
from tests.site.test_projects_site import APPROVED

pytestmark = pytest.mark.site


def _client(profile: Profile, startup: str | None = None) -> Any:
    so = (profile.for_startup(startup) if startup else profile).storage_options("s3://x")
    return boto3.client(
        "s3", endpoint_url=so["client_kwargs"]["endpoint_url"], region_name="us-east-1",
        aws_access_key_id=so["key"], aws_secret_access_key=so["secret"],
        aws_session_token=so.get("token"),
    )  # fmt: skip


def _refused(call: Callable[[], Any]) -> str:
    with pytest.raises(ClientError) as err:
        call()
    return str(err.value.response["Error"]["Code"])


def test_the_gateway_refuses_a_startup_outside_its_grants(site_profile: Profile) -> None:
    platform = _client(site_profile)
    tag = uuid.uuid4().hex[:8]
    theirs, mine = f"startup-b/isolation/{tag}.bin", f"startup-a/isolation/{tag}.bin"
    platform.put_object(Bucket="aif-lake", Key=theirs, Body=b"B's data")
    a = _client(site_profile, "startup-a")
    assert site_profile.for_startup("startup-a").storage_options("s3://x")["key"] != "aif-site-key"
    # Another start-up's lake: read, list, write, delete.
    assert _refused(lambda: a.get_object(Bucket="aif-lake", Key=theirs)) == "AccessDenied"
    assert _refused(lambda: a.list_objects_v2(Bucket="aif-lake", Prefix="startup-b/")) \
        == "AccessDenied"  # fmt: skip
    assert _refused(lambda: a.list_objects_v2(Bucket="aif-lake")) == "AccessDenied"
    assert _refused(lambda: a.put_object(Bucket="aif-lake", Key=theirs, Body=b"A was here")) \
        == "AccessDenied"  # fmt: skip
    assert _refused(lambda: a.delete_object(Bucket="aif-lake", Key=theirs)) == "AccessDenied"
    assert platform.get_object(Bucket="aif-lake", Key=theirs)["Body"].read() == b"B's data"
    # Data-space objects outside its usage policies (health is startup-c's), and writes.
    health = platform.list_objects_v2(Bucket="aif-dataspace", Prefix="health/", MaxKeys=1)
    key = health["Contents"][0]["Key"]
    assert _refused(lambda: a.get_object(Bucket="aif-dataspace", Key=key)) == "AccessDenied"
    assert _refused(lambda: a.put_object(Bucket="aif-dataspace", Key="mobility/trips/x",
                                         Body=b"x")) == "AccessDenied"  # fmt: skip
    # The MLflow artifact bucket and a bucket of its own.
    assert _refused(lambda: a.list_objects_v2(Bucket="aif-mlflow")) == "AccessDenied"
    assert _refused(lambda: a.create_bucket(Bucket=f"startup-a-{tag}")) in (
        "AccessDenied",
        "TooManyBuckets",
    )
    # What it is granted works: its own prefix, the mobility data set.
    a.put_object(Bucket="aif-lake", Key=mine, Body=b"mine")
    assert a.get_object(Bucket="aif-lake", Key=mine)["Body"].read() == b"mine"
    a.delete_object(Bucket="aif-lake", Key=mine)
    trips = a.list_objects_v2(Bucket="aif-dataspace", Prefix="mobility/trips/")
    assert trips["KeyCount"] > 0
    # A forged session token is refused.
    so = site_profile.for_startup("startup-a").storage_options("s3://x")
    forged = boto3.client("s3", endpoint_url=so["client_kwargs"]["endpoint_url"],
                          region_name="us-east-1", aws_access_key_id=so["key"],
                          aws_secret_access_key=so["secret"],
                          aws_session_token=so["token"][:-4] + "AAAA")  # fmt: skip
    assert _refused(lambda: forged.get_object(Bucket="aif-lake", Key=mine))
    platform.delete_object(Bucket="aif-lake", Key=theirs)


def test_a_run_reading_an_ungranted_data_set_is_refused_by_the_store(
    site_profile: Profile,
) -> None:
    # aifactory's own usage-policy check passes on purpose (the profile's data set,
    # mobility-trips, allows startup-a): the run is pointed at a copy of its objects in a
    # part of the data space that no usage policy grants, which the gateway refuses.
    platform = _client(site_profile)
    where = f"restricted/{uuid.uuid4().hex[:8]}"
    first = platform.list_objects_v2(Bucket="aif-dataspace", Prefix="mobility/trips/")
    key = first["Contents"][0]["Key"]
    platform.copy_object(Bucket="aif-dataspace", Key=f"{where}/{key.rsplit('/', 1)[-1]}",
                         CopySource={"Bucket": "aif-dataspace", "Key": key})  # fmt: skip
    url = f"s3://aif-dataspace/{where}/"
    try:
        res = aif("ingest", "--profile", "site", "--dataspace", url)
    finally:
        platform.delete_object(Bucket="aif-dataspace", Key=f"{where}/{key.rsplit('/', 1)[-1]}")
    assert res.returncode != 0 and len(res.error_lines) == 1, res.stdout + res.stderr
    line = res.error_lines[0]
    assert url in line and "access denied by the object store" in line, line
    log = audit_log(site_profile)
    assert any(
        r["startup"] == "startup-a" and r["by"] == "object-store" and url in r["reason"]
        for r in log
    ), log[-3:]  # the refusal is in the operators' audit trail


def audit_log(profile: Profile) -> list[dict[str, Any]]:
    from aifactory.tasks.core.audit import operator_log

    path = operator_log(profile.runs_dir)
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def _startup_b_checkpoint(profile: Profile) -> Path:
    """A checkpoint in a run folder of startup-b, as its jobs leave them (owner, mode 700)."""
    import pwd

    folder = Path(profile.runs_dir) / "train" / f"isolation-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"B's checkpoint")
    pw = pwd.getpwnam("startup-b")
    for p in (folder, folder / "checkpoint.pt"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    folder.chmod(0o700)
    return folder / "checkpoint.pt"


def _as(user: str, *argv: str,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run(["runuser", "-u", user, "--", *argv], capture_output=True, text=True,
                          env={**child_environ(), **(env or {})}, timeout=60)  # fmt: skip


def test_the_kernel_and_slurm_refuse_one_startup_the_others_things(site_profile: Profile) -> None:
    slurm = site_profile.child_env()
    checkpoint = _startup_b_checkpoint(site_profile)
    # The shared filesystem: another start-up's run folder, and listing everyone's.
    got = _as("startup-a", "cat", str(checkpoint))
    assert got.returncode != 0 and "Permission denied" in got.stderr, got
    got = _as("startup-a", "ls", str(Path(site_profile.runs_dir) / "train"))
    assert got.returncode != 0 and "Permission denied" in got.stderr, got
    got = _as("startup-a", "ls", str(site_root(site_dir()) / "ceph"))
    assert got.returncode != 0, got  # the object store's disk and keys
    # Slurm: submitting under another's account, seeing and cancelling another's job.
    got = _as("startup-a", "sbatch", "--account=startup-b", "--wrap=true", env=slurm)
    assert got.returncode != 0 and "Invalid account" in got.stderr, got
    job = subprocess.run(["sbatch", "--parsable", "--uid=startup-b", "--gid=startup-b",
                          "--account=startup-b", "--time=5", "--job-name=aif-isolation",
                          "--chdir=/tmp", "--wrap=sleep 120"], capture_output=True, text=True,
                         env={**child_environ(), **slurm}, check=True).stdout.strip()  # fmt: skip
    try:
        got = _as("startup-a", "scancel", job, env=slurm)
        assert got.returncode != 0 or "denied" in got.stderr.lower(), got
        got = _as("startup-a", "squeue", "-h", "-j", job, env=slurm)
        assert job not in got.stdout, got
        got = _as("startup-a", "scontrol", "show", "job", job, env=slurm)
        assert f"JobId={job}" not in got.stdout, got
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                               text=True, env=child_environ(slurm)).stdout.strip()  # fmt: skip
        assert state in ("PENDING", "RUNNING"), state  # not cancelled by startup-a
    finally:
        subprocess.run(["scancel", job], env={**child_environ(), **slurm})


HOSTILE = '''"""A start-up's trainer that tries to read another start-up's lake."""
import os
import sys

import fsspec

from aifactory.tasks.payloads.job import Job, PayloadError, run_job, storage_options


def train(job: Job) -> None:
    victim = job.config["victim"]
    if os.environ.get("AWS_ACCESS_KEY_ID") == "aif-site-key":
        raise PayloadError("ISOLATION BROKEN: the platform's key is in the job's environment")
    if os.getuid() == 0:
        raise PayloadError("ISOLATION BROKEN: the job runs as root")
    try:
        open(job.config["platform_secret"]).read()
        raise PayloadError("ISOLATION BROKEN: read the platform's secret")
    except PermissionError:
        print("hostile: the platform's secret file refused by the kernel", flush=True)
    import boto3
    guess = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"],
                         aws_access_key_id="aif-site-key",
                         aws_secret_access_key="aif-site-secret", aws_session_token=None)
    try:
        guess.list_objects_v2(Bucket="aif-lake", Prefix="startup-b/")
        raise PayloadError("ISOLATION BROKEN: the old fixed platform secret works")
    except guess.exceptions.ClientError as exc:
        print(f"hostile: the guessed platform key refused: {exc}", flush=True)
    try:
        with open(job.config["checkpoint"], "rb") as fh:
            fh.read()
        raise PayloadError("ISOLATION BROKEN: read another start-up's checkpoint")
    except PermissionError as exc:
        print(f"hostile: checkpoint refused by the kernel: {exc}", flush=True)
    with fsspec.open(victim, "rb", **storage_options(victim)) as fh:  # must raise
        data = fh.read()
    raise PayloadError(f"ISOLATION BROKEN: read {len(data)} bytes of {victim}")


if __name__ == "__main__":
    sys.exit(run_job(train, "hostile"))
'''


def test_a_training_script_cannot_read_another_startups_lake(site_profile: Profile) -> None:
    platform = _client(site_profile)
    victim_key = f"startup-b/isolation/{uuid.uuid4().hex[:8]}/weights.bin"
    platform.put_object(Bucket="aif-lake", Key=victim_key, Body=b"B's weights")
    checkpoint = _startup_b_checkpoint(site_profile)
    # The project's folder: readable by the start-up's user, whose Dask workers import it.
    project = Path(f"/tmp/aif-hostile-{uuid.uuid4().hex[:8]}/hostile project")
    shutil.copytree(REPO / "examples" / "mobility-trips", project,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (project / "train.py").write_text(HOSTILE)
    spec = (project / "aifactory.yaml").read_text()
    spec = spec.replace("  trainer: tabular                 # the platform's reference MLP "
                        "(or script: train.py)\n", "  script: train.py\n")  # fmt: skip
    spec = spec.replace("  config: {epochs: 8, batch_size: 512, lr: 0.002, hidden: [64, 32], "
                        "seed: 1234}",
                        "  config: {victim: " + json.dumps(f"s3://aif-lake/{victim_key}")
                        + ", checkpoint: " + json.dumps(str(checkpoint))
                        + ", platform_secret: "
                        + json.dumps(str(Site(site_root(site_dir())).platform_secret_file))
                        + ", seed: " + str(int(time.time())) + "}")  # fmt: skip
    spec = spec.replace("  flavour: tabular                 # the reference MLP's own format",
                        "  flavour: sklearn")  # fmt: skip
    assert "script: train.py" in spec and "victim" in spec and "sklearn" in spec
    (project / "aifactory.yaml").write_text(spec)
    res = aif("run", "--profile", "site", "--project", str(project), timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "ISOLATION BROKEN" not in out, out
    assert "hostile: checkpoint refused by the kernel" in out, out
    assert "hostile: the platform's secret file refused by the kernel" in out, out
    assert "hostile: the guessed platform key refused" in out, out
    assert "Access Denied" in out or "AccessDenied" in out or "Forbidden" in out, out
    assert platform.get_object(Bucket="aif-lake", Key=victim_key)["Body"].read() == b"B's weights"
    platform.delete_object(Bucket="aif-lake", Key=victim_key)
    shutil.rmtree(project.parent, ignore_errors=True)


HOSTILE_FEATURES = """
import os as _aif_os
with open({mark!r}, "a") as _aif_fh:  # runs wherever this module is imported
    _aif_fh.write(f"features-import {{_aif_os.getuid()}}\\n")
"""

HOSTILE_SAVE = """    import os
    inner = pickle.dumps(model)

    class Evil:  # unpickling it runs code: records who loaded the model
        def __reduce__(self):
            expr = ("(open({mark!r}, 'a').write('unpickle %d\\\\n' % __import__('os').getuid()),"
                    " __import__('pickle').loads(" + repr(inner) + "))[1]")
            return (eval, (expr,))

    job.save("model.pkl", pickle.dumps(Evil()))
    os.symlink({secret!r}, job.run_dir / "code" / "leak.json")  # for root to copy to MLflow
"""


def test_the_orchestrator_never_runs_or_follows_a_startups_code(site_profile: Profile) -> None:
    """The orchestrator (root) only reads a start-up's code: its features.py is imported and
    its model unpickled only by the start-up's own user (Dask workers, the load check), and a
    link that its job planted in its folder is refused, not copied into MLflow."""
    import pwd

    tag = uuid.uuid4().hex[:8]
    root = Path(f"/tmp/aif-hostile-{tag}")  # a folder the start-up's user can reach
    root.mkdir(mode=0o755)
    try:
        mark = root / "who-ran-it"
        mark.touch()
        mark.chmod(0o666)
        project = root / "project"
        shutil.copytree(REPO / "examples" / "health-readmission", project,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        feats = project / "features.py"
        feats.write_text(feats.read_text() + HOSTILE_FEATURES.format(mark=str(mark)))
        secret = Site(site_root(site_dir())).platform_secret_file
        train = (project / "train.py").read_text()
        save = '    job.save("model.pkl", pickle.dumps(model))\n'
        assert save in train
        train = train.replace(save, HOSTILE_SAVE.format(mark=str(mark), secret=str(secret)))
        (project / "train.py").write_text(train)
        spec = (project / "aifactory.yaml").read_text()
        spec = spec.replace("params: {reference_year: 2025}", f"params: {{reference_year: 2025, "
                            f"tag: {tag}}}")  # fmt: skip
        (project / "aifactory.yaml").write_text(spec)
        res = aif("run", "--profile", "site", "--project", str(project), env=APPROVED, timeout=900)
        out = res.stdout + res.stderr
        assert res.returncode != 0, out
        assert "code/leak.json: is a symbolic link" in out, out[-3000:]
        assert secret.read_text().strip() not in out
        uid = pwd.getpwnam("startup-c").pw_uid
        ran = mark.read_text().split("\n")
        assert f"unpickle {uid}" in ran, ran  # the load check, as the start-up
        assert f"features-import {uid}" in ran, ran  # its Dask workers
        assert not [line for line in ran if line.endswith(" 0")], ran  # never as root
    finally:
        shutil.rmtree(root, ignore_errors=True)
