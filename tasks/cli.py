"""The ``aif`` command: run the pipeline, see its runs and logs, manage the local site.

Every user-facing failure is one line on stderr, ``aif: error: <what, where, why>``, with a
non-zero exit code (2 for bad configuration or usage, 5 for admission, 6 for tenant
isolation, 130 when interrupted, 1 otherwise). Listings print a table, or JSON with
``--json``. ``-v`` (before or after the command) prints full logs and tracebacks.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aifactory.tasks.core.errors import AifError, ConfigError
from aifactory.tasks.core.tenancy import check_run


class _State:
    verbose = False


_STATE = _State()

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", "-p", metavar="PROFILE",
                 help="local, site or a YAML file (default: $AIF_PROFILE, else local)"),
]  # fmt: skip
StartupOpt = Annotated[
    str | None,
    typer.Option("--startup", metavar="ID",
                 help="start-up id (default: the project's, else the profile's)"),
]  # fmt: skip
ProjectOpt = Annotated[
    str | None,
    typer.Option("--project", metavar="DIR",
                 help="a project folder or file (default: ./aifactory.yaml if any)"),
]  # fmt: skip
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="full logs and tracebacks")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
EpochsOpt = Annotated[
    int | None,
    typer.Option("--epochs", min=1, help="override training.epochs (a project's own trainer: "
                 "its train.config.epochs)"),
]  # fmt: skip
RowsOpt = Annotated[
    int | None,
    typer.Option("--rows", min=1, help="rows to generate when seeding the demo data space "
                 "(refused when the data space already has objects)"),
]  # fmt: skip
DataspaceOpt = Annotated[
    str | None,
    typer.Option("--dataspace", metavar="URL",
                 help="read the dataset from this URL or folder instead (never seeded unless "
                 "--seed-demo-data)"),
]  # fmt: skip
SeedOpt = Annotated[
    bool,
    typer.Option("--seed-demo-data", help="fill an empty data space with the catalog's "
                 "synthetic demo objects (default: only the profile's own demo data space)"),
]  # fmt: skip
PurposeOpt = Annotated[
    str | None, typer.Option("--purpose", help="declared purpose (default: the start-up's)")
]
QuarantineOpt = Annotated[
    bool,
    typer.Option("--quarantine",
                 help="commit the good objects and list bad ones (default: strict)"),
]  # fmt: skip

app = typer.Typer(
    name="aif", help=__doc__.splitlines()[0], no_args_is_help=True, add_completion=True,
    pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)  # fmt: skip


def _sub(name: str, help: str) -> typer.Typer:
    sub = typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(sub, name=name)
    return sub


site_app = _sub("site", "the local AI-factory site (Slurm, S3, Prefect, MLflow)")
server_app = _sub("server", "the local Prefect server (and worker) of this home: status, "
                  "start, stop")  # fmt: skip
catalog_app = _sub("catalog", "the data-space catalog: datasets, contracts, policies")
snapshot_app = _sub("snapshot", "committed data snapshots in the lake")
model_app = _sub("model", "promote the candidate to champion, or roll back")
report_app = _sub("report", "reports from Slurm accounting")
profile_app = _sub("profile", "check or show a profile")
runs_app = _sub("runs", "a start-up's runs, as the Prefect server knows them")


@app.callback()
def _root(verbose: VerboseOpt = False) -> None:
    """Orchestration for AI-factory pipelines: data space to trained, registered model."""
    _verbose(verbose)


def _verbose(flag: bool) -> bool:
    _STATE.verbose = _STATE.verbose or flag
    return _STATE.verbose


# ---------------------------------------------------------------- output helpers


def _console() -> Console:
    # Off a terminal (a pipe, a test) tables are never wrapped or cut at 80 columns.
    tty = sys.stdout.isatty()
    return Console(highlight=False, width=None if tty else 1000, soft_wrap=not tty)


def _table(columns: list[str], rows: list[dict[str, Any]], right: tuple[str, ...] = ()) -> None:
    """A plain table: a header line, then one line per row, columns two spaces apart."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for i, c in enumerate(columns):
        # On a narrow terminal long cells fold onto more lines; the first (the id) never.
        widest = max([len(c), *(len(str(r.get(c, ""))) for r in rows)]) if i == 0 else None
        table.add_column(c, justify="right" if c in right else "left", min_width=widest,
                         no_wrap=i == 0, overflow="fold")  # fmt: skip
    for r in rows:
        table.add_row(*(Text(str(r.get(c, ""))) for c in columns))
    _console().print(table)


def _json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _strip_api(api_url: str) -> str:
    return api_url[: -len("/api")] if api_url.endswith("/api") else api_url


# ---------------------------------------------------------------- profile and inputs


def _load(profile: str | None, overrides: dict[str, Any] | None = None,
          origins: dict[str, str] | None = None) -> Any:  # fmt: skip
    from aifactory.tasks.core.config import load_profile

    cfg = load_profile(profile, overrides, origins=origins or {})
    _stray_state_hint(cfg)
    return cfg


_HINTED: set[str] = set()


def _stray_state_hint(cfg: Any) -> None:
    """Once per process, with the default home only: a ``.aif`` of an older version in this
    folder (where state used to live) is not the home."""
    from aifactory.tasks.core.home import stray_state_hint

    if os.environ.get("AIF_HOME"):
        return  # a home chosen on purpose
    note = stray_state_hint(Path.cwd(), Path(cfg.home_dir))
    if note and note not in _HINTED:
        _HINTED.add(note)
        print(f"aif: {note}", file=sys.stderr)


class _Inputs:
    """A command's overrides: the project's settings and the flags, each with its source
    (a bad value is blamed on the flag, the project file or the profile that set it)."""

    def __init__(self, project_arg: str | None = None, find: bool = True) -> None:
        from aifactory.tasks.core.project import find_project, project_overrides

        path = find_project(project_arg) if find else None
        self.project = str(path) if path else None
        self.own_startup: str | None = None
        self.project_over: dict[str, Any] = {}
        if path is not None:
            self.own_startup, self.project_over = project_overrides(path)
        self.flags: dict[str, Any] = {}
        self.origins = {k: f"project {self.project}" for k in self.project_over}

    def flag(self, key: str, value: Any, flag: str) -> None:
        if value is None or value is False:
            return
        if key == "training.epochs" and "training.script" in self.project_over:
            key = "training.config.epochs"  # a project's own trainer reads its job.config's
        self.flags[key] = value
        self.origins[key] = f"flag {flag}"

    @property
    def overrides(self) -> dict[str, Any]:
        return {**self.project_over, **self.flags}

    def load(self, profile: str | None) -> Any:
        return _load(profile, self.overrides, self.origins)


