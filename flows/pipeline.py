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

from aifactory.flows.ingest import ingest_flow
from aifactory.flows.preprocess import preprocess_flow
from aifactory.flows.register import DOCUMENTS, register_flow
from aifactory.flows.train import train_flow
from aifactory.tasks.core.audit import refusals_audited
from aifactory.tasks.core.config import Profile, run_scope
from aifactory.tasks.core.provenance import git_info, now_iso
from aifactory.tasks.core.tenancy import check_run
from aifactory.tasks.doors.console import (
    RunLabel,
    artifact_url,
    console_scope,
    find_artifact,
    label_current_run,
    label_for,
    published_id,
)
from aifactory.tasks.doors.registry import ui_url, version_markdown
from aifactory.tasks.doors.runtime import (
    artifact_link,
    artifact_markdown,
    artifact_table,
    flow_run_id,
    md_table,
    one_line_refusals,
)
from aifactory.tasks.jobs.admission import admit_declaration

one_line_refusals()  # the pipeline's stage flows and tasks log in this process


def _banner(n: int, name: str) -> None:
    print(f"[{n}/4] {name}", flush=True)


@flow(name="aif-pipeline", log_prints=False)
def pipeline(
    profile: str = "local",
    startup: str | None = None,
    overrides: dict[str, Any] | None = None,
    promote: bool = False,
    project: str | None = None,
) -> str:
    """Run ingest, preprocess, train and register; return the model URI models:/NAME/VER.

    ``project``: a start-up's project (its ``aifactory.yaml`` or folder; relative to the
    working folder, as in a deployment that pulled the project): its data set, features,
    trainer and model replace the profile's, and its start-up is the default.
    With ``promote`` (the nightly deployments), the registered version then goes through
    the promotion gates (profile section ``promotion``) and may become the champion."""
    name = None
    if project:
        from aifactory.tasks.core.project import find_project, project_name, project_overrides

        found = find_project(project) or project
        own, settings = project_overrides(found)
        name = project_name(found)  # the console's project: the start-up's own project
        startup = startup or own
        overrides = {**settings, **(overrides or {})}  # explicit flags still win
    # The run's configuration is resolved once: the stages' load_profile returns this one.
    # A refusal (admission, usage policy, isolation, the object store) is audited.
    with run_scope(profile, overrides) as cfg, \
            refusals_audited(cfg, startup, f"run aif-pipeline (profile {profile})"):  # fmt: skip
        return _stages(cfg, profile, startup, overrides, promote, name)


def _stages(cfg: Profile, profile: str, startup: str | None, overrides: dict[str, Any] | None,
            promote: bool, project: str | None = None) -> str:  # fmt: skip
    sid, st = cfg.startup(startup)
    # The console's name and tags (tasks/doors/console.py) first: a refused run is found too.
    label = label_for(cfg, sid, project=project)
    label_current_run(label)
    with console_scope(label):
        return _named_stages(cfg, profile, sid, st, overrides, promote, label)


def _stage(flow_obj: Any, label: RunLabel, stage: str) -> Any:
    """A stage flow whose run is named ``<run name> · <stage>`` (braces kept literal:
    Prefect formats a run name with the parameters)."""
    if not hasattr(flow_obj, "with_options"):  # a plain function in its place (tests)
        return flow_obj
    name = label.stage(stage).replace("{", "{{").replace("}", "}}")
    return flow_obj.with_options(flow_run_name=name)


def _named_stages(cfg: Profile, profile: str, sid: str, st: Any,
                  overrides: dict[str, Any] | None, promote: bool,
                  label: RunLabel) -> str:  # fmt: skip
    # Before any byte is ingested or any job submitted: the tenant's own prefix, account
    # and data space (isolation.*, exit 6), and an approved declaration (exit 5).
    check_run(cfg, sid)
    print(f"admission: {admit_declaration(sid, st)}", flush=True)
    times: dict[str, float] = {}

    t = time.monotonic()
    _banner(1, "ingest")
    snap = _stage(ingest_flow, label, "ingest")(profile, sid, overrides)
    times["ingest"] = time.monotonic() - t

    t = time.monotonic()
    _banner(2, "preprocess")
    fset = _stage(preprocess_flow, label, "preprocess")(snap, profile, sid, overrides)
    times["preprocess"] = time.monotonic() - t

    t = time.monotonic()
    _banner(3, "train")
    trained = _stage(train_flow, label, "train")(fset, profile, sid, overrides)
    times["train"] = time.monotonic() - t

    t = time.monotonic()
    _banner(4, "register")
    mv = _stage(register_flow, label, "register")(trained, fset, snap, profile, sid, overrides)
    times["register"] = time.monotonic() - t

    decision = None
    if promote:
        from aifactory.tasks.models.promotion import promote as decide

        decision = decide(cfg.mlflow.tracking_uri, cfg.mlflow.model_name, version=mv.version,
                          spec=cfg.promotion, approved=cfg.declaration_approved,
                          risk_class=cfg.risk_class, acting=cfg.registry_for(sid),
                          reading=cfg.as_operator().mlflow)  # fmt: skip
        print(f"promotion: version {decision.candidate} "
              f"{'promoted to champion' if decision.promoted else 'not promoted'} "
              f"({decision.reason})", flush=True)  # fmt: skip

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

    registered = "already registered: no alias moved" if mv.reused else "alias candidate"
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
            f"{cfg.promotion.metric} "
            f"{trained.metrics.get(cfg.promotion.metric, float('nan')):.4g}",
        },
        {
            "stage": "register",
            "seconds": round(times["register"], 1),
            "output": f"{mv.uri} ({registered})",
        },
    ]
    for row in rows:
        row["cache"] = "reused" if reused[str(row["stage"])] else "ran"
    _publish_summary(cfg, sid, st, snap, fset, trained, mv, decision, rows, verdict)
    return mv.uri


