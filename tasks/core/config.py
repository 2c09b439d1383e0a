"""One typed config: profile YAML + AIF_* environment + CLI flags (explicit wins).

A profile is a YAML file (``infra/profiles/<name>.yaml`` or any path). It may start with
``extends: <profile or path>`` and give only the keys it changes: it is merged over its
parent (recursively; chains allowed). Values may reference the environment as ``${VAR}`` or
``${VAR:-default}``; ``AIF_HOME`` and ``AIF_SITE_DIR`` are always set (tasks/core/home.py:
the state home is ``$AIF_HOME`` or ``~/.aif``, never the current folder). Relative paths in
``*_dir`` keys and ``file://`` URLs are made absolute against the working directory so that
Slurm jobs and Dask workers see the same paths as the flow.

Precedence, lowest first: profile file(s) < ``AIF_<SECTION>__<KEY>`` environment variables
< explicit overrides (CLI flags, a project's file). A bad value is reported against the
source that gave it (the file that set the key, the variable, the flag). The resolved
config is saved in every run manifest, secrets masked (they are SecretStr).
A start-up's tenancy (``startups``: account, prefix, partitions, QoS, ...) comes only from
the file: an override of it is refused (TenancyError, ``isolation.overrides``).

Every key is documented in docs/profile-reference.md, generated from the models below:
    .venv/bin/python -m aifactory.tasks.core.config > docs/profile-reference.md
"""

from __future__ import annotations

import contextlib
import copy
import datetime as dt
import functools
import hashlib
import json
import os
import re
import sys
import threading
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from aifactory.tasks.core.errors import ConfigError
from aifactory.tasks.core.home import aif_home, site_address, site_dir
from aifactory.tasks.core.home import stray_state_hint as stray_state_hint  # for the CLI

PROFILES_DIR = Path(__file__).resolve().parents[2] / "infra" / "profiles"
# Sections an override replaces whole instead of merging into (a project's feature section
# is its own: the profile's mobility settings must not leak into it).
REPLACED_SECTIONS = ("features", "training.config")
# ${VAR} or ${VAR:-default}; defaults may nest (innermost first).
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^{}]*))?\}")
# Secrets given by reference (resolved when used) are not masked in manifests.
SECRET_REFERENCES = ("file:", "env:", "prefect-secret:")
# The longest configuration error the CLI prints (one line).
MAX_ERROR_CHARS = 1200


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


def _walltime_s(walltime: str | None) -> int:
    """Seconds of a Slurm time limit [D-]HH:MM:SS, MM:SS or MM (0 if unset)."""
    if not walltime:
        return 0
    days, _, rest = walltime.rpartition("-")
    try:
        parts = [int(p) for p in rest.split(":")]
        int(days or 0)
    except ValueError:
        return 0
    if len(parts) > 3:
        return 0
    h, m, sec = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _store_secret(value: SecretStr | None, what: str) -> str | None:
    """An object-store credential: the value, or the content of ``file:PATH`` (the site's
    platform secret, which only root reads)."""
    raw = _secret(value)
    if not raw or not raw.startswith("file:"):
        return raw
    from aifactory.tasks.core.errors import StorageError

    path = Path(raw[5:]).expanduser()
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise StorageError(f"object_store.{what}: {path} does not exist (the local site writes "
                           "it at `aif site up`)") from None  # fmt: skip
    except OSError as exc:
        raise StorageError(f"object_store.{what}: {path} is not readable "
                           f"({exc.strerror})") from None  # fmt: skip
    if not text:
        raise StorageError(f"object_store.{what}: {path} is empty")
    return text


class ObjectStore(_Model):
    """Credentials and endpoint for s3:// URLs (null: the default AWS chain)."""

    endpoint_url: str | None = Field(
        default=None, description="S3 endpoint URL (null: AWS's default endpoint)"
    )
    key: SecretStr | None = Field(
        default=None, description="Access key id (a secret: masked in manifests and logs)"
    )
    secret: SecretStr | None = Field(
        default=None, description="Secret access key (a secret: masked in manifests and logs)"
    )
    region: str = Field(default="us-east-1", description="Region of the object store")
    token: SecretStr | None = Field(
        default=None,
        description="Session token of temporary credentials (set by aifactory for a "
        "start-up's run when tenant_keys is set; a secret)",
    )
    tenant_keys: str | None = Field(
        default=None,
        description="Folder of the start-ups' own object-store keys (<start-up>.json, "
        "written by `aif site up`, readable by the orchestrator only). When set, a run of "
        "start-up X and its jobs use temporary credentials (STS) of X's identity, which "
        "the store limits to X's lake prefix and granted data sets, never key/secret",
    )

    def storage_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        key, secret = _store_secret(self.key, "key"), _store_secret(self.secret, "secret")
        token = _secret(self.token)
        if key:
            opts["key"] = key
        if secret:
            opts["secret"] = secret
        if token:
            opts["token"] = token
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
        key, secret = _store_secret(self.key, "key"), _store_secret(self.secret, "secret")
        if self.endpoint_url:
            out["AWS_ENDPOINT_URL"] = self.endpoint_url
            out["MLFLOW_S3_ENDPOINT_URL"] = self.endpoint_url
        if key:
            out["AWS_ACCESS_KEY_ID"] = key
        if secret:
            out["AWS_SECRET_ACCESS_KEY"] = secret
        token = _secret(self.token)
        if token:
            out["AWS_SESSION_TOKEN"] = token
        return out


class Generator(_Model):
    """Deterministic seeding of the data space when it is empty (local and site); unset
    fields take the catalog entry's generator settings."""

    seed: int | None = Field(
        default=None, description="Seed of the generated data (null: the catalog entry's)"
    )
    rows: int | None = Field(
        default=None, ge=1, description="Rows to generate (null: the catalog entry's)"
    )
    objects: int | None = Field(
        default=None, ge=1, description="Objects (files) to write (null: the catalog entry's)"
    )


class Dataspace(_Model):
    """Where a run's input dataset comes from, and how it is ingested."""

    root: str | None = Field(
        default=None,
        description="Root of the data spaces: catalog distributions without a scheme are "
        "relative to it",
    )
    url: str | None = Field(
        default=None,
        description="fsspec URL or glob of the dataset's objects, overriding the catalog's "
        "distribution",
    )
    dataset: str = Field(default="mobility-trips", description="Catalog id of the dataset")
    catalog: str | None = Field(
        default=None, description="Catalog YAML file (null: infra/catalog/catalog.yaml)"
    )
    purpose: str | None = Field(
        default=None,
        description="Purpose a run declares (null: the start-up's first declared purpose)",
    )
    generate: Generator | None = Field(
        default=None,
        description="Seed the data space from the catalog's generator when its prefix holds "
        "no objects ({} for the catalog's settings; null: never)",
    )
    seed: bool = Field(
        default=False,
        description="Seed the data space from the catalog's generator when it holds no "
        "objects even where it is not the profile's own demo data space (the CLI's "
        "--seed-demo-data; tasks/data/seeding.py)",
    )
    quarantine: bool = Field(
        default=False,
        description="Commit the good objects and list the bad ones (false: the first bad "
        "object fails the ingest)",
    )
    pseudonymisation_key: SecretStr | None = Field(
        default=None,
        description="Secret for pseudonymising personal-data columns: file:PATH (created, "
        "0600, when missing), env:VAR, prefect-secret:BLOCK, or the value itself (masked); "
        "never logged",
    )
    ingest_workers: int = Field(default=2, ge=1, description="Objects ingested in parallel")


