"""The admission gate: an approved declaration, and the GPU-hour budget (sacct faked)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import pytest

from aifactory.tasks.core.config import Declaration, Startup, TrainingSpec
from aifactory.tasks.doors.slurm import SlurmClient
from aifactory.tasks.jobs.admission import AdmissionError, admit, requested_gpu_hours


class FakeSacct(SlurmClient):
    """sacct's output (after its header row) from a list; other calls recorded too."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines, self.calls = lines, []  # type: list[str], list[list[str]]

    def run(self, cmd: Sequence[str], **_k: Any) -> str:
        self.calls.append(list(cmd))
        fields = cmd[cmd.index("--format") + 1].replace(",", "|") if "--format" in cmd else ""
        return "\n".join([fields, *self.lines])


APPROVED = Declaration(intended_purpose="eta", prohibited_practices="none apply",
                       approved_by="ethics board", approved_on=dt.date(2026, 9, 1))  # fmt: skip


def _startup(**kw: Any) -> Startup:
    return Startup(account="startup-a", project="mobility-eta", declaration=APPROVED, **kw)


def test_declaration_must_be_approved() -> None:
    spec = TrainingSpec(executor="slurm")
    with pytest.raises(
        AdmissionError, match=r"refused by admission\.declaration: the project has no"
    ):
        admit("startup-x", Startup(account="x"), spec, None)
    unapproved = APPROVED.model_copy(update={"approved_by": None})
    with pytest.raises(AdmissionError, match="a declaration not approved") as e:
        admit("startup-x", Startup(account="x", declaration=unapproved), spec, None)
    assert e.value.exit_code == 5
    assert "admitted" in admit("startup-a", _startup(), spec, None)


def test_budget_counts_used_plus_requested() -> None:
    spec = TrainingSpec(executor="slurm", gpus_per_node=2, timeout_min=60)  # asks 2 GPU-hours
    assert requested_gpu_hours(spec) == 2.0 and requested_gpu_hours(spec, jobs=3) == 6.0
    # 1 GPU for 2 h and 2 GPUs for 30 min: 3 GPU-hours used
    sacct = FakeSacct(["10|startup-a|billing=1,cpu=1,gres/gpu=1,mem=2G,node=1|7200",
                       "11|startup-a|billing=1,cpu=2,gres/gpu=2,mem=2G,node=1|1800"])  # fmt: skip
    ok = admit("startup-a", _startup(gpu_hours_budget=5.0), spec, sacct)
    assert "used 3.00, requested 2.00, remaining after 0.00 of 5" in ok
    assert "--accounts" in sacct.calls[0] and "startup-a" in sacct.calls[0]
    with pytest.raises(AdmissionError) as e:
        admit("startup-a", _startup(gpu_hours_budget=4.5), spec, sacct)
    msg = str(e.value)
    assert "refused by admission.budget: GPU-hours used 3.00" in msg
    assert "remaining 1.50 of 4.5, requested 2.00" in msg and "\n" not in msg
    with pytest.raises(AdmissionError, match=r"requested 6\.00 \(3 job"):
        admit("startup-a", _startup(gpu_hours_budget=8.0), spec, sacct, jobs=3)
