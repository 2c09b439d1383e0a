"""The site's object store without a running Ceph: ceph.conf, the policies written from
the site profile and the catalog, the moto snapshot's import, and a start-up's temporary
credentials (against in-process moto, whose STS answers GetSessionToken)."""

from __future__ import annotations

import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Any

import boto3
import pytest

from aifactory.infra.site import ceph, services
from aifactory.infra.site.layout import BUCKETS, S3_KEY, Site
from aifactory.tasks.core.config import _walltime_s, load_profile
from aifactory.tasks.core.errors import ConfigError
from aifactory.tasks.doors import s3_identity
from tests.unit.conftest import MotoS3


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def test_ceph_conf_renders_every_placeholder_and_keeps_its_identity(site: Site) -> None:
    ceph.render(site)
    path = ceph.conf_path(site)
    text = path.read_text()
    assert "$fsid" not in text and "$dir" not in text and "$sts_key" not in text
    assert not re.search(r"\$\$", text)  # Ceph's own $cluster/$name stay single
    assert "keyring = " + str(ceph.ceph_dir(site) / "keys") + "/$cluster.$name.keyring" in text
    assert f"mon host = v2:127.0.0.1:{site.mon_port}" in text
    assert f"beast endpoint=127.0.0.1:{site.s3_port}" in text
    # It names the STS key: readable by its owner only, like the key itself.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = (ceph.ceph_dir(site) / "keys" / "sts.key").read_text()
    assert len(key) == 16 and f"rgw sts key = {key}" in text
    fsid = (ceph.ceph_dir(site) / "fsid").read_text()
    ceph.render(site)  # a second `up` keeps the cluster's identity and the STS key
    assert (ceph.ceph_dir(site) / "fsid").read_text() == fsid
    assert f"rgw sts key = {key}" in ceph.conf_path(site).read_text()
    # Messenger ports never collide with Slurm's.
    lo = int(re.search(r"ms bind port min = (\d+)", text)[1])  # type: ignore[index]
    assert lo > max(site.ctld_port, site.slurmd_port, site.dbd_port)


def test_bucket_policy_grants_each_user_only_its_prefixes() -> None:
    doc = ceph.bucket_policy("aif-lake", {"startup-a": ["startup-a/"], "startup-b": ["/b/x/"],
                                          "nobody": ["", "/"]}, ceph.WRITE)  # fmt: skip
    assert doc is not None
    by_sid = {s["Sid"]: s for s in doc["Statement"]}
    assert set(by_sid) == {"platform", "startup-a-objects", "startup-a-list",
                           "startup-b-objects", "startup-b-list"}  # fmt: skip
    assert by_sid["platform"]["Resource"] == ["arn:aws:s3:::aif-lake", "arn:aws:s3:::aif-lake/*"]
    assert by_sid["startup-a-objects"]["Resource"] == ["arn:aws:s3:::aif-lake/startup-a/*"]
    assert by_sid["startup-b-objects"]["Resource"] == ["arn:aws:s3:::aif-lake/b/x/*"]
    assert by_sid["startup-a-list"]["Condition"] == {
        "StringLike": {"s3:prefix": ["startup-a", "startup-a/*"]}
    }
    assert by_sid["startup-a-objects"]["Principal"] == {"AWS": ["arn:aws:iam:::user/startup-a"]}
    assert "s3:DeleteObject" in by_sid["startup-a-objects"]["Action"]
    only = ceph.bucket_policy("aif-lake", {"a": []}, ceph.READ)["Statement"]
    assert [s["Sid"] for s in only] == ["platform"]
    # RGW refuses policy JSON with spaces after separators ("failed to parse policy").
    assert ", " not in ceph.compact(doc) and ": " not in ceph.compact(doc)


def test_site_grants_follow_the_profile_and_the_catalogs_usage_policies() -> None:
    bucket, lake, data = services.site_grants()
    assert bucket == "aif-lake"
    assert lake == {"startup-a": ["startup-a"], "startup-b": ["startup-b"],
                    "startup-c": ["startup-c"]}  # fmt: skip
    # mobility-trips: a and b; tourism-reviews: everyone; health: c; agriculture: b.
    assert sorted(data["startup-a"]) == ["mobility/trips", "tourism/reviews"]
    assert sorted(data["startup-b"]) == ["agriculture/fields", "mobility/trips",
                                         "tourism/reviews"]  # fmt: skip
    assert sorted(data["startup-c"]) == ["health/admissions", "tourism/reviews"]