class Lake(_Model):
    """The lake: ingested snapshots, features and run outputs."""

    url: str = Field(
        description="fsspec URL of the lake root (a start-up's runs use its s3_prefix under it)"
    )


class DaskSpec(_Model):
    """The Dask cluster of the preprocessing stage."""

    kind: Literal["local", "slurm"] = Field(
        default="local",
        description="Where the workers run: a LocalCluster on this machine, or Slurm jobs",
    )
    scheduler: Literal["flow-host", "allocation"] = Field(
        default="flow-host",
        description="Where the scheduler runs (kind slurm): flow-host (the flow's process; "
        "each worker is its own Slurm job, replaced before its walltime) or allocation "
        "(scheduler and workers in one Slurm job, for sites whose compute nodes cannot reach "
        "the login node; the stage must fit that job's walltime)",
    )
    workers: int = Field(
        default=2, ge=1, description="Worker jobs (fixed size; see adaptive_min/adaptive_max)"
    )
    cores: int = Field(default=1, ge=1, description="Cores per worker job")
    processes: int = Field(default=1, ge=1, description="Worker processes per worker job")
    memory: str = Field(default="2GiB", description="Memory per worker job (e.g. 2GiB)")
    walltime: str = Field(default="00:30:00", description="Time limit of a worker job (HH:MM:SS)")
    partition: str = Field(default="cpu", description="Slurm partition of the worker jobs")
    qos: str | None = Field(
        default=None, description="Slurm QoS of the worker jobs (null: the account's default)"
    )
    job_extra_directives: list[str] = Field(
        default_factory=list, description="Extra #SBATCH directives of the worker jobs"
    )
    job_script_prologue: list[str] = Field(
        default_factory=list,
        description="Shell lines before a worker starts (module loads, venv activation)",
    )
    interface: str | None = Field(
        default=None,
        description="Network interface of the scheduler and workers (e.g. ib0; null: the default)",
    )
    scheduler_host: str = Field(
        default="127.0.0.1", description="Address the scheduler listens on (flow-host)"
    )
    partitions_per_task: int = Field(
        default=1, description="Not used at present; accepted so that profiles setting it load"
    )
    adaptive_min: int | None = Field(
        default=None,
        ge=0,
        description="Adaptive scaling: fewest worker jobs (set both bounds or neither; null: "
        "a fixed number, workers)",
    )
    adaptive_max: int | None = Field(
        default=None, ge=1, description="Adaptive scaling: most worker jobs"
    )
    lifetime: str | None = Field(
        default=None,
        description="Walltime safety: workers retire this long after they start (Dask "
        "duration, e.g. 25m), staggered, handing their data to the others; adaptive scaling "
        "submits replacements (null: never)",
    )
    lifetime_stagger: str = Field(
        default="2m", description="Spread of the workers' retirement times (Dask duration)"
    )
    drain_margin: str = Field(
        default="10s",
        description="A worker gets no new partition when less than this, plus 1.5 times the "
        "slowest partition so far, is left before its deadline: it is drained, retired and "
        "replaced, so no partition is cut off by a walltime",
    )
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=64 KiB so that freed memory goes back to the
    # OS at once; then every large pandas temporary gets fresh pages from the kernel (page
    # faults, about 20% of this transform's time). The pad keeps this much of freed heap
    # for reuse; memory above it is still given back.
    malloc_top_pad: str | None = Field(
        default="64MiB",
        description="glibc's top pad (MALLOC_TOP_PAD_) of worker processes: freed heap kept "
        "for reuse instead of fresh pages from the kernel (null: glibc's and Dask's defaults)",
    )

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
    """The training job. Generic resource names; translated to Slurm's names in
    tasks/stages/training.py."""

    executor: Literal["local", "slurm"] = Field(
        default="local", description="Where training runs: a local process or a Slurm job"
    )
    payload: Literal["tabular", "lm"] = Field(
        default="tabular",
        description="The reference trainer: tabular (an MLP on the features) or lm (a small "
        "language model)",
    )
    script: str | None = Field(
        default=None,
        description="A project's own training script (.py; its folder is the project's code, "
        "copied into the run directory and hashed into the run key); replaces the reference "
        "payload",
    )
    config: dict[str, Any] = Field(
        default_factory=dict, description="What a project's script gets as job.config"
    )
    partition: str = Field(default="gpu", description="Slurm partition of the training job")
    gpus_per_node: int = Field(default=1, ge=0, description="GPUs per node")
    nodes: int = Field(default=1, ge=1, description="Nodes")
    cpus_per_task: int = Field(default=1, ge=1, description="CPUs per task")
    mem_gb: float = Field(default=2.0, gt=0, description="Memory per node, GB")
    timeout_min: int = Field(default=20, ge=1, description="Time limit, minutes")
    qos: str | None = Field(default=None, description="Slurm QoS (null: the account's default)")
    constraint: str | None = Field(
        default=None, description="Slurm node constraint (--constraint; null: any node)"
    )
    modules: list[str] = Field(
        default_factory=list, description="Environment modules loaded before the payload"
    )
    setup: list[str] = Field(default_factory=list, description="Shell lines before the payload")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the training job"
    )
    poll_seconds: float = Field(
        default=1.0, gt=0, description="Seconds between checks of the job's state"
    )
    max_resubmits: int = Field(
        default=2,
        ge=0,
        description="Resubmissions after TIMEOUT, PREEMPTED or NODE_FAIL (the payload resumes "
        "from its checkpoint); out of memory, failures and cancellations are never retried",
    )
    signal_before_end_s: int = Field(
        default=60,
        ge=5,
        description="Slurm warns the job this many seconds before its time limit "
        "(--signal=B:USR1@N): the payload checkpoints and is requeued",
    )
    container: str | None = Field(
        default=None,
        description="Apptainer image (path or URI) to run the payload in (apptainer exec "
        "[--nv]); the run directory is bound into it (null: no container)",
    )
    container_options: list[str] = Field(
        default_factory=list, description="Extra apptainer options, e.g. [--bind, /scratch]"
    )
    epochs: int = Field(default=8, ge=1, description="Epochs (reference payload)")
    batch_size: int = Field(default=512, ge=1, description="Batch size (reference payload)")
    hidden: list[int] = Field(
        default_factory=lambda: [64, 32],
        description="Hidden layer sizes of the MLP (reference payload)",
    )
    lr: float = Field(default=2e-3, gt=0, description="Learning rate (reference payload)")
    seed: int = Field(default=1234, description="Random seed of training")

    @model_validator(mode="after")
    def _signal_before_limit(self) -> TrainingSpec:
        if self.signal_before_end_s >= self.timeout_min * 60:
            raise ValueError(
                f"signal_before_end_s ({self.signal_before_end_s}) must be shorter than the time "
                f"limit timeout_min ({self.timeout_min} min): the warning would come at the start"
            )
        return self


