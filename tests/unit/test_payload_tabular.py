"""The tabular payload on a tiny feature set (file:// Parquet): bit-identical weights,
resume after a preemption signal, prediction on raw rows, and the local training stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aifactory.tasks.core.config import TrainingSpec
from aifactory.tasks.core.manifests import FeatureSet, SplitFiles
from aifactory.tasks.payloads import job, train_tabular
from aifactory.tasks.payloads.tabular_model import load_model, predict

REPO = Path(__file__).resolve().parents[2]
FEATURES = ["distance_km", "hour", "passengers"]
CONFIG: dict[str, Any] = {"epochs": 2, "batch_size": 32, "hidden": [8, 4], "lr": 0.01, "seed": 3}
torch.set_num_threads(1)


def _rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    d = rng.uniform(0.5, 20, n)
    h = rng.integers(0, 24, n).astype(np.float64)
    p = rng.integers(1, 5, n).astype(np.float64)
    return {"distance_km": d, "hour": h, "passengers": p, "duration_min": 3 * d + 0.2 * h + 2}


@pytest.fixture(scope="module")
def featureset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fset")
    rng = np.random.default_rng(0)
    splits, stats = {}, {}
    for split, n in (("train", 300), ("val", 60), ("test", 60)):
        data = _rows(rng, n)
        data["trip_id"] = np.arange(n)
        path = root / split / "part-0.parquet"
        path.parent.mkdir()
        pq.write_table(pa.table(data), path)
        splits[split] = SplitFiles(files=[f"file://{path}"], rows=n)
        if split == "train":
            stats = {c: {"mean": float(np.mean(v)), "std": float(np.std(v))}
                     for c, v in data.items() if c != "trip_id"}  # fmt: skip
    fset = FeatureSet(
        featureset_id="fs-test", snapshot_id="snap", snapshot_hash="h", lake_url=f"file://{root}",
        key_column="trip_id", feature_columns=FEATURES, target="duration_min",
        normalisation=stats, splits=splits, rows_in=420, feature_config={},
        created_at="2026-01-01T00:00:00Z",
    )  # fmt: skip
    out = root / "featureset.json"
    out.write_text(fset.to_json())
    (root / "config.json").write_text(json.dumps(CONFIG))
    return out


def _payload(fs_path: Path, run_dir: Path, **env: str) -> subprocess.Popen[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    clean.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env})
    cmd = [sys.executable, "-m", "aifactory.tasks.payloads.train_tabular",
           "--featureset", str(fs_path), "--run-dir", str(run_dir),
           "--config", str(fs_path.parent / "config.json")]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean
    )


def _wait(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def runs(featureset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three payload processes at once (torch's import dominates): two fresh runs, and one
    that sends itself SIGUSR1 after 14 steps (10 steps an epoch: epoch 1, step 4)."""
    root = tmp_path_factory.mktemp("runs")
    procs = {
        "fresh": _payload(featureset, root / "fresh"),
        "again": _payload(featureset, root / "again"),
        "preempted": _payload(featureset, root / "preempted", AIF_TRAIN_SIGNAL_AT_STEP="14"),
    }
    return {name: (root / name, *_wait(p)) for name, p in procs.items()}


@pytest.fixture(scope="module")
def fresh_run(runs: dict[str, Any]) -> Path:
    run_dir, rc, out, err = runs["fresh"]
    assert rc == 0, out + err
    return Path(run_dir)


def test_outputs_and_log_lines(fresh_run: Path) -> None:
    for name in ("model.pt", "metrics.json", "weights.sha256", "environment.json", "checkpoint.pt"):
        assert (fresh_run / name).is_file(), name
    metrics = json.loads((fresh_run / "metrics.json").read_text())
    for key in ("val_rmse", "val_mae", "test_rmse", "test_mae", "test_r2", "train_seconds",
                "samples_per_second", "epochs", "device", "data_stall_fraction"):  # fmt: skip
        assert key in metrics, key
    assert metrics["device"] == "cpu" and 0 <= metrics["data_stall_fraction"] <= 1
    env = json.loads((fresh_run / "environment.json").read_text())
    assert env["packages"]["torch"] and env["packages"]["pyarrow"] and env["hostname"]
    assert not list(fresh_run.glob("*.tmp-*")), "a temporary file was left behind"


def test_same_inputs_give_identical_weights(runs: dict[str, Any], fresh_run: Path) -> None:
    run_dir, rc, out, err = runs["again"]
    assert rc == 0, out + err
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2 train_loss=")
    assert "val_rmse=" in lines[0] and "samples/s=" in lines[0]
    first = (fresh_run / "weights.sha256").read_text()
    assert (run_dir / "weights.sha256").read_text() == first


