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

from aifactory.infra.site import ceph, mlflow_auth, nodes, postgres, procs, services
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
    launcher: Callable[[Site], list[str]] = lambda s: []  # runs first, execs argv
    before: Callable[[Site, Progress], None] | None = None  # set-up before each start


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
    if jobs and site.multi_node:
        progress(f"note: job(s) {', '.join(jobs)} still running: they end with their compute "
                 "nodes (Slurm requeues or fails them at the next `up`)")  # fmt: skip
    elif jobs:
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
         lambda s: f"{s.service_address}:{s.ctld_port}", env=lambda s: s.slurm_env(),
         port=lambda s: s.ctld_port, before_stop=_before_stop_slurmctld,
         after=_after_slurmctld),
    Part("slurmd", "slurmd", sp.slurmd_argv, sp.slurmd_ok,
         lambda s: f"127.0.0.1:{s.slurmd_port} (2 GPUs)", env=lambda s: s.slurm_env(),
         timeout=90, port=lambda s: s.slurmd_port),
    Part("ceph-mon", "ceph-mon", ceph.mon_argv, ceph.mon_ok,
         lambda s: f"127.0.0.1:{s.mon_port}", port=lambda s: s.mon_port),
    Part("ceph-osd", "ceph-osd", ceph.osd_argv, ceph.osd_ok, lambda s: "osd.0 (BlueStore)",
         timeout=90),
    Part("s3", "radosgw", ceph.rgw_argv, ceph.rgw_ok,
         lambda s: f"http://{s.service_address}:{s.s3_port} (Ceph RGW)",
         after=_after_s3, port=lambda s: s.s3_port, timeout=90),
    # Prefect's and MLflow's database (SQLite of an earlier site is copied in, once).
    Part("postgres", "postgres", postgres.argv, postgres.ok,
         lambda s: f"127.0.0.1:{s.pg_port}", launcher=postgres.launcher,
         before=postgres.ensure_cluster, after=postgres.after_up, timeout=60,
         port=lambda s: s.pg_port),
    Part("prefect", "prefect", services.prefect_argv, services.prefect_ok,
         lambda s: f"http://127.0.0.1:{s.prefect_port}", env=services.prefect_env,
         timeout=240, port=lambda s: s.prefect_port),
    Part("mlflow", "mlflow", services.mlflow_argv, services.mlflow_ok,
         lambda s: s.mlflow_url, env=services.mlflow_env, timeout=180,
         port=lambda s: s.mlflow_port),
    # Flow runs inside an allocation reach Prefect and MLflow through it (files, no socket).
    Part("relay", "aifactory.tasks.control.relay", services.relay_argv, services.relay_ok,
         lambda s: f"{services.relay_dir(s)} (spools on the shared filesystem)", timeout=30),
    # One Prefect worker per start-up, on its own work pool (its concurrency limit is the
    # pool's): a start-up's flow runs are the children of its worker only.
    *[Part(f"worker-{sid}", "prefect", services.worker_argv_for(sid), services.worker_ok_for(sid),
           lambda s, sid=sid: f"work pool {services.work_pool(sid)}",  # type: ignore[misc]
           env=services.worker_env, timeout=120) for sid in ACCOUNTS],
]  # fmt: skip
# Parts of earlier versions: stopped by `up` and `down` if a site still runs them.
RETIRED: dict[str, str] = {"worker": "prefect"}  # the shared worker of pool aif-site
NODE_PART = "slurmd"  # the one node's slurmd; a multi-node site's are slurmd-<node>


def _node_part(name: str) -> Part:
    """The slurmd of compute node ``name`` of a multi-node site, in its namespaces."""
    return Part(
        f"{NODE_PART}-{name}", "slurmd", partial(sp.slurmd_argv, name=name),
        partial(sp.node_ok, name=name),
        lambda s: f"{s.node_address(name)}:{s.slurmd_port} ({s.gpus_per_node} GPUs)",
        env=lambda s: s.slurm_env(), timeout=90, launcher=partial(nodes.launcher, name=name),
    )  # fmt: skip


def parts(site: Site) -> list[Part]:
    """The site's parts in start order: one slurmd, or one per compute node."""
    if not site.multi_node:
        return PARTS
    out: list[Part] = []
    for part in PARTS:
        out += [_node_part(n) for n in site.node_names()] if part.name == NODE_PART else [part]
    return out


