"""The language-model payload: same seed, data and config give identical CPU weights; a
config that cannot train and a diverged run are refused with one line (exit 2)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from aifactory.tasks.data.textgen import generate_reviews
from aifactory.tasks.payloads.job import Job, PayloadError
from aifactory.tasks.payloads.train_lm import train


def _train(data: list[str], run_dir: Path, cfg: Path) -> str:
    subprocess.run(
        [sys.executable, "-m", "aifactory.tasks.payloads.train_lm", "--data", ",".join(data),
         "--run-dir", str(run_dir), "--config", str(cfg)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return (run_dir / "weights.sha256").read_text().strip()


def test_identical_weights_and_metrics(tmp_path: Path) -> None:
    data = generate_reviews(f"file://{tmp_path}/reviews", rows=600, objects=2)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 12, "layers": 1, "d_model": 32, "context": 32}))
    a = _train(data, tmp_path / "a", cfg)
    b = _train(data, tmp_path / "b", cfg)
    assert a == b
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert m["tokens_per_second"] > 0 and 0.0 <= m["data_stall_fraction"] <= 1.0
    assert m["final_loss"] < 5.6  # below uniform over 256 bytes (ln 256 = 5.55) after training


def test_text_generator_is_deterministic(tmp_path: Path) -> None:
    a = generate_reviews(f"file://{tmp_path}/a", rows=300, objects=2, seed=3)
    b = generate_reviews(f"file://{tmp_path}/b", rows=300, objects=2, seed=3)
    for x, y in zip(a, b, strict=True):
        assert Path(x[7:]).read_bytes() == Path(y[7:]).read_bytes()


def test_stop_signal_then_resume_gives_the_same_weights(tmp_path: Path) -> None:
    """The LM payload on the job runtime: checkpoint, exit 99, resume at the exact step."""
    import os

    data = generate_reviews(f"file://{tmp_path}/reviews", rows=600, objects=2)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 12, "layers": 1, "d_model": 32, "context": 32}))
    whole = _train(data, tmp_path / "whole", cfg)
    cut = tmp_path / "cut"
    args = [sys.executable, "-m", "aifactory.tasks.payloads.train_lm", "--data", ",".join(data),
            "--run-dir", str(cut), "--config", str(cfg)]  # fmt: skip
    env = {**os.environ, "AIF_TRAIN_SIGNAL_AT_STEP": "5"}
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 99, first.stdout + first.stderr
    assert _train(data, cut, cfg) == whole
    ledger = [json.loads(ln) for ln in (cut / "ledger.jsonl").read_text().splitlines()]
    assert ledger[0]["to"] == [5] and ledger[-1]["from"] == [5]


def test_a_config_that_cannot_train_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """Issue 16: `aif train-lm --steps 0` trained nothing and reported loss nan. Every count
    must be at least 1 (and lr positive, d_model a multiple of heads): one line naming the
    key, before any data is read (the data URL here does not exist) or any step trained."""
    bad = [({"steps": 0}, r"^config steps=0: must be a whole number of at least 1$"),
           ({"batch_size": -2}, r"^config batch_size=-2: "), ({"layers": 0}, r"^config layers=0: "),
           ({"context": 1.5}, r"^config context=1.5: "), ({"lr": 0}, r"^config lr=0: must be a "),
           ({"d_model": 30}, r"^config d_model=30 must be a multiple of heads=4")]  # fmt: skip
    for cfg, refusal in bad:
        job = Job(tmp_path / "run", cfg)
        job.namespace = argparse.Namespace(data=f"file://{tmp_path}/none.parquet")
        with pytest.raises(PayloadError, match=refusal):
            train(job)
    assert list((tmp_path / "run").iterdir()) == []


def test_a_diverged_run_fails_and_commits_nothing(tmp_path: Path) -> None:
    """A loss that turns nan (here lr 1e30) ends the job at once with exit 2 and one line;
    no metrics.json, so the stage fails instead of registering a nan model."""
    data = generate_reviews(f"file://{tmp_path}/reviews", rows=300, objects=1)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"steps": 6, "layers": 1, "d_model": 32, "context": 32,
                               "lr": 1e30}))  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "aifactory.tasks.payloads.train_lm", "--data", ",".join(data),
         "--run-dir", str(tmp_path / "run"), "--config", str(cfg)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("train_lm: error: training diverged: "
                                                          "loss nan at step ")  # fmt: skip
    assert not (tmp_path / "run" / "metrics.json").exists()
