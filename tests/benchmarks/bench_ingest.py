"""Ingestion on the site's object store (Ceph RGW) against a raw pyarrow copy of the same
objects.

Needs the local site (aif site up). Generates two Parquet datasets in the data-space
bucket (removed at the end unless --keep-data): ``big`` (about 1 GB: 16 objects of about 64 MB) and
``small`` (4 of those objects' size: a quarter of the data). Then, each in its own process
so that its peak RSS is its own, into a fresh lake prefix each time:

* raw copy: ``pq.read_table`` each object, ``pq.write_table`` it to the lake bucket;
  serially, and with 2 threads (the same parallelism as the ingest);
* ingest of ``big`` (policy, contract checks and casts, key hashes, content hashes,
  atomic commits), and the unchanged re-ingest of it;
* ingest of ``small`` (for the memory ratio).

Prints throughput ratios (ingest / raw copy; target >= 0.9), the peak-RSS ratio for 4x the
data (target <= 1.2) and the unchanged re-ingest time against the first (target <= 2%).

    .venv/bin/python tests/benchmarks/bench_ingest.py [--mb 1024] [--keep-data]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

ROWS_PER_MB = 40_000  # mobility trips are about 25 bytes per row in Parquet
OBJECTS_BIG, OBJECTS_SMALL = 16, 4


def _profile() -> Any:
    from aifactory.tasks.core.config import load_profile

    return load_profile("site")


def _fs() -> Any:
    import fsspec

    so = _profile().storage_options("s3://x")
    if os.environ.get("AIF_BENCH_S3_ENDPOINT"):  # bench_store.py: the same on another store
        kw = {**so["client_kwargs"], "endpoint_url": os.environ["AIF_BENCH_S3_ENDPOINT"]}
        so = {**so, "client_kwargs": kw}
    fs, _ = fsspec.core.url_to_fs("s3://aif-dataspace", **so)
    return fs, so


def ensure_dataset(name: str, objects: int, rows: int) -> str:
    from aifactory.tasks.data.datagen import generate_mobility

    fs, so = _fs()
    prefix = f"aif-dataspace/bench/ingest-{name}-{rows}"
    fs.invalidate_cache()
    if len(fs.glob(f"{prefix}/*.parquet")) != objects:
        if fs.exists(prefix):
            fs.rm(prefix, recursive=True)
        t = time.perf_counter()
        generate_mobility(f"s3://{prefix}", so, seed=3, rows=rows, objects=objects)
        print(f"generated s3://{prefix}: {objects} objects in {time.perf_counter() - t:.0f} s",
              flush=True)  # fmt: skip
    return f"s3://{prefix}"


# -- the measured operations (each runs in a child process) ---------------------------------
def op_raw(src: str, dest: str, threads: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    fs, _ = _fs()
    fs.ls("aif-lake")  # the S3 session is set up before the clock starts
    t = time.perf_counter()
    keys = sorted(fs.glob(f"{src.removeprefix('s3://')}/*.parquet"))

    def copy(k: str) -> int:
        with fs.open(k, "rb") as fh:
            table = pq.read_table(fh)
        with fs.open(f"{dest.removeprefix('s3://')}/{k.rsplit('/', 1)[-1]}", "wb") as out:
            pq.write_table(table, out, compression="zstd")
        return fs.size(k)

    with ThreadPoolExecutor(threads) as pool:
        size = sum(pool.map(copy, keys))
    return {"seconds": time.perf_counter() - t, "bytes": size}


def op_ingest(src: str, lake: str) -> dict[str, Any]:
    from aifactory.tasks.stages.ingest import IngestOptions, ingest

    fs, so = _fs()
    fs.ls("aif-lake")  # the S3 session is set up before the clock starts, as for op_raw
    workers = int(os.environ.get("AIF_BENCH_WORKERS", "2"))
    opts = IngestOptions(startup="startup-a", purpose="trip-duration-prediction", workers=workers)
    t = time.perf_counter()
    snap = ingest(src, lake, "mobility-trips", so, so, opts)
    return {"seconds": time.perf_counter() - t, "bytes": snap.bytes, "read": snap.bytes_read,
            "reused": snap.reused, "rows": snap.rows}  # fmt: skip


def child(args: list[str], script: str = __file__, what: str = "operation") -> dict[str, Any]:
    """Run one operation of ``script`` (its ``--child`` mode) in a fresh process; the JSON
    it prints last: its result plus its own peak RSS."""
    proc = subprocess.Popen([sys.executable, script, "--child", json.dumps(args)],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{what} {args} failed with exit code {proc.returncode}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def _run_child(spec: list[str]) -> None:
    import resource

    kind, *rest = spec
    res = op_raw(rest[0], rest[1], int(rest[2])) if kind == "raw" else op_ingest(*rest[:2])
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res), flush=True)


def _cleanup(prefix: str) -> None:
    fs, _ = _fs()
    p = prefix.removeprefix("s3://")
    fs.invalidate_cache()
    if fs.exists(p):
        fs.rm(p, recursive=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=1024, help="size of the big dataset (MB)")
    p.add_argument(
        "--keep-data",
        action="store_true",
        help="keep the generated datasets in the data-space bucket for later runs",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _run_child(json.loads(a.child))
        return 0
    rows_big = a.mb * ROWS_PER_MB
    per_object = rows_big // OBJECTS_BIG
    big = ensure_dataset("big", OBJECTS_BIG, per_object * OBJECTS_BIG)
    small = ensure_dataset("small", OBJECTS_SMALL, per_object * OBJECTS_SMALL)
    run = uuid.uuid4().hex[:8]
    lakes = {k: f"s3://aif-lake/bench-{run}/{k}" for k in ("raw1", "raw2", "big", "small")}
    try:
        raw1 = child(["raw", big, lakes["raw1"], "1"])
        _cleanup(lakes["raw1"])
        first = child(["ingest", big, lakes["big"]])
        again = child(["ingest", big, lakes["big"]])
        raw2 = child(["raw", big, lakes["raw2"], "2"])
        _cleanup(lakes["raw2"])
        _cleanup(lakes["big"])
        small_run = child(["ingest", small, lakes["small"]])
    finally:
        for lake in lakes.values():
            _cleanup(lake)
        _cleanup(f"s3://aif-lake/bench-{run}")
        if not a.keep_data:  # do not leave a GB in the site's store
            _cleanup(big)
            _cleanup(small)
    assert not first["reused"] and again["reused"] and again["read"] == 0
    mb = first["bytes"] / 1e6

    def rate(r: dict[str, Any]) -> float:
        return r["bytes"] / 1e6 / r["seconds"]

    print(f"\ndataset: {mb:.0f} MB of Parquet, {first['rows']} rows, {OBJECTS_BIG} objects "
          f"(the site's Ceph RGW)")  # fmt: skip
    print(f"raw pyarrow copy, 1 thread : {raw1['seconds']:6.1f} s  {rate(raw1):6.1f} MB/s  "
          f"peak RSS {raw1['peak_rss_mb']:.0f} MB")  # fmt: skip
    print(f"raw pyarrow copy, 2 threads: {raw2['seconds']:6.1f} s  {rate(raw2):6.1f} MB/s  "
          f"peak RSS {raw2['peak_rss_mb']:.0f} MB")  # fmt: skip
    print(f"aif ingest, 2 workers      : {first['seconds']:6.1f} s  {rate(first):6.1f} MB/s  "
          f"peak RSS {first['peak_rss_mb']:.0f} MB")  # fmt: skip
    print(f"aif ingest of 1/4 the data : {small_run['seconds']:6.1f} s  "
          f"peak RSS {small_run['peak_rss_mb']:.0f} MB")  # fmt: skip
    print(f"unchanged re-ingest        : {again['seconds']:6.2f} s (0 bytes read)")
    r1, r2 = rate(first) / rate(raw1), rate(first) / rate(raw2)
    mem = first["peak_rss_mb"] / small_run["peak_rss_mb"]
    re_ratio = again["seconds"] / first["seconds"]
    print(f"\nthroughput ingest / raw copy (1 thread) : {r1:.2f}x  (target >= 0.90)")
    print(f"throughput ingest / raw copy (2 threads): {r2:.2f}x  (target >= 0.90)")
    print(f"peak RSS, 4x the data / 1x              : {mem:.2f}x  (target <= 1.20)")
    print(f"unchanged re-ingest / first ingest      : {re_ratio * 100:.2f}%  (target <= 2%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
