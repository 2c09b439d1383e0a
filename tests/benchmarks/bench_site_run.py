"""Wall time of `aif run --profile site` at the default size: cold, then unchanged re-run.

Needs the local site (aif site up). A fresh lake prefix and a fresh runs folder make the
first run cold (ingest, Dask-on-Slurm preprocessing, a Slurm GPU job, registration); the
second run is the same command again, served from the manifests' caches.

    .venv/bin/python tests/benchmarks/bench_site_run.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AIF = str(Path(sys.executable).with_name("aif"))


def run(env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([AIF, "run", "--profile", "site"], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **env}, timeout=1800)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"aif run failed:\n{proc.stdout}\n{proc.stderr}")
    return wall, proc.stdout.strip().splitlines()[-1]


def main() -> int:
    tag = time.strftime("bench-%Y%m%d-%H%M%S")
    home = tempfile.mkdtemp(prefix="aif-bench-")
    # A fresh lake prefix and AIF_HOME (hence runs folder): nothing to reuse.
    env = {"AIF_LAKE__URL": f"s3://aif-lake/{tag}", "AIF_HOME": home}
    cold, uri1 = run(env)
    warm, uri2 = run(env)
    print("aif run --profile site (default size: 200,000 trips, 8 objects, 8 epochs)")
    print(f"  cold run : {cold:7.1f} s  -> {uri1}")
    print(f"  re-run   : {warm:7.1f} s  -> {uri2}  (unchanged inputs: every stage cached)")
    print(f"  ratio re-run/cold: {warm / cold:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
