"""Slurm with accounting on one machine: munged, MariaDB, slurmdbd, slurmctld, slurmd."""

from __future__ import annotations

import os
import shutil
import stat
import string
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aifactory.infra.site import procs
from aifactory.infra.site.layout import ACCOUNTS, CLUSTER, TEMPLATES, Site, host, memory_mb
from aifactory.tasks.core.errors import SiteError

PACKAGES = {"slurmctld": "slurm-wlm", "slurmdbd": "slurmdbd", "munged": "munge",
            "mariadbd": "mariadb-server", "setfacl": "acl"}  # fmt: skip


def ensure_packages(progress: Callable[[str], None], packages: Mapping[str, str] = PACKAGES,
                    recommends: bool = True) -> None:  # fmt: skip
    """Install the Debian packages of ``packages`` (program -> package) whose program is
    missing (needs root and the Debian mirror)."""
    missing = sorted({pkg for exe, pkg in packages.items() if shutil.which(exe) is None
                      and not os.path.exists(f"/usr/sbin/{exe}")})  # fmt: skip
    if not missing:
        return
    if os.geteuid() != 0:
        raise SiteError(f"Debian packages {', '.join(missing)} are missing and need root")
    progress(f"installing Debian packages: {', '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    procs.run(["apt-get", "update", "-q"], env=env, timeout=600)
    extra = [] if recommends else ["--no-install-recommends"]
    procs.run(["apt-get", "install", "-y", "-q", *extra, *missing], env=env, timeout=1200)


CONFS = ("slurm.conf", "gres.conf", "slurmdbd.conf")


def gpu_files(site: Site, index: int) -> str:
    """gres.conf's File= of the ``index``-th node: its own devices (nvidia<first>-<last>)."""
    first = index * site.gpus_per_node
    last = first + site.gpus_per_node - 1
    span = f"[{first}-{last}]" if last > first else f"{first}"
    return f"{site.dev_dir}/nvidia{span}"


def node_values(site: Site) -> dict[str, object]:
    """slurm.conf's and gres.conf's node lines: the host itself (one node), or one line per
    compute node of a multi-node site, each at its bridge address with its own GPUs and an
    equal share of the memory (the nodes share this machine's cores)."""
    cpus = os.cpu_count() or 1
    names = site.node_names()
    mem = memory_mb() // len(names)
    nodes = []
    gres = []
    for i, name in enumerate(names):
        nodes.append(f"NodeName={name} NodeAddr={site.node_address(name)} CPUs={cpus} "
                     f"RealMemory={mem} Gres=gpu:{site.gpus_per_node} State=UNKNOWN")  # fmt: skip
        where = f"NodeName={name} " if site.multi_node else ""
        gres.append(f"{where}Name=gpu File={gpu_files(site, i)}")
    multi = site.multi_node
    return {
        "node_lines": "\n".join(nodes), "gres_lines": "\n".join(gres),
        "nodes": ",".join(names), "ctld_addr": site.service_address,
        # Every node's spool, pid and log of its own; a dead node is noticed in ~17 s and
        # a requeued job's credentials expire in 30 s (not 120 s) before it may restart.
        "per_node": "/%n" if multi else "", "node_suffix": "-%n" if multi else "",
        "slurmd_timeout": 15 if multi else 60, "cred_expire": ",cred_expire=30" if multi else "",
    }  # fmt: skip


def conf_values(site: Site) -> dict[str, object]:
    """Everything the config templates in infra/templates/ refer to."""
    return {
        "cluster": CLUSTER, "host": host(), "ctld_port": site.ctld_port,
        "slurmd_port": site.slurmd_port, "dbd_port": site.dbd_port, "db_port": site.db_port,
        "munge_socket": site.munge_socket, "dir": site.slurm_dir,
        "dev_dir": site.dev_dir, "db_pass": site.db_password(), **node_values(site),
    }  # fmt: skip


def render_confs(site: Site, templates: Path = TEMPLATES) -> dict[str, str]:
    """The rendered text of slurm.conf, gres.conf and slurmdbd.conf (a missing key raises)."""
    values = conf_values(site)
    return {
        name: string.Template((templates / name).read_text()).substitute(values) for name in CONFS
    }


def render(site: Site) -> None:
    """Write the Slurm configs (slurmdbd.conf mode 600: it holds a password) and GPU devices."""
    d = site.slurm_dir
    for sub in ("state", "spool"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    if site.multi_node:  # slurmd does not make its SlurmdSpoolDir=.../%n itself
        for name in site.node_names():
            (d / "spool" / name).mkdir(exist_ok=True)
    for name, text in render_confs(site).items():
        path = d / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o600 if name == "slurmdbd.conf" else 0o644)
        tmp.replace(path)
    make_gpu_devices(site)


def make_gpu_devices(site: Site) -> None:
    """Character devices (c 195 N, like /dev/nvidiaN) for gres.conf's File=: two on one
    node, gpus_per_node for each compute node of a multi-node site."""
    site.dev_dir.mkdir(parents=True, exist_ok=True)
    for i in range(max(2, site.gpus_per_node * len(site.node_names()))):
        dev = site.dev_dir / f"nvidia{i}"
        if not dev.exists():
            os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(195, i))


