"""Stage 3, train: FeatureSet -> TrainedModel, as a Slurm GPU job (site) or a local process.

The run key (feature set, training spec, environment, start-up) names the run directory and
the Slurm job, so a re-run reattaches to a live job or reuses a finished run instead of
submitting a second one.
"""

from __future__ import annotations

import threading
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.manifests import FeatureSet, TrainedModel
from aifactory.tasks.doors.runtime import (
    artifact_markdown,
    cancellation_watch,
    md_table,
    stage_logger,
)


@task(name="train-model", cache_policy=NO_CACHE)
def train_task(
    fset: FeatureSet, profile: str, startup: str | None, overrides: dict[str, Any] | None
) -> TrainedModel:
    from aifactory.tasks.jobs.admission import admit
    from aifactory.tasks.stages.training import train, train_run_key

    cfg = load_profile(profile, overrides)
    sid, st = cfg.tenant(startup)
    cfg = cfg.for_startup(sid)  # the start-up's own object-store identity, if the site has one
    spec = cfg.training
    run_key = train_run_key(cfg, st.account, fset)
    slurm = cfg.slurm_client() if spec.executor == "slurm" else None
    say = stage_logger("train")
    # Cancelling the run in the UI scancels the training job (within a few seconds).
    with cancellation_watch(threading.Event(), log=say) as cancel:
        return train(
            spec=spec,
            account=st.account,
            featureset=fset,
            runs_dir=cfg.runs_dir,
            run_key=run_key,
            slurm=slurm,
            env=cfg.child_env(),
            log=say,
            cancel_event=cancel,
            admit=lambda: admit(sid, st, spec, slurm),
            flavour=cfg.mlflow.flavour,
        )


@flow(name="train", log_prints=False)
def train_flow(
    featureset: FeatureSet,
    profile: str = "local",
    startup: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainedModel:
    trained = train_task(featureset, profile, startup, overrides)
    say = stage_logger("train")
    m = trained.metrics
    shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(m.items())[:6])
    say(f"run {trained.run_key}: {shown or 'no metrics'}")
    sacct_rows = [{"field": k, "value": v} for k, v in trained.sacct.items()]
    artifact_markdown(
        "training-run",
        f"# Training run `{trained.run_key}`\n\n- executor: {trained.executor}\n"
        f"- Slurm jobs: {', '.join(trained.slurm_job_ids) or 'none (local process)'}\n"
        f"- restarts (requeues and resubmissions): {trained.sacct.get('aif_restarts', '0')}\n"
        f"- run dir: `{trained.run_dir}`\n\n## Metrics\n\n"
        + md_table([{"metric": k, "value": v} for k, v in sorted(m.items())])
        + ("\n\n## sacct\n\n" + md_table(sacct_rows) if sacct_rows else ""),
    )
    return trained
