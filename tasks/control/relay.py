"""The relay: a flow run inside a Slurm allocation reaches Prefect and MLflow through files.

On a multi-node site the compute nodes cannot connect to the Prefect server or MLflow
(infra/site/nodes.py). A flow run that runs inside an allocation on a compute node (`aif
run --in-allocation`, tasks/control/in_allocation.py) talks to a node-local endpoint
instead (:func:`start_endpoint`: HTTP and Prefect's event websocket on 127.0.0.1 in the
job), which writes each request as files on the shared filesystem; the relay, a part of the
site on the login side (``python -m aifactory.tasks.control.relay``, run by `aif site up`),
forwards the request that its grant allows and writes the answer back. No connection from a
compute node to the control plane is ever made.

One allocation's spool, ``<relay_dir>/<key>/`` (made by the orchestrator, root's, mode
750, group of the start-up's user)::

    grant.json   root's: start-up, Unix user, MLflow user, job name (the per-job grant)
    req/         the start-up's user's (700): <id>.body, then <id>.req (JSON; renamed into
                 place last, so the relay never reads half a request)
    resp/        root's (750): <id>.rbody, then <id>.resp (JSON: status, headers)
    owned.json   root's (600): the flow and task runs this allocation made (the only runs
                 its writes may touch)

The relay reads a request without following links (``O_NOFOLLOW``, descriptors of the
folders, regular files only) and never writes where the job can: its answers go to
``resp/``, which only root writes. A request is answered at least once: it is removed after
its answer is written, so a relay killed mid-request forwards it again when it is back (the
job waits for it). What a job may do is an allow-list per target (``PREFECT_RULES``,
``MLFLOW_RULES``): Prefect calls that create and report its own flow and task runs, logs,
events and artifacts (writes to a run only if this allocation made it; a new flow run gets
the tag ``startup:<id>`` and may not carry another start-up's); MLflow's tracking, registry
and artifact calls, as the start-up's own MLflow user (the relay adds the credentials: the
job never sees a password; user and permission calls are refused). Anything else is
answered 403 with one line saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import errno
import json
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

REQ, BODY, RESP, RBODY = ".req", ".body", ".resp", ".rbody"
MAX_META = 64 * 1024  # a request's JSON: method, path, query, headers
MAX_BODY = 1024 * 2**20  # an artifact upload; larger is refused (413)
RESPONSE_TTL_S = 120.0  # an answer the job did not collect is removed after this
WAIT_S = 600.0  # how long the job waits for an answer (a relay restarted by `aif site up`)
HEARTBEAT = ".alive"  # <relay_dir>/.alive: the relay's pid, touched every second
POLL_HOT_S, POLL_IDLE_S, HOT_WINDOW_S = 0.002, 0.2, 2.0  # the relay's scans of its spools
PER_SPOOL = 4  # requests of one allocation answered at once
EVENT_BATCH = 200  # events per POST /api/events
EVENT_FLUSH_S = 0.25
_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{2,80}$")
# Headers that travel (lower case); the rest (Host, Authorization, Cookie, hop-by-hop) never.
FORWARDED_REQUEST = ("content-type", "accept", "x-prefect-api-version", "user-agent")
FORWARDED_RESPONSE = ("content-type", "content-disposition", "location", "etag")
_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class RelayRefusal(Exception):
    """A request the grant does not allow (403) or cannot be read (400)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Rule:
    methods: tuple[str, ...]
    path: re.Pattern[str]
    owns: str | None = None  # "flow_run" / "task_run": the run in the path must be the job's
    creates: str | None = None  # the answer's id becomes one of the job's runs
    only_own: str | None = None  # a listing: the answer keeps only the job's own runs
    body: str | None = None  # the body's check (_checked_body): what it may set and touch


def _rule(methods: str, path: str, owns: str | None = None, creates: str | None = None,
          only_own: str | None = None, body: str | None = None) -> Rule:  # fmt: skip
    return Rule(tuple(methods.split()), re.compile(f"{path}\\Z"), owns, creates, only_own, body)


