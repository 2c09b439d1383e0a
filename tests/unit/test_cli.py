"""The aif command: dry runs submit nothing and show no secrets; errors are one line."""

from __future__ import annotations

import pytest

from aifactory.tasks.cli import main


def test_dry_run_shows_job_scripts_without_secrets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "CANARY-SECRET-42")
    monkeypatch.setenv("AIF_DASK__LIFETIME", "25m")
    assert main(["run", "--profile", "site", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH -A startup-a" in out and "#SBATCH -p cpu" in out
    assert "--lifetime 25m --lifetime-stagger 2m" in out
    assert "#SBATCH --gres=gpu:1" in out and "#SBATCH --account=startup-a" in out
    assert "CANARY-SECRET-42" not in out


def test_bad_profile_value_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIF_DASK__ADAPTIVE_MIN", "3")
    monkeypatch.setenv("AIF_DASK__ADAPTIVE_MAX", "1")
    assert main(["run", "--profile", "site", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aif: error: profile ") and "adaptive_min is larger" in err
    assert "\n" not in err
