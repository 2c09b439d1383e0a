"""The site's object store: Ceph's RADOS Gateway on a one-node Ceph cluster.

Three daemons, each a site part: the monitor (``ceph-mon``), one OSD on a sparse file
(``ceph-osd``, BlueStore) and the S3 gateway (``radosgw``), every path under
``<site>/ceph`` and every address on loopback. Objects are on disk from the moment the
gateway answers a PUT: a killed daemon loses nothing, and ``aif site up`` starts it again.

Identities (``ensure_identities``, on every ``up``):

- the platform (the orchestrator and the operators' tools) owns the buckets;
- each start-up of the site is an RGW user of its own, with no buckets of its own, whose
  only rights are what the buckets' policies grant: read and write under its lake prefix,
  read of the data sets that the catalog's usage policy allows it. Its long-lived key is
  in ``<site>/secrets/s3/<start-up>.json`` (mode 600, for the orchestrator); its jobs get
  temporary credentials (STS GetSessionToken) made from it (tasks/doors/s3_identity.py).
"""

from __future__ import annotations

import json
import os
import secrets
import string
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aifactory.infra.site import procs
from aifactory.infra.site.layout import ACCOUNTS, TEMPLATES, Site, kept_secret, private_file
from aifactory.tasks.core.errors import SiteError

PLATFORM_USER = "aif-platform"
RGW_NAME = "client.rgw.site"
BLOCK_BYTES = 64 * 2**30  # sparse: only what is written takes disk space
PACKAGES = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "radosgw": "radosgw",
            "radosgw-admin": "radosgw", "ceph": "ceph-common"}  # fmt: skip


def ceph_dir(site: Site) -> Path:
    return site.root / "ceph"


def conf_path(site: Site) -> Path:
    return ceph_dir(site) / "ceph.conf"


def keys_dir(site: Site) -> Path:
    """The start-ups' long-lived object-store keys (profile key object_store.tenant_keys)."""
    return site.root / "secrets" / "s3"


def rgw_addresses(site: Site) -> list[str]:
    """Where the gateway listens: loopback for the login side, and on a multi-node site the
    bridge address, where the compute nodes reach it."""
    return list(dict.fromkeys(("127.0.0.1", site.service_address)))


def render(site: Site) -> None:
    """Folders and ceph.conf (from infra/templates/ceph.conf)."""
    d = ceph_dir(site)
    for sub in ("mon", "osd", "rgw", "run", "log", "crash", "keys"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d / "keys", 0o700)
    alphabet = string.ascii_letters + string.digits
    values = {
        "fsid": kept_secret(d / "fsid", lambda: str(uuid.uuid4())),
        "sts_key": kept_secret(d / "keys" / "sts.key",
                         lambda: "".join(secrets.choice(alphabet) for _ in range(16))),
        "dir": d, "mon_port": site.mon_port, "block_bytes": BLOCK_BYTES,
        "rgw_endpoints": " ".join(f"endpoint={a}:{site.s3_port}" for a in rgw_addresses(site)),
    }  # fmt: skip
    text = string.Template((TEMPLATES / "ceph.conf").read_text()).substitute(values)
    private_file(conf_path(site), text)  # it names the STS key's value


def ceph(site: Site, *args: str, timeout: float = 30, check: bool = True) -> str:
    """One ``ceph`` command as client.admin; its stdout."""
    argv = ["ceph", "-c", str(conf_path(site)), "--connect-timeout", "10", *args]
    return procs.run(argv, timeout=timeout, check=check).stdout


def rgw_admin(site: Site, *args: str, check: bool = True) -> str:
    return procs.run(["radosgw-admin", "-c", str(conf_path(site)), *args], timeout=60,
                     check=check).stdout  # fmt: skip


def _keyring(site: Site, name: str) -> Path:
    return ceph_dir(site) / "keys" / f"ceph.{name}.keyring"


def _authtool(*args: str) -> None:
    procs.run(["ceph-authtool", *args], timeout=30)