def _use_prefect(cfg: Any, verbose: bool) -> str:
    """Point this process at the profile's Prefect API (starting the managed local server
    if the profile says so) and keep Prefect's console logs quiet; return the API URL."""
    from aifactory.tasks.control.prefect_server import resolve_api_url, use_server

    api_url = resolve_api_url(cfg.prefect.api_url, cfg.home_dir, cfg.prefect.managed_port)
    # Heartbeats from every flow run, not only deployed ones: the server's crash detector
    # (set up by `aif site up`) marks a run whose process was killed Crashed.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    if not verbose:  # Prefect's logs still go to the API (the UI); the terminal gets ours
        for var in ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",
                    "PREFECT_LOGGING_HANDLERS_CONSOLE_FLOW_RUNS_LEVEL",
                    "PREFECT_LOGGING_HANDLERS_CONSOLE_TASK_RUNS_LEVEL"):  # fmt: skip
            os.environ.setdefault(var, "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    use_server(api_url)  # also after Prefect was imported; never a temporary server
    from aifactory.tasks.doors.runtime import one_line_refusals

    one_line_refusals()  # an expected refusal is one line in the run's Prefect log
    return api_url


def _uses_slurm(cfg: Any) -> bool:
    return bool(cfg.training.executor == "slurm" or cfg.dask.kind == "slurm")


@contextmanager
def _progress(verbose: bool) -> Iterator[None]:
    """Progress bars with ETA for ingest and preprocessing, on a terminal only."""
    if verbose or not sys.stdout.isatty():
        yield
        return
    from aifactory.tasks.data.progress import reporting, rich_reporter

    with rich_reporter(_console()) as show, reporting(show):
        yield


# ---------------------------------------------------------------- aif run and friends


@app.command("run")
def run_cmd(
    profile: ProfileOpt = None,
    startup: StartupOpt = None,
    project: ProjectOpt = None,
    epochs: EpochsOpt = None,
    rows: RowsOpt = None,
    dataspace: DataspaceOpt = None,
    seed_demo_data: SeedOpt = False,
    purpose: PurposeOpt = None,
    quarantine: QuarantineOpt = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="say which stages would be reused and which would run, and print "
            "the resolved config and job scripts; submit nothing",
        ),
    ] = False,
    in_allocation: Annotated[
        bool,
        typer.Option(
            "--in-allocation",
            help="run the whole flow as one Slurm job on a compute node (its Prefect and "
            "MLflow calls through the site's relay); this process only follows the job",
        ),
    ] = False,
    verbose: VerboseOpt = False,
) -> int:
    """Run the whole pipeline: ingest, preprocess, train, register."""
    inputs = _Inputs(project)
    inputs.flag("training.epochs", epochs, "--epochs")
    inputs.flag("dataspace.generate.rows", rows, "--rows")
    inputs.flag("dataspace.url", dataspace, "--dataspace")
    inputs.flag("dataspace.seed", seed_demo_data, "--seed-demo-data")
    inputs.flag("dataspace.purpose", purpose, "--purpose")
    inputs.flag("dataspace.quarantine", quarantine, "--quarantine")
    return _run(inputs, profile, startup, dry_run, _verbose(verbose), in_allocation)


def _run(inputs: _Inputs, profile: str | None, startup: str | None, dry: bool,
         verbose: bool, in_allocation: bool = False) -> int:  # fmt: skip
    cfg = inputs.load(profile)
    sid, st = cfg.startup(startup or inputs.own_startup)
    check_run(cfg, sid)  # isolation.* (exit 6): before Prefect, a dry run or any service
    if in_allocation and not dry:
        _check_seeding(cfg, profile, inputs)
        return _run_in_allocation(cfg, sid, profile or cfg.name, inputs)
    if dry:
        from aifactory.tasks.core.errors import StorageError

        # A dry run refuses what the run would refuse; a store that does not answer (the
        # site down) leaves the plan "unknown" and the scripts are still shown.
        with contextlib.suppress(StorageError):
            _check_seeding(cfg, profile, inputs)
        return dry_run(cfg, sid, inputs.project, profile)
    _check_seeding(cfg, profile, inputs)  # an empty typed data space: before any service
    api_url = _use_prefect(cfg, verbose)
    ui = _strip_api(api_url)
    what = f"project {inputs.project}, " if inputs.project else ""
    print(f"aif run: {what}profile {cfg.name}, start-up {sid} (account {st.account}), "
          f"Prefect {ui}", flush=True)  # fmt: skip

    from aifactory.flows.pipeline import pipeline

    state = _run_flow(
        pipeline, cfg, sid, ui, verbose, profile=profile or cfg.name, startup=sid,
        overrides=inputs.flags or None, project=inputs.project,
    )  # fmt: skip
    uri = state.result()  # raises the stage's error if the run failed
    print(f"Prefect UI: {ui}/runs/flow-run/{state.state_details.flow_run_id}", flush=True)
    print(f"MLflow: {_mlflow_where(cfg.mlflow.tracking_uri, uri)}  "
          f"(alias {cfg.mlflow.model_name}@candidate)")  # fmt: skip
    print(uri)
    return 0


def _run_in_allocation(cfg: Any, sid: str, profile: str, inputs: _Inputs) -> int:
    """`aif run --in-allocation`: submit the flow's job and follow it to its end."""
    from aifactory.tasks.control.in_allocation import run_in_allocation

    ui = _strip_api(cfg.prefect.api_url)
    print(f"aif run --in-allocation: profile {cfg.name}, start-up {sid} "
          f"(account {cfg.startups[sid].account}), Prefect {ui}", flush=True)  # fmt: skip
    out = run_in_allocation(cfg, sid, profile, inputs.flags or None, inputs.project,
                            log=lambda line: print(line, flush=True))  # fmt: skip
    if out.get("flow_run_id"):
        print(f"Prefect UI: {ui}/runs/flow-run/{out['flow_run_id']}", flush=True)
    if out.get("state") != "COMPLETED" or not out.get("model_uri"):
        from aifactory.tasks.core.errors import TrainingError

        raise TrainingError(f"flow job in {out.get('job_dir')}: the flow run ended "
                            f"{out.get('state')}: {out.get('error', '')}"[:1200])  # fmt: skip
    print(f"MLflow: {_mlflow_where(cfg.mlflow.tracking_uri, out['model_uri'])}  "
          f"(alias {cfg.mlflow.model_name}@candidate)")  # fmt: skip
    print(out["model_uri"])
    return 0


def _run_flow(flow: Any, cfg: Any, sid: str, ui: str, verbose: bool, **params: Any) -> Any:
    """Run ``flow`` in this process as one of the start-up's runs: tagged (``aif``,
    ``startup:<id>``, ``profile:<name>``), its Prefect URL printed when it starts, progress
    bars on a terminal; return its final state."""
    from prefect import tags

    from aifactory.tasks.control.prefect_runs import run_tags

    def announce(flow: Any, flow_run: Any, state: Any) -> None:
        print(f"Prefect UI: {ui}/runs/flow-run/{flow_run.id}", flush=True)

    with tags(*run_tags(sid, cfg.name)), _progress(verbose):
        return flow.with_options(on_running=[announce])(**params, return_state=True)


