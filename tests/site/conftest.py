"""Site fixtures: the real local site (aif site up) and one real pipeline run on it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.config import Profile, load_profile

REPO = Path(__file__).resolve().parents[2]
AIF = str(Path(sys.executable).with_name("aif"))


@dataclass
class RunResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def last_line(self) -> str:
        lines = self.stdout.strip().splitlines()
        return lines[-1] if lines else ""

    @property
    def error_lines(self) -> list[str]:
        return [ln for ln in self.stderr.splitlines() if ln.startswith("aif: error:")]


# The site's MLflow checks permissions. The suite's own process reads and cleans up as the
# registry's admin (registry_admin below); nothing it starts inherits that identity, so
# every `aif` and every script of a test acts as the profile makes it act.
REGISTRY_ADMIN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def child_environ(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child, without the registry admin's identity."""
    env = {k: v for k, v in os.environ.items() if k not in REGISTRY_ADMIN_ENV}
    return {**env, **(extra or {})}


def aif(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> RunResult:
    proc = subprocess.run(
        [AIF, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
        env=child_environ(env),
    )  # fmt: skip
    return RunResult(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session", autouse=True)
def registry_admin(request: pytest.FixtureRequest) -> Iterator[None]:
    """MlflowClient in the suite's process acts as the site registry's admin (its password
    is a root-only file of `aif site up`): tests read and delete what any start-up made."""
    if not request.config.getoption("--site"):
        yield
        return
    from aifactory.infra.site import mlflow_auth
    from aifactory.infra.site.layout import Site
    from aifactory.infra.site.manager import site_root
    from aifactory.tasks.core.home import site_dir

    site = Site(site_root(site_dir()))
    saved = {k: os.environ.get(k) for k in REGISTRY_ADMIN_ENV}
    os.environ.update(zip(REGISTRY_ADMIN_ENV, (mlflow_auth.ADMIN,
                          mlflow_auth.password(site, mlflow_auth.ADMIN)), strict=True))  # fmt: skip
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def prefect_client(profile: Profile) -> Iterator[Any]:
    """A synchronous Prefect client on the profile's API (the site's Prefect server)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: profile.prefect.api_url}), \
            get_client(sync_client=True) as client:  # fmt: skip
        yield client


@pytest.fixture(scope="session")
def site_profile() -> Profile:
    status = aif("site", "status")
    if status.returncode != 0:
        pytest.fail(f"the local site is not healthy (run: aif site up):\n{status.stdout}")
    return load_profile("site")


@pytest.fixture(scope="session")
def site_env(site_profile: Profile) -> dict[str, str]:
    return child_environ(site_profile.child_env())


@pytest.fixture(scope="session")
def site_run(site_profile: Profile) -> dict[str, Any]:
    """One full `aif run --profile site`; returns its pipeline record and output."""
    res = aif("run", "--profile", "site", "--epochs", "4")
    assert res.returncode == 0, f"aif run failed:\n{res.stdout}\n{res.stderr}"
    ui = [ln for ln in res.stdout.splitlines() if ln.startswith("Prefect UI:")]
    assert ui, res.stdout
    run_id = ui[0].rsplit("/", 1)[-1]
    record_path = Path(site_profile.runs_dir) / "pipeline" / f"{run_id}.json"
    record = json.loads(record_path.read_text())
    return {"result": res, "flow_run_id": run_id, "record": record}


def running_training(proc: subprocess.Popen[str], out: list[str],
                     checkpoints: int = 2) -> tuple[str, str]:  # fmt: skip
    """Read an `aif run`'s output (kept in ``out``) until its training job runs, then wait
    until its ledger has ``checkpoints`` epochs; the job id and run folder."""
    import re
    import time

    assert proc.stdout is not None
    job = run_dir = ""
    for line in proc.stdout:
        out.append(line)
        m = re.search(r"script (.+)/train\.sbatch", line)
        run_dir = m.group(1) if m else run_dir
        m = re.search(r"\[train\] job (\d+): RUNNING", line)
        if m:
            job = m.group(1)
            break
    assert job and run_dir, "".join(out)
    ledger = Path(run_dir, "ledger.jsonl")
    deadline = time.monotonic() + 60
    while (not ledger.exists() or len(ledger.read_text().splitlines()) < checkpoints) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert ledger.exists(), "no epoch was checkpointed"
    return job, run_dir
