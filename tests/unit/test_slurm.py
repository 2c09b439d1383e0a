"""The one door to Slurm, with fake commands: errors carry command, code and output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aifactory.tasks.core.errors import SlurmCommandError, SlurmError
from aifactory.tasks.doors.slurm import SACCT_FIELDS, SlurmClient


def _fake(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text(f"#!/bin/sh\n{body}\n")
    p.chmod(0o755)


def test_failure_carries_command_code_and_stderr(tmp_path: Path) -> None:
    _fake(tmp_path, "sbatch", 'echo "sbatch: error: Invalid account" >&2; exit 1')
    client = SlurmClient(bin_dir=str(tmp_path))
    with pytest.raises(SlurmCommandError) as err:
        client.submit("job.sh", ["--account=nosuch"])
    e = err.value
    assert e.returncode == 1 and "Invalid account" in e.stderr
    assert "--parsable --chdir=" in str(e) and "--account=nosuch job.sh" in str(e)
    assert "exit code 1" in str(e) and "\n" not in str(e)


def test_submit_runs_the_job_in_the_scripts_folder_even_with_spaces(tmp_path: Path) -> None:
    """Issue 13: a run folder under a clone whose name has a space was refused (``#SBATCH
    --output`` cannot hold a space); the working directory is now an sbatch argument and the
    scripts' output names are relative to it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "sbatch", 'for a in "$@"; do echo "$a"; done > "$(dirname "$0")/argv"; echo 7')
    run_dir = tmp_path / ".work dir" / "aif 'q ü" / "runs" / "train" / "k"
    run_dir.mkdir(parents=True)
    assert SlurmClient(bin_dir=str(bin_dir)).submit(str(run_dir / "train.sbatch")) == "7"
    argv = (bin_dir / "argv").read_text().splitlines()
    assert argv[1:] == ["--parsable", f"--chdir={run_dir}", str(run_dir / "train.sbatch")]
    assert argv[0].startswith("--export=")


