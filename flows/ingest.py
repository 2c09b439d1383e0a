"""Stage 1, ingest: data space -> validated, committed lake snapshot (DataSnapshot).

Lists the dataset's objects through fsspec, checks every object's schema against the
dataset's contract before a byte is written, copies them to the lake as Parquet (staged,
committed by the manifest written last) and records each object's key, ETag, size and rows.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks.config import load_profile
from tasks.manifests import DataSnapshot
from tasks.runtime import artifact_markdown, artifact_table, stage_logger


@task(name="seed-dataspace", cache_policy=NO_CACHE)
def seed_dataspace(
    url: str, storage_options: dict[str, Any], seed: int, rows: int, objects: int
) -> int:
    from tasks.datagen import generate_mobility
    from tasks.dataspace import has_objects

    if has_objects(url, storage_options):
        return 0
    return len(generate_mobility(url, storage_options, seed=seed, rows=rows, objects=objects))


@task(name="snapshot-dataspace", cache_policy=NO_CACHE)
def snapshot_task(
    source_url: str,
    lake_url: str,
    dataset: str,
    so_src: dict[str, Any],
    so_lake: dict[str, Any],
    startup: str,
) -> DataSnapshot:
    from tasks.ingest import ingest

    return ingest(
        source_url, lake_url, dataset, so_src, so_lake, startup, progress=stage_logger("ingest")
    )


@flow(name="ingest", log_prints=False)
def ingest_flow(
    profile: str = "local", startup: str | None = None, overrides: dict[str, Any] | None = None
) -> DataSnapshot:
    cfg = load_profile(profile, overrides)
    sid, _ = cfg.startup(startup)
    say = stage_logger("ingest")
    src, lake = cfg.dataspace.url, cfg.lake.url
    if cfg.dataspace.generate is not None:
        g = cfg.dataspace.generate
        n = seed_dataspace(src, cfg.storage_options(src), g.seed, g.rows, g.objects)
        if n:
            say(f"seeded the data space {src} with {n} objects ({g.rows} rows, seed {g.seed})")
    say(f"snapshotting {cfg.dataspace.dataset} from {src}")
    snap = snapshot_task(
        src, lake, cfg.dataspace.dataset, cfg.storage_options(src), cfg.storage_options(lake), sid
    )
    say(
        f"snapshot {snap.snapshot_id}: {len(snap.objects)} objects, {snap.rows} rows, "
        f"{snap.bytes / 1e6:.1f} MB -> {snap.lake_url}"
    )
    artifact_table(
        "ingest-objects",
        [
            {"key": o.key, "etag": o.etag, "size": o.size, "rows": o.rows, "lake": o.lake_path}
            for o in snap.objects
        ],
        description=f"Objects of snapshot {snap.snapshot_id}",
    )
    artifact_markdown(
        "ingest-summary",
        f"# Ingest: {snap.dataset}\n\n- snapshot: `{snap.snapshot_id}`\n- source: `{src}`\n"
        f"- lake: `{snap.lake_url}`\n- objects: {len(snap.objects)}\n- rows: {snap.rows}\n"
        f"- bytes: {snap.bytes}\n- start-up: {sid}\n- manifest hash: `{snap.content_hash()}`\n",
    )
    return snap


if __name__ == "__main__":
    print(ingest_flow().snapshot_id)
