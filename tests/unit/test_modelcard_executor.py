"""The model card says where the model was trained (issue 16: a local CPU run's card said
``partition=gpu``, the profile's Slurm setting it never used)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from aifactory.tasks.core.config import TrainingSpec
from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet, TrainedModel
from aifactory.tasks.models.modelcard import model_card, where_trained
from aifactory.tasks.stages.training import _collect

SNAP = DataSnapshot(snapshot_id="s1", dataset="trips", source_url="file:///x", lake_url="file:///x",
                    schema_fields=[], objects=[], rows=10, bytes=1, startup="startup-a",
                    created_at="t")  # fmt: skip
FSET = FeatureSet(featureset_id="f1", snapshot_id="s1", snapshot_hash="h", lake_url="file:///x",
                  key_column="k", feature_columns=["a"], target="y", normalisation={},
                  splits={}, rows_in=10, feature_config={}, created_at="t")  # fmt: skip


def _trained(executor: str, params: dict[str, Any], jobs: list[str]) -> TrainedModel:
    return TrainedModel(run_key="k1", featureset_id="f1", featureset_hash="h", run_dir="/r",
                        model_path="/r/model.pt", metrics={"test_rmse": 1.0}, params=params,
                        executor=executor, slurm_job_ids=jobs, created_at="t")  # fmt: skip


def _card(trained: TrainedModel) -> str:
    entry = SimpleNamespace(title="Trips", data_space="mobility", publisher="city",
                            license="CC-BY-4.0")  # fmt: skip
    startup = SimpleNamespace(project="p", declaration=None)
    return model_card(name="trips", version="1", trained=trained, fset=FSET, snap=SNAP,
                      entry=entry, startup="startup-a", startup_cfg=startup,
                      lineage={})  # fmt: skip


def test_a_local_run_names_this_machine_and_no_partition() -> None:
    # A manifest collected before the fix still carries the profile's Slurm settings.
    params = {"epochs": 2, "partition": "gpu", "gpus_per_node": 1, "device": "cpu"}
    card = _card(_trained("local", params, []))
    assert "executor: local (this machine, CPU)" in card
    assert "partition" not in card and "gpus_per_node" not in card
    assert "epochs=2" in card


def test_a_slurm_run_names_its_partition_gpus_and_jobs() -> None:
    params = {"epochs": 2, "partition": "gpu", "gpus_per_node": 2, "device": "cuda"}
    trained = _trained("slurm", params, ["12", "13"])
    assert where_trained(trained) == (
        "slurm (partition gpu, 2 GPUs per node, device GPU, job(s) 12, 13)"
    )
    assert f"executor: {where_trained(trained)}" in _card(trained)


def test_a_local_runs_manifest_records_no_slurm_resources(tmp_path: Path) -> None:
    """The training stage's manifest (its params go to MLflow and the card): a local run
    records no partition or GPUs; the LM payload's numeric device becomes a name."""
    (tmp_path / "metrics.json").write_text(json.dumps({"final_loss": 1.0, "device": 0.0}))
    (tmp_path / "weights.sha256").write_text("ab\n")
    spec = TrainingSpec(executor="local", partition="gpu", gpus_per_node=1)
    local = _collect(tmp_path, "k1", FSET, spec, "local", [], {}, 0.0)
    assert "partition" not in local.params and "gpus_per_node" not in local.params
    assert local.params["device"] == "cpu"
    on_slurm = _collect(tmp_path, "k1", FSET, spec, "slurm", ["7"], {"State": "COMPLETED"}, 0.0)
    assert on_slurm.params["partition"] == "gpu" and on_slurm.params["gpus_per_node"] == 1
