"""Documentation generated at registration: model card, training-data summary, RO-Crate.

* ``model_card.md``: intended use, data, training, metrics, limitations and the start-up's
  responsible-AI declaration;
* ``training_data_summary.md``: the public summary of the content used for training
  (datasets, data spaces, publishers, licenses, usage policies, personal-data handling,
  sizes, time ranges), in the spirit of the EU AI Act's template for GPAI providers;
* ``ro-crate-metadata.json``: an RO-Crate 1.1 of the run (Workflow Run Crate profile)
  referencing its inputs (data objects), code (commit), environment (packages) and
  outputs (model version, documents).

All three are built from the stage manifests and the catalog entry: nothing is looked up
that the lineage does not already record, except the time ranges, which come from the lake
files' Parquet statistics (footers only).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pyarrow.parquet as pq

from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet, TrainedModel

WFRUN = "https://w3id.org/ro/wfrun"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} PB"


def time_ranges(snap: DataSnapshot, storage_options: dict[str, Any] | None) -> dict[str, str]:
    """min/max of every timestamp column, from the lake files' row-group statistics."""
    import fsspec

    cols = [f["name"] for f in snap.schema_fields if str(f["type"]).startswith("timestamp")]
    lo: dict[str, Any] = {}
    hi: dict[str, Any] = {}
    for o in snap.objects:
        with contextlib.suppress(Exception):
            fs, path = fsspec.core.url_to_fs(o.lake_path, **(storage_options or {}))
            with fs.open(path, "rb") as fh:
                md = pq.ParquetFile(fh).metadata
            names = [md.schema.column(j).name for j in range(md.num_columns)]
            for i in range(md.num_row_groups):
                rg = md.row_group(i)
                for c in cols:
                    st = rg.column(names.index(c)).statistics
                    if st is None or not st.has_min_max:
                        continue
                    lo[c] = min(lo.get(c, st.min), st.min)
                    hi[c] = max(hi.get(c, st.max), st.max)
    return {c: f"{_iso(lo[c])} to {_iso(hi[c])}" for c in cols if c in lo}


def _iso(v: Any) -> str:
    return v.isoformat().replace("+00:00", "Z") if hasattr(v, "isoformat") else str(v)


