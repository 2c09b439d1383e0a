"""`aif run --in-allocation` (tasks/control/in_allocation.py): what it refuses before it
makes or submits anything, and the profile its job gets. The run itself is a site test
(tests/site/test_multinode_site.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from aifactory.tasks.cli import main


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and len(err) < 400, err
    return err


def _profile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "alloc profile.yaml"
    path.write_text("extends: local\nname: alloc\n" + text)
    return str(path)


def test_a_profile_without_an_allocation_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--profile", "local", "--in-allocation"]) == 2
    assert "profile local has no allocation section" in _one_line(capsys)


def test_a_startup_without_a_unix_user_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prof = _profile(tmp_path, f"allocation: {{relay_dir: {tmp_path / 'relay'}}}\n")
    assert main(["run", "--profile", prof, "--in-allocation"]) == 2
    assert "start-up startup-a has no Unix user" in _one_line(capsys)
    assert not (tmp_path / "relay").exists()


def test_a_relay_that_does_not_answer_is_named_before_anything_is_made(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("the orchestrator runs as root")
    relay = tmp_path / "relay"
    relay.mkdir()
    (relay / ".alive").write_text("1\n")
    old = 1_000_000_000
    os.utime(relay / ".alive", (old, old))  # a relay that stopped long ago
    prof = _profile(tmp_path, f"allocation: {{relay_dir: {relay}}}\n"
                    "startups: {startup-a: {user: root}}\n")  # fmt: skip
    assert main(["run", "--profile", prof, "--in-allocation"]) == 2
    assert f"the site's relay does not answer in {relay}" in _one_line(capsys)
    assert os.listdir(relay) == [".alive"]


def test_the_jobs_profile_holds_only_the_startups_own_temporary_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aifactory.tasks.control import in_allocation
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.doors import s3_identity

    asked: list[tuple[str, int]] = []

    def session(keys: str, startup: str, endpoint: str | None, region: str,
                seconds: int) -> s3_identity.Session:  # fmt: skip
        asked.append((startup, seconds))
        return s3_identity.Session(startup, "STS-KEY", "STS-SECRET", "STS-TOKEN",
                                   dt.datetime.now(dt.UTC))  # fmt: skip

    monkeypatch.setattr(s3_identity, "session", session)
    monkeypatch.setenv("AIF_OBJECT_STORE__KEY", "platform-key")
    monkeypatch.setenv("AIF_OBJECT_STORE__SECRET", "PLATFORM-SECRET")
    cfg = load_profile("site")
    doc = in_allocation.job_profile(cfg, "startup-b", "site", tmp_path / "job dir")
    text = yaml.safe_dump(doc)
    assert "PLATFORM-SECRET" not in text and "platform-key" not in text
    assert asked == [("startup-b", 40 * 60 + 1800)]  # the allocation's time limit and more
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    for var in ("AIF_OBJECT_STORE__KEY", "AIF_OBJECT_STORE__SECRET"):
        monkeypatch.delenv(var)  # the job's environment has neither
    monkeypatch.setenv("AIF_RELAY_URL", "http://127.0.0.1:1234")
    job = load_profile(str(path))
    assert job.object_store is not None and job.object_store.tenant_keys is None
    assert job.object_store.key is not None and job.object_store.key.get_secret_value() == "STS-KEY"
    assert job.dask.kind == "local" and job.training.executor == "local"
    assert all(st.user is None for st in job.startups.values())  # no --uid, no runuser
    assert job.prefect.api_url == "http://127.0.0.1:1234/prefect/api"
    assert job.mlflow.tracking_uri == "http://127.0.0.1:1234/mlflow"
    assert job.mlflow.tenant_credentials is None and job.mlflow.experiment.endswith("-startup-b")
    assert job.allocation is None  # no flow job inside the flow job
    assert job.runs_dir == str(tmp_path / "job dir" / "runs")  # the start-up's own folder
    # Tenancy is the site's: the job's start-up keeps its account and prefix.
    assert job.startups["startup-b"].account == "startup-b"
    assert job.startups["startup-b"].s3_prefix == "startup-b"


def test_the_jobs_environment_keeps_the_runs_settings_but_no_secret() -> None:
    from aifactory.tasks.control.in_allocation import passed_env

    env = {"AIF_TRAINING__SEED": "7", "AIF_DASK__MEMORY": "3GiB", "AIF_LAKE__URL": "s3://x",
           "AIF_OBJECT_STORE__SECRET": "S", "AIF_MLFLOW__TENANT_CREDENTIALS": "/etc",
           "AIF_DATASPACE__PSEUDONYMISATION_KEY": "K", "AIF_DASK__KIND": "slurm",
           "AIF_TRAINING__EXECUTOR": "slurm", "AIF_STARTUPS__STARTUP_A__USER": "root",
           "AIF_PREFECT__API_URL": "http://x", "AIF_HOME": "/h", "PATH": "/bin"}  # fmt: skip
    assert passed_env(env) == {"AIF_TRAINING__SEED": "7", "AIF_DASK__MEMORY": "3GiB",
                               "AIF_LAKE__URL": "s3://x"}  # fmt: skip
