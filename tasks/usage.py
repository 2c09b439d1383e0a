"""GPU-hours and CPU-hours per start-up from Slurm's accounting (sacct), priced.

Prices are per hour: an HPC rate for GPU and CPU hours, beside a cloud GPU list price for
comparison. The figures come from sacct's allocations (AllocTRES x elapsed time), so they
count what was reserved, which is what an allocation is charged for.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.slurm import SlurmClient

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


def collect(client: SlurmClient, since: str, accounts: list[str] | None = None) -> list[Usage]:
    args = ["sacct", "-a", "-X", "-n", "-P", "--starttime", since,
            "--format", "JobID,Account,AllocTRES,ElapsedRaw"]  # fmt: skip
    if accounts:
        args += ["--accounts", ",".join(accounts)]
    per: dict[str, Usage] = {}
    for line in client.run(args).splitlines():
        parts = line.split("|")
        if len(parts) != 4 or not parts[1]:
            continue
        _job, account, tres, elapsed = parts
        hours = (int(elapsed) if elapsed.isdigit() else 0) / 3600.0
        t = parse_tres(tres)
        u = per.setdefault(account, Usage(account))
        u.jobs += 1
        u.cpu_hours += t.get("cpu", 0.0) * hours
        u.gpu_hours += t.get("gres/gpu", 0.0) * hours
    return sorted(per.values(), key=lambda u: u.account)


def priced_rows(usages: list[Usage], gpu_rate: float, cpu_rate: float,
                cloud_gpu_rate: float) -> list[dict[str, str]]:  # fmt: skip
    rows = []
    for u in usages:
        hpc = u.gpu_hours * gpu_rate + u.cpu_hours * cpu_rate
        cloud = u.gpu_hours * cloud_gpu_rate
        rows.append({
            "account": u.account, "jobs": str(u.jobs),
            "cpu_hours": f"{u.cpu_hours:.4f}", "gpu_hours": f"{u.gpu_hours:.4f}",
            "hpc_cost_eur": f"{hpc:.4f}", "cloud_gpu_cost_eur": f"{cloud:.4f}",
        })  # fmt: skip
    return rows
