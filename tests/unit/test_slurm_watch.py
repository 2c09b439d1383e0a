"""The training watcher's policy per ending, against a scripted Slurm (unit level: the real
site proves requeue and resubmission end to end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.errors import TrainingError
from aifactory.tasks.jobs.slurm_watch import submit_and_watch


class ScriptedSlurm:
    """Each submitted job walks through its scripted states, then ends with its record."""

    def __init__(self, endings: list[tuple[list[str], dict[str, str]]]) -> None:
        self.endings = endings
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.polls: dict[str, int] = {}

    def jobs_named(self, name: str) -> list[str]:
        return []

    def submit(self, script: str, extra: Any = None) -> str:
        job = str(100 + len(self.submitted))
        self.submitted.append(job)
        return job

    def _script(self, job: str) -> tuple[list[str], dict[str, str]]:
        return self.endings[self.submitted.index(job)]

    def state(self, job: str) -> str:
        states, rec = self._script(job)
        i = self.polls.get(job, 0)
        self.polls[job] = i + 1
        return states[i] if i < len(states) else rec["State"]

    def sacct_record(self, job: str) -> dict[str, str]:
        _, rec = self._script(job)
        return {"JobID": job, "Partition": "gpu", "End": "2026-11-27T05:00:00",
                "Elapsed": "00:01:00", **rec}  # fmt: skip

    def cancel(self, jobs: list[str]) -> None:
        self.cancelled += jobs


def _watch(slurm: ScriptedSlurm, tmp_path: Path, max_resubmits: int = 2) -> Any:
    seen: list[str] = []
    said: list[str] = []
    out = submit_and_watch(slurm, str(tmp_path / "train.sbatch"), str(tmp_path), "aif-train-x",  # type: ignore[arg-type]
                           said.append, poll_s=0.001, max_resubmits=max_resubmits,
                           on_job=seen.append)  # fmt: skip
    return out, seen, said


def test_timeout_is_resubmitted_and_completes(tmp_path: Path) -> None:
    done = {"State": "COMPLETED", "ExitCode": "0:0"}
    slurm = ScriptedSlurm([(["RUNNING"], {"State": "TIMEOUT"}), (["PENDING", "RUNNING"], done)])
    (job, rec), seen, said = _watch(slurm, tmp_path)
    assert job == "101" and seen == ["100", "101"]
    assert rec["aif_restarts"] == "1" and rec["aif_jobs"] == "100,101"
    assert any("job 100 hit its time limit after 00:01:00: resubmitting" in m for m in said)


def test_preemption_and_node_failure_are_resubmitted(tmp_path: Path) -> None:
    slurm = ScriptedSlurm([(["RUNNING"], {"State": "PREEMPTED"}),
                           (["RUNNING"], {"State": "NODE_FAIL"}),
                           (["RUNNING"], {"State": "COMPLETED"})])  # fmt: skip
    (_job, rec), seen, _ = _watch(slurm, tmp_path)
    assert seen == ["100", "101", "102"] and rec["aif_restarts"] == "2"


def test_requeue_in_the_same_job_counts_as_a_restart(tmp_path: Path) -> None:
    slurm = ScriptedSlurm([(["PENDING", "RUNNING", "PENDING", "RUNNING"],
                            {"State": "COMPLETED"})])  # fmt: skip
    (_job, rec), seen, said = _watch(slurm, tmp_path)
    assert seen == ["100"] and rec["aif_restarts"] == "1"
    assert any("requeued (restart 1)" in m for m in said)


def test_requeue_through_completing_is_seen(tmp_path: Path) -> None:
    """What scontrol requeue looks like on the site: RUNNING, COMPLETING, PENDING, RUNNING."""
    slurm = ScriptedSlurm([(["RUNNING", "COMPLETING", "PENDING", "RUNNING"],
                            {"State": "COMPLETED"})])  # fmt: skip
    (_, rec), _, _ = _watch(slurm, tmp_path)
    assert rec["aif_restarts"] == "1"


def test_restarts_too_quick_to_poll_are_read_from_the_job_log(tmp_path: Path) -> None:
    (tmp_path / "slurm-100.out").write_text(
        "aif: job 100 on vm restart 0 gpus=0\naif: job 100 on vm restart 2 gpus=0\n"
    )
    slurm = ScriptedSlurm([(["RUNNING"], {"State": "COMPLETED"})])
    (_, rec), _, _ = _watch(slurm, tmp_path)
    assert rec["aif_restarts"] == "2"


def test_resubmissions_are_bounded(tmp_path: Path) -> None:
    slurm = ScriptedSlurm([(["RUNNING"], {"State": "TIMEOUT"})] * 3)
    with pytest.raises(TrainingError) as e:
        _watch(slurm, tmp_path, max_resubmits=1)
    msg = str(e.value)
    assert "hit its time limit" in msg and "after 1 resubmission(s): jobs 100, 101" in msg
    assert slurm.submitted == ["100", "101"]


@pytest.mark.parametrize(
    ("rec", "needle"),
    [
        ({"State": "OUT_OF_MEMORY", "AllocTRES": "cpu=1,mem=2G", "MaxRSS": "2100M"},
         "ran out of memory (allocated 2G, MaxRSS 2100M)"),
        ({"State": "FAILED", "ExitCode": "3:0"}, "ended FAILED (exit code 3:0)"),
        ({"State": "CANCELLED", "StateDetail": "cancelled by alice"},
         "was CANCELLED by alice at 2026-11-27T05:00:00"),
    ],
)  # fmt: skip
def test_never_retried(tmp_path: Path, rec: dict[str, str], needle: str) -> None:
    slurm = ScriptedSlurm([(["RUNNING"], rec), (["RUNNING"], {"State": "COMPLETED"})])
    with pytest.raises(TrainingError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        _watch(slurm, tmp_path)
    assert slurm.submitted == ["100"]


def test_checkpointed_but_not_requeued_is_resubmitted(tmp_path: Path) -> None:
    slurm = ScriptedSlurm([(["RUNNING"], {"State": "FAILED", "ExitCode": "99:0"}),
                           (["RUNNING"], {"State": "COMPLETED"})])  # fmt: skip
    (job, _rec), _seen, said = _watch(slurm, tmp_path)
    assert job == "101" and any("checkpointed after a signal but was not requeued" in m
                                for m in said)  # fmt: skip