# -- munge ------------------------------------------------------------------------------
def munge_argv(site: Site) -> list[str]:
    m = site.munge_dir
    m.mkdir(parents=True, exist_ok=True)
    # Open to everyone, like /run/munge: the start-ups' jobs (srun, scontrol requeue) reach
    # munged's socket. Its key is readable by root only.
    m.chmod(0o755)
    key = m / "munge.key"
    if not key.exists():
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(1024))
    return ["munged", "--foreground", "--force", f"--key-file={key}",
            f"--socket={site.munge_socket}", f"--pid-file={m / 'munged.pid'}",
            f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"]  # fmt: skip


DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"


def link_default_munge_socket(site: Site) -> None:
    """Slurm 22.05's accounting connections (sacctmgr, sacct -> slurmdbd) ignore AuthInfo's
    socket and use munge's default path: point that path at our socket when it is free."""
    link = DEFAULT_MUNGE_SOCKET
    if os.path.islink(link) and os.readlink(link) == str(site.munge_socket):
        return
    if os.path.lexists(link):
        if munge_default_ok():
            return  # a system munged already serves the default socket with its own key
        if not os.path.islink(link):
            raise SiteError(
                f"site part munged: {link} exists and is not ours; stop the system munged or "
                "remove it"
            )
        # A link that nothing answers on: left by a site that was killed before its `down`
        # (its munged is gone), here or in another clone. Replaced below.
        os.unlink(link)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(site.munge_socket, link)


def unlink_default_munge_socket(site: Site) -> None:
    link = DEFAULT_MUNGE_SOCKET
    if os.path.islink(link) and os.readlink(link) == str(site.munge_socket):
        os.unlink(link)


def munge_default_ok() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    return cred.returncode == 0


def munge_ok(site: Site) -> bool:
    if not site.munge_socket.exists():
        return False
    cred = subprocess.run(["munge", "-n", "-S", str(site.munge_socket)], capture_output=True)
    if cred.returncode != 0:
        return False
    dec = subprocess.run(["unmunge", "-S", str(site.munge_socket)], input=cred.stdout,
                         capture_output=True)  # fmt: skip
    return dec.returncode == 0


# -- MariaDB ----------------------------------------------------------------------------
def mariadb_argv(site: Site) -> list[str]:
    d = site.mysql_dir
    if not (d / "mysql").exists():
        d.mkdir(parents=True, exist_ok=True)
        procs.run(["mariadb-install-db", "--no-defaults", f"--datadir={d}", "--user=root",
                   "--auth-root-authentication-method=socket", "--skip-test-db"],
                  timeout=300)  # fmt: skip
    return ["mariadbd", "--no-defaults", f"--datadir={d}", f"--port={site.db_port}",
            "--bind-address=127.0.0.1", f"--socket={site.mysql_socket}", "--user=root",
            f"--pid-file={site.root / 'mariadbd.pid'}", "--skip-name-resolve",
            "--innodb-buffer-pool-size=128M", "--max-connections=100"]  # fmt: skip


def mariadb_ok(site: Site) -> bool:
    return procs.port_open("127.0.0.1", site.db_port) and site.mysql_socket.exists()


def mariadb_grant(site: Site) -> None:
    pw = site.db_password()
    sql = (f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';"
           f"ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';"
           "CREATE DATABASE IF NOT EXISTS slurm_acct_db;"
           "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")  # fmt: skip
    procs.run(["mariadb", "--no-defaults", f"--socket={site.mysql_socket}", "-uroot"],
              input_text=sql)  # fmt: skip


# -- Slurm daemons ----------------------------------------------------------------------
def slurmdbd_argv(site: Site) -> list[str]:
    # slurmdbd has no -f: it reads slurmdbd.conf beside $SLURM_CONF.
    return ["slurmdbd", "-D"]


def slurmdbd_ok(site: Site) -> bool:
    if not procs.port_open("127.0.0.1", site.dbd_port):
        return False
    out = subprocess.run(
        ["sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"],
        capture_output=True, text=True, env={**os.environ, **site.slurm_env()},
    )  # fmt: skip
    return out.returncode == 0


def sacctmgr(site: Site, *args: str) -> str:
    proc = procs.run(["sacctmgr", "-i", *args], env=site.slurm_env(), check=False)
    text = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0 and "Nothing new added" not in text and "already exists" not in text:
        raise SiteError(f"site part slurmdbd: `sacctmgr {' '.join(args)}` failed: {text[:300]}")
    return text


def reload_users(site: Site) -> None:
    """slurmctld maps each association's user to a uid when it loads it: an association
    added before its Unix user existed (a fresh site) stays without one, and the user's
    jobs are refused ("Invalid account or account/partition combination") until slurmctld
    re-reads them. `scontrol reconfigure` does (it keeps running jobs); every `up` runs it
    once the users and accounts are in place."""
    proc = procs.run(["scontrol", "reconfigure"], env=site.slurm_env(), check=False)
    if proc.returncode != 0:
        raise SiteError("site part slurmctld: `scontrol reconfigure` failed: "
                        f"{(proc.stdout + proc.stderr).strip()[:300]}")  # fmt: skip


def ensure_cluster(site: Site) -> None:
    sacctmgr(site, "add", "cluster", CLUSTER)


def ensure_accounts(site: Site) -> None:
    """One Slurm account per start-up; its Unix user is associated with it alone (so it
    cannot submit under another's), root (the orchestrator, the operators) with all."""
    for acct in ACCOUNTS:
        sacctmgr(site, "add", "account", acct, f"Description=start-up {acct}",
                 "Organization=aifactory")  # fmt: skip
    sacctmgr(site, "add", "user", "root", f"Account={','.join(ACCOUNTS)}",
             f"DefaultAccount={ACCOUNTS[0]}")  # fmt: skip
    for acct in ACCOUNTS:
        sacctmgr(site, "add", "user", acct, f"Account={acct}", f"DefaultAccount={acct}")


# -- the start-ups' Unix users ----------------------------------------------------------
def homes(site: Site) -> Path:
    return site.root / "homes"


def ensure_unix_users(site: Site, progress: Callable[[str], None]) -> None:
    """A Unix group and user per start-up (named as its account; no login shell, its home
    under <site>/homes, mode 700): its Slurm jobs and Dask workers run as that user."""
    import grp
    import pwd

    homes(site).mkdir(parents=True, exist_ok=True)
    try:
        grp.getgrnam(STARTUPS_GROUP)
    except KeyError:
        procs.run(["groupadd", "--system", STARTUPS_GROUP])
    made = []
    for name in ACCOUNTS:
        home = homes(site) / name
        try:
            grp.getgrnam(name)
        except KeyError:
            procs.run(["groupadd", "--system", name])
        try:
            pwd.getpwnam(name)
        except KeyError:
            procs.run(["useradd", "--system", "--gid", name, "--groups", STARTUPS_GROUP,
                       "--home-dir", str(home), "--no-create-home",
                       "--shell", "/usr/sbin/nologin", name])  # fmt: skip
            made.append(name)
        if name not in grp.getgrnam(STARTUPS_GROUP).gr_mem:
            procs.run(["usermod", "--append", "--groups", STARTUPS_GROUP, name])
        home.mkdir(exist_ok=True)
        pw = pwd.getpwnam(name)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o700)
    if made:
        progress(f"Unix users {', '.join(made)} (the start-ups' jobs run as them)")


