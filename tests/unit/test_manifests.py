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


def _snap(lake: str, sha: str = "c0ffee") -> object:
    from aifactory.tasks.core.manifests import DataSnapshot, ObjectRecord

    obj = ObjectRecord(key="b/x.parquet", etag="e", size=10, rows=2,
                       lake_path=f"{lake}/objects/d/a1.parquet", lake_sha256=sha)  # fmt: skip
    return DataSnapshot(snapshot_id="s1", dataset="d", source_url="s3://b", lake_url=f"{lake}/s",
                        schema_fields=[], objects=[obj], rows=2, bytes=10, startup="a",
                        created_at="now")  # fmt: skip


def test_feature_set_id_does_not_depend_on_the_lake_url() -> None:
    """The same snapshot in two lakes (another AIF_LAKE__URL) is the same data: the same
    feature set id, so the same registration fingerprint (issue 15: it made a new version)."""
    from aifactory.tasks.stages.preprocess import plan

    cfg = {"function": "aifactory.tasks.stages.features:split_of", "key": "k", "target": "t"}
    a, b = _snap("s3://lake-a/startup-a"), _snap("file:///other/lake")
    assert a.content_hash() != b.content_hash()  # the manifests say where they are
    assert a.data_hash() == b.data_hash()  # type: ignore[attr-defined]
    assert plan(a, cfg)[0] == plan(b, cfg)[0]  # type: ignore[arg-type]
    assert plan(a, cfg)[0] != plan(_snap("file:///other/lake", "beef"), cfg)[0]  # type: ignore[arg-type]
