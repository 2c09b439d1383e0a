"""The console's names, tags and artifact keys (tasks/doors/console.py)."""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

from aifactory.tasks.doors import console
from aifactory.tasks.doors.console import RunLabel


def test_a_run_is_named_and_tagged_by_startup_project_dataset_and_purpose() -> None:
    label = RunLabel("startup-b", "agri-yield", "agri-yield-plots", "crop-yield forecasting",
                     "nightly", "2026-12-01")  # fmt: skip
    assert label.name == "startup-b/agri-yield nightly 2026-12-01"
    assert label.stage("train") == "startup-b/agri-yield nightly 2026-12-01 · train"
    assert label.tags == ["startup:startup-b", "project:agri-yield", "dataset:agri-yield-plots",
                          "purpose:crop-yield forecasting", "trigger:nightly"]  # fmt: skip
    assert label.artifact_prefix == "startup-b-agri-yield"


def test_artifact_keys_carry_the_startup_within_a_run_only() -> None:
    """Prefect's keys allow lower-case letters, digits and dashes: a project named
    ``Agri_Yield.v2`` still gives a valid key."""
    label = RunLabel("startup-a", "Agri_Yield.v2", "d", "p", "run", "2026-12-08")
    assert console.artifact_key("pipeline-summary") == "pipeline-summary"
    with console.console_scope(label):
        assert (
            console.artifact_key("pipeline-summary") == "startup-a-agri-yield-v2-pipeline-summary"
        )
        inner = RunLabel("startup-a", "other", "d", "p", "ingest", "2026-12-08")
        with console.console_scope(inner):  # a stage keeps its run's series
            assert console.artifact_key("model-card") == "startup-a-agri-yield-v2-model-card"
            console.published("model-card", "0f1c")
        assert console.published_id("model-card") == "0f1c"
        assert not console.top_level()
    assert console.top_level() and console.published_id("model-card") is None
    assert console.artifact_key("pipeline-summary") == "pipeline-summary"


def test_outside_a_deployment_a_run_is_a_run_of_today() -> None:
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert console.current_trigger() == ("run", today)
    cfg = SimpleNamespace(startups={"startup-a": SimpleNamespace(project="mobility-eta")},
                          dataspace=SimpleNamespace(dataset="mobility-trips"),
                          purpose=lambda sid: ("eta prediction", ["eta prediction"]))  # fmt: skip
    label = console.label_for(cfg, "startup-a", "sweep")
    assert label.name == f"startup-a/mobility-eta sweep {today}"
    assert "dataset:mobility-trips" in label.tags and "purpose:eta prediction" in label.tags


def test_an_artifact_page_link_is_on_the_runs_own_ui() -> None:
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    with temporary_settings({PREFECT_UI_URL: "http://127.0.0.1:4200"}):
        assert console.artifact_url("ab-12") == "http://127.0.0.1:4200/artifacts/artifact/ab-12"
