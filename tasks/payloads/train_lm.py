"""Reference payload 2: a small causal language model (generative AI) on data-space text.

    python -m aifactory.tasks.payloads.train_lm --data URL[,URL...] --run-dir DIR --config CFG.json
    python -m aifactory.tasks.payloads.train_lm --featureset FS.json --run-dir DIR --config CFG.json

With ``--featureset`` (the pipeline's way: a project whose feature function keeps the text,
``features.text``) it trains on the train split's text and reports ``val_bits_per_byte`` on
the validation split, the held-out metric promotion compares. The model is saved in
``model/`` (``weights.pt``, a state dict, and ``config.json``), which the project's pyfunc
class (examples/tourism-lm/model.py) loads.

A byte-level decoder-only transformer (a few layers), trained with next-token prediction.
On a GPU it runs under bf16 autocast; on a CPU the same code runs in float32 with the small
configuration used by tests. Same seed, data and config give identical weights on a CPU.

Written on the job runtime (tasks/payloads/job.py), like ``train_tabular``: checkpoint
atomically on SIGUSR1 or SIGTERM, ask Slurm to requeue after SIGUSR1 and exit 99, resume at
the exact step (a checkpoint of other data or config is refused), a ledger of attempts,
outputs written last.
Metrics include tokens per second and the data-loader stall fraction: the time of a pass
with the real loader against a pass over synthetic in-memory batches of the same shape.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from aifactory.tasks.payloads.job import Job, PayloadError, run_job, storage_options
from aifactory.tasks.payloads.stall import stall_fraction, synthetic_seconds
from aifactory.tasks.payloads.tabular_model import state_dict_sha256

VOCAB = 256  # bytes
DEFAULTS: dict[str, Any] = {
    "seed": 1234, "layers": 2, "d_model": 64, "heads": 4, "context": 64, "batch_size": 16,
    "steps": 60, "lr": 3e-3, "text_column": "text", "bf16": True, "threads": 1,
}  # fmt: skip


COUNTS = ("steps", "layers", "d_model", "heads", "context", "batch_size", "threads")


def check_config(cfg: dict[str, Any]) -> None:
    """Refuse, before any data is read or any step trained, a config that cannot train: one
    line naming the key (``steps`` 0 trained nothing and reported loss nan before)."""
    for key in COUNTS:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PayloadError(f"config {key}={v!r}: must be a whole number of at least 1")
    lr = cfg["lr"]
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not (0 < lr < math.inf):
        raise PayloadError(f"config lr={lr!r}: must be a positive finite number")
    if cfg["d_model"] % cfg["heads"]:
        raise PayloadError(f"config d_model={cfg['d_model']} must be a multiple of "
                           f"heads={cfg['heads']}")  # fmt: skip
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise PayloadError(f"config seed={cfg['seed']!r}: must be a whole number")


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)
        self.causal_mask: torch.Tensor
        self.register_buffer(
            "causal_mask",
            torch.triu(torch.full((context, context), float("-inf")), 1),
            persistent=False,
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x, self.causal_mask[:t, :t])
        return self.head(self.ln(x))

    def flops_per_token(self) -> float:
        n = sum(p.numel() for p in self.parameters())
        return 6.0 * n  # forward + backward, the usual estimate


def load_corpus(urls: list[str], column: str) -> np.ndarray:
    parts = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
        with fs.open(path, "rb") as fh:
            col = pq.read_table(fh, columns=[column]).column(column).to_pylist()
        parts.append("\n".join(s for s in col if s).encode("utf-8"))
    data = np.frombuffer(b"\n".join(parts), dtype=np.uint8)
    if len(data) < 2:
        raise PayloadError(f"no text in column {column!r} of {', '.join(urls)}")
    return data


class Loader:
    """Random windows of the byte corpus; the order comes from (seed, step) alone."""

    def __init__(self, data: np.ndarray, context: int, batch: int, seed: int) -> None:
        self.data = torch.from_numpy(data.astype(np.int64))
        self.context, self.batch, self.seed = context, batch, seed
        self.high = max(1, len(data) - context - 1)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.high, (self.batch,), generator=g)
        offs = torch.arange(self.context + 1)
        win = self.data[starts[:, None] + offs[None, :]]
        return win[:, :-1], win[:, 1:]


def corpus_of(texts: list[str], what: str) -> np.ndarray:
    data = np.frombuffer("\n".join(t for t in texts if t).encode("utf-8"), dtype=np.uint8)
    if len(data) < 2:
        raise PayloadError(f"no text in {what}")
    return data


@torch.no_grad()
def bits_per_byte(model: TinyLM, data: np.ndarray, context: int, device: Any,
                  windows: int = 64) -> float:  # fmt: skip
    """Mean next-byte loss in bits over ``windows`` evenly spaced windows of ``data``."""
    model.eval()
    n = max(1, len(data) - context - 1)
    starts = np.linspace(0, n - 1, num=min(windows, n)).astype(np.int64)
    d = torch.from_numpy(data.astype(np.int64))
    win = d[torch.from_numpy(starts)[:, None] + torch.arange(context + 1)[None, :]].to(device)
    logits = model(win[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), win[:, 1:].reshape(-1))
    model.train()
    return float(loss) / math.log(2)


def train(job: Job) -> dict[str, Any]:
    """Train on the Parquet files named by ``--data`` (or the feature set's train split's
    text) with ``job.config`` over DEFAULTS."""
    assert job.namespace is not None
    urls = [u for u in (job.namespace.data or "").split(",") if u]
    if not urls and not job.inputs:
        raise PayloadError("give --data URL[,URL...] or --featureset FS.json")
    unknown = sorted(set(job.config) - set(DEFAULTS))
    if unknown:
        raise PayloadError(f"config has unknown keys {unknown} (valid: {sorted(DEFAULTS)})")
    cfg = {**DEFAULTS, **job.config}
    check_config(cfg)  # before any data is read or any step trained
    job.deterministic()  # on a GPU too: before, cuBLAS refused without its workspace setting
    torch.set_num_threads(job.cpus(int(cfg["threads"])))
    device = job.device
    use_bf16 = bool(cfg["bf16"]) and device.type == "cuda"
    torch.manual_seed(cfg["seed"])
    held_out: np.ndarray | None = None
    if urls:
        data = load_corpus(urls, cfg["text_column"])
        source: Any = urls
    else:  # the feature set's splits: train on train, report on val
        data = corpus_of(job.text("train"), "the feature set's train split")
        held_out = corpus_of(job.text("val"), "the feature set's val split")
        source = [job.inputs.get("featureset_id"), job.inputs.get("feature_config", {})]
    loader = Loader(data, cfg["context"], cfg["batch_size"], cfg["seed"])
    model = TinyLM(cfg["layers"], cfg["d_model"], cfg["heads"], cfg["context"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    job.log(f"device {device} bf16={use_bf16}; corpus {len(data)} bytes; "
            f"{sum(p.numel() for p in model.parameters())} parameters")  # fmt: skip
    fingerprint = hashlib.sha256(json.dumps([source, cfg], sort_keys=True).encode()).hexdigest()[
        :16
    ]

    step = 0
    ck = job.resume(fingerprint)
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
    start_step = step

    def state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}

    def one_step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1))
        loss.backward()
        opt.step()
        return float(loss.detach())

    tokens = 0
    t0 = time.perf_counter()
    loss = float("nan")
    # The loader prepares the next batch in a background thread while this step trains.
    prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aif-loader")
    upcoming = prefetch.submit(loader.get, step)
    while step < cfg["steps"]:
        x, y = upcoming.result()
        if step + 1 < cfg["steps"]:
            upcoming = prefetch.submit(loader.get, step + 1)
        loss = one_step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        step += 1
        if not math.isfinite(loss):  # diverged: no later step recovers, nothing is committed
            prefetch.shutdown(wait=False, cancel_futures=True)
            raise PayloadError(f"training diverged: loss {loss} at step {step}/{cfg['steps']} "
                               f"(lr {cfg['lr']}): the run is not committed")  # fmt: skip
        tokens += x.numel()
        if step % max(1, cfg["steps"] // 5) == 0 or step == cfg["steps"]:
            job.log(f"step {step}/{cfg['steps']} loss={loss:.4f}")
        if job.should_stop():
            prefetch.shutdown(wait=False, cancel_futures=True)
            job.stop_here(state(), [step], fingerprint)
    prefetch.shutdown(wait=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    real_s = time.perf_counter() - t0

    # The same number of steps on synthetic batches already in memory: the loader's cost
    # is the difference. (Weights are restored afterwards, so the result is unaffected.)
    n_syn = max(1, step - start_step)
    g = torch.Generator().manual_seed(0)
    syn = torch.randint(0, VOCAB, (min(n_syn, 64), cfg["batch_size"], cfg["context"] + 1),
                        generator=g).to(device)  # fmt: skip

    def synthetic_step(i: int) -> None:
        b = syn[i % len(syn)]
        one_step(b[:, :-1], b[:, 1:])

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synth_s = synthetic_seconds(model, opt, synthetic_step, n_syn, sync)

    job.checkpoint(state(), [step], fingerprint)
    tps = tokens / max(real_s, 1e-9)
    metrics = {
        "final_loss": loss, "bits_per_byte": loss / math.log(2), "steps": float(step),
        "tokens_per_second": tps, "train_seconds": real_s,
        "data_stall_fraction": stall_fraction(real_s, synth_s),
        "model_flops_per_second": tps * model.flops_per_token(),
        "device": 1.0 if device.type == "cuda" else 0.0,
    }  # fmt: skip
    if held_out is not None:
        metrics["val_bits_per_byte"] = bits_per_byte(model, held_out, cfg["context"], device)
    digest = state_dict_sha256(model.to("cpu"))
    job.save("model.pt", {"state_dict": model.state_dict(), "config": cfg, "kind": "tiny-lm"})
    arch = {k: cfg[k] for k in ("layers", "d_model", "heads", "context")}
    job.save("model/weights.pt", model.state_dict())
    job.save("model/config.json", json.dumps(arch, sort_keys=True))
    job.save("weights.sha256", digest + "\n")
    job.commit(
        metrics,
        device.type,
        finite=["final_loss", *(["val_bits_per_byte"] if held_out is not None else [])],
    )
    job.log(f"done: loss={loss:.4f} tokens/s={tps:.0f} stall={metrics['data_stall_fraction']:.3f} "
            f"weights {digest[:12]}")  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train_lm", description="Train the reference tiny causal LM")
    p.add_argument(
        "--data",
        default=None,
        help="comma-separated Parquet URLs with a text column (or --featureset)",
    )
    return run_job(train, "train_lm", argv, parser=p)


if __name__ == "__main__":
    sys.exit(main())
