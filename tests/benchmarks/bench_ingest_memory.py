"""Peak memory of ingesting one CSV and one JSON Lines object at two sizes (issue 15).

No site needed: everything is local, in a temporary folder (removed at the end). For each
format (CSV: agriculture-fields; JSON Lines: health-records, pseudonymised) it writes one
object of ``--small-mb`` and one of ``--large-mb``, then ingests each into a fresh lake in
its own process, so that its peak RSS (``ru_maxrss``) is its own. Prints, per format, the
peak RSS at both sizes and their ratio, large / small (target <= 1.2: memory does not grow
with the input).

The ingest holds a lake row group (``ROW_GROUP_ROWS`` rows: about 50 MB of CSV, 160 MB of
JSON Lines) before it writes it, so memory reaches its plateau once an object holds more
than one row group: the small size must be above that for the ratio to mean anything.

The objects are made from one chunk of the catalog's generator (tasks/data/generators.py),
repeated with new primary keys, so that writing a GB takes seconds, not minutes.

    .venv/bin/python tests/benchmarks/bench_ingest_memory.py [--small-mb 200] [--large-mb 800]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from typing import Any

import bench_ingest  # this folder is on sys.path when run as a script

KEY = b"bench-ingest-memory-pseudonymisation-key"
FORMATS: dict[str, dict[str, Any]] = {
    "csv": {"dataset": "agriculture-fields", "pk": "reading_id", "prefix": "R",
            "opts": {"startup": "startup-b", "purpose": "crop-yield-forecasting"}},
    "jsonl": {"dataset": "health-records", "pk": "record_id", "prefix": "H",
              "opts": {"startup": "startup-c", "purpose": "readmission-risk-research"}},
}  # fmt: skip
CHUNK_ROWS = 20_000
HOLE = b"@@@@@@@@@@"  # a primary key's place in the template chunk (the keys' width)


def _template(fmt: str) -> list[bytes]:
    """One generated chunk, serialised, split where its primary keys go."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from aifactory.tasks.data import generators as g

    spec = FORMATS[fmt]
    if fmt == "csv":
        t = g.agriculture_chunk(31, 0, CHUNK_ROWS, 0)
    else:
        t = g.health_chunk(21, 0, CHUNK_ROWS, 0)
    t = t.set_column(t.schema.get_field_index(spec["pk"]), spec["pk"],
                     pa.array([HOLE.decode()] * t.num_rows))  # fmt: skip
    if fmt == "csv":
        import io

        buf = io.BytesIO()
        pacsv.write_csv(t, buf)
        header, body = buf.getvalue().split(b"\n", 1)
        return [header + b"\n", *body.split(HOLE)]
    return [b"", *g._jsonl(t).split(HOLE)]


def write_object(fmt: str, path: str, mb: int) -> tuple[int, int]:
    """Write about ``mb`` MB of ``fmt`` to ``path``; (rows, bytes)."""
    head, *parts = _template(fmt)
    prefix = FORMATS[fmt]["prefix"]
    per_chunk = sum(len(p) for p in parts) + CHUNK_ROWS * len(HOLE)
    chunks = max(1, round(mb * 1e6 / per_chunk))
    with open(path, "wb") as fh:
        fh.write(head)
        for c in range(chunks):
            out = [parts[0]]
            for i, rest in enumerate(parts[1:]):
                out.append(f"{prefix}{c * CHUNK_ROWS + i:09d}".encode())
                out.append(rest)
            fh.write(b"".join(out))
    return chunks * CHUNK_ROWS, os.path.getsize(path)


# -- the measured operation (in a child process) ---------------------------------------------
def op_ingest(fmt: str, src: str, lake: str) -> dict[str, Any]:
    from aifactory.tasks.stages.ingest import IngestOptions, ingest

    spec = FORMATS[fmt]
    key = KEY if fmt == "jsonl" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    snap = ingest(f"file://{src}/*.{fmt}", f"file://{lake}", spec["dataset"], None, None,
                  IngestOptions(**spec["opts"], pseudonymisation_key=key))  # fmt: skip
    return {"seconds": time.perf_counter() - t, "rows": snap.rows, "bytes": snap.bytes,
            "rss_before_mb": before}  # fmt: skip


def child(args: list[str]) -> dict[str, Any]:
    """Run one ingest in a fresh process; its result plus its own peak RSS."""
    return bench_ingest.child(args, __file__, "ingest")


def _run_child(spec: list[str]) -> None:
    res = op_ingest(*spec)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res), flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--small-mb", type=int, default=200, help="size of the small object (MB)")
    p.add_argument("--large-mb", type=int, default=800, help="size of the large object (MB)")
    p.add_argument("--formats", default="csv,jsonl", help="csv, jsonl or both")
    p.add_argument("--dir", default=None, help="folder for the objects and lakes (default: temp)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        _run_child(json.loads(a.child))
        return 0
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="aif-bench-mem-", dir=a.dir) as root:
        for fmt in a.formats.split(","):
            for size, mb in (("small", a.small_mb), ("large", a.large_mb)):
                src = os.path.join(root, f"{fmt}-{size}")
                os.makedirs(src)
                t = time.perf_counter()
                rows, nbytes = write_object(fmt, os.path.join(src, f"part-00000.{fmt}"), mb)
                print(f"wrote {fmt} {size}: {nbytes / 1e6:.0f} MB, {rows} rows in "
                      f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
                res = child([fmt, src, os.path.join(root, f"lake-{fmt}-{size}")])
                assert res["rows"] == rows, res
                res["mb"] = nbytes / 1e6
                results.setdefault(fmt, {})[size] = res
                print(f"ingest {fmt} {size}: {res['seconds']:.1f} s, "
                      f"{res['mb'] / res['seconds']:.0f} MB/s, peak RSS "
                      f"{res['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
                os.remove(os.path.join(src, f"part-00000.{fmt}"))  # keep the disk use down
    print()
    for fmt, r in results.items():
        s, g = r["small"], r["large"]
        print(f"{fmt:<6} {s['mb']:6.0f} MB: peak RSS {s['peak_rss_mb']:5.0f} MB   "
              f"{g['mb']:6.0f} MB: peak RSS {g['peak_rss_mb']:5.0f} MB   "
              f"(after imports: {s['rss_before_mb']:.0f} MB)")  # fmt: skip
    for fmt, r in results.items():
        s, g = r["small"], r["large"]
        ratio = g["peak_rss_mb"] / s["peak_rss_mb"]
        print(f"peak RSS {fmt}, {g['mb'] / s['mb']:.1f}x the data / 1x: {ratio:.2f}x  "
              "(target <= 1.20)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
