"""The aif command: dry runs submit nothing and show no secrets; errors are one line."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert err.startswith("aif: error: environment variables AIF_DASK__ADAPTIVE_MAX, "
                          "AIF_DASK__ADAPTIVE_MIN: dask: adaptive_min is larger")  # fmt: skip
    assert "\n" not in err


def _err_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_flag_value_blames_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--epochs", "-1", "--dry-run"]) == 2
    err = _err_line(capsys)
    assert err.startswith("aif: error: aif run: ") and "'--epochs'" in err
    assert main(["train-lm", "--steps", "0"]) == 2
    assert "'--steps'" in _err_line(capsys)
    assert main(["run", "--epochz", "3"]) == 2
    assert "No such option: --epochz" in _err_line(capsys)


def test_bad_environment_value_blames_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIF_TRAINING__EPOCHZ", "3")
    assert main(["run", "--dry-run"]) == 2
    err = _err_line(capsys)
    assert "AIF_TRAINING__EPOCHZ" in err and "local.yaml" not in err, err


def test_verbose_flag_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--profile", "site", "--dry-run", "-v"]) == 0
    assert main(["-v", "run", "--profile", "site", "--dry-run"]) == 0


def test_slurm_only_commands_refuse_at_once_on_local(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("aifactory.tasks.cli._use_prefect", _no_service)
    assert main(["report", "usage"]) == 2
    assert "no Slurm accounting" in _err_line(capsys)
    assert not (tmp_path / "home" / "local").exists()  # nothing ingested, nothing started
    # (a sweep runs on local too: the job layer's local array; tests/test_examples.py)


def _no_service(*args: object, **kwargs: object) -> str:
    raise AssertionError("a refused command must not reach Prefect")


def test_json_listings(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                       tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    assert main(["catalog", "ls", "--json"]) == 0
    ids = [d["id"] for d in json.loads(capsys.readouterr().out)]
    assert "mobility-trips" in ids and "health-records" in ids
    assert main(["snapshot", "ls", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["status", "--json"]) == 0  # starts nothing: no server, no runs yet
    info = json.loads(capsys.readouterr().out)
    assert info["profile"] == "local" and info["runs"] == [] and not info["prefect"]["running"]
    assert info["home"] == str(tmp_path / "home")


def test_table_output_is_not_cut_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "ls"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["dataset", "data", "space"]
    assert all("…" not in ln for ln in lines)


def test_shell_completion_script(capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import shellingham

    # typer finds the shell among this process's parents: a suite started without one (in
    # the background, by a service) has none, so the test names it.
    monkeypatch.setattr(shellingham, "detect_shell", lambda *a, **k: ("bash", "/bin/bash"))
    with pytest.raises(SystemExit) as done:  # typer's completion option exits by itself
        main(["--show-completion", "bash"])
    assert done.value.code == 0
    assert "complete" in capsys.readouterr().out


def test_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("run", "status", "runs", "logs", "deploy", "server", "site", "snapshot"):
        assert cmd in out, cmd


def test_every_profile_option_has_the_same_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16: `--profile` defaulted to local in some commands and site in others. Now
    every command's default is $AIF_PROFILE, else local."""
    import typer

    from aifactory.tasks.cli import app

    def commands(cmd: object, path: str) -> list[tuple[str, object]]:
        subs = getattr(cmd, "commands", None)
        if subs:
            return [c for name, sub in subs.items() for c in commands(sub, f"{path} {name}")]
        return [(path, cmd)]

    seen = 0
    for path, cmd in commands(typer.main.get_command(app), "aif"):
        for param in getattr(cmd, "params", []):
            if "--profile" in getattr(param, "opts", []):
                assert param.default is None, path
                seen += 1
    assert seen >= 12
    monkeypatch.setenv("AIF_PROFILE", "site")
    assert main(["run", "--dry-run"]) == 0
    assert "#SBATCH --account=startup-a" in capsys.readouterr().out


def test_hostile_inputs_are_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What a hostile test of the new CLI found (issue 16's review)."""
    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    # An empty value is an error, never "the default" (a script's unset variable).
    assert main(["run", "--dataspace", "", "--dry-run"]) == 2
    assert "--dataspace: empty value" in _err_line(capsys)
    assert main(["run", "--profile=", "--dry-run"]) == 2
    assert "--profile: empty value" in _err_line(capsys)
    # A snapshot id or dataset that climbs out of the start-up's part of the lake.
    assert main(["snapshot", "show", "../../../startup-b/snapshots/mobility-trips/x"]) != 0
    assert "not a valid name" in _err_line(capsys)
    assert main(["snapshot", "ls", "--dataset", "../../startup-b/snapshots/m"]) != 0
    assert "not a valid name" in _err_line(capsys)
    # An unknown start-up for a new project fails at once.
    assert main(["init", "x", "--dir", str(tmp_path / "x"), "--startup", "nosuch"]) == 2
    assert "nosuch" in _err_line(capsys) and not (tmp_path / "x").exists()
    # AIF_PROFILE is named when it is wrong.
    monkeypatch.setenv("AIF_PROFILE", "nope")
    assert main(["status"]) == 2
    assert "environment variable AIF_PROFILE: unknown profile 'nope'" in _err_line(capsys)


def test_dry_run_is_a_gate_and_hides_url_passwords(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    assert main(["run", "--dry-run", "--purpose", "nope"]) == 1  # the run would stop
    out = capsys.readouterr().out
    assert "the run would stop here" in out
    assert main(["catalog", "ls", "-v"]) == 0  # -v after any command
    capsys.readouterr()
    assert main(["profile", "show", "--profile", "site"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "site"
    monkeypatch.setenv("AIF_DATASPACE__URL", "http://u:CANARY777@127.0.0.1:1/y")
    assert main(["profile", "show"]) == 0
    shown = capsys.readouterr().out
    assert "CANARY777" not in shown and "u:***@127.0.0.1" in shown


def test_partial_feature_settings_refine_the_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """AIF_FEATURES__SPLIT__TRAIN=80 (the default's value) changed nothing else; it used to
    wipe the other split keys (and PARAMS__CLEAN__... the other cleaning ranges)."""
    from aifactory.tasks.core.config import load_profile

    base = load_profile("local").public_dict()["features"]
    monkeypatch.setenv("AIF_FEATURES__SPLIT__TRAIN", str(base["split"]["train"]))
    monkeypatch.setenv("AIF_FEATURES__PARAMS__CLEAN__DURATION_MIN",
                       json.dumps(base["params"]["clean"]["duration_min"]))  # fmt: skip
    assert load_profile("local").public_dict()["features"] == base


def test_a_nightly_report_of_a_date_that_is_none_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["report", "nightly", "--date", "2026-13-40"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--date '2026-13-40': not a date (YYYY-MM-DD)" in err and "\n" not in err
