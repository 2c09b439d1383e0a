"""One typed config: profile YAML + AIF_* environment + CLI flags (explicit wins).

A profile is a YAML file (``infra/profiles/<name>.yaml`` or any path). Values may
reference the environment as ``${VAR}`` or ``${VAR:-default}``. Relative paths in
``*_dir`` keys and ``file://`` URLs are made absolute against the working directory so
that Slurm jobs and Dask workers see the same paths as the flow.

Precedence, lowest first: profile file < ``AIF_<SECTION>__<KEY>`` environment variables
< explicit overrides (CLI flags). The resolved config is saved in every run manifest.
A start-up's tenancy (``startups``: account, prefix, partitions, QoS, ...) comes only from
the file: an override of it is refused (TenancyError, ``isolation.overrides``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from aifactory.tasks.core.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parents[2] / "infra" / "profiles"
# Sections an override replaces whole instead of merging into (a project's feature section
# is its own: the profile's mobility settings must not leak into it).
REPLACED_SECTIONS = ("features", "training.config")
# ${VAR} or ${VAR:-default}; defaults may nest (innermost first).
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^{}]*))?\}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ObjectStore(_Model):
    """Credentials and endpoint for s3:// URLs (None: the default AWS chain)."""

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    region: str = "us-east-1"

    def storage_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.key:
            opts["key"] = self.key
        if self.secret:
            opts["secret"] = self.secret
        client_kwargs: dict[str, Any] = {"region_name": self.region}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        opts["client_kwargs"] = client_kwargs
        # Fail in seconds, not minutes, when the endpoint is down.
        opts["config_kwargs"] = {"connect_timeout": 5, "retries": {"max_attempts": 2}}
        return opts

    def env(self) -> dict[str, str]:
        """Environment for child processes (Slurm jobs inherit it; never written to scripts)."""
        out: dict[str, str] = {"AWS_DEFAULT_REGION": self.region}
        if self.endpoint_url:
            out["AWS_ENDPOINT_URL"] = self.endpoint_url
            out["MLFLOW_S3_ENDPOINT_URL"] = self.endpoint_url
        if self.key:
            out["AWS_ACCESS_KEY_ID"] = self.key
        if self.secret:
            out["AWS_SECRET_ACCESS_KEY"] = self.secret
        return out


class Generator(_Model):
    """Deterministic seeding of the data space when it is empty (local and site); unset
    fields take the catalog entry's generator settings."""

    seed: int | None = None
    rows: int | None = Field(default=None, ge=1)
    objects: int | None = Field(default=None, ge=1)


class Dataspace(_Model):
    # Root of the data spaces: catalog distributions without a scheme are relative to it.
    root: str | None = None
    # fsspec URL or glob of the dataset's objects, overriding the catalog's distribution.
    url: str | None = None
    dataset: str = "mobility-trips"
    catalog: str | None = None  # catalog YAML (default: infra/catalog/catalog.yaml)
    purpose: str | None = None  # default: the start-up's first declared purpose
    generate: Generator | None = None  # seed it if the prefix holds no objects
    quarantine: bool = False  # commit good objects, list bad ones (default: strict)
    # Secret for pseudonymising personal-data columns: file:PATH (created 0600 when
    # missing), env:VAR, prefect-secret:BLOCK, or the value itself. Never logged.
    pseudonymisation_key: str | None = None
    ingest_workers: int = Field(default=2, ge=1)


class Lake(_Model):
    url: str  # fsspec URL of the lake root


