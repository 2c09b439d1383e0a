"""`aif train-lm`: the language-model reference payload on a data space's text.

Ingests the tourism-reviews dataset through the same contract-checked ingestion as the
pipeline (data space -> committed lake snapshot), then trains the tiny causal LM on the
snapshot's files: as a Slurm GPU job (profile ``site``: partition, gres, account from the
profile's training spec) or as a local process. The run directory keeps the rendered
script, the job's log, the checkpoint and the metrics (tokens/s, stall fraction).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aifactory.tasks.config import Profile, TrainingSpec
from aifactory.tasks.errors import TrainingError
from aifactory.tasks.jobs import JobRequest, executor_for, owner
from aifactory.tasks.lake import write_text_local
from aifactory.tasks.provenance import key_of
from aifactory.tasks.slurm import SlurmClient
from aifactory.tasks.training import render_sbatch

DATASET = "tourism-reviews"
PURPOSE = "language-modelling"


def run_lm(
    cfg: Profile, *, startup: str | None, data_url: str | None, steps: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:  # fmt: skip
    from aifactory.flows.ingest import run_ingest
    from aifactory.tasks.generators import seed_entry

    sid, st = cfg.startup(startup)
    ds = cfg.dataspace.model_copy(update={"dataset": DATASET, "url": data_url})
    cfg = cfg.model_copy(update={"dataspace": ds})
    entry = cfg.dataset_entry(DATASET)
    url = cfg.dataset_url(entry)
    seeding = cfg.dataspace.generate is not None and data_url is None
    if seeding and seed_entry(entry, url, cfg.storage_options(url)):
        log(f"seeded {url} with generated reviews")
    snap = run_ingest(cfg, sid, DATASET, purpose=PURPOSE, say=log)
    files = [o.lake_path for o in snap.objects]
    spec = cfg.training.model_copy(update={"payload": "lm"})
    run_key = key_of("lm", snap.content_hash(), steps, spec.model_dump(mode="json"))
    run_dir = Path(cfg.runs_dir) / "lm" / run_key
    run_dir.mkdir(parents=True, exist_ok=True)
    with owner(run_dir, log):  # one process trains a run key; others wait, then collect
        return _run_owned(cfg, st.account, spec, run_dir, run_key, snap.snapshot_id, files,
                          steps, log)  # fmt: skip


def _run_owned(
    cfg: Profile, account: str, spec: TrainingSpec, run_dir: Path, run_key: str, snapshot_id: str,
    files: list[str], steps: int, log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and (run_dir / "weights.sha256").exists():
        log(f"run {run_key} already finished: collecting it, nothing submitted")
        return _result(run_dir, snapshot_id, _job_ids(run_dir), reused=True)
    cfg_path = run_dir / "config.json"
    write_text_local(cfg_path, json.dumps({"steps": steps, "seed": spec.seed}))
    args = ["--data", ",".join(files), "--run-dir", str(run_dir), "--config", str(cfg_path)]
    job_name = f"aif-lm-{run_key}"
    script = render_sbatch(
        spec, account=account, job_name=job_name, run_key=run_key, run_dir=str(run_dir),
        python=sys.executable, featureset_path="", config_path=str(cfg_path), payload_args=args,
    )  # fmt: skip
    script_path = run_dir / "train.sbatch"
    write_text_local(script_path, script)
    client = SlurmClient(env=cfg.child_env()) if spec.executor == "slurm" else None
    executor = executor_for(spec.executor, client, poll_seconds=spec.poll_seconds,
                            max_resubmits=spec.max_resubmits)  # fmt: skip
    cmd = [sys.executable, "-m", "aifactory.tasks.payloads.train_lm", *args]
    res = executor.run(JobRequest(job_name, run_dir, script_path, cmd, cfg.child_env(), log))
    job_ids = res.job_ids
    if not metrics_path.exists():
        raise TrainingError(f"language-model run in {run_dir} ended without metrics.json")
    write_text_local(run_dir / "jobs.json", json.dumps(job_ids))
    return _result(run_dir, snapshot_id, job_ids, reused=False)


def _job_ids(run_dir: Path) -> list[str]:
    path = run_dir / "jobs.json"
    return list(json.loads(path.read_text())) if path.exists() else []


def _result(run_dir: Path, snapshot_id: str, job_ids: list[str], reused: bool) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "snapshot": snapshot_id,
        "job_ids": job_ids,
        "reused": reused,
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "weights_sha256": (run_dir / "weights.sha256").read_text().strip(),
    }
