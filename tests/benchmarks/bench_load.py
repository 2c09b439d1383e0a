"""The control plane at an AI factory's load: the nightly of many start-ups at one minute.

On the site (aif site up): ``--startups`` load-test start-ups, each with what a start-up
has on the site for its nightlies: a Slurm account of its own (fair-share under the
site's multifactor priority), a process work pool of its own with its concurrency limit
(1 flow run at once) and its own worker, and a nightly deployment (concurrency limit 1,
ENQUEUE). The nightly flow (tests/benchmarks/load_flow.py) is pipeline-shaped and small:
four stage subflows, one Slurm job under the start-up's account through the platform's
job layer, log lines and artifacts.

Phase 1: one run of each start-up's nightly, all scheduled at the same minute, as the
scheduler makes them. Phase 2 (``--runs-per-startup``): that many runs of each, at once.
Checked: every run ends Completed, none is lost or duplicated (one run per scheduled
run, one Slurm job per run, of its start-up's account); no start-up ever has two runs at
once (its pool's limit) and no deployment two (its own). Reported: flow runs per minute,
the Prefect API's latency during the burst (a probe reading one flow run every 0.25 s:
p50/p95), and CPU seconds per run of the control plane (Prefect server and PostgreSQL),
the workers and the flow-run processes they start.

    .venv/bin/aif site up
    .venv/bin/python tests/benchmarks/bench_load.py [--startups 50] [--runs-per-startup 10]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from aifactory.infra.site import manager
from aifactory.infra.site import slurm_parts as sp
from aifactory.infra.site.layout import Site
from aifactory.infra.site.manager import site_root
from aifactory.tasks.control.prefect_server import CLIENT_MAX_RETRIES
from aifactory.tasks.control.worker import ensure_work_pool
from aifactory.tasks.core.home import site_dir

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _startups(n: int) -> list[str]:
    return [f"load-{i:02d}" for i in range(1, n + 1)]


def _accounts(site: Site, names: list[str]) -> None:
    """A Slurm account per start-up (fair-share 1 each), root associated with all."""
    for name in names:
        sp.sacctmgr(site, "add", "account", name, f"Description=load test {name}",
                    "Organization=aifactory-load", "Fairshare=1")  # fmt: skip
    sp.sacctmgr(site, "add", "user", "root", f"Account={','.join(names)}")


def _drop_accounts(site: Site, names: list[str]) -> None:
    for args in (["delete", "user", "where", "name=root", f"account={','.join(names)}"],
                 ["delete", "account", "where", f"name={','.join(names)}"]):  # fmt: skip
        subprocess.run(["sacctmgr", "-i", *args], capture_output=True, text=True,
                       env={**os.environ, **site.slurm_env()})  # fmt: skip


def _deployments(api: str, names: list[str]) -> dict[str, str]:
    """Each start-up's pool (limit 1) and nightly deployment; deployment id by start-up."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = {}
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("load-pipeline")
        for name in names:
            ensure_work_pool(api, f"aif-load-{name}", 1)
            out[name] = str(client.create_deployment(
                flow_id=flow_id, name=f"{name}-nightly",
                entrypoint="tests/benchmarks/load_flow.py:load_pipeline",
                work_pool_name=f"aif-load-{name}", parameters={"startup": name},
                pull_steps=pull, concurrency_limit=1,
                concurrency_options=ConcurrencyOptions(
                    collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
                tags=[f"startup:{name}", "project:load"]))  # fmt: skip
    return out


def _drop_deployments(api: str, names: list[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for name in names:
            # Runs an interrupted benchmark left waiting would stay Late for ever.
            left = DeploymentFilter(name=DeploymentFilterName(any_=[f"{name}-nightly"]))
            for fr in client.read_flow_runs(deployment_filter=left, limit=200):
                if fr.state is None or not fr.state.is_final():
                    client.delete_flow_run(fr.id)
            for d in client.read_deployments():
                if d.name == f"{name}-nightly" and d.work_pool_name == f"aif-load-{name}":
                    client.delete_deployment(d.id)
            client.delete_work_pool(f"aif-load-{name}")


def _workers(site: Site, names: list[str], env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    logs = site.logs / "load-workers"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for name in names:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [PREFECT, "worker", "start", "--pool", f"aif-load-{name}", "--type", "process",
                 "--name", f"aif-load-worker-{name}"], env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    return procs


class Probe(threading.Thread):
    """The API's latency as a client sees it: one flow-run read every 0.25 s."""

    def __init__(self, api: str) -> None:
        super().__init__(daemon=True)
        self.api, self.stop, self.lat = api, threading.Event(), []  # type: ignore[var-annotated]

    def run(self) -> None:
        with httpx.Client(timeout=60) as http:
            while not self.stop.is_set():
                t0 = time.perf_counter()
                r = http.post(f"{self.api}/flow_runs/filter", json={"limit": 1})
                if r.status_code < 300:
                    self.lat.append(time.perf_counter() - t0)
                self.stop.wait(0.25)


def _cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and their reaped children."""
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _control_plane(site: Site) -> list[int]:
    state = manager._load(site)
    server = state["prefect"]["pid"]
    pg = [p.pid for p in psutil.process_iter(["username", "name"])
          if p.info["username"] == "postgres"]  # fmt: skip
    return [server, *pg]


def _p(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def _phase(api: str, deps: dict[str, str], per: int, site: Site,
           workers: list[subprocess.Popen[bytes]]) -> dict[str, Any]:  # fmt: skip
    """``per`` runs of every deployment, all due at the same minute; wait for all."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    due = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=5)
    control0 = _cpu(_control_plane(site))
    workers0 = _cpu([w.pid for w in workers])
    probe = Probe(api)
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        made = [client.create_flow_run_from_deployment(dep, state=Scheduled(scheduled_time=due))
                for _ in range(per) for dep in deps.values()]  # fmt: skip
        probe.start()
        ids = [r.id for r in made]
        t0 = time.monotonic()
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            done = [r for r in runs if r.state is not None and r.state.is_final()]
            if len(done) == len(runs) or time.monotonic() - t0 > 3600:
                break
            time.sleep(5)
    probe.stop.set()
    probe.join()
    control = _cpu(_control_plane(site)) - control0
    flows_and_workers = _cpu([w.pid for w in workers]) - workers0
    by_startup: dict[str, list[Any]] = {}
    for r in runs:
        by_startup.setdefault(r.parameters["startup"], []).append(r)
    overlaps = 0
    for rs in by_startup.values():
        spans = sorted((r.start_time, r.end_time) for r in rs if r.start_time and r.end_time)
        overlaps += sum(1 for a, b in itertools.pairwise(spans) if b[0] < a[1])
    states: dict[str, int] = {}
    for r in runs:
        states[r.state.name if r.state else "none"] = states.get(
            r.state.name if r.state else "none", 0) + 1  # fmt: skip
    starts = [r.start_time for r in runs if r.start_time]
    ends = [r.end_time for r in runs if r.end_time]
    span_min = (max(ends) - min(due, *starts)).total_seconds() / 60 if ends else float("nan")
    return {"runs": len(runs), "states": states, "overlaps": overlaps, "span_min": span_min,
            "runs_per_min": len(done) / span_min if span_min else float("nan"),
            "api_p50_ms": _p(probe.lat, 0.5) * 1000, "api_p95_ms": _p(probe.lat, 0.95) * 1000,
            "probes": len(probe.lat), "control_cpu_per_run": control / len(runs),
            "flow_and_worker_cpu_per_run": flows_and_workers / len(runs),
            "ids": [str(i) for i in ids], "startups": sorted(by_startup)}  # fmt: skip


def _top_level_runs(api: str, deployment_ids: list[str]) -> list[str]:
    """Every flow run of these deployments (a duplicate or a stray one would be here)."""
    out: list[str] = []
    offset = 0
    while True:
        query = {"deployments": {"id": {"any_": deployment_ids}}, "limit": 200, "offset": offset}
        r = httpx.post(f"{api}/flow_runs/filter", timeout=120, json=query)
        page = r.json()
        out += [str(x["id"]) for x in page]
        if len(page) < 200:
            return out
        offset += 200


def _slurm_jobs(site: Site, names: list[str], since: str) -> dict[str, list[tuple[str, str]]]:
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-a", "--starttime", since, "--accounts", ",".join(names),
         "--format=JobName,Account,State"], capture_output=True, text=True, check=True,
        env={**os.environ, **site.slurm_env()}).stdout  # fmt: skip
    jobs: dict[str, list[tuple[str, str]]] = {}
    for line in out.splitlines():
        name, account, state = line.split("|")
        if name.startswith("aif-load-"):
            jobs.setdefault(account, []).append((name, state))
    return jobs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--startups", type=int, default=50)
    ap.add_argument("--runs-per-startup", type=int, default=10, help="phase 2 (0: skip it)")
    args = ap.parse_args()
    site = Site(site_root(site_dir()))
    api = site.prefect_api
    if httpx.get(f"{api}/health", timeout=5).text != "true":
        print("the site's Prefect server is not up: `aif site up` first", file=sys.stderr)
        return 2
    names = _startups(args.startups)
    load_dir = Path(tempfile.mkdtemp(prefix="aif-load-", dir=site.root / "runs"))
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_WORKER_QUERY_SECONDS": "2",
           "PREFECT_CLIENT_MAX_RETRIES": CLIENT_MAX_RETRIES, "AIF_LOAD_DIR": str(load_dir),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **site.slurm_env(),
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}  # fmt: skip
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    _accounts(site, names)
    deps = _deployments(api, names)
    workers = _workers(site, names, env)
    results = []
    try:
        time.sleep(10)  # the workers come online
        print(f"{len(names)} start-ups, their workers up ({len(workers)} processes)", flush=True)
        for per in [1] + ([args.runs_per_startup] if args.runs_per_startup else []):
            r = _phase(api, deps, per, site, workers)
            results.append(r)
            print(
                json.dumps(
                    {
                        k: (round(v, 3) if isinstance(v, float) else v)
                        for k, v in r.items()
                        if k not in ("ids", "startups")
                    }
                ),
                flush=True,
            )
        every = _top_level_runs(api, list(deps.values()))
        made_ids = {i for r in results for i in r["ids"]}
        print(f"flow runs of the load deployments: {len(every)} for {len(made_ids)} made; "
              f"none lost or added: {set(every) == made_ids}")  # fmt: skip
        jobs = _slurm_jobs(site, names, since)
        total = sum(r["runs"] for r in results)
        per_account = {a: len(js) for a, js in jobs.items()}
        wrong = [(a, n) for a, js in jobs.items() for n, s in js if s != "COMPLETED"]
        want = {n: sum(1 if i == 0 else args.runs_per_startup for i in range(len(results)))
                for n in names}  # fmt: skip
        print(f"Slurm: {sum(per_account.values())} jobs for {total} runs; every account has "
              f"one per run: {per_account == want}; not COMPLETED: {wrong[:5]}")  # fmt: skip
        share = subprocess.run(["sshare", "-n", "-P", "-a", "-A", ",".join(names[:3]),
                                "--format=Account,User,RawUsage,FairShare"],
                               capture_output=True, text=True,
                               env={**os.environ, **site.slurm_env()}).stdout  # fmt: skip
        print("sshare (first three):", " ; ".join(share.split()))
        for r in results:
            print(f"| {r['runs']} runs of {len(r['startups'])} start-ups at one minute | "
                  f"{r['runs_per_min']:.1f} runs/min ({r['span_min']:.1f} min); API p50 "
                  f"{r['api_p50_ms']:.0f} ms, p95 {r['api_p95_ms']:.0f} ms; CPU per run: "
                  f"control plane {r['control_cpu_per_run']:.2f} s, workers and flow "
                  f"processes {r['flow_and_worker_cpu_per_run']:.2f} s; states "
                  f"{r['states']}; overlaps {r['overlaps']} |")  # fmt: skip
        return 0
    finally:
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, 15)
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.wait(timeout=30)
        _drop_deployments(api, names)
        _drop_accounts(site, names)


if __name__ == "__main__":
    sys.exit(main())