# Paths as the Prefect server sees them (under /api). Nothing that reads blocks' documents
# (secrets), variables or concurrency limits, nothing that touches deployments, work pools
# or another start-up's runs.
# fmt: off
PREFECT_RULES = (
    _rule("GET", r"/api/(health|version|admin/version|admin/storage|csrf-token)"),
    _rule("POST", r"/api/flows/?"),
    _rule("GET", r"/api/flows/(" + _UUID + r"|name/[^/]+)"),
    _rule("POST", r"/api/flow_runs/?", creates="flow_run", body="flow_run"),
    _rule("GET", r"/api/flow_runs/(" + _UUID + r")(/graph|/graph-v2)?", owns="flow_run"),
    _rule("PATCH", r"/api/flow_runs/(" + _UUID + r")", owns="flow_run", body="flow_run"),
    _rule("POST", r"/api/flow_runs/(" + _UUID + r")/(set_state|labels|input/[^/]+)",
          owns="flow_run"),
    # A subflow is found again by its parent task run (a retried or resumed flow run).
    _rule("POST", r"/api/flow_runs/filter", only_own="flow_run"),
    _rule("POST", r"/api/task_runs/filter", only_own="task_run"),
    _rule("POST", r"/api/task_runs/?", creates="task_run", body="task_run"),
    _rule("GET", r"/api/task_runs/(" + _UUID + r")", owns="task_run"),
    _rule("PATCH", r"/api/task_runs/(" + _UUID + r")", owns="task_run", body="task_run"),
    _rule("POST", r"/api/task_runs/(" + _UUID + r")/set_state", owns="task_run"),
    _rule("POST", r"/api/logs/?", body="logs"),
    _rule("POST", r"/api/events/?", body="events"),
    _rule("POST", r"/api/artifacts/?", body="artifact"),
    # The start-up's own keyed artifacts (the summary links the documents of the run that
    # registered a version it reuses: tasks/doors/console.py, find_artifact).
    _rule("POST", r"/api/artifacts/filter", body="artifact_filter"),
    _rule("GET", r"/api/(block_types/slug/[^/]+|block_schemas/checksum/[^/]+)"),
    # A task's tag concurrency (Prefect's task engine takes a lease on tag:<t> limits).
    _rule("POST", r"/api/v2/concurrency_limits/increment-with-lease", body="tag_limits"),
    _rule("POST", r"/api/v2/concurrency_limits/(decrement-with-lease|leases/"
          + _UUID + r"/renew)"),
)
# Paths as MLflow sees them: tracking, registry, logged models, proxied artifacts.
MLFLOW_RULES = (
    _rule("GET POST PATCH DELETE",
          r"/(ajax-)?api/[23]\.0/mlflow/(?!users/|roles/|.*permissions)[A-Za-z0-9_/.-]+"),
    _rule("GET PUT POST", r"/api/2\.0/mlflow-artifacts/(artifacts|mpu)(/[^?#]*)?"),
    _rule("GET", r"/health|/version"),
)
# fmt: on
RULES = {"prefect": PREFECT_RULES, "mlflow": MLFLOW_RULES}
# What a new or updated flow run may not set: they would hand it to a work pool's worker
# (which runs its job variables as a command on the login side), tie it to a deployment or
# return another run for an idempotency key.
_FLOW_RUN_FORBIDDEN = ("deployment_id", "infrastructure_document_id", "idempotency_key",
                       "work_pool_name", "work_queue_name", "job_variables", "work_queue_id",
                       "infrastructure_pid")  # fmt: skip
_NEW_RUN_STATES = (None, "PENDING", "RUNNING")


def _json(body: bytes, what: str) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:
        raise RelayRefusal(400, f"{what}: the body is not JSON") from None


