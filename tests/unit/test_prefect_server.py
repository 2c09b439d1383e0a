"""The managed local Prefect server: only this home's server is reused (issue 13)."""

from __future__ import annotations

import http.server
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from aifactory.infra.site import procs
from aifactory.tasks.control import prefect_server as ps

# /bin/sh runs the second line (a no-op string expression to Python): a shebang line cannot
# hold an interpreter path with a space, as a clone under "ci final/" has.
FAKE = """#!/bin/sh
"exec" "{python}" "$0" "$@"
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"true" if self.path == "/api/health" else b"no"
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_prefect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    exe = tmp_path / "bin" / "prefect"
    exe.parent.mkdir()
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setattr(ps, "_prefect_exe", lambda: str(exe))
    return exe


@pytest.fixture
def strangers_server() -> Iterator[int]:
    """A healthy 'Prefect' of another home (another clone, another user) on a port."""
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield int(srv.server_address[1])
    srv.shutdown()
    srv.server_close()


def test_another_homes_server_on_the_port_is_never_reused(
    fake_prefect: Path, strangers_server: int, tmp_path: Path
) -> None:
    home = str(tmp_path / "home a")
    said: list[str] = []
    url = ps.ensure_managed_server(home, strangers_server, said.append)
    try:
        assert url != f"http://127.0.0.1:{strangers_server}/api"  # before: reused the stranger
        assert any(f"port {strangers_server} is in use" in s for s in said), said
        rec = ps.running(home)
        assert rec and rec["api_url"] == url and procs.owns(rec)
        again = ps.ensure_managed_server(home, strangers_server, said.append)
        assert again == url and ps.running(home) == rec  # reused: the same process
    finally:
        assert ps.stop_managed_server(home)
    assert ps.running(home) is None and not procs.alive(int(rec["pid"]))
    assert not ps.stop_managed_server(home)  # nothing left to stop


def test_a_dead_record_starts_a_fresh_server(fake_prefect: Path, tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    port = ps._free_port()
    url = ps.ensure_managed_server(home, port, lambda s: None)
    rec = ps.record(home)
    assert rec and url == f"http://127.0.0.1:{port}/api"
    procs.stop(rec, "prefect")
    try:
        url2 = ps.ensure_managed_server(home, port, lambda s: None)
        rec2 = ps.record(home)
        assert rec2 and rec2["pid"] != rec["pid"] and ps.running(home)
        assert url2 == url
    finally:
        ps.stop_managed_server(home)


def test_use_server_points_an_already_imported_prefect_at_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`aif model promote` and `aif train-lm` sent events to a temporary server when prefect
    had read its settings before PREFECT_API_URL was set (issue 16): after use_server, the
    process's settings, API client and events client all name the server, and the temporary
    server is off, so nothing silently falls back to one."""
    import prefect.context
    from prefect.client.orchestration import get_client
    from prefect.events.clients import PrefectEventsClient, get_events_client
    from prefect.settings import get_current_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", raising=False)
    prefect.context.refresh_global_settings_context()  # prefect has read its settings
    before = get_current_settings()
    url = "http://127.0.0.1:4299/api"
    try:
        assert ps.use_server(url) == url
        now = get_current_settings()
        assert now.api.url == url and before.api.url != url
        assert now.server.ephemeral.enabled is False
        assert str(get_client(sync_client=True).api_url).rstrip("/") == url
        events = get_events_client()
        assert isinstance(events, PrefectEventsClient)
        assert "127.0.0.1:4299" in events._events_socket_url
    finally:
        monkeypatch.undo()  # the environment as it was, then the settings read from it
        prefect.context.refresh_global_settings_context()
