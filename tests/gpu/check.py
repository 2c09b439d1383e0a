"""GPU check of both reference payloads through the job runtime (issue 14).

Run by tests/gpu/check.sh on a machine with a GPU, in one short run: it trains the tabular
MLP and the tiny LM on generated data, each twice with the same seed, data and config, and
reports samples/s, tokens/s, the LM's model FLOP/s as a fraction of the GPU's bf16 peak, and
whether the two runs' weights are bit-identical (sha256), with the settings that held
(deterministic algorithms, cuBLAS workspace, bf16 autocast for the LM). The figures go to a
JSON file and a Markdown table on stdout.

It needs only torch, numpy, pyarrow and fsspec (what a GPU image carries) and the payloads'
own files; nothing of the orchestrator. ``--small`` runs the same path in seconds on a CPU
(how this script itself is tested on machines without a GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Dense bf16 peak (FLOP/s) by device name; the fraction is left out for other devices.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}

SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "rows": 2_000_000, "features": 32, "text_mb": 16,
        "tabular": {"epochs": 3, "batch_size": 8192, "hidden": [1024, 1024, 512], "lr": 1e-3,
                    "seed": 7},
        "lm": {"layers": 6, "d_model": 512, "heads": 8, "context": 512, "batch_size": 32,
               "steps": 300, "lr": 3e-4, "seed": 7, "bf16": True},
    },
    "small": {
        "rows": 4000, "features": 8, "text_mb": 0.2,
        "tabular": {"epochs": 2, "batch_size": 256, "hidden": [16], "lr": 1e-2, "seed": 7},
        "lm": {"layers": 1, "d_model": 32, "heads": 2, "context": 32, "batch_size": 8,
               "steps": 10, "lr": 3e-3, "seed": 7, "bf16": True},
    },
}  # fmt: skip


def tabular_inputs(root: Path, rows: int, n_feat: int) -> Path:
    """Train/val/test Parquet files and a FeatureSet manifest (the JSON the payload reads)."""
    rng = np.random.default_rng(0)
    cols = [f"x{i}" for i in range(n_feat)]
    w = rng.normal(size=n_feat)
    splits: dict[str, Any] = {}
    norm: dict[str, dict[str, float]] = {}
    for split, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        n = max(8, int(rows * frac))
        x = rng.normal(size=(n, n_feat)).astype(np.float32)
        y = (x @ w + np.sin(x[:, 0]) * 2 + rng.normal(scale=0.1, size=n)).astype(np.float32)
        table = pa.table({"key": pa.array([str(i) for i in range(n)]),
                          **{c: x[:, i] for i, c in enumerate(cols)}, "y": y})  # fmt: skip
        path = root / f"{split}.parquet"
        pq.write_table(table, path)
        splits[split] = {"files": [f"file://{path}"], "rows": n}
        if split == "train":
            norm = {c: {"mean": float(x[:, i].mean()), "std": float(x[:, i].std())}
                    for i, c in enumerate(cols)}  # fmt: skip
            norm["y"] = {"mean": float(y.mean()), "std": float(y.std())}
    manifest = {"feature_columns": cols, "target": "y", "normalisation": norm, "splits": splits}
    out = root / "featureset.json"
    out.write_text(json.dumps(manifest))
    return out


def lm_inputs(root: Path, megabytes: float) -> Path:
    rng = np.random.default_rng(1)
    words = np.array(
        [
            "data",
            "space",
            "model",
            "train",
            "europe",
            "factory",
            "tourism",
            "quiet",
            "beach",
            "hotel",
            "museum",
            "late",
            "great",
            "food",
            "view",
            "room",
        ]
    )
    n_words = int(megabytes * 1e6 / 6)
    text = " ".join(rng.choice(words, size=n_words).tolist())
    lines = [text[i : i + 400] for i in range(0, len(text), 400)]
    path = root / "reviews.parquet"
    pq.write_table(pa.table({"text": lines}), path)
    return path


def run_payload(module: str, args: list[str], run_dir: Path, env: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *args, "--run-dir", str(run_dir)],
                          capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise SystemExit(f"check: {module} exited {proc.returncode}: {tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    weights = (run_dir / "weights.sha256").read_text().strip()
    model_sha = hashlib.sha256((run_dir / "model.pt").read_bytes()).hexdigest()
    return {"metrics": metrics, "weights_sha256": weights, "model_file_sha256": model_sha,
            "wall_seconds": round(wall, 2)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-figures.json", help="where the figures go (JSON)")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a CPU test of the script)")
    a = ap.parse_args()
    import torch

    size = SIZES["small" if a.small else "full"]
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "AIF_REQUEUE": "0"}
    report: dict[str, Any] = {
        "device": name, "cuda": torch.version.cuda, "torch": torch.__version__,
        "bf16_peak_flops": peak,
        "settings": {"torch.use_deterministic_algorithms": True,
                     "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG",
                                                               ":4096:8 (payload default)"),
                     "lm_bf16_autocast": bool(size["lm"]["bf16"]) and cuda},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="aif-gpu-check-") as tmp:
        root = Path(tmp)
        fs_path = tabular_inputs(root, size["rows"], size["features"])
        (root / "tab.json").write_text(json.dumps(size["tabular"]))
        corpus = lm_inputs(root, size["text_mb"])
        (root / "lm.json").write_text(json.dumps(size["lm"]))
        tab = [run_payload("aifactory.tasks.payloads.train_tabular",
                           ["--featureset", str(fs_path), "--config", str(root / "tab.json")],
                           root / f"tab-{i}", env) for i in (1, 2)]  # fmt: skip
        lm = [run_payload("aifactory.tasks.payloads.train_lm",
                          ["--data", f"file://{corpus}", "--config", str(root / "lm.json")],
                          root / f"lm-{i}", env) for i in (1, 2)]  # fmt: skip
    lm_flops = [r["metrics"]["model_flops_per_second"] for r in lm]
    report["tabular"] = {
        "config": size["tabular"], "train_rows": tab[0]["metrics"]["train_rows"],
        "samples_per_second": [round(r["metrics"]["samples_per_second"]) for r in tab],
        "data_stall_fraction": [round(r["metrics"]["data_stall_fraction"], 4) for r in tab],
        "device": tab[0]["metrics"]["device"],
        "bit_identical": tab[0]["weights_sha256"] == tab[1]["weights_sha256"],
        "weights_sha256": [r["weights_sha256"] for r in tab],
        "wall_seconds": [r["wall_seconds"] for r in tab],
    }  # fmt: skip
    report["lm"] = {
        "config": size["lm"],
        "tokens_per_second": [round(r["metrics"]["tokens_per_second"]) for r in lm],
        "model_flops_per_second": [round(f) for f in lm_flops],
        "fraction_of_bf16_peak": [round(f / peak, 5) for f in lm_flops] if peak else None,
        "data_stall_fraction": [round(r["metrics"]["data_stall_fraction"], 4) for r in lm],
        "bit_identical": lm[0]["weights_sha256"] == lm[1]["weights_sha256"],
        "weights_sha256": [r["weights_sha256"] for r in lm],
        "wall_seconds": [r["wall_seconds"] for r in lm],
    }  # fmt: skip
    Path(a.out).write_text(json.dumps(report, indent=2))
    t, m = report["tabular"], report["lm"]
    frac = m["fraction_of_bf16_peak"]
    print(f"| device | {name} (torch {torch.__version__}, CUDA {torch.version.cuda}) |")
    print("|---|---|")
    print(f"| tabular MLP samples/s | {t['samples_per_second']} |")
    print(f"| tabular weights bit-identical over 2 runs | {t['bit_identical']} |")
    print(f"| tiny LM tokens/s | {m['tokens_per_second']} |")
    print(f"| tiny LM fraction of bf16 peak | {frac if frac is not None else 'unknown device'} |")
    print(f"| tiny LM weights bit-identical over 2 runs | {m['bit_identical']} |")
    print(f"figures: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
