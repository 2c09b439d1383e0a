"""The orchestrator reads a job's folder (which the start-up's own user owns on a site)
without following a link the job planted, and refuses anything but regular files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aifactory.tasks.core.errors import ConfigError, TenancyError
from aifactory.tasks.core.jobfiles import (
    JobFileError,
    check_job_tree,
    copy_job_tree,
    read_job_bytes,
    read_job_text,
)


def _secret(tmp_path: Path) -> Path:
    s = tmp_path / "site-secret"
    s.write_text("TOP-SECRET")
    return s


def test_a_link_in_a_jobs_folder_is_refused_not_followed(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text('{"a": 1}')
    assert read_job_text(run / "metrics.json") == '{"a": 1}'
    os.symlink(secret, run / "environment.json")
    with pytest.raises(JobFileError, match=r"environment.json: is reached through a symbolic "
                                           r"link") as err:  # fmt: skip
        read_job_text(run / "environment.json")
    assert isinstance(err.value, TenancyError) and "TOP-SECRET" not in str(err.value)
    os.mkfifo(run / "fifo.out")  # would block the flow forever
    with pytest.raises(JobFileError, match="not a regular file"):
        read_job_text(run / "fifo.out")
    with pytest.raises(FileNotFoundError):
        read_job_text(run / "absent.json")
    # A folder between a trusted one and the file, swapped for a link.
    (run / "trial-0000").mkdir()
    (run / "trial-0000" / "metrics.json").write_text("{}")
    assert read_job_text(run / "trial-0000" / "metrics.json", under=run) == "{}"
    os.symlink(tmp_path, run / "trial-0001")
    with pytest.raises(JobFileError, match="through a symbolic link"):
        read_job_text(run / "trial-0001" / "site-secret", under=run)
    assert read_job_bytes(run / "metrics.json", limit=2, offset=1) == b'"a'


def test_trees_are_checked_and_copied_without_following_links(tmp_path: Path) -> None:
    secret = _secret(tmp_path)
    model = tmp_path / "run" / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(b"w" * 10)
    (model / "sub" / "conf.json").write_text("{}")
    assert [p.name for p in check_job_tree(model)] == ["conf.json", "weights.bin"]
    out = copy_job_tree(model, tmp_path / "copy" / "model")
    assert (out / "sub" / "conf.json").read_text() == "{}"
    assert (out / "weights.bin").read_bytes() == b"w" * 10
    single = copy_job_tree(model / "weights.bin", tmp_path / "copy1" / "weights.bin")
    assert single.read_bytes() == b"w" * 10
    for planted in (model / "sub" / "leak.json", model / "leakdir"):
        os.symlink(secret if planted.name.endswith("json") else tmp_path, planted)
        with pytest.raises(JobFileError, match=rf"{planted.name}: is a symbolic link"):
            check_job_tree(model)
        with pytest.raises(JobFileError, match="is a symbolic link"):
            copy_job_tree(model, tmp_path / f"copy-{planted.name}")
        planted.unlink()
    os.symlink(secret, tmp_path / "run" / "model.pkl")
    with pytest.raises(JobFileError, match=r"model\.pkl: is a symbolic link"):
        copy_job_tree(tmp_path / "run" / "model.pkl", tmp_path / "x.pkl")
    with pytest.raises(JobFileError, match=r"model\.pkl: is a symbolic link"):
        check_job_tree(tmp_path / "run" / "model.pkl")
    assert not (tmp_path / "x.pkl").exists()


def test_the_log_follower_refuses_a_log_that_is_a_link(tmp_path: Path) -> None:
    from aifactory.tasks.jobs.slurm_watch import _LogTail as LogFollower

    secret = _secret(tmp_path)
    log = tmp_path / "slurm-7.out"
    seen: list[str] = []
    log.write_bytes("step 1\nstép".encode())
    f = LogFollower(log, seen.append)
    f.poll()
    assert seen == ["step 1"] and f.tail() == "step 1 | stép"
    with open(log, "ab") as fh:
        fh.write(b" 2\n")
    f.poll()
    assert seen == ["step 1", "stép 2"]
    log.unlink()
    os.symlink(secret, log)
    with pytest.raises(JobFileError, match="symbolic link"):
        f.poll()
    assert "TOP-SECRET" not in " ".join(seen)


def test_a_link_in_a_project_is_refused_before_root_copies_it(tmp_path: Path) -> None:
    from aifactory.tasks.stages.training import copy_project_code, project_code_hash

    secret = _secret(tmp_path)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text("print('hi')\n")
    (proj / "conf.yaml").write_text("a: 1\n")
    h = project_code_hash(str(proj / "train.py"))
    dest = copy_project_code(str(proj / "train.py"), tmp_path / "run")
    assert sorted(p.name for p in dest.iterdir()) == ["conf.yaml", "train.py"]
    os.symlink(secret, proj / "keys.json")
    with pytest.raises(ConfigError, match=r"keys.json is a symbolic link"):
        project_code_hash(str(proj / "train.py"))
    with pytest.raises(ConfigError, match=r"keys.json is a symbolic link"):
        copy_project_code(str(proj / "train.py"), tmp_path / "run2")
    assert not (tmp_path / "run2" / "code").exists()
    (proj / "keys.json").unlink()
    assert project_code_hash(str(proj / "train.py")) == h


def test_root_never_writes_through_a_link_the_job_planted(tmp_path: Path) -> None:
    """A start-up owns its run's folder once a job ran: root's later writes there (a rerun's
    code copy, a sweep's trial configs) must not follow a link it planted. Before, a rerun
    copied the project through ``<run>/.code.tmp-<pid>`` and wrote trial configs through a
    ``trial-0000`` link: root wrote the start-up's files anywhere."""
    from aifactory.tasks.core.jobfiles import write_job_file
    from aifactory.tasks.stages.training import copy_project_code

    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    sweep = tmp_path / "runs" / "sweeps" / "k"
    sweep.mkdir(parents=True)
    write_job_file(sweep / "trial-0000" / "config.json", b"{}", under=sweep)
    assert (sweep / "trial-0000" / "config.json").read_bytes() == b"{}"
    os.symlink(elsewhere, sweep / "trial-0001")
    with pytest.raises(JobFileError, match="through a symbolic link"):
        write_job_file(sweep / "trial-0001" / "config.json", b"{}", under=sweep)
    os.symlink(elsewhere / "target", sweep / "trial-0000" / "x.json")
    write_job_file(sweep / "trial-0000" / "x.json", b"1", under=sweep)  # the link replaced
    assert not (sweep / "trial-0000" / "x.json").is_symlink()
    assert list(elsewhere.iterdir()) == []

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "train.py").write_text("print('evil')\n")
    run = tmp_path / "runs" / "train" / "k"
    run.mkdir(parents=True)
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # the old staging names
        os.symlink(elsewhere, run / f".code.tmp-{pid}")
    os.symlink(elsewhere / "code", run / "code")  # a dangling link where the copy goes
    dest = copy_project_code(str(proj / "train.py"), run)
    assert (dest / "train.py").read_text() == "print('evil')\n" and not dest.is_symlink()
    assert list(elsewhere.iterdir()) == []
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".aif-stage-")]
