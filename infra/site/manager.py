"""`aif site up | status | env | down`: the local AI-factory site on loopback.

Parts start in dependency order; each is recorded (pid, command, address) in
``<site>/site.json`` (plus ``<site>/pids/<part>.pid``); logs go to ``<site>/logs/<part>.log``.
``up`` leaves a healthy recorded part alone and restarts a dead one; ``down`` stops exactly
the recorded processes (after checking command line and start time, so a recycled pid is
never hit) in reverse order and nothing else. State stays for the next ``up``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from aifactory.infra.site import ceph, mlflow_auth, procs, services
from aifactory.infra.site import slurm_parts as sp
from aifactory.infra.site.layout import ACCOUNTS, REGION, S3_KEY, Site
from aifactory.tasks.core.errors import SiteError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Part:
    name: str
    expect: str  # names the part's worker processes (for leftovers of a dead daemon)
    argv: Callable[[Site], list[str]]
    healthy: Callable[[Site], bool]
    address: Callable[[Site], str]
    env: Callable[[Site], dict[str, str]] = lambda s: {}
    timeout: float = 60.0
    after: Callable[[Site, Progress], None] | None = None
    port: Callable[[Site], int | None] = lambda s: None
    before_stop: Callable[[Site, Progress], None] | None = None


def _after_munged(site: Site, _p: Progress) -> None:
    sp.link_default_munge_socket(site)


def _after_mariadb(site: Site, _p: Progress) -> None:
    sp.mariadb_grant(site)


def _after_slurmdbd(site: Site, _p: Progress) -> None:
    sp.ensure_cluster(site)
    sp.ensure_accounts(site)


def _after_s3(site: Site, progress: Progress) -> None:
    _s3_setup(site, progress)
    services.seed_dataspace(site, progress)


def _s3_setup(site: Site, progress: Progress) -> None:
    """Identities, buckets and policies (idempotent), then the moto era's objects, once."""
    ceph.ensure_identities(site, S3_KEY, site.platform_secret(), progress)
    services.ensure_buckets(site)
    services.ensure_policies(site)
    services.import_moto_snapshot(site, progress)


def _after_slurmctld(site: Site, _p: Progress) -> None:
    sp.ensure_budget_limits(site)


def _before_stop_slurmctld(site: Site, progress: Progress) -> None:
    jobs = sp.running_jobs(site)
    if jobs:
        progress(
            f"note: job(s) {', '.join(jobs)} still running: their steps keep running and are "
            "re-adopted by the next `up` (scancel them first to stop them)"
        )