class DaskSpec(_Model):
    kind: Literal["local", "slurm"] = "local"
    # Where the Dask scheduler runs (kind slurm): "flow-host" (the flow's process; each
    # worker is its own Slurm job, replaced before its walltime) or "allocation" (scheduler
    # and workers in one Slurm job; for sites whose compute nodes cannot reach the login
    # node, or that forbid services there; the stage must fit that job's walltime).
    scheduler: Literal["flow-host", "allocation"] = "flow-host"
    workers: int = Field(default=2, ge=1)
    cores: int = Field(default=1, ge=1)  # per worker job
    processes: int = Field(default=1, ge=1)
    memory: str = "2GiB"  # per worker job
    walltime: str = "00:30:00"
    partition: str = "cpu"
    qos: str | None = None
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)  # module loads, venv activation
    interface: str | None = None
    scheduler_host: str = "127.0.0.1"
    partitions_per_task: int = 1
    # Adaptive scaling between these numbers of worker jobs (None: fixed ``workers``).
    adaptive_min: int | None = Field(default=None, ge=0)
    adaptive_max: int | None = Field(default=None, ge=1)
    # Walltime safety: workers retire this long after start (before the job's walltime),
    # staggered so they do not all leave at once, handing their data to the others;
    # adaptive scaling submits replacements. Dask's duration syntax ("25m", "1h").
    lifetime: str | None = None
    lifetime_stagger: str = "2m"
    # A worker gets no new partition when less than this, plus the slowest partition so far
    # (x1.5), is left before its deadline (lifetime or Slurm EndTime): it is drained, retired
    # and replaced, so no partition is cut off by a walltime and none runs twice.
    drain_margin: str = "10s"
    # glibc's top pad for worker processes (MALLOC_TOP_PAD_); null leaves glibc's and Dask's
    # defaults. Dask's nanny sets MALLOC_TRIM_THRESHOLD_=64 KiB so that freed memory goes
    # back to the OS at once; then every large pandas temporary gets fresh pages from the
    # kernel (page faults, about 20% of this transform's time). The pad keeps this much of
    # freed heap for reuse; memory above it is still given back.
    malloc_top_pad: str | None = "64MiB"

    @field_validator("malloc_top_pad")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        from dask.utils import parse_bytes

        if v is not None:
            try:
                parse_bytes(v)
            except (ValueError, TypeError):
                raise ValueError(f"not a size such as 64MiB (got {v!r})") from None
        return v

    @model_validator(mode="after")
    def _adaptive_bounds(self) -> DaskSpec:
        if (self.adaptive_min is None) != (self.adaptive_max is None):
            raise ValueError("set both adaptive_min and adaptive_max, or neither")
        lo, hi = self.adaptive_min, self.adaptive_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError("adaptive_min is larger than adaptive_max")
        return self


class TrainingSpec(_Model):
    """Generic resource names; translated to Slurm's names in tasks/stages/training.py."""

    executor: Literal["local", "slurm"] = "local"
    payload: Literal["tabular", "lm"] = "tabular"
    # A project's own training script (path to a .py file; its folder is the project's code,
    # copied into the run directory and hashed into the run key). Replaces the reference
    # payload; ``config`` is what the script gets as ``job.config``.
    script: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    partition: str = "gpu"
    gpus_per_node: int = Field(default=1, ge=0)
    nodes: int = Field(default=1, ge=1)
    cpus_per_task: int = Field(default=1, ge=1)
    mem_gb: float = Field(default=2.0, gt=0)
    timeout_min: int = Field(default=20, ge=1)
    qos: str | None = None
    constraint: str | None = None
    modules: list[str] = Field(default_factory=list)
    setup: list[str] = Field(default_factory=list)  # shell lines before the payload
    env: dict[str, str] = Field(default_factory=dict)
    poll_seconds: float = Field(default=1.0, gt=0)
    # Resubmissions after TIMEOUT, PREEMPTED or NODE_FAIL (the payload resumes from its
    # checkpoint); out of memory, failures and cancellations are never retried.
    max_resubmits: int = Field(default=2, ge=0)
    # Slurm warns the job this long before its time limit (--signal=B:USR1@N): the payload
    # checkpoints and is requeued.
    signal_before_end_s: int = Field(default=60, ge=5)
    # An Apptainer image (path or URI) to run the payload in (`apptainer exec [--nv]`); the
    # run directory is bound into it.
    container: str | None = None
    container_options: list[str] = Field(default_factory=list)  # e.g. ["--bind", "/scratch"]
    # Hyperparameters of the reference payload.
    epochs: int = Field(default=8, ge=1)
    batch_size: int = Field(default=512, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [64, 32])
    lr: float = Field(default=2e-3, gt=0)
    seed: int = 1234

    @model_validator(mode="after")
    def _signal_before_limit(self) -> TrainingSpec:
        if self.signal_before_end_s >= self.timeout_min * 60:
            raise ValueError(
                f"signal_before_end_s ({self.signal_before_end_s}) must be shorter than the time "
                f"limit timeout_min ({self.timeout_min} min): the warning would come at the start"
            )
        return self


