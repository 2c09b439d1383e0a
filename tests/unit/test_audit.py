"""The audit trail: refusals and policy decisions, in the operators' log and the lake."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core import audit
from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.errors import DataError, StorageError, TenancyError, TrainingError
from aifactory.tasks.data.policy import PolicyError
from aifactory.tasks.jobs.admission import AdmissionError


@pytest.mark.parametrize(("exc", "kind"), [
    (AdmissionError("run for x: refused by admission.budget"), "admission"),
    (PolicyError("refused by policy.allowed_startups"), "usage-policy"),
    (TenancyError("isolation.s3_prefix: ..."), "isolation"),
    (StorageError("data space s3://b/x: access denied by the object store"), "object-store"),
    (TrainingError("job 7 FAILED: PermissionError: Forbidden"), "object-store (in a job)"),
    (DataError("object x: column y missing"), None),
    (ValueError("access denied"), None),
])  # fmt: skip
def test_what_counts_as_a_refusal(exc: BaseException, kind: str | None) -> None:
    assert audit.refusal_of(exc) == kind


def _lines(runs_dir: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in audit.operator_log(runs_dir).read_text().splitlines()]


def test_a_refusal_is_recorded_once_with_who_what_when(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    audit_lake_records: list[tuple[str, dict[str, Any]]],
) -> None:  # fmt: skip
    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    cfg = load_profile("local")
    sid = cfg.default_startup
    err = AdmissionError(f"run for {sid}: refused by admission.budget: GPU-hours used 9")
    with pytest.raises(AdmissionError), audit.refusals_audited(cfg, None, "outer"), \
            audit.refusals_audited(cfg, sid, "inner"):  # fmt: skip
        raise err
    [line] = _lines(cfg.runs_dir)
    assert line["startup"] == sid and line["action"] == "inner" and line["decision"] == "refused"
    assert line["by"] == "admission" and "GPU-hours used 9" in line["reason"]
    assert line["unix_user"] and line["at"].endswith("+00:00")
    assert [s for s, _ in audit_lake_records] == [sid]  # and in its own lake area
    log = audit.operator_log(cfg.runs_dir)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.parent.stat().st_mode) == 0o700
    with pytest.raises(DataError), audit.refusals_audited(cfg, sid, "bad data"):
        raise DataError("not a refusal")
    assert len(_lines(cfg.runs_dir)) == 1


@pytest.mark.real_audit
def test_the_lake_record_is_written_in_the_startups_area(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    cfg = load_profile("local")
    sid = cfg.default_startup
    rec = audit.record(cfg, sid, "ingest x", "s3://b/k", False, "object-store", "denied")
    lake = Path(cfg.lake_url_for(sid).removeprefix("file://"))
    [written] = list((lake / "audit" / "access").glob(f"*-{sid}-*.json"))
    assert json.loads(written.read_text()) == rec


def test_a_refused_pipeline_run_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    audit_lake_records: list[tuple[str, dict[str, Any]]],
) -> None:  # fmt: skip
    import aifactory.flows.pipeline as fp

    def _no_service(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a service was touched before the refusal")

    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fp, "ingest_flow", _no_service)
    with pytest.raises(AdmissionError):
        fp.pipeline.fn(profile="site", startup="startup-c")
    [line] = _lines(load_profile("site").runs_dir)
    assert line["startup"] == "startup-c" and line["by"] == "admission"
    assert line["action"] == "run aif-pipeline (profile site)"
    assert [s for s, _ in audit_lake_records] == ["startup-c"]
