"""The home's local Prefect worker (tasks/control/worker.py), with a fake `prefect` and a fake
API: started in the background, reused, replaced for another server, stopped with the
home's managed server (issue 16)."""

from __future__ import annotations

import http.server
import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aifactory.infra.site import procs
from aifactory.tasks.control import prefect_server as ps
from aifactory.tasks.control import worker as wk

# A fake `prefect worker start --pool P ... --name N`: says it is up (a file named after the
# worker, with its environment) and then polls forever, as a worker does.
FAKE = """#!/bin/sh
"exec" "{python}" "$0" "$@"
import json, os, sys, time
name = sys.argv[sys.argv.index("--name") + 1]
with open(os.path.join({marks!r}, name), "w") as f:
    json.dump(dict(os.environ), f)
while True:
    time.sleep(1)
"""


@pytest.fixture
def marks(tmp_path: Path) -> Path:
    d = tmp_path / "marks"
    d.mkdir()
    return d


@pytest.fixture
def fake_prefect(tmp_path: Path, marks: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "bin" / "prefect"
    exe.parent.mkdir()
    exe.write_text(FAKE.format(python=sys.executable, marks=str(marks)))
    exe.chmod(0o755)
    monkeypatch.setattr(wk, "_prefect_exe", lambda: str(exe))
    return exe


@pytest.fixture
def api(marks: Path) -> Iterator[str]:
    """A fake Prefect API: a worker is ONLINE while its fake process says it is up."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            pool = self.path.split("/work_pools/", 1)[1].split("/", 1)[0]
            up = [{"name": p.name, "status": "ONLINE"} for p in marks.iterdir()
                  if p.name == f"{pool}-worker"]  # fmt: skip
            body = json.dumps(up).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/api"
    srv.shutdown()
    srv.server_close()


def test_worker_starts_in_the_background_is_reused_and_stops(
    fake_prefect: Path, api: str, marks: Path, tmp_path: Path
) -> None:
    home = str(tmp_path / "home a")
    said: list[str] = []
    rec = wk.ensure_worker(home, api, "aif-local", said.append)
    try:
        assert rec["pool"] == "aif-local" and rec["api_url"] == api and procs.owns(rec)
        assert rec["argv"][1:] == ["worker", "start", "--pool", "aif-local", "--type", "process",
                                   "--name", "aif-local-worker"]  # fmt: skip
        assert any("starting a local Prefect worker for work pool aif-local" in s for s in said)
        assert wk.worker_running(home) == rec
        assert rec["log"] == str(ps.state_dir(home) / "worker.log")  # its log lies in the home
        assert Path(rec["log"]).exists()
        env = json.loads((marks / "aif-local-worker").read_text())
        assert env["PREFECT_API_URL"] == api and env["AIF_HOME"] == str(Path(home).resolve())
        assert env["PREFECT_SERVER_ALLOW_EPHEMERAL_MODE"] == "false"
        assert env["PREFECT_HOME"].startswith(str(ps.state_dir(home)))
        again = wk.ensure_worker(home, api, "aif-local", said.append)
        assert again == rec  # the same process
    finally:
        assert wk.stop_worker(home)
    assert wk.worker_running(home) is None and not procs.alive(int(rec["pid"]))
    assert not wk.stop_worker(home)  # nothing left to stop


def test_a_worker_of_another_server_or_pool_is_replaced(
    fake_prefect: Path, api: str, tmp_path: Path
) -> None:
    home = str(tmp_path / "home")
    first = wk.ensure_worker(home, api, "aif-local", lambda s: None)
    try:
        other = wk.ensure_worker(home, api, "aif-other", lambda s: None)
        assert other["pid"] != first["pid"] and other["pool"] == "aif-other"
        assert not procs.alive(int(first["pid"])) and wk.worker_running(home) == other
    finally:
        wk.stop_worker(home)


def test_stopping_the_managed_server_stops_the_worker(
    fake_prefect: Path, api: str, tmp_path: Path
) -> None:
    home = str(tmp_path / "home")
    rec = wk.ensure_worker(home, api, "aif-local", lambda s: None)
    ps.stop_managed_server(home)  # no server recorded here: the worker goes all the same
    assert wk.worker_running(home) is None and not procs.alive(int(rec["pid"]))


def test_a_worker_that_never_polls_fails_with_its_log(
    fake_prefect: Path, api: str, marks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aifactory.tasks.core.errors import SiteError

    home = str(tmp_path / "home")
    monkeypatch.setattr(wk, "STARTUP_TIMEOUT_S", 2.0)
    monkeypatch.setattr(wk, "worker_name", lambda pool: "never-online")
    with pytest.raises(SiteError, match="Prefect worker"):
        wk.ensure_worker(home, api, "aif-local", lambda s: None)
    assert wk.record(home) is None  # stopped, and its record gone
