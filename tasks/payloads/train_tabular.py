"""Reference payload: train the tabular MLP on a FeatureSet. Runs inside a Slurm job.

    python -m aifactory.tasks.payloads.train_tabular \
        --featureset FS.json --run-dir DIR --config CFG.json

Written on the job runtime (tasks/payloads/job.py), as a start-up's own trainer would be;
it follows the payload contract:
- Read inputs from the lake, write outputs only into the run directory; never call the
  Prefect API (compute nodes may have no network to it). s3:// credentials come from the
  environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL), never from files.
- On SIGUSR1 (Slurm's warning before the time limit, ``--signal=B:USR1@N``) or SIGTERM
  (preemption, scancel): finish the current step, write a checkpoint atomically (temporary
  file, fsync, rename) and exit with code 99. Under Slurm, SIGUSR1 also asks Slurm to
  requeue the job (``scontrol requeue``), so the next attempt resumes in the same job.
- On start, resume from the latest checkpoint, at the exact step: the same seed, data and
  config give the same weights however often the job was interrupted.
- Append what each attempt did to ``ledger.jsonl``; write ``model.pt``, ``weights.sha256``,
  ``environment.json`` and, last (the commit), ``metrics.json``, each atomically.
- Bad input: one line on stderr (``train_tabular: error: ...``), exit code 2.

``AIF_TRAIN_SIGNAL_AT_STEP=N`` makes the payload send itself SIGUSR1 after N steps of an
attempt: a preemption drill for tests and for checking a site's requeue set-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch import nn

from aifactory.tasks.payloads.job import (
    EXIT_BAD_INPUT,
    EXIT_REQUEUE,
    Job,
    PayloadError,
    environment,
    load_split,
    run_job,
)
from aifactory.tasks.payloads.stall import stall_fraction, synthetic_seconds
from aifactory.tasks.payloads.tabular_model import MLP, norm_arrays, state_dict_sha256

CONFIG_KEYS = ("epochs", "batch_size", "hidden", "lr", "seed")
__all__ = ["EXIT_BAD_INPUT", "EXIT_REQUEUE", "environment", "train"]


# -- inputs -----------------------------------------------------------------------------
def check_inputs(fset: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Raise PayloadError naming what is missing from the manifest or the config."""
    for key in ("feature_columns", "target", "normalisation", "splits"):
        if key not in fset:
            raise PayloadError(f"feature set manifest has no {key!r}")
    for split in ("train", "val", "test"):
        if split not in fset["splits"]:
            raise PayloadError(f"feature set manifest has no {split!r} split")
    missing = [c for c in fset["feature_columns"] if c not in fset["normalisation"]]
    if missing:
        raise PayloadError(f"feature set normalisation has no mean/std for {missing}")
    absent = [k for k in CONFIG_KEYS if k not in cfg]
    if absent:
        raise PayloadError(f"training config lacks {absent} (needs {list(CONFIG_KEYS)})")
    for key in ("epochs", "batch_size"):  # before any training: one line naming the key
        if not _count(cfg[key]):
            raise PayloadError(f"config {key}={cfg[key]!r}: must be a whole number of at least 1")
    hidden = cfg["hidden"]
    if not isinstance(hidden, list) or not all(_count(h) for h in hidden):
        raise PayloadError(f"config hidden={hidden!r}: must be a list of layer widths, each at "
                           "least 1")  # fmt: skip
    lr = cfg["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
        raise PayloadError(f"config lr={lr!r}: must be a positive finite number")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


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


# -- preemption -------------------------------------------------------------------------
def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def config_fingerprint(fset: dict[str, Any], cfg: dict[str, Any]) -> str:
    what = {k: cfg[k] for k in CONFIG_KEYS}
    what["splits"] = {k: v["files"] for k, v in sorted(fset["splits"].items())}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


# -- training ---------------------------------------------------------------------------
def synthetic_stall(model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module,
                    xt: torch.Tensor, yt: torch.Tensor, bs: int, steps: int,
                    real_s: float) -> float:  # fmt: skip
    """The loader's share of step time (see tasks/payloads/stall.py)."""
    if steps <= 0:
        return 0.0
    # Synthetic data of the same shape, already in memory: batches are plain views of it.
    gen = torch.Generator().manual_seed(0)
    x_syn = torch.randn(xt.shape, generator=gen).to(xt.device)
    y_syn = torch.randn(yt.shape, generator=gen).to(yt.device)
    per_epoch = max(1, (len(yt) + bs - 1) // bs)

    def step(i: int) -> None:
        j = i % per_epoch
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x_syn[j * bs : (j + 1) * bs]), y_syn[j * bs : (j + 1) * bs])
        loss.backward()
        opt.step()
        float(loss.detach())

    return stall_fraction(real_s, synthetic_seconds(model, opt, step, steps))