def _checked_body(kind: str, method: str, body: bytes, startup: str,
                  owned: Mapping[str, set[str]]) -> tuple[bytes, dict[str, set[str]]]:  # fmt: skip
    """The body as it may be forwarded, and the runs it makes the job's (events of the
    job's task runs); RelayRefusal for what the allocation may not do."""
    flows, tasks = owned.get("flow_run", set()), owned.get("task_run", set())
    new: dict[str, set[str]] = {}
    if kind == "flow_run":
        doc = _json(body, "flow run")
        if not isinstance(doc, dict):
            raise RelayRefusal(400, "flow run: the body is not an object")
        for k in _FLOW_RUN_FORBIDDEN:
            if doc.get(k) not in (None, {}, ""):
                raise RelayRefusal(403, f"flow run: {k} is not set from an allocation")
        if method == "POST":
            state = doc.get("state") or {}
            if not isinstance(state, dict) or state.get("type") not in _NEW_RUN_STATES:
                raise RelayRefusal(403, "flow run: a new run starts PENDING or RUNNING")
            parent = doc.get("parent_task_run_id")
            if parent is not None and str(parent) not in tasks:
                raise RelayRefusal(403, "flow run: its parent task run is not this allocation's")
        if method == "POST" or "tags" in doc:
            doc["tags"] = _tags(doc.get("tags"), startup)
        return json.dumps(doc).encode(), new
    if kind in ("task_run", "artifact"):
        doc = _json(body, kind.replace("_", " "))
        if not isinstance(doc, dict):
            raise RelayRefusal(400, f"{kind}: the body is not an object")
        run = doc.get("flow_run_id")
        if (run is not None or kind == "artifact") and str(run) not in flows:
            raise RelayRefusal(403, f"{kind.replace('_', ' ')}: its flow run is not this "
                               "allocation's")  # fmt: skip
        key = doc.get("key") if kind == "artifact" else None
        if key is not None and not str(key).startswith(f"{startup}-"):
            # Keyed artifacts are the console's series per start-up (tasks/doors/console.py):
            # one start-up's job never adds to another's.
            raise RelayRefusal(403, f"artifact: key {str(key)[:80]!r} does not start with "
                               f"this allocation's start-up ({startup}-)")  # fmt: skip
        return body, new
    if kind == "artifact_filter":
        doc = _json(body, "artifact filter")
        keys = (((doc or {}).get("artifacts") or {}).get("key") or {}).get("any_") \
            if isinstance(doc, dict) else None  # fmt: skip
        if not isinstance(keys, list) or not keys or not all(
                isinstance(k, str) and k.startswith(f"{startup}-") for k in keys):  # fmt: skip
            raise RelayRefusal(403, "artifact filter: only artifacts whose keys start with this "
                               f"allocation's start-up ({startup}-), named")  # fmt: skip
        return body, new
    if kind == "logs":
        logs = _json(body, "logs")
        if not isinstance(logs, list) or any(
            not isinstance(r, dict) or (r.get("flow_run_id") is not None
                                        and str(r["flow_run_id"]) not in flows)
            for r in logs):  # fmt: skip
            raise RelayRefusal(403, "logs: a record of a flow run that is not this allocation's")
        return body, new
    if kind == "tag_limits":
        doc = _json(body, "concurrency")
        names = doc.get("names") if isinstance(doc, dict) else None
        if not isinstance(names, list) or not all(
                isinstance(n, str) and n.startswith("tag:") and not (
                    n.startswith("tag:startup:") and n != f"tag:startup:{startup}")
                for n in names):  # fmt: skip
            raise RelayRefusal(403, "concurrency: only the tag limits of the run's own tags")
        return body, new
    if kind == "events":
        return _checked_events(_json(body, "events"), flows, tasks, new), new
    raise RelayRefusal(500, f"relay: no check for {kind}")


def _checked_events(events: Any, flows: set[str], tasks: set[str],
                    new: dict[str, set[str]]) -> bytes:  # fmt: skip
    """Only the events of the job's own flow runs and of task runs in them (which become the
    job's: Prefect records task runs from these events); the others are dropped."""
    if not isinstance(events, list):
        raise RelayRefusal(400, "events: the body is not a list")
    kept = []
    for ev in events:
        if not isinstance(ev, dict) or not isinstance(ev.get("resource"), dict):
            continue
        rid = str(ev["resource"].get("prefect.resource.id", ""))
        name = str(ev.get("event", ""))
        related = {str(r.get("prefect.resource.id", "")) for r in ev.get("related") or []
                   if isinstance(r, dict)}  # fmt: skip
        if rid.startswith("prefect.flow-run.") and name.startswith("prefect.flow-run."):
            if rid.removeprefix("prefect.flow-run.") in flows:
                kept.append(ev)
        elif rid.startswith("prefect.task-run.") and name.startswith("prefect.task-run."):
            if any(r.removeprefix("prefect.flow-run.") in flows for r in related
                   if r.startswith("prefect.flow-run.")):  # fmt: skip
                kept.append(ev)
                new.setdefault("task_run", set()).add(rid.removeprefix("prefect.task-run."))
            elif rid.removeprefix("prefect.task-run.") in tasks:
                kept.append(ev)
    return json.dumps(kept).encode()


def check(rules: tuple[Rule, ...], method: str, path: str,
          owned: Mapping[str, set[str]]) -> Rule:  # fmt: skip
    """The rule that allows ``method path``, else RelayRefusal(403) saying why."""
    if "/../" in path + "/" or "/./" in path + "/" or "//" in path or "%" in path or any(
            ord(c) < 32 or ord(c) == 127 for c in path):  # fmt: skip
        raise RelayRefusal(400, f"{method} {path[:200]}: a path with dot segments, empty "
                           "segments or escapes is not relayed")  # fmt: skip
    for rule in rules:
        m = rule.path.match(path)
        if m is None or method not in rule.methods:
            continue
        if rule.owns is not None and m.group(1) not in owned.get(rule.owns, set()):
            raise RelayRefusal(403, f"{method} {path[:200]}: the {rule.owns.replace('_', ' ')} "
                               "is not one this allocation made")  # fmt: skip
        return rule
    raise RelayRefusal(403, f"{method} {path[:200]}: not in this allocation's allow-list "
                       "(tasks/control/relay.py)")  # fmt: skip


