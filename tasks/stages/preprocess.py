"""Preprocessing: a DataSnapshot becomes a FeatureSet, partition by partition on Dask."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import fsspec

from aifactory.tasks.core.errors import AifError, DataError
from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet, SplitFiles
from aifactory.tasks.core.provenance import now_iso
from aifactory.tasks.data.progress import report
from aifactory.tasks.doors.dask_dispatch import dispatch
from aifactory.tasks.doors.lake import exists, read_json, write_json_atomic
from aifactory.tasks.stages import features as F


def featureset_url(lake_url: str, fs_id: str) -> str:
    return f"{lake_url.rstrip('/')}/features/{fs_id}"


def load_cached(lake_url: str, fs_id: str, storage_options: dict[str, Any]) -> FeatureSet | None:
    url = f"{featureset_url(lake_url, fs_id)}/manifest.json"
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    if not exists(fs, path):
        return None
    return FeatureSet.model_validate(read_json(fs, path))


def plan(snapshot: DataSnapshot, config: dict[str, Any]) -> tuple[str, dict]:
    """(feature set id, config) for a resolved features section (features.resolve_config)."""
    from aifactory.tasks.core.provenance import code_hash

    cfg = json.loads(json.dumps(config))
    code = code_hash("preprocess") + ":" + F.function_source_hash(cfg["function"])  # and theirs
    keyed = {**cfg, "function": F.portable_ref(cfg["function"])}  # not where the project lies
    # The snapshot's data, not its lake URL: the same data in another lake is the same set.
    return F.featureset_id(snapshot.data_hash(), keyed, code), cfg


def run_preprocess(
    snapshot: DataSnapshot,
    *,
    lake_url: str,
    storage_options: dict[str, Any],
    client: Any,
    config: dict[str, Any],
    fs_id: str,
    cluster_info: dict[str, Any],
    progress: Callable[[str], None] = print,
    cluster: Any = None,
    cancel: threading.Event | None = None,
    margin_s: float = 10.0,
    transform: Callable[..., dict[str, Any]] = F.featurize_partition,
) -> FeatureSet:
    """Featurise every snapshot file on the Dask cluster, fit normalisation, commit.

    ``cluster`` (a ``dask_cluster.ClusterInfo``) lets workers be drained and replaced before
    their deadline; ``cancel`` stops the stage; ``transform`` is the per-partition function
    (``features.featurize_partition``; a test may wrap it).
    """
    t0 = time.monotonic()
    out_url = featureset_url(lake_url, fs_id)
    files = [o.lake_path for o in snapshot.objects]
    calls = [
        (f"featurize-{fs_id}-{i:05d}", (i, url, out_url, storage_options, config))
        for i, url in enumerate(files)
    ]
    step = max(1, len(calls) // 4)
    report("preprocess", 0, len(calls), "partitions")  # the terminal's bar (data/progress.py)

    def on_result(n: int, total: int) -> None:
        report("preprocess", n, total, "partitions")
        if n == total or n % step == 0:
            progress(f"featurised {n}/{total} partitions")

    try:
        results: list[dict[str, Any]] = dispatch(
            client,
            transform,
            calls,
            margin_s=margin_s,
            end_times=getattr(cluster, "end_times", None),
            retire=getattr(cluster, "retire", None),
            cancel=cancel,
            on_result=on_result,
        )
    except (AifError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise DataError(
            f"preprocess {snapshot.dataset}: a partition failed: {type(exc).__name__}: {exc}"
        ) from None
    results.sort(key=lambda r: r["index"])

    cols = results[0]["columns"] if results else []
    for r in results:
        if r["columns"] != cols:
            raise DataError(
                f"preprocess {snapshot.dataset}: features function {config.get('function')} "
                f"returned other columns for partition {r['index']} than for partition "
                f"{results[0]['index']}: {r['columns'][:20]} vs {cols[:20]}"
            )
    try:
        norm = F.fit_normalisation(results, [*cols, config["target"]])
    except ValueError as exc:
        raise DataError(f"preprocess {snapshot.dataset}: {exc}") from None
    rows_in = sum(r["rows_in"] for r in results)
    dropped: dict[str, int] = {}
    for r in results:
        for reason, n in r["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    splits = {
        name: SplitFiles(
            files=[r["splits"][name]["file"] for r in results],
            rows=sum(r["splits"][name]["rows"] for r in results),
        )
        for name in F.SPLITS
    }
    rows_out = sum(s.rows for s in splits.values())
    if rows_out + sum(dropped.values()) != rows_in:
        raise DataError(
            f"preprocess {snapshot.dataset}: row accounting broken: in={rows_in} "
            f"out={rows_out} dropped={sum(dropped.values())}"
        )
    fset = FeatureSet(
        featureset_id=fs_id,
        snapshot_id=snapshot.snapshot_id,
        snapshot_hash=snapshot.content_hash(),
        lake_url=out_url,
        key_column=config["key"],
        feature_columns=cols,
        target=config["target"],
        normalisation=norm,
        splits=splits,
        rows_in=rows_in,
        rows_dropped=dropped,
        feature_config=config,
        cluster=cluster_info,
        slurm_job_ids=list(cluster_info.get("job_ids", [])),
        created_at=now_iso(),
        duration_s=round(time.monotonic() - t0, 3),
    )
    fs, path = fsspec.core.url_to_fs(f"{out_url}/manifest.json", **storage_options)
    write_json_atomic(fs, path, json.loads(fset.to_json()))  # the commit point
    return fset
