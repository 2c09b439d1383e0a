"""Reference payload: train the tabular MLP on a FeatureSet. Runs inside a Slurm job.

    python -m aifactory.tasks.payloads.train_tabular \
        --featureset FS.json --run-dir DIR --config CFG.json

The payload contract (follow it in your own trainers):
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

import argparse
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from aifactory.tasks.payloads.stall import stall_fraction, synthetic_seconds
from aifactory.tasks.payloads.tabular_model import MLP, norm_arrays, state_dict_sha256

EXIT_REQUEUE = 99
EXIT_BAD_INPUT = 2
CONFIG_KEYS = ("epochs", "batch_size", "hidden", "lr", "seed")
_stop = {"signal": 0}


class PayloadError(Exception):
    """Bad input: reported as one line, exit code 2."""


def _on_signal(signum: int, _frame: Any) -> None:
    _stop["signal"] = signum
    print(f"received signal {signum}: checkpointing after this step", flush=True)


# -- atomic writes ----------------------------------------------------------------------
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


# -- inputs -----------------------------------------------------------------------------
def storage_options(url: str) -> dict[str, Any]:
    """s3fs options from the environment (the keys themselves are read by botocore)."""
    if not url.startswith("s3://"):
        return {}
    client_kwargs: dict[str, Any] = {}
    if os.environ.get("AWS_ENDPOINT_URL"):
        client_kwargs["endpoint_url"] = os.environ["AWS_ENDPOINT_URL"]
    if os.environ.get("AWS_DEFAULT_REGION"):
        client_kwargs["region_name"] = os.environ["AWS_DEFAULT_REGION"]
    return {"client_kwargs": client_kwargs} if client_kwargs else {}


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


def load_split(fset: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    cols, target = fset["feature_columns"], fset["target"]
    xs, ys = [], []
    for url in fset["splits"][split]["files"]:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
        try:
            with fs.open(path, "rb") as fh:
                pf = pq.ParquetFile(fh)
                missing = [c for c in [*cols, target] if c not in pf.schema_arrow.names]
                if missing:
                    raise PayloadError(f"{split} split file {url} lacks columns {missing}")
                t = pf.read(columns=[*cols, target])
        except FileNotFoundError:
            raise PayloadError(f"{split} split file {url} not found") from None
        xs.append(np.column_stack([t.column(c).to_numpy() for c in cols]).astype(np.float32))
        ys.append(t.column(target).to_numpy().astype(np.float32))
    if not xs:
        return np.zeros((0, len(cols)), np.float32), np.zeros(0, np.float32)
    return np.concatenate(xs), np.concatenate(ys)


def environment(device: str) -> dict[str, Any]:
    pkgs: dict[str, str | None] = {}
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
        "device": device,
        "threads": torch.get_num_threads(),
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


def request_requeue(signum: int) -> None:
    """Under Slurm, the time-limit warning (USR1) requeues the job: it resumes from here."""
    job = os.environ.get("SLURM_JOB_ID")
    if signum != signal.SIGUSR1 or not job or os.environ.get("AIF_REQUEUE", "1") == "0":
        return
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                             timeout=30)  # fmt: skip
        detail = (out.stderr or out.stdout).strip() or "ok"
        print(f"scontrol requeue {job}: exit {out.returncode} ({detail})", flush=True)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"scontrol requeue {job} failed: {exc}; re-run to resume", flush=True)


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


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) under torchrun; (0, 1, 0) otherwise. Initialises the
    process group: NCCL on GPUs, Gloo on CPUs (the local site's GPUs are declared only)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def _agree_to_stop(world: int) -> bool:
    """Whether any rank got a stop signal: all ranks checkpoint and leave together."""
    if world <= 1:
        return bool(_stop["signal"])
    import torch.distributed as dist

    flag = torch.tensor([1 if _stop["signal"] else 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train(fset: dict[str, Any], run_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    check_inputs(fset, cfg)
    # cuBLAS is only deterministic with a fixed workspace; must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", cfg.get("threads", 1)))
    # Under torchrun the node's CPUs are shared by its workers.
    torch.set_num_threads(max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    rank, world, local_rank = _distributed()
    lead = rank == 0  # only rank 0 writes checkpoints, the ledger, the model and metrics
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world > 1 else 0)
    else:
        device = torch.device("cpu")
    print(f"device {device}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}; "
          f"job {os.environ.get('SLURM_JOB_ID', 'local')}; threads {torch.get_num_threads()}"
          + (f"; rank {rank} of {world}" if world > 1 else ""), flush=True)  # fmt: skip
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

        model = DistributedDataParallel(core, device_ids=[local_rank] if device.type == "cuda"
                                        else None)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=float(cfg["lr"]))
    loss_fn = nn.MSELoss()
    epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
    steps_per_epoch = (len(yt) + bs - 1) // bs
    fingerprint = config_fingerprint(fset, cfg)

    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    ledger = os.path.join(run_dir, "ledger.jsonl")
    epoch, step = 0, 0
    ep_loss, ep_n = 0.0, 0  # the current epoch's loss sum and sample count (for its log line)
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if ck.get("fingerprint") != fingerprint:
            raise PayloadError(
                f"{ckpt_path} was written for other data or config "
                f"({ck.get('fingerprint')} != {fingerprint}): remove it"
            )
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        set_rng_states(ck["rng"])
        epoch, step = int(ck["epoch"]), int(ck["step"])
        ep_loss, ep_n = ck.get("epoch_loss", (0.0, 0))
        print(f"resumed from checkpoint at epoch {epoch} step {step}", flush=True)
    attempt_start = (epoch, step)
    steps_this_attempt = 0
    drill_at = int(os.environ.get("AIF_TRAIN_SIGNAL_AT_STEP", "0") or 0)

    def checkpoint(ep: int, st: int) -> None:
        if not lead:
            return
        atomic_torch(ckpt_path, {"model": core.state_dict(), "optimizer": opt.state_dict(),
                                 "epoch": ep, "step": st, "rng": rng_states(),
                                 "epoch_loss": (ep_loss, ep_n),
                                 "fingerprint": fingerprint})  # fmt: skip
        with open(ledger, "a") as fh:
            fh.write(json.dumps({"job": os.environ.get("SLURM_JOB_ID", "local"),
                                 "restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
                                 "from": list(attempt_start), "to": [ep, st],
                                 "steps": steps_this_attempt}) + "\n")  # fmt: skip

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
            if drill_at and steps_this_attempt == drill_at:
                os.kill(os.getpid(), signal.SIGUSR1)
            if _agree_to_stop(world):
                checkpoint(epoch, step)
                print(f"checkpointed at epoch {epoch} step {step}; exiting with "
                      f"{EXIT_REQUEUE} for requeue", flush=True)  # fmt: skip
                if lead:
                    request_requeue(_stop["signal"] or signal.SIGTERM)
                sys.exit(EXIT_REQUEUE)
        epoch, step = epoch + 1, 0
        epoch_loss = ep_loss / max(ep_n, 1)
        ep_loss, ep_n = 0.0, 0
        val = evaluate(core, xv, y_va, t_mean, t_std)
        rate = samples / max(time.perf_counter() - t_train, 1e-9)
        print(f"epoch {epoch}/{epochs} train_loss={epoch_loss:.4f} "
              f"val_rmse={val['rmse']:.3f} samples/s={rate:.0f}", flush=True)  # fmt: skip
        checkpoint(epoch, step)

    prefetch.shutdown(wait=True)
    train_s = time.perf_counter() - t_train
    stall = synthetic_stall(model, opt, loss_fn, xt, yt, bs, steps_this_attempt,
                            fetch_s + compute_s)  # fmt: skip
    val = evaluate(core, xv, y_va, t_mean, t_std)
    test = evaluate(core, xe, y_te, t_mean, t_std)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
        if not lead:
            return {"val_rmse": val["rmse"], "test_rmse": test["rmse"]}
    model_cpu = core.to("cpu")
    digest = state_dict_sha256(model_cpu)
    arch = {"in_features": len(meta["feature_columns"]), "hidden": hidden}
    atomic_torch(os.path.join(run_dir, "model.pt"),
                 {"state_dict": model_cpu.state_dict(), "architecture": arch, **meta})  # fmt: skip
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
    atomic_json(os.path.join(run_dir, "environment.json"), environment(device.type))
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
    try:
        docs = []
        for what, path in (("feature set manifest", a.featureset), ("config", a.config)):
            try:
                with open(path) as fh:
                    docs.append(json.load(fh))
            except (OSError, json.JSONDecodeError) as exc:
                raise PayloadError(f"{what} {path}: {exc}") from None
        os.makedirs(a.run_dir, exist_ok=True)
        train(docs[0], a.run_dir, docs[1])
    except PayloadError as exc:
        print(f"train_tabular: error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
