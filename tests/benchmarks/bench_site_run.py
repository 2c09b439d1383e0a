"""Wall time of `aif run --profile site`: a cold run, then the unchanged re-run.

Needs the local site (aif site up). A fresh data set of --rows trips, seeded by the run
into startup-a's own area, makes the first run cold (ingest, Dask-on-Slurm preprocessing,
a Slurm GPU job, registration); the second run is the same command again, served from the
manifests' caches (no data byte read, no Slurm job, no new version). Prints both, the
ratio and the re-run's stages.

    .venv/bin/python tests/benchmarks/bench_site_run.py [--rows 200000] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
AIF = str(Path(sys.executable).with_name("aif"))


def run(env: dict[str, str], args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([AIF, "run", "--profile", "site", *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, **env}, timeout=3600)  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"aif run failed:\n{proc.stdout}\n{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    summary = next((ln for ln in lines if ln.startswith("summary:")), "")
    return wall, f"{lines[-1]}  ({summary})"


def last_stages() -> dict[str, float]:
    """Seconds per stage of the latest pipeline run of the site profile."""
    from aifactory.tasks.core.config import load_profile

    records = sorted(Path(load_profile("site").runs_dir, "pipeline").glob("*.json"),
                     key=lambda q: q.stat().st_mtime)  # fmt: skip
    return json.loads(records[-1].read_text())["stage_seconds"] if records else {}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=8)
    a = p.parse_args()
    tag = time.strftime("bench-%Y%m%d-%H%M%S")
    # A fresh data set in the start-up's own area (its lake prefix: the site's object store
    # lets a start-up's run use nothing else), seeded by the run: nothing to reuse.
    env = {"AIF_DATASPACE__URL": f"s3://aif-lake/startup-a/inbox/{tag}",
           "AIF_DATASPACE__SEED": "true"}  # fmt: skip
    args = ["--epochs", str(a.epochs), "--rows", str(a.rows)]
    run(env, ["--dry-run"])  # validate the profile before the long run
    cold, uri1 = run(env, args)
    warm, uri2 = run(env, ["--epochs", str(a.epochs)])
    stages = last_stages()
    print(f"aif run --profile site ({a.rows:,} trips, {a.epochs} epochs)")
    print(f"  cold run : {cold:7.1f} s  -> {uri1}")
    print(f"  re-run   : {warm:7.1f} s  -> {uri2}")
    print(f"  re-run stages (s): {stages}")
    print(f"  ratio re-run/cold: {warm / cold:.3f}  (target <= 0.03)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
