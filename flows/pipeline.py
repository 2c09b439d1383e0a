"""The whole path from data space to registered model: four subflows, each in the UI.

    ingest -> preprocess -> train -> register

Each stage returns a typed manifest that the next one takes. The run's resolved config
(secrets masked) and every manifest id are saved in ``<runs_dir>/pipeline/<flow-run>.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.ingest import ingest_flow
from flows.preprocess import preprocess_flow
from flows.register import register_flow
from flows.train import train_flow
from tasks.config import load_profile
from tasks.provenance import git_info, now_iso
from tasks.runtime import artifact_markdown, flow_run_id, md_table


def _banner(n: int, name: str) -> None:
    print(f"[{n}/4] {name}", flush=True)


@flow(name="aif-pipeline", log_prints=False)
def pipeline(
    profile: str = "local", startup: str | None = None, overrides: dict[str, Any] | None = None
) -> str:
    """Run ingest, preprocess, train and register; return the model URI models:/NAME/VER."""
    cfg = load_profile(profile, overrides)
    sid, st = cfg.startup(startup)
    times: dict[str, float] = {}

    t = time.monotonic()
    _banner(1, "ingest")
    snap = ingest_flow(profile, sid, overrides)
    times["ingest"] = time.monotonic() - t

    t = time.monotonic()
    _banner(2, "preprocess")
    fset = preprocess_flow(snap, profile, sid, overrides)
    times["preprocess"] = time.monotonic() - t

    t = time.monotonic()
    _banner(3, "train")
    trained = train_flow(fset, profile, sid, overrides)
    times["train"] = time.monotonic() - t

    t = time.monotonic()
    _banner(4, "register")
    mv = register_flow(trained, fset, snap, profile, sid, overrides)
    times["register"] = time.monotonic() - t

    reused = {"ingest": snap.reused, "preprocess": fset.reused, "train": trained.reused,
              "register": mv.reused}  # fmt: skip
    if all(reused.values()):
        verdict = ("Nothing changed: no data bytes read, no Slurm job submitted, "
                   "no new model version registered.")  # fmt: skip
    else:
        verdict = "Ran: " + ", ".join(k for k, v in reused.items() if not v) + "."
    print(f"summary: {verdict}", flush=True)

    record = {
        "flow_run_id": flow_run_id(),
        "finished_at": now_iso(),
        "profile": cfg.public_dict(),
        "startup": sid,
        "git": git_info(),
        "snapshot": {"id": snap.snapshot_id, "hash": snap.content_hash()},
        "featureset": {"id": fset.featureset_id, "hash": fset.content_hash()},
        "trained": {
            "run_key": trained.run_key,
            "hash": trained.content_hash(),
            "slurm_job_ids": trained.slurm_job_ids,
            "run_dir": trained.run_dir,
        },
        "model": {"uri": mv.uri, "fingerprint": mv.fingerprint},
        "stage_seconds": {k: round(v, 2) for k, v in times.items()},
        "reused": reused,
    }
    out = Path(cfg.runs_dir) / "pipeline" / f"{record['flow_run_id'] or 'run'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True))
    tmp.replace(out)

    rows = [
        {
            "stage": "ingest",
            "seconds": round(times["ingest"], 1),
            "output": f"snapshot {snap.snapshot_id} ({snap.rows} rows)",
        },
        {
            "stage": "preprocess",
            "seconds": round(times["preprocess"], 1),
            "output": f"features {fset.featureset_id}; Dask jobs "
            f"{', '.join(fset.slurm_job_ids) or 'local'}",
        },
        {
            "stage": "train",
            "seconds": round(times["train"], 1),
            "output": f"run {trained.run_key}; Slurm jobs "
            f"{', '.join(trained.slurm_job_ids) or 'local'}; "
            f"test RMSE {trained.metrics.get('test_rmse', float('nan')):.3f} min",
        },
        {
            "stage": "register",
            "seconds": round(times["register"], 1),
            "output": f"{mv.uri} (alias candidate)",
        },
    ]
    for row in rows:
        row["cache"] = "reused" if reused[str(row["stage"])] else "ran"
    artifact_markdown(
        "pipeline-summary",
        f"# aifactory pipeline: {st.title or sid}\n\n- profile: `{cfg.name}`\n"
        f"- start-up: `{sid}` (account `{st.account}`, project `{st.project}`)\n"
        f"- model: `{mv.uri}`\n- {verdict}\n\n{md_table(rows)}\n",
        description="Stages, outputs and durations of this pipeline run",
    )
    return mv.uri


if __name__ == "__main__":
    print(pipeline())
