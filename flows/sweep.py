"""`aif sweep`: ingest and preprocess as the pipeline does, then one job array of training
trials (a Slurm array on the site, child processes locally) through the job layer; the best
trial by the chosen metric, and every trial, as artifacts. A project's sweep tunes its own
script's ``job.config``."""

from __future__ import annotations

import threading
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from aifactory.flows.ingest import ingest_flow
from aifactory.flows.preprocess import preprocess_flow
from aifactory.tasks.core.config import load_profile, run_scope
from aifactory.tasks.core.manifests import FeatureSet
from aifactory.tasks.doors.runtime import (
    artifact_markdown,
    artifact_table,
    cancellation_watch,
    stage_logger,
)
from aifactory.tasks.jobs.executors import executor_for


@task(name="sweep-job-array", cache_policy=NO_CACHE)
def sweep_task(fset: FeatureSet, profile: str, startup: str | None,
               overrides: dict[str, Any] | None, trials: list[dict[str, Any]],
               max_parallel: int, metric: str | None) -> dict[str, Any]:  # fmt: skip
    from aifactory.tasks.jobs.admission import admit
    from aifactory.tasks.stages.sweep import run_sweep

    cfg = load_profile(profile, overrides)
    sid, st = cfg.tenant(startup)
    cfg = cfg.for_startup(sid)  # the start-up's own object-store identity, if the site has one
    spec = cfg.training
    slurm = cfg.slurm_client() if spec.executor == "slurm" else None
    executor = executor_for(spec.executor, slurm, poll_seconds=spec.poll_seconds,
                            max_resubmits=spec.max_resubmits,
                            describe=f"account {st.account}, partition {spec.partition}, "
                                     f"gres gpu:{spec.gpus_per_node}")  # fmt: skip
    say = stage_logger("sweep")
    cancel = threading.Event()
    with cancellation_watch(cancel, log=say):
        return run_sweep(
            trials, spec=spec, account=st.account, featureset=fset, runs_dir=cfg.runs_dir,
            executor=executor, max_parallel=max_parallel, log=say, cancel_event=cancel,
            metric=metric or sweep_metric(cfg), env=cfg.child_env(),
            higher_is_better=bool(spec.script) and cfg.promotion.higher_is_better,
            admit=lambda: admit(sid, st, spec, slurm, jobs=len(trials)),
        )  # fmt: skip


def sweep_metric(cfg: Any) -> str:
    """What a sweep compares when not told: the reference payload's validation RMSE, or a
    project's promotion metric."""
    return cfg.promotion.metric if cfg.training.script else "val_rmse"


@flow(name="aif-sweep", log_prints=False)
def sweep_flow(profile: str = "site", startup: str | None = None,
               overrides: dict[str, Any] | None = None,
               trials: list[dict[str, Any]] | None = None, max_parallel: int = 2,
               metric: str | None = None) -> dict[str, Any]:  # fmt: skip
    from aifactory.tasks.core.audit import refusals_audited
    from aifactory.tasks.doors.console import console_scope, label_current_run, label_for

    with run_scope(profile, overrides) as cfg, \
            refusals_audited(cfg, startup, f"run aif-sweep (profile {profile})"):  # fmt: skip
        sid, st = cfg.startup(startup)
        label = label_for(cfg, sid, "sweep")
        label_current_run(label)
        with console_scope(label):
            return _sweep(cfg, profile, sid, st, overrides, trials or [], max_parallel, metric)


def _sweep(cfg: Any, profile: str, sid: str, st: Any, overrides: dict[str, Any] | None,
           trials: list[dict[str, Any]], max_parallel: int,
           metric: str | None) -> dict[str, Any]:  # fmt: skip
    from aifactory.tasks.core.tenancy import check_run
    from aifactory.tasks.jobs.admission import admit_declaration

    check_run(cfg, sid)  # isolation.* (exit 6), before anything is read or submitted
    print(f"admission: {admit_declaration(sid, st, 'sweep')}", flush=True)
    print("[1/3] ingest", flush=True)
    snap = ingest_flow(profile, sid, overrides)
    print("[2/3] preprocess", flush=True)
    fset = preprocess_flow(snap, profile, sid, overrides)
    print("[3/3] sweep", flush=True)
    record = sweep_task(fset, profile, sid, overrides, trials, max_parallel, metric)
    metric = record["metric"]
    rows = [{"trial": r["trial"], **{k: str(v) for k, v in r["params"].items()},
             "state": r["state"], metric: r[metric], "job": r["job"]}
            for r in record["trials"]]  # fmt: skip
    artifact_table("sweep-trials", rows, f"Trials of sweep {record['sweep_key']}")
    best = record["best"]
    artifact_markdown(
        "sweep-best",
        f"# Sweep `{record['sweep_key']}`\n\n- job array: {record['job_array']} "
        f"({len(rows)} trials, {record['executor']})\n- best: trial {best['trial']} with "
        f"`{best['params']}`: {metric} = {best[metric]:.4f}\n- folder: `{record['sweep_dir']}`\n",
    )
    return record
