"""The MLflow door (tasks/doors/registry.py) against a real MLflow with a sqlite store in
tmp_path (in-process, no server): aliases on re-runs, the pyfunc's type hints, the links
the Prefect artifacts show (issue 16)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet, TrainedModel
from aifactory.tasks.doors import registry
from aifactory.tasks.doors.registry import register_model, ui_url, version_markdown

SNAP = DataSnapshot(snapshot_id="s1", dataset="trips", source_url="file:///x", lake_url="file:///x",
                    schema_fields=[], objects=[], rows=1, bytes=1, startup="startup-a",
                    created_at="2026-01-01T00:00:00Z")  # fmt: skip
FSET = FeatureSet(featureset_id="f1", snapshot_id="s1", snapshot_hash="h", lake_url="file:///x",
                  key_column="k", feature_columns=["a", "b"], target="y", normalisation={},
                  splits={}, rows_in=1, feature_config={},
                  created_at="2026-01-01T00:00:00Z")  # fmt: skip


def _trained(root: Path, weights: str) -> TrainedModel:
    """A reference (tabular) model; ``weights`` stands for its weights' hash: the same value
    is the same model, so the same registration fingerprint."""
    from aifactory.tasks.payloads.tabular_model import MLP

    run = root / f"run-{weights}"
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    norm = {c: {"mean": 0.0, "std": 1.0} for c in ("a", "b", "y")}
    torch.save({"state_dict": MLP(2, [3]).state_dict(),
                "architecture": {"in_features": 2, "hidden": [3]},
                "feature_columns": ["a", "b"], "target": "y", "normalisation": norm},
               run / "model.pt")  # fmt: skip
    return TrainedModel(run_key=weights, featureset_id="f1", featureset_hash="h",
                        run_dir=str(run), model_path=str(run / "model.pt"),
                        metrics={"test_rmse": 1.0}, params={}, executor="local",
                        weights_sha256=weights, created_at="2026-01-01T00:00:00Z")  # fmt: skip


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Versions 1 (inputs A) and 2 (inputs B) registered, then A's model again: the module's
    one MLflow store (registering takes seconds), with everything that was said or warned."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    kw: dict[str, Any] = dict(tracking_uri=uri, model_name="trips", experiment="e",
                              artifact_location=str(root / "artifacts"), lineage={},
                              feature_config={})  # fmt: skip
    said: list[str] = []
    logged: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logged.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            a = register_model(_trained(root, "a" * 64), FSET, SNAP, log=said.append, **kw)
            b = register_model(_trained(root, "b" * 64), FSET, SNAP, log=said.append, **kw)
            again = register_model(_trained(root, "a" * 64), FSET, SNAP, log=said.append, **kw)
    finally:
        logging.getLogger().removeHandler(handler)
    return {"uri": uri, "versions": (a, b, again), "said": said, "logged": logged,
            "warned": [str(w.message) for w in seen]}  # fmt: skip


def _aliases(uri: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return {k: str(v) for k, v in client.get_registered_model("trips").aliases.items()}


def test_a_run_that_registers_nothing_moves_no_alias(store: dict[str, Any]) -> None:
    """Issue 16: inputs A (version 1), then B (version 2), then A again: the third run
    registers nothing and ``candidate`` stays on version 2, the last version registered;
    its manifest says so (before, it claimed alias candidate for version 1)."""
    a, b, again = store["versions"]
    assert (a.version, b.version, again.version) == ("1", "2", "1")
    assert not a.reused and not b.reused and again.reused
    assert _aliases(store["uri"]) == {"candidate": "2"}
    assert a.aliases == ["candidate"] and again.aliases == []
    assert "model already registered as trips version 1" in store["said"][-1]


def test_registering_warns_nothing_and_the_pyfunc_is_typed(store: dict[str, Any]) -> None:
    """Issue 16: MLflow's coloured "Add type hints to the `predict` method" came with every
    registration (escape codes in the log files). Both pyfunc classes now take a typed
    DataFrame (not MLflow's skip attribute), and neither a registration nor a cache hit
    warns; the registered model still predicts."""
    import mlflow

    from aifactory.tasks.models.pyfunc_model import ProjectPyfunc, TabularPyfunc

    for cls in (TabularPyfunc, ProjectPyfunc):
        assert not getattr(cls, "_skip_type_hint_validation", False)
        assert cls().predict_type_hints.input is pd.DataFrame
    noise = [m for m in store["warned"] + store["logged"]
             if "type hint" in m.lower() or "\x1b[" in m]  # fmt: skip
    assert noise == []
    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model("models:/trips/1")
    assert len(model.predict(pd.DataFrame({"a": [1.0, 2.0], "b": [0.0, 1.0]}))) == 2


def test_a_cache_hit_over_rest_moves_no_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tracking server's REST path (site profile): the version with the fingerprint is
    found and returned, and ``candidate`` is set only when the model has none (a
    registration cut off before it); before, every hit moved it."""
    fp = "f" * 16
    calls: list[tuple[str, str]] = []
    model_aliases: list[dict[str, str]] = [{"alias": "candidate", "version": "4"}]

    def rest(uri: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        calls.append((method, path.split("?")[0]))
        if path.startswith("model-versions/search"):
            tags = [{"key": registry.FINGERPRINT_TAG, "value": fp}]
            return {"model_versions": [{"version": "1", "run_id": "r1", "tags": tags}]}
        if path.startswith("registered-models/get"):
            return {"registered_model": {"name": "trips", "aliases": model_aliases}}
        return {}

    monkeypatch.setattr(registry, "rest", rest)
    found = registry._registered_over_rest("http://mlflow:5000", "trips", fp)
    assert found is not None and found.version == "1" and found.reused
    assert found.aliases == [] and ("POST", "registered-models/alias") not in calls
    model_aliases.clear()  # no candidate at all: this hit sets it
    calls.clear()
    found = registry._registered_over_rest("http://mlflow:5000", "trips", fp)
    assert found is not None and found.aliases == ["candidate"]
    assert ("POST", "registered-models/alias") in calls


def test_links_to_a_version_only_where_mlflow_has_a_url() -> None:
    """Issue 16: on local the artifacts linked to ``sqlite:////…/mlflow.db/#/models/…`` with
    backticks in the link text. A local store gets the model URI and the command that
    opens the UI on it, as text; an HTTP server gets a plain link."""
    local = "sqlite:////tmp/a folder/mlflow.db"
    assert ui_url(local, "trips", "3") is None
    text = version_markdown(local, "trips", "3")
    assert "#/models" not in text and "](" not in text
    assert "`models:/trips/3`" in text
    assert "`mlflow ui --backend-store-uri 'sqlite:////tmp/a folder/mlflow.db'`" in text
    site = "http://127.0.0.1:5050/"
    assert ui_url(site, "trips", "3") == "http://127.0.0.1:5050/#/models/trips/versions/3"
    assert version_markdown(site, "trips", "3") == (
        "[models:/trips/3](http://127.0.0.1:5050/#/models/trips/versions/3)"
    )


def test_the_registered_model_artifact_has_no_broken_link(store: dict[str, Any],
                                                          tmp_path: Path) -> None:  # fmt: skip
    """flows/register.py's artifact: for the local store no markdown link at all; a re-run
    says that it registered nothing and moved no alias."""
    from aifactory.flows.register import registered_markdown

    _, b, again = store["versions"]
    trained = _trained(tmp_path, "b" * 64)
    fresh = registered_markdown(b, trained)
    assert "registered by this run" in fresh and "- aliases: candidate" in fresh
    assert "#/models" not in fresh and "](" not in fresh
    assert "mlflow ui --backend-store-uri" in fresh
    reused = registered_markdown(again, trained)
    assert "nothing registered, no alias moved" in reused and "- aliases: none" in reused