def _check_seeding(cfg: Any, profile: str | None, inputs: _Inputs) -> None:
    """Seeding only where asked (tasks/data/seeding.py), checked before Prefect starts: a
    missing or empty data space the user typed, or --rows for one that has objects."""
    from aifactory.tasks.data.seeding import check_seeding

    check_seeding(cfg, profile or cfg.name, inputs.overrides)


def _mlflow_where(tracking_uri: str, model_uri: str) -> str:
    """The model version's page on an MLflow server; on a file store, how to open one."""
    name, _, version = model_uri.removeprefix("models:/").partition("/")
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"
    return f"{tracking_uri} (to browse: mlflow ui --backend-store-uri {shlex.quote(tracking_uri)})"


def dry_run(cfg: Any, sid: str, project: str | None = None, profile: str | None = None) -> int:
    """Say which stages a run would reuse and which it would run, then print the resolved
    config and job scripts; submit nothing, write nothing."""
    from aifactory.tasks.doors.dask_cluster import render_worker_script
    from aifactory.tasks.stages.plan import plan, render_plan
    from aifactory.tasks.stages.training import render_sbatch

    _, st = cfg.startup(sid)
    print("# plan (like `snakemake -n`: nothing is run)")
    steps = plan(cfg, sid, project, profile=profile)
    print(render_plan(steps))
    stops = any("the run would stop here" in p.reason for p in steps)
    print("\n# resolved profile (secrets masked)")
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
    return 1 if stops else 0  # a dry run is a gate: non-zero when the run would stop


@app.command("train-lm")
def train_lm_cmd(
    profile: ProfileOpt = None,
    startup: StartupOpt = None,
    data: Annotated[
        str | None,
        typer.Option("--data", metavar="URL", help="text dataset URL (default: tourism reviews)"),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--steps", min=1, help="training steps (default: the project's train.config.steps)"
        ),
    ] = None,
    seed_demo_data: SeedOpt = False,
    verbose: VerboseOpt = False,
) -> int:
    """Train and register the reference causal LM on the tourism reviews (= aif run
    --project examples/tourism-lm)."""
    from aifactory.tasks.core.project import EXAMPLES

    inputs = _Inputs(str(EXAMPLES / "tourism-lm"))
    inputs.flag("training.config.steps", steps, "--steps")
    inputs.flag("dataspace.url", data, "--data")
    inputs.flag("dataspace.seed", seed_demo_data, "--seed-demo-data")
    return _run(inputs, profile, startup, False, _verbose(verbose))


@app.command("init")
def init_cmd(
    name: Annotated[
        str, typer.Argument(help="project and model name (lower-case letters, digits, -)")
    ],
    dir: Annotated[
        str | None, typer.Option("--dir", help="folder to create (default: ./NAME)")
    ] = None,
    startup: Annotated[
        str | None, typer.Option("--startup", help="whose project (default: startup-b)")
    ] = None,
    verbose: VerboseOpt = False,
) -> int:
    """Start a project of your own: data set, features, trainer, model and nightly
    deployment, in a new folder."""
    from aifactory.tasks.core.project import init_project

    _verbose(verbose)
    if startup is not None:
        _load(None).startup(startup)  # an unknown start-up fails here, not at every run
    dest = Path(dir or name).resolve()
    files = init_project(name, dest, startup)
    print(f"created project {name} in {dest}:")
    for f in files:
        print(f"  {f.relative_to(dest)}")
    print(f"next: cd {shlex.quote(str(dest))} && aif run")
    return 0


@app.command("ingest")
def ingest_cmd(
    dataset: Annotated[
        str | None, typer.Argument(help="catalog id (default: the profile's)")
    ] = None,
    profile: ProfileOpt = None,
    startup: StartupOpt = None,
    purpose: PurposeOpt = None,
    dataspace: DataspaceOpt = None,
    seed_demo_data: SeedOpt = False,
    rows: RowsOpt = None,
    quarantine: QuarantineOpt = False,
    verbose: VerboseOpt = False,
) -> int:
    """Snapshot one catalog dataset into the lake (the pipeline's first stage alone)."""
    verbose = _verbose(verbose)
    inputs = _Inputs(find=False)  # one catalog dataset: a project's settings do not apply
    inputs.flag("dataspace.dataset", dataset, "DATASET")
    inputs.flag("dataspace.generate.rows", rows, "--rows")
    inputs.flag("dataspace.url", dataspace, "--dataspace")
    inputs.flag("dataspace.seed", seed_demo_data, "--seed-demo-data")
    inputs.flag("dataspace.purpose", purpose, "--purpose")
    inputs.flag("dataspace.quarantine", quarantine, "--quarantine")
    cfg = inputs.load(profile)
    sid, _ = cfg.startup(startup)
    cfg.dataset_entry()  # an unknown dataset fails here, before any service is touched
    check_run(cfg, sid)  # isolation.* (exit 6)
    _check_seeding(cfg, profile, inputs)
    api_url = _use_prefect(cfg, verbose)
    from aifactory.flows.ingest import ingest_flow

    state = _run_flow(
        ingest_flow, cfg, sid, _strip_api(api_url), verbose, profile=profile or cfg.name,
        startup=sid, overrides=inputs.flags or None,
    )  # fmt: skip
    snap = state.result()
    q = f", {len(snap.quarantined)} quarantined" if snap.quarantined else ""
    print(f"snapshot {snap.snapshot_id} of {snap.dataset}: {len(snap.objects)} objects, "
          f"{snap.rows} rows ({len(snap.objects_read)} objects read{q})")  # fmt: skip
    return 0


