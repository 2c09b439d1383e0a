"""What a run would do, stage by stage, without doing any of it (`aif run --dry-run`).

Like ``snakemake -n``: for each stage, ``reuse`` (its manifest is already committed for the
same key), ``run`` (it is not, and why), or ``unknown`` (the key cannot be known without a
side effect, or the run would stop there). The keys are the ones the stages compute:

- ingest: the snapshot id from the data space's listing (keys, ETags or versions, sizes),
  the contract, start-up, purpose and pseudonymisation (tasks/stages/ingest.py); reused
  when ``<lake>/snapshots/<dataset>/<id>/manifest.json`` exists;
- preprocess: the feature set id from the snapshot's data, the feature config and code
  (tasks/stages/preprocess.py ``plan``); reused when its manifest is in the lake;
- train: the run key from the feature set, the training spec, the environment, the account
  and the training code (flows/train.py); reused when the run folder holds a finished run;
- register: the fingerprint of what was trained (tasks/doors/registry.py); reused when a
  version of the model carries it.

Nothing is written, seeded, submitted or started: no Prefect, no Slurm, no MLflow client
(the registry is read over its REST API or, for a SQLite store, read-only), no
pseudonymisation key created. A stage whose key depends on an earlier stage that would run
is ``run (after <stage>)``: its key is not known until then.
"""

from __future__ import annotations

import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aifactory.tasks.core.errors import AifError, SiteError, StorageError
from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet, TrainedModel

STAGES = ("ingest", "preprocess", "train", "register")
T = TypeVar("T")


@dataclass(frozen=True)
class StagePlan:
    """One stage's verdict: ``action`` is reuse, run or unknown; ``reason`` one line;
    ``key`` the stage's key when known (snapshot id, feature set id, run key, fingerprint)."""

    stage: str
    action: str
    reason: str
    key: str | None = None

    def line(self) -> str:
        if self.action == "reuse":
            return f"{self.stage}: reuse {self.reason}"
        return f"{self.stage}: {self.action} ({self.reason})"


class _Unknown(Exception):
    """The stage's key cannot be computed without a side effect (or the run stops there)."""


def _short(key: str) -> str:
    return f"{key[:12]}…" if len(key) > 12 else key


def plan(cfg: Any, startup_id: str | None, project: str | None = None, *,
         profile: str | None = None) -> list[StagePlan]:  # fmt: skip
    """What a run of ``cfg`` (a resolved profile, a project's settings included) for the
    start-up would reuse and run, stage by stage. ``project`` (the project's file, if any)
    only names it in the first reason; its settings are already ``cfg``'s. ``profile``:
    the profile as the run was given it (name or file; default ``cfg.name``), which tells
    whether an empty data space is the profile's own demo one (then the run seeds it)."""
    sid, st = cfg.tenant(startup_id)
    out: list[StagePlan] = []
    step, snap = _guard("ingest", lambda: _ingest(cfg, sid, profile))
    if project:
        step = StagePlan(step.stage, step.action, f"{step.reason}; project {project}", step.key)
    out.append(step)
    if snap is None:
        return out + _after(step, STAGES[1:])
    step, fset = _guard("preprocess", lambda: _preprocess(cfg, sid, snap))
    out.append(step)
    if fset is None:
        return out + _after(step, STAGES[2:])
    step, trained = _guard("train", lambda: _train(cfg, st, fset))
    out.append(step)
    if trained is None:
        if step.action == "reuse":  # finished, but its manifest is not (yet) complete
            return [*out, StagePlan("register", "unknown", f"run {step.key} has no complete "
                                    "trained.json: the run rebuilds it from the run folder, "
                                    "then looks the weights up in the registry")]  # fmt: skip
        return out + _after(step, STAGES[3:])
    done, _ = _guard("register", lambda: (_register(cfg, sid, trained), None))
    return [*out, done]


def _guard(stage: str, fn: Callable[[], tuple[StagePlan, T | None]]) -> tuple[StagePlan, T | None]:
    """The stage's plan; ``unknown`` when its key cannot be known without a side effect or
    the run would stop there (bad input: one line, as the run would say it)."""
    try:
        return fn()
    except _Unknown as exc:
        return StagePlan(stage, "unknown", str(exc)), None
    except (StorageError, SiteError) as exc:  # a service down: the input may well be fine
        return StagePlan(stage, "unknown", f"cannot tell, a service does not answer: {exc}"), None
    except AifError as exc:
        return StagePlan(stage, "unknown", f"the run would stop here: {exc}"), None


def _after(step: StagePlan, stages: tuple[str, ...]) -> list[StagePlan]:
    if step.action == "run":
        return [StagePlan(s, "run", f"after {step.stage}") for s in stages]
    return [StagePlan(s, "unknown", f"{step.stage} is {step.action}") for s in stages]


