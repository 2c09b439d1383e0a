"""Stage 2, preprocess: DataSnapshot -> FeatureSet on Dask (LocalCluster or Slurm workers).

On profile ``site`` the workers are dask-jobqueue Slurm jobs on the CPU partition under the
start-up's account; they are all gone from squeue when the stage ends, however it ends.
An unchanged snapshot and feature config hit the cache: no cluster is started.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet
from aifactory.tasks.core.provenance import key_of
from aifactory.tasks.doors.dask_cluster import drain_margin_s, open_cluster
from aifactory.tasks.doors.runtime import (
    artifact_markdown,
    cancellation_watch,
    md_table,
    stage_logger,
)
from aifactory.tasks.jobs.executors import owner
from aifactory.tasks.stages.features import resolve_config
from aifactory.tasks.stages.preprocess import load_cached, plan, run_preprocess


@task(name="featurise-on-dask", cache_policy=NO_CACHE)
def featurise(
    snapshot: DataSnapshot,
    profile: str,
    startup: str | None,
    overrides: dict[str, Any] | None,
    fs_id: str,
    config: dict[str, Any],
) -> FeatureSet:
    cfg = load_profile(profile, overrides)
    sid, st = cfg.startup(startup)
    cfg = cfg.for_startup(sid)  # the start-up's own object-store identity, if the site has one
    lake = cfg.lake_url_for(startup)
    say = stage_logger("preprocess")
    slurm = cfg.slurm_client() if cfg.dask.kind == "slurm" else None
    job_name = f"aif-dask-{key_of(fs_id, st.account)[:10]}"
    log_dir = str(Path(cfg.runs_dir) / "dask" / fs_id)
    # Cancelling the run in the UI stops the partitions and gives back every worker job.
    with (
        cancellation_watch(threading.Event(), log=say) as cancel,
        open_cluster(
            cfg.dask, account=st.account, job_name=job_name, slurm=slurm, log_dir=log_dir, log=say
        ) as (client, info),
    ):
        say(f"Dask {info.kind} cluster: dashboard {info.dashboard}")
        fset = run_preprocess(
            snapshot,
            lake_url=lake,
            storage_options=cfg.storage_options(lake),
            client=client,
            config=config,
            fs_id=fs_id,
            cluster_info=info.as_dict(),
            progress=say,
            cluster=info,
            cancel=cancel,
            margin_s=drain_margin_s(cfg.dask),
        )
    if info.job_script:
        artifact_markdown(
            "dask-worker-job",
            f"# Dask worker job script\n\n```bash\n"
            f"{info.job_script}\n```\n\nJobs: {', '.join(info.job_ids)}",
        )
    fset.cluster = info.as_dict()
    fset.slurm_job_ids = list(info.job_ids)
    return fset


@flow(name="preprocess", log_prints=False)
def preprocess_flow(
    snapshot: DataSnapshot,
    profile: str = "local",
    startup: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> FeatureSet:
    cfg = load_profile(profile, overrides)
    cfg = cfg.for_startup(cfg.startup(startup)[0])
    say = stage_logger("preprocess")
    fs_id, fconfig = plan(snapshot, resolve_config(cfg.features))
    lake = cfg.lake_url_for(startup)
    # One run computes a feature set at a time (a second run of the same input waits, then
    # finds it in the lake): two would share the worker jobs' name and cancel each other's.
    with owner(Path(cfg.runs_dir) / "dask" / fs_id, say, doing="featurised"):
        cached = load_cached(lake, fs_id, cfg.storage_options(lake))
        if cached is not None:
            say(f"feature set {fs_id} already in the lake: cache hit, no cluster started")
            return cached.model_copy(update={"reused": True})
        fset = featurise(snapshot, profile, startup, overrides, fs_id, fconfig)
    rows = [{"split": k, "rows": v.rows, "files": len(v.files)} for k, v in fset.splits.items()]
    say(
        f"feature set {fs_id}: "
        + ", ".join(f"{r['split']}={r['rows']}" for r in rows)
        + f"; dropped {sum(fset.rows_dropped.values())}"
    )
    artifact_markdown(
        "preprocess-summary",
        f"# Preprocess: feature set `{fs_id}`\n\n- snapshot: `{snapshot.snapshot_id}`\n"
        f"- rows in: {fset.rows_in}\n- dropped: {fset.rows_dropped}\n"
        f"- cluster: {fset.cluster.get('kind')}; Dask dashboard: {fset.cluster.get('dashboard')}\n"
        f"- worker jobs: {', '.join(fset.slurm_job_ids) or 'none (local)'}\n\n{md_table(rows)}\n",
    )
    return fset