def test_signal_checkpoints_and_resume_gives_the_same_weights(
    featureset: Path, runs: dict[str, Any], fresh_run: Path
) -> None:
    run_dir, rc, out, err = runs["preempted"]
    assert rc == 99, out + err
    assert "checkpointed at epoch 1 step 4" in out
    assert (run_dir / "checkpoint.pt").exists() and not (run_dir / "model.pt").exists()
    rc, out, err = _wait(_payload(featureset, run_dir))
    assert rc == 0, out + err
    assert "resumed from checkpoint at epoch 1 step 4" in out
    loss = [ln.split()[2] for ln in out.splitlines() if ln.startswith("epoch 2/2")]
    assert loss and f"epoch 2/2 {loss[0]} " in runs["fresh"][2], "epoch loss lost on resume"
    assert (run_dir / "weights.sha256").read_text() == (fresh_run / "weights.sha256").read_text()
    ledger = [json.loads(ln) for ln in (run_dir / "ledger.jsonl").read_text().splitlines()]
    assert ledger[1]["to"] == [1, 4] and ledger[2]["from"] == [1, 4]


def test_predict_on_raw_rows(fresh_run: Path) -> None:
    module, meta = load_model(str(fresh_run / "model.pt"))
    rows = _rows(np.random.default_rng(9), 5)
    for frame in (pa.table(rows), rows):
        y = predict(module, meta, frame)
        assert y.shape == (5,) and np.isfinite(y).all()
    pd = pytest.importorskip("pandas")
    assert np.allclose(predict(module, meta, pd.DataFrame(rows)), predict(module, meta, rows))
    with pytest.raises(ValueError, match="hour"):
        predict(module, meta, {"distance_km": [1.0], "passengers": [1.0]})


def test_bad_input_is_one_line_and_exit_2(
    featureset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(job.signal, "signal", lambda *_a: None)  # keep pytest's
    fset: dict[str, Any] = json.loads(featureset.read_text())
    del fset["normalisation"]["hour"]
    bad = tmp_path / "fs.json"
    bad.write_text(json.dumps(fset))
    argv = ["--featureset", str(bad), "--run-dir", str(tmp_path / "r"),
            "--config", str(featureset.parent / "config.json")]  # fmt: skip
    assert train_tabular.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train_tabular: error:") and "hour" in err and "\n" not in err
    assert not (tmp_path / "r" / "model.pt").exists()


def test_local_stage_trains_once_then_reuses_the_run(featureset: Path, tmp_path: Path) -> None:
    from aifactory.tasks.stages.training import train

    fset = FeatureSet.model_validate_json(featureset.read_text())
    spec = TrainingSpec(executor="local", **CONFIG)
    log: list[str] = []
    args: dict[str, Any] = dict(spec=spec, account="startup-a", featureset=fset,
                                runs_dir=str(tmp_path), run_key="k1", slurm=None,
                                env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})  # fmt: skip
    trained = train(**args, log=log.append)
    run_dir = tmp_path / "train" / "k1"
    assert (run_dir / "train.sbatch").is_file() and (run_dir / "config.json").is_file()
    assert trained.executor == "local" and trained.weights_sha256 and trained.environment_hash
    assert trained.metrics["test_rmse"] > 0 and trained.params["device"] == "cpu"
    assert any(line.startswith("epoch 2/2") for line in log)
    again: list[str] = []
    cached = train(**args, log=again.append)
    assert any("already finished" in line for line in again)
    assert not any(line.startswith("epoch") for line in again)
    assert cached.weights_sha256 == trained.weights_sha256 and cached.executor == "local"


def test_two_local_runs_of_one_key_at_once_train_once(featureset: Path, tmp_path: Path) -> None:
    """Issue 16 (and 15's one-owner rule): the second run waits for the run directory's owner
    and collects its result, with the same record; before, it resumed from the first one's
    checkpoint while that one was still training (epochs twice in the ledger)."""
    import threading

    from aifactory.tasks.stages.training import train

    fset = FeatureSet.model_validate_json(featureset.read_text())
    spec = TrainingSpec(executor="local", **{**CONFIG, "epochs": 3})
    logs: list[list[str]] = [[], []]
    out: list[Any] = [None, None]

    def one(i: int) -> None:
        out[i] = train(spec=spec, account="startup-a", featureset=fset, runs_dir=str(tmp_path),
                       run_key="same", slurm=None, log=logs[i].append,
                       env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})  # fmt: skip

    threads = [threading.Thread(target=one, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert out[0] is not None and out[1] is not None
    trained_in = [i for i in (0, 1) if any(ln.startswith("epoch 3/3") for ln in logs[i])]
    assert len(trained_in) == 1, logs
    waiter = 1 - trained_in[0]
    assert any("waiting for it to finish" in ln for ln in logs[waiter]), logs[waiter]
    assert out[waiter].reused and out[waiter].weights_sha256 == out[trained_in[0]].weights_sha256
    assert out[waiter].executor == out[trained_in[0]].executor == "local"
    ledger = [json.loads(ln) for ln in (tmp_path / "train" / "same" / "ledger.jsonl").open()]
    assert [e["to"][0] for e in ledger] == [1, 2, 3]