class MlflowSpec(_Model):
    """Tracking and model registry (tasks/models/flavours.py saves and loads the model)."""

    tracking_uri: str = Field(
        description="MLflow tracking URI (sqlite:///PATH, http://HOST:PORT, ...)"
    )
    registry_uri: str | None = Field(
        default=None, description="Model registry URI (null: the tracking URI)"
    )
    artifact_location: str | None = Field(
        default=None, description="Artifact root of the experiment (for a local store)"
    )
    experiment: str = Field(
        default="aifactory",
        description="Experiment name (with tenant_credentials, each start-up's runs go to "
        "<experiment>-<start-up>, an experiment of its own)",
    )
    model_name: str = Field(default="mobility-trip-duration", description="Registered model")
    flavour: Literal["tabular", "pytorch", "sklearn", "pyfunc"] = Field(
        default="tabular",
        description="How the trained model is saved and loaded: tabular (the reference MLP), "
        "pytorch (a state dict in model.pt, built by model_class), sklearn (a pickled "
        "estimator in model.pkl) or pyfunc (python_model); each registers as one pyfunc that "
        "featurises raw rows",
    )
    model_class: str | None = Field(
        default=None,
        description="Flavour pytorch: FILE.py:CLASS or module:CLASS, built with the keyword "
        "arguments in model_init.json",
    )
    python_model: str | None = Field(
        default=None,
        description="Flavour pyfunc: FILE.py:CLASS or module:CLASS, an "
        "mlflow.pyfunc.PythonModel loading the run's outputs",
    )

    tenant_credentials: str | None = Field(
        default=None,
        description="Folder of the registry users' passwords (<user>.secret, written by `aif "
        "site up`, readable by the orchestrator only). When set, the tracking server checks "
        "permissions (MLflow's basic-auth app): a run of start-up X acts as MLflow user X, "
        "in X's own experiment, and sees nothing of the other start-ups",
    )
    username: str | None = Field(
        default=None,
        description="The registry user this config acts as, its password read from "
        "tenant_credentials when the registry is called (set by aifactory for a start-up's "
        "run; null: the process's own MLFLOW_TRACKING_USERNAME/PASSWORD, if any)",
    )

    def as_user(self, user: str) -> MlflowSpec:
        """This spec acting as registry ``user`` (with tenant_credentials; else itself)."""
        if not self.tenant_credentials:
            return self
        return self.model_copy(update={"username": user})

    @property
    def run_experiment(self) -> str:
        """The experiment a run logs to: with tenant credentials, the start-up's own
        (``<experiment>-<start-up>``, which `aif site up` makes and gives to it)."""
        from aifactory.tasks.doors.registry import startup_experiment

        if self.tenant_credentials and self.username:
            return startup_experiment(self.experiment, self.username)
        return self.experiment

    @model_validator(mode="after")
    def _flavour_needs(self) -> MlflowSpec:
        if self.flavour == "pytorch" and not self.model_class:
            raise ValueError("flavour pytorch needs model_class (FILE.py:CLASS or module:CLASS)")
        if self.flavour == "pyfunc" and not self.python_model:
            raise ValueError("flavour pyfunc needs python_model (FILE.py:CLASS or module:CLASS)")
        return self


class MetricCheck(_Model):
    """One check of a candidate model's metric."""

    metric: str = Field(description="Metric name, as training logs it")
    min: float | None = Field(default=None, description="Lowest allowed value (null: none)")
    max: float | None = Field(default=None, description="Highest allowed value (null: none)")

    @model_validator(mode="after")
    def _a_bound(self) -> MetricCheck:
        if self.min is None and self.max is None:
            raise ValueError(f"check on {self.metric!r}: give min, max or both")
        return self


class PromotionSpec(_Model):
    """When `champion` may move (aif model promote): the candidate must beat the champion
    on ``metric`` by ``margin`` (relative) and pass every check."""

    metric: str = Field(
        default="test_rmse", description="Metric the candidate must beat the champion on"
    )
    higher_is_better: bool = Field(default=False, description="Whether larger metric is better")
    margin: float = Field(
        default=0.0, description="Relative improvement over the champion needed (0.05: 5%)"
    )
    checks: list[MetricCheck] = Field(
        default_factory=list, description="Checks every candidate must pass"
    )
    require_documents: bool = Field(
        default=True, description="Model card, data summary and RO-Crate attached"
    )
    require_clean_code: bool = Field(
        default=False, description="Trained from a committed tree (no uncommitted changes)"
    )
    require_approved_declaration: bool = Field(
        default=True, description="The start-up's responsible-AI declaration is approved"
    )


class RetentionSpec(_Model):
    """How long the Prefect server of the profile (the site's, or a managed one) keeps what
    runs leave behind: Prefect's own database-vacuum service deletes the rest."""

    flow_runs_days: float = Field(
        default=30, gt=1 / 24,
        description="Finished top-level flow runs (with their stage runs, task runs, logs "
        "and artifacts) older than this many days are deleted (Prefect's minimum: 1 hour)",
    )  # fmt: skip
    events_days: float = Field(
        default=7, gt=0, description="Events older than this many days are deleted"
    )
    vacuum_every_s: float = Field(
        default=3600, gt=0, description="How often the vacuum service looks, in seconds"
    )

    def server_env(self) -> dict[str, str]:
        """The Prefect server's settings for it."""
        return {
            "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs,orphans",
            "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(
                int(self.flow_runs_days * 86400)),
            # A plain timedelta setting: an ISO 8601 duration (bare seconds do not parse).
            "PREFECT_SERVER_EVENTS_RETENTION_PERIOD": f"PT{int(self.events_days * 86400)}S",
            "PREFECT_SERVER_SERVICES_DB_VACUUM_LOOP_SECONDS": str(self.vacuum_every_s),
        }  # fmt: skip


class PrefectSpec(_Model):
    """The Prefect API the flows report to."""

    api_url: str = Field(
        default="managed",
        description="Prefect API URL, or managed: aif starts a local Prefect server (state "
        "under home_dir) and reuses it",
    )
    managed_port: int = Field(default=4210, description="Port of the managed Prefect server")
    work_pools: Literal["shared", "per-startup"] = Field(
        default="shared",
        description="shared: every deployment of the profile runs on the work pool "
        "aif-<profile>; per-startup: each start-up's deployments run on a pool of its own, "
        "aif-<profile>-<start-up>, limited to its startups.<id>.flow_runs at once (a site "
        "runs one worker per pool)",
    )
    retention: RetentionSpec = Field(
        default_factory=RetentionSpec,
        description="What the profile's own Prefect server (a site's, a managed one) keeps",
    )


class SlurmSpec(_Model):
    """How aif calls Slurm."""

    conf: str | None = Field(
        default=None, description="SLURM_CONF of every Slurm command (null: the site default)"
    )
    bin_dir: str | None = Field(
        default=None, description="Folder of the Slurm commands (null: from PATH)"
    )
    export: list[str] = Field(
        default_factory=list,
        description="Names of environment variables jobs get besides the base set "
        "(tasks/doors/slurm.py: JOB_ENV) and the object store's; values from the submitting "
        "environment",
    )


class AllocationSpec(_Model):
    """`aif run --in-allocation`: the whole flow run as one Slurm job on a compute node, its
    Prefect and MLflow calls through the site's relay (tasks/control/relay.py)."""

    relay_dir: str = Field(
        description="Folder of the relay's spools on the shared filesystem (the site's relay "
        "answers them on the login side)"
    )
    partition: str = Field(default="gpu", description="Slurm partition of the flow's job")
    gpus: int = Field(default=1, ge=0, le=8, description="GPUs (GRES) of the flow's job")
    cpus: int = Field(
        default=2,
        ge=1,
        le=256,
        description="CPUs of the flow's job: its Dask workers and its training process share them",
    )
    mem_gb: int = Field(default=4, ge=1, le=4096, description="Memory of the flow's job (GB)")
    time_limit: str = Field(
        default="01:00:00", description="Time limit of the flow's job ([D-]HH:MM:SS)"
    )


