"""The audit trail: every policy decision and every refused access the platform sees.

Each record says who (start-up, Unix user, Prefect flow run), what (the action and its
target), when, the decision and the rule or component that made it, and why. It goes to

- the site-wide operator log, ``<runs_dir>/audit/operator.jsonl`` (one JSON object per
  line, appended; the folder is the operators' own, mode 700), and
- the start-up's own audit area in the lake, ``<lake>/<s3_prefix>/audit/access/`` (one
  small object each, written with the start-up's own identity).

Recording never fails the run: a record that cannot be written is a warning on stderr.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aifactory.tasks.core.errors import AifError, StorageError, TenancyError

MAX_REASON = 500

# What a refusal is called in the trail: the rule, or the component that refused.
_REFUSALS = {"AdmissionError": "admission", "PolicyError": "usage-policy",
             "TenancyError": "isolation", "RegistryRefused": "registry"}  # fmt: skip
_DENIED = ("access denied", "accessdenied", "forbidden")


def refusal_of(exc: BaseException) -> str | None:
    """The kind of refusal ``exc`` is (admission, usage-policy, isolation, registry,
    object-store), or None when it is another failure."""
    name = type(exc).__name__
    if name in _REFUSALS or isinstance(exc, TenancyError):
        return _REFUSALS.get(name, "isolation")
    text = str(exc).lower()
    if isinstance(exc, AifError) and any(d in text for d in _DENIED):
        return "object-store" if isinstance(exc, StorageError) else "object-store (in a job)"
    return None


def operator_log(runs_dir: str) -> Path:
    return Path(runs_dir) / "audit" / "operator.jsonl"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _flow_run() -> str:
    from aifactory.tasks.doors.runtime import flow_run_id

    return flow_run_id()


def entry(startup: str, action: str, target: str, allowed: bool, by: str,
          reason: str) -> dict[str, Any]:  # fmt: skip
    return {
        "at": _now(), "startup": startup, "unix_user": getpass.getuser(),
        "flow_run": _flow_run(), "action": action, "target": target,
        "decision": "allowed" if allowed else "refused", "by": by,
        "reason": " ".join(reason.split())[:MAX_REASON],
    }  # fmt: skip


def append_operator_log(runs_dir: str, record: dict[str, Any]) -> Path:
    """One line appended (O_APPEND: concurrent runs never interleave a line)."""
    path = operator_log(runs_dir)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return path


def write_lake_record(lake_url: str, storage_options: dict[str, Any] | None,
                      record: dict[str, Any]) -> str:  # fmt: skip
    from aifactory.tasks.data.dataspace import filesystem
    from aifactory.tasks.doors.lake import atomic_write_bytes

    fs, root = filesystem(lake_url, storage_options)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    path = f"{root}/audit/access/{stamp}-{record['startup']}-{uuid.uuid4().hex[:8]}.json"
    atomic_write_bytes(fs, path, json.dumps(record, sort_keys=True).encode() + b"\n")
    return path


def lake_record(cfg: Any, startup: str, rec: dict[str, Any]) -> str:
    """Write ``rec`` to the start-up's audit area with its own identity."""
    lake = cfg.lake_url_for(startup)
    return write_lake_record(lake, cfg.for_startup(startup).storage_options(lake), rec)


def record(cfg: Any, startup: str, action: str, target: str, allowed: bool, by: str,
           reason: str) -> dict[str, Any]:  # fmt: skip
    """Record one decision in the operator log and the start-up's lake (best effort)."""
    rec = entry(startup, action, target, allowed, by, reason)
    try:
        append_operator_log(cfg.runs_dir, rec)
    except OSError as exc:
        print(f"warning: audit: operator log not written ({exc})", file=sys.stderr)
    try:
        lake_record(cfg, startup, rec)
    except Exception as exc:  # the store may be what refused; the operator log has it
        print(f"warning: audit: {startup}'s lake record not written "
              f"({' '.join(str(exc).split())[:200]})", file=sys.stderr)  # fmt: skip
    return rec


def refused(cfg: Any, startup: str, action: str, exc: BaseException) -> dict[str, Any] | None:
    """Record ``exc`` if it is a refusal (admission, policy, isolation, the object store)
    not recorded yet; None otherwise."""
    kind = refusal_of(exc)
    if kind is None or getattr(exc, "_aif_audited", False):
        return None
    with contextlib.suppress(AttributeError):
        exc._aif_audited = True  # type: ignore[attr-defined]  # nested flows record it once
    return record(cfg, startup, action, target="", allowed=False, by=kind, reason=str(exc))


@contextlib.contextmanager
def refusals_audited(cfg: Any, startup: str | None, action: str) -> Iterator[None]:
    """Record a refusal that ends the block (then let it go on)."""
    try:
        yield
    except Exception as exc:
        sid = startup or cfg.default_startup
        if sid in cfg.startups:
            refused(cfg, sid, action, exc)
        raise
