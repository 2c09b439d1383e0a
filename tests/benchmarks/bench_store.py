"""The site's object store (Ceph RGW) against moto, the S3 server it replaced, in one run.

Needs the local site (aif site up). Starts a moto server (its own process, on a free
loopback port, buckets like the site's) and, interleaved, on each store:

* ingest: the same generated Parquet dataset (``--mb``, 8 objects) ingested into a fresh
  lake prefix (each in its own process, platform credentials), ``--repeat`` times;
* the whole pipeline: ``aif run --profile site`` on a fresh data set of ``--rows`` trips
  (seeded into the store under test, so every stage runs cold), ``--epochs`` epochs. On
  moto the run uses the platform's key (moto has no users); on RGW the start-up's own
  temporary credentials, as in production.

Prints the medians and the ratios RGW / moto.

    .venv/bin/python tests/benchmarks/bench_store.py [--mb 256] [--rows 200000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.benchmarks.bench_ingest import ROWS_PER_MB, child

REPO = Path(__file__).resolve().parents[2]
AIF = str(Path(sys.executable).with_name("aif"))
BUCKETS = ("aif-dataspace", "aif-lake", "aif-mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _so(endpoint: str | None) -> dict[str, Any]:
    from aifactory.tasks.core.config import load_profile

    so = load_profile("site").storage_options("s3://x")
    if endpoint:
        so = {**so, "client_kwargs": {**so["client_kwargs"], "endpoint_url": endpoint}}
    return so


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    import boto3

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.1)
    so = _so(url)
    client = boto3.client("s3", endpoint_url=url, aws_access_key_id=so["key"],
                          aws_secret_access_key=so["secret"], region_name="us-east-1")  # fmt: skip
    for b in BUCKETS:
        client.create_bucket(Bucket=b)
    return proc, url


def dataset(endpoint: str | None, mb: int) -> str:
    import fsspec

    from aifactory.tasks.data.datagen import generate_mobility

    rows = mb * ROWS_PER_MB
    url = f"s3://aif-dataspace/bench/store-{rows}"
    fs, path = fsspec.core.url_to_fs(url, **_so(endpoint))
    if len(fs.glob(f"{path}/*.parquet")) != 8:
        generate_mobility(url, _so(endpoint), seed=5, rows=rows, objects=8)
    return url


def ingest_once(endpoint: str | None, src: str) -> dict[str, Any]:
    lake = f"s3://aif-lake/startup-a/bench-store-{uuid.uuid4().hex[:8]}"
    args = ["ingest", src, lake]
    env_key = "AIF_BENCH_S3_ENDPOINT"
    if endpoint:
        os.environ[env_key] = endpoint
    else:
        os.environ.pop(env_key, None)
    try:
        return child(args, script=str(Path(__file__).with_name("bench_ingest.py")),
                     what="ingest")  # fmt: skip
    finally:
        import fsspec

        fs, path = fsspec.core.url_to_fs(lake, **_so(endpoint))
        if fs.exists(path):
            fs.rm(path, recursive=True)


def pipeline_once(endpoint: str | None, rows: int, epochs: int) -> float:
    tag = uuid.uuid4().hex[:8]
    env = {"AIF_DATASPACE__URL": f"s3://aif-lake/startup-a/inbox/bench-store-{tag}",
           "AIF_DATASPACE__SEED": "true"}  # fmt: skip
    profile = "site"
    if endpoint:  # moto: no per-start-up identities (only a profile file may drop them)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
            fh.write(
                f"extends: site\nobject_store:\n  endpoint_url: {endpoint}\n  tenant_keys: null\n"
            )
        profile = fh.name
    t0 = time.perf_counter()
    proc = subprocess.run([AIF, "run", "--profile", profile, "--rows", str(rows), "--epochs",
                           str(epochs)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env}, timeout=3600)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"aif run on {endpoint or 'RGW'} failed:\n{proc.stdout[-3000:]}\n{proc.stderr}")
    return wall


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=256, help="size of the ingested dataset (MB)")
    p.add_argument("--rows", type=int, default=200_000, help="trips of each pipeline run")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args()
    moto, moto_url = start_moto()
    stores = {"rgw": None, "moto": moto_url}
    try:
        srcs = {k: dataset(ep, a.mb) for k, ep in stores.items()}
        ingest: dict[str, list[float]] = {k: [] for k in stores}
        runs: dict[str, list[float]] = {k: [] for k in stores}
        for _ in range(a.repeat):
            for k, ep in stores.items():
                r = ingest_once(ep, srcs[k])
                ingest[k].append(r["bytes"] / 1e6 / r["seconds"])
            for k, ep in stores.items():
                runs[k].append(pipeline_once(ep, a.rows, a.epochs))
    finally:
        moto.terminate()
        moto.wait(timeout=30)
    mi = {k: statistics.median(v) for k, v in ingest.items()}
    mr = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"\ningest of {a.mb} MB of Parquet (8 objects, 2 workers), MB/s, runs: "
        + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in ingest.items())
    )
    print(
        f"aif run --profile site ({a.rows:,} trips, {a.epochs} epochs, cold), s, runs: "
        + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in runs.items())
    )
    print(
        f"\ningest throughput, RGW / moto (medians): {mi['rgw'] / mi['moto']:.2f}x "
        f"({mi['rgw']:.1f} vs {mi['moto']:.1f} MB/s)"
    )
    print(
        f"pipeline wall time, RGW / moto (medians): {mr['rgw'] / mr['moto']:.2f}x "
        f"({mr['rgw']:.1f} vs {mr['moto']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
