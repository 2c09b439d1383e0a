"""The ``aif`` command: run the pipeline, manage the local site, check profiles.

Every user-facing failure is one line on stderr, ``aif: error: <what, where, why>``, with a
non-zero exit code (2 for bad configuration, 5 for admission, 6 for tenant isolation, 1
otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any

from aifactory.tasks.core.errors import AifError, ConfigError
from aifactory.tasks.core.tenancy import check_run

DEFAULT_SITE_DIR = ".aif/site"


def _site_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("AIF_SITE_DIR") or DEFAULT_SITE_DIR).resolve()


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if getattr(args, "epochs", None) is not None:
        out["training.epochs"] = args.epochs
    if getattr(args, "steps", None) is not None:  # train-lm: the LM project's job.config
        out["training.config.steps"] = args.steps
    if getattr(args, "rows", None) is not None:
        out["dataspace.generate.rows"] = args.rows
    if getattr(args, "dataspace", None):
        out["dataspace.url"] = args.dataspace
    if getattr(args, "dataset", None) and getattr(args, "command", "") == "ingest":
        out["dataspace.dataset"] = args.dataset
    if getattr(args, "purpose", None):
        out["dataspace.purpose"] = args.purpose
    if getattr(args, "quarantine", False):
        out["dataspace.quarantine"] = True
    return out


def _quiet_prefect_console(verbose: bool) -> None:
    # Prefect's logs still go to the API (the UI); the terminal gets our progress lines.
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL", "CRITICAL")
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _use_prefect(cfg: Any, verbose: bool) -> str:
    """Point this process at the profile's Prefect API (starting the managed local server
    if the profile says so) and keep Prefect's console logs quiet; return the API URL."""
    from aifactory.tasks.doors.prefect_server import resolve_api_url

    api_url = resolve_api_url(cfg.prefect.api_url, cfg.home_dir, cfg.prefect.managed_port)
    os.environ["PREFECT_API_URL"] = api_url
    # Heartbeats from every flow run, not only deployed ones: the server's crash detector
    # (set up by `aif site up`) marks a run whose process was killed Crashed.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    _quiet_prefect_console(verbose)
    return api_url


def _project(args: argparse.Namespace) -> tuple[str | None, str | None, dict[str, Any]]:
    """(project file, its start-up, its overrides) for --project or ./aifactory.yaml."""
    from aifactory.tasks.core.project import find_project, project_overrides

    path = find_project(getattr(args, "project", None))
    if path is None:
        return None, None, {}
    startup, over = project_overrides(path)
    return str(path), startup, over


def _project_and_flags(
    args: argparse.Namespace,
) -> tuple[str | None, str | None, dict[str, Any], dict[str, Any]]:
    """(project file, its start-up, its overrides, the flags' overrides): a project's own
    trainer reads --epochs as its job.config's."""
    overrides = _overrides(args)
    project, own_startup, project_over = _project(args)
    if "training.script" in project_over and "training.epochs" in overrides:
        overrides["training.config.epochs"] = overrides.pop("training.epochs")
    return project, own_startup, project_over, overrides


def cmd_run(args: argparse.Namespace) -> int:
    from aifactory.tasks.core.config import load_profile

    project, own_startup, project_over, overrides = _project_and_flags(args)
    cfg = load_profile(args.profile, {**project_over, **overrides})
    sid, st = cfg.startup(args.startup or own_startup)
    check_run(cfg, sid)  # isolation.* (exit 6): before Prefect, a dry run or any service
    if args.dry_run:
        return dry_run(cfg, sid)
    api_url = _use_prefect(cfg, args.verbose)
    ui = api_url[: -len("/api")] if api_url.endswith("/api") else api_url
    what = f"project {project}, " if project else ""
    print(f"aif run: {what}profile {cfg.name}, start-up {sid} (account {st.account}), "
          f"Prefect {ui}", flush=True)  # fmt: skip

    from aifactory.flows.pipeline import pipeline

    state = pipeline(
        profile=args.profile or cfg.name,
        startup=sid,
        overrides=overrides or None,
        project=project,
        return_state=True,
    )
    run_id = state.state_details.flow_run_id
    print(f"Prefect UI: {ui}/runs/flow-run/{run_id}", flush=True)
    uri = state.result()  # raises the stage's error if the run failed
    print(f"MLflow: {cfg.mlflow.tracking_uri}  (alias {cfg.mlflow.model_name}@candidate)")
    print(uri)
    return 0


