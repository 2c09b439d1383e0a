"""Manifest hashes describe what a stage produced, not where or when it ran."""

from __future__ import annotations

from aifactory.tasks.core.manifests import FeatureSet, SplitFiles


def _fset(**over: object) -> FeatureSet:
    base: dict[str, object] = {
        "featureset_id": "f", "snapshot_id": "s", "snapshot_hash": "h", "lake_url": "file:///l",
        "key_column": "k", "feature_columns": ["a"], "target": "t",
        "normalisation": {"a": {"mean": 0.0, "std": 1.0}},
        "splits": {"train": SplitFiles(files=["x"], rows=1)}, "rows_in": 1,
        "feature_config": {"v": 1}, "created_at": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    return FeatureSet.model_validate({**base, **over})


def test_hash_ignores_where_and_when() -> None:
    a = _fset()
    cluster = {"kind": "slurm", "job_ids": ["1", "2"], "dashboard": "http://x"}
    b = _fset(created_at="2027-01-01T00:00:00Z", duration_s=9.0, slurm_job_ids=["1", "2"],
              cluster=cluster)  # fmt: skip
    assert a.content_hash() == b.content_hash()


def test_hash_follows_content() -> None:
    assert _fset().content_hash() != _fset(rows_in=2).content_hash()
    assert _fset().content_hash() != _fset(feature_config={"v": 2}).content_hash()
