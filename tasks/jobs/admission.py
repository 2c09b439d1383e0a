"""Admission gate: checked before a Slurm job is submitted for a start-up's project.

1. ``admission.declaration``: the project has a responsible-AI declaration, approved (by
   whom and when are recorded in the profile);
2. ``admission.budget``: the GPU-hours the account used (from sacct, since the budget's
   period start) plus the GPU-hours the next job(s) request fit in the start-up's
   ``gpu_hours_budget``.

A refusal is one line naming the rule, with used, remaining and requested hours for the
budget; nothing is submitted. The declaration is also checked when a pipeline or a sweep
starts (``admit_declaration``), before any byte is ingested or any Dask job submitted.
(The purpose of the data is checked at ingestion.)
"""

from __future__ import annotations

from typing import Any

from aifactory.tasks.core.errors import AifError


class AdmissionError(AifError):
    """A job may not be submitted for this start-up's project."""

    exit_code = 5


def requested_gpu_hours(spec: Any, jobs: int = 1) -> float:
    return max(1, spec.gpus_per_node) * spec.nodes * spec.timeout_min / 60.0 * jobs


def admit_declaration(startup_id: str, st: Any, what: str = "run") -> str:
    """``admission.declaration`` alone: checked when a pipeline or sweep starts, before any
    byte is ingested or any job submitted. Raise AdmissionError, or return the reason."""
    what = f"{what} for {startup_id} (project {st.project})"
    decl = st.declaration
    if decl is None or not (decl.approved_by and decl.approved_on):
        state = "no responsible-AI declaration" if decl is None else "a declaration not approved"
        raise AdmissionError(
            f"{what}: refused by admission.declaration: the project has {state} "
            f"(startups.{startup_id}.declaration needs approved_by and approved_on)"
        )
    return f"{what}: admitted (declaration approved by {decl.approved_by})"


def admit(startup_id: str, st: Any, spec: Any, slurm: Any | None, jobs: int = 1) -> str:
    """Raise AdmissionError, or return the one-line reason the job(s) may go."""
    what = f"training for {startup_id} (project {st.project})"
    admitted = admit_declaration(startup_id, st, "training")
    budget = st.gpu_hours_budget
    if budget is None or slurm is None or spec.gpus_per_node == 0:
        return admitted
    from aifactory.tasks.jobs.usage import collect

    used = sum(u.gpu_hours for u in collect(slurm, st.budget_since, [st.account]))
    requested = requested_gpu_hours(spec, jobs)
    remaining = budget - used
    if used + requested > budget:
        raise AdmissionError(
            f"{what}: refused by admission.budget: GPU-hours used {used:.2f} since "
            f"{st.budget_since}, remaining {remaining:.2f} of {budget:g}, requested "
            f"{requested:.2f} ({jobs} job(s) x {max(1, spec.gpus_per_node) * spec.nodes} GPU(s) "
            f"x {spec.timeout_min} min)"
        )
    return (f"{what}: admitted: GPU-hours used {used:.2f}, requested {requested:.2f}, "
            f"remaining after {remaining - requested:.2f} of {budget:g}")  # fmt: skip
