"""Where the site keeps its state and which loopback ports it uses."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

S3_KEY = "aif-site-key"
S3_SECRET = "aif-site-secret"
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
    prefect_port: int = 4200
    mlflow_port: int = 5050

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

    def s3_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.s3_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
        }

    def s3_storage_options(self) -> dict[str, object]:
        return {
            "key": S3_KEY,
            "secret": S3_SECRET,
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


def host() -> str:
    return socket.gethostname().split(".")[0]


def memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(int(line.split()[1]) / 1024 * 0.9)
    return 4096