LAYOUT = "_layout"  # site.json's record of the node layout (its other keys are parts)
DEFAULT_NODES = 2  # a new site: two compute nodes (`--nodes 1`: the one-node site)
# Parts whose configuration names the nodes or the bridge: restarted when the layout changes.
LAYOUT_PARTS = ("slurmctld", "s3")


def recorded_layout(site_dir: Path) -> dict[str, Any]:
    rec = _load(Site(site_root(Path(site_dir)))).get(LAYOUT)
    return dict(rec) if isinstance(rec, dict) else {}


def _site(site_dir: Path, nodes_wanted: int | None = None,
          gpus_per_node: int | None = None) -> Site:  # fmt: skip
    """The site in ``site_dir`` with the layout asked for, else the one it has: a new site
    has DEFAULT_NODES nodes of 2 GPUs; one recorded before layouts existed has one node."""
    state = _load(Site(site_root(Path(site_dir))))
    layout = state.get(LAYOUT)
    rec: dict[str, Any] = layout if isinstance(layout, dict) else {}
    first = 1 if state else DEFAULT_NODES
    n = nodes_wanted if nodes_wanted is not None else int(rec.get("nodes", first))
    g = gpus_per_node if gpus_per_node is not None else int(rec.get("gpus_per_node", 2))
    if not 1 <= n <= 32:
        raise SiteError(f"aif site up --nodes {n}: a site has 1 to 32 compute nodes")
    if not 1 <= g <= 8:
        raise SiteError(f"aif site up --gpus-per-node {g}: a node has 1 to 8 GPUs")
    return Site(site_root(Path(site_dir)), nodes=n, gpus_per_node=g)


def layout_of(site: Site) -> dict[str, Any]:
    return {"nodes": site.nodes, "gpus_per_node": site.gpus_per_node,
            "service_address": site.service_address}  # fmt: skip


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
    if part.before is not None:
        part.before(site, progress)
    progress(f"starting {part.name}")
    rec = procs.start(
        part.name,
        part.argv(site),
        log,
        env=part.env(site),
        cwd=site.root,
        launcher=part.launcher(site),
    )
    rec.update(address=part.address(site), started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
               settings=settings_digest(part, site))  # fmt: skip
    state[part.name] = rec
    _save(site, state)
    pid: int = rec["pid"]
    procs.write_pidfile(_pidfile(site, part.name), pid)
    t0 = time.monotonic()
    procs.wait_until(part.name, partial(part.healthy, site), pid, log, part.timeout)
    progress(f"{part.name} healthy after {time.monotonic() - t0:.1f}s (pid {pid})")
    if part.after is not None:
        part.after(site, progress)


def settings_digest(part: Part, site: Site) -> str:
    """A digest of what a part is started with beside its command line (its environment:
    a changed value restarts it)."""
    env = json.dumps(sorted(part.env(site).items()))
    return hashlib.sha256(env.encode()).hexdigest()[:16]


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


def up(site_dir: Path, progress: Progress = print, nodes_wanted: int | None = None,
       gpus_per_node: int | None = None) -> list[PartStatus]:  # fmt: skip
    """Start every part that is not already running and healthy; return their status.

    ``nodes_wanted``/``gpus_per_node``: the layout (default: the site's current one)."""
    site = _site(site_dir, nodes_wanted, gpus_per_node)
    t0 = time.monotonic()
    sp.ensure_packages(progress)
    sp.ensure_packages(progress, ceph.PACKAGES, recommends=False)
    sp.ensure_packages(progress, postgres.PACKAGES, recommends=False)
    for d in (site.root, site.logs, site.root / "pids"):
        d.mkdir(parents=True, exist_ok=True)
    state = _load(site)
    _change_layout(site, state, progress)
    sp.render(site)
    ceph.render(site)
    if site.multi_node:
        made = nodes.ensure_network(site)
        if made:
            progress(f"compute nodes: made {', '.join(made)} ({site.subnet}.0/24)")
    _stop_retired(site, state, progress)
    _stop_for_migration(site, state, progress)
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
    for part in parts(site):
        rec = _record(site, state, part.name)
        if procs.owns(rec) and rec.get("settings") not in (None, settings_digest(part, site)):
            # Started with other settings (e.g. the profile's retention ages): restarted so
            # that they apply. A record from before digests were kept is left alone.
            progress(f"restarting {part.name} (pid {rec['pid']}): its settings changed")
            procs.stop(rec, part.expect)
        elif procs.owns(rec):
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
    services.ensure_saved_searches(site, progress)


