"""Retention: the Prefect database stays bounded over many nightly cycles.

A Prefect server of the site's version, on a database of its own in the site's PostgreSQL
(aif site up), with the retention the site profile sets through ``prefect.retention``
(here ``--keep-days`` for both flow runs and events) and Prefect's own database-vacuum
service looking every few seconds. Each cycle is one night: ``--runs`` pipeline-shaped
flow runs (a top-level run, four stage subflows, two tasks each, log lines, a markdown and
a table artifact per stage, their events). Then the night is over: every time stamp in
the database moves one day into the past (the benchmark's clock; Prefect cannot be told
to run a night in seconds), the vacuum service gets two of its rounds, and PostgreSQL's
own VACUUM (what autovacuum does in its time) makes the freed space reusable.

Printed per cycle: rows made so far, rows kept, the database's size. Once past the
retention window the rows kept and the size stay flat: the ratio of the last cycle's size
to the size at the first cycle past the window is the figure (1.0 = bounded); rows made
grow with every cycle.

    .venv/bin/aif site up
    .venv/bin/python tests/benchmarks/bench_retention.py [--cycles 10] [--runs 6] [--keep-days 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from aifactory.infra.site import postgres
from aifactory.infra.site.layout import Site
from aifactory.infra.site.manager import site_root
from aifactory.tasks.core.config import RetentionSpec
from aifactory.tasks.core.home import site_dir

DB = "prefect_bench_retention"
AGED = {  # the tables whose rows carry time stamps that the vacuum service compares
    "flow_run", "task_run", "flow_run_state", "task_run_state", "log", "artifact",
    "artifact_collection", "events", "event_resources",
}  # fmt: skip
COUNTED = ("flow_run", "task_run", "log", "artifact", "events", "event_resources")

FLOWS = """
import sys
from prefect import flow, task, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

@task
def step(stage, i):
    for n in range(5):
        get_run_logger().info(f"{stage} step {i}: line {n}")
    return i

def stage_flow(stage):
    @flow(name=stage, flow_run_name=f"bench {stage}")
    def run():
        total = sum(step(stage, i) for i in range(2))
        create_markdown_artifact(key=f"bench-{stage}-summary", markdown=f"# {stage}\\n" * 20)
        create_table_artifact(key=f"bench-{stage}-table", table=[{"i": i} for i in range(20)])
        return total
    return run

STAGES = [stage_flow(s) for s in ("ingest", "preprocess", "train", "register")]

@flow(name="bench-pipeline")
def pipeline(night: int):
    get_run_logger().info(f"night {night}")
    return [s() for s in STAGES]

if __name__ == "__main__":
    night, runs = int(sys.argv[1]), int(sys.argv[2])
    for _ in range(runs):
        pipeline(night)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine(site: Site) -> sa.Engine:
    return sa.create_engine(postgres.url(site, postgres.SUPERUSER, DB),
                            connect_args={"password": postgres.password(site, postgres.SUPERUSER)},
                            isolation_level="AUTOCOMMIT")  # fmt: skip


def _counts(eng: sa.Engine) -> dict[str, int]:
    with eng.connect() as c:
        return {t: int(c.execute(sa.text(f'SELECT count(*) FROM "{t}"')).scalar() or 0)
                for t in COUNTED}  # fmt: skip


def _size_mb(eng: sa.Engine) -> float:
    with eng.connect() as c:
        c.execute(sa.text("VACUUM"))
        return float(c.execute(sa.text(f"SELECT pg_database_size('{DB}')")).scalar() or 0) / 1e6


