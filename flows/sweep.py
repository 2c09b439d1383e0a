"""`aif sweep`: ingest and preprocess as the pipeline does, then one Slurm job array of
training trials; the best trial by its validation metric, and every trial, as artifacts."""

from __future__ import annotations

import threading
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from aifactory.flows.ingest import ingest_flow
from aifactory.flows.preprocess import preprocess_flow
from aifactory.tasks.config import load_profile
from aifactory.tasks.errors import ConfigError
from aifactory.tasks.manifests import FeatureSet
from aifactory.tasks.runtime import (
    artifact_markdown,
    artifact_table,
    cancellation_watch,
    stage_logger,
)
from aifactory.tasks.slurm import SlurmClient


@task(name="sweep-job-array", cache_policy=NO_CACHE)
def sweep_task(fset: FeatureSet, profile: str, startup: str | None,
               overrides: dict[str, Any] | None, trials: list[dict[str, Any]],
               max_parallel: int, metric: str) -> dict[str, Any]:  # fmt: skip
    from aifactory.tasks.sweep import run_sweep

    cfg = load_profile(profile, overrides)
    sid, st = cfg.tenant(startup)
    if cfg.training.executor != "slurm":
        raise ConfigError(
            f"profile {cfg.name!r}: sweeps run as Slurm job arrays (training.executor slurm)"
        )
    from aifactory.tasks.admission import admit

    slurm = SlurmClient(env=cfg.child_env())
    say = stage_logger("sweep")
    say(admit(sid, st, cfg.training, slurm, jobs=len(trials)))
    with cancellation_watch(threading.Event(), log=say):
        return run_sweep(trials, spec=cfg.training, account=st.account, featureset=fset,
                         runs_dir=cfg.runs_dir, slurm=slurm, max_parallel=max_parallel,
                         metric=metric, log=say)  # fmt: skip


@flow(name="aif-sweep", log_prints=False)
def sweep_flow(profile: str = "site", startup: str | None = None,
               overrides: dict[str, Any] | None = None,
               trials: list[dict[str, Any]] | None = None, max_parallel: int = 2,
               metric: str = "val_rmse") -> dict[str, Any]:  # fmt: skip
    from aifactory.tasks.admission import admit_declaration
    from aifactory.tasks.tenancy import check_run

    cfg = load_profile(profile, overrides)
    sid, st = cfg.startup(startup)
    check_run(cfg, sid)  # isolation.* (exit 6), before anything is read or submitted
    print(f"admission: {admit_declaration(sid, st, 'sweep')}", flush=True)
    print("[1/3] ingest", flush=True)
    snap = ingest_flow(profile, sid, overrides)
    print("[2/3] preprocess", flush=True)
    fset = preprocess_flow(snap, profile, sid, overrides)
    print("[3/3] sweep", flush=True)
    record = sweep_task(fset, profile, sid, overrides, trials or [], max_parallel, metric)
    rows = [{"trial": r["trial"], **{k: str(v) for k, v in r["params"].items()},
             "state": r["state"], metric: r[metric], "test_rmse": r["test_rmse"],
             "job": r["job"]} for r in record["trials"]]  # fmt: skip
    artifact_table("sweep-trials", rows, f"Trials of sweep {record['sweep_key']}")
    best = record["best"]
    artifact_markdown(
        "sweep-best",
        f"# Sweep `{record['sweep_key']}`\n\n- job array: {record['job_array']} "
        f"({len(rows)} trials, one sbatch call)\n- best: trial {best['trial']} with "
        f"`{best['params']}`: {metric} = {best[metric]:.4f}\n- folder: `{record['sweep_dir']}`\n",
    )
    return record
