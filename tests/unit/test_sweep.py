"""Sweep trials and the job-array script (the site test runs one)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aifactory.tasks.config import TrainingSpec
from aifactory.tasks.errors import ConfigError
from aifactory.tasks.sweep import grid_trials, parse_value, random_trials, render_array


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