class MlflowSpec(_Model):
    tracking_uri: str
    registry_uri: str | None = None
    artifact_location: str | None = None  # for a local file/sqlite store
    experiment: str = "aifactory"
    model_name: str = "mobility-trip-duration"
    # How the trained model is saved and loaded (tasks/models/flavours.py): "tabular" (the reference
    # MLP), "pytorch" (a state dict in model.pt and ``model_class``, FILE.py:CLASS, built with
    # the keyword arguments in model_init.json), "sklearn" (a pickled estimator in model.pkl)
    # or "pyfunc" (``python_model``, FILE.py:CLASS, an mlflow.pyfunc.PythonModel loading the
    # run's outputs). Each registers as one pyfunc that featurises raw rows.
    flavour: Literal["tabular", "pytorch", "sklearn", "pyfunc"] = "tabular"
    model_class: str | None = None
    python_model: str | None = None

    @model_validator(mode="after")
    def _flavour_needs(self) -> MlflowSpec:
        if self.flavour == "pytorch" and not self.model_class:
            raise ValueError("flavour pytorch needs model_class (FILE.py:CLASS or module:CLASS)")
        if self.flavour == "pyfunc" and not self.python_model:
            raise ValueError("flavour pyfunc needs python_model (FILE.py:CLASS or module:CLASS)")
        return self


class MetricCheck(_Model):
    metric: str
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _a_bound(self) -> MetricCheck:
        if self.min is None and self.max is None:
            raise ValueError(f"check on {self.metric!r}: give min, max or both")
        return self


class PromotionSpec(_Model):
    """When `champion` may move (aif model promote): the candidate must beat the champion
    on ``metric`` by ``margin`` (relative) and pass every check."""

    metric: str = "test_rmse"
    higher_is_better: bool = False
    margin: float = 0.0
    checks: list[MetricCheck] = Field(default_factory=list)
    require_documents: bool = True  # model card, data summary and RO-Crate attached
    require_clean_code: bool = False  # trained from a committed tree
    require_approved_declaration: bool = True  # the start-up's declaration is approved


class PrefectSpec(_Model):
    # "managed": aif starts a local Prefect server (state in home_dir/prefect) and reuses it.
    api_url: str = "managed"
    managed_port: int = 4210


class SlurmSpec(_Model):
    conf: str | None = None  # SLURM_CONF for every Slurm command; None: the site default
    bin_dir: str | None = None
    # Environment variables jobs get besides the base set (tasks/doors/slurm.py: JOB_ENV)
    # and the object store's: names only, values from the submitting environment.
    export: list[str] = Field(default_factory=list)


class Declaration(_Model):
    """A project's responsible-AI declaration (shown in every model card)."""

    intended_purpose: str
    # Self-assessment against the EU AI Act's prohibited practices (Art. 5).
    prohibited_practices: str
    risk_class: Literal["minimal", "limited", "high"] = "minimal"
    approved_by: str | None = None
    approved_on: dt.date | None = None


class Startup(_Model):
    account: str
    project: str = "default"
    title: str = ""
    s3_prefix: str | None = None
    # Slurm partitions and QoS its runs may use (None: any); tasks/core/tenancy.py checks them.
    partitions: list[str] | None = None
    qos: list[str] | None = None
    # Intended purposes the start-up declared for its project; data-space policies are
    # checked against the purpose a run gives (the first one by default).
    purposes: list[str] = Field(default_factory=list)
    declaration: Declaration | None = None
    # GPU-hours the start-up may use (sacct's allocations since budget_since); None: no cap.
    gpu_hours_budget: float | None = Field(default=None, ge=0)
    budget_since: str = "now-365days"  # sacct --starttime syntax


class NotificationsSpec(_Model):
    """Where `aif deploy` sends failure and promotion notifications: a webhook URL given as
    ``env:VAR``, ``prefect-secret:BLOCK`` or ``file:PATH`` (it is a secret: it goes into a
    Prefect webhook block's secrets, never into parameters, logs or job scripts)."""

    webhook: str | None = None