def render_plan(plans: list[StagePlan]) -> str:
    """The plan as `aif run --dry-run` prints it: one line per stage, then a summary."""
    lines = ["# plan: what a run would reuse and what it would run (nothing is done now)"]
    lines += [p.line() for p in plans]
    by: dict[str, list[str]] = {}
    for p in plans:
        by.setdefault(p.action, []).append(p.stage)
    said = [f"{a}: {', '.join(by[a])}" for a in ("reuse", "run", "unknown") if a in by]
    lines.append("summary: " + "; ".join(said))
    return "\n".join(lines)


# -- ingest -------------------------------------------------------------------------------
def _pseudo(cfg: Any, entry: Any) -> str | None:
    """The snapshot's pseudonymisation as ingest spells it, reading the key without creating
    it: None when the key file does not exist yet (the run creates a new key)."""
    from aifactory.tasks.data.policy import key_fingerprint, resolve_secret

    personal = list(entry.policy.personal_data)
    if not personal:
        return "none"
    secret = cfg.dataspace.pseudonymisation_key  # a SecretStr
    spec = secret.get_secret_value() if secret is not None else None
    if spec and spec.startswith("file:") and not Path(spec[5:]).expanduser().exists():
        return None
    if spec and spec.startswith("prefect-secret:"):
        raise _Unknown(f"the pseudonymisation key is the Prefect secret {spec.split(':', 1)[1]} "
                       "and a dry run does not ask Prefect")  # fmt: skip
    key = resolve_secret(spec, f"pseudonymisation key for {entry.id}")
    return f"hmac-sha256:{key_fingerprint(key)}:{','.join(personal)}"


def _ingest(cfg: Any, sid: str, profile: str | None) -> tuple[StagePlan, DataSnapshot | None]:
    from aifactory.tasks.data.catalog import EXTENSIONS
    from aifactory.tasks.data.dataspace import filesystem, has_objects, list_objects
    from aifactory.tasks.data.policy import evaluate
    from aifactory.tasks.stages.ingest import list_snapshots, load_snapshot, snapshot_id
    from aifactory.tasks.stages.ingest import snapshot_url as snap_url

    entry = cfg.dataset_entry()
    src, lake = cfg.dataset_url(entry), cfg.lake_url_for(sid)
    so_src, so_lake = cfg.storage_options(src), cfg.storage_options(lake)
    purpose, declared = cfg.purpose(sid)
    decision = evaluate(entry, sid, purpose, declared)
    if not decision.allowed:
        raise _Unknown(f"the run would stop here: {decision.line()}")
    dc = entry.contract()
    ext = EXTENSIONS[dc.format]
    if not has_objects(src, so_src, extension=ext):
        from aifactory.tasks.data.seeding import check_seeding

        # The run's own rule (its DataError is the run's line: "the run would stop here").
        if not check_seeding(cfg, profile or cfg.name, None, entry.id):
            raise _Unknown(f"the run would stop here: the data space {src} holds no object of "
                           f"{entry.id} and seeding is not allowed there")  # fmt: skip
        return StagePlan("ingest", "run", f"the data space {src} is empty: the run seeds it "
                         f"from the catalog generator of {entry.id}"), None  # fmt: skip
    pseudo = _pseudo(cfg, entry)
    if pseudo is None:
        return StagePlan("ingest", "run", "no pseudonymisation key yet: the run creates one, so "
                         "the snapshot is a new one"), None  # fmt: skip
    objs = list_objects(src, so_src, "data space", extension=ext)
    salt = f"startup:{sid}|purpose:{purpose}|pseudo:{pseudo}"
    snap_id = snapshot_id(entry.id, objs, dc, salt)
    from aifactory.tasks.doors.lake import exists

    fs, root = filesystem(snap_url(lake, entry.id, snap_id), so_lake)
    if exists(fs, f"{root}/manifest.json"):
        snap = load_snapshot(lake, entry.id, snap_id, so_lake)
        if snap.quarantined and not cfg.dataspace.quarantine:
            raise _Unknown(f"the run would stop here: snapshot {_short(snap_id)} has "
                           f"{len(snap.quarantined)} quarantined object(s) and the run is "
                           "strict (--quarantine accepts it)")  # fmt: skip
        return StagePlan("ingest", "reuse", f"snapshot {_short(snap_id)} ({len(objs)} objects, "
                         "the same keys, ETags or versions and sizes)", snap_id), snap  # fmt: skip
    return StagePlan("ingest", "run", _why_new(list_snapshots(lake, entry.id, so_lake), objs, sid,
                                               purpose), snap_id), None  # fmt: skip


def _why_new(snaps: list[DataSnapshot], objs: list[Any], sid: str, purpose: str) -> str:
    """Why the listing is a new snapshot, against the latest committed one of the dataset."""
    mine = [s for s in snaps if s.startup == sid and s.purpose == purpose] or snaps
    if not mine:
        return f"no committed snapshot of this dataset yet ({len(objs)} objects listed)"
    last = mine[-1]
    had = {(o.key, o.identity, o.size) for o in last.objects}
    now = {(o.key, o.identity(), o.size) for o in objs}
    new, gone = len(now - had), len(had - now)
    if not new and not gone:
        return (f"the same objects as snapshot {_short(last.snapshot_id)}, but its contract, "
                "purpose or pseudonymisation differ")  # fmt: skip
    parts = [f"{new} object(s) not in snapshot {_short(last.snapshot_id)} (new or changed)"]
    if gone:
        parts.append(f"{gone} of its objects gone or changed")
    return "the data space has " + ", ".join(parts)


