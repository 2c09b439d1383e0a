"""`aif model promote | rollback`: the champion alias moves only on evidence.

Promote: the candidate (alias ``candidate``, or a given version) becomes ``champion`` when
it passes every configured check (profile section ``promotion``: metric bounds such as a
minimum test R², the model card and data summary attached, an approved responsible-AI
declaration, optionally a clean code tree) and either there is no champion yet or it beats
the champion on the held-out metric (test RMSE by default, lower is better) by at least the
margin, relative to the champion's figure. The decision, both figures, every check and the
previous champion are recorded as tags on the candidate version, whether it is promoted or
not. Rollback moves ``champion`` back to the version it replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aifactory.tasks.core.errors import AifError
from aifactory.tasks.core.provenance import now_iso


class PromotionError(AifError):
    """A promotion or rollback cannot be done as asked."""


@dataclass
class Decision:
    promoted: bool
    candidate: str
    champion_before: str | None
    candidate_value: float
    champion_value: float | None
    metric: str
    margin: float
    reason: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (check, passed, detail)


def _checks(
    client: Any, name: str, version: str, spec: Any, approved: bool | None, risk: str = "",
    approved_by: str | None = None,
) -> list[tuple[str, bool, str]]:  # fmt: skip
    """Every configured check on one version: (what, passed, detail)."""
    mv = client.get_model_version(name, version)
    run_id = mv.tags.get("aif.run_id") or mv.run_id
    metrics = client.get_run(run_id).data.metrics if run_id else {}
    out: list[tuple[str, bool, str]] = []
    for c in spec.checks:
        v = metrics.get(c.metric)
        label = (
            c.metric
            + (f" >= {c.min:g}" if c.min is not None else "")
            + (f" <= {c.max:g}" if c.max is not None else "")
        )
        if v is None:
            out.append((label, False, "not logged"))
            continue
        ok = (c.min is None or v >= c.min) and (c.max is None or v <= c.max)
        out.append((label, ok, f"{v:.4g}"))
    if spec.require_documents:
        docs = {a.path for a in client.list_artifacts(run_id, "docs")} if run_id else set()
        need = {"docs/model_card.md", "docs/training_data_summary.md",
                "docs/ro-crate-metadata.json"}  # fmt: skip
        missing = sorted(need - docs)
        out.append(("documents attached", not missing,
                    "all" if not missing else "missing " + ", ".join(missing)))  # fmt: skip
    if spec.require_clean_code:
        dirty = mv.tags.get("aif.git_dirty", "unknown")
        out.append(("trained from a clean tree", dirty == "false", f"git_dirty={dirty}"))
    if spec.require_approved_declaration:
        out.append(("responsible-AI declaration approved", bool(approved),
                    "approved" if approved else "no approved declaration for start-up "
                    + mv.tags.get("aif.startup", "?")))  # fmt: skip
    if risk == "high":
        why = (f"approved by {approved_by}" if approved_by else "the start-up's declaration is "
               "high-risk: promote with --approved-by NAME (a person's sign-off)")  # fmt: skip
        out.append(("named approval of a high-risk model", bool(approved_by), why))
    return out


def _client(tracking_uri: str) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``alias`` points at; None when there is none. A refusal by a registry
    with permissions is not "no alias": it goes on (registry_identity makes it one line)."""
    from mlflow.exceptions import MlflowException

    from aifactory.tasks.doors.registry import refused

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if refused(exc):
            raise
        return None


def _metric(client: Any, name: str, version: str, metric: str) -> float:
    mv = client.get_model_version(name, version)
    run_id = mv.tags.get("aif.run_id") or mv.run_id
    if not run_id:
        raise PromotionError(f"model {name} version {version}: no training run recorded")
    metrics = client.get_run(run_id).data.metrics
    if metric not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise PromotionError(
            f"model {name} version {version}: metric {metric!r} not logged (logged: {known})"
        )
    return float(metrics[metric])


def promote(tracking_uri: str, name: str, *, version: str | None = None, spec: Any = None,
            approved: Callable[[str], bool] | None = None,
            risk_class: Callable[[str], str] | None = None,
            approved_by: str | None = None, acting: Any = None,
            reading: Any = None) -> Decision:  # fmt: skip
    """Decide and record; ``approved(startup)`` says whether a start-up's responsible-AI
    declaration is approved and ``risk_class(startup)`` its risk class (from the profile).
    A high-risk start-up's model is promoted only with ``approved_by``, a person's name.
    On a registry with permissions, the decision is written as ``acting`` (the model's
    start-up: its MlflowSpec) and the versions' runs are read as ``reading`` (the
    operator, who reads every run: a champion trained before the registry had permissions
    lies in an experiment that no start-up owns)."""
    if approved_by is not None and not approved_by.strip():
        raise PromotionError("--approved-by: give the name of the person who approves")
    from aifactory.tasks.doors.registry import registry_identity

    with registry_identity(acting):
        return _promote(tracking_uri, name, version, spec, approved, risk_class, approved_by,
                        reading)  # fmt: skip