PARTS: list[Part] = [
    Part("munged", "munged", sp.munge_argv, sp.munge_ok, lambda s: str(s.munge_socket),
         after=_after_munged),
    Part("mariadb", "mariadbd", sp.mariadb_argv, sp.mariadb_ok,
         lambda s: f"127.0.0.1:{s.db_port}", after=_after_mariadb, timeout=90,
         port=lambda s: s.db_port),
    Part("slurmdbd", "slurmdbd", sp.slurmdbd_argv, sp.slurmdbd_ok,
         lambda s: f"127.0.0.1:{s.dbd_port}", env=lambda s: s.slurm_env(),
         after=_after_slurmdbd, timeout=90, port=lambda s: s.dbd_port),
    Part("slurmctld", "slurmctld", sp.slurmctld_argv, sp.slurmctld_ok,
         lambda s: f"127.0.0.1:{s.ctld_port}", env=lambda s: s.slurm_env(),
         port=lambda s: s.ctld_port, before_stop=_before_stop_slurmctld,
         after=_after_slurmctld),
    Part("slurmd", "slurmd", sp.slurmd_argv, sp.slurmd_ok,
         lambda s: f"127.0.0.1:{s.slurmd_port} (2 GPUs)", env=lambda s: s.slurm_env(),
         timeout=90, port=lambda s: s.slurmd_port),
    Part("ceph-mon", "ceph-mon", ceph.mon_argv, ceph.mon_ok,
         lambda s: f"127.0.0.1:{s.mon_port}", port=lambda s: s.mon_port),
    Part("ceph-osd", "ceph-osd", ceph.osd_argv, ceph.osd_ok, lambda s: "osd.0 (BlueStore)",
         timeout=90),
    Part("s3", "radosgw", ceph.rgw_argv, ceph.rgw_ok, lambda s: f"{s.s3_url} (Ceph RGW)",
         after=_after_s3, port=lambda s: s.s3_port, timeout=90),
    Part("prefect", "prefect", services.prefect_argv, services.prefect_ok,
         lambda s: f"http://127.0.0.1:{s.prefect_port}", env=services.prefect_env,
         timeout=240, port=lambda s: s.prefect_port),
    Part("mlflow", "mlflow", services.mlflow_argv, services.mlflow_ok,
         lambda s: s.mlflow_url, env=services.mlflow_env, timeout=180,
         port=lambda s: s.mlflow_port),
    # One Prefect worker per start-up, on its own work pool (its concurrency limit is the
    # pool's): a start-up's flow runs are the children of its worker only.
    *[Part(f"worker-{sid}", "prefect", services.worker_argv_for(sid), services.worker_ok_for(sid),
           lambda s, sid=sid: f"work pool {services.work_pool(sid)}",  # type: ignore[misc]
           env=services.worker_env, timeout=120) for sid in ACCOUNTS],
]  # fmt: skip
# Parts of earlier versions: stopped by `up` and `down` if a site still runs them.
RETIRED: dict[str, str] = {"worker": "prefect"}  # the shared worker of pool aif-site


@dataclass
class PartStatus:
    name: str
    healthy: bool
    address: str
    pid: int | None
    detail: str


def _load(site: Site) -> dict[str, Any]:
    try:
        return dict(json.loads(site.state_file.read_text()))
    except (OSError, ValueError):
        return {}


def _save(site: Site, state: dict[str, Any]) -> None:
    site.root.mkdir(parents=True, exist_ok=True)
    tmp = site.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(site.state_file)


def _pidfile(site: Site, name: str) -> Path:
    return site.root / "pids" / f"{name}.pid"


def _record(site: Site, state: dict[str, Any], name: str) -> dict[str, Any]:
    """What we know about a part: its site.json record, else a bare pidfile."""
    rec = state.get(name)
    if isinstance(rec, dict):
        return rec
    pid = procs.read_pidfile(_pidfile(site, name))
    # A pidfile without its record cannot be checked against a command line: it is only
    # reported (as stale), never signalled.
    return {"pid": pid, "argv": []} if pid else {}