# -- monitor ------------------------------------------------------------------------------
def mon_argv(site: Site) -> list[str]:
    """The monitor, made on first use (keyrings, monmap, mkfs)."""
    render(site)
    d = ceph_dir(site)
    if not (d / "mon" / "store.db").exists():
        mon, admin, monmap = _keyring(site, "mon."), _keyring(site, "client.admin"), d / "monmap"
        for k in (mon, admin):
            k.unlink(missing_ok=True)
        _authtool(
            "--create-keyring", str(mon), "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"
        )
        _authtool("--create-keyring", str(admin), "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                  "--cap", "mds", "allow *")  # fmt: skip
        _authtool(str(mon), "--import-keyring", str(admin))
        fsid = (d / "fsid").read_text().strip()
        procs.run(["monmaptool", "--create", "--clobber", "--addv", "a",
                   f"[v2:127.0.0.1:{site.mon_port}]", "--fsid", fsid, str(monmap)])  # fmt: skip
        procs.run(["ceph-mon", "-c", str(conf_path(site)), "--mkfs", "-i", "a",
                   "--monmap", str(monmap), "--keyring", str(mon)])  # fmt: skip
    return ["ceph-mon", "-c", str(conf_path(site)), "-f", "-i", "a"]


def _daemon_state(site: Site, name: str) -> dict[str, Any]:
    """The daemon's own view of itself, through its admin socket ({} if it does not answer)."""
    sock = ceph_dir(site) / "run" / f"{name}.asok"
    cmd = "mon_status" if name.startswith("mon.") else "status"
    if not sock.exists():
        return {}
    try:
        out = procs.run(["ceph", "--admin-daemon", str(sock), cmd], timeout=10).stdout
        return dict(json.loads(out))
    except (SiteError, ValueError):
        return {}


def mon_ok(site: Site) -> bool:
    return _daemon_state(site, "mon.a").get("state") == "leader"


# -- OSD ----------------------------------------------------------------------------------
def osd_argv(site: Site) -> list[str]:
    """The OSD, made on first use (its id in the cluster, its key, BlueStore's mkfs)."""
    d = ceph_dir(site) / "osd"
    if not (d / "mkfs_done").exists():
        osd_uuid = kept_secret(ceph_dir(site) / "osd.uuid", lambda: str(uuid.uuid4()))
        got = ceph(site, "osd", "new", osd_uuid).strip()
        if got != "0":
            raise SiteError(f"site part ceph-osd: the monitor gave OSD id {got!r}, expected 0")
        key = _keyring(site, "osd.0")
        if not key.exists():
            _authtool("--create-keyring", str(key), "--gen-key", "-n", "osd.0")
        ceph(site, "auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd",
             "mgr", "allow profile osd", "-i", str(key), check=False)  # fmt: skip
        for leftover in d.iterdir():  # a mkfs that was interrupted starts again
            leftover.unlink()
        procs.run(["ceph-osd", "-c", str(conf_path(site)), "-i", "0", "--mkfs",
                   "--osd-uuid", osd_uuid], timeout=120)  # fmt: skip
    return ["ceph-osd", "-c", str(conf_path(site)), "-f", "-i", "0"]


def osd_ok(site: Site) -> bool:
    return _daemon_state(site, "osd.0").get("state") == "active"


# -- gateway ------------------------------------------------------------------------------
def rgw_argv(site: Site) -> list[str]:
    key = _keyring(site, RGW_NAME)
    if not key.exists():
        out = ceph(site, "auth", "get-or-create", RGW_NAME, "mon", "allow rw", "osd", "allow rwx")
        private_file(key, out)
    return ["radosgw", "-c", str(conf_path(site)), "-f", "-n", RGW_NAME]


def rgw_ok(site: Site) -> bool:
    # An anonymous GET / answers 200 when ready (at the bridge address too, for the nodes).
    return all(procs.http_ok(f"http://{a}:{site.s3_port}/") for a in rgw_addresses(site))


# -- identities ---------------------------------------------------------------------------
def _user(site: Site, uid: str) -> dict[str, Any] | None:
    proc = procs.run(["radosgw-admin", "-c", str(conf_path(site)), "user", "info", "--uid", uid],
                     timeout=60, check=False)  # fmt: skip
    return dict(json.loads(proc.stdout)) if proc.returncode == 0 else None


Settled = Callable[[dict[str, Any]], bool]


def _ensure_user(site: Site, uid: str, access: str, secret: str, *extra: str,
                 settled: Settled = lambda info: True) -> None:  # fmt: skip
    """The RGW user ``uid`` exists and holds the key ``access``/``secret``; ``extra``
    (`user modify` options) is applied only when ``settled(info)`` says it is not yet:
    `radosgw-admin user modify` drops the user's policies (the start-ups' right to ask
    for temporary credentials), so an `up` must not rewrite a user that is already right."""
    info = _user(site, uid)
    if info is None:
        rgw_admin(site, "user", "create", "--uid", uid, "--display-name", uid,
                  "--access-key", access, "--secret-key", secret, *extra)  # fmt: skip
        return
    keys = info.get("keys", [])
    if not any(k.get("access_key") == access and k.get("secret_key") == secret for k in keys):
        # Every other key goes: an older secret (the fixed one of earlier versions) or a
        # key made by hand stops working.
        for k in keys:
            rgw_admin(site, "key", "rm", "--uid", uid, "--key-type", "s3",
                      "--access-key", str(k.get("access_key")))  # fmt: skip
        rgw_admin(site, "key", "create", "--uid", uid, "--key-type", "s3",
                  "--access-key", access, "--secret-key", secret)  # fmt: skip
    if extra and not settled(info):
        rgw_admin(site, "user", "modify", "--uid", uid, *extra)


def startup_key(site: Site, sid: str) -> dict[str, str]:
    """The start-up's long-lived key (made on first use, kept in keys_dir)."""
    path = keys_dir(site) / f"{sid}.json"
    if not path.exists():
        alphabet = string.ascii_uppercase + string.digits
        key = {"user": sid,
               "access_key": "AIF" + "".join(secrets.choice(alphabet) for _ in range(17)),
               "secret_key": secrets.token_urlsafe(30)}  # fmt: skip
        private_file(path, json.dumps(key, indent=1))
    return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}