def _promote(tracking_uri: str, name: str, version: str | None, spec: Any,
             approved: Callable[[str], bool] | None, risk_class: Callable[[str], str] | None,
             approved_by: str | None, reading: Any) -> Decision:  # fmt: skip
    from aifactory.tasks.core.config import PromotionSpec
    from aifactory.tasks.doors.registry import registry_identity

    spec = spec or PromotionSpec()
    metric, margin = spec.metric, spec.margin
    client = _client(tracking_uri)
    candidate = version or _alias_version(client, name, "candidate")
    if candidate is None:
        raise PromotionError(f"model {name}: no 'candidate' alias and no --version given")
    champion = _alias_version(client, name, "champion")
    startup = client.get_model_version(name, candidate).tags.get("aif.startup", "")
    risk = risk_class(startup) if risk_class else ""
    with registry_identity(reading):
        cand_value = _metric(client, name, candidate, metric)
        champ_value = _metric(client, name, champion, metric) if champion else None
        checks = _checks(client, name, candidate, spec, approved(startup) if approved else None,
                         risk, approved_by.strip() if approved_by else None)  # fmt: skip
    failed = [c for c in checks if not c[1]]
    if champion == candidate:
        promoted, why = False, f"version {candidate} is already the champion"
    elif failed:
        promoted = False
        why = "failed check(s): " + "; ".join(f"{c[0]} ({c[2]})" for c in failed)
    elif champ_value is None:
        promoted, why = True, "no champion yet; every check passed"
    else:
        if spec.higher_is_better:
            needed = champ_value * (1.0 + margin)
            promoted = cand_value >= needed
            op = ">="
        else:
            needed = champ_value * (1.0 - margin)
            promoted = cand_value <= needed
            op = "<="
        why = (f"{metric} {cand_value:.4f} vs champion's {champ_value:.4f}: "
               f"{'beats' if promoted else 'does not beat'} it by the margin {margin:.1%} "
               f"(needs {op} {needed:.4f})")  # fmt: skip
    decision = Decision(promoted, candidate, champion, cand_value, champ_value, metric, margin,
                        why, checks)  # fmt: skip
    tags = {
        "aif.promotion.decision": "promoted" if decision.promoted else "kept",
        "aif.promotion.reason": decision.reason[:4000],
        "aif.promotion.metric": metric,
        "aif.promotion.candidate_value": f"{cand_value:.6f}",
        "aif.promotion.champion_value": "" if champ_value is None else f"{champ_value:.6f}",
        "aif.promotion.checks": "; ".join(
            f"{c[0]}: {'pass' if c[1] else 'FAIL'} ({c[2]})" for c in checks
        )[:4000]
        or "none configured",
        "aif.promotion.at": now_iso(),
    }
    if decision.promoted:
        tags["aif.previous_champion"] = champion or ""
        if approved_by:
            tags["aif.promotion.approved_by"] = approved_by.strip()[:200]
    for k, v in tags.items():
        client.set_model_version_tag(name, candidate, k, v)
    if decision.promoted:
        client.set_registered_model_alias(name, "champion", candidate)
        announce(name, decision, tracking_uri)
    return decision


PROMOTED_EVENT = "aif.model.promoted"  # the trigger of `aif deploy`'s promotion notification


def announce(name: str, d: Decision, tracking_uri: str) -> bool:
    """Emit the Prefect event ``aif.model.promoted`` (when a Prefect API is configured).

    The registry is the record; the event only tells the operators, so a Prefect that
    cannot be reached never undoes or fails a promotion."""
    import contextlib

    with contextlib.suppress(Exception):
        from prefect.events import emit_event
        from prefect.events.worker import EventsWorker

        emit_event(
            event=PROMOTED_EVENT,
            resource={
                "prefect.resource.id": f"aif.model.{name}.{d.candidate}",
                "prefect.resource.name": f"{name} version {d.candidate}",
                "aif.model.name": name,
                "aif.model.version": str(d.candidate),
            },
            payload={
                "reason": d.reason,
                "previous_champion": d.champion_before or "",
                "metric": d.metric,
                "value": d.candidate_value,
                "registry": tracking_uri,
            },
        )
        EventsWorker.drain_all(timeout=10)
        return True
    return False


def rollback(tracking_uri: str, name: str, acting: Any = None) -> tuple[str, str]:
    """Move ``champion`` back to the version it replaced; return (from, to). ``acting``:
    the registry user (the model's start-up) on a registry with permissions."""
    from aifactory.tasks.doors.registry import registry_identity

    with registry_identity(acting):
        return _rollback(tracking_uri, name)


def _rollback(tracking_uri: str, name: str) -> tuple[str, str]:
    client = _client(tracking_uri)
    current = _alias_version(client, name, "champion")
    if current is None:
        raise PromotionError(f"model {name}: no champion to roll back")
    previous = client.get_model_version(name, current).tags.get("aif.previous_champion", "")
    if not previous:
        raise PromotionError(
            f"model {name}: champion version {current} replaced no earlier champion"
        )
    client.set_registered_model_alias(name, "champion", previous)
    client.set_model_version_tag(name, current, "aif.rolled_back_at", now_iso())
    return current, previous