def _start(site: Site, part: Part, state: dict[str, Any], progress: Progress) -> None:
    port = part.port(site)
    if port and procs.port_open("127.0.0.1", port):
        raise SiteError(
            f"site part {part.name}: port 127.0.0.1:{port} is already in use by a process "
            "this site did not start (stop it, or use another machine)"
        )
    log = site.logs / f"{part.name}.log"
    progress(f"starting {part.name}")
    rec = procs.start(part.name, part.argv(site), log, env=part.env(site), cwd=site.root)
    rec.update(address=part.address(site), started_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
    state[part.name] = rec
    _save(site, state)
    pid: int = rec["pid"]
    procs.write_pidfile(_pidfile(site, part.name), pid)
    t0 = time.monotonic()
    procs.wait_until(part.name, partial(part.healthy, site), pid, log, part.timeout)
    progress(f"{part.name} healthy after {time.monotonic() - t0:.1f}s (pid {pid})")
    if part.after is not None:
        part.after(site, progress)


def _startup_users(site: Site, progress: Progress) -> None:
    """The start-ups' Unix users, the modes of the site's folder, and what their jobs must
    reach: this Python, aifactory's code, the runs folder (checked by running it as one)."""
    import aifactory.tasks

    sp.ensure_unix_users(site, progress)
    sp.close_site_folder(site)
    opened: list[str] = []
    for path in (
        Path(os.path.realpath(sys.executable)),
        Path(sys.executable),
        Path(aifactory.tasks.__file__).resolve(),
        site.root / "runs" / "train",
    ):
        opened += [p for p in sp.open_path_to_startups(path) if p not in opened]
    if opened:
        progress(
            f"gave the start-ups' group {sp.STARTUPS_GROUP} traverse (x, an ACL entry) on "
            f"{', '.join(opened)}: their jobs run this Python and reach the runs folder"
        )
    sp.check_startup_users_can_run(site, site.root / "runs", sys.executable)


def site_root(site_dir: Path) -> Path:
    """The path the site's daemons are given for ``site_dir``. A folder whose path holds
    whitespace (a clone in ``~/my work/aif``) is reached through a link without any:
    ``<tmp>/aif-site-<hash>``. Slurm's and MariaDB's own configuration and scripts split
    paths at spaces (mariadb-install-db's chown, slurm.conf), so they never see one."""
    real = site_dir.resolve()
    if not any(c.isspace() for c in str(real)):
        return real
    real.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(real).encode()).hexdigest()[:12]
    link = Path(tempfile.gettempdir()) / f"aif-site-{digest}"
    if link.is_symlink() and Path(os.readlink(link)) != real:
        link.unlink()
    if not link.is_symlink():
        if link.exists():
            raise SiteError(f"site folder {real} has a space; its alias {link} is taken by "
                            "another file: remove it, or use --dir without spaces")  # fmt: skip
        link.symlink_to(real, target_is_directory=True)
    return link


def up(site_dir: Path, progress: Progress = print) -> list[PartStatus]:
    """Start every part that is not already running and healthy; return their status."""
    site = Site(site_root(Path(site_dir)))
    t0 = time.monotonic()
    sp.ensure_packages(progress)
    sp.ensure_packages(progress, ceph.PACKAGES, recommends=False)
    for d in (site.root, site.logs, site.root / "pids"):
        d.mkdir(parents=True, exist_ok=True)
    sp.render(site)
    state = _load(site)
    _stop_retired(site, state, progress)
    started: list[Part] = []
    try:
        _up_parts(site, state, started, progress)
    except BaseException:
        # Nothing that this call started stays up when it fails (a half site, with munged
        # or MariaDB left running, would hold the ports and confuse the next `up`).
        for part in reversed(started):
            rec = _record(site, state, part.name)
            if rec.get("pid") and procs.stop(rec, part.expect):
                progress(f"stopped {part.name} (pid {rec['pid']}): the site did not come up")
            state.pop(part.name, None)
            _pidfile(site, part.name).unlink(missing_ok=True)
        _save(site, state)
        raise
    progress(f"site up in {time.monotonic() - t0:.1f}s ({site.root})")
    return status(site_dir)


def _up_parts(site: Site, state: dict[str, Any], started: list[Part],
              progress: Progress) -> None:  # fmt: skip
    """Start the parts that are not running and healthy (each one started goes to
    ``started``), then the idempotent set-up: accounts, buckets, seed data, crash detection."""
    for part in PARTS:
        rec = _record(site, state, part.name)
        if procs.owns(rec):
            if part.healthy(site):
                continue
            # Running but unhealthy: give it a moment, then restart it.
            try:
                log = site.logs / f"{part.name}.log"
                procs.wait_until(part.name, partial(part.healthy, site), rec["pid"], log, 20)
                continue
            except SiteError:
                progress(f"restarting {part.name} (pid {rec['pid']} is not healthy)")
                procs.stop(rec, part.expect)
        elif rec.get("pid"):
            progress(f"{part.name}: recorded pid {rec['pid']} is gone (stale), restarting")
            procs.stop(rec, part.expect)  # leftovers of its session (e.g. worker processes)
        started.append(part)
        _start(site, part, state, progress)
    # Links, users, accounts and seed data are idempotent: re-check them on every up.
    sp.link_default_munge_socket(site)
    _startup_users(site, progress)
    sp.ensure_accounts(site)
    sp.reload_users(site)  # the new users' uids, for their associations
    sp.ensure_budget_limits(site)
    _s3_setup(site, progress)
    services.seed_dataspace(site, progress)
    services.ensure_registry_access(site, progress)
    services.ensure_crash_detector(site, progress)
    services.ensure_work_pools(site, progress)


