"""Typed stage manifests. Each stage takes and returns one, stored as JSON next to its data.

A manifest's ``content_hash`` (sha256 of its canonical JSON without volatile fields) is the
stage's identity: the same inputs, code and config give the same hash.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Fields that describe *when/where* something ran, not *what* it is: excluded from hashes.
VOLATILE = {
    "created_at", "duration_s", "flow_run_id", "run_dir", "slurm_job_ids", "sacct", "cluster",
    "reused", "policy", "objects_read", "bytes_read",
}  # fmt: skip


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def canonical(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in VOLATILE}

    def content_hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


class ObjectRecord(BaseModel):
    """One data-space object as ingested."""

    key: str  # path of the source object (bucket/prefix/name for s3)
    etag: str | None = None
    version_id: str | None = None
    identity: str = ""  # version, ETag or mtime, as listed (what the snapshot id hashes)
    size: int
    rows: int
    lake_path: str  # committed lake file (full fsspec URL)
    lake_sha256: str  # content hash of the lake file
    format: str = "parquet"  # format of the source object
    address: str = ""  # content address of the lake file (objects/<dataset>/<address>.*)
    decision: str = ""  # the policy rule that allowed it
    pseudonymised: list[str] = Field(default_factory=list)  # columns replaced by pseudonyms


class QuarantineRecord(BaseModel):
    """A bad object left out of a snapshot ingested with --quarantine."""

    key: str
    etag: str | None = None
    size: int
    reason: str  # one line: every problem
    problems: list[dict[str, Any]]  # [{"column", "expected", "actual", "message"}]


class DataSnapshot(_Manifest):
    kind: str = "DataSnapshot"
    snapshot_id: str  # dataset, contract, start-up, purpose, pseudonymisation, identities
    dataset: str
    data_space: str = ""
    title: str = ""
    publisher: str = ""
    license: str = ""
    format: str = "parquet"  # of the source objects; the lake is always Parquet
    source_url: str
    lake_url: str  # folder holding this manifest (and quarantine.json, if any)
    schema_fields: list[dict[str, Any]]  # [{"name", "type", "nullable"}]
    primary_key: str = ""
    contract_fingerprint: str = ""
    objects: list[ObjectRecord]
    rows: int
    bytes: int
    startup: str
    purpose: str = ""
    policy: dict[str, Any] = Field(default_factory=dict)  # the decision (tasks/data/policy.py)
    pseudonymisation: str = "none"  # "hmac-sha256:<key fingerprint>:<columns>"
    quarantined: list[QuarantineRecord] = Field(default_factory=list)
    objects_read: list[str] = Field(default_factory=list)  # keys read by the run that made it
    bytes_read: int = 0
    created_at: str
    duration_s: float = 0.0
    reused: bool = False  # True when a run found it already committed (a cache hit)

    def data_hash(self) -> str:
        """What the snapshot holds, not where its lake lies: the content hash without the
        lake URL and the lake paths of its objects (their content hashes stay). Two lakes
        with the same snapshot give the same feature set id, and so the same fingerprint."""
        data = self.canonical()
        data.pop("lake_url", None)
        data["objects"] = [{k: v for k, v in o.items() if k != "lake_path"}
                           for o in data.get("objects", [])]  # fmt: skip
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


class SplitFiles(BaseModel):
    files: list[str]
    rows: int


class FeatureSet(_Manifest):
    kind: str = "FeatureSet"
    featureset_id: str
    snapshot_id: str
    snapshot_hash: str
    lake_url: str  # folder: <lake>/features/<featureset_id>/
    key_column: str
    feature_columns: list[str]
    target: str
    # Normalisation fitted on the train split only: {column: {"mean": m, "std": s}}
    normalisation: dict[str, dict[str, float]]
    splits: dict[str, SplitFiles]  # train / val / test
    rows_in: int
    rows_dropped: dict[str, int] = Field(default_factory=dict)  # reason -> count
    feature_config: dict[str, Any]
    cluster: dict[str, Any] = Field(default_factory=dict)  # kind, worker job ids, dashboard
    slurm_job_ids: list[str] = Field(default_factory=list)
    created_at: str
    duration_s: float = 0.0
    reused: bool = False


class TrainedModel(_Manifest):
    kind: str = "TrainedModel"
    run_key: str
    featureset_id: str
    featureset_hash: str
    run_dir: str
    model_path: str  # model.pt: state dict + architecture + normalisation
    metrics: dict[str, float]
    params: dict[str, Any]
    executor: str  # local | slurm
    slurm_job_ids: list[str] = Field(default_factory=list)
    sacct: dict[str, str] = Field(default_factory=dict)
    environment_hash: str = ""
    weights_sha256: str = ""
    created_at: str
    duration_s: float = 0.0
    reused: bool = False


class ModelVersion(_Manifest):
    kind: str = "ModelVersion"
    name: str
    version: str
    uri: str  # models:/NAME/VERSION
    run_id: str
    fingerprint: str
    aliases: list[str]
    tags: dict[str, str]
    tracking_uri: str
    created_at: str
    reused: bool = False


def short(h: str, n: int = 12) -> str:
    return h[:n]