STARTUPS_GROUP = "aif-startups"  # every start-up's user is in it (supplementary)
# What the start-ups' jobs need of the site's folder: Slurm's config (srun, scontrol
# requeue), munged's socket, their homes, their run folders. Everything else in it (the
# object store's disk and keys, the databases, logs, secrets) is the operators' alone.
# The relay's spools (relay/<run>/, each root's with the start-up's group) likewise.
OPEN_TO_JOBS = {"runs": 0o711, "homes": 0o711, "slurm": 0o755, "munge": 0o755, "dev": 0o755,
                "relay": 0o711}  # fmt: skip
# Under runs/: the start-ups' run folders (each handed to its start-up, mode 700) sit in
# folders they can traverse but not list; the platform's records are closed.
RUN_AREAS = {"train": 0o711, "dask": 0o711, "sweeps": 0o711, "replay": 0o711, "flows": 0o711,
             "models": 0o700, "pipeline": 0o700, "audit": 0o700}  # fmt: skip


def close_site_folder(site: Site) -> None:
    """Modes of the site's folder: traversable (711) at its root, open where jobs need it,
    closed (700 folders, 600 files) everywhere else."""
    os.chmod(site.root, 0o711)
    for child in site.root.iterdir():
        if child.is_symlink():
            continue
        if child.name in OPEN_TO_JOBS:
            os.chmod(child, OPEN_TO_JOBS[child.name])
        else:
            os.chmod(child, 0o700 if child.is_dir() else 0o600)
    (site.root / "slurm" / "state").chmod(0o700)
    runs = site.root / "runs"
    for name, mode in RUN_AREAS.items():
        (runs / name).mkdir(parents=True, exist_ok=True)
        os.chmod(runs / name, mode)