def compact(doc: Mapping[str, Any]) -> str:
    """Policy JSON as RGW parses it (no spaces after separators)."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True)


STS_POLICY = {"Version": "2012-10-17",
              "Statement": [{"Effect": "Allow", "Action": ["sts:GetSessionToken"],
                             "Resource": "*"}]}  # fmt: skip
READ = ["s3:GetObject"]
WRITE = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload",
         "s3:ListMultipartUploadParts"]  # fmt: skip


def bucket_policy(bucket: str, grants: Mapping[str, Iterable[str]],
                  actions: list[str]) -> dict[str, Any]:  # fmt: skip
    """A bucket policy giving each user ``actions`` on the objects under its prefixes, and
    listing limited to them (``s3:prefix``). The platform, the bucket's owner, keeps every
    right on every object: an object a start-up writes is the start-up's, and without this
    the platform (the operators' tools, the dry run) could not read it."""
    statements: list[dict[str, Any]] = [
        {"Sid": "platform", "Effect": "Allow",
         "Principal": {"AWS": [f"arn:aws:iam:::user/{PLATFORM_USER}"]}, "Action": ["s3:*"],
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
    ]  # fmt: skip
    for user, prefixes in sorted(grants.items()):
        tops = sorted({p.strip("/") for p in prefixes if p.strip("/")})
        if not tops:
            continue
        who = {"AWS": [f"arn:aws:iam:::user/{user}"]}
        statements.append({"Sid": f"{user}-objects", "Effect": "Allow", "Principal": who,
                           "Action": actions,
                           "Resource": [f"arn:aws:s3:::{bucket}/{t}/*" for t in tops]})  # fmt: skip
        statements.append({"Sid": f"{user}-list", "Effect": "Allow", "Principal": who,
                           "Action": ["s3:ListBucket", "s3:ListBucketMultipartUploads"],
                           "Resource": [f"arn:aws:s3:::{bucket}"],
                           "Condition": {"StringLike": {"s3:prefix": [
                               x for t in tops for x in (t, f"{t}/*")]}}})  # fmt: skip
    return {"Version": "2012-10-17", "Statement": statements}


def ensure_identities(site: Site, platform_key: str, platform_secret: str,
                      progress: Callable[[str], None]) -> None:  # fmt: skip
    """The platform user (owner of the buckets) and one user per start-up of the site."""
    caps = {"users", "buckets", "user-policy", "roles"}
    _ensure_user(site, PLATFORM_USER, platform_key, platform_secret,
                 "--caps", ";".join(f"{c}=*" for c in sorted(caps)),
                 settled=lambda info: caps <= {c.get("type") for c in info.get("caps", [])
                                               if c.get("perm") == "*"})  # fmt: skip
    made = []
    for sid in ACCOUNTS:
        key = startup_key(site, sid)
        if _user(site, sid) is None:
            made.append(sid)
        # --max-buckets=-1: the start-up cannot create buckets of its own.
        _ensure_user(site, sid, key["access_key"], key["secret_key"], "--max-buckets=-1",
                     settled=lambda info: info.get("max_buckets") == -1)  # fmt: skip
    if made:
        progress(f"s3: object-store users {', '.join(made)} (keys in {keys_dir(site)})")
