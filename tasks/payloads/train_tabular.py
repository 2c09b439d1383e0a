"""Reference payload: train the tabular MLP on a FeatureSet. Runs inside a Slurm job.

    python -m tasks.payloads.train_tabular --featureset FS.json --run-dir DIR --config CFG.json

The payload contract (follow it in your own trainers):
- Read inputs from the lake, write outputs only into the run directory; never call the
  Prefect API (compute nodes may have no network to it).
- On SIGUSR1 (Slurm's warning before the time limit, ``--signal=B:USR1@N``) or SIGTERM
  (preemption): finish the current step, write a checkpoint atomically (temporary file,
  fsync, rename) and exit with code 99 so the job can be requeued.
- On start, resume from the latest checkpoint, at the exact step: the same seed, data and
  config give the same weights however often the job was interrupted.
- Append what each attempt did to ``ledger.jsonl``; write ``metrics.json``, ``model.pt``,
  ``weights.sha256`` and ``environment.json`` last, each atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import sys
import time
from importlib import metadata
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from tasks.payloads.tabular_model import MLP, norm_arrays, state_dict_sha256

EXIT_REQUEUE = 99
_stop = {"signal": 0}


def _on_signal(signum: int, _frame: Any) -> None:
    _stop["signal"] = signum
    print(f"received signal {signum}: checkpointing after this step", flush=True)


def atomic_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_json(path: str, obj: Any) -> None:
    atomic_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def atomic_torch(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def storage_options(url: str) -> dict[str, Any]:
    if not url.startswith("s3://"):
        return {}
    opts: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        client_kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = os.environ["AWS_DEFAULT_REGION"]
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    return opts


def load_split(fset: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    cols, target = fset["feature_columns"], fset["target"]
    xs, ys = [], []
    for url in fset["splits"][split]["files"]:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
        with fs.open(path, "rb") as fh:
            t = pq.read_table(fh, columns=[*cols, target])
        xs.append(np.column_stack([t.column(c).to_numpy() for c in cols]).astype(np.float32))
        ys.append(t.column(target).to_numpy().astype(np.float32))
    if not xs:
        return np.zeros((0, len(cols)), np.float32), np.zeros(0, np.float32)
    return np.concatenate(xs), np.concatenate(ys)


def environment() -> dict[str, Any]:
    pkgs = {}
    for name in ("torch", "numpy", "pyarrow", "fsspec", "s3fs"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    return {
        "python": platform.python_version(),
        "packages": pkgs,
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "cuda_available": torch.cuda.is_available(),
    }


def evaluate(model: nn.Module, x: torch.Tensor, y: np.ndarray, t_mean: float,
             t_std: float) -> dict[str, float]:  # fmt: skip
    model.eval()
    with torch.no_grad():
        pred = model(x).cpu().numpy().astype(np.float64) * t_std + t_mean
    model.train()
    err = pred - y.astype(np.float64)
    var = float(np.var(y)) if len(y) else 0.0
    return {
        "rmse": float(np.sqrt(np.mean(err**2))) if len(y) else float("nan"),
        "mae": float(np.mean(np.abs(err))) if len(y) else float("nan"),
        "r2": float(1 - np.mean(err**2) / var) if var > 0 else float("nan"),
    }


def train(fset: dict[str, Any], run_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", cfg.get("threads", 1))))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}; "
          f"job {os.environ.get('SLURM_JOB_ID', 'local')}", flush=True)  # fmt: skip
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)

    meta = {
        "feature_columns": fset["feature_columns"],
        "target": fset["target"],
        "normalisation": fset["normalisation"],
    }
    mean, std, t_mean, t_std = norm_arrays(meta)
    t_load = time.perf_counter()
    x_tr, y_tr = load_split(fset, "train")
    x_va, y_va = load_split(fset, "val")
    x_te, y_te = load_split(fset, "test")
    load_s = time.perf_counter() - t_load
    print(f"loaded train={len(y_tr)} val={len(y_va)} test={len(y_te)} rows in {load_s:.2f}s",
          flush=True)  # fmt: skip
    xt = torch.from_numpy((x_tr - mean) / std).to(device)
    yt = torch.from_numpy((y_tr - t_mean) / t_std).to(device)
    xv = torch.from_numpy((x_va - mean) / std).to(device)
    xe = torch.from_numpy((x_te - mean) / std).to(device)

    model = MLP(len(meta["feature_columns"]), list(cfg["hidden"])).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    loss_fn = nn.MSELoss()
    epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
    steps_per_epoch = max(1, (len(yt) + bs - 1) // bs)

    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    ledger = os.path.join(run_dir, "ledger.jsonl")
    epoch, step = 0, 0
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        epoch, step = int(ck["epoch"]), int(ck["step"])
        print(f"resumed from checkpoint at epoch {epoch} step {step}", flush=True)
    attempt_start = (epoch, step)
    steps_this_attempt = 0

    def checkpoint(ep: int, st: int) -> None:
        atomic_torch(ckpt_path, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "epoch": ep, "step": st})  # fmt: skip
        with open(ledger, "a") as fh:
            fh.write(json.dumps({"job": os.environ.get("SLURM_JOB_ID", "local"),
                                 "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
                                 "from": list(attempt_start), "to": [ep, st],
                                 "steps": steps_this_attempt}) + "\n")  # fmt: skip

    fetch_s = compute_s = 0.0
    samples = 0
    t_train = time.perf_counter()
    while epoch < epochs:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(yt), generator=gen).to(device)
        ep_loss, ep_n = 0.0, 0
        while step < steps_per_epoch:
            t0 = time.perf_counter()
            idx = perm[step * bs : (step + 1) * bs]
            xb, yb = xt[idx], yt[idx]
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            t2 = time.perf_counter()
            fetch_s += t1 - t0
            compute_s += t2 - t1
            ep_loss += float(loss.detach()) * len(idx)
            ep_n += len(idx)
            samples += len(idx)
            step += 1
            steps_this_attempt += 1
            if _stop["signal"]:
                checkpoint(epoch, step)
                print(f"checkpointed at epoch {epoch} step {step}; exiting for requeue",
                      flush=True)  # fmt: skip
                sys.exit(EXIT_REQUEUE)
        epoch, step = epoch + 1, 0
        val = evaluate(model, xv, y_va, t_mean, t_std)
        rate = samples / max(time.perf_counter() - t_train, 1e-9)
        print(f"epoch {epoch}/{epochs} train_loss={ep_loss / max(ep_n, 1):.4f} "
              f"val_rmse={val['rmse']:.3f} samples/s={rate:.0f}", flush=True)  # fmt: skip
        checkpoint(epoch, step)

    train_s = time.perf_counter() - t_train
    val = evaluate(model, xv, y_va, t_mean, t_std)
    test = evaluate(model, xe, y_te, t_mean, t_std)
    model_cpu = model.to("cpu")
    digest = state_dict_sha256(model_cpu)
    arch = {"in_features": len(meta["feature_columns"]), "hidden": list(cfg["hidden"])}
    atomic_torch(os.path.join(run_dir, "model.pt"),
                 {"state_dict": model_cpu.state_dict(), "architecture": arch, **meta})  # fmt: skip
    metrics = {
        "val_rmse": val["rmse"], "val_mae": val["mae"], "val_r2": val["r2"],
        "test_rmse": test["rmse"], "test_mae": test["mae"], "test_r2": test["r2"],
        "train_seconds": train_s, "load_seconds": load_s,
        "samples_per_second": samples / max(train_s, 1e-9) if samples else 0.0,
        "data_stall_fraction": fetch_s / max(fetch_s + compute_s, 1e-9),
        "epochs": float(epochs), "train_rows": float(len(yt)),
    }  # fmt: skip
    atomic_json(os.path.join(run_dir, "environment.json"), environment())
    atomic_bytes(os.path.join(run_dir, "weights.sha256"), (digest + "\n").encode())
    atomic_json(os.path.join(run_dir, "metrics.json"), metrics)  # written last: the commit
    print(f"done: test_rmse={test['rmse']:.3f} test_r2={test['r2']:.3f} weights {digest[:12]}",
          flush=True)  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the reference tabular MLP")
    p.add_argument("--featureset", required=True, help="FeatureSet manifest JSON")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config", required=True, help="training config JSON")
    a = p.parse_args(argv)
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    with open(a.featureset) as fh:
        fset = json.load(fh)
    with open(a.config) as fh:
        cfg = json.load(fh)
    os.makedirs(a.run_dir, exist_ok=True)
    train(fset, a.run_dir, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
