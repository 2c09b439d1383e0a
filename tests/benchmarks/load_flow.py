"""The nightly of one load-test start-up (tests/benchmarks/bench_load.py): pipeline-shaped
and small, so that the benchmark measures the control plane, not the work.

Four stage subflows, as the pipeline has: ingest writes a small Parquet file, preprocess
reads it back, train runs one Slurm job under the start-up's account through the
platform's job layer (submit, watch, reattach: tasks/jobs/slurm_watch.py), register
writes the version's record; each stage logs and publishes an artifact with the
start-up's key prefix, and the run is named and tagged as the console names any run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from prefect import flow, task

from aifactory.tasks.doors.console import (
    RunLabel,
    console_scope,
    current_trigger,
    label_current_run,
)
from aifactory.tasks.doors.runtime import artifact_markdown, flow_run_id, stage_logger


def _folder(startup: str) -> Path:
    root = Path(os.environ["AIF_LOAD_DIR"]) / startup / (flow_run_id() or "run")
    root.mkdir(parents=True, exist_ok=True)
    return root


@task
def write_rows(startup: str) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _folder(startup) / "rows.parquet"
    pq.write_table(pa.table({"x": list(range(2000)), "y": [i * 0.5 for i in range(2000)]}), path)
    return str(path)


@flow(name="load-ingest")
def ingest(startup: str) -> str:
    path = write_rows(startup)
    stage_logger("ingest")(f"wrote {path}")
    artifact_markdown("ingest-summary", f"# ingest\n\n{path}\n")
    return path


@flow(name="load-preprocess")
def preprocess(path: str) -> float:
    import pyarrow.parquet as pq

    mean = float(pq.read_table(path).column("y").to_pandas().mean())
    artifact_markdown("preprocess-summary", f"# preprocess\n\nmean {mean}\n")
    return mean


@flow(name="load-train")
def train(startup: str) -> str:
    from aifactory.tasks.doors.slurm import SlurmClient
    from aifactory.tasks.jobs.slurm_watch import submit_and_watch

    say = stage_logger("train")
    run_dir = _folder(startup)
    name = f"aif-load-{startup}-{(flow_run_id() or 'run')[:8]}"
    script = run_dir / "train.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"#SBATCH --job-name={name}\n#SBATCH --account={startup}\n#SBATCH --partition=cpu\n"
        f"#SBATCH --cpus-per-task=1\n#SBATCH --mem=256M\n#SBATCH --output={run_dir}/job.log\n"
        f"#SBATCH --chdir={run_dir}\n"
        "python3 -c 'print(sum(i * i for i in range(200000)))'\n"
    )  # fmt: skip
    client = SlurmClient(env={"SLURM_CONF": os.environ["SLURM_CONF"]})
    job_id, rec = submit_and_watch(client, str(script), str(run_dir), name, say, poll_s=1.0)
    artifact_markdown("training-run", f"# training\n\njob {job_id}: {rec.get('State')}\n")
    return job_id


@flow(name="load-register")
def register(startup: str, job_id: str, mean: float) -> str:
    record = _folder(startup) / "version.json"
    record.write_text(json.dumps({"startup": startup, "job": job_id, "mean": mean}))
    artifact_markdown("registered-model", f"# version\n\njob {job_id}\n")
    return str(record)


@flow(name="load-pipeline")
def load_pipeline(startup: str) -> str:
    label = RunLabel(startup, "load", "load-rows", "load-test", *current_trigger())
    label_current_run(label)
    with console_scope(label):
        path = ingest.with_options(flow_run_name=label.stage("ingest"))(startup)
        mean = preprocess.with_options(flow_run_name=label.stage("preprocess"))(path)
        job = train.with_options(flow_run_name=label.stage("train"))(startup)
        return register.with_options(flow_run_name=label.stage("register"))(startup, job, mean)