def _publish_summary(cfg: Any, sid: str, st: Any, snap: Any, fset: Any, trained: Any, mv: Any,
                     decision: Any, rows: list[dict[str, Any]], verdict: str) -> None:  # fmt: skip
    """The operators' view of the run: stages, data, jobs, GPU-hours and cost, the version
    and its promotion, metrics, and links to MLflow and the Dask dashboard."""
    from aifactory.tasks.jobs.usage import HPC_CPU_RATE, HPC_GPU_RATE, job_hours

    jobs = list(trained.slurm_job_ids) + list(fset.slurm_job_ids)
    cpu_h = gpu_h = 0.0
    states: dict[str, str] = {}
    if (
        jobs
        and (trained.executor == "slurm" or cfg.dask.kind == "slurm")
        and not (trained.reused and fset.reused)
    ):
        try:
            cpu_h, gpu_h, states = job_hours(cfg.slurm_client(), jobs)
        except Exception as exc:  # the summary never fails the run
            states = {"sacct": f"unavailable: {exc}"}
    cost = gpu_h * HPC_GPU_RATE + cpu_h * HPC_CPU_RATE
    model_url = ui_url(cfg.mlflow.tracking_uri, mv.name, mv.version)
    dashboard = (fset.cluster or {}).get("dashboard") or ""
    if decision is None:
        moved = "alias `candidate` unchanged" if mv.reused else "alias `candidate`"
        promo = f"not asked ({moved}; `aif model promote` decides)"
    elif decision.promoted:
        promo = f"**promoted to champion** ({decision.reason})"
    else:
        promo = f"kept: not promoted ({decision.reason})"
    docs = []
    folder = Path(cfg.runs_dir) / "models" / mv.name / mv.version
    for key, title, file in (("model-card", "model card", "model_card.md"),
                             ("training-data-summary", "training-data summary",
                              "training_data_summary.md")):  # fmt: skip
        # By this run's register stage; else the run's that registered the version.
        made = published_id(key) or find_artifact(key, DOCUMENTS[key].format(mv.name, mv.version))
        shown = f"[{title}]({artifact_url(made)})" if made else title
        docs.append(f"{shown}: `{folder / file}`")
    job_rows = [{"job": j, "state": s} for j, s in sorted(states.items())]
    metric_rows = [{"metric": k, "value": f"{v:.4f}" if isinstance(v, float) else v}
                   for k, v in sorted(trained.metrics.items())]  # fmt: skip
    artifact_markdown(
        "pipeline-summary",
        f"# aifactory pipeline: {st.title or sid}\n\n- profile: `{cfg.name}`\n"
        f"- start-up: `{sid}` (account `{st.account}`, project `{st.project}`)\n"
        f"- data snapshot: `{snap.snapshot_id}` ({snap.rows} rows, dataset `{snap.dataset}`)\n"
        f"- model: {version_markdown(cfg.mlflow.tracking_uri, mv.name, mv.version)}; "
        f"promotion: {promo}\n- documents: {'; '.join(docs)}\n"
        f"- Slurm usage of this run: {gpu_h:.3f} GPU-hours, {cpu_h:.3f} CPU-hours, about "
        f"EUR {cost:.2f} at the HPC rate\n"
        f"- Dask dashboard (while the stage ran): {dashboard or 'none'}\n- {verdict}\n\n"
        f"## Stages\n\n{md_table(rows)}\n\n## Slurm jobs\n\n{md_table(job_rows)}\n\n"
        f"## Metrics\n\n{md_table(metric_rows)}\n",
        description="Stages, data, jobs, GPU-hours and cost, model version and promotion",
    )
    artifact_table("pipeline-metrics", metric_rows, description="Held-out metrics of the model")
    if model_url is not None:  # a local store (sqlite, file) has no URL to link to
        artifact_link("mlflow-model-version", model_url, f"{mv.name} version {mv.version}",
                      description="The registered model version in MLflow")  # fmt: skip


if __name__ == "__main__":
    print(pipeline())