class Declaration(_Model):
    """A project's responsible-AI declaration (shown in every model card)."""

    intended_purpose: str = Field(description="What the model is for")
    prohibited_practices: str = Field(
        description="Self-assessment against the EU AI Act's prohibited practices (Art. 5)"
    )
    risk_class: Literal["minimal", "limited", "high"] = Field(
        default="minimal", description="Risk class"
    )
    approved_by: str | None = Field(default=None, description="Who approved the declaration")
    approved_on: dt.date | None = Field(default=None, description="When (YYYY-MM-DD)")


class Startup(_Model):
    """A start-up (tenant), by its id: its runs use only its own lake prefix and Slurm
    account (tasks/core/tenancy.py). Only gpu_hours_budget, budget_since and declaration
    may be changed by the environment or a run's overrides."""

    account: str = Field(description="Slurm account of its jobs")
    project: str = Field(default="default", description="Project name")
    title: str = Field(default="", description="Human-readable name")
    s3_prefix: str | None = Field(
        default=None, description="Its own prefix under lake.url (null: the lake's root)"
    )
    partitions: list[str] | None = Field(
        default=None, description="Slurm partitions its runs may use (null: any)"
    )
    qos: list[str] | None = Field(default=None, description="Slurm QoS it may use (null: any)")
    purposes: list[str] = Field(
        default_factory=list,
        description="Intended purposes it declared; data-space policies are checked against "
        "the purpose a run gives (the first one by default)",
    )
    declaration: Declaration | None = Field(
        default=None, description="Its responsible-AI declaration"
    )
    gpu_hours_budget: float | None = Field(
        default=None,
        ge=0,
        description="GPU-hours it may use (sacct's allocations since budget_since; null: no cap)",
    )
    budget_since: str = Field(
        default="now-365days", description="Start of the budget window (sacct --starttime)"
    )
    user: str | None = Field(
        default=None,
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="Unix user (and its group) that its Slurm jobs and Dask workers run as: "
        "a root orchestrator submits with sbatch --uid/--gid and hands the job's folders to "
        "it (mode 700). The site makes one per start-up; null: the submitting user",
    )
    flow_runs: int = Field(
        default=2,
        ge=1,
        le=1000,
        description="How many of its flow runs run at once: the concurrency limit of its own "
        "work pool (prefect.work_pools: per-startup); more wait, Scheduled, in the pool",
    )


class NotificationsSpec(_Model):
    """Where `aif deploy` sends failure and promotion notifications. The webhook's URL is a
    secret: the profile names where it is (it goes into a Prefect webhook block's secrets,
    never into parameters, logs or job scripts), never the URL itself."""

    webhook: str | None = Field(
        default=None,
        description="Webhook URL given as env:VAR, prefect-secret:BLOCK or file:PATH (null: "
        "no notifications)",
    )


def _default_runs_dir(data: dict[str, Any]) -> str:
    return f"{data.get('home_dir') or aif_home()}/runs"


class Profile(_Model):
    """The top level of a profile file."""

    name: str = Field(description="Profile name (in run records and messages)")
    description: str = Field(default="", description="One line about the profile")
    home_dir: str = Field(
        default_factory=lambda: str(aif_home()),
        description="State home: managed services' state (the local Prefect server)",
    )
    runs_dir: str = Field(
        default_factory=_default_runs_dir,
        description="Run directories; a shared filesystem visible from compute nodes",
    )
    default_startup: str = Field(description="Start-up of a run that names none")
    startups: dict[str, Startup] = Field(description="The start-ups (tenants), by id")
    object_store: ObjectStore | None = Field(
        default=None, description="Credentials and endpoint for s3:// URLs"
    )
    dataspace: Dataspace = Field(description="The input dataset")
    lake: Lake = Field(description="The lake")
    dask: DaskSpec = Field(default_factory=DaskSpec, description="Preprocessing's Dask cluster")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training")
    mlflow: MlflowSpec = Field(description="Tracking and model registry")
    prefect: PrefectSpec = Field(default_factory=PrefectSpec, description="Prefect API")
    promotion: PromotionSpec = Field(
        default_factory=PromotionSpec, description="When a model may become champion"
    )
    slurm: SlurmSpec = Field(default_factory=SlurmSpec, description="Slurm commands")
    allocation: AllocationSpec | None = Field(
        default=None,
        description="`aif run --in-allocation`: the flow run in a Slurm job "
        "(null: not offered by this profile)",
    )
    notifications: NotificationsSpec = Field(
        default_factory=NotificationsSpec, description="aif deploy's notifications"
    )
    # Feature engineering (tasks/stages/features.py): the feature function and the
    # platform's keys, checked by features.resolve_config. The embedded default is the
    # bundled mobility project's (examples/mobility-trips).
    features: dict[str, Any] = Field(
        default_factory=lambda: default_features(),
        description="Feature engineering: function (FILE.py:NAME or module:NAME) and the "
        "platform's keys key, target, split, params, text (tasks/stages/features.py); a "
        "partial section refines the default",
    )
    # lake.url as the profile file gives it, before AIF_* and CLI overrides (load_profile
    # sets it): the start-ups' prefixes are also guarded under it (tasks/core/tenancy.py).
    _file_lake_url: str | None = PrivateAttr(default=None)
    _run_as: str | None = PrivateAttr(default=None)  # set by for_startup: its Unix user

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

    def for_startup(self, startup_id: str) -> Profile:
        """This profile as a run of ``startup_id`` sees it. With per-start-up identities
        (``object_store.tenant_keys``), the start-up's temporary credentials replace the
        platform's key, valid a while past the longest time limit of its jobs; with
        ``mlflow.tenant_credentials``, the registry is used as the start-up's own MLflow
        user (``registry_for``); otherwise the profile itself."""
        store = self.object_store
        user = self.startup(startup_id)[1].user
        out = self
        if self.mlflow.tenant_credentials:
            out = self.model_copy(update={"mlflow": self.registry_for(startup_id)})
        if (store is None or not store.tenant_keys) and not user:
            return out
        if store is not None and store.tenant_keys:
            from aifactory.tasks.doors.s3_identity import session

            seconds = max(self.training.timeout_min * 60, _walltime_s(self.dask.walltime)) + 1800
            s = session(store.tenant_keys, startup_id, store.endpoint_url, store.region, seconds)
            mine = store.model_copy(update={
                "key": SecretStr(s.access_key), "secret": SecretStr(s.secret_key),
                "token": SecretStr(s.token), "tenant_keys": None,
            })  # fmt: skip
            out = out.model_copy(update={"object_store": mine})
        elif out is self:
            out = self.model_copy()
        out._run_as = user
        return out

    def registry_for(self, startup_id: str) -> MlflowSpec:
        """The registry as a run of ``startup_id`` uses it: with tenant credentials, as the
        start-up's own MLflow user (in its own experiment: ``run_experiment``)."""
        return self.mlflow.as_user(startup_id)

    def as_operator(self) -> Profile:
        """This profile as the site's operators' tools see the registry: MLflow user
        ``aif-operator``, who reads every start-up's experiments and models and writes none
        (infra/site/mlflow_auth.py); the profile itself without tenant credentials."""
        from aifactory.tasks.doors.registry import OPERATOR

        if not self.mlflow.tenant_credentials:
            return self
        return self.model_copy(update={"mlflow": self.mlflow.as_user(OPERATOR)})

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
                           export=tuple(self.slurm.export), run_as=self._run_as)  # fmt: skip

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
        """The resolved config with secrets masked (``***``; a secret given by reference,
        file:/env:/prefect-secret:, is shown as such): safe for manifests, logs and tags."""
        data = self.model_dump(mode="json")  # SecretStr dumps as "**********" (or "")
        if self.object_store is not None:
            for k in ("key", "secret", "token"):
                value = _secret(getattr(self.object_store, k))
                data["object_store"][k] = "***" if value else value
        key = _secret(self.dataspace.pseudonymisation_key)
        masked = key and not key.startswith(SECRET_REFERENCES)
        data["dataspace"]["pseudonymisation_key"] = "***" if masked else key
        return cast(dict[str, Any], _mask_url_passwords(data))

    def config_hash(self) -> str:
        """The run's configuration, not its identity: the object store's temporary session,
        the start-ups' key folder and the registry user are left out (a start-up's run and
        the platform's replay of it hash the same; hashes of earlier versions are
        unchanged)."""
        data = self.public_dict()
        if isinstance(data.get("object_store"), dict):
            for k in ("token", "tenant_keys"):
                data["object_store"].pop(k, None)
        for k in ("tenant_credentials", "username"):  # who acts, not what runs
            data["mlflow"].pop(k, None)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# A password written into a URL (scheme://user:password@host/...).
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*):[^@/\s]+@")


