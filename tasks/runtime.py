"""Small helpers shared by the flows: stage logging and Prefect artifacts."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any


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


def artifact_markdown(key: str, markdown: str, description: str = "") -> None:
    with contextlib.suppress(Exception):
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(key=key, markdown=markdown, description=description)


def artifact_table(key: str, rows: list[dict[str, Any]], description: str = "") -> None:
    with contextlib.suppress(Exception):
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=rows, description=description)


def md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_none_"
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def flow_run_id() -> str:
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        return str(flow_run.root_flow_run_id or flow_run.id or "")
    return ""
