"""The relay (tasks/control/relay.py) end to end in one process: the node-local endpoint, the
spool on disk, the login side's relay and a real HTTP server standing in for Prefect and
MLflow. The site test (tests/site/test_in_allocation_site.py) runs a whole pipeline through
it from a compute node."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from aifactory.tasks.control import relay as rl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the spool is made by root")


class _Target(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def _any(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(n) if n else b""
        self.seen.append({"method": self.command, "path": self.path, "body": body,
                          "headers": {k.lower(): v for k, v in self.headers.items()}})  # fmt: skip
        if self.path.rstrip("/") == "/api/flow_runs" and self.command == "POST":
            out = json.dumps({"id": str(uuid.uuid4()), **json.loads(body)}).encode()
        elif self.path == "/api/flow_runs/filter":  # every run of the server, any start-up's
            out = json.dumps([{"id": i} for i in json.loads(body)["ids"]]).encode()
        else:
            out = json.dumps({"path": self.path, "n": len(body)}).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("content-type", "application/json")
        self.send_header("x-secret-header", "not forwarded")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    _Target.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Target)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    root = tmp_path / "relay dir"  # a space in the shared filesystem's path
    lines: list[str] = []
    relay = rl.Relay(root, {"prefect": base, "mlflow": base}, lambda user: f"pw-of-{user}",
                     log=lines.append)  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=relay.serve, args=(stop,), daemon=True)
    thread.start()
    spool = rl.make_spool(root, "startup-a-test-1", rl.Grant("k", "startup-a", "root",
                                                             "startup-a"), 0, 0)  # fmt: skip
    endpoint = rl.start_endpoint(spool)
    http = httpx.Client(auth=endpoint.auth, timeout=30)
    try:
        yield {"url": endpoint.url, "seen": _Target.seen, "lines": lines, "spool": spool,
               "root": root, "relay": relay, "stop": stop, "endpoint": endpoint,
               "http": http}  # fmt: skip
    finally:
        http.close()
        endpoint.stop()
        stop.set()
        thread.join(5)
        server.shutdown()


def test_a_call_goes_through_the_spool_with_the_startups_registry_identity(site: Any) -> None:
    url = site["url"]
    r = site["http"].get(f"{url}/prefect/api/health", headers={"authorization": "Basic stolen"})
    assert r.status_code == 200 and r.json()["path"] == "/api/health"
    assert "x-secret-header" not in r.headers
    assert "authorization" not in site["seen"][-1]["headers"]  # the job's own never travels
    body = os.urandom(300_000)
    r = site["http"].put(f"{url}/mlflow/api/2.0/mlflow-artifacts/artifacts/1/run/model.bin",
                  content=body, headers={"content-type": "application/octet-stream"})  # fmt: skip
    assert r.status_code == 200 and r.json()["n"] == len(body)
    seen = site["seen"][-1]
    assert seen["body"] == body and seen["method"] == "PUT"
    token = base64.b64encode(b"startup-a:pw-of-startup-a").decode()
    assert seen["headers"]["authorization"] == f"Basic {token}"
    # Nothing is left in the spool's request folder once answered.
    assert not [n for n in os.listdir(site["spool"] / "req") if not n.startswith(".")]


def test_calls_outside_the_allow_list_are_refused_in_one_line(site: Any) -> None:
    url = site["url"]
    n = len(site["seen"])
    for method, path in (("DELETE", "/prefect/api/flow_runs/" + str(uuid.uuid4())),
                         ("POST", "/prefect/api/deployments/"),
                         ("POST", "/prefect/api/work_pools/aif-site-startup-b/get_scheduled"),
                         ("POST", "/mlflow/api/2.0/mlflow/users/create"),
                         ("POST", "/mlflow/api/2.0/mlflow/experiments/permissions/create"),
                         ("GET", "/prefect/api/%2e%2e/admin/version"),
                         ("GET", "/other/api/health")):  # fmt: skip
        r = site["http"].request(method, url + path)
        assert r.status_code in (400, 403), (method, path, r.status_code)
        detail = r.json()["detail"]
        assert detail.startswith("relay: ") and "\n" not in detail and len(detail) < 400
    assert len(site["seen"]) == n  # none of them reached a server
    assert any("not in this allocation's allow-list" in line for line in site["lines"])


def test_a_job_writes_only_to_the_flow_runs_it_made(site: Any) -> None:
    url = site["url"]
    other = str(uuid.uuid4())
    r = site["http"].post(f"{url}/prefect/api/flow_runs/{other}/set_state", json={"state": {}})
    assert r.status_code == 403 and "not one this allocation made" in r.json()["detail"]
    r = site["http"].post(f"{url}/prefect/api/flow_runs/", json={"name": "x", "tags": ["aif"]})
    assert r.status_code == 201
    made = r.json()
    assert "startup:startup-a" in made["tags"]  # the relay tags it with its start-up
    r = site["http"].post(f"{url}/prefect/api/flow_runs/{made['id']}/set_state", json={"state": {}})
    assert r.status_code == 201
    # Another start-up's tag on a new run is refused.
    r = site["http"].post(f"{url}/prefect/api/flow_runs/", json={"tags": ["startup:startup-b"]})
    assert r.status_code == 403 and "another start-up" in r.json()["detail"]
    # A listing keeps only the allocation's own runs.
    r = site["http"].post(f"{url}/prefect/api/flow_runs/filter", json={"ids": [other, made["id"]]})
    assert r.status_code == 201 and r.json() == [{"id": made["id"]}]
    # A relay restarted mid-run (a new Relay on the same folder) still knows the run.
    fresh = rl.Relay(site["root"], {}, lambda u: "")
    assert made["id"] in fresh._owned_of("startup-a-test-1")["flow_run"]


def test_a_planted_link_is_never_read(site: Any, tmp_path: Path) -> None:
    secret = tmp_path / "root-only.txt"
    secret.write_text(json.dumps({"target": "prefect", "method": "GET", "path": "/api/health"}))
    req = site["spool"] / "req"
    n = len(site["seen"])
    os.symlink(secret, req / ("a" * 16 + rl.REQ))
    deadline = time.monotonic() + 10
    resp = site["spool"] / "resp" / ("a" * 16 + rl.RESP)
    while not resp.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    answer = json.loads(resp.read_text())
    assert answer["status"] == 400
    assert "a link" in (site["spool"] / "resp" / ("a" * 16 + rl.RBODY)).read_text()
    assert len(site["seen"]) == n


def test_a_spool_not_made_by_root_alone_is_not_served(site: Any) -> None:
    os.chmod(site["spool"], 0o777)
    try:
        spool = rl.Spool(site["spool"], wait_s=1.5)
        import asyncio

        status, _, data = asyncio.run(spool.request("prefect", "GET", "/api/health", "", {}, b""))
        assert status == 504 and b"no answer" in data
        assert any("not root's alone" in line for line in site["lines"])
    finally:
        os.chmod(site["spool"], 0o750)


def test_prefect_events_of_the_jobs_own_runs_reach_the_server_as_batches(site: Any) -> None:
    """Events of the allocation's flow runs and of task runs in them are relayed (and those
    task runs become its own); events about anything else are dropped."""
    from websockets.sync.client import connect

    mine = site["http"].post(f"{site['url']}/prefect/api/flow_runs/", json={}).json()["id"]
    other, task = str(uuid.uuid4()), str(uuid.uuid4())

    def ev(name: str, resource: str, related: str | None = None) -> dict[str, Any]:
        rel = [{"prefect.resource.id": related, "prefect.resource.role": "flow-run"}]
        return {"id": str(uuid.uuid4()), "event": name, "occurred": "2026-12-08T00:00:00Z",
                "resource": {"prefect.resource.id": resource},
                "related": rel if related else []}  # fmt: skip

    keep = [ev("prefect.flow-run.Running", f"prefect.flow-run.{mine}"),
            ev("prefect.task-run.Completed", f"prefect.task-run.{task}",
               f"prefect.flow-run.{mine}")]  # fmt: skip
    drop = [ev("prefect.flow-run.Crashed", f"prefect.flow-run.{other}"),
            ev("prefect.task-run.Completed", f"prefect.task-run.{uuid.uuid4()}",
               f"prefect.flow-run.{other}"),
            ev("aif.model.promoted", "aif.model.x")]  # fmt: skip
    url = site["url"].replace("http://", "ws://") + "/prefect/api/events/in"
    user, token = site["endpoint"].auth
    from websockets.exceptions import WebSocketException

    # No token: refused before the handshake ends.
    with pytest.raises(WebSocketException), connect(url, subprotocols=["prefect"]) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"type": "auth", "token": None}))
        ws.recv()
    header = {"Authorization": "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()}
    with connect(url, subprotocols=["prefect"], additional_headers=header) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"type": "auth", "token": f"{user}:{token}"}))
        assert json.loads(ws.recv())["type"] == "auth_success"
        for e in keep + drop:
            ws.send(json.dumps(e))
    site["endpoint"].drain()
    posted = [json.loads(s["body"]) for s in site["seen"] if s["path"] == "/api/events"]
    assert [e["id"] for batch in posted for e in batch] == [e["id"] for e in keep]
    assert task in site["relay"]._owned_of("startup-a-test-1")["task_run"]


def test_the_endpoint_serves_only_its_own_job(site: Any) -> None:
    n = len(site["seen"])
    for auth in (None, ("aif", "not-the-token"), ("startup-b", site["endpoint"].token)):
        r = httpx.get(f"{site['url']}/prefect/api/health", auth=auth)
        assert r.status_code == 401 and "own job only" in r.json()["detail"]
    assert len(site["seen"]) == n


def test_bodies_that_would_reach_beyond_the_allocation_are_refused(site: Any) -> None:
    url, http = site["url"] + "/prefect/api", site["http"]
    n = len(site["seen"])
    other = str(uuid.uuid4())
    for path, body, why in (
        ("/flow_runs/", {"work_pool_name": "aif-site-startup-b",
                         "job_variables": {"command": "id"}}, "work_pool_name"),
        ("/flow_runs/", {"idempotency_key": "k"}, "idempotency_key"),
        ("/flow_runs/", {"state": {"type": "SCHEDULED"}}, "PENDING or RUNNING"),
        ("/flow_runs/", {"parent_task_run_id": other}, "parent task run"),
        ("/logs/", [{"flow_run_id": other, "message": "x"}], "not this allocation's"),
        ("/artifacts/", {"key": "ingest-policy", "flow_run_id": other}, "not this allocation's"),
        ("/artifacts/", {"key": "ingest-policy"}, "not this allocation's"),
        ("/task_runs/", {"flow_run_id": other}, "not this allocation's"),
        ("/block_documents/filter", {"include_secrets": True}, "allow-list"),
        ("/variables/filter", {}, "allow-list"),
        ("/v2/concurrency_limits/increment-with-lease", {"names": ["startup-b-nightly"]},
         "tag limits"),
        ("/v2/concurrency_limits/increment-with-lease", {"names": ["tag:startup:startup-b"]},
         "tag limits"),
    ):  # fmt: skip
        r = http.post(url + path, json=body)
        assert r.status_code == 403 and why in r.json()["detail"], (path, r.text)
    mine = http.post(url + "/flow_runs/", json={}).json()["id"]
    r = http.patch(f"{url}/flow_runs/{mine}", json={"tags": ["startup:startup-b"]})
    assert r.status_code == 403 and "another start-up" in r.json()["detail"]
    r = http.patch(f"{url}/flow_runs/{mine}", json={"job_variables": {"command": "id"}})
    assert r.status_code == 403
    # Keyed artifacts are each start-up's own series: another's prefix, or none, is refused.
    for key in ("startup-b-agri-yield-pipeline-summary", "pipeline-summary"):
        r = http.post(url + "/artifacts/", json={"key": key, "flow_run_id": mine})
        assert r.status_code == 403 and "does not start with" in r.json()["detail"], r.text
    queries = ({}, {"artifacts": {"key": {"any_": ["startup-b-agri-yield-model-card"]}}},
               {"artifacts": {"key": {"like_": "startup-a-%"}}})  # fmt: skip
    for query in queries:
        r = http.post(url + "/artifacts/filter", json=query)
        assert r.status_code == 403 and "artifact filter" in r.json()["detail"], r.text
    assert len(site["seen"]) == n + 1  # only the run of its own went through
    own = {"artifacts": {"key": {"any_": ["startup-a-mobility-eta-model-card"]}}}
    r = http.post(url + "/artifacts/filter", json=own)
    assert r.status_code != 403, r.text
    r = http.post(
        url + "/artifacts/",
        json={
            "key": "startup-a-mobility-eta-pipeline-summary",
            "flow_run_id": mine,
            "type": "markdown",
        },
    )
    assert r.status_code != 403, r.text


def test_a_request_that_cannot_be_answered_is_not_tried_again_and_again(site: Any) -> None:
    (site["spool"] / "req" / ("d" * 16 + rl.REQ)).mkdir()  # a folder, not a request
    time.sleep(1.5)
    lines = [ln for ln in site["lines"] if "d" * 16 in ln]
    assert len(lines) <= 2, lines  # its refusal once, not one every 2 ms


def test_a_hard_link_in_the_spool_is_never_read(site: Any, tmp_path: Path) -> None:
    target = tmp_path / "secret.json"
    target.write_text(json.dumps({"target": "prefect", "method": "GET", "path": "/api/health"}))
    os.chown(target, 12345, 12345)  # not the spool owner's
    os.link(target, site["spool"] / "req" / ("h" * 16 + rl.REQ))
    resp = site["spool"] / "resp" / ("h" * 16 + rl.RESP)
    deadline = time.monotonic() + 10
    while not resp.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert json.loads(resp.read_text())["status"] == 400


def test_a_request_waits_for_a_relay_that_is_down_and_is_answered_once_it_is_back(
    site: Any,
) -> None:
    site["stop"].set()  # the relay goes away (the fixture's thread ends)
    time.sleep(0.5)
    out: dict[str, Any] = {}

    def call() -> None:
        out["r"] = site["http"].get(f"{site['url']}/prefect/api/version", timeout=30)

    t = threading.Thread(target=call)
    t.start()
    time.sleep(1.0)
    assert "r" not in out
    stop = threading.Event()
    relay = rl.Relay(site["root"], site["relay"].targets, lambda u: "")
    threading.Thread(target=relay.serve, args=(stop,), daemon=True).start()
    try:
        t.join(20)
        assert out["r"].status_code == 200
        assert rl.relay_alive(site["root"])
    finally:
        stop.set()


def test_the_rules_refuse_paths_that_would_escape_them() -> None:
    owned = {"flow_run": {"0" * 8 + "-0000-0000-0000-" + "0" * 12}}
    for path in ("/api/flow_runs//set_state", "/api/%2e%2e/admin", "/api/./health",
                 "/api/flow_runs/x/set_state", "/api/healthz"):  # fmt: skip
        with pytest.raises(rl.RelayRefusal):
            rl.check(rl.PREFECT_RULES, "POST" if "set_state" in path else "GET", path, owned)
    assert rl.check(rl.PREFECT_RULES, "GET", "/api/health", owned)


def test_a_fresh_heartbeat_of_a_dead_relay_is_not_alive(tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    (tmp_path / rl.HEARTBEAT).write_text(f"{proc.pid}\n")
    assert not rl.relay_alive(tmp_path)  # killed a second ago: `aif site up` restarts it
    (tmp_path / rl.HEARTBEAT).write_text(f"{os.getpid()}\n")
    assert rl.relay_alive(tmp_path)


def test_a_spool_the_job_cannot_reach_is_one_line_502(site: Any) -> None:
    os.rename(site["spool"] / "req", site["spool"] / "req.gone")
    try:
        r = site["http"].get(f"{site['url']}/prefect/api/health")
    finally:
        os.rename(site["spool"] / "req.gone", site["spool"] / "req")
    assert r.status_code == 502
    detail = r.json()["detail"]
    assert detail.startswith("relay: spool ") and "\n" not in detail, detail


def test_the_endpoint_answers_without_waiting_for_delayed_acks(tmp_path: Path) -> None:
    """TCP_NODELAY on the endpoint's socket (72 ms per call through the relay without it,
    6 ms with it: tests/benchmarks/bench_in_allocation.py)."""
    import socket

    endpoint = rl.start_endpoint(tmp_path)
    try:
        (sock,) = endpoint._server.servers[0].sockets
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        endpoint.stop()


def test_the_registry_probe_takes_a_401_for_a_server_that_answers(site: Any) -> None:
    """The relay's endpoint answers a call without the job's token 401: the registry's
    reachability probe (plain urllib, no identity) must take that as reachable (a flow run
    in an allocation registered nothing new before)."""
    from aifactory.tasks.doors.registry import RegistryError, _check_reachable

    _check_reachable(f"{site['url']}/mlflow")  # 401 from the endpoint: it is there
    with pytest.raises(RegistryError, match="not reachable"):
        _check_reachable("http://127.0.0.1:9/mlflow")  # nothing listens


def test_the_registry_waits_out_an_outage_of_the_tracking_server(tmp_path: Path) -> None:
    """A trained model is not given up because MLflow restarts: registration waits for the
    server (saying so), and fails in one line only once the wait is over."""
    import http.server
    import socket
    import threading

    from aifactory.tasks.doors.registry import RegistryError, _check_reachable

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *a: Any) -> None:
            pass

    def come_back() -> None:
        time.sleep(2.5)
        server = http.server.HTTPServer(("127.0.0.1", port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)

    started: list[Any] = []
    said: list[str] = []
    threading.Thread(target=come_back, daemon=True).start()
    t0 = time.monotonic()
    _check_reachable(f"http://127.0.0.1:{port}", wait_s=30, log=said.append)
    assert 2 <= time.monotonic() - t0 < 15
    assert "not reachable: waiting for it" in said[0] and "answers again" in said[-1]
    started[0].shutdown()
    started[0].server_close()
    with pytest.raises(RegistryError, match=r"not reachable \(waited 1 s\): is the site up"):
        _check_reachable(f"http://127.0.0.1:{port}", wait_s=1)