# -- the spool's files -----------------------------------------------------------------------
def _open_dir(path: str | os.PathLike[str], dir_fd: int | None = None) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def _read_regular(name: str, dir_fd: int, limit: int, uid: int | None = None) -> bytes:
    """A regular file in the folder ``dir_fd``, never through a link (nor a hard link: one
    name only), owned by ``uid`` if given, at most ``limit`` bytes (RelayRefusal
    otherwise)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RelayRefusal(400, f"{name}: a link; the relay reads only regular files") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RelayRefusal(400, f"{name}: not a regular file")
        if uid is not None and (st.st_uid != uid or st.st_nlink != 1):
            raise RelayRefusal(400, f"{name}: not a file of the spool's owner (or hard-linked)")
        if st.st_size > limit:
            raise RelayRefusal(413, f"{name}: {st.st_size} bytes, more than {limit}")
        chunks, left = [], limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise RelayRefusal(413, f"{name}: more than {limit} bytes")
        return data
    finally:
        os.close(fd)


def _write_new(name: str, dir_fd: int, data: bytes, mode: int = 0o640) -> None:
    """Write ``name`` in ``dir_fd`` whole (jobfiles.write_new_at), not synced: a spool's
    files live for seconds, and a sync per call would be on every call's path."""
    from aifactory.tasks.core.jobfiles import write_new_at

    write_new_at(dir_fd, name, data, mode=mode, durable=False)


@dataclass
class Grant:
    """What one allocation may do: read from its root-owned ``grant.json``."""

    key: str
    startup: str
    user: str
    mlflow_user: str
    job: str = ""

    @staticmethod
    def read(key_fd: int, key: str) -> Grant:
        raw = json.loads(_read_regular("grant.json", key_fd, MAX_META))
        return Grant(key, str(raw["startup"]), str(raw["user"]), str(raw["mlflow_user"]),
                     str(raw.get("job", "")))  # fmt: skip


def make_spool(relay_dir: Path, key: str, grant: Grant, uid: int, gid: int) -> Path:
    """The spool of one allocation (by the orchestrator, as root): the key's folder and its
    grant root's, ``req/`` the start-up user's, ``resp/`` root's with the user's group."""
    if not _KEY.match(key):
        raise ValueError(f"relay key {key!r}: lower-case letters, digits and '-' only")
    relay_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(relay_dir, 0o711)  # traversed, never listed, by the jobs
    d = relay_dir / key
    d.mkdir(mode=0o750)
    os.chown(d, 0, gid)
    os.chmod(d, 0o750)
    fd = _open_dir(d)
    try:
        _write_new("grant.json", fd, json.dumps({
            "startup": grant.startup, "user": grant.user, "mlflow_user": grant.mlflow_user,
            "job": grant.job, "made": time.time(),
        }).encode(), mode=0o644)  # fmt: skip
    finally:
        os.close(fd)
    (d / "req").mkdir(mode=0o700)
    os.chown(d / "req", uid, gid)
    (d / "resp").mkdir(mode=0o750)
    os.chown(d / "resp", 0, gid)
    os.chmod(d / "resp", 0o2750)  # set-group-id: the answers get the user's group
    return d


def remove_spool(spool: Path) -> None:
    """Remove an allocation's spool (its job has ended), without following links."""
    import shutil

    if spool.is_dir() and not spool.is_symlink():
        shutil.rmtree(spool, ignore_errors=True)