@app.command("sweep")
def sweep_cmd(
    profile: ProfileOpt = None,
    startup: StartupOpt = None,
    project: ProjectOpt = None,
    grid: Annotated[
        list[str] | None,
        typer.Option(
            "--grid",
            metavar="NAME=V1,V2",
            help="grid values (lr, batch_size, hidden as 64x32, "
            "epochs, seed; a project's: any train.config key); repeatable",
        ),
    ] = None,
    random: Annotated[
        int, typer.Option("--random", min=0, metavar="N", help="N random trials")
    ] = 0,
    space: Annotated[
        list[str] | None,
        typer.Option(
            "--space",
            metavar="NAME=LOW:HIGH",
            help="random-search range (lr log-uniform; batch_size, epochs)",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="random-search seed")] = 0,
    max_parallel: Annotated[
        int, typer.Option("--max-parallel", min=1, help="array tasks running at once")
    ] = 2,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            help="metric to compare (default: val_rmse, lower is better; a project's: "
            "its model.metric and direction)",
        ),
    ] = None,
    epochs: EpochsOpt = None,
    verbose: VerboseOpt = False,
) -> int:
    """A hyperparameter search as one Slurm job array; prints the best trial."""
    from aifactory.tasks.jobs.admission import admit_declaration
    from aifactory.tasks.stages.sweep import grid_trials, parse_value, random_trials

    verbose = _verbose(verbose)
    inputs = _Inputs(project)
    inputs.flag("training.epochs", epochs, "--epochs")
    cfg = inputs.load(profile)
    sid, st = cfg.startup(startup or inputs.own_startup)
    check_run(cfg, sid)  # isolation.* (exit 6)
    admit_declaration(sid, st, "sweep")  # admission.declaration (exit 5): nothing submitted
    own = bool(cfg.training.script)
    values: dict[str, list[Any]] = {}
    for item in grid or []:
        name, _, vals = item.partition("=")
        if not vals:
            raise ConfigError(f"aif sweep: --grid {item!r}: give NAME=V1,V2,...")
        values[name] = [parse_value(name, v, own) for v in vals.split(",")]
    trials = grid_trials(values, own) if values else []
    if random:
        ranges: dict[str, tuple[float, float]] = {}
        for item in space or ["lr=0.0003:0.01"]:
            name, _, rng = item.partition("=")
            lo, _, hi = rng.partition(":")
            try:
                ranges[name] = (float(lo), float(hi))
            except ValueError:
                raise ConfigError(f"aif sweep: --space {item!r}: give NAME=LOW:HIGH") from None
        trials += random_trials(ranges, random, seed)
    if not trials:
        raise ConfigError("aif sweep: no trials: give --grid NAME=V1,V2 and/or --random N")
    _use_prefect(cfg, verbose)
    from prefect import tags

    from aifactory.flows.sweep import sweep_flow
    from aifactory.tasks.control.prefect_runs import run_tags

    with tags(*run_tags(sid, cfg.name)):
        record = sweep_flow(
            profile=profile or cfg.name, startup=sid, overrides=inputs.overrides or None,
            trials=trials, max_parallel=max_parallel, metric=metric,
        )  # fmt: skip
    best, name = record["best"], record["metric"]
    print(f"best trial {best['trial']} of {len(record['trials'])}: {name}="
          f"{best[name]:.4f} {json.dumps(best['params'])} (job array "
          f"{record['job_array']}, {record['sweep_dir']})")  # fmt: skip
    return 0


@app.command("deploy")
def deploy_cmd(
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            "-p",
            metavar="PROFILE",
            help="local, site or a YAML file (default: "
            "$AIF_PROFILE, else local; a project's: its deploy.profile)",
        ),
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(
            "--project",
            metavar="DIR",
            help="deploy this project (default: ./aifactory.yaml if "
            "any) at its current git commit instead of the platform's deployments",
        ),
    ] = None,
    no_notifications: Annotated[
        bool, typer.Option("--no-notifications", help="do not create the webhook notifications")
    ] = False,
    verbose: VerboseOpt = False,
) -> int:
    """Deploy the nightly pipelines (prefect.yaml), the crashed-run detector and
    notifications; on a local profile, start a local worker for them."""
    from aifactory.deployments.deploy import deploy_all, ensure_automations, webhook_url
    from aifactory.tasks.core.project import find_project

    verbose = _verbose(verbose)
    path = find_project(project)
    if path:  # the project's own nightly deployment, pinned to its current commit
        from aifactory.deployments.deploy import deploy_project, project_source
        from aifactory.tasks.core.project import load_project

        proj = load_project(path)
        src = project_source(path)  # before any server: refuse a dirty tree first
        chosen = profile or proj.deploy.profile
        cfg = _load(chosen)
        api_url = _use_prefect(cfg, verbose)
        name = deploy_project(path, api_url, src=src, profile=chosen)
        _local_worker(cfg, api_url, chosen)
        when = f"{proj.deploy.schedule or 'none'} {proj.deploy.timezone}"
        print(f"deployment {name}: {src['repository']} at {src['commit']}, project "
              f"{src['project']}, start-up {proj.startup}, schedule {when}, "
              "concurrency 1")  # fmt: skip
        return 0
    cfg = _load(profile)
    api_url = _use_prefect(cfg, verbose)
    deploy_all(api_url, profile=profile or cfg.name)
    _local_worker(cfg, api_url, profile or cfg.name)
    made = ensure_automations(None if no_notifications
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


def _local_worker(cfg: Any, api_url: str, profile: str) -> None:
    """A profile whose Prefect server aif manages gets a worker that aif manages too."""
    if cfg.prefect.api_url != "managed":
        return
    from aifactory.deployments.deploy import work_pool_for
    from aifactory.tasks.control.worker import ensure_worker

    if cfg.prefect.work_pools == "per-startup":
        raise ConfigError("prefect.work_pools: per-startup needs one worker per start-up's pool "
                          "(a site's: aif site up starts them); a managed Prefect server runs "
                          "one worker: use shared")  # fmt: skip
    rec = ensure_worker(cfg.home_dir, api_url, work_pool_for(profile))
    print(f"worker: pool {rec['pool']}, pid {rec['pid']}, log {rec['log']} "
          "(`aif server stop` stops it)")  # fmt: skip


@app.command("replay")
def replay_cmd(
    uri: Annotated[str, typer.Argument(help="models:/NAME/VERSION")],
    profile: ProfileOpt = None,
    allow_dirty: Annotated[
        bool,
        typer.Option("--allow-dirty", help="replay with uncommitted changes in the working tree"),
    ] = False,
    verbose: VerboseOpt = False,
) -> int:
    """Rebuild a registered model from its record; MATCH when the weights are identical."""
    from aifactory.tasks.stages.replay import replay

    _verbose(verbose)
    cfg = _load(profile)
    result = replay(uri, cfg, allow_dirty=allow_dirty,
                    log=lambda m: print(f"  [replay] {m}", flush=True))  # fmt: skip
    print(result.line(), flush=True)
    return 0 if result.match else 1


# ---------------------------------------------------------------- status, runs, logs


@app.command("status")
def status_cmd(
    profile: ProfileOpt = None,
    startup: StartupOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="runs to show")] = 5,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> int:
    """The site's parts, the Prefect server, and this start-up's last runs. Starts nothing."""
    from aifactory.tasks.control import prefect_server as ps
    from aifactory.tasks.core.home import site_dir

    _verbose(verbose)
    inputs = _Inputs(None)
    cfg = inputs.load(profile)
    sid, st = cfg.startup(startup or inputs.own_startup)
    info: dict[str, Any] = {"profile": cfg.name, "home": cfg.home_dir, "startup": sid,
                            "account": st.account, "site": [], "prefect": {}, "runs": [],
                            "runs_from": ""}  # fmt: skip
    ok = True
    if _uses_slurm(cfg):
        from aifactory.infra.site import manager

        parts = manager.status(site_dir())
        info["site"] = [{"part": p.name, "healthy": p.healthy, "address": p.address,
                         "pid": p.pid, "detail": p.detail} for p in parts]  # fmt: skip
        ok = bool(parts) and all(p.healthy for p in parts)
    if cfg.prefect.api_url == "managed":
        rec = ps.running(cfg.home_dir)
        api_url = rec["api_url"] if rec else None
        info["prefect"] = {"api_url": api_url, "running": bool(rec), "managed": True}
    else:
        api_url = cfg.prefect.api_url
        info["prefect"] = {"api_url": api_url, "running": ps.healthy(api_url), "managed": False}
    if not info["prefect"]["running"] and not info["prefect"]["managed"]:
        ok = False  # a configured server that does not answer
    if info["prefect"]["running"] and api_url:
        from aifactory.tasks.control.prefect_server import use_server

        use_server(api_url)
        info["runs"], info["runs_from"] = _runs(cfg, api_url, sid, limit), "prefect"
    else:
        from aifactory.tasks.control.prefect_runs import records

        info["runs"], info["runs_from"] = records(cfg.runs_dir, sid, limit), "records"
    if as_json:
        _json(info)
        return 0 if ok else 1
    print(f"profile {cfg.name}, home {cfg.home_dir}, start-up {sid} (account {st.account})")
    if info["site"]:
        print("site:")
        _table(["state", "part", "address", "pid", "detail"],
               [{**p, "state": "ok" if p["healthy"] else "DOWN", "pid": p["pid"] or ""}
                for p in info["site"]])  # fmt: skip
    elif _uses_slurm(cfg):
        print(f"site: not set up in {site_dir()} (aif site up)")
    pf = info["prefect"]
    if pf["running"]:
        print(f"Prefect: {_strip_api(pf['api_url'])} (running)")
    elif pf["managed"]:
        print("Prefect: the local server of this home is not running (aif run starts it)")
    else:
        print(f"Prefect: {pf['api_url']} does not answer")
    _print_runs(info["runs"], sid, from_records=info["runs_from"] == "records")
    return 0 if ok else 1


