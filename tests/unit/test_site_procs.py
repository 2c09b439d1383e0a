"""Site process bookkeeping: pidfiles, command-line identity, stopping only what we started."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aifactory.infra.site import manager, procs
from aifactory.infra.site.layout import Site
from aifactory.tasks.core.errors import SiteError


def _fake_proc(root: Path, pid: int, argv: list[str], state: str = "S", sid: int = 1,
               start: int = 100) -> None:  # fmt: skip
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    # stime cutime cstime priority nice threads itrealvalue starttime ...
    fields = [state, "1", str(sid), str(sid)] + ["0"] * 15 + [str(start), "0", "0"]
    (d / "stat").write_text(f"{pid} (x) y) {' '.join(fields)}\n")


def test_argv_matches_direct_and_shebang_launches() -> None:
    argv = ["/venv/bin/mlflow", "server", "--port", "5050"]
    assert procs.argv_matches(argv, argv)
    assert procs.argv_matches(["/venv/bin/python3", *argv], argv)  # started via #!
    assert not procs.argv_matches(["/venv/bin/python3", "/venv/bin/mlflow", "ui"], argv)
    assert not procs.argv_matches(argv[:2], argv)
    assert not procs.argv_matches(["sleep", "5"], [])


def test_owns_checks_cmdline_and_start_time(tmp_path: Path) -> None:
    argv = ["munged", "--foreground"]
    _fake_proc(tmp_path, 4242, argv, start=555)
    rec: dict[str, object] = {
        "pid": 4242, "argv": argv, "start_time": 555, "boot": procs.boot_id(),
    }  # fmt: skip
    assert procs.owns(rec, proc=tmp_path)
    assert not procs.owns({**rec, "start_time": 556}, proc=tmp_path)  # pid recycled
    assert not procs.owns({**rec, "boot": "another-boot"}, proc=tmp_path)
    assert not procs.owns({**rec, "argv": ["slurmd", "-D"]}, proc=tmp_path)
    assert not procs.owns({**rec, "pid": 4243}, proc=tmp_path)  # gone
    assert not procs.owns({"pid": 4242, "argv": []}, proc=tmp_path)  # bare pidfile
    assert procs.owns({"pid": 4242, "argv": argv}, proc=tmp_path)  # older record: cmdline only


def test_zombies_are_not_alive_and_sessions_are_listed(tmp_path: Path) -> None:
    _fake_proc(tmp_path, 10, ["a"], sid=10)
    _fake_proc(tmp_path, 11, ["b"], sid=10)
    _fake_proc(tmp_path, 12, ["c"], sid=10, state="Z")
    _fake_proc(tmp_path, 13, ["d"], sid=99)
    (tmp_path / "self").mkdir()
    assert procs.alive(10, tmp_path) and not procs.alive(12, tmp_path)
    assert not procs.alive(None, tmp_path) and not procs.alive(77, tmp_path)
    assert procs.session_members(10, tmp_path) == [10, 11]


def test_pidfile_round_trip_and_garbage(tmp_path: Path) -> None:
    path = tmp_path / "pids" / "mlflow.pid"
    assert procs.read_pidfile(path) is None
    procs.write_pidfile(path, 1234)
    assert path.read_text() == "1234\n" and procs.read_pidfile(path) == 1234
    for junk in ("", "abc", "-5", "0"):
        path.write_text(junk)
        assert procs.read_pidfile(path) is None


def test_log_tail_joins_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    assert procs.log_tail(log) == "(no log)"
    log.write_text("\n".join(f"line {i}" for i in range(10)) + "\n\n")
    assert procs.log_tail(log) == "line 5 | line 6 | line 7 | line 8 | line 9"


def test_start_and_stop_a_real_daemon(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "aif-site-test"]
    rec = procs.start("sleeper", argv, tmp_path / "logs" / "sleeper.log")
    pid = rec["pid"]
    assert isinstance(pid, int) and procs.owns(rec)
    assert os.getsid(pid) == pid  # its own session
    assert "starting sleeper" in (tmp_path / "logs" / "sleeper.log").read_text()
    assert procs.stop(rec, "aif-site-test", timeout=5)
    assert not procs.alive(pid) and not procs.owns(rec)
    assert not procs.stop(rec, "aif-site-test", timeout=1)  # nothing left to stop


def test_a_recycled_pid_is_never_signalled() -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = {"pid": other.pid, "argv": [sys.executable, "-c", "import time; time.sleep(60)"],
               "start_time": 1, "boot": procs.boot_id()}  # fmt: skip
        assert not procs.owns(rec)
        assert not procs.stop(rec, "python", timeout=1)
        assert not procs.stop({"pid": other.pid, "argv": []}, "python", timeout=1)
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_wait_until_names_the_part_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "p.log"
    log.write_text("boot\nfatal: port taken\n")
    with pytest.raises(SiteError, match=r"site part p not healthy .*fatal: port taken"):
        procs.wait_until("p", lambda: False, None, log, timeout=0.6)


def test_status_and_down_on_an_empty_site_start_nothing(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    parts = manager.status(site_dir)
    # A new site has DEFAULT_NODES compute nodes: one slurmd part each.
    assert [p.name for p in parts] == [p.name for p in manager.parts(manager._site(site_dir))]
    assert "relay" in [p.name for p in parts]
    assert not any(p.healthy or p.pid for p in parts)
    assert manager.down(site_dir, progress=lambda _m: None) == []


def test_a_stale_pidfile_is_reported_and_never_killed(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    (site_dir / "pids").mkdir(parents=True)
    (site_dir / "pids" / "prefect.pid").write_text(f"{os.getpid()}\n")  # our own pid
    prefect = next(p for p in manager.status(site_dir) if p.name == "prefect")
    assert not prefect.healthy and "stale pid" in prefect.detail
    assert manager.down(site_dir, progress=lambda _m: None) == []
    assert not (site_dir / "pids" / "prefect.pid").exists()


def test_env_lines_point_clients_at_the_site(tmp_path: Path) -> None:
    lines = manager.env_lines(tmp_path / "my site")
    env = dict(ln.removeprefix("export ").split("=", 1) for ln in lines)
    # A folder with a space is reached through the site's space-free alias (site_root).
    site = Site(manager.site_root(tmp_path / "my site"))
    assert " " not in str(site.root) and site.root.resolve() == (tmp_path / "my site").resolve()
    assert env["SLURM_CONF"] == str(site.slurm_conf)
    assert env["AIF_SITE_DIR"] == str(site.root)
    secret = site.platform_secret()  # made by env_lines, readable by root only
    assert oct(site.platform_secret_file.stat().st_mode & 0o777) == "0o600"
    site.root.unlink()
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5050"
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9010"
    assert env["AWS_ACCESS_KEY_ID"] == "aif-site-key"
    assert env["AWS_SECRET_ACCESS_KEY"] == secret and len(secret) >= 32
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
