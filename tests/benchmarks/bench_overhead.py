"""What the platform costs a user: `aif run --profile site` against a plain script of the
same work, cold, in one run of this script (issue 14's target: at most 1.05x).

Needs the local site (aif site up). Both sides start from the same data-space objects (a
fresh prefix seeded once with ``--rows`` trips) and do the same work at the same size:

- **aif**: `aif run --profile site --epochs E` on a fresh data set in startup-a's own area
  (policy, contract-checked ingest, snapshot, Dask-on-Slurm features, a Slurm GPU job,
  MLflow registration with lineage, model card, RO-Crate), as a user runs it.
- **plain**: this file, written directly on pyarrow (read every object, write it to the
  lake), dask-jobqueue (the mobility project's own feature function on the same
  SLURMCluster settings, stable split, train-split statistics), sbatch (the same reference
  payload on the same partition, polled with squeue/sacct) and MLflow (log the model as a
  pyfunc and register it): no Prefect, no manifests, no policy, no caches.

It prints both wall times, the ratio, and the aif run's stages against the plain script's
(from the run's pipeline record), so the difference can be placed.

    .venv/bin/python tests/benchmarks/bench_overhead.py [--rows 1000000] [--epochs 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_site_run import last_stages  # this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[2]
AIF = str(Path(sys.executable).with_name("aif"))


def aif_run(env: dict[str, str], epochs: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([AIF, "run", "--profile", "site", "--epochs", str(epochs)],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, **env},
                          timeout=7200)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"aif run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout.strip().splitlines()[-1]


def plain(cfg: Any, src: str, lake: str, epochs: int, work: Path) -> tuple[dict[str, float], str]:
    """The same work without the platform; seconds per step and the model URI."""
    from concurrent.futures import ThreadPoolExecutor

    import fsspec
    import numpy as np
    import pyarrow.parquet as pq

    times: dict[str, float] = {}
    so = cfg.storage_options(src)
    fs, base = fsspec.core.url_to_fs(src, **so)
    os.environ.update(cfg.child_env())  # keys and SLURM_CONF, as a user's shell would have

    # 1. ingest: every object read with pyarrow and written to the lake (2 threads)
    t = time.perf_counter()
    keys = sorted(k for k in fs.find(base) if k.endswith(".parquet"))

    def copy(i_key: tuple[int, str]) -> str:
        i, key = i_key
        with fs.open(key, "rb") as fh:
            table = pq.read_table(fh)
        out = f"{lake}/raw/part-{i:05d}.parquet"
        with fs.open(out.removeprefix("s3://"), "wb") as fh:
            pq.write_table(table, fh)
        return out

    with ThreadPoolExecutor(2) as pool:
        raw = list(pool.map(copy, enumerate(keys)))
    times["ingest"] = time.perf_counter() - t

    # 2. features on dask-jobqueue workers (Slurm jobs), the project's own function
    t = time.perf_counter()
    from dask.distributed import Client
    from dask_jobqueue import SLURMCluster

    d = cfg.dask
    cluster = SLURMCluster(cores=d.cores, processes=d.processes, memory=d.memory,
                           walltime=d.walltime, queue=d.partition,
                           account=cfg.startup("startup-a")[1].account,
                           scheduler_options={"host": "127.0.0.1"},
                           log_directory=str(work / "dask-logs"))  # fmt: skip
    cluster.scale(jobs=d.workers)
    client = Client(cluster)
    client.wait_for_workers(1, timeout=600)
    fcfg = dict(cfg.features)
    fcfg.setdefault("split", {"train": 80, "val": 10, "test": 10})
    futures = client.map(_featurise, range(len(raw)), raw, [lake] * len(raw),
                         [so] * len(raw), [fcfg] * len(raw))  # fmt: skip
    parts = client.gather(futures)
    client.close()
    cluster.close()
    cols = parts[0]["columns"]
    n = sum(p["n"] for p in parts)
    s = np.sum([p["sum"] for p in parts], axis=0)
    sq = np.sum([p["sumsq"] for p in parts], axis=0)
    mean = s / n
    std = np.sqrt(np.maximum(sq / n - mean * mean, 0.0))
    fset = {
        "feature_columns": cols, "target": fcfg["target"], "feature_config": fcfg,
        "normalisation": {c: {"mean": float(m), "std": float(sd if sd > 1e-12 else 1.0)}
                          for c, m, sd in zip([*cols, fcfg["target"]], mean, std, strict=True)},
        "splits": {name: {"files": [p["files"][name] for p in parts]}
                   for name in ("train", "val", "test")},
    }  # fmt: skip
    times["preprocess"] = time.perf_counter() - t

    # 3. train: the same reference payload as a Slurm GPU job, polled with squeue/sacct
    t = time.perf_counter()
    run = work / "train"
    run.mkdir()
    (run / "featureset.json").write_text(json.dumps(fset))
    spec = cfg.training
    (run / "config.json").write_text(json.dumps({"epochs": epochs, "batch_size": spec.batch_size,
                                                 "hidden": spec.hidden, "lr": spec.lr,
                                                 "seed": spec.seed}))  # fmt: skip
    script = run / "train.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=plain-train\n#SBATCH --account=startup-a\n"
        f"#SBATCH --partition={spec.partition}\n#SBATCH --gres=gpu:{spec.gpus_per_node}\n"
        f"#SBATCH --cpus-per-task={spec.cpus_per_task}\n#SBATCH --mem={int(spec.mem_gb * 1024)}M\n"
        "#SBATCH --time=02:00:00\n#SBATCH --output=slurm-%j.out\n"
        f"exec {sys.executable} -m aifactory.tasks.payloads.train_tabular --featureset "
        f"'{run}/featureset.json' --run-dir '{run}' --config '{run}/config.json'\n"
    )
    job = subprocess.run(["sbatch", "--parsable", f"--chdir={run}", str(script)], check=True,
                         capture_output=True, text=True).stdout.strip().split(";")[0]  # fmt: skip
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True,
                         text=True).stdout.strip():  # fmt: skip
        time.sleep(1.0)
    state = ""
    for _ in range(30):
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", job],
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        if state:
            break
        time.sleep(1.0)
    if not state.startswith("COMPLETED"):
        sys.exit(f"plain: training job {job} ended {state}: see {run}/slurm-{job}.out")
    times["train"] = time.perf_counter() - t

    # 4. register in MLflow: the model as a pyfunc with its feature config, one version
    t = time.perf_counter()
    import mlflow

    from aifactory.tasks.models.pyfunc_model import TabularPyfunc

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_experiment("plain-overhead-bench")
    (run / "feature_config.json").write_text(json.dumps(fcfg))
    with mlflow.start_run():
        metrics = json.loads((run / "metrics.json").read_text())
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                            if isinstance(v, int | float)})  # fmt: skip
        info = mlflow.pyfunc.log_model(
            name="model", python_model=TabularPyfunc(),
            artifacts={"model": str(run / "model.pt"),
                       "feature_config": str(run / "feature_config.json")},
        )  # fmt: skip
    mv = mlflow.register_model(info.model_uri, "plain-overhead-bench")
    times["register"] = time.perf_counter() - t
    return times, f"models:/plain-overhead-bench/{mv.version}"


def _featurise(i: int, url: str, lake: str, so: dict[str, Any],
               fcfg: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """One partition on a Dask worker: the feature function, a stable split, the files."""
    import fsspec
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aifactory.tasks.stages.features import load_function

    fs, path = fsspec.core.url_to_fs(url, **so)
    with fs.open(path, "rb") as fh:
        df = pq.read_table(fh).to_pandas()
    feats, _ = load_function(fcfg["function"])(df, fcfg)
    key, target = fcfg["key"], fcfg["target"]
    cols = [c for c in feats.columns if c not in (key, target)]
    bucket = pd.util.hash_pandas_object(feats[key].astype("string"), index=False).to_numpy() % 100
    split = np.where(bucket < 80, "train", np.where(bucket < 90, "val", "test"))
    files = {}
    for name in ("train", "val", "test"):
        part = feats.loc[split == name, [key, *cols, target]]
        out = f"{lake}/features/{name}/part-{i:05d}.parquet"
        table = pa.Table.from_pandas(part.astype(dict.fromkeys([*cols, target], "float32")),
                                     preserve_index=False)  # fmt: skip
        with fs.open(out.removeprefix("s3://"), "wb") as fh:
            pq.write_table(table, fh)
        files[name] = out
    train = feats.loc[split == "train", [*cols, target]].to_numpy(dtype="float64")
    return {"columns": cols, "files": files, "n": len(train), "sum": train.sum(axis=0).tolist(),
            "sumsq": (train * train).sum(axis=0).tolist()}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--epochs", type=int, default=60)
    a = p.parse_args()
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.data.generators import seed_entry

    cfg = load_profile("site")
    tag = time.strftime("bench-%Y%m%d-%H%M%S")
    # A fresh data set in startup-a's own area (the site's object store lets its runs use
    # nothing else): every stage of the aif run is cold.
    src = f"s3://aif-lake/startup-a/inbox/overhead-{tag}"
    entry = cfg.dataset_entry("mobility-trips")
    seed_entry(entry, src, cfg.storage_options(src), rows=a.rows, objects=8)
    print(f"data space {src}: seeded ({a.rows:,} trips, 8 objects)")
    env = {"AIF_DATASPACE__URL": src}

    plain_times, plain_uri = plain(cfg, src, f"s3://aif-lake/{tag}-plain", a.epochs,
                                   Path(tempfile.mkdtemp(prefix="aif-plain-")))  # fmt: skip
    plain_total = sum(plain_times.values())
    aif_total, aif_uri = aif_run(env, a.epochs)
    stages = last_stages()
    print(f"mobility example, {a.rows:,} trips, {a.epochs} epochs, cold")
    print(f"  plain script  : {plain_total:7.1f} s -> {plain_uri}")
    print(f"  aif run (site): {aif_total:7.1f} s -> {aif_uri}")
    print(f"  ratio aif/plain: {aif_total / plain_total:.3f}  (target <= 1.05)")
    print("  stage      plain (s)   aif (s)   aif - plain")
    for name in ("ingest", "preprocess", "train", "register"):
        pv, av = plain_times.get(name, 0.0), float(stages.get(name, 0.0))
        print(f"  {name:<10} {pv:9.1f} {av:9.1f} {av - pv:+10.1f}")
    rest = aif_total - sum(float(v) for v in stages.values())
    print(f"  {'outside':<10} {'':>9} {rest:9.1f}   (process start, Prefect flow run, CLI)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
