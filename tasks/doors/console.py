"""What the operators' console (the Prefect UI) shows of a start-up's run.

- A name that says whose run it is: ``startup-b/agri-yield nightly 2026-12-01`` (start-up,
  project, trigger, day); its stages ``… · ingest`` and so on.
- Tags to filter by: ``startup:<id>``, ``project:<name>``, ``dataset:<id>``,
  ``purpose:<declared purpose>``, ``trigger:nightly|run``, on the run, its stage runs and
  their task runs.
- Artifact keys that start with the start-up and project (``startup-b-agri-yield-model-card``),
  so one start-up's keyed artifacts never mix with another's.
- (An expected refusal ends the run Failed with one line, no traceback: runtime.py's
  OneLineRefusals.)
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# The prefix of this run's artifact keys (set by the top-level flow; stages inherit it).
ARTIFACT_PREFIX: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "aif_artifact_prefix", default=None
)
# Artifacts published in this run, by their key without the prefix: the summary links them.
PUBLISHED: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "aif_published", default=None
)


def slug(text: str) -> str:
    """Lower-case letters, digits and dashes (Prefect's artifact keys allow nothing else)."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "x"


@dataclass(frozen=True)
class RunLabel:
    startup: str
    project: str
    dataset: str
    purpose: str
    trigger: str  # nightly (a deployment's run) or run (aif run, aif run --in-allocation)
    day: str  # YYYY-MM-DD (UTC): a nightly's scheduled day, else the day it started

    @property
    def name(self) -> str:
        return f"{self.startup}/{self.project} {self.trigger} {self.day}"

    def stage(self, stage: str) -> str:
        return f"{self.name} · {stage}"

    @property
    def tags(self) -> list[str]:
        return [f"startup:{self.startup}", f"project:{self.project}", f"dataset:{self.dataset}",
                f"purpose:{self.purpose}", f"trigger:{self.trigger}"]  # fmt: skip

    @property
    def artifact_prefix(self) -> str:
        return f"{slug(self.startup)}-{slug(self.project)}"


def current_trigger() -> tuple[str, str]:
    """(trigger, day) of the flow run this process runs: a deployment's run is a nightly of
    its scheduled day; anything else a run of today (UTC)."""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    with contextlib.suppress(Exception):
        from prefect.runtime import deployment, flow_run

        if deployment.id:
            when = flow_run.scheduled_start_time
            day = when.astimezone(dt.UTC).date().isoformat() if when else today
            return "nightly", day
    return "run", today


def label_for(cfg: Any, sid: str, kind: str | None = None,
              project: str | None = None) -> RunLabel:  # fmt: skip
    """The console label of start-up ``sid``'s run on profile ``cfg``; ``kind`` (sweep,
    ingest) replaces the trigger of a run that is not the pipeline; ``project``: the name
    of the start-up's own project a run trains (else the profile's project of it)."""
    st = cfg.startups.get(sid)
    trigger, day = current_trigger()
    project = project or (st.project if st is not None else "default")
    return RunLabel(sid, project, cfg.dataspace.dataset, cfg.purpose(sid)[0], kind or trigger,
                    day)  # fmt: skip


def top_level() -> bool:
    """Not inside a labelled run (a pipeline's or a sweep's stage)."""
    return ARTIFACT_PREFIX.get() is None


def label_current_run(label: RunLabel) -> None:
    """Give the running (top-level) flow run its console name and tags; never fails the run."""
    with contextlib.suppress(Exception):
        from prefect.client.orchestration import get_client
        from prefect.runtime import flow_run

        run_id = flow_run.id
        if not run_id:
            return
        # The label's tags win over same-named ones (a deployment's project: tag).
        keys = {t.split(":", 1)[0] for t in label.tags}
        have = [t for t in flow_run.tags or [] if t.split(":", 1)[0] not in keys]
        tags = have + label.tags
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=label.name, tags=tags)


@contextlib.contextmanager
def console_scope(label: RunLabel) -> Iterator[None]:
    """Within: stage runs and task runs carry the label's tags, artifacts its key prefix."""
    from prefect import tags

    token = ARTIFACT_PREFIX.set(ARTIFACT_PREFIX.get() or label.artifact_prefix)
    published = PUBLISHED.set(PUBLISHED.get() if PUBLISHED.get() is not None else {})
    try:
        with tags(*label.tags):
            yield
    finally:
        PUBLISHED.reset(published)
        ARTIFACT_PREFIX.reset(token)


def artifact_key(key: str) -> str:
    prefix = ARTIFACT_PREFIX.get()
    return f"{prefix}-{key}" if prefix else key


def published(key: str, artifact_id: Any) -> None:
    seen = PUBLISHED.get()
    if seen is not None and artifact_id is not None:
        seen[key] = str(artifact_id)


def published_id(key: str) -> str | None:
    seen = PUBLISHED.get()
    return seen.get(key) if seen else None


def artifact_url(artifact_id: str) -> str:
    """The artifact's page in the Prefect UI of this run's API (a path on the same UI where
    no UI URL is known: the page that shows the link is on that UI)."""
    base = ""
    with contextlib.suppress(Exception):
        from prefect.settings import PREFECT_UI_URL

        base = (PREFECT_UI_URL.value() or "").rstrip("/")
    return f"{base}/artifacts/artifact/{artifact_id}"


def find_artifact(key: str, description: str) -> str | None:
    """The newest artifact of this run's series with ``key`` and ``description`` (an
    earlier run's document of a version this run reuses); None where none is found."""
    with contextlib.suppress(Exception):
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
        from prefect.client.schemas.sorting import ArtifactSort

        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(key)])),
                sort=ArtifactSort.CREATED_DESC, limit=200)  # fmt: skip
        for a in found:
            if a.description == description:
                return str(a.id)
    return None
