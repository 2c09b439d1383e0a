"""What the relay costs: a flow run inside an allocation against one on the login side.

In one run, on the same site (aif site up; two compute nodes by default):
- one Prefect API call (``POST /api/logs/`` of one record, what a flow run sends most)
  straight to the server, against the same call through a node-local endpoint, a spool on
  the shared filesystem and the site's relay (this process plays the job's side on the
  login host; the spool and the relay are the real ones): ``--calls`` of each, interleaved
  in blocks of 10; medians and 95th percentiles compared;
- the whole pipeline, `aif run --profile site` against `aif run --profile site
  --in-allocation`, ``--repeat`` times each, in turn, each going first in turn. Every run
  trains afresh (its own epoch count: a new run key), ingest and preprocessing come from
  their manifests in both modes, so the difference is the flow's job and its calls through
  the relay, against the login side's own training job.

    .venv/bin/aif site up
    .venv/bin/python tests/benchmarks/bench_in_allocation.py [--calls 300] [--repeat 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import grp
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from aifactory.tasks.control import relay as rl
from aifactory.tasks.core.config import load_profile

AIF = str(Path(sys.executable).with_name("aif"))


def _log_record() -> dict[str, object]:
    return {"name": "bench", "level": 20, "message": "relay benchmark",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(), "flow_run_id": None}  # fmt: skip


def _calls(url: str, n: int, auth: tuple[str, str] | None = None) -> list[float]:
    out = []
    with httpx.Client(timeout=60, auth=auth) as http:
        for _ in range(n):
            t0 = time.perf_counter()
            r = http.post(f"{url}/logs/", json=[_log_record()])
            out.append(time.perf_counter() - t0)
            if r.status_code >= 300:
                raise SystemExit(f"bench: POST {url}/logs/: {r.status_code} {r.text[:300]}")
    return out


def _p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, int(len(xs) * 0.95) - 1)]


def calls(api: str, relay_dir: Path, n: int) -> None:
    key = f"startup-a-bench-{time.time_ns()}"
    # This process plays the job: its request folder is this process's (root's), since the
    # relay reads only files of the folder's owner.
    spool = rl.make_spool(relay_dir, key, rl.Grant(key, "startup-a", "startup-a", "startup-a"),
                          os.getuid(), grp.getgrnam("startup-a").gr_gid)  # fmt: skip
    endpoint = rl.start_endpoint(spool)
    direct: list[float] = []
    relayed: list[float] = []
    try:
        relay_url, auth = f"{endpoint.url}/prefect/api", endpoint.auth  # the job's token
        _calls(api, 5), _calls(relay_url, 5, auth)  # warm both paths
        for i in range(0, n, 10):
            pair = [(direct, api, None), (relayed, relay_url, auth)]
            for into, url, a in pair if (i // 10) % 2 == 0 else pair[::-1]:
                into += _calls(url, min(10, n - i), a)
    finally:
        endpoint.stop()
        rl.remove_spool(spool)
    md, mr = statistics.median(direct), statistics.median(relayed)
    print(f"one Prefect call (POST /api/logs/), {n} of each: direct median {md * 1000:.1f} ms "
          f"(p95 {_p95(direct) * 1000:.1f}), through the relay {mr * 1000:.1f} ms "
          f"(p95 {_p95(relayed) * 1000:.1f}): {mr / md:.2f}x")  # fmt: skip


def _run(args: list[str], env: dict[str, str] | None = None) -> float:
    import os

    t0 = time.monotonic()
    res = subprocess.run([AIF, "run", "--profile", "site", *args], capture_output=True,
                         text=True, timeout=1800, env={**os.environ, **(env or {})})  # fmt: skip
    took = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"bench: aif run {' '.join(args)} failed:\n{res.stdout[-2000:]}"
                         f"\n{res.stderr[-2000:]}")  # fmt: skip
    return took


def pipelines(repeat: int, epochs: int) -> None:
    login: list[float] = []
    alloc: list[float] = []
    _run(["--epochs", str(epochs)])  # ingest and preprocessing into their manifests
    seed = int(time.time())  # a training seed per run: a new run key, so every run trains
    for i in range(repeat):
        order = [(login, []), (alloc, ["--in-allocation"])]
        for into, extra in order if i % 2 == 0 else order[::-1]:
            seed += 1
            took = _run(["--epochs", str(epochs), *extra], {"AIF_TRAINING__SEED": str(seed)})
            into.append(took)
            print(f"  {'in allocation' if extra else 'login side'}: {took:.1f} s")
    ml, ma = statistics.median(login), statistics.median(alloc)
    print(f"aif run --profile site (cached ingest and preprocessing, fresh training): login side "
          f"median {ml:.1f} s, --in-allocation {ma:.1f} s: {ma / ml:.2f}x")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    args = ap.parse_args()
    cfg = load_profile("site")
    if cfg.allocation is None:
        raise SystemExit("bench: the site profile has no allocation section")
    relay_dir = Path(cfg.allocation.relay_dir)
    if not rl.relay_alive(relay_dir):
        raise SystemExit(f"bench: the site's relay does not answer in {relay_dir} (aif site up)")
    calls(cfg.prefect.api_url.rstrip("/"), relay_dir, args.calls)
    if args.repeat > 0:
        pipelines(args.repeat, args.epochs)
    print(json.dumps({"calls": args.calls, "repeat": args.repeat}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