def _runs(cfg: Any, api_url: str, sid: str | None, limit: int) -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client

    from aifactory.tasks.control.prefect_runs import list_runs

    with get_client(sync_client=True) as client:
        return [r.public() for r in list_runs(client, api_url, cfg.runs_dir, sid, limit)]


def short_id(run_id: str) -> str:
    """A run's short id: the end of its id (Prefect's ids begin with their time, so runs
    made together share a beginning); `aif logs` takes it."""
    return run_id[-8:]


def _print_runs(rows: list[dict[str, Any]], sid: str | None, from_records: bool) -> None:
    whose = f"start-up {sid}" if sid else "all start-ups"
    src = " (finished pipeline runs from the run records; Prefect is not running)" \
        if from_records else ""  # fmt: skip
    print(f"last runs of {whose}{src}:")
    if not rows:
        print("  (none yet)")
        return
    _table(["run", "name", "flow", "state", "started", "seconds", "model"],
           [{**r, "run": short_id(r["id"]), "seconds": "" if r["seconds"] is None else r["seconds"]}
            for r in rows], right=("seconds",))  # fmt: skip


@runs_app.command("ls")
def runs_ls(
    profile: ProfileOpt = None,
    startup: Annotated[
        str | None,
        typer.Option(
            "--startup",
            metavar="ID",
            help="one start-up (default: the project's, else the profile's)",
        ),
    ] = None,
    all_startups: Annotated[bool, typer.Option("--all", help="every start-up's runs")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="runs to list")] = 20,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> int:
    """This start-up's runs, newest first: id, name, state, start, duration, model."""
    inputs = _Inputs(None)
    cfg = inputs.load(profile)
    sid = None if all_startups else cfg.startup(startup or inputs.own_startup)[0]
    api_url = _use_prefect(cfg, _verbose(verbose))
    rows = _runs(cfg, api_url, sid, limit)
    if as_json:
        _json(rows)
    else:
        _print_runs(rows, sid, from_records=False)
    return 0


@app.command("logs")
def logs_cmd(
    run: Annotated[str, typer.Argument(help="run id, a prefix of it (aif runs ls), or name")],
    profile: ProfileOpt = None,
    jobs: Annotated[
        bool, typer.Option("--jobs/--no-jobs", help="also print the run's Slurm job logs")
    ] = True,
    tail: Annotated[
        int | None,
        typer.Option("--tail", min=1, metavar="N", help="only the last N lines of each log"),
    ] = None,
    verbose: VerboseOpt = False,
) -> int:
    """The Prefect logs of a run (and of its stages), then the logs its jobs wrote."""
    from prefect.client.orchestration import get_client

    from aifactory.tasks.control.prefect_runs import find_run, job_log_files, prefect_logs, run_tree

    cfg = _load(profile)
    api_url = _use_prefect(cfg, _verbose(verbose))
    with get_client(sync_client=True) as client:
        root = find_run(client, run)
        tree = run_tree(client, root)
        lines = list(prefect_logs(client, tree))
    state = root.state.name if root.state else "?"
    print(f"# Prefect logs of run {root.name} ({root.id}), {state}: "
          f"{_strip_api(api_url)}/runs/flow-run/{root.id}")  # fmt: skip
    for line in lines[-tail:] if tail else lines:
        print(line)
    if not lines:
        print("(no log lines)")
    if jobs:
        for path in job_log_files(cfg.runs_dir, str(root.id), lines):
            text = path.read_text(errors="replace").splitlines()
            print(f"\n# {path}")
            for line in text[-tail:] if tail else text:
                print(line)
    return 0


# ---------------------------------------------------------------- data


@catalog_app.command("ls")
def catalog_ls(
    catalog: Annotated[
        str | None,
        typer.Option("--catalog", metavar="FILE", help="catalog file (default: the shipped one)"),
    ] = None,
    profile: Annotated[
        str | None, typer.Option("--profile", "-p", help="use this profile's catalog")
    ] = None,
    as_json: JsonOpt = False,
) -> int:
    """The data sets, their licences, policies and personal-data columns."""
    cat = _catalog(catalog, profile)
    rows = [{"dataset": d.id, "data space": d.data_space, "format": d.distribution.format,
             "license": d.license, "valid until": d.policy.valid_until.isoformat(),
             "personal data": (f"{len(d.policy.personal_data)} column(s)"
                               if d.policy.personal_data else "-"),
             "publisher": d.publisher} for d in cat.datasets]  # fmt: skip
    if as_json:
        _json([d.public() for d in cat.datasets])
    else:
        _table(list(rows[0]) if rows else ["dataset"], rows)
    return 0


