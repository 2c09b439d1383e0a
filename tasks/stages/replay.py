"""`aif replay models:/NAME/VERSION`: rebuild a registered model and compare its weights.

1. Read what the version recorded: its lineage tags, the resolved config
   (``lineage/config.json``), the environment captured in the training job
   (``docs/environment.json``) and the data snapshot (by id, from the lake).
2. Check that each can be matched now, and refuse with the full list of differences
   otherwise: the code (recorded commit checked out, clean tree), the environment (the
   same package versions), the data (every object of the snapshot still in the data space
   with the same ETag or version and size, and every lake copy with its recorded sha256)
   and the config (the recorded config still hashes to the recorded config hash).
3. Re-run preprocessing and training from the recorded snapshot and config into fresh
   locations (``<start-up lake>/replay/<token>``, ``<runs_dir>/replay/<token>``), bypassing every
   cache, on the same executor (Slurm jobs on the site).
4. Compare: the feature set (id, rows per split, dropped rows, normalisation), then the
   sha256 of the trained state dict against the registered one. Print ``MATCH`` or the
   first difference.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aifactory.tasks.core.config import Profile
from aifactory.tasks.core.errors import AifError, ConfigError


class ReplayRefused(AifError):
    """What the model was built from cannot be matched now."""

    exit_code = 4


@dataclass
class ReplayResult:
    uri: str
    match: bool
    first_difference: str = ""
    registered_sha256: str = ""
    replayed_sha256: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        if self.match:
            return f"MATCH {self.uri}: weights sha256 {self.replayed_sha256}"
        return f"DIFFERENT {self.uri}: {self.first_difference}"


def parse_uri(uri: str) -> tuple[str, str]:
    parts = uri.removeprefix("models:/").split("/")
    if not uri.startswith("models:/") or len(parts) != 2 or not all(parts):
        raise ConfigError(f"replay: {uri!r} is not a model version URI (models:/NAME/VERSION)")
    return parts[0], parts[1]


def _download_json(client: Any, run_id: str, path: str) -> Any:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        return json.loads(Path(local).read_text())


def _software() -> dict[str, Any]:
    """This interpreter's Python and packages, as the training payload records them (the
    same function: the record and the check cannot drift apart)."""
    from aifactory.tasks.payloads.job import environment

    env = environment("cpu")
    return {"python": env["python"], "packages": env["packages"]}


def check_environment(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    if recorded.get("python") != now.get("python"):
        out.append(
            f"environment: Python {recorded.get('python')} recorded, {now.get('python')} now"
        )
    rp, np_ = recorded.get("packages", {}), now.get("packages", {})
    changed = [f"{p} {rp.get(p, 'absent')} -> {np_.get(p, 'absent')}"
               for p in sorted(set(rp) | set(np_)) if rp.get(p) != np_.get(p)]  # fmt: skip
    if changed:
        more = f" (+{len(changed) - 5} more)" if len(changed) > 5 else ""
        out.append("environment: packages differ: " + ", ".join(changed[:5]) + more)
    return out


def check_data(snap: Any, recorded_hash: str, storage_options_src: dict[str, Any],
               storage_options_lake: dict[str, Any]) -> list[str]:  # fmt: skip
    """The snapshot manifest, the data-space objects and the lake copies, as recorded."""
    import fsspec

    from aifactory.tasks.data.dataspace import filesystem, stat_object
    from aifactory.tasks.doors.lake import sha256_of

    out = []
    if snap.content_hash() != recorded_hash:
        out.append(f"data: snapshot {snap.snapshot_id} manifest hash {snap.content_hash()[:16]} "
                   f"is not the recorded {recorded_hash[:16]}")  # fmt: skip
    src_fs, _ = filesystem(snap.source_url.split("*")[0], storage_options_src)
    from aifactory.tasks.data.dataspace import SourceObject

    for o in snap.objects:
        url = o.key if "://" in o.key else f"{snap.source_url.split('://')[0]}://{o.key}"
        listed = SourceObject(key=o.key, url=url, size=o.size, etag=o.etag, version_id=o.version_id)
        try:
            now = stat_object(src_fs, listed)
        except Exception as exc:
            out.append(f"data: object {url} cannot be checked ({type(exc).__name__})")
            continue
        was = o.identity or (f"version:{o.version_id}" if o.version_id else f"etag:{o.etag}")
        if now is None:
            out.append(f"data: object {url} is gone from the data space")
        elif now.identity() != was:
            out.append(f"data: object {url} changed (recorded {was}, now {now.identity()})")
        elif now.size != o.size:
            out.append(f"data: object {url} changed size ({o.size} recorded, {now.size} now)")
        lake_fs, path = fsspec.core.url_to_fs(o.lake_path, **storage_options_lake)
        try:
            digest = sha256_of(lake_fs, path)
        except FileNotFoundError:
            out.append(f"data: lake copy {o.lake_path} is missing")
            continue
        if digest != o.lake_sha256:
            out.append(f"data: lake copy {o.lake_path} does not have the recorded sha256")
    return out


def compare_featuresets(recorded: dict[str, Any], replayed: Any) -> str:
    for key in ("featureset_id", "rows_in", "rows_dropped", "feature_columns", "target"):
        if recorded.get(key) != getattr(replayed, key):
            got = getattr(replayed, key)
            return f"feature set {key}: recorded {recorded.get(key)!r}, replayed {got!r}"
    for split, files in recorded.get("splits", {}).items():
        got = replayed.splits.get(split)
        if got is None or got.rows != files["rows"]:
            n = got.rows if got else 0
            return f"feature set split {split!r}: recorded {files['rows']} rows, replayed {n}"
    for col, stats in recorded.get("normalisation", {}).items():
        got = replayed.normalisation.get(col, {})
        for k, v in stats.items():
            if got.get(k) != v:
                return (
                    f"feature set normalisation {col}.{k}: recorded {v!r}, replayed {got.get(k)!r}"
                )
    return ""


def replay(uri: str, cfg: Profile, *, allow_dirty: bool = False,
           log: Callable[[str], None] = print) -> ReplayResult:  # fmt: skip
    """Rebuild ``uri`` from its record and compare. The registry is read as the operator
    (who reads every start-up's versions; on a registry without permissions, anonymously);
    the data and the jobs use the start-up's own identity."""
    from aifactory.tasks.doors.registry import registry_identity

    with registry_identity(cfg.as_operator().mlflow):
        return _replay(uri, cfg, allow_dirty, log)


def _replay(uri: str, cfg: Profile, allow_dirty: bool, log: Callable[[str], None]) -> ReplayResult:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from aifactory.tasks.core.config import DaskSpec, TrainingSpec
    from aifactory.tasks.core.provenance import git_info, key_of
    from aifactory.tasks.doors.dask_cluster import drain_margin_s, open_cluster
    from aifactory.tasks.doors.registry import _check_reachable
    from aifactory.tasks.stages.ingest import load_snapshot
    from aifactory.tasks.stages.preprocess import run_preprocess
    from aifactory.tasks.stages.training import train

    name, version = parse_uri(uri)
    _check_reachable(cfg.mlflow.tracking_uri)
    client = MlflowClient(
        tracking_uri=cfg.mlflow.tracking_uri, registry_uri=cfg.mlflow.tracking_uri
    )
    try:
        mv = client.get_model_version(name, version)
    except MlflowException:
        raise ConfigError(f"replay: no model version {uri} in {cfg.mlflow.tracking_uri}") from None
    tags = dict(mv.tags)
    run_id = str(mv.run_id)
    try:
        recorded_cfg = _download_json(client, run_id, "lineage/config.json")
        recorded_env = _download_json(client, run_id, "docs/environment.json")
        recorded_fset = _download_json(client, run_id, "lineage/featureset.json")
    except Exception:
        raise ReplayRefused(
            f"replay {uri}: the version has no recorded config, environment or feature set "
            "(registered before replay was supported)"
        ) from None

    differences: list[str] = []
    git = git_info()
    if tags.get("aif.git_dirty") == "true" and not allow_dirty:
        differences.append(
            f"code: {uri} was trained from a tree with uncommitted changes: its code is not "
            "recorded (--allow-dirty replays it with the checked-out code)"
        )
    if git["commit"] != tags.get("aif.git_commit"):
        differences.append(f"code: commit {tags.get('aif.git_commit', '?')[:12]} recorded, "
                           f"{git['commit'][:12]} checked out (git checkout "
                           f"{tags.get('aif.git_commit', '?')[:12]})")  # fmt: skip
    if git["dirty"] and not allow_dirty:
        differences.append("code: the working tree has uncommitted changes (commit or stash them)")
    differences += check_environment(recorded_env, _software())

    # The recorded config, with this machine's secrets (masked in the record).
    data = json.loads(json.dumps(recorded_cfg))
    if data.get("object_store") and cfg.object_store is not None:
        data["object_store"] = cfg.object_store.model_dump()  # SecretStr kept, not masked
    if isinstance(data.get("mlflow"), dict):  # this site's credentials, not the record's
        data["mlflow"]["tenant_credentials"] = cfg.mlflow.tenant_credentials
    ds = data.get("dataspace") or {}
    if ds.get("pseudonymisation_key") == "***":
        ds["pseudonymisation_key"] = cfg.dataspace.pseudonymisation_key
    rec = Profile.model_validate(data)
    if rec.config_hash() != tags.get("aif.config_hash"):
        differences.append(f"config: the recorded config hashes to {rec.config_hash()}, not the "
                           f"recorded {tags.get('aif.config_hash')}")  # fmt: skip
    startup = tags.get("aif.startup") or rec.default_startup
    lake = rec.lake_url_for(startup)  # the start-up's own prefix (isolation.*, exit 6)
    rec = rec.for_startup(startup)  # and its own object-store identity, if the site has one
    lake_so = rec.storage_options(lake)
    snap = load_snapshot(lake, tags.get("aif.dataset", rec.dataspace.dataset),
                         tags["aif.snapshot_id"], lake_so)  # fmt: skip
    differences += check_data(snap, tags.get("aif.snapshot_hash", ""),
                              rec.storage_options(snap.source_url), lake_so)  # fmt: skip
    if differences:
        raise ReplayRefused(
            f"replay {uri}: {len(differences)} difference(s) from what was recorded: "
            + "; ".join(differences)
        )
    log(f"replay {uri}: code, environment, config and {len(snap.objects)} data objects match "
        "the record; rebuilding")  # fmt: skip

    token = f"{name}-v{version}-{uuid.uuid4().hex[:8]}"
    _, st = rec.tenant(startup)
    replay_lake = f"{lake}/replay/{token}"
    dask_spec = DaskSpec.model_validate(recorded_cfg["dask"])
    slurm = rec.slurm_client() if dask_spec.kind == "slurm" else None
    dask_dir = f"{rec.runs_dir}/dask/replay-{token}"
    with open_cluster(dask_spec, account=st.account, job_name=f"aif-dask-replay-{token[-8:]}",
                      slurm=slurm, log=log, log_dir=dask_dir) as (dclient, info):  # fmt: skip
        fset = run_preprocess(
            snap, lake_url=replay_lake, storage_options=lake_so, client=dclient,
            config=recorded_fset["feature_config"], fs_id=recorded_fset["featureset_id"],
            cluster_info=info.as_dict(), progress=log, cluster=info,
            margin_s=drain_margin_s(dask_spec),
        )  # fmt: skip
    diff = compare_featuresets(recorded_fset, fset)
    if diff:
        return ReplayResult(uri, False, diff, tags.get("aif.weights_sha256", ""))
    spec = TrainingSpec.model_validate(recorded_cfg["training"])
    tslurm = rec.slurm_client() if spec.executor == "slurm" else None
    trained = train(
        spec=spec, account=st.account, featureset=fset,
        runs_dir=str(Path(rec.runs_dir) / "replay" / token), run_key=key_of("replay", token),
        slurm=tslurm, env=rec.child_env(), log=log,
    )  # fmt: skip
    want = tags.get("aif.weights_sha256", "")
    got = trained.weights_sha256
    if got != want:
        return ReplayResult(uri, False, f"weights sha256: registered {want}, replayed {got}",
                            want, got)  # fmt: skip
    return ReplayResult(uri, True, "", want, got,
                        {"run_dir": trained.run_dir, "jobs": trained.slurm_job_ids})  # fmt: skip