def test_jobs_get_only_the_allowed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: sbatch's default --export=ALL copied every secret of the flow's process
    (pseudonymisation key, webhook, Prefect API) into every job. Now one --export list: the
    base set, the client's env (object store, SLURM_CONF), the profile's extra names; names
    only, so no value reaches a command line; dask-jobqueue's sbatch goes through the same
    door."""
    _fake(tmp_path, "sbatch", 'for a in "$@"; do echo "$a"; done > "$(dirname "$0")/argv"; echo 7')
    monkeypatch.setenv("AIF_PSEUDONYMISATION_KEY", "canary-pk")
    monkeypatch.setenv("AIF_NOTIFY_WEBHOOK", "http://hook/canary")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.setenv("MY_TEAM_VAR", "x")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm.conf")
    keys = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s,with,commas"}
    client = SlurmClient(bin_dir=str(tmp_path), export=("MY_TEAM_VAR", "NOT_SET"), env=keys)
    client.submit("job.sh")
    exported = (tmp_path / "argv").read_text().splitlines()[0].removeprefix("--export=")
    names = exported.split(",")
    assert {"PATH", "HOME", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MY_TEAM_VAR"} <= set(
        names
    )
    for secret in ("AIF_PSEUDONYMISATION_KEY", "AIF_NOTIFY_WEBHOOK", "PREFECT_API_URL",
                   "NOT_SET", "SLURM_CONF"):  # SLURM_* travel anyway  # fmt: skip
        assert secret not in names
    assert "=" not in exported and "canary" not in exported
    # An explicit --export given by a caller is kept as it is.
    client.run(["sbatch", "--export=NONE", "job.sh"])
    assert (tmp_path / "argv").read_text().splitlines()[0] == "--export=NONE"


def test_squeue_tells_a_forgotten_job_from_an_unreachable_controller(tmp_path: Path) -> None:
    from aifactory.tasks.doors.slurm import SlurmUnreachable

    _fake(tmp_path, "squeue", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    client = SlurmClient(bin_dir=str(tmp_path))
    assert client.squeue_states(["5"]) == {}
    _fake(tmp_path, "squeue", 'echo "slurm_load_jobs error: Unable to contact slurm controller '
                              '(connect failure)" >&2; exit 1')  # fmt: skip
    with pytest.raises(SlurmUnreachable) as err:
        client.state("5")
    assert err.value.part == "controller" and "Unable to contact" in err.value.reason


def test_unparsable_job_id_shows_raw_output(tmp_path: Path) -> None:
    _fake(tmp_path, "sbatch", 'echo "Submitted batch job maybe"')
    with pytest.raises(SlurmError, match="Submitted batch job maybe"):
        SlurmClient(bin_dir=str(tmp_path)).submit("job.sh")


def test_parsable_with_cluster_suffix(tmp_path: Path) -> None:
    _fake(tmp_path, "sbatch", 'echo "4242;aif"')
    assert SlurmClient(bin_dir=str(tmp_path)).submit("job.sh") == "4242"


def test_state_from_squeue_then_sacct(tmp_path: Path) -> None:
    _fake(tmp_path, "squeue", "exit 0")  # no longer known to squeue
    _fake(
        tmp_path, "sacct",
        f'echo "{"|".join(SACCT_FIELDS)}"; '
        'echo "17|train|startup-a|gpu|CANCELLED by 0|0:15|00:00:03|3|cpu=1,gres/gpu=1|'
        '|node1|2026-01-01T00:00:00|2026-01-01T00:00:03|2026-01-01T00:00:00"',
    )  # fmt: skip
    client = SlurmClient(bin_dir=str(tmp_path))
    assert client.state("17") == "CANCELLED"
    rec = client.sacct_record("17")
    assert rec is not None and rec["StateDetail"] == "CANCELLED by 0"
    _fake(tmp_path, "squeue", 'echo "17|17|RUNNING"')
    assert client.state("17") == "RUNNING"


def test_sacct_records_are_keyed_by_the_header_row(tmp_path: Path) -> None:
    """One sacct reader: fields by sacct's header, whatever their order; a header that does
    not match the fields asked for is one clear error, never a silent shift."""
    _fake(tmp_path, "sacct", 'echo "State|JobID"; echo "COMPLETED|5"; echo "RUNNING|6|extra"')
    client = SlurmClient(bin_dir=str(tmp_path))
    assert client.sacct(["State", "JobID"], jobs=["5", "6"]) == [
        {"JobID": "5", "State": "COMPLETED", "StateDetail": "COMPLETED"}
    ]
    with pytest.raises(SlurmError, match="unexpected header 'State\\|JobID'"):
        client.sacct(["JobID", "State"])


def test_missing_command_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(SlurmError, match="'sinfo' not found"):
        SlurmClient(bin_dir=str(tmp_path / "nowhere")).run(["sinfo"])


def test_timeout_is_reported(tmp_path: Path) -> None:
    _fake(tmp_path, "squeue", "sleep 5")
    with pytest.raises(SlurmCommandError, match="timed out"):
        SlurmClient(bin_dir=str(tmp_path), timeout=0.3).run(["squeue"])


def _nobody(monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """A start-up user for the test: the system's ``nobody``, its group ``nogroup`` looked
    up under the user's name (the site names each start-up's group after its user)."""
    import grp
    import pwd

    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    real = grp.getgrnam
    monkeypatch.setattr(grp, "getgrnam", lambda n: real("nogroup") if n == "nobody" else real(n))
    return uid, gid


@pytest.mark.skipif(os.geteuid() != 0, reason="handing a folder to another user needs root")
def test_a_startups_job_runs_as_its_user_in_a_folder_handed_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 17: every job ran as root and every run folder was readable by every job."""
    uid, gid = _nobody(monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "sbatch", 'for a in "$@"; do echo "$a"; done > "$(dirname "$0")/argv"; '
          'echo "$HOME $USER $LOGNAME" > "$(dirname "$0")/who"; echo 7')  # fmt: skip
    run_dir = tmp_path / "runs" / "train" / "k"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "train.sbatch").write_text("#!/bin/bash\n")
    secret = tmp_path / "platform.secret"
    secret.write_text("s")
    (run_dir / "planted").symlink_to(secret)  # a link the start-up planted in its folder
    client = SlurmClient(bin_dir=str(bin_dir), run_as="nobody")
    assert client.submit(str(run_dir / "train.sbatch")) == "7"
    argv = (bin_dir / "argv").read_text().splitlines()
    assert "--uid=nobody" in argv and "--gid=nobody" in argv
    assert (bin_dir / "who").read_text().split() == ["/nonexistent", "nobody", "nobody"]
    for p in (run_dir, run_dir / "checkpoints", run_dir / "train.sbatch"):
        assert (p.stat().st_uid, p.stat().st_gid) == (uid, gid), p
    assert oct(run_dir.stat().st_mode & 0o777) == "0o700"
    assert (run_dir / "planted").lstat().st_uid == uid
    assert secret.stat().st_uid == os.geteuid()  # what the link points at is not handed over


def test_an_unknown_startup_user_is_one_line(tmp_path: Path) -> None:
    _fake(tmp_path, "sbatch", "echo 7")
    client = SlurmClient(bin_dir=str(tmp_path), run_as="no-such-aif-user")
    with pytest.raises(SlurmError) as err:
        client.submit(str(tmp_path / "job.sh"))
    assert "start-up Unix user 'no-such-aif-user' does not exist" in str(err.value)
    assert "\n" not in str(err.value)


def test_the_startups_profile_submits_as_its_user(monkeypatch: pytest.MonkeyPatch) -> None:
    import aifactory.tasks.doors.s3_identity as ident
    from aifactory.tasks.core.config import load_profile

    monkeypatch.setattr(ident, "session", lambda *a, **k: ident.Session(
        "startup-b", "AK", "SK", "TOKEN", ident.dt.datetime.now(ident.dt.UTC)))  # fmt: skip
    # The site profile reads the platform's object-store secret from a file that only a
    # site that is up has written: this test needs no site.
    monkeypatch.setenv("AIF_OBJECT_STORE__KEY", "platform")
    monkeypatch.setenv("AIF_OBJECT_STORE__SECRET", "platform-secret")
    cfg = load_profile("site")
    assert cfg.slurm_client().run_as is None  # the platform's own commands
    assert cfg.for_startup("startup-b").slurm_client().run_as == "startup-b"
    assert load_profile("local").slurm_client().run_as is None