def _catalog(path: str | None, profile: str | None) -> Any:
    from aifactory.tasks.data.catalog import catalog_at

    if path is None:  # the profile's catalog ($AIF_PROFILE, else local: the shipped one)
        path = _load(profile).dataspace.catalog
    return catalog_at(path)


@catalog_app.command("show")
def catalog_show(
    dataset: Annotated[str, typer.Argument(help="dataset id (aif catalog ls lists them)")],
    catalog: Annotated[str | None, typer.Option("--catalog", metavar="FILE")] = None,
    profile: Annotated[str | None, typer.Option("--profile", "-p")] = None,
    as_json: JsonOpt = False,
) -> int:
    """One data set's entry: distribution, schema, contract and policy."""
    import yaml

    entry = _catalog(catalog, profile).get(dataset).public()
    if as_json:
        _json(entry)
    else:
        print(yaml.safe_dump(entry, sort_keys=False, allow_unicode=True), end="")
    return 0


@catalog_app.command("validate")
def catalog_validate(file: Annotated[str, typer.Argument(help="catalog file to check")]) -> int:
    """Check a catalog file (schema, contracts, policies)."""
    from aifactory.tasks.data.catalog import load_catalog

    cat = load_catalog(file)
    print(f"catalog {file}: valid ({len(cat.datasets)} datasets: "
          f"{', '.join(d.id for d in cat.datasets)})")  # fmt: skip
    return 0


def _lake(profile: str | None, startup: str | None, dataset: str | None) -> tuple[Any, str, str]:
    cfg = _load(profile)
    return cfg, cfg.lake_url_for(startup), dataset or cfg.dataspace.dataset


@snapshot_app.command("ls")
def snapshot_ls(
    profile: ProfileOpt = None,
    startup: Annotated[
        str | None,
        typer.Option("--startup", metavar="ID", help="whose lake prefix (default: the profile's)"),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option("--dataset", help="default: the profile's dataset")
    ] = None,
    as_json: JsonOpt = False,
) -> int:
    """The committed snapshots of a dataset in the start-up's prefix of the lake."""
    from aifactory.tasks.stages.ingest import list_snapshots

    cfg, lake, dataset = _lake(profile, startup, dataset)
    snaps = list_snapshots(lake, dataset, cfg.storage_options(lake))
    rows = [{"snapshot": s.snapshot_id, "created": s.created_at, "objects": len(s.objects),
             "rows": s.rows, "bytes": s.bytes, "quarantined": len(s.quarantined),
             "start-up / purpose": f"{s.startup} / {s.purpose}"} for s in snaps]  # fmt: skip
    if as_json:
        _json(rows)
        return 0
    _table(["snapshot", "created", "objects", "rows", "bytes", "quarantined",
            "start-up / purpose"], rows,
           right=("objects", "rows", "bytes", "quarantined"))  # fmt: skip
    if not snaps:
        print(f"(no committed snapshot of {dataset} in {lake})")
    return 0