def _stop_retired(site: Site, state: dict[str, Any], progress: Progress) -> list[str]:
    """Stop what an earlier version of the site started as a part it no longer has."""
    stopped = []
    for name, expect in RETIRED.items():
        rec = _record(site, state, name)
        if rec.get("pid") and procs.stop(rec, expect):
            progress(f"stopped {name} (pid {rec['pid']}): no longer a part of the site")
            stopped.append(name)
        if name in state:
            state.pop(name)
            _save(site, state)
        _pidfile(site, name).unlink(missing_ok=True)
    return stopped


def status(site_dir: Path) -> list[PartStatus]:
    """Health and address of every part; starts nothing."""
    site = Site(site_root(Path(site_dir)))
    state = _load(site)
    out = []
    for part in PARTS:
        rec = _record(site, state, part.name)
        running = procs.owns(rec)
        healthy = running and part.healthy(site)
        if healthy:
            detail = "healthy"
        elif running:
            detail = f"running but unhealthy (log: {site.logs / f'{part.name}.log'})"
        else:
            detail = "not running" + (f" (stale pid {rec['pid']})" if rec.get("pid") else "")
        out.append(PartStatus(part.name, healthy, part.address(site),
                              rec["pid"] if running else None, detail))  # fmt: skip
    return out


def env_lines(site_dir: Path) -> list[str]:
    """``export X=...`` lines that point Slurm, Prefect, MLflow and S3 clients at the site."""
    site = Site(site_root(Path(site_dir)))
    values = {
        "AIF_SITE_DIR": str(site.root),
        "SLURM_CONF": str(site.slurm_conf),
        "PREFECT_API_URL": site.prefect_api,
        "MLFLOW_TRACKING_URI": site.mlflow_url,
        # The operators' registry user: reads every start-up's experiments and models.
        "MLFLOW_TRACKING_USERNAME": mlflow_auth.OPERATOR,
        "MLFLOW_TRACKING_PASSWORD": mlflow_auth.password(site, mlflow_auth.OPERATOR),
        "AWS_ENDPOINT_URL": site.s3_url,
        "MLFLOW_S3_ENDPOINT_URL": site.s3_url,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": site.platform_secret(),
        "AWS_DEFAULT_REGION": REGION,
    }
    return [f"export {k}={shlex.quote(v)}" for k, v in values.items()]


def down(site_dir: Path, progress: Progress = print) -> list[str]:
    """Stop exactly the processes this site recorded, in reverse start order.

    Nothing else is signalled, and no state (data, logs, configs) is removed.
    """
    site = Site(site_root(Path(site_dir)))
    state = _load(site)
    stopped = []
    for part in reversed(PARTS):
        rec = _record(site, state, part.name)
        if part.before_stop is not None and procs.owns(rec):
            part.before_stop(site, progress)
        if rec.get("pid") and procs.stop(rec, part.expect):
            progress(f"stopped {part.name} (pid {rec['pid']})")
            stopped.append(part.name)
        state.pop(part.name, None)
        _pidfile(site, part.name).unlink(missing_ok=True)
    stopped += _stop_retired(site, state, progress)
    sp.unlink_default_munge_socket(site)
    _save(site, state)
    return stopped