def _age_one_day(eng: sa.Engine) -> None:
    """The night is over: every time stamp moves a day into the past."""
    with eng.begin() as c:
        cols = c.execute(sa.text(
            "SELECT table_name, column_name FROM information_schema.columns WHERE "
            "table_schema = 'public' AND data_type LIKE 'timestamp%'")).all()  # fmt: skip
        by_table: dict[str, list[str]] = {}
        for table, col in cols:
            if table in AGED:
                by_table.setdefault(table, []).append(col)
        for table, names in by_table.items():
            sets = ", ".join(f'"{n}" = "{n}" - interval \'1 day\'' for n in names)
            c.execute(sa.text(f'UPDATE "{table}" SET {sets}'))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--runs", type=int, default=6, help="pipeline runs per night")
    ap.add_argument("--keep-days", type=float, default=3)
    ap.add_argument("--vacuum-every", type=float, default=3.0, help="seconds")
    args = ap.parse_args()
    site = Site(site_root(site_dir()), pg_port=5433)
    if not postgres.ok(site):
        print("the site's PostgreSQL is not running: `aif site up` first", file=sys.stderr)
        return 2
    admin = sa.create_engine(postgres.url(site, postgres.SUPERUSER, "postgres"),
                             connect_args={"password": postgres.password(site, postgres.SUPERUSER)},
                             isolation_level="AUTOCOMMIT")  # fmt: skip
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)'))
        c.execute(sa.text(f'CREATE DATABASE "{DB}" OWNER prefect'))
    port = _free_port()
    home = Path(tempfile.mkdtemp(prefix="aif-bench-retention-"))
    (home / "flows.py").write_text(FLOWS)
    api = f"http://127.0.0.1:{port}/api"
    keep = RetentionSpec(flow_runs_days=args.keep_days, events_days=args.keep_days,
                         vacuum_every_s=args.vacuum_every)  # fmt: skip
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": postgres.url(
               site, "prefect", DB, driver="asyncpg"),
           **postgres.env(site), **keep.server_env(),
           # The orphans' round (daily on the site) once a simulated night, like the rest.
           "PREFECT_SERVER_SERVICES_DB_VACUUM_ORPHAN_CLEANUP_LOOP_SECONDS":
               str(args.vacuum_every)}  # fmt: skip
    prefect = str(Path(sys.executable).with_name("prefect"))
    with open(home / "server.log", "wb") as log:
        server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port",
                                   str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        import httpx

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{api}/health", timeout=2).text == "true":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            print(f"the bench server did not start: {home / 'server.log'}", file=sys.stderr)
            return 1
        eng = _engine(site)
        made = {t: 0 for t in COUNTED}
        sizes: list[float] = []
        made_at: list[int] = []
        print(f"retention {args.keep_days:g} days, {args.runs} pipeline runs a night; "
              "per night: rows made so far / rows kept, database size")  # fmt: skip
        for night in range(1, args.cycles + 1):
            before = _counts(eng)
            t0 = time.monotonic()
            flows_env = {k: v for k, v in env.items() if k != "PREFECT_LOGGING_LEVEL"}
            subprocess.run([sys.executable, str(home / "flows.py"), str(night), str(args.runs)],
                           env=flows_env, check=True, capture_output=True)  # fmt: skip
            took = time.monotonic() - t0
            after = _counts(eng)
            for t in COUNTED:
                made[t] += after[t] - before[t]
            _age_one_day(eng)
            time.sleep(args.vacuum_every * 2 + 2)  # two rounds of Prefect's vacuum service
            kept = _counts(eng)
            sizes.append(_size_mb(eng))
            made_at.append(made["flow_run"])
            print(f"night {night:2d} ({took:4.1f} s): flow runs {made['flow_run']}/"
                  f"{kept['flow_run']}, task runs {made['task_run']}/{kept['task_run']}, "
                  f"logs {made['log']}/{kept['log']}, artifacts {made['artifact']}/"
                  f"{kept['artifact']}, events {made['events']}/{kept['events']}; "
                  f"{sizes[-1]:.1f} MB", flush=True)  # fmt: skip
        window = int(args.keep_days) + 1  # the first night whose oldest night is gone
        if args.cycles > window:
            first = sizes[window - 1]
            print(f"database size: night {window} {first:.1f} MB, night {args.cycles} "
                  f"{sizes[-1]:.1f} MB: **{sizes[-1] / first:.2f}x** over "
                  f"{args.cycles - window} more nights, while the flow runs made grew from "
                  f"{made_at[window - 1]} to {made['flow_run']} "
                  f"({made['flow_run'] / made_at[window - 1]:.1f}x)")  # fmt: skip
        return 0
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)'))


if __name__ == "__main__":
    sys.exit(main())
