"""Lineage facts: code commit, dirty tree, environment hash, run keys."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def git_info(root: Path = REPO_ROOT, owner: str | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the code that runs; 'unknown' outside a git checkout.

    A repository of a start-up (``owner``, its Unix user, owns the folder) is read by git
    running as that user: git run as root there would refuse it ("dubious ownership"),
    and told to trust it would run what the repository's config names (core.fsmonitor, a
    pager) as root."""
    from aifactory.tasks.core.jobfiles import as_user, owned_by

    mine = owner if owner and owned_by(root, owner) else None

    def git(*args: str) -> str | None:
        argv, env = ["git", "-C", str(root), *args], None
        if mine:
            argv, env = as_user(mine, argv)
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, env=env,
                                 stdin=subprocess.DEVNULL)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown", "dirty": True}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


@functools.lru_cache(maxsize=1)
def _environment() -> tuple[str, tuple[tuple[str, str], ...]]:
    pkgs = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    return sys.version.split()[0], tuple(sorted(pkgs.items()))


def environment() -> dict[str, Any]:
    """Python and every installed package's version (read once per process)."""
    python, pkgs = _environment()
    return {"python": python, "packages": dict(pkgs)}


def environment_hash(env: dict[str, Any] | None = None) -> str:
    env = env or environment()
    blob = json.dumps(env, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# The source files each stage's result depends on: part of its cache key, so that changing
# the code of a stage re-runs it (and what is downstream), and nothing upstream of it.
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "preprocess": ("tasks/stages/features.py", "tasks/stages/preprocess.py"),
    "train": ("tasks/payloads/train_tabular.py", "tasks/payloads/tabular_model.py",
              "tasks/stages/training.py", "infra/templates/train.sbatch"),
}  # fmt: skip
STAGE_PACKAGES: dict[str, tuple[str, ...]] = {
    "preprocess": ("pyarrow", "numpy", "pandas", "dask", "distributed", "fsspec", "s3fs"),
}


def code_hash(stage: str, root: Path = REPO_ROOT) -> str:
    """sha256 (16 hex) of the stage's source files and the versions of its packages."""
    h = hashlib.sha256(stage.encode())
    for rel in STAGE_CODE.get(stage, ()):
        h.update(f"\n{rel}\n".encode())
        h.update((root / rel).read_bytes())
    for pkg in STAGE_PACKAGES.get(stage, ()):
        try:
            h.update(f"\n{pkg}=={metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"\n{pkg} absent".encode())
    return h.hexdigest()[:16]


def key_of(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
