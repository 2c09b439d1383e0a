"""The job runtime (tasks/payloads/job.py) with a trainer of a start-up's own shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRAINER = """
import sys
from aifactory.tasks.payloads.job import Job, PayloadError, run_job

def train(job: Job) -> None:
    total = int(job.config.get("steps", 10))
    if total < 0:
        raise PayloadError(f"steps must be >= 0, got {total}")
    state = job.resume(fingerprint=str(total)) or {"step": 0, "acc": 0}
    step, acc = state["step"], state["acc"]
    while step < total:
        step += 1
        acc = acc * 31 + step
        if job.should_stop():
            job.stop_here({"step": step, "acc": acc}, [step], fingerprint=str(total))
    job.save("model.txt", str(acc))
    loss = float("nan") if job.config.get("nan") else 1.0 / acc
    job.commit({"loss": loss, "inputs": len(job.inputs), "args": len(job.args)},
               device="cpu", finite=["loss"])

if __name__ == "__main__":
    sys.exit(run_job(train, "my_trainer"))
"""


def _run(
    tmp: Path, run_dir: Path, cfg: dict, *extra: str, **env: str
) -> subprocess.CompletedProcess:
    script = tmp / "my_trainer.py"
    script.write_text(TRAINER)
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "AIF_"))}
    return subprocess.run(
        [sys.executable, str(script), "--run-dir", str(run_dir), "--config",
         str(tmp / "cfg.json"), *extra],
        capture_output=True, text=True, timeout=120, env={**clean, **env},
    )  # fmt: skip


def test_stop_signal_checkpoints_and_the_rerun_resumes_at_the_exact_step(tmp_path: Path) -> None:
    whole = _run(tmp_path, tmp_path / "whole", {"steps": 12})
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    first = _run(tmp_path, cut, {"steps": 12}, AIF_TRAIN_SIGNAL_AT_STEP="5")
    assert first.returncode == 99, first.stdout + first.stderr
    assert "checkpointed at step 5" in first.stdout
    assert not (cut / "metrics.json").exists() and (cut / "checkpoint.pt").exists()
    second = _run(tmp_path, cut, {"steps": 12})
    assert second.returncode == 0, second.stderr
    assert "resumed from checkpoint at step 5" in second.stdout
    assert (cut / "model.txt").read_text() == (tmp_path / "whole" / "model.txt").read_text()
    ledger = [json.loads(ln) for ln in (cut / "ledger.jsonl").read_text().splitlines()]
    assert [e["to"] for e in ledger] == [[5]]
    assert ledger[0]["from"] == [0] and ledger[0]["steps"] == 5 and ledger[0]["job"] == "local"


def test_a_checkpoint_of_other_config_is_refused_in_one_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    assert _run(tmp_path, run_dir, {"steps": 12}, AIF_TRAIN_SIGNAL_AT_STEP="3").returncode == 99
    res = _run(tmp_path, run_dir, {"steps": 13})
    assert res.returncode == 2
    err = res.stderr.strip()
    assert err.startswith("my_trainer: error: ") and "written for other data or config" in err
    assert "\n" not in err and not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize(
    ("cfg", "needle"),
    [({"steps": -1}, "steps must be >= 0, got -1"),
     ({"steps": 3, "nan": True},
      "metrics must be finite numbers, got loss=nan: the run is not committed")],
)  # fmt: skip
def test_bad_input_and_a_nan_metric_are_one_line_and_commit_nothing(
    tmp_path: Path, cfg: dict, needle: str
) -> None:
    res = _run(tmp_path, tmp_path / "r", cfg)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip() == f"my_trainer: error: {needle}"
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_unreadable_config_and_inputs_and_extra_arguments(tmp_path: Path) -> None:
    (tmp_path / "fs.json").write_text(json.dumps({"splits": {}}))
    ok = _run(tmp_path, tmp_path / "r", {"steps": 2}, "--featureset", str(tmp_path / "fs.json"),
              "--mine", "x")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["inputs"] == 1 and metrics["args"] == 2
    assert json.loads((tmp_path / "r" / "environment.json").read_text())["device"] == "cpu"
    (tmp_path / "bad.json").write_text("{not json")
    bad = _run(tmp_path, tmp_path / "r2", {}, "--featureset", str(tmp_path / "bad.json"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("my_trainer: error: feature set manifest ")


def test_the_readme_trainer_example_runs(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("**The job runtime**", 1)[1].split("```python\n", 1)[1].split("```")[0]
    script = tmp_path / "readme_trainer.py"
    script.write_text(block)
    (tmp_path / "cfg.json").write_text(json.dumps({"steps": 4}))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "AIF_"))}
    args = [sys.executable, str(script), "--run-dir", str(tmp_path / "r"), "--config",
            str(tmp_path / "cfg.json")]  # fmt: skip
    cut = subprocess.run(args, capture_output=True, text=True, timeout=120,
                         env={**clean, "AIF_TRAIN_SIGNAL_AT_STEP": "2"})  # fmt: skip
    assert cut.returncode == 99, cut.stdout + cut.stderr
    res = subprocess.run(args, capture_output=True, text=True, timeout=120, env=clean)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from checkpoint at step 2" in res.stdout
    assert json.loads((tmp_path / "r" / "metrics.json").read_text()) == {"val_loss": 0.1}


def test_a_stop_signal_after_the_work_is_done_cannot_fail_the_job(tmp_path: Path) -> None:
    """Seen on the site (a 1-minute limit): the time-limit warning (USR1) came as a finished
    payload was exiting; Python had put USR1 back to its default, and the job ended FAILED
    (signal 10) with its metrics written. After the work, stop signals are ignored."""
    import signal

    from aifactory.tasks.payloads import job as job_mod

    seen: list[object] = []

    def work(job: job_mod.Job) -> None:
        seen.append(signal.getsignal(signal.SIGUSR1))

    old = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        assert job_mod.run_job(work, "t", ["--run-dir", str(tmp_path)]) == 0
        assert callable(seen[0])  # while working: a checkpoint request
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGUSR1)  # would end this process with the default
    finally:
        for s, h in old.items():
            signal.signal(s, h)
