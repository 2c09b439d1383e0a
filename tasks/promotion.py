"""`aif model promote | rollback`: the champion alias moves only on evidence.

Promote: the candidate (alias ``candidate``, or a given version) becomes ``champion`` when
there is no champion yet, or when it beats the champion on the held-out metric (lower is
better: test RMSE by default) by at least the margin, relative to the champion's figure.
The decision, both figures and the previous champion are recorded as tags on the candidate
version, whether it is promoted or not. Rollback moves ``champion`` back to the version it
replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.errors import AifError
from tasks.provenance import now_iso


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


def _client(tracking_uri: str) -> Any:
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
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


def promote(tracking_uri: str, name: str, *, version: str | None = None,
            metric: str = "test_rmse", margin: float = 0.0) -> Decision:  # fmt: skip
    client = _client(tracking_uri)
    candidate = version or _alias_version(client, name, "candidate")
    if candidate is None:
        raise PromotionError(f"model {name}: no 'candidate' alias and no --version given")
    champion = _alias_version(client, name, "champion")
    cand_value = _metric(client, name, candidate, metric)
    champ_value = _metric(client, name, champion, metric) if champion else None
    if champion == candidate:
        decision = Decision(False, candidate, champion, cand_value, champ_value, metric, margin,
                            f"version {candidate} is already the champion")  # fmt: skip
    elif champ_value is None:
        decision = Decision(True, candidate, None, cand_value, None, metric, margin,
                            "no champion yet")  # fmt: skip
    else:
        needed = champ_value * (1.0 - margin)
        ok = cand_value <= needed
        why = (f"{metric} {cand_value:.4f} vs champion's {champ_value:.4f}: "
               f"{'beats' if ok else 'does not beat'} it by the margin {margin:.1%} "
               f"(needs <= {needed:.4f})")  # fmt: skip
        decision = Decision(ok, candidate, champion, cand_value, champ_value, metric, margin, why)
    tags = {
        "aif.promotion.decision": "promoted" if decision.promoted else "kept",
        "aif.promotion.reason": decision.reason,
        "aif.promotion.metric": metric,
        "aif.promotion.candidate_value": f"{cand_value:.6f}",
        "aif.promotion.champion_value": "" if champ_value is None else f"{champ_value:.6f}",
        "aif.promotion.at": now_iso(),
    }
    if decision.promoted:
        tags["aif.previous_champion"] = champion or ""
    for k, v in tags.items():
        client.set_model_version_tag(name, candidate, k, v)
    if decision.promoted:
        client.set_registered_model_alias(name, "champion", candidate)
    return decision


def rollback(tracking_uri: str, name: str) -> tuple[str, str]:
    """Move ``champion`` back to the version it replaced; return (from, to)."""
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
