"""The language-model payload: same seed, data and config give identical CPU weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from aifactory.tasks.data.textgen import generate_reviews


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