# -- preprocess ---------------------------------------------------------------------------
def _preprocess(cfg: Any, sid: str, snap: DataSnapshot) -> tuple[StagePlan, FeatureSet | None]:
    from aifactory.tasks.stages.features import resolve_config
    from aifactory.tasks.stages.preprocess import featureset_url, load_cached
    from aifactory.tasks.stages.preprocess import plan as featureset_plan

    fs_id, _ = featureset_plan(snap, resolve_config(cfg.features))
    lake = cfg.lake_url_for(sid)
    cached = load_cached(lake, fs_id, cfg.storage_options(lake))
    if cached is not None:
        return StagePlan("preprocess", "reuse", f"feature set {_short(fs_id)} (cached in the "
                         "lake: no cluster)", fs_id), cached  # fmt: skip
    return StagePlan("preprocess", "run", f"no feature set {_short(fs_id)} in "
                     f"{featureset_url(lake, fs_id)}", fs_id), None  # fmt: skip


# -- train --------------------------------------------------------------------------------
def _train(cfg: Any, st: Any, fset: FeatureSet) -> tuple[StagePlan, TrainedModel | None]:
    from aifactory.tasks.models.flavours import model_path
    from aifactory.tasks.stages.training import train_run_key

    run_key = train_run_key(cfg, st.account, fset)
    run_dir = Path(cfg.runs_dir) / "train" / run_key
    flavour = cfg.mlflow.flavour
    if not ((run_dir / "metrics.json").exists() and model_path(flavour, run_dir).exists()):
        why = ("an unfinished run: the run reattaches to its job or trains again"
               if run_dir.exists() else "no run")  # fmt: skip
        return StagePlan("train", "run", f"{why} in {run_dir}", run_key), None
    try:
        from aifactory.tasks.core.jobfiles import read_job_text

        trained = TrainedModel.model_validate_json(read_job_text(run_dir / "trained.json"))
    except (OSError, ValueError):
        trained = None
    same = trained is not None and trained.run_key == run_key
    if not (same and trained is not None and trained.featureset_hash == fset.content_hash()):
        trained = None
    return StagePlan("train", "reuse", f"run {run_key} (finished in {run_dir}: nothing "
                     "submitted)", run_key), trained  # fmt: skip


# -- register -----------------------------------------------------------------------------
def _register(cfg: Any, sid: str, trained: TrainedModel) -> StagePlan:
    from aifactory.tasks.doors.registry import fingerprint, registry_identity

    name, uri = cfg.mlflow.model_name, cfg.mlflow.tracking_uri
    fp = fingerprint(trained, name, cfg.mlflow.flavour)
    with registry_identity(cfg.registry_for(sid)):  # as the run would look it up
        versions = _versions_with(uri, name, fp)
    if versions:
        return StagePlan("register", "reuse", f"version {versions[0]} of {name} (the same "
                         f"fingerprint {_short(fp)}: nothing registered)", fp)  # fmt: skip
    return StagePlan("register", "run", f"no version of {name} has fingerprint {_short(fp)}",
                     fp)  # fmt: skip


def _versions_with(tracking_uri: str, name: str, fp: str) -> list[str]:
    """Versions of ``name`` tagged with fingerprint ``fp``, oldest first, read only."""
    from aifactory.tasks.doors.registry import FINGERPRINT_TAG, rest

    if tracking_uri.startswith(("http://", "https://")):
        q = urllib.parse.urlencode({"filter": f"name='{name.replace(chr(39), '')}'",
                                    "max_results": 1000})  # fmt: skip
        try:
            res = rest(tracking_uri, "GET", f"model-versions/search?{q}")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise _Unknown(f"the registry {tracking_uri} cannot be read: {exc}") from None
        found = [int(v["version"]) for v in res.get("model_versions", [])
                 if any(t.get("key") == FINGERPRINT_TAG and t.get("value") == fp
                        for t in v.get("tags", []))]  # fmt: skip
        return [str(v) for v in sorted(found)]
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///") :])
        if not path.exists():
            return []  # no registry yet: the run creates it
        try:
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
            try:
                rows = con.execute(
                    "SELECT v.version FROM model_versions v JOIN model_version_tags t "
                    "ON t.name = v.name AND t.version = v.version WHERE v.name = ? AND "
                    "t.key = ? AND t.value = ? AND v.current_stage != 'Deleted_Internal' "
                    "ORDER BY v.version", (name, FINGERPRINT_TAG, fp)).fetchall()  # fmt: skip
            finally:
                con.close()
        except sqlite3.Error as exc:
            raise _Unknown(f"the registry {tracking_uri} cannot be read: {exc}") from None
        return [str(r[0]) for r in rows]
    raise _Unknown(f"the registry {tracking_uri} is neither an MLflow server nor a SQLite "
                   "store: a dry run does not open it")  # fmt: skip