def train(job: Job) -> dict[str, Any]:
    """Train on ``job.inputs`` (the FeatureSet manifest) with ``job.config``."""
    fset, cfg = job.inputs, job.config
    check_inputs(fset, cfg)
    job.deterministic()
    torch.set_num_threads(job.cpus(int(cfg.get("threads", 1))))
    job.distributed()
    rank, world, device = job.rank, job.world_size, job.device
    job.log(f"device {device}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}; "
            f"job {job.job_id}; threads {torch.get_num_threads()}"
            + (f"; rank {rank} of {world}" if world > 1 else ""))  # fmt: skip
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
    job.log(f"loaded train={len(y_tr)} val={len(y_va)} test={len(y_te)} rows in {load_s:.2f}s")
    if len(y_tr) == 0:
        raise PayloadError("the train split has no rows")
    xt = torch.from_numpy((x_tr - mean) / std).to(device)
    yt = torch.from_numpy((y_tr - t_mean) / t_std).to(device)
    xv = torch.from_numpy((x_va - mean) / std).to(device)
    xe = torch.from_numpy((x_te - mean) / std).to(device)

    hidden = [int(h) for h in cfg["hidden"]]
    core = MLP(len(meta["feature_columns"]), hidden).to(device)
    model: nn.Module = core
    if world > 1:  # data parallel: each rank takes its share of every global batch
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(core, device_ids=[job.local_rank]
                                        if device.type == "cuda" else None)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    loss_fn = nn.MSELoss()
    epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
    steps_per_epoch = (len(yt) + bs - 1) // bs
    fingerprint = config_fingerprint(fset, cfg)

    epoch, step = 0, 0
    ep_loss, ep_n = 0.0, 0  # the current epoch's loss sum and sample count (for its log line)
    ck = job.resume(fingerprint)
    if ck is not None:
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_states(ck["rng"])
        epoch, step = int(ck["epoch"]), int(ck["step"])
        ep_loss, ep_n = ck.get("epoch_loss", (0.0, 0))
    steps_this_attempt = 0

    def state(ep: int, st: int) -> dict[str, Any]:
        return {"model": core.state_dict(), "optimizer": opt.state_dict(), "epoch": ep,
                "step": st, "rng": rng_states(), "epoch_loss": (ep_loss, ep_n)}  # fmt: skip

    fetch_s = compute_s = 0.0
    samples = 0
    t_train = time.perf_counter()

    def shuffled(ep: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The data order depends only on (seed, epoch): a resumed epoch sees the same batches.
        # One gather per epoch; each batch is then a contiguous view (no copy per step).
        gen = torch.Generator().manual_seed(seed * 1000 + ep)
        perm = torch.randperm(len(yt), generator=gen).to(device)
        return xt[perm], yt[perm]

    # The loader prepares the next epoch in a background thread while this one trains.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aif-loader")
    upcoming = prefetch.submit(shuffled, epoch) if epoch < epochs else None
    while epoch < epochs:
        t_wait = time.perf_counter()
        assert upcoming is not None
        x_ep, y_ep = upcoming.result()
        fetch_s += time.perf_counter() - t_wait
        upcoming = prefetch.submit(shuffled, epoch + 1) if epoch + 1 < epochs else None
        while step < steps_per_epoch:
            t0 = time.perf_counter()
            xb, yb = x_ep[step * bs : (step + 1) * bs], y_ep[step * bs : (step + 1) * bs]
            if world > 1:
                xb, yb = xb[rank::world], yb[rank::world]
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            ep_loss += float(loss.detach()) * len(yb)  # syncs the device: honest timing
            t2 = time.perf_counter()
            fetch_s += t1 - t0
            compute_s += t2 - t1
            ep_n += len(yb)
            samples += len(yb)
            step += 1
            steps_this_attempt += 1
            if job.should_stop():
                prefetch.shutdown(wait=False, cancel_futures=True)
                job.stop_here(state(epoch, step), [epoch, step], fingerprint)
        epoch, step = epoch + 1, 0
        epoch_loss = ep_loss / max(ep_n, 1)
        ep_loss, ep_n = 0.0, 0
        val = evaluate(core, xv, y_va, t_mean, t_std)
        rate = samples / max(time.perf_counter() - t_train, 1e-9)
        job.log(f"epoch {epoch}/{epochs} train_loss={epoch_loss:.4f} "
                f"val_rmse={val['rmse']:.3f} samples/s={rate:.0f}")  # fmt: skip
        job.checkpoint(state(epoch, step), [epoch, step], fingerprint)

    prefetch.shutdown(wait=True)
    train_s = time.perf_counter() - t_train
    stall = synthetic_stall(model, opt, loss_fn, xt, yt, bs, steps_this_attempt,
                            fetch_s + compute_s)  # fmt: skip
    val = evaluate(core, xv, y_va, t_mean, t_std)
    test = evaluate(core, xe, y_te, t_mean, t_std)
    job.finish_distributed()
    if not job.lead:
        return {"val_rmse": val["rmse"], "test_rmse": test["rmse"]}
    model_cpu = core.to("cpu")
    digest = state_dict_sha256(model_cpu)
    arch = {"in_features": len(meta["feature_columns"]), "hidden": hidden}
    job.save("model.pt", {"state_dict": model_cpu.state_dict(), "architecture": arch, **meta})
    metrics: dict[str, Any] = {
        "val_rmse": val["rmse"], "val_mae": val["mae"], "val_r2": val["r2"],
        "test_rmse": test["rmse"], "test_mae": test["mae"], "test_r2": test["r2"],
        "train_seconds": train_s, "load_seconds": load_s,
        "samples_per_second": samples / max(train_s, 1e-9) if samples else 0.0,
        # 1 - (steps on one synthetic in-memory batch) / (the same steps with the real loader)
        "data_stall_fraction": stall,
        # Time spent getting batches / time of whole steps (fetch + forward/backward/step).
        "fetch_fraction": fetch_s / max(fetch_s + compute_s, 1e-9),
        "epochs": float(epochs), "train_rows": float(len(yt)), "device": device.type,
        "world_size": float(world),
    }  # fmt: skip
    job.save("weights.sha256", digest + "\n")
    # environment.json, then metrics.json: the commit; a diverged run (nan) is not committed
    job.commit(metrics, device.type, finite=["val_rmse", "test_rmse"])
    job.log(f"done: test_rmse={test['rmse']:.3f} test_r2={test['r2']:.3f} weights {digest[:12]}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_job(train, "train_tabular", argv)


if __name__ == "__main__":
    sys.exit(main())
