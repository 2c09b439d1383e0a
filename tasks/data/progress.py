"""Progress of the long data stages (ingest, preprocessing), for a terminal to show.

The stages call :func:`report` (or a :class:`Tracker`) with ``(stage, done, total, unit)``:
``("ingest", bytes_read, bytes_to_read, "B")``, ``("preprocess", partitions_done,
partitions, "partitions")``. By default nobody listens (a no-op): Prefect deployments and
Slurm jobs are unaffected. The CLI installs a reporter for the length of a command::

    with rich_reporter(console) as show, reporting(show):
        ...  # one bar per stage, with its rate and ETA

The reporter is process-wide, not per thread or context: the stages report from worker
threads (the ingest's reader pool, Dask's completion callbacks), which see no contextvar
set in the CLI's thread. A reporter that raises never fails a stage.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

Reporter = Callable[[str, int, int, str], None]  # (stage, done, total, unit)

_lock = threading.Lock()
_reporter: Reporter | None = None


def set_reporter(reporter: Reporter | None) -> Reporter | None:
    """Install ``reporter`` for this process (None: no progress); return the previous one."""
    global _reporter
    with _lock:
        previous, _reporter = _reporter, reporter
    return previous


def current_reporter() -> Reporter | None:
    return _reporter


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """``reporter`` is installed inside the block; the previous one comes back after it."""
    previous = set_reporter(reporter)
    try:
        yield
    finally:
        set_reporter(previous)


def report(stage: str, done: int, total: int, unit: str) -> None:
    """Tell the installed reporter, if any, that ``stage`` has done ``done`` of ``total``."""
    fn = _reporter
    if fn is None:
        return
    with contextlib.suppress(Exception):  # progress is never worth a failed stage
        fn(stage, done, total, unit)


class Tracker:
    """A thread-safe counter for one stage: ``advance(n)`` from any thread reports the new
    total done (never more than ``total``, never going back); ``finish()`` reports it
    complete. Reports nothing when no reporter is installed."""

    def __init__(self, stage: str, total: int, unit: str) -> None:
        self.stage, self.total, self.unit = stage, max(0, int(total)), unit
        self.done = 0
        self._lock = threading.Lock()
        report(stage, 0, self.total, unit)

    def advance(self, n: int) -> None:
        if n <= 0:
            return
        with self._lock:
            self.done = min(self.total, self.done + int(n))
            done = self.done
        report(self.stage, done, self.total, self.unit)

    def finish(self) -> None:
        with self._lock:
            self.done = self.total
        report(self.stage, self.total, self.total, self.unit)


# -- a terminal reporter ------------------------------------------------------------------
@contextlib.contextmanager
def rich_reporter(console: Any = None, transient: bool = False) -> Iterator[Reporter]:
    """A reporter drawing one rich progress bar per stage (amount, rate, ETA) on
    ``console`` (default: rich's, on stdout), for the length of the block. Lines printed
    meanwhile appear above the bars. Use it only when the output is a terminal."""
    from rich.filesize import decimal
    from rich.progress import (
        BarColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class Amount(ProgressColumn):  # type: ignore[misc]
        """'1.2/5.6 MB' for bytes, '3/8 partitions' otherwise."""

        def render(self, task: Any) -> Text:
            unit = task.fields.get("unit", "")
            done, total = int(task.completed), int(task.total or 0)
            if unit == "B":
                return Text(f"{decimal(done)}/{decimal(total)}")
            return Text(f"{done}/{total} {unit}".rstrip())

    class Speed(TransferSpeedColumn):  # type: ignore[misc]
        """The transfer speed for bytes; nothing for other units."""

        def render(self, task: Any) -> Text:
            return super().render(task) if task.fields.get("unit") == "B" else Text("")

    bars = Progress(
        TextColumn("[bold]{task.description:<10}"), BarColumn(), TaskProgressColumn(),
        Amount(), Speed(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=transient,
    )  # fmt: skip
    ids: dict[str, Any] = {}
    lock = threading.Lock()

    def show(stage: str, done: int, total: int, unit: str) -> None:
        with lock:
            task = ids.get(stage)
            if task is None:
                task = ids[stage] = bars.add_task(stage, total=total, unit=unit)
            elif done == 0:  # the stage runs again (a sweep, a retry): a fresh bar and ETA
                bars.reset(task, total=total, unit=unit)
            bars.update(task, completed=done, total=total, unit=unit)

    with bars:
        yield show
