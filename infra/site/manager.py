"""`aif site up | status | env | down`: the local AI-factory site on loopback.

Parts start in dependency order; each is recorded (pid, command, address) in
``<site>/site.json``. ``up`` leaves a healthy recorded part alone and restarts a dead one;
``down`` stops exactly the recorded pids (after checking their command line, so a recycled
pid is never hit) in reverse order and nothing else. State stays for the next ``up``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.site import procs, services
from infra.site import slurm_parts as sp
from infra.site.layout import S3_KEY, S3_SECRET, Site
from tasks.errors import SiteError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Part:
    name: str
    expect: str  # substring of the daemon's command line
    argv: Callable[[Site], list[str]]
    healthy: Callable[[Site], bool]
    address: Callable[[Site], str]
    env: Callable[[Site], dict[str, str]] = lambda s: {}
    timeout: float = 60.0
    after: Callable[[Site, Progress], None] | None = None
    port: Callable[[Site], int | None] = lambda s: None


def _after_munged(site: Site, _p: Progress) -> None:
    sp.link_default_munge_socket(site)


def _after_mariadb(site: Site, _p: Progress) -> None:
    sp.mariadb_grant(site)


def _after_slurmdbd(site: Site, _p: Progress) -> None:
    sp.ensure_cluster(site)
    sp.ensure_accounts(site)


def _after_s3(site: Site, progress: Progress) -> None:
    services.ensure_buckets(site)
    services.seed_dataspace(site, progress)


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
         port=lambda s: s.ctld_port),
    Part("slurmd", "slurmd", sp.slurmd_argv, sp.slurmd_ok,
         lambda s: f"127.0.0.1:{s.slurmd_port} (2 GPUs)", env=lambda s: s.slurm_env(),
         timeout=90, port=lambda s: s.slurmd_port),
    Part("s3", "moto.server", services.s3_argv, services.s3_ok, lambda s: s.s3_url,
         after=_after_s3, port=lambda s: s.s3_port),
    Part("prefect", "prefect", services.prefect_argv, services.prefect_ok,
         lambda s: f"http://127.0.0.1:{s.prefect_port}", env=services.prefect_env,
         timeout=240, port=lambda s: s.prefect_port),
    Part("mlflow", "mlflow", services.mlflow_argv, services.mlflow_ok,
         lambda s: s.mlflow_url, env=lambda s: s.s3_env(), timeout=180,
         port=lambda s: s.mlflow_port),
]  # fmt: skip


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


def up(site_dir: Path, progress: Progress = print) -> list[PartStatus]:
    site = Site(Path(site_dir).resolve())
    t0 = time.monotonic()
    sp.ensure_packages(progress)
    site.root.mkdir(parents=True, exist_ok=True)
    site.logs.mkdir(parents=True, exist_ok=True)
    sp.render(site)
    state = _load(site)
    for part in PARTS:
        rec = state.get(part.name, {})
        pid = rec.get("pid")
        if procs.alive(pid, part.expect) and part.healthy(site):
            continue
        if procs.alive(pid, part.expect):  # running but unhealthy: give it a chance, then restart
            try:
                procs.wait_until(part.name, lambda p=part: p.healthy(site), pid, part.expect,
                                 site.logs / f"{part.name}.log", 20)  # fmt: skip
                continue
            except SiteError:
                progress(f"restarting {part.name} (pid {pid} is not healthy)")
                procs.stop(pid, part.expect)
        port = part.port(site)
        if port and procs.port_open("127.0.0.1", port):
            raise SiteError(
                f"site part {part.name}: port 127.0.0.1:{port} is already in use by a process "
                "this site did not start (stop it, or use another machine)"
            )
        log = site.logs / f"{part.name}.log"
        progress(f"starting {part.name}")
        argv = part.argv(site)
        pid = procs.start(part.name, argv, log, env=part.env(site), cwd=site.root)
        state[part.name] = {"pid": pid, "argv": argv, "address": part.address(site),
                            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
        _save(site, state)
        procs.wait_until(part.name, lambda p=part: p.healthy(site), pid, part.expect, log,
                         part.timeout)  # fmt: skip
        if part.after is not None:
            part.after(site, progress)
    # Links, accounts and seed data are idempotent: re-check them on every up.
    sp.link_default_munge_socket(site)
    sp.ensure_accounts(site)
    services.ensure_buckets(site)
    services.seed_dataspace(site, progress)
    progress(f"site up in {time.monotonic() - t0:.1f}s ({site.root})")
    return status(site_dir)


def status(site_dir: Path) -> list[PartStatus]:
    site = Site(Path(site_dir).resolve())
    state = _load(site)
    out = []
    for part in PARTS:
        pid = state.get(part.name, {}).get("pid")
        running = procs.alive(pid, part.expect)
        healthy = running and part.healthy(site)
        detail = "healthy" if healthy else ("unhealthy" if running else "not running")
        out.append(PartStatus(part.name, healthy, part.address(site), pid if running else None,
                              detail))  # fmt: skip
    return out


def env_lines(site_dir: Path) -> list[str]:
    site = Site(Path(site_dir).resolve())
    values = {
        "AIF_SITE_DIR": str(site.root),
        "SLURM_CONF": str(site.slurm_conf),
        "PREFECT_API_URL": site.prefect_api,
        "MLFLOW_TRACKING_URI": site.mlflow_url,
        "AWS_ENDPOINT_URL": site.s3_url,
        "MLFLOW_S3_ENDPOINT_URL": site.s3_url,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return [f"export {k}={v}" for k, v in values.items()]


def down(site_dir: Path, progress: Progress = print) -> list[str]:
    site = Site(Path(site_dir).resolve())
    state = _load(site)
    stopped = []
    for part in reversed(PARTS):
        pid = state.get(part.name, {}).get("pid")
        if pid and procs.stop(pid, part.expect):
            progress(f"stopped {part.name} (pid {pid})")
            stopped.append(part.name)
        state.pop(part.name, None)
    sp.unlink_default_munge_socket(site)
    _save(site, state)
    return stopped