def dry_run(cfg: Any, sid: str) -> int:
    """Print what a run would submit (resolved config, job scripts); submit nothing."""
    import json

    from aifactory.tasks.doors.dask_cluster import render_worker_script
    from aifactory.tasks.stages.training import render_sbatch

    _, st = cfg.startup(sid)
    print("# resolved profile (secrets masked)")
    print(json.dumps(cfg.public_dict(), indent=2))
    if cfg.dask.kind == "slurm" and cfg.dask.scheduler == "allocation":
        from aifactory.tasks.doors.dask_allocation import render_allocation_script

        print("\n# Dask allocation job script (scheduler and workers in one Slurm job)")
        print(render_allocation_script(cfg.dask, st.account, "aif-dask-<featureset>",
                                       f"{cfg.runs_dir}/dask/<featureset>/scheduler.json",
                                       f"{cfg.runs_dir}/dask/<featureset>"))  # fmt: skip
    elif cfg.dask.kind == "slurm":
        print("\n# Dask worker job script (one per worker job; the scheduler address is filled "
              "in at run time)")  # fmt: skip
        print(render_worker_script(cfg.dask, st.account, "aif-dask-<featureset>"))
    else:
        print(f"\n# Dask: LocalCluster with {cfg.dask.workers} workers")
    run_dir = f"{cfg.runs_dir}/train/<run-key>"
    print(f"\n# training job script ({cfg.training.executor} executor)")
    print(render_sbatch(cfg.training, account=st.account, job_name="aif-train-<run-key>",
                        run_dir=run_dir, python=sys.executable,
                        featureset_path=f"{run_dir}/featureset.json",
                        config_path=f"{run_dir}/config.json", run_key="<run-key>"))  # fmt: skip
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from aifactory.tasks.core.project import init_project

    dest = Path(args.dir or args.name).resolve()
    files = init_project(args.name, dest, args.startup)
    print(f"created project {args.name} in {dest}:")
    for f in files:
        print(f"  {f.relative_to(dest)}")
    print(f"next: cd {shlex.quote(str(dest))} && aif run")
    return 0


def cmd_train_lm(args: argparse.Namespace) -> int:
    """A thin alias: `aif run` of the bundled tourism-lm project (examples/tourism-lm), the
    reference language model trained, registered and documented like any project's."""
    from aifactory.tasks.core.project import EXAMPLES

    args.project = str(EXAMPLES / "tourism-lm")
    args.dataspace, args.dry_run = args.data, False
    return cmd_run(args)