def open_path_to(path: Path, acl: str, as_user: list[str]) -> list[str]:
    """Give ``acl`` (an ACL entry such as ``g:GROUP:x``) on each folder above ``path`` that
    the user ``as_user`` runs as cannot traverse (nothing else changes); the folders opened."""
    opened = []
    for folder in reversed(path.resolve().parents):
        if folder.stat().st_mode & stat.S_IXOTH:
            continue
        # Asked as that user: its groups and the folder's ACL decide.
        can = procs.run([*as_user, "test", "-x", str(folder)], check=False)
        if can.returncode == 0:
            continue
        procs.run(["setfacl", "-m", acl, str(folder)])
        opened.append(str(folder))
    return opened


def open_path_to_startups(path: Path) -> list[str]:
    """Give the start-ups' group traverse (x) on each folder above ``path`` that denies it."""
    return open_path_to(path, f"g:{STARTUPS_GROUP}:x", ["runuser", "-u", ACCOUNTS[0], "--"])


def check_startup_users_can_run(site: Site, runs_dir: Path, python: str) -> None:
    """The start-ups' users can run this installation's Python and reach the runs folder
    (a clone or home under a folder closed to others, such as /root, would fail every
    job with a permission error)."""
    user = ACCOUNTS[0]
    probe = procs.run(["runuser", "-u", user, "--", python, "-c",
                       "import aifactory.tasks.payloads.job"], check=False, timeout=60)  # fmt: skip
    if probe.returncode != 0:
        tail = " ".join((probe.stderr or probe.stdout).split())[-200:]
        raise SiteError(
            f"site: start-up user {user} cannot run {python} ({tail}): a folder on its path "
            "is closed to other users (e.g. /root, mode 700); put the clone where they can "
            "read it (e.g. /srv or /opt)"
        )
    reach = procs.run(["runuser", "-u", user, "--", "test", "-x", str(runs_dir)], check=False)
    if reach.returncode != 0:
        raise SiteError(
            f"site: start-up user {user} cannot reach the runs folder {runs_dir}: a folder "
            "above it is closed to other users (e.g. /root, mode 700); set AIF_HOME (or "
            "AIF_SITE_DIR) to a folder they can traverse"
        )


