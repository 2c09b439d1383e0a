"""The cost of going multi-node, on a site of two compute nodes (aif site up --nodes 2).

In one run, on the same site:
- a bare Slurm job on a compute node (``sbatch --wait`` of ``true``): the baseline of
  what any job costs to start;
- the time to the first Dask worker on a compute node (a SLURMCluster of one worker job,
  until the flow's client sees it), as a ratio of that baseline;
- the preprocessing stage (run_preprocess with its dispatcher) on 2 single-core workers
  packed on one node (``--nodelist=aif-n1``) against 2 single-core workers on two nodes
  (one each, ``--exclusive``): the same total cores. Both go in turn ``--repeat`` times,
  each going first in turn; the medians are compared (this machine is shared and noisy).

The nodes of this site share this machine's 2 cores and one kernel, so the ratio measures
what the multi-node path costs (scheduler traffic over the bridge, workers on other hosts),
not a speed-up.

    .venv/bin/aif site up --nodes 2
    .venv/bin/python tests/benchmarks/bench_multinode.py [--repeat 3] [--rows 1200000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from typing import Any

from aifactory.infra.site import manager
from aifactory.tasks.core.config import DaskSpec, default_features, load_profile
from aifactory.tasks.core.home import site_dir
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.doors.dask_cluster import open_cluster
from aifactory.tasks.doors.slurm import SlurmClient
from aifactory.tasks.stages import features as F
from aifactory.tasks.stages.ingest import IngestOptions, ingest
from aifactory.tasks.stages.preprocess import plan, run_preprocess

MOBILITY = IngestOptions(startup="startup-a", purpose="trip-duration-prediction")


def _bare_job(slurm: SlurmClient, log_dir: str) -> float:
    t0 = time.monotonic()
    slurm.run(["sbatch", "--wait", "-p", "cpu", "-A", "startup-a", "-N1", "-n1",
               f"--output={log_dir}/bare-%j.out", "--wrap", "true"], timeout=300)  # fmt: skip
    return time.monotonic() - t0


def _first_worker(slurm: SlurmClient, host: str, log_dir: str) -> float:
    spec = DaskSpec(kind="slurm", workers=1, cores=1, memory="1GiB", walltime="00:10:00",
                    scheduler_host=host)  # fmt: skip
    t0 = time.monotonic()
    with open_cluster(spec, account="startup-a", job_name="aif-bench-mn-first", slurm=slurm,
                      log_dir=log_dir, log=lambda m: None) as (client, _info):  # fmt: skip
        client.wait_for_workers(1, timeout=300)
        took = time.monotonic() - t0
        where = client.run(lambda: __import__("os").uname().nodename)
    print(f"  first worker on {', '.join(where.values())} after {took:.2f} s")
    return took


def _preprocess(slurm: SlurmClient, host: str, snap: Any, root: str, name: str,
                extra: list[str]) -> float:  # fmt: skip
    spec = DaskSpec(kind="slurm", workers=2, cores=1, memory="2GiB", walltime="00:20:00",
                    scheduler_host=host, job_extra_directives=extra)  # fmt: skip
    fs_id, cfg = plan(snap, F.resolve_config(default_features()))
    with open_cluster(spec, account="startup-a", job_name=f"aif-bench-mn-{name}", slurm=slurm,
                      log_dir=f"{root}/logs", log=lambda m: None) as (client, info):  # fmt: skip
        client.wait_for_workers(2, timeout=300)
        where = sorted(client.run(lambda: __import__("os").uname().nodename).values())
        t0 = time.monotonic()
        lake = f"file://{root}/lake-{name}-{time.time_ns()}"
        run_preprocess(snap, lake_url=lake, storage_options={}, client=client, config=cfg,
                       fs_id=fs_id, cluster_info=info.as_dict(), cluster=info,
                       progress=lambda m: None)  # fmt: skip
        took = time.monotonic() - t0
    print(f"  {name}: workers on {', '.join(where)}: {took:.2f} s")
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1_200_000)
    ap.add_argument("--objects", type=int, default=12)
    args = ap.parse_args(argv)
    site = manager._site(site_dir())
    if not site.multi_node:
        print("bench_multinode: the site has one node: run `aif site up --nodes 2` first",
              file=sys.stderr)  # fmt: skip
        return 2
    profile = load_profile("site")
    slurm = SlurmClient(env=profile.child_env())
    host = profile.dask.scheduler_host
    with tempfile.TemporaryDirectory(prefix="aif-bench-mn-") as root:
        bare = statistics.median(_bare_job(slurm, root) for _ in range(args.repeat))
        first = statistics.median(_first_worker(slurm, host, root) for _ in range(args.repeat))
        generate_mobility(f"file://{root}/ds", rows=args.rows, objects=args.objects, seed=5)
        snap = ingest(f"file://{root}/ds", f"file://{root}/lake", "mobility-trips", {}, {},
                      MOBILITY)  # fmt: skip
        layouts = {"one node": ["--nodelist=aif-n1"], "two nodes": ["--exclusive"]}
        times: dict[str, list[float]] = {k: [] for k in layouts}
        for r in range(args.repeat):
            order = list(layouts) if r % 2 == 0 else list(reversed(layouts))
            for name in order:
                times[name].append(_preprocess(slurm, host, snap, root, name.replace(" ", "-"),
                                               layouts[name]))  # fmt: skip
    one, two = statistics.median(times["one node"]), statistics.median(times["two nodes"])
    print(f"bare Slurm job on a compute node:   {bare:.2f} s (median of {args.repeat})")
    print(f"first Dask worker on a compute node: {first:.2f} s = {first / bare:.2f}x a bare job")
    print(f"preprocessing {args.rows} rows, 2 single-core workers: one node {one:.2f} s, two "
          f"nodes {two:.2f} s: two nodes take {two / one:.2f}x the time of one")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
