"""GPU-hours and CPU-hours per start-up and project from Slurm's accounting (sacct), priced.

Prices are per hour: an HPC rate for GPU and CPU hours, beside a cloud GPU list price for
comparison. The figures come from sacct's allocations (AllocTRES x elapsed time), so they
count what was reserved, which is what an allocation is charged for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aifactory.tasks.doors.slurm import SlurmClient

# Illustrative defaults (EUR per hour); pass your contract's rates on the command line.
HPC_GPU_RATE = 1.20
HPC_CPU_RATE = 0.01
CLOUD_GPU_RATE = 3.50


@dataclass
class Usage:
    account: str
    jobs: int = 0
    cpu_hours: float = 0.0
    gpu_hours: float = 0.0

    def add(self, alloc_tres: str, hours: float) -> None:
        """Count one allocation: its TRES (sacct's AllocTRES) held for ``hours``."""
        t = parse_tres(alloc_tres)
        self.jobs += 1
        self.cpu_hours += t.get("cpu", 0.0) * hours
        self.gpu_hours += t.get("gres/gpu", 0.0) * hours


def parse_tres(tres: str) -> dict[str, float]:
    """'billing=1,cpu=2,gres/gpu=1,mem=2G,node=1' -> {'cpu': 2.0, 'gres/gpu': 1.0, ...}."""
    out: dict[str, float] = {}
    for item in tres.split(","):
        if "=" not in item:
            continue
        key, value = item.split("=", 1)
        try:
            out[key] = float(value)
        except ValueError:
            continue  # mem=2G and the like: not counted here
    return out


def _hours(elapsed_raw: str) -> float:
    """sacct's ElapsedRaw (seconds; empty for a job never allocated) -> hours."""
    return (int(elapsed_raw) if elapsed_raw.isdigit() else 0) / 3600.0


def job_hours(client: SlurmClient, job_ids: list[str]) -> tuple[float, float, dict[str, str]]:
    """CPU-hours, GPU-hours and final state of these jobs (their allocations, one sacct call)."""
    total = Usage("")
    states: dict[str, str] = {}
    if not job_ids:
        return 0.0, 0.0, states
    for rec in client.sacct(("JobID", "AllocTRES", "ElapsedRaw", "State"), jobs=job_ids):
        jid = rec["JobID"]
        if jid not in job_ids or jid in states:
            continue
        total.add(rec["AllocTRES"], _hours(rec["ElapsedRaw"]))
        states[jid] = rec["State"]
    return total.cpu_hours, total.gpu_hours, states


def collect(client: SlurmClient, since: str, accounts: list[str] | None = None) -> list[Usage]:
    args = ["-a", "--starttime", since]
    if accounts:
        args += ["--accounts", ",".join(accounts)]
    per: dict[str, Usage] = {}
    for rec in client.sacct(("JobID", "Account", "AllocTRES", "ElapsedRaw"), args=args):
        if rec["Account"]:
            per.setdefault(rec["Account"], Usage(rec["Account"])).add(
                rec["AllocTRES"], _hours(rec["ElapsedRaw"])
            )
    return sorted(per.values(), key=lambda u: u.account)


def owners(startups: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Slurm account -> (start-up, project), from a profile's ``startups`` section."""
    out: dict[str, tuple[str, str]] = {}
    for sid, st in sorted(startups.items()):
        if st.account in out:  # refused by isolation.account; shown, not hidden
            was = out[st.account]
            out[st.account] = (f"{was[0]},{sid}", f"{was[1]},{st.project}")
        else:
            out[st.account] = (sid, st.project)
    return out


def priced_rows(usages: list[Usage], gpu_rate: float, cpu_rate: float, cloud_gpu_rate: float,
                owner_of: dict[str, tuple[str, str]] | None = None,
                ) -> list[dict[str, str]]:  # fmt: skip
    """One row per project: its start-up, project and account (``owner_of``: the profile's
    start-ups; each one's account appears, with zeros if it ran nothing; an account no
    start-up owns shows "-"), jobs, CPU- and GPU-hours and their costs."""
    per = {u.account: u for u in usages}
    for acct in owner_of or {}:
        per.setdefault(acct, Usage(acct))
    rows = []
    for u in per.values():
        startup, project = (owner_of or {}).get(u.account, ("-", "-"))
        hpc = u.gpu_hours * gpu_rate + u.cpu_hours * cpu_rate
        cloud = u.gpu_hours * cloud_gpu_rate
        rows.append({
            "startup": startup, "project": project, "account": u.account, "jobs": str(u.jobs),
            "cpu_hours": f"{u.cpu_hours:.4f}", "gpu_hours": f"{u.gpu_hours:.4f}",
            "hpc_cost_eur": f"{hpc:.4f}", "cloud_gpu_cost_eur": f"{cloud:.4f}",
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["startup"] == "-", r["startup"], r["account"]))