def mask_url_password(text: str) -> str:
    """``scheme://user:***@host`` for ``scheme://user:password@host``, anywhere in text."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def _mask_url_passwords(node: Any) -> Any:
    if isinstance(node, str):
        return mask_url_password(node)
    if isinstance(node, dict):
        return {k: _mask_url_passwords(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_mask_url_passwords(v) for v in node]
    return node


# ---------------------------------------------------------------------------------------
def _interpolate(value: Any, env: dict[str, str], label: str, path: tuple[str, ...] = ()) -> Any:
    """``${VAR}`` and ``${VAR:-default}`` in every string of ``value`` (a file's data)."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env and env[name] != "":
                return env[name]
            if default is not None:
                return default
            where = ".".join(path) or "value"
            raise ConfigError(
                f"{label}: {where}: environment variable ${{{name}}} is not set and has no default"
            )

        prev = None
        while prev != value:
            prev, value = value, _VAR.sub(sub, value)
        return value
    if isinstance(value, dict):
        return {k: _interpolate(v, env, label, (*path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, label, (*path, str(i))) for i, v in enumerate(value)]
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


def _set_path(data: dict[str, Any], dotted: list[str], value: Any, label: str = "") -> None:
    node = data
    for part in dotted[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = label or f"override {'.'.join(dotted)}"
            raise ConfigError(f"{where}: {part} is not a section")
    node[dotted[-1]] = value


# -- AIF_<SECTION>__<KEY> environment variables -----------------------------------------
ENV_PREFIX = "AIF_"
ENV_DELIMITER = "__"


def _sections() -> list[str]:
    """Profile keys that are sections (a model or a mapping): the keys that
    ``AIF_<SECTION>__<KEY>`` variables can reach."""
    out = []
    for name, field in Profile.model_fields.items():
        inner = _unwrap(field.annotation)
        if (isinstance(inner, type) and issubclass(inner, BaseModel)) or get_origin(
            field.annotation
        ) is dict:
            out.append(name)
    return out


class _EnvLayerBase(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        case_sensitive=False,
        extra="ignore",
    )


@functools.cache
def _env_source() -> tuple[EnvSettingsSource, type[BaseSettings]]:
    """pydantic-settings' reader of ``AIF_<SECTION>__<KEY>`` variables: prefix, nesting
    delimiter and case-insensitivity are its (EnvSettingsSource.explode_env_vars).

    Only that part of pydantic-settings is used, not a validated BaseSettings object: the
    environment is the middle layer (over the profile file, under flags), so it cannot be
    validated alone (the required keys are in the file); a bad value must be blamed on its
    variable, which a validated settings object no longer knows; load_profile reads a given
    mapping (``env=``), not only os.environ; and values keep today's YAML parsing
    (``[cpu, gpu]``, ``null``), which its JSON decoding does not do. So each section is an
    untyped mapping here and the merged profile is validated once, by Profile."""
    fields: dict[str, Any] = {name: (dict[str, Any] | None, None) for name in _sections()}
    layer = cast(
        "type[BaseSettings]",
        create_model("ProfileEnvironment", __base__=_EnvLayerBase, **fields),
    )
    return EnvSettingsSource(layer), layer


def _parse_env_value(raw: Any) -> Any:
    """A variable's value as YAML (``3``, ``true``, ``[cpu, gpu]``, ``{a: 1}``, JSON); an
    empty one is null; one that is not valid YAML stays a string."""
    if not isinstance(raw, str):
        return raw
    if raw == "":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _raw_leaves(tree: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _raw_leaves(v, [*path, str(k)])
    else:
        yield path, tree


def _hyphenated_ids(path: list[str], data: dict[str, Any]) -> list[str]:
    """``AIF_STARTUPS__STARTUP_A__…`` names start-up ``startup-a``: a variable name with a
    hyphen is not portable (POSIX shells cannot set it, and /bin/sh drops it, as in the
    launcher pip writes when the virtual environment's path has a space)."""
    known = data.get("startups")
    if len(path) > 1 and path[0] == "startups" and isinstance(known, dict):
        sid = path[1]
        if sid not in known and sid.replace("_", "-") in known:
            return [path[0], sid.replace("_", "-"), *path[2:]]
    return path


EnvEntry = tuple[str, list[str], Any]  # (variable, dotted path, parsed value)


def _env_entries(env: dict[str, str], data: dict[str, Any]) -> list[EnvEntry]:
    """Every ``AIF_<SECTION>__<KEY>`` variable of ``env`` as (its name, the path it sets,
    its value), by name. Variables without ``__`` (AIF_HOME, AIF_PROFILE, ...) are not
    keys; one naming no section is an error naming it."""
    names = {k.lower(): k for k in env if k.upper().startswith(ENV_PREFIX) and ENV_DELIMITER in k}
    if not names:
        return []
    source, layer = _env_source()
    sections = set(layer.model_fields)
    for low in sorted(names):
        head = low[len(ENV_PREFIX) :].split(ENV_DELIMITER)[0]
        if head not in sections:
            raise ConfigError(
                f"environment variable {names[low]}: {head}: unknown key (valid keys: "
                f"{', '.join(sorted(sections))}; AIF_<SECTION>__<KEY> sets section.key)"
            )
    lowered = {low: env[name] for low, name in names.items()}
    out: list[EnvEntry] = []
    for section, field in layer.model_fields.items():
        tree = source.explode_env_vars(section, field, lowered)
        for path, raw in _raw_leaves(tree, [section]):
            low = ENV_PREFIX.lower() + ENV_DELIMITER.join(path)
            name = names.get(low) or low.upper()
            out.append((name, _hyphenated_ids(path, data), _parse_env_value(raw)))
    return sorted(out, key=lambda e: e[0])


def _tenancy_overrides(env_entries: list[EnvEntry], overrides: dict[str, Any] | None,
                       data: dict[str, Any], origins: dict[str, str] | None = None,
                       ) -> list[tuple[str, str]]:  # fmt: skip
    """(variable or override, ``startups.<id>.<key>``) of every ``AIF_STARTUPS__…`` variable
    and ``startups…`` override that would change a start-up's tenancy: any key but
    tenancy.RUN_OVERRIDABLE's, a start-up the file does not have, or a whole start-up or
    ``startups`` section. Tenancy comes only from the profile file (tasks/core/tenancy.py)."""
    from aifactory.tasks.core.tenancy import RUN_OVERRIDABLE

    startups = data.get("startups")
    known: dict[str, Any] = startups if isinstance(startups, dict) else {}
    sources: list[tuple[str, list[str], Any]] = [
        (name, path, value) for name, path, value in env_entries if path[0] == "startups"
    ]
    for dotted, value in (overrides or {}).items():
        if dotted.split(".")[0] == "startups" and value is not None:
            label = (origins or {}).get(dotted) or f"override {dotted}"
            sources.append((label, dotted.split("."), value))
    found = []
    for where, path, value in sources:
        for leaf in _leaves(value, path):
            sid = leaf[1] if len(leaf) > 1 else ""
            if len(leaf) < 3 or sid not in known or leaf[2] not in RUN_OVERRIDABLE:
                key = ["startups", sid, *leaf[2:3]] if len(leaf) > 1 else ["startups"]
                found.append((where, ".".join(key)))
    # The start-ups' own object-store identities: a run that could drop them would use the
    # platform's key, and hand it to the start-up's jobs.
    store = data.get("object_store")
    if isinstance(store, dict) and store.get("tenant_keys"):
        given = [(name, path, value) for name, path, value in env_entries] + [
            ((origins or {}).get(dotted) or f"override {dotted}", dotted.split("."), value)
            for dotted, value in (overrides or {}).items()]  # fmt: skip
        for where, path, value in given:
            if path[0] == "object_store" and any(
                    leaf[:2] == ["object_store", "tenant_keys"] for leaf in _leaves(value, path)
                    ):  # fmt: skip
                found.append((where, "object_store.tenant_keys"))
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


# -- errors: one line, blaming the source of the bad value --------------------------------
ENV_RANK, OVERRIDE_RANK = 1000, 2000  # files rank 0, 1, ... from the root of `extends`
_KINDS = ("environment variable ", "flag ", "override ", "profile ", "project ")


class _Blame:
    """Which source gave each key of the merged data: dotted path -> (rank, order, label).
    Sources are applied lowest precedence first, so a later one replaces an earlier one's
    entry for the same key."""

    def __init__(self, root_label: str) -> None:
        self.root = root_label
        self.by_path: dict[tuple[str, ...], tuple[int, int, str]] = {}
        self._order = 0

    def record(self, path: list[str] | tuple[str, ...], value: Any, label: str, rank: int,
               replace: bool = False) -> None:  # fmt: skip
        """``value`` set at ``path`` by ``label``; ``replace``: it replaced the section."""
        at = tuple(path)
        if replace or not isinstance(value, dict):
            for p in [p for p in self.by_path if len(p) > len(at) and p[: len(at)] == at]:
                del self.by_path[p]
        for leaf in self._paths(value, at):
            self._order += 1
            self.by_path[leaf] = (rank, self._order, label)

    def _paths(self, value: Any, at: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                yield from self._paths(v, (*at, str(k)))
        elif at:
            yield at

    def label(self, loc: tuple[Any, ...], msg: str) -> str:
        """The source(s) of the error at ``loc``: the one that set that key (or a section
        above it); for an error of a section, those of its keys the message names (else
        all), of the highest precedence; the profile file when no source set any."""
        at = tuple(str(x) for x in loc)
        above = [v for p, v in self.by_path.items() if at[: len(p)] == p]
        if above:
            return max(above)[2]
        below = {p[len(at) :]: v for p, v in self.by_path.items() if p[: len(at)] == at}
        named = {p: v for p, v in below.items()
                 if _mentions(msg, ".".join(p)) or _mentions(msg, ".".join(at + p))}  # fmt: skip
        pick = list((named or below).values())
        if not pick:
            return self.root
        top = max(v[0] for v in pick)
        return _join_labels([v[2] for v in sorted(pick) if v[0] == top])


def _mentions(msg: str, dotted: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(dotted)}(?![\w-])", msg) is not None


def _join_labels(labels: list[str]) -> str:
    labels = list(dict.fromkeys(labels))
    if len(labels) > 1:
        for kind in _KINDS:
            if all(lb.startswith(kind) for lb in labels):
                return kind.rstrip() + "s " + ", ".join(lb[len(kind) :] for lb in labels)
    return ", ".join(labels)


def _cap(text: str, most: int) -> str:
    return text if len(text) <= most else text[: most - 1] + "…"


def _problem(e: Any, root: type[BaseModel], plain: bool = False,
             listed: set[str] | None = None) -> str:  # fmt: skip
    """``loc: message`` of one validation error; an unknown key names the valid ones (once
    per section when ``listed`` keeps track); ``plain``: without pydantic's "Value error, "
    before a validator's own message."""
    loc = ".".join(str(x) for x in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ") if plain else e["msg"]
    if e["type"] == "extra_forbidden":
        section = ".".join(str(x) for x in e["loc"][:-1])
        if listed is not None:
            if section in listed:
                return f"{loc}: unknown key"
            listed.add(section)
        parent = _model_at(root, list(e["loc"][:-1]))
        fields = parent.model_fields.items() if parent else []
        valid = ", ".join(sorted(f.alias or n for n, f in fields)) if parent else "?"
        return f"{loc}: unknown key (valid keys: {valid})"
    return f"{loc}: {msg}" if loc else str(msg)


def fmt_validation(err: ValidationError, label: str, root: type[BaseModel] | None = None,
                    most: int | None = None) -> str:  # fmt: skip
    """One line for a validation error of ``root`` (default: Profile), its first ``most``
    problems: an unknown key names the valid ones (by their alias, as a file spells them)."""
    parts = [_problem(e, root or Profile) for e in err.errors()[:most]]
    return f"{label}: " + "; ".join(parts)


def _blamed(err: ValidationError, blame: _Blame, partial_hint: bool, most: int = 3) -> str:
    """One line for a profile's validation error: each problem after the source that gave
    the value. Unknown keys come first and hide the ``Field required`` errors they cause
    (a typo of a key is both); at most ``most`` problems, then a count of the rest."""
    errors = err.errors()
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    rest = [e for e in errors if e["type"] not in ("extra_forbidden", "missing")]
    shown = unknown + rest if unknown else errors
    hidden = len(errors) - len(shown[:most])
    segments: list[tuple[str, list[str]]] = []
    listed: set[str] = set()
    for e in shown[:most]:
        problem = _cap(_problem(e, Profile, plain=True, listed=listed), 700)
        label = blame.label(tuple(e["loc"]), str(e["msg"]))
        if segments and segments[-1][0] == label:
            segments[-1][1].append(problem)
        else:
            segments.append((label, [problem]))
    text = "; ".join(f"{label}: {'; '.join(problems)}" for label, problems in segments)
    if hidden:
        text += f" (and {hidden} more problem{'s' if hidden > 1 else ''})"
    missing = [e for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    if partial_hint and len(missing) > 1:
        text += " (a file that changes only some keys of a profile starts with: extends: local)"
    return _cap(text, MAX_ERROR_CHARS)


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


# -- profile files and `extends` ------------------------------------------------------------
def profile_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not p.is_file():
            raise ConfigError(f"profile file {name_or_path}: not found")
        return p
    candidate = PROFILES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError(
            f"unknown profile {name_or_path!r}: use one of {_known_profiles()}, or a path to a "
            "YAML file"
        )
    return candidate


def _known_profiles() -> str:
    return ", ".join(sorted(q.stem for q in PROFILES_DIR.glob("*.yaml")))


def _read_profile_file(path: Path) -> dict[str, Any]:
    label = f"profile {path}"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"{label}: cannot be read ({why})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        msg = _cap(" ".join(str(exc).split()), 300)
        raise ConfigError(f"{label}: invalid YAML at {where}: {msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: top level must be a mapping, got {type(raw).__name__}")
    return raw


def _extends_path(ref: Any, child: Path) -> Path:
    """The parent of ``child``: a shipped profile's name, or a path relative to ``child``."""
    label = f"profile {child}: extends"
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"{label}: give a profile name ({_known_profiles()}) or a path to a "
                          f"YAML file relative to this one, not {ref!r}")  # fmt: skip
    if ref.endswith((".yaml", ".yml")) or "/" in ref or os.sep in ref:
        p = Path(ref).expanduser()
        p = Path(os.path.normpath(p if p.is_absolute() else child.parent / p))
        if not p.is_file():
            raise ConfigError(f"{label} {ref}: no such file {p}")
        return p
    p = PROFILES_DIR / f"{ref}.yaml"
    if not p.is_file():
        raise ConfigError(f"{label} {ref}: unknown profile (use one of {_known_profiles()}, "
                          "or a path to a YAML file relative to this one)")  # fmt: skip
    return p


def _profile_chain(path: Path, env: dict[str, str]) -> list[tuple[Path, dict[str, Any]]]:
    """(file, its interpolated data) from the root of ``path``'s ``extends`` chain to
    ``path`` itself; a cycle is an error naming the files."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: list[Path] = []
    current: Path | None = path
    while current is not None:
        key = current.resolve()
        if key in seen:
            cycle = " -> ".join(str(p) for p in [*seen, key])
            raise ConfigError(f"profile {path}: extends makes a cycle: {cycle}")
        seen.append(key)
        raw = _read_profile_file(current)
        label = f"profile {current}"
        parent = raw.pop("extends", None)
        chain.append((current, _interpolate(raw, env, label)))
        if parent is not None:
            parent = _interpolate(parent, env, label, ("extends",))
        current = None if parent is None else _extends_path(parent, current)
    return chain[::-1]


# Profiles resolved once for a run (run_scope): (profile, overrides) -> [Profile, users].
_SCOPES: dict[tuple[str | None, str], list[Any]] = {}
_SCOPES_LOCK = threading.Lock()


def _scope_key(name_or_path: str | None,
               overrides: dict[str, Any] | None) -> tuple[str | None, str]:  # fmt: skip
    return name_or_path, json.dumps(overrides or {}, sort_keys=True, default=str)


@contextlib.contextmanager
def run_scope(name_or_path: str | None, overrides: dict[str, Any] | None = None,
              origins: dict[str, str] | None = None) -> Iterator[Profile]:  # fmt: skip
    """Resolve a run's profile once: inside, every ``load_profile(name, overrides)`` of this
    process with the same arguments (the run's subflows and tasks, in any thread) returns
    this same object instead of reading the profile file, the environment and the project's
    code again. Nested and concurrent scopes of the same arguments share it."""
    key = _scope_key(name_or_path, overrides)
    with _SCOPES_LOCK:
        entry = _SCOPES.get(key)
    if entry is None:
        prof = load_profile(name_or_path, overrides, origins=origins)
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
    *,
    origins: dict[str, str] | None = None,
) -> Profile:
    """The profile ``name_or_path`` (default ``$AIF_PROFILE``, else ``local``) with its
    ``extends`` chain, ``env``'s ``AIF_<SECTION>__<KEY>`` variables (default os.environ)
    and ``overrides`` (dotted key -> value) applied, relative paths made absolute against
    ``base_dir`` (default the current folder). ``origins`` names where each override came
    from, for errors (dotted key -> label, e.g. ``flag --epochs``; default ``override
    <key>``). Raises ConfigError (one line: the source, the key, why) or TenancyError."""
    if env is None and base_dir is None and _SCOPES:
        with _SCOPES_LOCK:
            entry = _SCOPES.get(_scope_key(name_or_path, overrides))
        if entry is not None:
            return cast(Profile, entry[0])
    env = dict(os.environ if env is None else env)
    from_env = not name_or_path and bool(env.get("AIF_PROFILE"))
    name_or_path = name_or_path or env.get("AIF_PROFILE") or "local"
    try:
        path = profile_path(name_or_path)
    except ConfigError as err:
        if from_env:  # say where the name came from
            raise ConfigError(f"environment variable AIF_PROFILE: {err}") from None
        raise
    base = base_dir or Path.cwd()
    # The state home, whatever the current folder: profiles read it as ${AIF_HOME}.
    home = aif_home(env, cwd=base)
    if home.exists() and not home.is_dir():
        where = "environment variable AIF_HOME" if env.get("AIF_HOME") else "the home ~/.aif"
        raise ConfigError(f"{where}: {home} is not a folder (aif keeps its lake, registry and "
                          "runs there)")  # fmt: skip
    env["AIF_SITE_DIR"] = str(site_dir(env, cwd=base))
    env["AIF_SITE_ADDR"] = site_address(env, cwd=base)
    env["AIF_HOME"] = str(home)

    chain = _profile_chain(path, env)
    blame = _Blame(f"profile {path}")
    data: dict[str, Any] = {}
    for rank, (file, part) in enumerate(chain):
        _merge(data, part)
        blame.record((), part, f"profile {file}", rank)
    data.setdefault("home_dir", str(home))
    file_lake = {"lake": {"url": (data.get("lake") or {}).get("url")}}

    entries = _env_entries(env, data)
    tenancy = _tenancy_overrides(entries, overrides, data, origins)
    for var, keys, value in entries:
        label = f"environment variable {var}"
        one: dict[str, Any] = {}
        _set_path(one, keys, value, label)
        _merge(data, one)
        blame.record(keys, value, label, ENV_RANK)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        label = (origins or {}).get(dotted) or f"override {dotted}"
        keys = dotted.split(".")
        if dotted in REPLACED_SECTIONS:  # a project's own, whole
            _set_path(data, keys, value, label)
            blame.record(keys, value, label, OVERRIDE_RANK, replace=True)
        else:  # a dict value merges into its section, never replaces it
            one = {}
            _set_path(one, keys, value, label)
            _merge(data, one)
            blame.record(keys, value, label, OVERRIDE_RANK)
    feats = data.get("features")
    if isinstance(feats, dict) and feats and "function" not in feats:
        # A partial section (a profile's split, AIF_FEATURES__SPLIT) refines the default's.
        data["features"] = _merge(copy.deepcopy(default_features()), feats)  # at every level
    _absolutise(data, base)
    _absolutise(file_lake, base)
    try:
        prof = Profile.model_validate(data)
    except ConfigError as err:  # the features section's checks (features.resolve_config)
        if tenancy:
            from aifactory.tasks.core.tenancy import refuse_overrides

            raise refuse_overrides(None, tenancy, str(path)) from None
        if not str(err).startswith("features"):
            raise
        raise ConfigError(f"{blame.label(('features',), str(err))}: {err}") from None
    except ValidationError as err:
        if tenancy:  # a run's overrides of tenancy: refused whatever else is wrong
            from aifactory.tasks.core.tenancy import refuse_overrides

            raise refuse_overrides(None, tenancy, str(path)) from None
        raise ConfigError(_blamed(err, blame, partial_hint=len(chain) == 1)) from None
    if tenancy:
        from aifactory.tasks.core.tenancy import refuse_overrides

        raise refuse_overrides(prof, tenancy, str(path))
    url = file_lake["lake"]["url"]
    prof._file_lake_url = url if isinstance(url, str) else None
    return prof


# -- the reference of every key: docs/profile-reference.md --------------------------------
REFERENCE_COMMAND = ".venv/bin/python -m aifactory.tasks.core.config > docs/profile-reference.md"
# Defaults that are not a constant.
_DOC_DEFAULTS = {
    "home_dir": "`$AIF_HOME`, else `~/.aif`",
    "runs_dir": "home_dir + `/runs`",
    "features": "the mobility example's",
}
_ENV_DOC = (
    ("AIF_PROFILE", "The profile of a command that names none (`--profile`): a name in "
     "infra/profiles/ or a path to a YAML file. Default: `local`."),
    ("AIF_HOME", "The state home, made absolute: the lake and data space of profile local, "
     "the MLflow database, the pseudonymisation key, run directories, the managed Prefect "
     "server. Default: `~/.aif`, whatever the current folder. Profiles read it as "
     "`${AIF_HOME}` (always set)."),
    ("AIF_SITE_DIR", "The local site's folder (`aif site up`: Slurm, object store, MLflow, "
     "Prefect), made absolute. Default: `$AIF_HOME/site`. Profiles read it as "
     "`${AIF_SITE_DIR}` (always set)."),
    ("AIF_SITE_ADDR", "Where compute nodes reach the site's object store and Dask schedulers. "
     "Default: the address `aif site up` recorded (a multi-node site's bridge, `10.87.0.1`), "
     "else `127.0.0.1`. Profiles read it as `${AIF_SITE_ADDR}` (always set)."),
    ("AIF_SECTION__KEY", "Sets `section.key` (nested keys: more `__`, e.g. "
     "`AIF_DATASPACE__GENERATE__ROWS`); see the tables below."),
)  # fmt: skip
_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                            SecretStr: "secret string", dt.date: "date"}  # fmt: skip


def _type_text(ann: Any) -> str:
    origin, args = get_origin(ann), get_args(ann)
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    if origin is Literal:
        names = [f"`{a}`" for a in args]
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    if origin in (types.UnionType, typing.Union):
        text = " or ".join(_type_text(a) for a in args if a is not type(None))
        return f"{text} or null" if type(None) in args else text
    if origin is list:
        inner = args[0]
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return "list of mappings"
        return f"list of {_type_text(inner)}"
    if origin is dict:
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return _SCALARS.get(ann, getattr(ann, "__name__", str(ann)))


def _default_text(key: str, field: Any) -> str:
    if key in _DOC_DEFAULTS:
        return _DOC_DEFAULTS[key]
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if value is None:
        return "`null`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value)}`"


def _model_doc(model: type[BaseModel]) -> str:
    return " ".join((model.__dict__.get("__doc__") or "").split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _key_rows(model: type[BaseModel], prefix: str, env: str | None) -> Iterator[list[str]]:
    """Rows (key, type, default, meaning, variable) of ``model``'s fields, nested sections
    flattened; ``env``: the variable of ``prefix`` (None: the environment cannot set it)."""
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        var = f"`{env}__{name.upper()}`" if env else "—"
        yield [f"`{key}`", _type_text(field.annotation), _default_text(name, field),
               field.description or "", var]  # fmt: skip
        inner = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            if get_origin(field.annotation) is list:  # a list of items: set whole
                yield from _key_rows(inner, f"{key}[].", None)
            elif get_origin(field.annotation) is not dict:
                yield from _key_rows(inner, f"{key}.", f"{env}__{name.upper()}" if env else None)


def _table(rows: Iterator[list[str]]) -> list[str]:
    out = ["| Key | Type | Default | Meaning | Environment variable |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _section_var(name: str) -> str:
    ident = "__ID" if name == "startups" else ""
    return f"`{ENV_PREFIX}{name.upper()}{ident}__KEY`"


def reference_markdown() -> str:
    """docs/profile-reference.md: every profile key (type, default, meaning, variable),
    from the models' Field descriptions."""
    from aifactory.tasks.core.tenancy import RUN_OVERRIDABLE

    sections = _sections()
    lines = [
        "# Profile reference",
        "",
        "<!-- Generated from the models in tasks/core/config.py (reference_markdown): do not "
        "edit. Regenerate with:",
        f"     {REFERENCE_COMMAND} -->",
        "",
        "A profile is a YAML file: `--profile NAME` (or `AIF_PROFILE`) names "
        "`infra/profiles/NAME.yaml` (shipped: local, site, eurohpc-example), or give a path. "
        "Values may use `${VAR}` and `${VAR:-default}` of the environment. Relative `*_dir` "
        "paths, `file://` URLs and `file:` keys are made absolute against the current folder; "
        "the shipped profiles keep all state under `${AIF_HOME}`, so they do not depend on it.",
        "",
        "Precedence, lowest first: the profile file (and the files it extends) < "
        "`AIF_SECTION__KEY` environment variables < explicit overrides (command-line flags, a "
        "project's aifactory.yaml). An error names the source of the bad value (the file "
        "that set the key, the variable, the flag), the key and why, on one line.",
        "",
        "Environment variables: names are case-insensitive; values are read as YAML (`3`, "
        "`true`, `null`, `[cpu, gpu]`, `{a: 1}`; empty is null); a start-up id's hyphens may "
        "be written as underscores (`AIF_STARTUPS__STARTUP_A__GPU_HOURS_BUDGET` sets "
        "`startups.startup-a.gpu_hours_budget`). Only keys inside a section can be set this "
        "way; a variable naming no section is an error. A start-up's tenancy (every "
        "`startups` key but " + ", ".join(sorted(RUN_OVERRIDABLE)) + ") comes only from the "
        "file.",
        "",
        "Secrets (`object_store.key`, `object_store.secret`, a literal "
        "`dataspace.pseudonymisation_key`) are masked in run records, logs and `aif profile "
        "show`.",
        "",
        "## `extends`",
        "",
        "A profile may start with `extends: local` (a shipped profile's name, or a path "
        "relative to the file) and give only the keys it changes: it is merged over its "
        "parent, section by section (lists are replaced). Chains are allowed; a cycle is an "
        "error. Without its own `name`, it keeps the parent's. For example:",
        "",
        "```yaml",
        "extends: local",
        "name: local-short",
        "training:",
        "  epochs: 3",
        "```",
        "",
        "## Environment variables that are not keys",
        "",
        "| Variable | Meaning |",
        "|---|---|",
        *[f"| `{name}` | {_cell(text)} |" for name, text in _ENV_DOC],
        "",
        "## Top level",
        "",
        *_table(
            [
                f"`{name}`",
                _type_text(f.annotation),
                _default_text(name, f),
                f.description or "",
                _section_var(name) if name in sections else "— (the file only)",
            ]
            for name, f in Profile.model_fields.items()
        ),
    ]
    for name, field in Profile.model_fields.items():
        inner = _unwrap(field.annotation)
        var = f"{ENV_PREFIX}{name.upper()}"
        if name == "startups":
            lines += ["", "## `startups.ID`", "", _model_doc(Startup), ""]
            rows = list(_key_rows(Startup, "startups.ID.", f"{var}__ID"))
            for row in rows:
                leaf = row[0].strip("`").split(".")[2]
                if leaf not in RUN_OVERRIDABLE:
                    row[4] = "— (tenancy: the file only)"
            lines += _table(iter(rows))
        elif isinstance(inner, type) and issubclass(inner, BaseModel):
            lines += ["", f"## `{name}`", "", _model_doc(inner), ""]
            lines += _table(_key_rows(inner, f"{name}.", var))
        elif get_origin(field.annotation) is dict:
            lines += ["", f"## `{name}`", "", f"{field.description}. Its keys: `{var}__KEY`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