def test_startup_keys_are_private_and_stable(site: Site) -> None:
    key = ceph.startup_key(site, "startup-a")
    path = ceph.keys_dir(site) / "startup-a.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ceph.startup_key(site, "startup-a") == key
    assert key["access_key"] != ceph.startup_key(site, "startup-b")["access_key"]


def _snapshot(site: Site, objects: dict[tuple[str, str], bytes]) -> None:
    store = site.root / "s3"
    (store / "blobs").mkdir(parents=True)
    index: dict[str, dict[str, Any]] = {b: {} for b in BUCKETS}
    for (bucket, key), body in objects.items():
        blob = hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest()
        (store / "blobs" / blob).write_bytes(body)
        index[bucket][key] = {"blob": blob, "etag": "", "content_type": "text/plain",
                              "metadata": {"k": "v"}}  # fmt: skip
    (store / "index.json").write_text(json.dumps(index))


def test_the_moto_snapshot_is_imported_once(moto_s3: MotoS3, tmp_path: Path) -> None:
    port = int(moto_s3.endpoint_url.rsplit(":", 1)[1])
    site = Site(tmp_path / "site", s3_port=port)
    client = boto3.client("s3", endpoint_url=site.s3_url, aws_access_key_id=S3_KEY,
                          aws_secret_access_key=site.platform_secret(),
                          region_name="us-east-1")  # fmt: skip
    services.ensure_buckets(site)
    client.put_object(Bucket="aif-lake", Key="startup-a/already", Body=b"12345")
    _snapshot(site, {("aif-lake", "startup-a/snap/x.parquet"): b"PAR1",
                     ("aif-lake", "startup-a/already"): b"54321",
                     ("aif-mlflow", "artifacts/1/model.pkl"): b"M"})  # fmt: skip
    said: list[str] = []
    assert services.import_moto_snapshot(site, said.append) == 2  # same size: kept
    got = client.get_object(Bucket="aif-lake", Key="startup-a/snap/x.parquet")
    assert got["Body"].read() == b"PAR1" and got["Metadata"] == {"k": "v"}
    assert client.get_object(Bucket="aif-lake", Key="startup-a/already")["Body"].read() == b"12345"
    assert not (site.root / "s3").exists() and list(site.root.glob("s3.imported-*"))
    assert "imported 2 objects" in said[0]
    assert services.import_moto_snapshot(site, said.append) == 0  # never twice


def test_a_broken_snapshot_is_one_site_error(moto_s3: MotoS3, tmp_path: Path) -> None:
    from aifactory.tasks.core.errors import SiteError

    port = int(moto_s3.endpoint_url.rsplit(":", 1)[1])
    site = Site(tmp_path / "site", s3_port=port)
    services.ensure_buckets(site)
    _snapshot(site, {("aif-lake", "startup-a/gone"): b"x"})
    for blob in (site.root / "s3" / "blobs").iterdir():
        blob.unlink()
    with pytest.raises(SiteError, match=r"importing the moto snapshot .* failed"):
        services.import_moto_snapshot(site, print)
    assert (site.root / "s3" / "index.json").exists()  # kept for another try


@pytest.mark.parametrize(("text", "why"), [
    (None, "no object-store identity for start-up startup-a"),
    ("{not json", "unreadable"),
    ('{"access_key": "A"}', "needs access_key and secret_key"),
])  # fmt: skip
def test_a_missing_or_bad_key_file_is_one_line(tmp_path: Path, text: str | None,
                                               why: str) -> None:  # fmt: skip
    if text is not None:
        (tmp_path / "startup-a.json").write_text(text)
    with pytest.raises(ConfigError) as err:
        s3_identity.read_key(str(tmp_path), "startup-a")
    assert why in str(err.value) and "\n" not in str(err.value)
    assert str(tmp_path) in str(err.value)


def _site_like(tmp_path: Path, moto: MotoS3) -> Any:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "startup-a.json").write_text(json.dumps({"access_key": "AKA", "secret_key": "S"}))
    prof = tmp_path / "site-on-moto.yaml"
    prof.write_text(f"extends: site\nobject_store:\n  endpoint_url: {moto.endpoint_url}\n"
                    f"  key: PLAT\n  secret: PLATSECRET\n  tenant_keys: {keys}\n"
                    "training:\n  timeout_min: 30\n")  # fmt: skip
    return load_profile(str(prof))