class Profile(_Model):
    name: str
    description: str = ""
    home_dir: str = ".aif"  # run directories, managed services' state
    runs_dir: str = ".aif/runs"  # shared filesystem visible from compute nodes
    default_startup: str
    startups: dict[str, Startup]
    object_store: ObjectStore | None = None
    dataspace: Dataspace
    lake: Lake
    dask: DaskSpec = Field(default_factory=DaskSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    mlflow: MlflowSpec
    prefect: PrefectSpec = Field(default_factory=PrefectSpec)
    promotion: PromotionSpec = Field(default_factory=PromotionSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    notifications: NotificationsSpec = Field(default_factory=NotificationsSpec)
    # Feature engineering (tasks/stages/features.py): the feature function and the platform's keys
    # (function, key, target, split, params, text), checked by features.resolve_config.
    # The embedded default is the bundled mobility project's (examples/mobility-trips).
    features: dict[str, Any] = Field(default_factory=lambda: default_features())
    # lake.url as the profile file gives it, before AIF_* and CLI overrides (load_profile
    # sets it): the start-ups' prefixes are also guarded under it (tasks/core/tenancy.py).
    _file_lake_url: str | None = PrivateAttr(default=None)

    def risk_class(self, startup: str) -> str:
        """The start-up's declared risk class ('' without a declaration)."""
        st = self.startups.get(startup)
        return st.declaration.risk_class if st and st.declaration else ""

    def declaration_approved(self, startup: str) -> bool:
        """Whether the start-up's responsible-AI declaration is approved (by and on)."""
        st = self.startups.get(startup)
        decl = st.declaration if st else None
        return bool(decl and decl.approved_by and decl.approved_on)

    @model_validator(mode="after")
    def _features_valid(self) -> Profile:
        from aifactory.tasks.stages.features import resolve_config

        resolve_config(self.features)  # raises ConfigError naming the key
        return self

    @model_validator(mode="after")
    def _script_and_flavour(self) -> Profile:
        script, flavour = self.training.script, self.mlflow.flavour
        if script and flavour == "tabular":
            raise ValueError(
                "training.script: a project's own trainer needs mlflow.flavour "
                "pytorch, sklearn or pyfunc (tabular is the reference payload's)"
            )
        if not script and flavour != "tabular":
            raise ValueError(
                f"mlflow.flavour {flavour}: needs training.script (the reference "
                "payload saves the tabular flavour)"
            )
        if script and not os.path.isfile(script):
            raise ValueError(f"training.script: no such file {script}")
        return self

    @field_validator("startups")
    @classmethod
    def _some_startup(cls, v: dict[str, Startup]) -> dict[str, Startup]:
        if not v:
            raise ValueError("at least one start-up is required")
        return v

    # -- helpers -----------------------------------------------------------------------
    def storage_options(self, url: str) -> dict[str, Any]:
        if url.startswith("s3://") and self.object_store is not None:
            return self.object_store.storage_options()
        return {}

    def child_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.object_store is not None:
            env.update(self.object_store.env())
        if self.slurm.conf:
            env["SLURM_CONF"] = self.slurm.conf
        return env

    def slurm_client(self) -> Any:
        """The Slurm door of this profile: its SLURM_CONF, object store and job exports."""
        from aifactory.tasks.doors.slurm import SlurmClient

        return SlurmClient(env=self.child_env(), bin_dir=self.slurm.bin_dir,
                           export=tuple(self.slurm.export))  # fmt: skip

    def dataset_entry(self, dataset: str | None = None) -> Any:
        """The catalog entry of ``dataset`` (default: dataspace.dataset)."""
        from aifactory.tasks.data.catalog import catalog_at

        where = f"profile {self.name!r}: catalog {self.dataspace.catalog or 'default'}"
        return catalog_at(self.dataspace.catalog).get(dataset or self.dataspace.dataset, where)

    def dataset_url(self, entry: Any) -> str:
        """Where ``entry``'s objects are: dataspace.url for the profile's own dataset, else
        the catalog distribution under dataspace.root."""
        from aifactory.tasks.data.catalog import resolve_distribution

        if self.dataspace.url and entry.id == self.dataspace.dataset:
            return self.dataspace.url
        return resolve_distribution(entry, self.dataspace.root)

    def purpose(self, startup_id: str | None, explicit: str | None = None) -> tuple[str, list[str]]:
        """The purpose a run declares, and the start-up's declared purposes."""
        _, st = self.startup(startup_id)
        chosen = explicit or self.dataspace.purpose or (st.purposes[0] if st.purposes else None)
        return chosen or "unspecified", list(st.purposes)

    def tenant(self, startup_id: str | None) -> tuple[str, Startup]:
        """The start-up of a run, after the isolation rules (tasks/core/tenancy.py: its own lake
        prefix and Slurm account); raises TenancyError (exit 6)."""
        from aifactory.tasks.core.tenancy import check_isolation

        sid, st = self.startup(startup_id)
        check_isolation(self, sid)
        return sid, st

    def lake_url_for(self, startup_id: str | None) -> str:
        """The lake of a start-up's runs: ``<lake.url>/<s3_prefix>`` (``lake.url`` when the
        start-up has no prefix), after the isolation rules."""
        from aifactory.tasks.core.tenancy import tenant_lake_url

        _, st = self.tenant(startup_id)
        return tenant_lake_url(self.lake.url, st)

    def startup(self, startup_id: str | None) -> tuple[str, Startup]:
        sid = startup_id or self.default_startup
        if sid not in self.startups:
            known = ", ".join(sorted(self.startups))
            raise ConfigError(
                f"unknown start-up {sid!r} in profile {self.name!r}: known start-ups are {known}"
            )
        return sid, self.startups[sid]

    def public_dict(self) -> dict[str, Any]:
        """The resolved config with secrets masked: safe for manifests, logs and tags."""
        data = self.model_dump(mode="json")
        store = data.get("object_store")
        if store:
            for k in ("key", "secret"):
                if store.get(k):
                    store[k] = "***"
        ds = data.get("dataspace") or {}
        key = ds.get("pseudonymisation_key")
        if key and not str(key).startswith(("file:", "env:", "prefect-secret:")):
            ds["pseudonymisation_key"] = "***"
        return data

    def config_hash(self) -> str:
        blob = json.dumps(self.public_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
def _interpolate(value: Any, env: dict[str, str], where: str) -> Any:
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{where}: environment variable ${{{name}}} is not set and has no default"
            )

        prev = None
        while prev != value:
            prev, value = value, _VAR.sub(sub, value)
        return value
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


DEFAULT_PROJECT = Path(__file__).resolve().parents[2] / "examples" / "mobility-trips"


def default_features() -> dict[str, Any]:
    """The bundled mobility project's features section (its function's file made absolute):
    what a profile that names no feature function trains on."""
    from aifactory.tasks.core.project import PROJECT_FILE, abs_ref, load_project

    section = dict(load_project(DEFAULT_PROJECT / PROJECT_FILE).features)
    section["function"] = abs_ref(section["function"], DEFAULT_PROJECT)
    return section


def _absolutise(data: dict[str, Any], base: Path) -> None:
    """Make relative ``*_dir`` paths, ``file://`` URLs and a feature function's file
    (``features.function: features.py:NAME``) absolute (in place)."""

    def fix_path(p: str) -> str:
        return str((base / p).resolve()) if not os.path.isabs(p) else p

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            for k, v in node.items():
                if isinstance(v, str):
                    if v.startswith("file://"):
                        node[k] = "file://" + fix_path(v[len("file://") :])
                    elif k == "pseudonymisation_key" and v.startswith("file:"):
                        node[k] = "file:" + fix_path(v[len("file:") :])
                    elif (
                        (k == "catalog" and v)
                        or ((k.endswith("_dir") or k == "conf") and v)
                        or (k == "script" and v)
                    ):
                        node[k] = fix_path(v)
                    elif k in ("function", "model_class", "python_model") and ".py:" in v:
                        file, name = v.rsplit(":", 1)
                        node[k] = f"{fix_path(file)}:{name}"
                    elif (
                        k == "tracking_uri"
                        and v.startswith("sqlite:///")
                        and not v.startswith("sqlite:////")
                    ):
                        node[k] = "sqlite:///" + fix_path(v[len("sqlite:///") :])
                else:
                    walk(v)
        elif isinstance(node, list):
            for item in node:
                walk(item)
        return node

    walk(data)


def _set_path(data: dict[str, Any], dotted: list[str], value: Any) -> None:
    node = data
    for part in dotted[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(dotted)}: {part} is not a section")
    node[dotted[-1]] = value


def _env_overrides(env: dict[str, str]) -> dict[str, Any]:
    """AIF_TRAINING__EPOCHS=3 -> {"training": {"epochs": 3}} (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith("AIF_") or "__" not in key:
            continue
        path = [p.lower() for p in key[len("AIF_") :].split("__")]
        _set_path(out, path, yaml.safe_load(raw) if raw != "" else None)
    return out


def _hyphenated_ids(over: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """``AIF_STARTUPS__STARTUP_A__…`` names start-up ``startup-a``: a variable name with a
    hyphen is not portable (POSIX shells cannot set it, and /bin/sh drops it, as in the
    launcher pip writes when the virtual environment's path has a space)."""
    env_ids = over.get("startups")
    known = data.get("startups")
    if isinstance(env_ids, dict) and isinstance(known, dict):
        over["startups"] = {
            (k.replace("_", "-") if k not in known and k.replace("_", "-") in known else k): v
            for k, v in env_ids.items()
        }
    return over


def _tenancy_overrides(env: dict[str, str], overrides: dict[str, Any] | None,
                       data: dict[str, Any]) -> list[tuple[str, str]]:  # fmt: skip
    """(variable or override, ``startups.<id>.<key>``) of every ``AIF_STARTUPS__…`` variable
    and ``startups…`` override that would change a start-up's tenancy: any key but
    tenancy.RUN_OVERRIDABLE's, a start-up the file does not have, or a whole start-up or
    ``startups`` section. Tenancy comes only from the profile file (tasks/core/tenancy.py)."""
    from aifactory.tasks.core.tenancy import RUN_OVERRIDABLE

    startups = data.get("startups")
    known: dict[str, Any] = startups if isinstance(startups, dict) else {}
    sources: list[tuple[str, list[str], Any]] = []
    for name, raw in sorted(env.items()):
        path = [p.lower() for p in name[len("AIF_") :].split("__")]
        if name.startswith("AIF_") and "__" in name and path[0] == "startups":
            sources.append((name, path, yaml.safe_load(raw) if raw != "" else None))
    for dotted, value in (overrides or {}).items():
        if dotted.split(".")[0] == "startups" and value is not None:
            sources.append((f"override {dotted}", dotted.split("."), value))
    found = []
    for where, path, value in sources:
        for leaf in _leaves(value, path):
            sid = leaf[1] if len(leaf) > 1 else ""
            if where.startswith("AIF_") and sid not in known and sid.replace("_", "-") in known:
                sid = sid.replace("_", "-")  # as _hyphenated_ids reads it
            if len(leaf) < 3 or sid not in known or leaf[2] not in RUN_OVERRIDABLE:
                key = ["startups", sid, *leaf[2:3]] if len(leaf) > 1 else ["startups"]
                found.append((where, ".".join(key)))
    return found


def _leaves(value: Any, path: list[str]) -> Iterator[list[str]]:
    """The dotted paths an override sets: ``path``, or each leaf of a mapping under it."""
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(v, [*path, str(k)])
    elif not isinstance(value, dict):
        yield path


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def fmt_validation(err: ValidationError, label: str, root: type[BaseModel] | None = None,
                    most: int | None = None) -> str:  # fmt: skip
    """One line for a validation error of ``root`` (default: Profile), its first ``most``
    problems: an unknown key names the valid ones (by their alias, as a file spells them)."""
    parts = []
    for e in err.errors()[:most]:
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _model_at(root or Profile, list(e["loc"][:-1]))
            fields = parent.model_fields.items() if parent else []
            valid = ", ".join(sorted(f.alias or n for n, f in fields)) if parent else "?"
            parts.append(f"{loc}: unknown key (valid keys: {valid})")
        else:
            parts.append(f"{loc}: {e['msg']}")
    return f"{label}: " + "; ".join(parts)


def _model_at(model: type[BaseModel], loc: list[Any]) -> type[BaseModel] | None:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(str(part))
        if field is None:
            # dict[str, Model]: the key is a name, keep the value model
            continue
        ann = field.annotation
        current = _unwrap(ann)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(ann: Any) -> Any:
    args = getattr(ann, "__args__", None)
    if args:
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                return a
            inner = _unwrap(a)
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return ann


def profile_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise ConfigError(f"profile file {name_or_path}: not found")
        return p
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(q.stem for q in PROFILES_DIR.glob("*.yaml")))
        raise ConfigError(
            f"unknown profile {name_or_path!r}: use one of {known}, or a path to a YAML file"
        )
    return candidate


# Profiles resolved once for a run (run_scope): (profile, overrides) -> [Profile, users].
_SCOPES: dict[tuple[str | None, str], list[Any]] = {}
_SCOPES_LOCK = threading.Lock()


def _scope_key(name_or_path: str | None,
               overrides: dict[str, Any] | None) -> tuple[str | None, str]:  # fmt: skip
    return name_or_path, json.dumps(overrides or {}, sort_keys=True, default=str)


@contextlib.contextmanager
def run_scope(name_or_path: str | None, overrides: dict[str, Any] | None = None,
              ) -> Iterator[Profile]:  # fmt: skip
    """Resolve a run's profile once: inside, every ``load_profile(name, overrides)`` of this
    process with the same arguments (the run's subflows and tasks, in any thread) returns
    this same object instead of reading the profile file, the environment and the project's
    code again. Nested and concurrent scopes of the same arguments share it."""
    key = _scope_key(name_or_path, overrides)
    with _SCOPES_LOCK:
        entry = _SCOPES.get(key)
    if entry is None:
        prof = load_profile(name_or_path, overrides)
        with _SCOPES_LOCK:
            entry = _SCOPES.setdefault(key, [prof, 0])
    with _SCOPES_LOCK:
        entry[1] += 1
    try:
        yield entry[0]
    finally:
        with _SCOPES_LOCK:
            entry[1] -= 1
            if entry[1] == 0 and _SCOPES.get(key) is entry:
                del _SCOPES[key]


def load_profile(
    name_or_path: str | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    base_dir: Path | None = None,
) -> Profile:
    if env is None and base_dir is None and _SCOPES:
        with _SCOPES_LOCK:
            entry = _SCOPES.get(_scope_key(name_or_path, overrides))
        if entry is not None:
            return cast(Profile, entry[0])
    env = dict(os.environ if env is None else env)
    name_or_path = name_or_path or env.get("AIF_PROFILE") or "local"
    path = profile_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        raise ConfigError(f"profile {path}: invalid YAML at {where}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path}: top level must be a mapping, got {type(raw).__name__}")
    data = _interpolate(raw, env, path.name)
    file_lake = {"lake": {"url": (data.get("lake") or {}).get("url")}}
    tenancy = _tenancy_overrides(env, overrides, data)
    _merge(data, _hyphenated_ids(_env_overrides(env), data))
    for dotted, value in (overrides or {}).items():
        if dotted in REPLACED_SECTIONS and value is not None:  # a project's own, whole
            _set_path(data, dotted.split("."), value)
        elif value is not None:  # a dict value merges into its section, never replaces it
            one: dict[str, Any] = {}
            _set_path(one, dotted.split("."), value)
            _merge(data, one)
    feats = data.get("features")
    if isinstance(feats, dict) and feats and "function" not in feats:
        # A partial section (a profile's split, AIF_FEATURES__SPLIT) refines the default's.
        data["features"] = {**default_features(), **feats}
    _absolutise(data, base_dir or Path.cwd())
    _absolutise(file_lake, base_dir or Path.cwd())
    try:
        prof = Profile.model_validate(data)
    except ValidationError as err:
        if tenancy:  # a run's overrides of tenancy: refused whatever else is wrong
            from aifactory.tasks.core.tenancy import refuse_overrides

            raise refuse_overrides(None, tenancy, str(path)) from None
        raise ConfigError(fmt_validation(err, f"profile {path}")) from None
    if tenancy:
        from aifactory.tasks.core.tenancy import refuse_overrides

        raise refuse_overrides(prof, tenancy, str(path))
    url = file_lake["lake"]["url"]
    prof._file_lake_url = url if isinstance(url, str) else None
    return prof