@snapshot_app.command("show")
def snapshot_show(
    snapshot: Annotated[
        str,
        typer.Argument(help="snapshot id, or a unique prefix of it (aif snapshot ls lists them)"),
    ],
    profile: ProfileOpt = None,
    startup: Annotated[str | None, typer.Option("--startup", metavar="ID")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset")] = None,
) -> int:
    """One snapshot's manifest: every object's key, ETag, size, rows and lake hash."""
    from aifactory.tasks.core.errors import DataError
    from aifactory.tasks.stages.ingest import list_snapshots, load_snapshot

    cfg, lake, dataset = _lake(profile, startup, dataset)
    so = cfg.storage_options(lake)
    try:
        snap = load_snapshot(lake, dataset, snapshot, so)
    except DataError:
        found = [s for s in list_snapshots(lake, dataset, so)
                 if s.snapshot_id.startswith(snapshot)] if len(snapshot) >= 4 else []  # fmt: skip
        if len(found) != 1:
            if len(found) > 1:
                raise DataError(f"snapshot {snapshot} of {dataset}: {len(found)} snapshots start "
                                "with it; give more of the id") from None  # fmt: skip
            raise
        snap = found[0]
    print(snap.to_json())
    return 0


# ---------------------------------------------------------------- models and reports


@model_app.command("promote")
def model_promote(
    profile: ProfileOpt = None,
    project: ProjectOpt = None,
    version: Annotated[
        str | None, typer.Option("--version", help="default: the 'candidate' alias")
    ] = None,
    approved_by: Annotated[
        str | None,
        typer.Option(
            "--approved-by",
            metavar="NAME",
            help="who approves (required for a high-risk start-up's model)",
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option("--metric", help="held-out metric (default: the profile's promotion.metric)"),
    ] = None,
    margin: Annotated[
        float | None,
        typer.Option(
            "--margin",
            help="relative improvement needed over the champion (0.02 = 2%; default: "
            "the profile's promotion.margin)",
        ),
    ] = None,
    verbose: VerboseOpt = False,
) -> int:
    """Make the candidate (or --version) the champion, if it passes the promotion gates."""
    from aifactory.tasks.models.promotion import promote

    inputs = _Inputs(project)
    cfg = inputs.load(profile)
    owner = inputs.own_startup or cfg.default_startup  # the model's start-up acts
    name, uri = cfg.mlflow.model_name, cfg.mlflow.tracking_uri
    spec = cfg.promotion.model_copy(
        update={k: v for k, v in (("metric", metric), ("margin", margin)) if v is not None}
    )
    _use_prefect(cfg, _verbose(verbose))  # the promotion event goes to the profile's Prefect
    d = promote(uri, name, version=version, spec=spec, approved=cfg.declaration_approved,
                risk_class=cfg.risk_class, approved_by=approved_by,
                acting=cfg.registry_for(owner),
                reading=cfg.as_operator().mlflow)  # fmt: skip
    verdict = "promoted to champion" if d.promoted else "not promoted"
    print(f"{name} version {d.candidate}: {verdict} ({d.reason})")
    for what, ok, detail in d.checks:
        print(f"  check {'pass' if ok else 'FAIL'}: {what} ({detail})")
    return 0


@model_app.command("rollback")
def model_rollback(profile: ProfileOpt = None, project: ProjectOpt = None,
                   verbose: VerboseOpt = False) -> int:  # fmt: skip
    """Move the champion alias back to the version it pointed at before."""
    from aifactory.tasks.models.promotion import rollback

    _verbose(verbose)
    inputs = _Inputs(project)
    cfg = inputs.load(profile)
    owner = inputs.own_startup or cfg.default_startup  # the model's start-up acts
    old, new = rollback(cfg.mlflow.tracking_uri, cfg.mlflow.model_name,
                        cfg.registry_for(owner))  # fmt: skip
    print(f"champion: {cfg.mlflow.model_name} version {old} -> {new}")
    return 0


@report_app.command("usage")
def report_usage(
    profile: ProfileOpt = None,
    startup: Annotated[
        str | None,
        typer.Option("--startup", metavar="ID", help="one start-up (default: all accounts)"),
    ] = None,
    since: Annotated[
        str, typer.Option("--since", help="sacct --starttime (default 30 days)")
    ] = "now-30days",
    gpu_rate: Annotated[
        float | None, typer.Option("--gpu-rate", help="HPC EUR per GPU-hour")
    ] = None,
    cpu_rate: Annotated[
        float | None, typer.Option("--cpu-rate", help="HPC EUR per CPU-hour")
    ] = None,
    cloud_gpu_rate: Annotated[
        float | None,
        typer.Option("--cloud-gpu-rate", help="cloud list price, EUR per GPU-hour, for comparison"),
    ] = None,
    artifact: Annotated[
        bool,
        typer.Option(
            "--artifact/--no-artifact", help="publish the table as Prefect artifact usage-report"
        ),
    ] = True,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> int:
    """GPU and CPU hours per start-up and project from Slurm accounting, priced."""
    from aifactory.tasks.jobs.usage import (
        CLOUD_GPU_RATE,
        HPC_CPU_RATE,
        HPC_GPU_RATE,
        collect,
        owners,
        priced_rows,
    )

    cfg = _load(profile)
    if not _uses_slurm(cfg):
        raise ConfigError(f"aif report usage: profile {cfg.name} submits no Slurm job (training "
                          "and Dask run on this machine), so there is no Slurm accounting to "
                          "report: use --profile site")  # fmt: skip
    g = HPC_GPU_RATE if gpu_rate is None else gpu_rate
    c = HPC_CPU_RATE if cpu_rate is None else cpu_rate
    cg = CLOUD_GPU_RATE if cloud_gpu_rate is None else cloud_gpu_rate
    who_owns = owners(dict([cfg.startup(startup)]) if startup else cfg.startups)
    usages = collect(cfg.slurm_client(), since, list(who_owns) if startup else None)
    rows = priced_rows(usages, g, c, cg, who_owns)
    if as_json:
        _json(rows)
    else:
        print(f"usage since {since} per start-up and project (rates per hour: HPC GPU {g}, "
              f"HPC CPU {c}, cloud GPU {cg} EUR)")  # fmt: skip
        _table(["startup", "project", "account", "jobs", "cpu_hours", "gpu_hours",
                "hpc_cost_eur", "cloud_gpu_cost_eur"], rows,
               right=("jobs", "cpu_hours", "gpu_hours", "hpc_cost_eur",
                      "cloud_gpu_cost_eur"))  # fmt: skip
        if not any(int(r["jobs"]) for r in rows):
            print("(no jobs in this period)")
    if artifact:
        _use_prefect(cfg, _verbose(verbose))
        from prefect.artifacts import create_table_artifact

        who = startup or "all start-ups"
        artifact_id = create_table_artifact(
            key="usage-report", table=rows or [{"account": "(no jobs)"}],
            description=f"GPU and CPU hours per start-up and project ({who}) since "
            f"{since}: HPC at {g} EUR/GPU-h and {c} EUR/CPU-h, cloud GPU list price "
            f"{cg} EUR/GPU-h",
        )  # fmt: skip
        if not as_json:
            print(f"Prefect artifact usage-report: {artifact_id}")
    return 0


@report_app.command("nightly")
def report_nightly(
    profile: ProfileOpt = None,
    day: Annotated[
        str | None,
        typer.Option(
            "--date",
            metavar="YYYY-MM-DD",
            help="the night (UTC day of the runs' schedule; default: the newest)",
        ),
    ] = None,
    artifact: Annotated[
        bool,
        typer.Option(
            "--artifact/--no-artifact", help="publish the table as Prefect artifact nightly-report"
        ),
    ] = True,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> int:
    """The operators' morning view: last night's runs per start-up, with state, reason,
    GPU-hours and the model version each produced (start-ups without a run too)."""
    import datetime as dt

    from aifactory.tasks.control.prefect_runs import nightly_rows
    from aifactory.tasks.jobs.usage import job_hours

    try:
        night = dt.date.fromisoformat(day) if day else None
    except ValueError:
        raise ConfigError(f"aif report nightly --date {str(day)[:40]!r}: not a date "
                          "(YYYY-MM-DD)") from None  # fmt: skip
    cfg = _load(profile)
    api_url = _use_prefect(cfg, _verbose(verbose))

    def gpu_hours(jobs: list[str]) -> float:
        if not _uses_slurm(cfg):
            return 0.0
        try:
            return job_hours(cfg.slurm_client(), jobs)[1]
        except Exception:  # accounting down: the report still comes
            return float("nan")

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        night, rows = nightly_rows(client, api_url, cfg.runs_dir, sorted(cfg.startups), night,
                                   gpu_hours)  # fmt: skip
    if as_json:
        _json({"night": night.isoformat() if night else None, "runs": rows})
    else:
        print(f"nightly runs of {night or '(none yet)'} (UTC), per start-up")
        _table(["startup", "project", "run", "state", "gpu_hours", "model", "reason"], rows,
               right=("gpu_hours",))  # fmt: skip
    if artifact and night is not None:
        from prefect.artifacts import create_table_artifact

        made = create_table_artifact(
            key="nightly-report", table=rows,
            description=f"Nightly runs of {night} (UTC) per start-up: state, reason, GPU-hours, "
            "model version (aif report nightly)",
        )  # fmt: skip
        if not as_json:
            print(f"Prefect artifact nightly-report: {made}")
    return 0


# ---------------------------------------------------------------- site, server, profiles


SiteDirOpt = Annotated[
    str | None,
    typer.Option(
        "--dir", metavar="DIR", help="state folder (default: $AIF_SITE_DIR, else <home>/site)"
    ),
]


def _site_dir(arg: str | None) -> Path:
    from aifactory.tasks.core.home import site_dir

    return Path(arg).resolve() if arg else site_dir()


def _print_parts(parts: list[Any], as_json: bool = False) -> None:
    if as_json:
        _json([{"part": p.name, "healthy": p.healthy, "address": p.address, "pid": p.pid,
                "detail": p.detail} for p in parts])  # fmt: skip
        return
    for p in parts:
        mark = "ok  " if p.healthy else "DOWN"
        pid = f"pid {p.pid}" if p.pid else ""
        print(f"{mark} {p.name:<12} {p.address:<32} {pid:<10} {p.detail}".rstrip())


NodesOpt = Annotated[
    int | None,
    typer.Option("--nodes", min=1, max=32,
                 help="Compute nodes: 1 (this host is login and compute node), or N >= 2 "
                 "compute nodes in namespaces of their own on the site's bridge, which "
                 "cannot reach Prefect or MLflow (default: the site's current layout, at "
                 "first 2)"),
]  # fmt: skip
GpusPerNodeOpt = Annotated[
    int | None,
    typer.Option("--gpus-per-node", min=1, max=8,
                 help="GPUs (GRES) per compute node (default: the current layout's, at first 2)"),
]  # fmt: skip


@site_app.command("up")
def site_up(dir: SiteDirOpt = None, nodes: NodesOpt = None,
            gpus_per_node: GpusPerNodeOpt = None) -> int:  # fmt: skip
    """Start every part of the site that is not running and healthy."""
    from aifactory.infra.site import manager

    _print_parts(manager.up(_site_dir(dir), nodes_wanted=nodes, gpus_per_node=gpus_per_node))
    return 0


@site_app.command("status")
def site_status(dir: SiteDirOpt = None, as_json: JsonOpt = False) -> int:
    """Health, address and pid of every part; starts nothing."""
    from aifactory.infra.site import manager

    parts = manager.status(_site_dir(dir))
    _print_parts(parts, as_json)
    return 0 if parts and all(p.healthy for p in parts) else 1


@site_app.command("env")
def site_env(dir: SiteDirOpt = None) -> int:
    """`export` lines that point Slurm, Prefect, MLflow and S3 clients at the site."""
    from aifactory.infra.site import manager

    for line in manager.env_lines(_site_dir(dir)):
        print(line)
    return 0


@site_app.command("down")
def site_down(dir: SiteDirOpt = None) -> int:
    """Stop exactly the processes the site started; keep its data."""
    from aifactory.infra.site import manager

    stopped = manager.down(_site_dir(dir))
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    return 0


def _managed(profile: str | None) -> Any:
    cfg = _load(profile)
    if cfg.prefect.api_url != "managed":
        raise ConfigError(f"profile {cfg.name}: prefect.api_url is {cfg.prefect.api_url}, "
                          "not a server aif manages (nothing to start or stop)")  # fmt: skip
    return cfg


@server_app.command("status")
def server_status(profile: ProfileOpt = None) -> int:
    """Whether this home's local Prefect server (and worker) runs."""
    from aifactory.tasks.control import prefect_server as ps
    from aifactory.tasks.control.worker import worker_running

    cfg = _managed(profile)
    where = ps.state_dir(cfg.home_dir)
    rec = ps.running(cfg.home_dir)
    if not rec:
        print(f"not running (state in {where}; `aif run` starts it)")
        return 1
    print(f"running: {rec['api_url']} (pid {rec['pid']}, state in {where})")
    w = worker_running(cfg.home_dir)
    if w:
        print(f"worker: pool {w['pool']}, pid {w['pid']}, log {w['log']}")
    return 0


@server_app.command("start")
def server_start(profile: ProfileOpt = None) -> int:
    """Start this home's local Prefect server (aif run does it on first use)."""
    from aifactory.tasks.control import prefect_server as ps

    cfg = _managed(profile)
    print(ps.ensure_managed_server(cfg.home_dir, cfg.prefect.managed_port))
    return 0


@server_app.command("stop")
def server_stop(profile: ProfileOpt = None) -> int:
    """Stop this home's local Prefect server and its worker."""
    from aifactory.tasks.control import prefect_server as ps
    from aifactory.tasks.control.worker import stop_worker

    cfg = _managed(profile)
    where = ps.state_dir(cfg.home_dir)
    if stop_worker(cfg.home_dir):
        print(f"stopped the local worker of {where}")
    done = ps.stop_managed_server(cfg.home_dir)
    print(f"stopped the local Prefect server of {where}" if done
          else f"no local Prefect server of {where} was running")  # fmt: skip
    return 0


ProfileArg = Annotated[
    str | None,
    typer.Argument(metavar="[PROFILE]", help="profile name or YAML file (default: --profile, "
                   "else $AIF_PROFILE, else local)"),
]  # fmt: skip


@profile_app.command("validate")
def profile_validate(profile: ProfileArg = None, option: ProfileOpt = None) -> int:
    """Check a profile (with the AIF_* environment it would run with)."""
    profile = profile or option
    cfg = _load(profile)
    print(f"profile {profile or cfg.name}: ok ({cfg.name}, {len(cfg.startups)} start-ups)")
    return 0


@profile_app.command("show")
def profile_show(profile: ProfileArg = None, option: ProfileOpt = None) -> int:
    """The resolved profile, secrets masked, as JSON."""
    _json(_load(profile or option).public_dict())
    return 0


# ---------------------------------------------------------------- entry point


def _usage_error(err: Any) -> int:
    """One line for a bad command line (an unknown option, a bad value): the command, what
    is wrong, where to look; exit 2. With no command at all: the help, exit 2."""
    ctx = getattr(err, "ctx", None)
    if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
        print(ctx.get_help())
        return 2
    path = str(getattr(ctx, "command_path", "") or "aif").split(" ", 1)
    where = f"aif {path[1]}" if len(path) > 1 else "aif"
    msg = " ".join(str(err.format_message()).split())
    print(f"aif: error: {where}: {msg[:300]} (see {where} --help)", file=sys.stderr)
    return int(getattr(err, "exit_code", 2) or 2)


def _split_verbose(args: list[str]) -> tuple[list[str], bool]:
    """``-v``/``--verbose`` anywhere before ``--`` (before or after the command), out."""
    end = args.index("--") if "--" in args else len(args)
    kept = [a for a in args[:end] if a not in ("-v", "--verbose")] + args[end:]
    return kept, len(kept) != len(args)


def _empty_value(args: list[str]) -> str | None:
    """An option given an empty value (``--dataspace ""``, ``--profile=``): a script's unset
    variable, which would otherwise silently mean the default."""
    for i, a in enumerate(args):
        if a == "--":
            return None
        if a.startswith("--") and a.endswith("=") and len(a) > 3:
            return a[:-1]
        if a == "" and i > 0 and args[i - 1].startswith("-"):
            return args[i - 1]
        if a == "":
            return "an argument"
    return None


def main(argv: list[str] | None = None) -> int:
    command = typer.main.get_command(app)
    args, verbose = _split_verbose(list(sys.argv[1:] if argv is None else argv))
    _STATE.verbose = verbose
    empty = _empty_value(args)
    if empty:
        print(f"aif: error: {empty}: empty value (leave the option out for its default)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        rv = command.main(args=args, prog_name="aif", standalone_mode=False)
        return int(rv or 0)
    except typer.Abort:
        print("aif: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as err:
        return int(err.exit_code)
    except typer.TyperException as err:  # typer's own click: a usage error, a bad value
        return _usage_error(err)
    except AifError as err:
        if verbose or _STATE.verbose:
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
        if verbose or _STATE.verbose:
            traceback.print_exc()
        msg = " ".join(str(err).split()) or "no message"
        print(f"aif: error: {type(err).__name__}: {msg[:500]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
