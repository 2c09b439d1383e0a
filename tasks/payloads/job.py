"""The job runtime: what a training script running inside a Slurm job (or as a local process)
gets from aifactory. No Prefect import, no network: jobs talk through their run directory.

A trainer, the reference payloads included, is written like this::

    from aifactory.tasks.payloads.job import Job, PayloadError, run_job

    def train(job: Job) -> None:
        model, opt = build(job.config), ...
        state = job.resume(fingerprint=...)          # None on a fresh start
        step = state["step"] if state else 0
        while step < total:
            ...one step...
            step += 1
            if job.should_stop():                    # SIGUSR1 / SIGTERM, agreed by all ranks
                job.stop_here({"step": step, "model": model.state_dict(), ...}, position=[step])
        job.save("model.pt", torch_obj)              # atomic (temporary file, fsync, rename)
        job.commit({"test_rmse": ...})               # metrics.json, written last

    if __name__ == "__main__":
        sys.exit(run_job(train, "my_trainer"))

What it gives:
- ``job.run_dir``, ``job.config`` (the run's config JSON), ``job.inputs`` (the JSON named by
  ``--featureset``/``--inputs``: where the feature splits are), ``job.args`` (the rest).
- ``job.split("train")``: (X, y) as numpy, X standardised with the train split's fit (the
  registered model gets the same input), ``job.feature_columns``, ``job.target``.
- ``job.rank``, ``job.world_size``, ``job.local_rank``, ``job.device`` (torchrun's
  environment; the process group is started on first use of ``job.distributed()``);
  ``job.deterministic()`` (deterministic kernels, cuBLAS workspace), ``job.cpus()``.
- ``job.should_stop()``: True once SIGUSR1 (Slurm's warning before the time limit) or
  SIGTERM (preemption, scancel) arrived on any rank.
- ``job.checkpoint(state, position)`` and ``job.resume(fingerprint)``: an atomic
  checkpoint that a restarted job resumes from at the exact step, refused when it was
  written for other data or config; each checkpoint appends to ``ledger.jsonl``.
- ``job.stop_here(state, position)``: checkpoint, ask Slurm to requeue the job (after
  SIGUSR1), exit 99 (the platform resubmits on other endings).
- ``job.commit(metrics, finite=[...])``: ``metrics.json`` last, after every other output: a
  run folder with metrics is a finished run. The metrics named in ``finite`` (the ones a
  promotion compares) must be finite numbers, or nothing is committed (exit 2).
- Bad input: raise :class:`PayloadError`; ``run_job`` prints one line (``NAME: error: …``) and
  exits 2.

``AIF_TRAIN_SIGNAL_AT_STEP=N`` makes the job send itself SIGUSR1 at its N-th
``should_stop()`` call of an attempt: a preemption drill for tests and for checking a
site's requeue set-up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

EXIT_REQUEUE = 99
EXIT_BAD_INPUT = 2


class PayloadError(Exception):
    """Bad input: reported as one line, exit code 2."""


# -- atomic writes ----------------------------------------------------------------------
def _fsync_replace(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_replace(tmp, path)


def atomic_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def atomic_torch(path: str | os.PathLike[str], obj: Any) -> None:
    import torch

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_replace(tmp, path)


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


def load_split(fset: dict[str, Any], split: str) -> tuple[Any, Any]:
    """(features float32 [rows, columns], target float32 [rows]) of one split of a feature
    set manifest, as stored (not normalised); PayloadError names a missing file or column."""
    import fsspec
    import numpy as np
    import pyarrow.parquet as pq

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
    """What the job ran on: Python, package versions, host, Slurm job, device, threads."""
    import torch

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


def _read_json(what: str, path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise PayloadError(f"{what} {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise PayloadError(f"{what} {path}: expected a JSON object, got {type(doc).__name__}")
    return doc


# -- the job ------------------------------------------------------------------------------
class Job:
    """One attempt of a training job in its run directory (see the module docstring)."""

    def __init__(
        self, run_dir: str | os.PathLike[str], config: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None, args: Sequence[str] = (),
    ) -> None:  # fmt: skip
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config: dict[str, Any] = dict(config or {})
        self.inputs: dict[str, Any] = dict(inputs or {})
        self.args = list(args)
        self.namespace: argparse.Namespace | None = None  # run_job()'s parsed arguments
        self.job_id = os.environ.get("SLURM_JOB_ID", "local")
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.stop_signal = 0
        self._polls = 0
        self._drill_at = int(os.environ.get("AIF_TRAIN_SIGNAL_AT_STEP", "0") or 0)
        self._group = False
        self._start: list[Any] | None = None
        self._steps = 0

    # -- where and who --------------------------------------------------------------------
    @property
    def lead(self) -> bool:
        """Rank 0 writes checkpoints, the ledger, the model and the metrics."""
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    @property
    def device(self) -> Any:
        import torch

        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank if self.world_size > 1 else 0)
        return torch.device("cpu")

    def deterministic(self) -> None:
        """Same seed, data and config, same weights: deterministic kernels only, and cuBLAS
        with a fixed workspace (CUDA refuses deterministic matrix products without it; it
        must be set before CUDA starts)."""
        import torch

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    def cpus(self, default: int = 1) -> int:
        """CPUs for this process: the job's cpus-per-task shared by the node's ranks."""
        cpus = int(os.environ.get("SLURM_CPUS_PER_TASK", default))
        return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    def distributed(self) -> bool:
        """Start torch's process group once (NCCL on GPUs, Gloo on CPUs); False alone."""
        if self.world_size <= 1:
            return False
        if not self._group:
            import torch
            import torch.distributed as dist

            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self._group = True
        return True

    def finish_distributed(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()
            self._group = False

    def log(self, msg: str) -> None:
        prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
        print(prefix + msg, flush=True)

    # -- stopping -------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGUSR1, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def stop_signals_ignored(self) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum
        print(f"received signal {signum}: checkpointing after this step", flush=True)

    def should_stop(self) -> bool:
        """Whether to checkpoint and leave now: a stop signal arrived on any rank. Call it
        once per step (every rank calls it, it agrees across ranks); it counts the steps of
        this attempt for the ledger and the preemption drill."""
        self._polls += 1
        self._steps += 1
        if self._drill_at and self._polls == self._drill_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        if self.world_size <= 1 or not self._group:
            return bool(self.stop_signal)
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if self.stop_signal else 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- checkpoints ----------------------------------------------------------------------
    def resume(self, fingerprint: str | None = None) -> dict[str, Any] | None:
        """The last checkpoint's state (None on a fresh start). A checkpoint written for
        another fingerprint (other data or config) is refused: PayloadError."""
        import torch

        if not self.checkpoint_path.exists():
            self._start = None
            return None
        ck = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if fingerprint is not None and ck.get("fingerprint") != fingerprint:
            raise PayloadError(
                f"{self.checkpoint_path} was written for other data or config "
                f"({ck.get('fingerprint')} != {fingerprint}): remove it"
            )
        self._start = ck.get("position")
        self.log(f"resumed from checkpoint at {self._describe(self._start)}")
        return dict(ck["state"])

    def checkpoint(self, state: dict[str, Any], position: Sequence[Any],
                   fingerprint: str | None = None) -> None:  # fmt: skip
        """Write ``state`` atomically (rank 0 only) and record the attempt in the ledger."""
        if not self.lead:
            return
        pos = list(position)
        atomic_torch(self.checkpoint_path, {"state": state, "position": pos,
                                            "fingerprint": fingerprint})  # fmt: skip
        entry = {"job": self.job_id, "restart": str(self.restart), "from": self._start or
                 [0] * len(pos), "to": pos, "steps": self._steps}  # fmt: skip
        with open(self.run_dir / "ledger.jsonl", "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def stop_here(self, state: dict[str, Any], position: Sequence[Any],
                  fingerprint: str | None = None) -> None:  # fmt: skip
        """Checkpoint, ask Slurm to requeue the job after SIGUSR1, and exit 99."""
        self.checkpoint(state, position, fingerprint)
        self.log(f"checkpointed at {self._describe(list(position))}; exiting with "
                 f"{EXIT_REQUEUE} for requeue")  # fmt: skip
        if self.lead:
            self._request_requeue()
        raise SystemExit(EXIT_REQUEUE)

    def _request_requeue(self) -> None:
        """Under Slurm, the time-limit warning (USR1) requeues the job: it resumes here."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.stop_signal != signal.SIGUSR1 or not job:
            return
        if os.environ.get("AIF_REQUEUE", "1") == "0":
            return
        try:
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                                 timeout=30)  # fmt: skip
            detail = (out.stderr or out.stdout).strip() or "ok"
            print(f"scontrol requeue {job}: exit {out.returncode} ({detail})", flush=True)
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"scontrol requeue {job} failed: {exc}; re-run to resume", flush=True)

    @staticmethod
    def _describe(pos: list[Any] | None) -> str:
        if not pos:
            return "the start"
        if len(pos) == 2:
            return f"epoch {pos[0]} step {pos[1]}"
        return "step " + "/".join(str(p) for p in pos)

    # -- inputs ---------------------------------------------------------------------------
    @property
    def feature_columns(self) -> list[str]:
        """The feature set's feature columns, in the order :meth:`split` gives them."""
        self._need_featureset()
        return list(self.inputs["feature_columns"])

    @property
    def target(self) -> str:
        self._need_featureset()
        return str(self.inputs["target"])

    def _need_featureset(self) -> None:
        for key in ("feature_columns", "target", "normalisation", "splits"):
            if key not in self.inputs:
                raise PayloadError(f"the job's inputs (--inputs) are not a feature set: no {key!r}")

    def split(self, name: str, normalised: bool = True) -> tuple[Any, Any]:
        """(X, y) of the feature set's ``name`` split (train, val or test) as numpy float32:
        X's columns are :attr:`feature_columns`, standardised with the mean and std fitted on
        the train split (what the registered model is given at prediction time too); y is
        the target in its own units."""
        import numpy as np

        self._need_featureset()
        if name not in self.inputs["splits"]:
            raise PayloadError(f"the feature set has no {name!r} split "
                               f"(has {sorted(self.inputs['splits'])})")  # fmt: skip
        x, y = load_split(self.inputs, name)
        if normalised:
            norm = self.inputs["normalisation"]
            missing = [c for c in self.feature_columns if c not in norm]
            if missing:
                raise PayloadError(f"the feature set's normalisation has no mean/std for {missing}")
            mean = np.array([norm[c]["mean"] for c in self.feature_columns], np.float32)
            std = np.array([norm[c]["std"] for c in self.feature_columns], np.float32)
            x = (x - mean) / np.where(std > 0, std, np.float32(1.0))
        return x.astype(np.float32), y

    def text(self, name: str, column: str | None = None) -> list[str]:
        """The ``name`` split's text column (``features.text``; the first one by default),
        in the feature set's order: free text for a language model, never standardised."""
        import fsspec
        import pyarrow.parquet as pq

        self._need_featureset()
        declared = list(self.inputs.get("feature_config", {}).get("text", []))
        column = column or (declared[0] if declared else None)
        if column is None or column not in declared:
            raise PayloadError(f"the feature set has no text column {column!r} (features.text: "
                               f"{declared})")  # fmt: skip
        if name not in self.inputs["splits"]:
            raise PayloadError(f"the feature set has no {name!r} split")
        out: list[str] = []
        for url in self.inputs["splits"][name]["files"]:
            fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
            try:
                with fs.open(path, "rb") as fh:
                    out += pq.read_table(fh, columns=[column]).column(column).to_pylist()
            except FileNotFoundError:
                raise PayloadError(f"{name} split file {url} not found") from None
        return out

    # -- outputs --------------------------------------------------------------------------
    def save(self, name: str, obj: Any) -> Path:
        """Save an output into the run directory atomically: bytes, str, or a torch object."""
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(obj, bytes):
            atomic_bytes(path, obj)
        elif isinstance(obj, str):
            atomic_bytes(path, obj.encode())
        else:
            atomic_torch(path, obj)
        return path

    def commit(self, metrics: dict[str, Any], device: str | None = None,
               finite: Sequence[str] = ()) -> None:  # fmt: skip
        """Write ``environment.json`` and then ``metrics.json``, last: the run's commit. The
        metrics named in ``finite`` (those a promotion compares) must be present and finite
        numbers; otherwise PayloadError, and nothing is committed."""
        bad = [k for k in finite if not _is_finite(metrics.get(k))]
        if bad:
            got = ", ".join(f"{k}={metrics.get(k)!r}" for k in bad)
            raise PayloadError(f"metrics must be finite numbers, got {got}: the run is not "
                               "committed")  # fmt: skip
        if not self.lead:
            return
        dev = device or str(getattr(self.device, "type", self.device))
        atomic_json(self.run_dir / "environment.json", environment(dev))
        atomic_json(self.run_dir / "metrics.json", metrics)


def _is_finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def run_job(train: Callable[[Job], object], name: str, argv: list[str] | None = None,
         parser: argparse.ArgumentParser | None = None) -> int:  # fmt: skip
    """Run ``train`` as a job: parse ``--run-dir``, ``--config`` and ``--featureset`` (or
    ``--inputs``), install the stop-signal handlers, turn PayloadError into one line and
    exit code 2. Other arguments stay in ``job.args`` (or in ``parser``'s namespace, given
    as ``job.namespace``)."""
    p = parser or argparse.ArgumentParser(prog=name)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config", default=None, help="training config JSON")
    p.add_argument("--featureset", "--inputs", dest="inputs", default=None,
                   help="the inputs' manifest JSON (a FeatureSet: its splits)")  # fmt: skip
    ns, rest = p.parse_known_args(argv)
    try:
        job = Job(ns.run_dir, _read_json("config", ns.config),
                  _read_json("feature set manifest", ns.inputs), rest)  # fmt: skip
        job.namespace = ns
        job.install_signal_handlers()
        train(job)
        # Done: a stop signal that comes now (the time-limit warning, a scancel) has nothing
        # left to save. Ignored, not handled: at interpreter shutdown Python puts its own
        # handlers back to the default, and USR1's default ends the process, so a finished
        # job would end FAILED (signal 10) in the last milliseconds of its time.
        job.stop_signals_ignored()
    except PayloadError as exc:
        msg = " ".join(str(exc).split())[:1000]
        print(f"{name}: error: {msg}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0
