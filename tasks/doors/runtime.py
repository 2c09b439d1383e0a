"""Small helpers shared by the flows: stage logging and Prefect artifacts."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from typing import Any

from aifactory.tasks.core.errors import AifError
from aifactory.tasks.doors.console import artifact_key, published


def quick_heartbeat_shutdown() -> bool:
    """Let every flow run end as soon as its work is done.

    Prefect 3.9's flow-run heartbeat thread sleeps in one-second steps and the engine joins
    it when the run ends, so each flow and subflow run pays up to a second at its end: four
    of the five seconds of an unchanged nightly pipeline run. This installs the same
    heartbeat loop (same events, same interval: crash detection is unchanged) waiting on
    its stop event instead. Installed once, and only if Prefect's internals have the shape
    it was written against (pinned: prefect==3.9.1); otherwise Prefect's own is kept.
    Returns whether it is installed.
    """
    import contextvars
    import threading

    try:
        import prefect.flow_engine as fe
    except ImportError:  # pragma: no cover - prefect is a dependency
        return False
    current = getattr(fe, "_send_heartbeats", None)
    if getattr(current, "_aif_quick", False):
        return True
    engine_cls = getattr(fe, "BaseFlowRunEngine", None) or getattr(fe, "FlowRunEngine", None)
    needed = ("_build_heartbeat_event_template", "_emit_flow_run_heartbeat", "heartbeat_seconds")
    if current is None or engine_cls is None or not all(hasattr(engine_cls, n) for n in needed):
        return False
    minimum = int(getattr(fe, "MINIMUM_HEARTBEAT_INTERVAL", 30))

    @contextlib.contextmanager
    def _send_heartbeats(engine: Any, join_on_exit: bool = True) -> Any:
        seconds = engine.heartbeat_seconds
        if seconds is None:
            yield
            return
        seconds = max(seconds, minimum)
        resource, related = engine._build_heartbeat_event_template()
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                run = engine.flow_run
                if run and run.state and run.state.is_final():
                    return
                with contextlib.suppress(Exception):
                    engine._emit_flow_run_heartbeat(resource, related)
                if stop.wait(seconds):
                    return

        ctx = contextvars.copy_context()
        thread = threading.Thread(target=ctx.run, args=(loop,), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            if join_on_exit:
                thread.join(timeout=2)

    _send_heartbeats._aif_quick = True  # type: ignore[attr-defined]
    fe._send_heartbeats = _send_heartbeats
    return True


def stage_logger(stage: str) -> Callable[[str], None]:
    """Log to the Prefect run log (UI) and print one progress line to the terminal."""
    logger = None
    with contextlib.suppress(Exception):
        from prefect.logging import get_run_logger

        logger = get_run_logger()

    def say(msg: str) -> None:
        if logger is not None:
            logger.info(msg)
        print(f"  [{stage}] {msg}", file=sys.stdout, flush=True)

    return say


def artifact_markdown(key: str, markdown: str, description: str = "") -> str | None:
    """A markdown artifact of this run (its key gets the run's start-up prefix, see
    tasks/doors/console.py); its id, None where there is no Prefect run or API."""
    with contextlib.suppress(Exception):
        from prefect.artifacts import create_markdown_artifact

        made = create_markdown_artifact(key=artifact_key(key), markdown=markdown,
                                        description=description)  # fmt: skip
        published(key, made)
        return str(made)
    return None


def artifact_table(key: str, rows: list[dict[str, Any]], description: str = "") -> str | None:
    with contextlib.suppress(Exception):
        from prefect.artifacts import create_table_artifact

        made = create_table_artifact(key=artifact_key(key), table=rows, description=description)
        published(key, made)
        return str(made)
    return None


def artifact_link(key: str, link: str, text: str, description: str = "") -> str | None:
    with contextlib.suppress(Exception):
        from prefect.artifacts import create_link_artifact

        made = create_link_artifact(key=artifact_key(key), link=link, link_text=text,
                                    description=description)  # fmt: skip
        published(key, made)
        return str(made)
    return None


def md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_none_"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


@contextlib.contextmanager
def cancellation_watch(
    event: Any, interval_s: float = 3.0, log: Callable[[str], None] | None = None
) -> Any:
    """Set ``event`` when this flow run, or the pipeline run above it, is being cancelled.

    A flow started by `aif run` (not by a worker) has no process that Prefect can kill, so
    cancelling it in the UI only moves its state to Cancelling: this thread polls the API
    for that and lets the stage stop what it started (the training watcher scancels its
    Slurm job). Outside a flow run it does nothing.
    """
    import threading

    ids: list[str] = []
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        ids = [str(i) for i in {flow_run.id, flow_run.root_flow_run_id} if i]
    stop = threading.Event()

    def loop() -> None:
        from uuid import UUID

        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while not stop.wait(interval_s):
                for i in ids:
                    with contextlib.suppress(Exception):
                        state = client.read_flow_run(UUID(i)).state
                        if state is not None and (state.is_cancelling() or state.is_cancelled()):
                            if log:
                                log(f"flow run {i} is being cancelled: stopping this stage")
                            event.set()
                            return

    import contextvars

    # The thread runs in a copy of this context, so it talks to the same Prefect API (a bare
    # thread would see Prefect's import-time settings, possibly no API URL at all).
    ctx = contextvars.copy_context()
    thread = threading.Thread(target=ctx.run, args=(loop,), daemon=True, name="aif-cancel-watch")
    if ids:
        thread.start()
    try:
        yield event
    finally:
        stop.set()


def flow_run_id() -> str:
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        return str(flow_run.root_flow_run_id or flow_run.id or "")
    return ""


class OneLineRefusals(logging.Filter):
    """An AifError (a refusal by policy, admission, tenancy, a bad config: tasks/core/errors.py)
    is expected: the Prefect run log gets its one line, not its traceback.

    Prefect's task and flow engines log a failing run's exception with ``exc_info`` (tens of
    lines per run level). This filter, on Prefect's run loggers, drops the traceback of an
    AifError and writes the error as ``Type: message``; the run still ends Failed with the
    message, and the exception still reaches ``state.result()`` (the CLI's one line and
    exit code). Any other exception keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, AifError):
            text = record.getMessage().replace(repr(exc), f"{type(exc).__name__}: {exc}")
            record.msg, record.args = text, ()
            record.exc_info = record.exc_text = None
        return True


RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def one_line_refusals() -> None:
    """Install :class:`OneLineRefusals` on Prefect's run loggers (once)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineRefusals) for f in logger.filters):
            logger.addFilter(OneLineRefusals())
