"""Stage 1, ingest: data space -> policy-checked, validated, committed lake snapshot.

The dataset comes from the catalog (infra/catalog/catalog.yaml, or the profile's). Its
usage policy is checked for the start-up and purpose before a byte is read; personal-data
columns are pseudonymised; only new or changed objects are read (tasks/stages/ingest.py). The
decision, the objects and any quarantined object are published as Prefect artifacts, and
every decision is appended to the lake's audit trail.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from aifactory.tasks.core.audit import refusals_audited
from aifactory.tasks.core.config import Profile, load_profile
from aifactory.tasks.core.manifests import DataSnapshot
from aifactory.tasks.data.policy import Decision
from aifactory.tasks.doors.console import console_scope, label_current_run, label_for, top_level
from aifactory.tasks.doors.runtime import artifact_markdown, artifact_table, md_table, stage_logger


@task(name="seed-dataspace", cache_policy=NO_CACHE)
def seed_dataspace(profile: str, dataset: str, overrides: dict[str, Any] | None) -> int:
    """Seed an empty data space where allowed (tasks/data/seeding.py): the profile's demo
    data space, or with dataspace.seed. Elsewhere an empty one is an error, before a byte
    is written; and --rows for a data space that already has objects is refused."""
    from aifactory.tasks.data.seeding import ensure_seeded

    return ensure_seeded(load_profile(profile, overrides), profile, overrides, dataset)


def _decision_markdown(d: Decision) -> str:
    verdict = "**allowed**" if d.allowed else "**refused**"
    cols = ", ".join(f"`{c}`" for c in d.pseudonymised) or "none"
    return (
        f"# Usage policy: {d.dataset}\n\n{verdict} by rule `{d.rule}`: {d.reason}\n\n"
        f"- start-up: {d.startup}\n- purpose: {d.purpose}\n- checked on: {d.checked_on}\n"
        f"- valid until: {d.valid_until}\n- pseudonymised columns: {cols}\n"
    )


def run_ingest(cfg: Profile, startup: str | None, dataset: str | None = None,
               purpose: str | None = None, quarantine: bool | None = None,
               say: Any = None) -> DataSnapshot:  # fmt: skip
    """Ingest one catalog dataset as the profile configures it (also used by train-lm)."""
    from aifactory.tasks.core.tenancy import check_dataspace_url
    from aifactory.tasks.data.policy import resolve_secret
    from aifactory.tasks.stages.ingest import IngestOptions, audit, ingest

    say = say or stage_logger("ingest")
    sid, _ = cfg.tenant(startup)
    cfg = cfg.for_startup(sid)  # the start-up's own object-store identity, if the site has one
    entry = cfg.dataset_entry(dataset)
    src, lake = cfg.dataset_url(entry), cfg.lake_url_for(sid)
    check_dataspace_url(cfg, sid, src, f"data space of {entry.id}")  # before a byte is read
    chosen, declared = cfg.purpose(sid, purpose)
    key = None
    if entry.policy.personal_data:
        secret = cfg.dataspace.pseudonymisation_key
        spec = secret.get_secret_value() if secret is not None else None
        key = resolve_secret(spec, f"pseudonymisation key for {entry.id}")

    def on_decision(d: Decision) -> None:
        artifact_markdown("ingest-policy", _decision_markdown(d), f"Usage policy of {d.dataset}")
        with contextlib.suppress(Exception):
            audit(lake, cfg.storage_options(lake), d)
        with contextlib.suppress(OSError):  # the operators' site-wide trail too
            from aifactory.tasks.core import audit as trail

            trail.append_operator_log(cfg.runs_dir, trail.entry(
                d.startup, f"ingest {d.dataset} for {d.purpose}", src, d.allowed,
                f"usage-policy ({d.rule})", d.reason))  # fmt: skip

    opts = IngestOptions(
        startup=sid, purpose=chosen, declared_purposes=declared, pseudonymisation_key=key,
        quarantine=cfg.dataspace.quarantine if quarantine is None else quarantine,
        workers=cfg.dataspace.ingest_workers, entry=entry, on_decision=on_decision,
    )  # fmt: skip
    say(
        f"snapshotting {entry.id} ({entry.data_space} data space, "
        f"{entry.distribution.format}) from {src}"
    )
    return ingest(
        src, lake, entry.id, cfg.storage_options(src), cfg.storage_options(lake), opts, say
    )


@task(name="snapshot-dataspace", cache_policy=NO_CACHE)
def snapshot_task(profile: str, startup: str, overrides: dict[str, Any] | None) -> DataSnapshot:
    return run_ingest(load_profile(profile, overrides), startup)


@flow(name="ingest", log_prints=False)
def ingest_flow(
    profile: str = "local", startup: str | None = None, overrides: dict[str, Any] | None = None
) -> DataSnapshot:
    cfg = load_profile(profile, overrides)
    with refusals_audited(cfg, startup, f"ingest (profile {profile})"):
        if not top_level():  # a stage of a labelled run
            return _ingest_stage(cfg, profile, startup, overrides)
        label = label_for(cfg, cfg.tenant(startup)[0], "ingest")  # `aif ingest`
        label_current_run(label)
        with console_scope(label):
            return _ingest_stage(cfg, profile, startup, overrides)


def _ingest_stage(cfg: Profile, profile: str, startup: str | None,
                  overrides: dict[str, Any] | None) -> DataSnapshot:  # fmt: skip
    sid, _ = cfg.tenant(startup)
    say = stage_logger("ingest")
    n = seed_dataspace(profile, cfg.dataspace.dataset, overrides)
    if n:
        say(
            f"seeded the data space with {n} objects of {cfg.dataspace.dataset} (catalog generator)"
        )
    snap = snapshot_task(profile, sid, overrides)
    say(
        f"snapshot {snap.snapshot_id}: {len(snap.objects)} objects, {snap.rows} rows, "
        f"{snap.bytes / 1e6:.1f} MB ({len(snap.objects_read)} read, "
        f"{snap.bytes_read / 1e6:.1f} MB) -> {snap.lake_url}"
    )
    artifact_table(
        "ingest-objects",
        [
            {
                "key": o.key,
                "etag": o.etag,
                "size": o.size,
                "rows": o.rows,
                "read": o.key in snap.objects_read,
                "lake": o.lake_path,
                "lake_sha256": o.lake_sha256[:16],
                "decision": o.decision,
                "pseudonymised": ", ".join(o.pseudonymised),
            }
            for o in snap.objects
        ],
        description=f"Objects of snapshot {snap.snapshot_id}",
    )
    quarantine = ""
    if snap.quarantined:
        rows = [{"object": q.key, "problems": q.reason} for q in snap.quarantined]
        artifact_table("ingest-quarantine", rows, f"Objects left out of {snap.snapshot_id}")
        quarantine = f"\n## Quarantined ({len(rows)})\n\n{md_table(rows)}\n"
    pol = snap.policy
    artifact_markdown(
        "ingest-summary",
        f"# Ingest: {snap.dataset}\n\n- snapshot: `{snap.snapshot_id}`\n"
        f"- data space: {snap.data_space}; publisher: {snap.publisher}; license: {snap.license}\n"
        f"- source: `{snap.source_url}` ({snap.format})\n- lake: `{snap.lake_url}`\n"
        f"- objects: {len(snap.objects)} ({len(snap.objects_read)} read this run, "
        f"{len(snap.objects) - len(snap.objects_read)} reused)\n- rows: {snap.rows}\n"
        f"- bytes: {snap.bytes} ({snap.bytes_read} read)\n"
        f"- start-up: {sid}; purpose: {snap.purpose}\n"
        f"- policy: {'allowed' if pol.get('allowed') else 'refused'} by `{pol.get('rule')}`\n"
        f"- pseudonymisation: `{snap.pseudonymisation}`\n"
        f"- manifest hash: `{snap.content_hash()}`\n{quarantine}",
    )
    return snap


if __name__ == "__main__":
    print(ingest_flow().snapshot_id)
