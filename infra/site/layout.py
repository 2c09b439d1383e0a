"""Where the site keeps its state and which loopback ports it uses."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

S3_KEY = "aif-site-key"  # the platform's access key id; its secret: Site.platform_secret()
REGION = "us-east-1"
BUCKETS = ("aif-dataspace", "aif-lake", "aif-mlflow")
ACCOUNTS = ("startup-a", "startup-b", "startup-c")
CLUSTER = "aif"


@dataclass(frozen=True)
class Site:
    root: Path
    db_port: int = 3307
    ctld_port: int = 6817
    slurmd_port: int = 6818
    dbd_port: int = 6819
    s3_port: int = 9010
    mon_port: int = 3301  # Ceph's monitor (msgr2); OSD and gateway use 7100-7300
    prefect_port: int = 4200
    mlflow_port: int = 5050
    pg_port: int = 5433  # PostgreSQL (Prefect's and MLflow's databases)
    # 1: the single-node site (this host is login and compute node, everything on
    # loopback). N >= 2: N compute nodes, each a slurmd in its own network, UTS and mount
    # namespace on the site's bridge (infra/site/nodes.py); the services that compute nodes
    # need (Slurm's controller, the object store, Dask schedulers) are at the bridge address.
    nodes: int = 1
    gpus_per_node: int = 2
    subnet: str = "10.87.0"  # the bridge's /24: .1 is the login side, .11, .12, ... the nodes

    @property
    def multi_node(self) -> bool:
        return self.nodes > 1

    @property
    def service_address(self) -> str:
        """Where the compute nodes reach the login node's services (loopback on one node)."""
        return f"{self.subnet}.1" if self.multi_node else "127.0.0.1"

    def node_names(self) -> list[str]:
        return [f"aif-n{i}" for i in range(1, self.nodes + 1)] if self.multi_node else [host()]

    def node_address(self, name: str) -> str:
        if not self.multi_node:
            return "127.0.0.1"
        return f"{self.subnet}.{10 + int(name.removeprefix('aif-n'))}"

    # -- folders ----------------------------------------------------------------------
    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def munge_dir(self) -> Path:
        return self.root / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.sock"

    @property
    def mysql_dir(self) -> Path:
        return self.root / "mysql"

    @property
    def mysql_socket(self) -> Path:
        return self.root / "mysql.sock"

    @property
    def dev_dir(self) -> Path:
        return self.root / "dev"

    @property
    def slurm_conf(self) -> Path:
        return self.slurm_dir / "slurm.conf"

    @property
    def state_file(self) -> Path:
        return self.root / "site.json"

    # -- addresses --------------------------------------------------------------------
    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def slurm_env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.slurm_conf)}

    @property
    def platform_secret_file(self) -> Path:
        return self.root / "secrets" / "s3" / "platform.secret"

    def platform_secret(self) -> str:
        """The platform's secret access key on the object store: made once, random, kept
        in a file only root reads (a start-up's code must never be able to use it)."""
        path = self.platform_secret_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)
            os.chmod(path.parent.parent, 0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(30))
        return path.read_text().strip()

    def s3_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": self.platform_secret(),
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.s3_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
        }

    def s3_storage_options(self) -> dict[str, object]:
        return {
            "key": S3_KEY,
            "secret": self.platform_secret(),
            "client_kwargs": {"endpoint_url": self.s3_url, "region_name": REGION},
        }

    def db_password(self) -> str:
        path = self.root / "mysql-slurm.pass"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(16))
        return path.read_text().strip()


def private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (no window with a wider mode;
    its folder is closed to others too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """A value made once and kept in ``path`` (a password, the cluster's fsid, a key)."""
    if not path.exists():
        private_file(path, make())
    return path.read_text().strip()


def host() -> str:
    return socket.gethostname().split(".")[0]


def memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) / 1024 * 0.9)
    return 4096
