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

    def sacct(self, fields: Any, jobs: Any = (), args: Any = ()) -> list[dict[str, str]]:
        # sacct -D: every attempt of a requeued job, the earlier ones first.
        return [{"JobID": jobs[0], "State": "NODE_FAIL", "NodeList": "aif-n2"},
                {"JobID": jobs[0], "State": "RUNNING", "NodeList": "aif-n1"}]  # fmt: skip

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
    assert any("requeued after NODE_FAIL on aif-n2 (restart 1)" in m for m in said), said


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


class OutageSlurm(ScriptedSlurm):
    """Slurm whose controller or accounting stops answering for some polls (issue 15)."""

    def __init__(self, endings: list[tuple[list[str], dict[str, str]]],
                 ctld_down: set[int] = frozenset(), sacct_down: int = 0) -> None:  # type: ignore[assignment]  # fmt: skip
        super().__init__(endings)
        self.ctld_down, self.sacct_down, self.n = ctld_down, sacct_down, 0

    @staticmethod
    def _err(part: str) -> Any:
        from aifactory.tasks.core.errors import SlurmCommandError
        from aifactory.tasks.doors.slurm import SlurmUnreachable

        msg = {"controller": "slurm_load_jobs error: Unable to contact slurm controller",
               "accounting": "sacct: error: Problem talking to the database"}[part]  # fmt: skip
        return SlurmUnreachable(part, SlurmCommandError(["x"], 1, "", msg))

    def state(self, job: str) -> str:
        self.n += 1
        if self.n in self.ctld_down:
            raise self._err("controller")
        return super().state(job)

    def sacct_record(self, job: str) -> dict[str, str]:
        if self.sacct_down > 0:
            self.sacct_down -= 1
            raise self._err("accounting")
        return super().sacct_record(job)


def test_a_controller_outage_is_said_and_waited_out(tmp_path: Path) -> None:
    """slurmctld down for a while: the watcher says so (and since when), the job runs on,
    and the run completes; before, it printed nothing."""
    done = {"State": "COMPLETED", "ExitCode": "0:0"}
    slurm = OutageSlurm([(["RUNNING"] * 8, done)], ctld_down={3, 4, 5, 6})
    (_, rec), _, said = _watch(slurm, tmp_path)
    assert rec["State"] == "COMPLETED"
    down = [m for m in said if "controller (slurmctld) is unreachable since" in m]
    assert len(down) == 1 and "last seen RUNNING" in down[0], said
    assert any("controller answers again" in m for m in said), said
    assert not any("UNKNOWN" in m for m in said), said


def test_accounting_down_at_the_jobs_end_waits_for_its_record(tmp_path: Path) -> None:
    """MariaDB killed: the job ends, sacct fails; the watcher waits, saying so, and returns
    the job's full record once the accounting answers (never a record-less success)."""
    done = {"State": "COMPLETED", "ExitCode": "0:0"}
    slurm = OutageSlurm([(["RUNNING", "COMPLETED"], done)], sacct_down=3)
    (_, rec), _, said = _watch(slurm, tmp_path)
    assert rec["Partition"] == "gpu" and rec["End"] and rec["State"] == "COMPLETED"
    assert any("accounting (slurmdbd or its database) is unreachable" in m for m in said), said
    assert any("accounting answers again" in m for m in said), said


def test_an_outage_past_the_limit_leaves_the_job_to_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aifactory.tasks.jobs import slurm_watch

    monkeypatch.setattr(slurm_watch, "OUTAGE_LIMIT_S", 0.05)
    slurm = OutageSlurm([(["RUNNING"] * 3, {"State": "COMPLETED"})],
                        ctld_down=set(range(2, 100_000)))  # fmt: skip
    with pytest.raises(TrainingError, match=r"controller \(slurmctld\) has not answered for .*"
                                            r"the job is left as it is"):  # fmt: skip
        _watch(slurm, tmp_path)
    assert slurm.cancelled == []  # the job runs on; a re-run reattaches
