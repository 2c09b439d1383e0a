"""Usage policies: who may ingest a dataset, for what, until when; and pseudonymisation.

:func:`evaluate` is called before any object is listed or read. Its rules, in order:

1. ``allowed_startups``: the start-up is listed (or the list has ``*``);
2. ``startup.purposes``: the purpose is one the start-up declared for its project;
3. ``allowed_purposes``: the purpose is listed in the dataset's policy (or ``*``);
4. ``valid_until``: today (UTC) is on or before the policy's last day.

The first rule that fails refuses the ingest (:class:`PolicyError`, naming the rule); the
decision, allowed or refused, is recorded in the snapshot manifest and the run's artifact.

Personal-data columns are replaced, before anything reaches the lake, by a keyed hash
(HMAC-SHA256, 128 bits, hex with a ``ps_`` prefix): stable for one key, so joins and the
train/test split still work, and not reversible without the key. The key comes from a
secret (environment, a file created with mode 0600, or a Prefect Secret block) and is
never logged; manifests carry only its fingerprint (a keyed hash of a fixed label).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from aifactory.tasks.core.errors import AifError, ConfigError
from aifactory.tasks.data.catalog import DatasetEntry


class PolicyError(AifError):
    """A dataset's usage policy refuses this start-up, purpose or date."""

    exit_code = 3


@dataclass(frozen=True)
class Decision:
    dataset: str
    startup: str
    purpose: str
    allowed: bool
    rule: str  # the rule that refused, or "all rules passed"
    reason: str
    checked_on: str  # date (UTC) the policy was checked against
    valid_until: str
    pseudonymised: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        verdict = "allowed" if self.allowed else "refused"
        who = f"{self.startup} ({self.purpose})"
        return f"policy of {self.dataset}: {verdict} for {who}: {self.reason}"


def evaluate(
    entry: DatasetEntry,
    startup: str,
    purpose: str,
    declared_purposes: list[str] | None = None,
    today: dt.date | None = None,
) -> Decision:
    """The policy decision for ``startup`` using ``entry`` for ``purpose`` on ``today``."""
    pol = entry.policy
    day = today or dt.datetime.now(dt.UTC).date()
    base: dict[str, Any] = {
        "dataset": entry.id, "startup": startup, "purpose": purpose,
        "checked_on": day.isoformat(), "valid_until": pol.valid_until.isoformat(),
    }  # fmt: skip

    def refuse(rule: str, reason: str) -> Decision:
        return Decision(allowed=False, rule=rule, reason=reason, **base)

    if "*" not in pol.allowed_startups and startup not in pol.allowed_startups:
        return refuse(
            "policy.allowed_startups",
            f"start-up {startup!r} is not among the allowed start-ups "
            f"({', '.join(pol.allowed_startups)})",
        )
    if declared_purposes is not None and purpose not in declared_purposes:
        declared = ", ".join(declared_purposes) or "none"
        return refuse(
            "startup.purposes",
            f"purpose {purpose!r} is not one that start-up {startup!r} declared ({declared})",
        )
    if "*" not in pol.allowed_purposes and purpose not in pol.allowed_purposes:
        return refuse(
            "policy.allowed_purposes",
            f"purpose {purpose!r} is not among the allowed purposes "
            f"({', '.join(pol.allowed_purposes)})",
        )
    if day > pol.valid_until:
        return refuse(
            "policy.valid_until",
            f"the policy expired on {pol.valid_until.isoformat()} (checked on {day.isoformat()})",
        )
    return Decision(
        allowed=True,
        rule="all rules passed",
        reason=f"start-up, purpose and date (valid until {pol.valid_until.isoformat()}) allowed",
        pseudonymised=list(pol.personal_data),
        **base,
    )


def enforce(decision: Decision) -> Decision:
    if not decision.allowed:
        raise PolicyError(
            f"ingest {decision.dataset}: refused by {decision.rule}: {decision.reason}"
        )
    return decision


# -- secrets ----------------------------------------------------------------------------
def resolve_secret(spec: str | None, what: str) -> bytes:
    """The bytes of a secret given as ``file:PATH`` (created, 0600, when missing),
    ``env:VAR``, ``prefect-secret:BLOCK`` or the value itself."""
    if not spec:
        raise ConfigError(
            f"{what}: no key configured (set AIF_PSEUDONYMISATION_KEY, or dataspace."
            "pseudonymisation_key to file:PATH, env:VAR or prefect-secret:BLOCK)"
        )
    if spec.startswith("env:"):
        var = spec[4:]
        value = os.environ.get(var)
        if not value:
            raise ConfigError(f"{what}: environment variable {var} is not set")
        return value.encode()
    if spec.startswith("file:"):
        path = Path(spec[5:]).expanduser()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
        data = path.read_bytes().strip()
        if len(data) < 16:
            raise ConfigError(f"{what}: key file {path} holds fewer than 16 bytes")
        return data
    if spec.startswith("prefect-secret:"):
        name = spec.split(":", 1)[1]
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(name).get()  # type: ignore[union-attr]
        except Exception as exc:
            raise ConfigError(
                f"{what}: cannot load Prefect Secret block {name!r} ({type(exc).__name__})"
            ) from None
        return str(value).encode()
    return spec.encode()


def key_fingerprint(key: bytes) -> str:
    """Identifies a key without revealing it: a keyed hash of a fixed label."""
    label = b"aifactory pseudonymisation key fingerprint"
    return hmac.new(key, label, hashlib.sha256).hexdigest()[:16]


def pseudonymise(values: pa.Array, key: bytes) -> pa.Array:
    """``ps_`` + 32 hex of HMAC-SHA256(key, value) for each value; nulls stay null."""
    base = hmac.new(key, digestmod=hashlib.sha256)
    out: list[str | None] = []
    for v in values.to_pylist():
        if v is None:
            out.append(None)
            continue
        h = base.copy()
        h.update(str(v).encode())
        out.append("ps_" + h.hexdigest()[:32])
    return pa.array(out, pa.string())


def pseudonymise_batch(batch: pa.RecordBatch, columns: list[str], key: bytes) -> pa.RecordBatch:
    if not columns:
        return batch
    arrays = [
        pseudonymise(batch.column(i), key) if name in columns else batch.column(i)
        for i, name in enumerate(batch.schema.names)
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)