# -- the login side ----------------------------------------------------------------------------
@dataclass
class Relay:
    """Answers the spools under ``root``: ``targets`` maps "prefect" and "mlflow" to the base
    URLs on the login side; ``mlflow_password(user)`` gives a registry user's password."""

    root: Path
    targets: Mapping[str, str]
    mlflow_password: Callable[[str], str]
    workers: int = 8
    log: Callable[[str], None] = print
    _busy: set[tuple[str, str]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _owned: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    _warned: set[str] = field(default_factory=set)
    _dead: set[tuple[str, str]] = field(default_factory=set)

    def serve(self, stop: threading.Event) -> None:
        import fcntl

        import httpx

        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        # One relay per folder: a second would answer each request twice.
        lock = os.open(self.root / ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"relay: another relay serves {self.root}") from None
        beats = threading.Thread(target=self._beat, args=(stop,), daemon=True, name="beat")
        beats.start()
        pause, busy = POLL_HOT_S, 0.0
        with httpx.Client(timeout=httpx.Timeout(300.0, connect=10.0)) as http, \
                ThreadPoolExecutor(self.workers, thread_name_prefix="relay") as pool:  # fmt: skip
            while not stop.is_set():
                if self.scan(pool, http):
                    busy = time.monotonic()
                # Hot for a while after a request (a flow run's calls come in bursts), then
                # slower and slower while idle.
                hot = time.monotonic() - busy < HOT_WINDOW_S
                pause = POLL_HOT_S if hot else min(pause * 2, POLL_IDLE_S)
                stop.wait(pause)
        os.close(lock)

    def _beat(self, stop: threading.Event) -> None:
        """The heartbeat and the clean-up, in a thread of their own: a busy scan never
        makes the relay look dead."""
        while not stop.is_set():
            with contextlib.suppress(OSError):
                self._heartbeat()
            stop.wait(1.0)

    def _heartbeat(self) -> None:
        path = self.root / HEARTBEAT
        tmp = self.root / f"{HEARTBEAT}.tmp"
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
        self._expire()

    def scan(self, pool: ThreadPoolExecutor, http: Any) -> int:
        """Start answering new requests, at most PER_SPOOL at once for each spool (one
        allocation cannot take every worker); the number started."""
        started = 0
        try:
            keys = [e for e in os.scandir(self.root) if _KEY.match(e.name)]
        except FileNotFoundError:
            return 0
        for entry in keys:
            try:
                names = [n for n in os.listdir(os.path.join(entry.path, "req")) if n.endswith(REQ)]
            except OSError:
                continue
            for name in names:
                rid = name[: -len(REQ)]
                with self._lock:
                    live = sum(1 for k, _ in self._busy if k == entry.name)
                    item = (entry.name, rid)
                    if item in self._busy or item in self._dead or live >= PER_SPOOL:
                        continue
                    self._busy.add(item)
                pool.submit(self._answer_safely, entry.name, rid, http)
                started += 1
        return started

    def _answer_safely(self, key: str, rid: str, http: Any) -> None:
        try:
            self.answer(key, rid, http)
        except Exception as exc:  # one request's failure never stops the relay
            self.log(f"relay {key}/{rid}: {type(exc).__name__}: {str(exc)[:300]}")
            with self._lock:  # never tried again (a folder named <id>.req, a socket...)
                self._dead.add((key, rid))
        finally:
            with self._lock:
                self._busy.discard((key, rid))

    def answer(self, key: str, rid: str, http: Any) -> None:
        key_fd = _open_dir(self.root / key)
        try:
            st = os.fstat(key_fd)
            if st.st_uid != 0 or st.st_mode & 0o022:
                self._warn(key, f"relay: {self.root / key} is not root's alone; not served")
                return
            grant = Grant.read(key_fd, key)
            req_fd = _open_dir("req", key_fd)
            resp_fd = _open_dir("resp", key_fd)
            try:
                if os.fstat(resp_fd).st_uid != 0:
                    self._warn(key, f"relay: {self.root / key}/resp is not root's; not served")
                    return
                if not _ID.match(rid):
                    self._drop(req_fd, rid)
                    return
                try:
                    status, headers, body = self._forward(key, grant, req_fd, rid, http)
                except RelayRefusal as exc:
                    status, headers = exc.status, {"content-type": "application/json"}
                    body = json.dumps({"detail": f"relay: {exc}"}).encode()
                    self.log(f"relay {key} ({grant.startup}): refused {exc}")
                _write_new(rid + RBODY, resp_fd, body)
                _write_new(rid + RESP, resp_fd, json.dumps(
                    {"status": status, "headers": headers}).encode())  # fmt: skip
                self._drop(req_fd, rid)
            finally:
                os.close(req_fd)
                os.close(resp_fd)
        finally:
            os.close(key_fd)

    @staticmethod
    def _drop(req_fd: int, rid: str) -> None:
        for suffix in (REQ, BODY):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rid + suffix, dir_fd=req_fd)

    def _warn(self, key: str, line: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.log(line)

    def _forward(self, key: str, grant: Grant, req_fd: int, rid: str,
                 http: Any) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        import httpx

        try:
            meta = json.loads(_read_regular(rid + REQ, req_fd, MAX_META, uid=self._uid(req_fd)))
            target, method = str(meta["target"]), str(meta["method"]).upper()
            path, query = str(meta["path"]), str(meta.get("query", ""))
            headers = {str(k).lower(): str(v) for k, v in dict(meta.get("headers", {})).items()}
        except (ValueError, KeyError, TypeError) as exc:
            raise RelayRefusal(400, f"request {rid}: not a relay request ({exc})") from None
        if target not in RULES or target not in self.targets:
            raise RelayRefusal(403, f"target {target[:40]!r}: the relay serves prefect and mlflow")
        owned = self._owned_of(key)
        rule = check(RULES[target], method, path, owned)
        body = b""
        if meta.get("body"):
            body = _read_regular(rid + BODY, req_fd, MAX_BODY, uid=self._uid(req_fd))
        if rule.body is not None:
            body, new = _checked_body(rule.body, method, body, grant.startup, owned)
            for kind, ids in new.items():
                self._own(key, kind, *ids)
            if rule.body == "events" and body == b"[]":
                return 204, {}, b""
        out = {k: v for k, v in headers.items() if k in FORWARDED_REQUEST}
        if target == "mlflow":
            pw = self.mlflow_password(grant.mlflow_user)
            token = base64.b64encode(f"{grant.mlflow_user}:{pw}".encode()).decode()
            out["authorization"] = f"Basic {token}"
        if any(ord(c) < 32 or ord(c) == 127 for c in query):
            raise RelayRefusal(400, "a query with control characters")
        url = self.targets[target].rstrip("/") + quote(path, safe="/:@!$&'()*+,;=-._~")
        url += f"?{query}" if query else ""
        try:
            resp = http.request(method, url, content=body or None, headers=out)
        except httpx.HTTPError as exc:  # the server down: the client retries a 503
            raise RelayRefusal(503, f"{target} does not answer ({type(exc).__name__})") from None
        if rule.creates and resp.status_code == 201:  # made now (200: one that existed)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self._own(key, rule.creates, str(resp.json()["id"]))
        back = {k: v for k, v in resp.headers.items() if k.lower() in FORWARDED_RESPONSE}
        content = resp.content
        if rule.only_own and 200 <= resp.status_code < 300:
            content = _only_own(content, self._owned_of(key).get(rule.only_own, set()))
        return resp.status_code, back, content

    # The runs each allocation made: kept in memory and in <key>/owned.json (root's), so a
    # relay restarted mid-run still lets the run report its own states.
    def _owned_of(self, key: str) -> dict[str, set[str]]:
        with self._lock:
            if key not in self._owned:
                data: dict[str, list[str]] = {}
                with contextlib.suppress(OSError, ValueError, RelayRefusal):
                    fd = _open_dir(self.root / key)
                    try:
                        data = json.loads(_read_regular("owned.json", fd, 256 * 2**20))
                    finally:
                        os.close(fd)
                self._owned[key] = {k: set(v) for k, v in data.items()}
            return {k: set(v) for k, v in self._owned[key].items()}

    @staticmethod
    def _uid(req_fd: int) -> int:
        return os.fstat(req_fd).st_uid

    def _own(self, key: str, kind: str, *run_ids: str) -> None:
        self._owned_of(key)
        with self._lock:
            have = self._owned[key].setdefault(kind, set())
            if not set(run_ids) - have:
                return
            have.update(run_ids)
            data = {k: sorted(v) for k, v in self._owned[key].items()}
            fd = _open_dir(self.root / key)
            try:
                _write_new("owned.json", fd, json.dumps(data).encode(), mode=0o600)
            finally:
                os.close(fd)

    def _expire(self) -> None:
        """Remove answers older than RESPONSE_TTL_S, and forget spools that are gone."""
        now = time.time()
        live = set()
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                if not _KEY.match(entry.name):
                    continue
                live.add(entry.name)
                with contextlib.suppress(OSError):
                    for f in os.scandir(os.path.join(entry.path, "resp")):
                        if now - f.stat(follow_symlinks=False).st_mtime > RESPONSE_TTL_S:
                            os.unlink(f.path)
        with self._lock:
            for key in set(self._owned) - live:
                del self._owned[key]
            self._dead = {item for item in self._dead if item[0] in live}


def _only_own(content: bytes, own: set[str]) -> bytes:
    """A listing's answer with only the runs in ``own`` (another start-up's runs, their
    parameters and states never reach the job)."""
    try:
        items = json.loads(content)
    except ValueError:
        raise RelayRefusal(502, "a listing that is not JSON") from None
    if not isinstance(items, list):
        raise RelayRefusal(502, "a listing that is not a list")
    kept = [i for i in items if isinstance(i, dict) and str(i.get("id")) in own]
    return json.dumps(kept).encode()


def _tags(tags: Any, startup: str) -> list[str]:
    """A run's tags with ``startup:<id>`` of the allocation's start-up; a tag that names
    another start-up is refused."""
    if not isinstance(tags, list):
        tags = []
    out = [str(t) for t in tags]
    others = [t for t in out if t.startswith("startup:") and t != f"startup:{startup}"]
    if others:
        raise RelayRefusal(403, f"flow run: tag {others[0][:80]!r} names another start-up "
                           f"than this allocation's ({startup})")  # fmt: skip
    return out if f"startup:{startup}" in out else [*out, f"startup:{startup}"]


def relay_alive(root: Path, max_age_s: float = 10.0) -> bool:
    """The relay of ``root`` has beaten its heart within ``max_age_s`` seconds and its
    process (the pid in the heartbeat) is alive."""
    try:
        beat = root / HEARTBEAT
        if time.time() - beat.stat().st_mtime >= max_age_s:
            return False
        os.kill(int(beat.read_text().split()[0]), 0)
    except PermissionError:
        return True  # alive, another user's
    except (OSError, ValueError, IndexError):
        return False
    return True


# -- the compute-node side ---------------------------------------------------------------------
@dataclass
class Spool:
    """The job's side of its spool: a request as files, then its answer, polled."""

    path: Path
    wait_s: float = WAIT_S

    async def request(
        self, target: str, method: str, path: str, query: str, headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        rid = secrets.token_hex(12)
        req, resp = self.path / "req", self.path / "resp"
        meta = {"target": target, "method": method, "path": path, "query": query,
                "headers": {k: v for k, v in headers.items() if k.lower() in FORWARDED_REQUEST},
                "body": bool(body)}  # fmt: skip
        if body:
            _write_file(req / (rid + BODY), body)
        _write_file(req / (rid + REQ), json.dumps(meta).encode())
        deadline, pause = time.monotonic() + self.wait_s, 0.001
        done = resp / (rid + RESP)
        while not done.exists():
            if time.monotonic() > deadline:
                for stale in (req / (rid + REQ), req / (rid + BODY)):  # never replayed later
                    stale.unlink(missing_ok=True)
                return 504, {"content-type": "application/json"}, json.dumps(
                    {"detail": f"relay: no answer in {self.wait_s:.0f} s (is the site's relay "
                               "up? `aif site status` on the login node)"}).encode()  # fmt: skip
            await asyncio.sleep(pause)
            pause = min(pause * 1.2, 0.02)
        answer = json.loads(done.read_bytes())
        data = (resp / (rid + RBODY)).read_bytes()
        return int(answer["status"]), dict(answer.get("headers", {})), data


def _write_file(path: Path, data: bytes) -> None:
    fd = _open_dir(path.parent)
    try:
        _write_new(path.name, fd, data, mode=0o600)
    finally:
        os.close(fd)


ENDPOINT_USER = "aif"  # the endpoint's Basic user; its password is the job's own token


def endpoint_app(spool: Spool, token: str) -> Any:
    """The node-local endpoint: ``/prefect/<path>`` and ``/mlflow/<path>`` through the spool;
    Prefect's event websocket (``/prefect/api/events/in``) as batches of POST /api/events.
    Every call must carry the job's token (Basic ``aif:<token>``: Prefect's
    PREFECT_API_AUTH_STRING, MLflow's MLFLOW_TRACKING_USERNAME/PASSWORD): another start-up's
    job on the same node reaches 127.0.0.1 too."""
    import hmac

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    pending: list[asyncio.Task[Any]] = []

    expected = "Basic " + base64.b64encode(f"{ENDPOINT_USER}:{token}".encode()).decode()

    def allowed(headers: Any) -> bool:
        return hmac.compare_digest(str(headers.get("authorization", "")), expected)

    denied = json.dumps({"detail": "relay: this endpoint serves its own job only "
                                   "(no or a wrong token)"}).encode()  # fmt: skip

    async def http(request: Request) -> Response:
        if not allowed(request.headers):
            return Response(denied, 401, media_type="application/json")
        target = request.path_params["target"]
        body = await request.body()
        if len(body) > MAX_BODY:
            return Response(b'{"detail": "relay: body too large"}', 413)
        try:
            status, headers, data = await spool.request(
                target, request.method, "/" + request.path_params["rest"],
                request.url.query, dict(request.headers), body)  # fmt: skip
        except OSError as exc:  # the spool unreachable: one line, not a traceback
            why = f"relay: spool {spool.path}: {exc.strerror or exc}"
            return Response(json.dumps({"detail": why}).encode(), 502,
                            media_type="application/json")  # fmt: skip
        return Response(data, status, headers=headers)

    async def events_in(ws: WebSocket) -> None:
        if not allowed(ws.headers):
            await ws.close(1008, "relay: no or a wrong token")
            return
        offered = ws.headers.get("sec-websocket-protocol", "")
        prefect = "prefect" in [p.strip() for p in offered.split(",")]
        await ws.accept(subprotocol="prefect" if prefect else None)
        if prefect:
            auth = await ws.receive_json()
            if auth.get("type") != "auth" or not hmac.compare_digest(
                    str(auth.get("token") or ""), f"{ENDPOINT_USER}:{token}"):  # fmt: skip
                await ws.close(1008, "relay: expected the job's auth message")
                return
            await ws.send_json({"type": "auth_success"})
        batch: list[Any] = []
        last = time.monotonic()

        async def flush() -> None:
            nonlocal batch, last
            if batch:
                out, batch, last = batch, [], time.monotonic()
                task = asyncio.create_task(_post_events(spool, out))
                pending.append(task)

        try:
            while True:
                try:
                    text = await asyncio.wait_for(ws.receive_text(), EVENT_FLUSH_S)
                    batch.append(json.loads(text))
                except TimeoutError:
                    pass
                if len(batch) >= EVENT_BATCH or time.monotonic() - last > EVENT_FLUSH_S:
                    await flush()
        except WebSocketDisconnect:
            pass
        finally:
            await flush()

    async def drain(request: Request) -> Response:
        """Wait until every event batch has been answered (the job calls it before exit)."""
        if not allowed(request.headers):
            return Response(denied, 401, media_type="application/json")
        while pending:
            await asyncio.gather(*pending, return_exceptions=True)
            pending[:] = [t for t in pending if not t.done()]
        return Response(b"{}", 200, media_type="application/json")

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]
    return Starlette(routes=[
        Route("/_relay/drain", drain, methods=["POST"]),
        WebSocketRoute("/prefect/api/events/in", events_in),
        Route("/{target:str}/{rest:path}", http, methods=methods),
    ])  # fmt: skip


async def _post_events(spool: Spool, events: list[Any]) -> None:
    status, _, data = await spool.request(
        "prefect", "POST", "/api/events", "", {"content-type": "application/json"},
        json.dumps(events).encode())  # fmt: skip
    if status >= 300:
        print(f"relay: {len(events)} event(s) not recorded: {status} {data[:300]!r}", flush=True)


@dataclass
class Endpoint:
    url: str
    token: str
    _server: Any
    _thread: threading.Thread

    @property
    def auth(self) -> tuple[str, str]:
        return ENDPOINT_USER, self.token

    def drain(self) -> None:
        import httpx

        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{self.url}/_relay/drain", timeout=WAIT_S, auth=self.auth)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def start_endpoint(spool_dir: Path) -> Endpoint:
    """Serve the node-local endpoint of ``spool_dir`` on 127.0.0.1 (a free port) in a
    thread; its base URL is ``Endpoint.url``."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The accepted connections inherit it: without, a response's header and body writes
    # wait out the client's delayed ACK (about 40 ms per call).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    token = secrets.token_urlsafe(24)
    config = uvicorn.Config(endpoint_app(Spool(spool_dir), token), log_level="warning",
                            lifespan="off", ws_ping_interval=None)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="relay-endpoint")  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("relay: the node-local endpoint did not start")
        time.sleep(0.01)
    return Endpoint(f"http://127.0.0.1:{port}", token, server, thread)


# -- the site's part -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aifactory.tasks.control.relay",
                                 description="The site's relay (login side).")  # fmt: skip
    ap.add_argument("--root", required=True, help="the folder of the allocations' spools")
    ap.add_argument("--prefect", required=True, help="the Prefect server's base URL")
    ap.add_argument("--mlflow", required=True, help="MLflow's base URL")
    ap.add_argument("--mlflow-secrets", required=True, help="folder of <user>.secret files")
    args = ap.parse_args(argv)
    secrets_dir = Path(args.mlflow_secrets)

    def password(user: str) -> str:
        if not re.match(r"^[A-Za-z0-9_-]+$", user):
            raise RelayRefusal(403, f"MLflow user {user!r}: not a site user")
        try:
            return (secrets_dir / f"{user}.secret").read_text().strip()
        except OSError:
            raise RelayRefusal(403, f"MLflow user {user!r}: no password on the site") from None

    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    relay = Relay(Path(args.root), {"prefect": args.prefect, "mlflow": args.mlflow}, password,
                  log=lambda line: print(line, flush=True))  # fmt: skip
    print(f"relay: serving {args.root} for Prefect {args.prefect} and MLflow {args.mlflow}",
          flush=True)  # fmt: skip
    relay.serve(stop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