def training_data_summary(snap: DataSnapshot, entry: Any, ranges: dict[str, str]) -> str:
    pol = entry.policy
    personal = ", ".join(f"`{c}`" for c in pol.personal_data) or "none declared"
    pseudo = (
        f"replaced before ingestion by keyed pseudonyms ({snap.pseudonymisation.split(':')[0]}, "
        f"key fingerprint `{snap.pseudonymisation.split(':')[1]}`); raw values never reached "
        "the lake"
        if pol.personal_data
        else "no personal data declared in the dataset's contract"
    )
    decision = snap.policy or {}
    rng = "; ".join(f"`{c}`: {r}" for c, r in ranges.items()) or (entry.temporal or "not recorded")
    rows = [
        ("Dataset", f"{entry.title} (`{entry.id}`)"),
        ("Data space", entry.data_space),
        ("Publisher", entry.publisher),
        ("License", entry.license),
        ("Distribution", f"`{snap.source_url}` ({snap.format})"),
        ("Snapshot", f"`{snap.snapshot_id}` (manifest hash `{snap.content_hash()[:16]}`)"),
        ("Size", f"{snap.rows:,} rows in {len(snap.objects)} objects, {_fmt_bytes(snap.bytes)}"),
        ("Time range", rng),
        (
            "Usage policy",
            f"start-ups {', '.join(pol.allowed_startups)}; purposes "
            f"{', '.join(pol.allowed_purposes)}; valid until {pol.valid_until}",
        ),
        (
            "Policy decision",
            f"{'allowed' if decision.get('allowed') else 'refused'} for "
            f"{decision.get('startup')} ({decision.get('purpose')}) by "
            f"`{decision.get('rule')}` on {decision.get('checked_on')}",
        ),
        ("Personal data", f"{personal}: {pseudo}"),
        ("Quarantined objects", str(len(snap.quarantined))),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (
        "# Public summary of the training data\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        f"{entry.description}\n\n"
        "Every object used (key, ETag, size, rows, content hash of its lake copy) is listed in "
        "the snapshot manifest, logged with the model as `lineage/data_snapshot.json`.\n"
    )


SLURM_PARAMS = ("partition", "gpus_per_node")  # a Slurm job's resources, not a local run's
DEVICES = {"cpu": "CPU", "cuda": "GPU", "mps": "Apple GPU"}


def where_trained(trained: TrainedModel) -> str:
    """Where the model was trained, in words: ``local (this machine, CPU)``, or ``slurm
    (partition gpu, 1 GPU per node, job(s) 12, 13)``. A local run names no partition."""
    device = str(trained.params.get("device", "?"))
    device = DEVICES.get(device, device)
    if trained.executor != "slurm":
        return f"{trained.executor} (this machine, {device})"
    parts = [f"partition {trained.params.get('partition', '?')}"]
    gpus = trained.params.get("gpus_per_node")
    if gpus:
        parts.append(f"{gpus} GPU{'s' if str(gpus) != '1' else ''} per node")
    parts.append(f"device {device}")
    if trained.slurm_job_ids:
        parts.append(f"job(s) {', '.join(trained.slurm_job_ids)}")
    return f"slurm ({', '.join(parts)})"


def model_card(
    *, name: str, version: str, trained: TrainedModel, fset: FeatureSet, snap: DataSnapshot,
    entry: Any, startup: str, startup_cfg: Any, lineage: dict[str, str],
) -> str:  # fmt: skip
    decl = getattr(startup_cfg, "declaration", None)
    if decl is not None:
        approval = (
            f"approved by {decl.approved_by} on {decl.approved_on}"
            if decl.approved_by and decl.approved_on
            else "**not approved yet**"
        )
        declaration = (
            f"- Intended purpose: {decl.intended_purpose}\n"
            f"- Risk class (self-assessed): {decl.risk_class}\n"
            f"- EU AI Act prohibited practices (Art. 5), self-assessment: "
            f"{decl.prohibited_practices}\n- Status: {approval}\n"
        )
        if decl.risk_class == "high":
            declaration += (
                "\n**High-risk (EU AI Act, Annex III).** What this means for this model:\n"
                "- it becomes `champion` only with a named person's approval "
                "(`aif model promote --approved-by NAME`), recorded on the version; a nightly "
                "run never promotes it on metrics alone;\n"
                "- its training data, lineage and this card are kept with every version "
                "(record-keeping, Art. 12; technical documentation, Art. 11);\n"
                "- it supports decisions by qualified people and must not make them alone "
                "(human oversight, Art. 14).\n"
            )
    else:
        declaration = "_No responsible-AI declaration is recorded for this start-up._\n"
    metrics = "\n".join(f"| {k} | {v:.5g} |" for k, v in sorted(trained.metrics.items()))
    shown = {k: v for k, v in trained.params.items()
             if trained.executor == "slurm" or k not in SLURM_PARAMS}  # fmt: skip
    params = ", ".join(f"{k}={v}" for k, v in sorted(shown.items()))
    dropped = ", ".join(f"{k}: {v:,}" for k, v in sorted(fset.rows_dropped.items())) or "none"
    splits = ", ".join(f"{k} {s.rows:,}" for k, s in sorted(fset.splits.items()))
    return (
        f"# Model card: {name} version {version}\n\n"
        f"## Intended use\n\nPredicts `{fset.target}` from raw `{snap.dataset}` rows for "
        f"start-up {startup} (project {startup_cfg.project}). Purpose declared at ingestion: "
        f"{snap.purpose}. Load it with `mlflow.pyfunc.load_model('models:/{name}/{version}')`; "
        "it applies its own fitted preprocessing to raw rows.\n\n"
        f"## Responsible-AI declaration\n\n{declaration}\n"
        f"## Data\n\n{entry.title} from the {entry.data_space} data space ({entry.publisher}, "
        f"{entry.license}); snapshot `{snap.snapshot_id}`, {snap.rows:,} rows. Feature set "
        f"`{fset.featureset_id}`: {len(fset.feature_columns)} features; splits by a stable "
        f"hash of `{fset.key_column}`: {splits}; rows dropped by cleaning: {dropped}. See "
        "`training_data_summary.md`.\n\n"
        f"## Training\n\nRun `{trained.run_key}`, executor: {where_trained(trained)}"
        + f". Parameters: {params}. Weights sha256 `{trained.weights_sha256[:16]}`; "
        f"environment hash `{trained.environment_hash}`; code commit "
        f"`{lineage.get('aif.git_commit', 'unknown')[:12]}` (dirty: "
        f"{lineage.get('aif.git_dirty', 'unknown')}).\n\n"
        f"## Metrics (held-out splits)\n\n| metric | value |\n|---|---|\n{metrics}\n\n"
        "## Limitations\n\n"
        f"- Trained on {snap.dataset} only; rows outside the cleaning ranges of the feature "
        "config were dropped and predictions for such inputs are extrapolations.\n"
        "- Categories not seen in training map to an 'other' code.\n"
        "- Metrics are measured on a random hash split of the same period, not on later data: "
        "monitor drift before relying on them.\n"
        "- Not assessed for use outside the declared purpose.\n"
    )


def ro_crate(
    *, name: str, version: str, trained: TrainedModel, fset: FeatureSet, snap: DataSnapshot,
    entry: Any, startup: str, lineage: dict[str, str], software: dict[str, Any],
    documents: list[str], created: str,
) -> dict[str, Any]:  # fmt: skip
    """RO-Crate 1.1 metadata (Workflow Run Crate profile) of the pipeline run."""
    commit = lineage.get("aif.git_commit", "unknown")
    run_id = f"#run-{lineage.get('aif.prefect_flow_run_id') or trained.run_key}"
    inputs = [{"@id": o.key if "://" in o.key else f"{snap.source_url.split('://')[0]}://{o.key}"}
              for o in snap.objects]  # fmt: skip
    model_id = f"models:/{name}/{version}"
    graph: list[dict[str, Any]] = [
        {
            "@id": "ro-crate-metadata.json",
            "@type": "CreativeWork",
            "conformsTo": [
                {"@id": "https://w3id.org/ro/crate/1.1"},
                {"@id": "https://w3id.org/workflowhub/workflow-ro-crate/1.0"},
            ],
            "about": {"@id": "./"},
        },
        {
            "@id": "./",
            "@type": "Dataset",
            "name": f"aifactory pipeline run producing {name} version {version}",
            "datePublished": created,
            "license": entry.license,
            "conformsTo": [
                {"@id": f"{WFRUN}/process/0.5"},
                {"@id": f"{WFRUN}/workflow/0.5"},
                {"@id": "https://w3id.org/workflowhub/workflow-ro-crate/1.0"},
            ],
            "mainEntity": {"@id": "flows/pipeline.py"},
            "mentions": [{"@id": run_id}],
            "hasPart": [{"@id": "flows/pipeline.py"}, {"@id": "environment.json"}]
            + [{"@id": d} for d in documents],
        },
        {
            "@id": "flows/pipeline.py",
            "@type": ["File", "SoftwareSourceCode", "ComputationalWorkflow"],
            "name": "aif-pipeline (ingest, preprocess, train, register)",
            "programmingLanguage": {"@id": "#python"},
            "version": commit,
            "identifier": f"git:{commit}",
            "input": [{"@id": "#param-snapshot"}],
            "output": [{"@id": "#param-model"}],
        },
        {
            "@id": "#python",
            "@type": "ComputerLanguage",
            "name": "Python",
            "version": software.get("python", ""),
        },
        {
            "@id": "#param-snapshot",
            "@type": "FormalParameter",
            "name": "data snapshot",
            "additionalType": "Dataset",
        },
        {
            "@id": "#param-model",
            "@type": "FormalParameter",
            "name": "registered model",
            "additionalType": "File",
        },
        {
            "@id": "environment.json",
            "@type": "File",
            "name": "software environment (exact package versions, captured in the job)",
            "encodingFormat": "application/json",
            "identifier": trained.environment_hash,
        },
        {
            "@id": f"#snapshot-{snap.snapshot_id}",
            "@type": "Dataset",
            "name": f"{entry.title}, snapshot {snap.snapshot_id}",
            "exampleOfWork": {"@id": "#param-snapshot"},
            "publisher": entry.publisher,
            "license": entry.license,
            "identifier": snap.content_hash(),
            "hasPart": inputs,
        },
        *[
            {
                "@id": i["@id"],
                "@type": "File",
                "contentSize": o.size,
                "identifier": o.etag or "",
                "encodingFormat": snap.format,
                "sha256": o.lake_sha256,
            }
            for i, o in zip(inputs, snap.objects, strict=True)
        ],
        {
            "@id": model_id,
            "@type": "File",
            "name": f"{name} version {version} (MLflow pyfunc)",
            "exampleOfWork": {"@id": "#param-model"},
            "sha256": trained.weights_sha256,
        },
        {
            "@id": run_id,
            "@type": "CreateAction",
            "name": f"aif-pipeline run for {startup}",
            "instrument": {"@id": "flows/pipeline.py"},
            "object": [{"@id": f"#snapshot-{snap.snapshot_id}"}, {"@id": "environment.json"}],
            "result": [{"@id": model_id}] + [{"@id": d} for d in documents],
            "endTime": created,
            "agent": {"@id": f"#startup-{startup}"},
            "description": (
                f"feature set {fset.featureset_id}; training run {trained.run_key}; Slurm jobs "
                f"{', '.join(trained.slurm_job_ids) or 'none'}; config hash "
                f"{lineage.get('aif.config_hash', '')}"
            ),
        },
        {"@id": f"#startup-{startup}", "@type": "Organization", "name": startup},
        *[{"@id": d, "@type": "File", "encodingFormat": "text/markdown"} for d in documents],
    ]
    return {"@context": "https://w3id.org/ro/crate/1.1/context", "@graph": graph}


def write_documents(folder: Any, docs: dict[str, str | dict[str, Any]]) -> list[str]:
    """Write the documents into ``folder`` (atomic each); return their paths."""
    from pathlib import Path

    from aifactory.tasks.doors.lake import write_text_local

    out = []
    for name, body in docs.items():
        text = body if isinstance(body, str) else json.dumps(body, indent=2, sort_keys=False)
        path = Path(folder) / name
        write_text_local(path, text if text.endswith("\n") else text + "\n")
        out.append(str(path))
    return out


__all__ = ["model_card", "ro_crate", "time_ranges", "training_data_summary", "write_documents"]