def cmd_deploy(args: argparse.Namespace) -> int:
    from aifactory.deployments.deploy import deploy_all, ensure_automations, webhook_url
    from aifactory.tasks.core.config import load_profile

    project, _, _ = _project(args)
    if project:  # the project's own nightly deployment, pinned to its current commit
        from aifactory.deployments.deploy import deploy_project, project_source
        from aifactory.tasks.core.project import load_project

        proj = load_project(project)
        src = project_source(Path(project))  # before any server: refuse a dirty tree first
        cfg = load_profile(args.profile or proj.deploy.profile)
        name = deploy_project(Path(project), _use_prefect(cfg, args.verbose), src=src)
        when = f"{proj.deploy.schedule or 'none'} {proj.deploy.timezone}"
        print(f"deployment {name}: {src['repository']} at {src['commit']}, project "
              f"{src['project']}, start-up {proj.startup}, schedule {when}, "
              "concurrency 1")  # fmt: skip
        return 0
    cfg = load_profile(args.profile or "site")
    api_url = _use_prefect(cfg, args.verbose)
    deploy_all(api_url)
    made = ensure_automations(None if args.no_notifications
                              else webhook_url(cfg.notifications.webhook))  # fmt: skip
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for d in sorted(client.read_deployments(), key=lambda d: d.name):
            when = "; ".join(
                f"{getattr(s.schedule, 'cron', s.schedule)} {getattr(s.schedule, 'timezone', '')}"
                for s in d.schedules
            )
            limit = d.global_concurrency_limit.limit if d.global_concurrency_limit else "none"
            print(f"deployment {d.name}: pool {d.work_pool_name}, schedule {when or 'none'}, "
                  f"concurrency {limit}, parameters {d.parameters}")  # fmt: skip
    print(f"automations: {', '.join(made)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.jobs.usage import collect, owners, priced_rows

    cfg = load_profile(args.profile)
    # The project of each account comes from the profile's start-ups.
    who_owns = owners(dict([cfg.startup(args.startup)]) if args.startup else cfg.startups)
    accounts = list(who_owns) if args.startup else None
    usages = collect(cfg.slurm_client(), args.since, accounts)
    rows = priced_rows(usages, args.gpu_rate, args.cpu_rate, args.cloud_gpu_rate, who_owns)
    cols = ["startup", "project", "account", "jobs", "cpu_hours", "gpu_hours", "hpc_cost_eur",
            "cloud_gpu_cost_eur"]  # fmt: skip
    print(f"usage since {args.since} per start-up and project (rates per hour: HPC GPU "
          f"{args.gpu_rate}, HPC CPU {args.cpu_rate}, cloud GPU {args.cloud_gpu_rate} "
          "EUR)")  # fmt: skip
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) if rows else len(c) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    if not any(int(r["jobs"]) for r in rows):
        print("(no jobs in this period)")
    if args.artifact:
        _use_prefect(cfg, args.verbose)
        from prefect.artifacts import create_table_artifact

        who = args.startup or "all start-ups"
        artifact_id = create_table_artifact(
            key="usage-report", table=rows or [{"account": "(no jobs)"}],
            description=f"GPU and CPU hours per start-up and project ({who}) since "
            f"{args.since}: HPC at "
            f"{args.gpu_rate} EUR/GPU-h and {args.cpu_rate} EUR/CPU-h, cloud GPU list price "
            f"{args.cloud_gpu_rate} EUR/GPU-h",
        )  # fmt: skip
        print(f"Prefect artifact usage-report: {artifact_id}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Ingest one catalog dataset into a lake snapshot (the pipeline's first stage alone)."""
    from aifactory.tasks.core.config import load_profile

    overrides = _overrides(args)
    cfg = load_profile(args.profile, overrides)
    sid, _ = cfg.startup(args.startup)
    cfg.dataset_entry()  # an unknown dataset fails here, before any service is touched
    check_run(cfg, sid)  # isolation.* (exit 6)
    api_url = _use_prefect(cfg, args.verbose)
    from aifactory.flows.ingest import ingest_flow

    state = ingest_flow(profile=args.profile or cfg.name, startup=sid,
                        overrides=overrides or None, return_state=True)  # fmt: skip
    ui = api_url[: -len("/api")] if api_url.endswith("/api") else api_url
    print(f"Prefect UI: {ui}/runs/flow-run/{state.state_details.flow_run_id}", flush=True)
    snap = state.result()
    q = f", {len(snap.quarantined)} quarantined" if snap.quarantined else ""
    print(f"snapshot {snap.snapshot_id} of {snap.dataset}: {len(snap.objects)} objects, "
          f"{snap.rows} rows ({len(snap.objects_read)} objects read{q})")  # fmt: skip
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from aifactory.tasks.data.catalog import catalog_at, load_catalog

    if args.action == "validate":
        if not args.arg:
            raise ConfigError("aif catalog validate: give the catalog file to check")
        cat = load_catalog(args.arg)
        print(f"catalog {args.arg}: valid ({len(cat.datasets)} datasets: "
              f"{', '.join(d.id for d in cat.datasets)})")  # fmt: skip
        return 0
    path = args.catalog
    if path is None and args.profile:
        from aifactory.tasks.core.config import load_profile

        path = load_profile(args.profile).dataspace.catalog
    cat = catalog_at(path)
    if args.action == "ls":
        print(f"{'dataset':<22}{'data space':<13}{'format':<9}{'license':<20}{'valid until':<13}"
              f"{'personal data':<15}publisher")  # fmt: skip
        for d in cat.datasets:
            pd = str(len(d.policy.personal_data)) + " column(s)" if d.policy.personal_data else "-"
            print(f"{d.id:<22}{d.data_space:<13}{d.distribution.format:<9}{d.license[:19]:<20}"
                  f"{d.policy.valid_until.isoformat():<13}{pd:<15}{d.publisher}")  # fmt: skip
        return 0
    if not args.arg:
        raise ConfigError("aif catalog show: give a dataset id (aif catalog ls lists them)")
    import yaml

    print(yaml.safe_dump(cat.get(args.arg).public(), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A hyperparameter search as one job array; prints the best trial."""
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.jobs.admission import admit_declaration
    from aifactory.tasks.stages.sweep import grid_trials, parse_value, random_trials

    _, own_startup, project_over, flags = _project_and_flags(args)
    overrides = {**project_over, **flags}
    cfg = load_profile(args.profile or "site", overrides)
    sid, st = cfg.startup(args.startup or own_startup)
    check_run(cfg, sid)  # isolation.* (exit 6)
    admit_declaration(sid, st, "sweep")  # admission.declaration (exit 5): nothing submitted
    own = bool(cfg.training.script)
    grid: dict[str, list[Any]] = {}
    for item in args.grid or []:
        name, _, values = item.partition("=")
        if not values:
            raise ConfigError(f"aif sweep: --grid {item!r}: give NAME=V1,V2,...")
        grid[name] = [parse_value(name, v, own) for v in values.split(",")]
    trials = grid_trials(grid, own) if grid else []
    if args.random:
        space: dict[str, tuple[float, float]] = {}
        for item in args.space or ["lr=0.0003:0.01"]:
            name, _, rng = item.partition("=")
            lo, _, hi = rng.partition(":")
            try:
                space[name] = (float(lo), float(hi))
            except ValueError:
                raise ConfigError(f"aif sweep: --space {item!r}: give NAME=LOW:HIGH") from None
        trials += random_trials(space, args.random, args.seed)
    if not trials:
        raise ConfigError("aif sweep: no trials: give --grid NAME=V1,V2 and/or --random N")
    if args.max_parallel < 1:
        raise ConfigError(f"aif sweep: --max-parallel {args.max_parallel}: at least 1")
    _use_prefect(cfg, args.verbose)
    from aifactory.flows.sweep import sweep_flow

    record = sweep_flow(
        profile=args.profile or "site", startup=sid, overrides=overrides or None,
        trials=trials, max_parallel=args.max_parallel, metric=args.metric,
    )  # fmt: skip
    best, metric = record["best"], record["metric"]
    print(f"best trial {best['trial']} of {len(record['trials'])}: {metric}="
          f"{best[metric]:.4f} {json.dumps(best['params'])} (job array "
          f"{record['job_array']}, {record['sweep_dir']})")  # fmt: skip
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    """Rebuild a registered model from its record; MATCH when the weights are identical."""
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.stages.replay import replay

    cfg = load_profile(args.profile)
    result = replay(args.uri, cfg, allow_dirty=args.allow_dirty,
                    log=lambda m: print(f"  [replay] {m}", flush=True))  # fmt: skip
    print(result.line(), flush=True)
    return 0 if result.match else 1


def cmd_snapshot(args: argparse.Namespace) -> int:
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.stages.ingest import list_snapshots, load_snapshot

    cfg = load_profile(args.profile)
    dataset = args.dataset or cfg.dataspace.dataset
    lake = cfg.lake_url_for(args.startup)  # the start-up's own prefix of the lake
    so = cfg.storage_options(lake)
    if args.action == "ls":
        snaps = list_snapshots(lake, dataset, so)
        print(f"{'snapshot':<18}{'created':<22}{'objects':>8}{'rows':>12}{'bytes':>14}"
              f"{'quarantined':>12}  start-up / purpose")  # fmt: skip
        for sn in snaps:
            print(f"{sn.snapshot_id:<18}{sn.created_at:<22}{len(sn.objects):>8}{sn.rows:>12}"
                  f"{sn.bytes:>14}{len(sn.quarantined):>12}  "
                  f"{sn.startup} / {sn.purpose}")  # fmt: skip
        if not snaps:
            print(f"(no committed snapshot of {dataset} in {lake})")
        return 0
    if not args.id:
        raise ConfigError("aif snapshot show: give a snapshot id (aif snapshot ls lists them)")
    print(load_snapshot(lake, dataset, args.id, so).to_json())
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.models.promotion import promote, rollback

    _, _, project_over = _project(args)
    cfg = load_profile(args.profile, project_over)
    name, uri = cfg.mlflow.model_name, cfg.mlflow.tracking_uri
    if args.action == "rollback":
        old, new = rollback(uri, name)
        print(f"champion: {name} version {old} -> {new}")
        return 0
    spec = cfg.promotion.model_copy(
        update={
            k: v for k, v in (("metric", args.metric), ("margin", args.margin)) if v is not None
        }
    )

    _use_prefect(cfg, args.verbose)  # the promotion event goes to the profile's Prefect
    d = promote(uri, name, version=args.version, spec=spec, approved=cfg.declaration_approved,
                risk_class=cfg.risk_class, approved_by=args.approved_by)  # fmt: skip
    verdict = "promoted to champion" if d.promoted else "not promoted"
    print(f"{name} version {d.candidate}: {verdict} ({d.reason})")
    for what, ok, detail in d.checks:
        print(f"  check {'pass' if ok else 'FAIL'}: {what} ({detail})")
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from aifactory.infra.site import manager

    site_dir = _site_dir(args.dir)
    if args.action == "up":
        parts = manager.up(site_dir)
        _print_parts(parts)
        return 0
    if args.action == "status":
        parts = manager.status(site_dir)
        _print_parts(parts)
        return 0 if parts and all(p.healthy for p in parts) else 1
    if args.action == "env":
        for line in manager.env_lines(site_dir):
            print(line)
        return 0
    if args.action == "down":
        stopped = manager.down(site_dir)
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    raise AifError(f"unknown site action {args.action!r}")


def cmd_server(args: argparse.Namespace) -> int:
    """The local Prefect server this home manages (profile ``prefect.api_url: managed``)."""
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.doors import prefect_server as ps

    cfg = load_profile(args.profile)
    if cfg.prefect.api_url != "managed":
        raise ConfigError(f"profile {cfg.name}: prefect.api_url is {cfg.prefect.api_url}, "
                          "not a server aif manages (nothing to start or stop)")  # fmt: skip
    where = ps.state_dir(cfg.home_dir)
    if args.action == "start":
        print(ps.ensure_managed_server(cfg.home_dir, cfg.prefect.managed_port))
        return 0
    if args.action == "stop":
        done = ps.stop_managed_server(cfg.home_dir)
        print(f"stopped the local Prefect server of {where}" if done
              else f"no local Prefect server of {where} was running")  # fmt: skip
        return 0
    rec = ps.running(cfg.home_dir)
    if rec:
        print(f"running: {rec['api_url']} (pid {rec['pid']}, state in {where})")
        return 0
    print(f"not running (state in {where}; `aif run` starts it)")
    return 1


def _print_parts(parts: list[Any]) -> None:
    for p in parts:
        mark = "ok  " if p.healthy else "DOWN"
        pid = f"pid {p.pid}" if p.pid else ""
        print(f"{mark} {p.name:<12} {p.address:<32} {pid:<10} {p.detail}".rstrip())


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    from aifactory.tasks.core.config import load_profile

    cfg = load_profile(args.profile)
    if args.action == "show":
        print(json.dumps(cfg.public_dict(), indent=2))
    else:
        print(f"profile {args.profile}: ok ({cfg.name}, {len(cfg.startups)} start-ups)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aif", description=__doc__.splitlines()[0])
    p.add_argument("--verbose", "-v", action="store_true", help="full logs and tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the whole pipeline: ingest, preprocess, train, register")
    r.add_argument("--profile", default=None, help="local (default), site, or a YAML file")
    r.add_argument("--startup", default=None,
                   help="start-up id (default: the project's, else the profile's)")  # fmt: skip
    r.add_argument("--project", default=None,
                   help="a project folder or file (default: ./aifactory.yaml if any)")  # fmt: skip
    r.add_argument("--epochs", type=int, default=None,
                   help="override training.epochs (a project's: train.config.epochs)")  # fmt: skip
    r.add_argument("--rows", type=int, default=None, help="rows to generate if seeding")
    r.add_argument("--dataspace", default=None, help="override the dataset's URL")
    r.add_argument("--purpose", default=None, help="declared purpose (default: the start-up's)")
    r.add_argument("--quarantine", action="store_true",
                   help="commit the good objects and list bad ones (default: strict)")  # fmt: skip
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved config and the job scripts; submit nothing",
    )
    r.set_defaults(func=cmd_run)

    ini = sub.add_parser("init", help="start a project of your own: data set, features, "
                         "trainer, model and nightly deployment, in a new folder")  # fmt: skip
    ini.add_argument("name", help="project and model name (lower-case letters, digits, -)")
    ini.add_argument("--dir", default=None, help="folder to create (default: ./NAME)")
    ini.add_argument("--startup", default=None, help="whose project (default: startup-b)")
    ini.set_defaults(func=cmd_init)

    lm = sub.add_parser("train-lm", help="train and register the reference causal LM on the "
                        "tourism reviews (aif run of examples/tourism-lm)")  # fmt: skip
    lm.add_argument("--profile", default=None, help="local (default), site, or a YAML file")
    lm.add_argument("--startup", default=None)
    lm.add_argument("--data", default=None, help="text dataset URL (default: tourism reviews)")
    lm.add_argument("--steps", type=int, default=None,
                    help="training steps (default: the project's train.config.steps)")  # fmt: skip
    lm.set_defaults(func=cmd_train_lm)

    ig = sub.add_parser("ingest", help="snapshot one catalog dataset into the lake")
    ig.add_argument("dataset", nargs="?", default=None, help="catalog id (default: the profile's)")
    ig.add_argument("--profile", default=None, help="local (default), site, or a YAML file")
    ig.add_argument("--startup", default=None, help="start-up id (default: the profile's)")
    ig.add_argument("--purpose", default=None, help="declared purpose (default: the start-up's)")
    ig.add_argument("--dataspace", default=None, help="override the dataset's URL or glob")
    ig.add_argument("--rows", type=int, default=None, help="rows to generate if seeding")
    ig.add_argument("--quarantine", action="store_true",
                    help="commit the good objects and list bad ones (default: strict)")  # fmt: skip
    ig.set_defaults(func=cmd_ingest)

    ct = sub.add_parser("catalog", help="the data-space catalog: datasets, contracts, policies")
    ct.add_argument("action", choices=["ls", "show", "validate"])
    ct.add_argument("arg", nargs="?", help="dataset id (show) or catalog file (validate)")
    ct.add_argument("--catalog", default=None, help="catalog file (default: the shipped one)")
    ct.add_argument("--profile", default=None, help="use this profile's catalog")
    ct.set_defaults(func=cmd_catalog)

    dp = sub.add_parser("deploy", help="deploy the nightly pipelines (deployments/prefect.yaml), "
                        "the crashed-run detector and notifications")  # fmt: skip
    dp.add_argument("--profile", default=None, help="default: site (a project's deploy.profile)")
    dp.add_argument("--project", default=None,
                    help="deploy this project (default: ./aifactory.yaml if any) at its "
                    "current git commit instead of the platform's deployments")  # fmt: skip
    dp.add_argument("--no-notifications", action="store_true",
                    help="do not create the webhook notifications")  # fmt: skip
    dp.set_defaults(func=cmd_deploy)

    sw = sub.add_parser("sweep", help="hyperparameter search as one job array")
    sw.add_argument("--profile", default=None, help="default: site")
    sw.add_argument("--startup", default=None)
    sw.add_argument("--project", default=None,
                    help="a project folder or file (default: ./aifactory.yaml if any)")  # fmt: skip
    sw.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                    help="grid values (lr, batch_size, hidden as 64x32, epochs, seed; a "
                         "project's: any train.config key)")  # fmt: skip
    sw.add_argument("--random", type=int, default=0, metavar="N", help="N random trials")
    sw.add_argument("--space", action="append", metavar="NAME=LOW:HIGH",
                    help="random-search range (lr log-uniform; batch_size, epochs)")  # fmt: skip
    sw.add_argument("--seed", type=int, default=0, help="random-search seed")
    sw.add_argument("--max-parallel", type=int, default=2, help="array tasks running at once")
    sw.add_argument("--metric", default=None,
                    help="metric to compare (default: val_rmse, lower is better; a "
                         "project's: its model.metric and direction)")  # fmt: skip
    sw.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    sw.set_defaults(func=cmd_sweep)

    rl = sub.add_parser("replay", help="rebuild a registered model and compare its weights")
    rl.add_argument("uri", help="models:/NAME/VERSION")
    rl.add_argument("--profile", default=None, help="where the registry and lake are")
    rl.add_argument("--allow-dirty", action="store_true",
                    help="replay with uncommitted changes in the working tree")  # fmt: skip
    rl.set_defaults(func=cmd_replay)

    sn = sub.add_parser("snapshot", help="committed data snapshots in the lake")
    sn.add_argument("action", choices=["ls", "show"])
    sn.add_argument("id", nargs="?", help="snapshot id (for show)")
    sn.add_argument("--profile", default=None)
    sn.add_argument("--startup", default=None, help="whose lake prefix (default: the profile's)")
    sn.add_argument("--dataset", default=None, help="default: the profile's dataset")
    sn.set_defaults(func=cmd_snapshot)

    md = sub.add_parser("model", help="promote the candidate to champion, or roll back")
    md.add_argument("action", choices=["promote", "rollback"])
    md.add_argument("--profile", default=None)
    md.add_argument("--version", default=None, help="default: the 'candidate' alias")
    md.add_argument("--project", default=None,
                    help="a project folder or file (default: ./aifactory.yaml if any)")  # fmt: skip
    md.add_argument("--approved-by", default=None, metavar="NAME",
                    help="who approves (required for a high-risk start-up's model)")  # fmt: skip
    md.add_argument("--metric", default=None,
                    help="held-out metric (default: the profile's promotion.metric)")  # fmt: skip
    md.add_argument("--margin", type=float, default=None,
                    help="relative improvement needed over the champion (0.02 = 2%%; default: "
                    "the profile's promotion.margin)")  # fmt: skip
    md.set_defaults(func=cmd_model)

    from aifactory.tasks.jobs.usage import CLOUD_GPU_RATE, HPC_CPU_RATE, HPC_GPU_RATE

    rp = sub.add_parser("report", help="reports from Slurm accounting")
    rp.add_argument("what", choices=["usage"])
    rp.add_argument("--profile", default=None)
    rp.add_argument("--startup", default=None, help="one start-up (default: all accounts)")
    rp.add_argument("--since", default="now-30days", help="sacct --starttime (default 30 days)")
    rp.add_argument("--gpu-rate", type=float, default=HPC_GPU_RATE, help="HPC EUR per GPU-hour")
    rp.add_argument("--cpu-rate", type=float, default=HPC_CPU_RATE, help="HPC EUR per CPU-hour")
    rp.add_argument(
        "--cloud-gpu-rate",
        type=float,
        default=CLOUD_GPU_RATE,
        help="cloud list price, EUR per GPU-hour, for comparison",
    )
    rp.add_argument("--no-artifact", dest="artifact", action="store_false",
                    help="do not publish the table as Prefect artifact usage-report")  # fmt: skip
    rp.set_defaults(func=cmd_report)

    s = sub.add_parser("site", help="the local AI-factory site (Slurm, S3, Prefect, MLflow)")
    s.add_argument("action", choices=["up", "status", "env", "down"])
    s.add_argument("--dir", default=None, help=f"state folder (default {DEFAULT_SITE_DIR})")
    s.set_defaults(func=cmd_site)

    sv = sub.add_parser("server", help="the local Prefect server this home manages "
                        "(profile local): status, start, stop")  # fmt: skip
    sv.add_argument("action", choices=["status", "start", "stop"])
    sv.add_argument("--profile", default=None, help="local (default) or a YAML file")
    sv.set_defaults(func=cmd_server)

    pr = sub.add_parser("profile", help="check or show a profile")
    pr.add_argument("action", choices=["validate", "show"])
    pr.add_argument("profile", help="profile name or YAML file")
    pr.set_defaults(func=cmd_profile)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = args.verbose or getattr(args, "verbose_sub", False)
    try:
        return int(args.func(args))
    except AifError as err:
        if verbose:
            traceback.print_exc()
        print(f"aif: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("aif: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure still gets one line
        if type(err).__name__ == "UnfinishedRun" and "CANCEL" in str(err):
            # Prefect's "Run is in CANCELLING state, its result is not available".
            print("aif: error: the run was cancelled (in the Prefect UI or API); every Slurm "
                  "job it had started was cancelled with it", file=sys.stderr)  # fmt: skip
            return 130
        if verbose:
            traceback.print_exc()
        msg = " ".join(str(err).split()) or "no message"
        print(f"aif: error: {type(err).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
