"""Sweep trials and the job-array script (the site test runs one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aifactory.tasks.core.config import TrainingSpec
from aifactory.tasks.core.errors import ConfigError
from aifactory.tasks.stages.sweep import grid_trials, parse_value, random_trials, render_array


def test_grid_is_every_combination() -> None:
    trials = grid_trials({"lr": [0.001, 0.01], "hidden": [[32], [64, 32]], "batch_size": [256]})
    assert len(trials) == 4
    assert {"batch_size": 256, "hidden": [64, 32], "lr": 0.01} in trials
    assert parse_value("hidden", "64x32") == [64, 32] and parse_value("epochs", "3") == 3
    with pytest.raises(ConfigError, match="'dropout' cannot be tuned"):
        grid_trials({"dropout": [0.1]})


def test_random_search_is_seeded_and_in_range() -> None:
    a = random_trials({"lr": (1e-4, 1e-2), "batch_size": (128, 512)}, 50, seed=3)
    assert a == random_trials({"lr": (1e-4, 1e-2), "batch_size": (128, 512)}, 50, seed=3)
    assert all(1e-4 <= t["lr"] <= 1e-2 and 128 <= t["batch_size"] <= 512 for t in a)
    assert len({t["lr"] for t in a}) == 50


def test_one_array_script_for_a_thousand_trials(tmp_path: Path) -> None:
    text = render_array(TrainingSpec(gpus_per_node=1, partition="gpu"), account="startup-a",
                        job_name="aif-sweep-k", sweep_key="k", sweep_dir="/runs/sweeps/k",
                        featureset_path="/runs/sweeps/k/featureset.json", n_trials=1000,
                        max_parallel=8, python="/venv/bin/python")  # fmt: skip
    assert "#SBATCH --array=0-999%8" in text and "#SBATCH --gres=gpu:1" in text
    assert "#SBATCH --output=slurm-%A_%a.out" in text
    assert '--run-dir /runs/sweeps/k/"${trial}"' in text
    script = tmp_path / "sweep.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


# -- the job layer's arrays -----------------------------------------------------------------
class FakeArraySlurm:
    """squeue/sacct/sbatch of an array whose tasks end as told, one poll after submission."""

    def __init__(self, endings: list[dict[int, str]]) -> None:
        self.endings = endings  # per submission: task index -> final state
        self.submitted: list[list[str]] = []
        self.cancelled: list[str] = []
        self.polls: dict[str, int] = {}

    def jobs_named(self, name: str) -> list[str]:
        return []

    def submit(self, script: str, extra_args: tuple[str, ...] | list[str] = ()) -> str:
        self.submitted.append(list(extra_args))
        return str(100 + len(self.submitted))

    def squeue_states(self, jobs: list[str]) -> dict[str, str]:
        live = {}
        for j in jobs:
            self.polls[j] = self.polls.get(j, 0) + 1
            if self.polls[j] < 2 and j not in self.cancelled:
                live[j] = "RUNNING"
        return live

    def array_records(self, job: str) -> dict[int, dict[str, str]]:
        if self.polls.get(job, 0) < 2:
            return {}
        ends = self.endings[int(job) - 101]
        return {i: {"JobID": f"{job}_{i}", "State": st, "ExitCode": "0:0", "Elapsed": "00:00:05"}
                for i, st in ends.items()}  # fmt: skip

    def cancel(self, jobs: list[str]) -> None:
        self.cancelled += jobs


def test_array_tasks_that_timed_out_are_resubmitted_alone() -> None:
    from aifactory.tasks.jobs.slurm_watch import watch_array

    slurm = FakeArraySlurm([{0: "COMPLETED", 1: "TIMEOUT", 2: "FAILED", 3: "PREEMPTED"},
                            {1: "COMPLETED", 3: "COMPLETED"}])  # fmt: skip
    lines: list[str] = []
    recs = watch_array(slurm, "/x/sweep.sbatch", "aif-sweep-k", 4, 2, lines.append,  # type: ignore[arg-type]
                       poll_s=0.01, max_resubmits=1)  # fmt: skip
    assert slurm.submitted == [[], ["--array=1,3%2"]]  # one sbatch for both, throttle kept
    assert {i: r["State"] for i, r in recs.items()} == {0: "COMPLETED", 1: "COMPLETED",
                                                       2: "FAILED", 3: "COMPLETED"}  # fmt: skip
    assert recs[1]["JobID"] == "102_1" and recs[2]["JobID"] == "101_2"
    assert any("resubmitted as job array 102" in ln for ln in lines)


def test_array_without_resubmissions_reports_the_timeout() -> None:
    from aifactory.tasks.jobs.slurm_watch import watch_array

    slurm = FakeArraySlurm([{0: "TIMEOUT"}])
    recs = watch_array(slurm, "/x/s", "n", 1, 1, print, poll_s=0.01)  # type: ignore[arg-type]
    assert recs[0]["State"] == "TIMEOUT" and slurm.submitted == [[]]


def test_array_is_cancelled_with_its_watcher() -> None:
    import threading

    from aifactory.tasks.core.errors import TrainingError
    from aifactory.tasks.jobs.slurm_watch import watch_array

    slurm = FakeArraySlurm([{0: "COMPLETED"}])
    slurm.squeue_states = lambda jobs: {j: "RUNNING" for j in jobs}  # type: ignore[method-assign]
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingError, match="cancelled with its watcher"):
        watch_array(slurm, "/x/s", "n", 1, 1, print, poll_s=0.01, cancel_event=stop)  # type: ignore[arg-type]
    assert slurm.cancelled == ["101"]


def test_local_array_runs_each_task_in_its_folder_and_reports_failures(tmp_path: Path) -> None:
    import sys

    from aifactory.tasks.jobs.executors import JobRequest, LocalExecutor

    code = ("import os, sys; t = int(os.environ['SLURM_ARRAY_TASK_ID']); "
            "open('done', 'w').write(str(t)); sys.exit(3 if t == 1 else 0)")  # fmt: skip

    def task(i: int) -> tuple[Path, list[str]]:
        folder = tmp_path / f"trial {i}"
        folder.mkdir()
        return folder, [sys.executable, "-c", code]

    req = JobRequest("aif-sweep-k", tmp_path, tmp_path / "s.sbatch", [], {}, lambda _m: None,
                     task=task)  # fmt: skip
    res = LocalExecutor().run_array(req, 3, 2)
    assert {i: r["State"] for i, r in res.tasks.items()} == {0: "COMPLETED", 1: "FAILED",
                                                            2: "COMPLETED"}  # fmt: skip
    assert [(tmp_path / f"trial {i}" / "done").read_text() for i in range(3)] == ["0", "1", "2"]


def test_project_sweep_tunes_any_config_key() -> None:
    assert parse_value("dropout", "0.1", own_script=True) == 0.1
    assert parse_value("arch", "wide", own_script=True) == "wide"
    assert grid_trials({"dropout": [0.1, 0.2]}, own_script=True) == [{"dropout": 0.1},
                                                                     {"dropout": 0.2}]  # fmt: skip
    with pytest.raises(ConfigError, match="not a config key"):
        grid_trials({"a-b": [1]}, own_script=True)
    with pytest.raises(ConfigError, match="not a valid value for epochs"):
        parse_value("epochs", "many")