MIGRATED_PARTS = ("prefect", "mlflow")  # their SQLite databases move to PostgreSQL


def _stop_for_migration(site: Site, state: dict[str, Any], progress: Progress) -> None:
    """A site that ran Prefect and MLflow on SQLite: their servers are stopped before the
    copy into PostgreSQL (postgres.migrate_sqlite) and started again on it."""
    if not postgres.pending(site):
        return
    for name in MIGRATED_PARTS:
        rec = _record(site, state, name)
        if rec.get("pid") and procs.stop(rec, name):
            progress(f"stopped {name} (pid {rec['pid']}): its SQLite database moves to "
                     "PostgreSQL")  # fmt: skip
        state.pop(name, None)
        _pidfile(site, name).unlink(missing_ok=True)
    _save(site, state)


def _change_layout(site: Site, state: dict[str, Any], progress: Progress) -> None:
    """A new node layout: refused while jobs run; else the parts that name the nodes or
    the bridge are stopped (and started again by `up`; the old nodes' slurmds are stopped
    by _stop_retired), and going back to one node removes the namespaces and the bridge.
    An unchanged layout touches nothing."""
    before = state.get(LAYOUT)
    was = dict(before) if isinstance(before, dict) else {"nodes": 1, "gpus_per_node": 2}
    keys = ("nodes", "gpus_per_node")
    changed = [was.get(k) for k in keys] != [getattr(site, k) for k in keys]
    ctld = _record(site, state, "slurmctld")
    if changed and ctld:
        jobs = sp.running_jobs(site) if procs.owns(ctld) else []
        if jobs:
            raise SiteError(
                f"aif site up --nodes {site.nodes}: job(s) {', '.join(jobs[:5])} still run "
                f"on the site's {was.get('nodes')} node(s): wait for them or scancel them, "
                "then change the layout"
            )
        for part in (p for p in PARTS if p.name in LAYOUT_PARTS):
            rec = _record(site, state, part.name)
            if rec.get("pid") and procs.stop(rec, part.expect):
                progress(f"stopped {part.name} (pid {rec['pid']}): the site's layout changes "
                         f"from {was.get('nodes')} to {site.nodes} node(s)")  # fmt: skip
            state.pop(part.name, None)
            _pidfile(site, part.name).unlink(missing_ok=True)
    state[LAYOUT] = layout_of(site)
    _save(site, state)
    if changed and not site.multi_node:
        nodes.remove_network(site)


def _stop_nodes(site: Site, state: dict[str, Any], progress: Progress,
                keep: tuple[str, ...]) -> list[str]:  # fmt: skip
    """Stop every recorded slurmd whose part is not in ``keep``."""
    stopped = []
    for name in [k for k in state if k.startswith(NODE_PART) and k not in keep]:
        rec = _record(site, state, name)
        if rec.get("pid") and procs.stop(rec, "slurmd"):
            progress(f"stopped {name} (pid {rec['pid']}): not a node of this layout")
            stopped.append(name)
        state.pop(name, None)
        _pidfile(site, name).unlink(missing_ok=True)
    _save(site, state)
    return stopped


def _stop_retired(site: Site, state: dict[str, Any], progress: Progress) -> list[str]:
    """Stop what an earlier version of the site started as a part it no longer has, and
    the slurmds of nodes that the site's layout no longer has."""
    stopped = _stop_nodes(site, state, progress, keep=tuple(p.name for p in parts(site)))
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
    site = _site(site_dir)
    state = _load(site)
    out = []
    for part in parts(site):
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
    site = _site(site_dir)
    state = _load(site)
    stopped = []
    for part in reversed(parts(site)):
        rec = _record(site, state, part.name)
        if part.before_stop is not None and procs.owns(rec):
            part.before_stop(site, progress)
        if rec.get("pid") and procs.stop(rec, part.expect):
            progress(f"stopped {part.name} (pid {rec['pid']})")
            stopped.append(part.name)
        state.pop(part.name, None)
        _pidfile(site, part.name).unlink(missing_ok=True)
    stopped += _stop_retired(site, state, progress)  # the slurmds of other layouts' nodes
    removed = nodes.remove_network(site)
    if removed:
        progress(f"removed the compute nodes' namespaces and bridge: {', '.join(removed)}")
    sp.unlink_default_munge_socket(site)
    _save(site, state)
    return stopped
