"""Reference payload 2: a small causal language model (generative AI) on data-space text.

    python -m aifactory.tasks.payloads.train_lm --data URL[,URL...] --run-dir DIR --config CFG.json

A byte-level decoder-only transformer (a few layers), trained with next-token prediction.
On a GPU it runs under bf16 autocast; on a CPU the same code runs in float32 with the small
configuration used by tests. Same seed, data and config give identical weights on a CPU.

It follows the payload contract of ``train_tabular``: checkpoint atomically on SIGUSR1 or
SIGTERM and exit 99 for requeue, resume at the exact step, outputs written last.
Metrics include tokens per second and the data-loader stall fraction: the time of a pass
with the real loader against a pass over synthetic in-memory batches of the same shape.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from aifactory.tasks.payloads.stall import stall_fraction, synthetic_seconds
from aifactory.tasks.payloads.tabular_model import state_dict_sha256
from aifactory.tasks.payloads.train_tabular import (
    EXIT_REQUEUE,
    _on_signal,
    _stop,
    atomic_bytes,
    atomic_json,
    atomic_torch,
    environment,
    storage_options,
)

VOCAB = 256  # bytes
DEFAULTS: dict[str, Any] = {
    "seed": 1234, "layers": 2, "d_model": 64, "heads": 4, "context": 64, "batch_size": 16,
    "steps": 60, "lr": 3e-3, "text_column": "text", "bf16": True, "threads": 1,
}  # fmt: skip


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
        raise SystemExit(f"train_lm: no text in column {column!r} of {', '.join(urls)}")
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


def train(urls: list[str], run_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {**DEFAULTS, **cfg}
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", cfg["threads"])))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = bool(cfg["bf16"]) and device.type == "cuda"
    torch.manual_seed(cfg["seed"])
    data = load_corpus(urls, cfg["text_column"])
    loader = Loader(data, cfg["context"], cfg["batch_size"], cfg["seed"])
    model = TinyLM(cfg["layers"], cfg["d_model"], cfg["heads"], cfg["context"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    print(f"device {device} bf16={use_bf16}; corpus {len(data)} bytes; "
          f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)  # fmt: skip

    ckpt = os.path.join(run_dir, "checkpoint.pt")
    step = 0
    if os.path.exists(ckpt):
        ck = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = int(ck["step"])
        print(f"resumed from checkpoint at step {step}", flush=True)
    start_step = step

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
        tokens += x.numel()
        if step % max(1, cfg["steps"] // 5) == 0 or step == cfg["steps"]:
            print(f"step {step}/{cfg['steps']} loss={loss:.4f}", flush=True)
        if _stop["signal"]:
            atomic_torch(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "step": step})  # fmt: skip
            print(f"checkpointed at step {step}; exiting for requeue", flush=True)
            sys.exit(EXIT_REQUEUE)
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

    atomic_torch(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "step": step})  # fmt: skip
    tps = tokens / max(real_s, 1e-9)
    metrics = {
        "final_loss": loss, "bits_per_byte": loss / math.log(2), "steps": float(step),
        "tokens_per_second": tps, "train_seconds": real_s,
        "data_stall_fraction": stall_fraction(real_s, synth_s),
        "model_flops_per_second": tps * model.flops_per_token(),
        "device": 1.0 if device.type == "cuda" else 0.0,
    }  # fmt: skip
    digest = state_dict_sha256(model.to("cpu"))
    atomic_torch(os.path.join(run_dir, "model.pt"), {"state_dict": model.state_dict(),
                 "config": cfg, "kind": "tiny-lm"})  # fmt: skip
    atomic_json(os.path.join(run_dir, "environment.json"), environment(device.type))
    atomic_bytes(os.path.join(run_dir, "weights.sha256"), (digest + "\n").encode())
    atomic_json(os.path.join(run_dir, "metrics.json"), metrics)
    print(f"done: loss={loss:.4f} tokens/s={tps:.0f} stall={metrics['data_stall_fraction']:.3f} "
          f"weights {digest[:12]}", flush=True)  # fmt: skip
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train the reference tiny causal LM")
    p.add_argument("--data", required=True, help="comma-separated Parquet URLs with a text column")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--config", default=None, help="JSON file overriding the defaults")
    a = p.parse_args(argv)
    signal.signal(signal.SIGUSR1, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    cfg: dict[str, Any] = {}
    if a.config:
        with open(a.config) as fh:
            cfg = json.load(fh)
    os.makedirs(a.run_dir, exist_ok=True)
    train(a.data.split(","), a.run_dir, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
