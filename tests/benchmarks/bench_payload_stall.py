"""Data-loader stall fraction and throughput of both reference payloads (target: <= 5%).

Stall fraction = 1 - (time of the same training steps on one synthetic in-memory batch)
/ (time of the steps with the real loader), measured inside each payload in one run.

    .venv/bin/python tests/benchmarks/bench_payload_stall.py [--rows 200000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from aifactory.tasks.core.config import default_features
from aifactory.tasks.core.manifests import FeatureSet, SplitFiles
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.data.textgen import generate_reviews
from aifactory.tasks.stages import features as F
from aifactory.tasks.stages.ingest import IngestOptions, ingest

MOBILITY = IngestOptions(startup="startup-a", purpose="trip-duration-prediction")

TARGET = 0.05


def tabular_featureset(tmp: Path, rows: int) -> Path:
    src = f"file://{tmp}/dataspace"
    generate_mobility(src, rows=rows, objects=8)
    snap = ingest(src, f"file://{tmp}/lake", "mobility-trips", {}, {}, MOBILITY)
    cfg = F.resolve_config(default_features())  # the bundled mobility project's features
    out = f"file://{tmp}/lake/features/bench"
    results = [F.featurize_partition(i, o.lake_path, out, {}, cfg)
               for i, o in enumerate(snap.objects)]  # fmt: skip
    cols = results[0]["columns"]
    fset = FeatureSet(
        featureset_id="bench", snapshot_id=snap.snapshot_id, snapshot_hash="-", lake_url=out,
        key_column=cfg["key"], feature_columns=cols, target=cfg["target"],
        normalisation=F.fit_normalisation(results, [*cols, cfg["target"]]),
        splits={s: SplitFiles(files=[r["splits"][s]["file"] for r in results],
                              rows=sum(r["splits"][s]["rows"] for r in results))
                for s in F.SPLITS},
        rows_in=rows, feature_config=cfg, created_at="-",
    )  # fmt: skip
    path = tmp / "featureset.json"
    path.write_text(fset.to_json())
    return path


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = ("data_stall_fraction", "samples_per_second", "tokens_per_second")
    return {k: statistics.median(r[k] for r in runs) for k in keys if k in runs[0]}


def run(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True, text=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="aif-bench-stall-"))
    fs_path = tabular_featureset(tmp, a.rows)
    cfg = tmp / "tab.json"
    cfg.write_text(json.dumps({"epochs": 8, "batch_size": 512, "hidden": [64, 32],
                               "lr": 0.002, "seed": 1234}))  # fmt: skip
    reviews = generate_reviews(f"file://{tmp}/reviews", rows=20_000, objects=2)
    lm_cfg = tmp / "lm.json"
    lm_cfg.write_text(json.dumps({"steps": 200}))
    tabs, lms = [], []
    for i in range(a.repeat):  # a shared, noisy machine: the median of a few runs
        run(["aifactory.tasks.payloads.train_tabular", "--featureset", str(fs_path), "--run-dir",
             str(tmp / f"tab{i}"), "--config", str(cfg)])  # fmt: skip
        tabs.append(json.loads((tmp / f"tab{i}" / "metrics.json").read_text()))
        run(["aifactory.tasks.payloads.train_lm", "--data", ",".join(reviews), "--run-dir",
             str(tmp / f"lm{i}"), "--config", str(lm_cfg)])  # fmt: skip
        lms.append(json.loads((tmp / f"lm{i}" / "metrics.json").read_text()))
    tab, lm = _median(tabs), _median(lms)

    ok = True
    rows = [
        ("tabular MLP", tab, f"{tab['samples_per_second']:.0f} samples/s"),
        ("tiny causal LM", lm, f"{lm['tokens_per_second']:.0f} tokens/s"),
    ]
    for name, m, rate in rows:
        stall = m["data_stall_fraction"]
        ok &= stall <= TARGET
        print(
            f"{name:15s} stall {stall:6.2%} (median of {a.repeat}, target <= {TARGET:.0%}) "
            f"{'ok' if stall <= TARGET else 'OVER'}   {rate}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