def test_a_startups_run_uses_its_temporary_credentials(tmp_path: Path,
                                                       moto_s3: MotoS3) -> None:  # fmt: skip
    cfg = _site_like(tmp_path, moto_s3)
    mine = cfg.for_startup("startup-a")
    so = mine.storage_options("s3://aif-lake/startup-a")
    assert so["key"] not in ("PLAT", "AKA") and so["secret"] not in ("PLATSECRET", "S")
    assert so["token"]
    env = mine.child_env()
    assert env["AWS_SESSION_TOKEN"] == so["token"] and env["AWS_ACCESS_KEY_ID"] == so["key"]
    assert mine.object_store.tenant_keys is None  # a job never sees the keys' folder
    assert so["token"] not in json.dumps(mine.public_dict())  # masked like the key
    assert mine.public_dict()["object_store"]["token"] == "***"
    # The session is reused while it lasts long enough for the run's jobs.
    assert cfg.for_startup("startup-a").storage_options("s3://x")["token"] == so["token"]
    # The platform's profile is unchanged.
    assert cfg.storage_options("s3://aif-lake")["key"] == "PLAT"
    assert "AWS_SESSION_TOKEN" not in cfg.child_env()


def test_no_tenant_keys_means_the_profile_itself(tmp_path: Path) -> None:
    cfg = load_profile("local")
    assert cfg.for_startup(cfg.default_startup) is cfg


def test_a_startup_without_an_identity_is_refused(tmp_path: Path, moto_s3: MotoS3) -> None:
    cfg = _site_like(tmp_path, moto_s3)
    with pytest.raises(ConfigError, match="no object-store identity for start-up startup-b"):
        cfg.for_startup("startup-b")


@pytest.mark.parametrize(("walltime", "seconds"), [
    ("00:30:00", 1800), ("1-02:00:00", 93600), ("45", 2700), ("10:30", 630), (None, 0),
    ("soon", 0), ("1:2:3:4", 0),
])  # fmt: skip
def test_walltime_seconds(walltime: str | None, seconds: int) -> None:
    assert _walltime_s(walltime) == seconds


@pytest.mark.parametrize("how", ["env", "dotted", "section"])
def test_a_run_cannot_drop_the_startups_own_identities(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without object_store.tenant_keys a run would use the platform's key, and hand it
    to the start-up's jobs: only the profile file may set it."""
    from aifactory.tasks.core.errors import TenancyError

    overrides: dict[str, Any] | None = None
    if how == "env":
        monkeypatch.setenv("AIF_OBJECT_STORE__TENANT_KEYS", "")
    elif how == "dotted":
        overrides = {"object_store.tenant_keys": "/tmp/my-keys"}
    else:
        overrides = {"object_store": {"tenant_keys": None}}
    with pytest.raises(TenancyError) as err:
        load_profile("site", overrides)
    assert str(err.value).startswith("isolation.overrides: ")
    assert "may not change object_store.tenant_keys" in str(err.value)


def test_the_config_hash_is_the_same_for_the_startups_run_and_the_platform(
    tmp_path: Path, moto_s3: MotoS3
) -> None:
    """A replay (the platform's profile) compares the config hash recorded by the
    start-up's run (its temporary session): the identity is not part of the config."""
    cfg = _site_like(tmp_path, moto_s3)
    assert cfg.for_startup("startup-a").config_hash() == cfg.config_hash()


def test_an_up_does_not_rewrite_users_that_are_right(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`radosgw-admin user modify` drops a user's policies: after an `up` that modified the
    start-ups, their next GetSessionToken was refused until the policies were put back."""
    calls: list[list[str]] = []
    infos: dict[str, dict[str, Any]] = {}

    def user(_site: Site, uid: str) -> dict[str, Any] | None:
        return infos.get(uid)

    def admin(_site: Site, *args: str, check: bool = True) -> str:
        calls.append(list(args))
        return ""

    monkeypatch.setattr(ceph, "_user", user)
    monkeypatch.setattr(ceph, "rgw_admin", admin)
    ceph.ensure_identities(site, "PK", "PS", print)  # first up: every user created
    assert [c[:2] for c in calls].count(["user", "create"]) == 4
    caps = [{"type": t, "perm": "*"} for t in ("users", "buckets", "user-policy", "roles")]
    infos[ceph.PLATFORM_USER] = {"keys": [{"access_key": "PK", "secret_key": "PS"}], "caps": caps}
    for sid in ("startup-a", "startup-b", "startup-c"):
        key = ceph.startup_key(site, sid)
        infos[sid] = {"keys": [{"access_key": key["access_key"], "secret_key": key["secret_key"]}],
                      "max_buckets": -1}  # fmt: skip
    calls.clear()
    ceph.ensure_identities(site, "PK", "PS", print)  # a later up: nothing to change
    assert calls == []
    infos["startup-b"]["max_buckets"] = 1000  # changed by hand: put right
    ceph.ensure_identities(site, "PK", "PS", print)
    assert calls == [["user", "modify", "--uid", "startup-b", "--max-buckets=-1"]]
