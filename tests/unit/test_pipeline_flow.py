"""The pipeline flow's pieces without a Prefect server (issue 16): an expected refusal is one
line in the run log, and the summary artifact links to MLflow only where there is a URL."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from aifactory.flows import pipeline
from aifactory.tasks.core.manifests import ModelVersion, TrainedModel
from aifactory.tasks.doors import runtime
from aifactory.tasks.jobs.admission import AdmissionError


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += self.format(record).splitlines()


@pytest.fixture
def run_log() -> Any:
    """What Prefect's run loggers write (the filter is on the loggers, before any handler;
    Prefect's own handlers, the API's among them, are set aside meanwhile)."""
    handler = _Lines()
    loggers = [logging.getLogger(n) for n in runtime.RUN_LOGGERS]
    kept = [(lg, lg.handlers, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.handlers, lg.propagate = [handler], False
    yield handler
    for lg, handlers, propagate in kept:
        lg.handlers, lg.propagate = handlers, propagate


def _log_as_prefect_does(exc: Exception) -> None:
    """The task engine's and the flow engine's lines for a failed run (prefect 3.9:
    task_engine.handle_retry, flow_engine.run_context), both with the traceback."""
    try:
        raise exc
    except Exception as err:
        logging.getLogger("prefect.task_runs").error(
            f"Task run failed with exception: {err!r}", exc_info=True
        )
        logging.getLogger("prefect.flow_runs").exception(
            "Encountered exception during execution: %r", err
        )


def test_a_refusal_is_one_line_in_the_run_log(run_log: _Lines) -> None:
    """Issue 16: an AifError (here the admission gate's refusal) was a traceback of tens of
    lines per run level; now each engine's line names the error and its message, once."""
    pipeline.one_line_refusals()  # installed at import; installing again adds nothing
    from aifactory.tasks.doors.runtime import OneLineRefusals

    assert sum(isinstance(f, OneLineRefusals)
               for f in logging.getLogger("prefect.flow_runs").filters) == 1  # fmt: skip
    msg = "admission: startup-a has 0.1 of 5.0 GPU-hours left (account startup-a)"
    _log_as_prefect_does(AdmissionError(msg))
    assert run_log.lines == [
        f"ERROR Task run failed with exception: AdmissionError: {msg}",
        f"ERROR Encountered exception during execution: AdmissionError: {msg}",
    ]


def test_an_unexpected_error_keeps_its_traceback(run_log: _Lines) -> None:
    _log_as_prefect_does(RuntimeError("a bug"))
    assert sum(ln.startswith("Traceback") for ln in run_log.lines) == 2
    assert "ERROR Task run failed with exception: RuntimeError('a bug')" in run_log.lines


def _summary(monkeypatch: pytest.MonkeyPatch, tracking_uri: str) -> dict[str, Any]:
    made: dict[str, Any] = {}

    def markdown(key: str, md: str, description: str = "") -> None:
        made[key] = md

    def link(key: str, url: str, text: str, description: str = "") -> None:
        made[key] = (url, text)

    monkeypatch.setattr(pipeline, "artifact_markdown", markdown)
    monkeypatch.setattr(pipeline, "artifact_table", lambda *a, **k: None)
    monkeypatch.setattr(pipeline, "artifact_link", link)
    cfg = SimpleNamespace(name="local", mlflow=SimpleNamespace(tracking_uri=tracking_uri),
                          runs_dir="/runs", dask=SimpleNamespace(kind="local"))  # fmt: skip
    st = SimpleNamespace(title="", account="startup-a", project="p")
    snap = SimpleNamespace(snapshot_id="s1", rows=10, dataset="trips")
    fset = SimpleNamespace(slurm_job_ids=[], cluster={}, reused=False)
    trained = TrainedModel(run_key="k", featureset_id="f", featureset_hash="h", run_dir="/r",
                           model_path="/r/model.pt", metrics={"test_rmse": 1.0}, params={},
                           executor="local", created_at="t")  # fmt: skip
    mv = ModelVersion(name="trips", version="4", uri="models:/trips/4", run_id="r",
                      fingerprint="fp", aliases=["candidate"], tags={},
                      tracking_uri=tracking_uri, created_at="t")  # fmt: skip
    pipeline._publish_summary(cfg, "startup-a", st, snap, fset, trained, mv, None, [], "Ran.")
    return made


def test_the_summary_has_no_broken_mlflow_link_on_local(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 16: on local the summary linked to ``sqlite:////…/mlflow.db/#/models/…`` with
    backticks inside the link text, and a link artifact pointed there too."""
    made = _summary(monkeypatch, "sqlite:////home/u/.aif/local/mlflow.db")
    md = made["pipeline-summary"]
    assert "#/models" not in md and "](" not in md
    assert "- model: `models:/trips/4` in the local MLflow store" in md
    assert "mlflow ui --backend-store-uri sqlite:////home/u/.aif/local/mlflow.db" in md
    assert "mlflow-model-version" not in made  # no link artifact without a URL


def test_the_summary_links_to_the_mlflow_server(monkeypatch: pytest.MonkeyPatch) -> None:
    made = _summary(monkeypatch, "http://127.0.0.1:5050")
    url = "http://127.0.0.1:5050/#/models/trips/versions/4"
    assert f"- model: [models:/trips/4]({url});" in made["pipeline-summary"]
    assert made["mlflow-model-version"] == (url, "trips version 4")
