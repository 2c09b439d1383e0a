"""Stage 4, register: TrainedModel -> MLflow model version with lineage, alias candidate.

Idempotent: the version carries a fingerprint of the trained model; registering the same
model again returns the existing version instead of creating a second one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.jobfiles import read_job_text
from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet, ModelVersion, TrainedModel
from aifactory.tasks.core.provenance import git_info, now_iso
from aifactory.tasks.doors.registry import register_model, registry_identity, version_markdown
from aifactory.tasks.doors.runtime import artifact_markdown, flow_run_id, md_table, stage_logger
from aifactory.tasks.models.modelcard import (
    model_card,
    ro_crate,
    time_ranges,
    training_data_summary,
    write_documents,
)

# The version's documents as Prefect artifacts: key -> description (the summary of a later
# run that reuses the version finds them by it).
DOCUMENTS = {
    "model-card": "Model card of {} v{}",
    "training-data-summary": "Training data of {} v{}",
}


@task(name="register-in-mlflow", cache_policy=NO_CACHE)
def register_task(
    trained: TrainedModel,
    fset: FeatureSet,
    snap: DataSnapshot,
    profile: str,
    startup: str | None,
    overrides: dict[str, Any] | None,
) -> ModelVersion:
    cfg = load_profile(profile, overrides)
    sid, st = cfg.tenant(startup)
    cfg = cfg.for_startup(sid)  # the start-up's own object-store identity, if the site has one
    git = git_info()
    lineage = {
        "aif.git_commit": git["commit"],
        "aif.git_dirty": str(git["dirty"]).lower(),
        "aif.prefect_flow_run_id": flow_run_id(),
        "aif.startup": sid,
        "aif.account": st.account,
        "aif.project": st.project,
        "aif.profile": cfg.name,
        "aif.config_hash": cfg.config_hash(),
        "aif.dataset": snap.dataset,
    }
    if cfg.training.script:  # a project's own code: its repository's commit too
        own = git_info(Path(cfg.training.script).parent, owner=st.user)
        lineage["aif.project_commit"] = own["commit"]
        lineage["aif.project_dirty"] = str(own["dirty"]).lower()
    entry = cfg.dataset_entry(snap.dataset)
    env_path = Path(trained.run_dir) / "environment.json"
    software = json.loads(read_job_text(env_path)) if env_path.exists() else {}
    name = cfg.mlflow.model_name
    say = stage_logger("register")

    def documents(version: str) -> dict[str, str | dict[str, Any]]:
        ranges = time_ranges(snap, cfg.storage_options(cfg.lake_url_for(sid)))
        card = model_card(name=name, version=version, trained=trained, fset=fset, snap=snap,
                          entry=entry, startup=sid, startup_cfg=st, lineage=lineage)  # fmt: skip
        summary = training_data_summary(snap, entry, ranges)
        names = ["model_card.md", "training_data_summary.md"]
        crate = ro_crate(name=name, version=version, trained=trained, fset=fset, snap=snap,
                         entry=entry, startup=sid, lineage=lineage, software=software,
                         documents=names, created=now_iso())  # fmt: skip
        docs: dict[str, str | dict[str, Any]] = {
            "model_card.md": card, "training_data_summary.md": summary,
            "ro-crate-metadata.json": crate, "environment.json": software,
        }  # fmt: skip
        folder = Path(cfg.runs_dir) / "models" / name / version
        write_documents(folder, docs)
        say(f"model card, training-data summary and RO-Crate written to {folder}")
        artifact_markdown("model-card", card, DOCUMENTS["model-card"].format(name, version))
        artifact_markdown("training-data-summary", summary,
                          DOCUMENTS["training-data-summary"].format(name, version))  # fmt: skip
        return docs

    # The start-up's own registry user, on a site whose MLflow checks permissions.
    with registry_identity(cfg.mlflow):
        return register_model(
            trained,
            fset,
            snap,
            tracking_uri=cfg.mlflow.tracking_uri,
            model_name=name,
            experiment=cfg.mlflow.run_experiment,
            artifact_location=cfg.mlflow.artifact_location,
            lineage=lineage,
            feature_config=fset.feature_config,
            log=say,
            documents=documents,
            extra_artifacts={"lineage/config.json": cfg.public_dict()},
            flavour=cfg.mlflow.flavour,
            model_ref=cfg.mlflow.model_class or cfg.mlflow.python_model,
            source_dir=str(Path(cfg.training.script).parent) if cfg.training.script else None,
            run_as=st.user,
        )


@flow(name="register", log_prints=False)
def register_flow(
    trained: TrainedModel,
    featureset: FeatureSet,
    snapshot: DataSnapshot,
    profile: str = "local",
    startup: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> ModelVersion:
    mv = register_task(trained, featureset, snapshot, profile, startup, overrides)
    artifact_markdown("registered-model", registered_markdown(mv, trained))
    return mv


def registered_markdown(mv: ModelVersion, trained: TrainedModel) -> str:
    """The registered-model artifact: the version (a link only where MLflow has a UI URL),
    its aliases, run, fingerprint, metrics and lineage tags."""
    metrics = [{"metric": k, "value": round(v, 5)} for k, v in sorted(trained.metrics.items())]
    status = ("already registered: nothing registered, no alias moved" if mv.reused
              else "registered by this run")  # fmt: skip
    return (
        f"# Registered model `{mv.uri}`\n\n- {status}\n"
        f"- aliases: {', '.join(mv.aliases) or 'none'}\n"
        f"- MLflow: {version_markdown(mv.tracking_uri, mv.name, mv.version)}\n"
        f"- run: `{mv.run_id}`\n- fingerprint: `{mv.fingerprint}`\n\n"
        f"## Metrics\n\n{md_table(metrics)}\n\n## Lineage tags\n\n"
        + md_table([{"tag": k, "value": v} for k, v in sorted(mv.tags.items())])
    )