def ensure_budget_limits(site: Site) -> None:
    """Slurm's own cap, beside admission.budget. Needs slurmctld up: the gres/gpu TRES
    exists in the database only once slurmctld has registered AccountingStorageTRES."""
    for acct, hours in site_budgets().items():
        sacctmgr(site, *budget_limit_args(acct, hours))


def budget_limit_args(account: str, gpu_hours: float | None) -> list[str]:
    """sacctmgr arguments capping the account's GPU-minutes at its budget (-1: no cap)."""
    minutes = -1 if gpu_hours is None else round(gpu_hours * 60)
    return ["modify", "account", account, "set", f"GrpTRESMins=gres/gpu={minutes}"]


def site_profile_as_written() -> Any:
    """The site profile as its file says, without any AIF_*__* override of one run: the
    site's limits, users and policies never change with a run's environment."""
    from aifactory.tasks.core.config import load_profile

    env = {k: v for k, v in os.environ.items() if not (k.startswith("AIF_") and "__" in k)}
    return load_profile("site", env=env)


def site_budgets() -> dict[str, float | None]:
    """Slurm account -> gpu_hours_budget of the site profile's start-ups (the file as
    written: AIF_*__* overrides of one run never change the site's limits)."""
    cfg = site_profile_as_written()
    return {st.account: st.gpu_hours_budget for st in cfg.startups.values()
            if st.account in ACCOUNTS}  # fmt: skip


def slurmctld_argv(site: Site) -> list[str]:
    return ["slurmctld", "-D", "-f", str(site.slurm_conf)]


def slurmctld_ok(site: Site) -> bool:
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True,
                         env={**os.environ, **site.slurm_env()})  # fmt: skip
    return out.returncode == 0 and "UP" in out.stdout


def slurmd_argv(site: Site, name: str | None = None) -> list[str]:
    return ["slurmd", "-D", "-f", str(site.slurm_conf), "-N", name or host()]


def node_state(site: Site, name: str | None = None) -> str:
    out = subprocess.run(["sinfo", "-h", "-N", "-n", name or host(), "-o", "%T"],
                         capture_output=True, text=True,
                         env={**os.environ, **site.slurm_env()})  # fmt: skip
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def node_ok(site: Site, name: str) -> bool:
    """The node serves jobs; a node that Slurm set down (its slurmd was gone) is resumed
    once its slurmd runs again."""
    state = node_state(site, name).rstrip("*~#!%$@^-")
    if state in ("down", "drained", "draining", "drain"):
        subprocess.run(["scontrol", "update", f"nodename={name}", "state=resume"],
                       capture_output=True, env={**os.environ, **site.slurm_env()})  # fmt: skip
        return False
    return state in ("idle", "mixed", "allocated", "completing")


def slurmd_ok(site: Site) -> bool:
    return node_ok(site, host())


def running_jobs(site: Site) -> list[str]:
    """Ids of jobs that are running now (their slurmstepd outlives slurmd)."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "RUNNING,COMPLETING", "-o", "%i"],
        capture_output=True, text=True, env={**os.environ, **site.slurm_env()},
    )  # fmt: skip
    return out.stdout.split() if out.returncode == 0 else []
