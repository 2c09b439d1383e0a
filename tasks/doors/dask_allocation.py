"""Dask with its scheduler inside a Slurm allocation (``dask.scheduler: allocation``).

The default runs the scheduler in the flow's process on the login node and each worker as
its own Slurm job (dask-jobqueue), which lets workers be retired and replaced before their
walltime. Some sites forbid long-running services on login nodes, or do not let compute
nodes connect back to them. Then one job holds everything: the scheduler runs in the batch
step, the workers are one ``srun`` step, and the flow connects through the scheduler file
on the shared filesystem. The stage must then fit in that one job's walltime.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aifactory.tasks.core.config import DaskSpec
from aifactory.tasks.core.errors import SlurmError
from aifactory.tasks.core.jobfiles import read_job_text
from aifactory.tasks.doors.dask_cluster import WORKER_START_TIMEOUT_S, ClusterInfo, job_prologue
from aifactory.tasks.doors.slurm import SlurmClient

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "templates" / "dask-allocation.sbatch"


def _mb(memory: str) -> int:
    from dask.utils import parse_bytes

    return max(1, int(parse_bytes(memory) // 2**20))


def render_allocation_script(
    spec: DaskSpec, account: str, job_name: str, scheduler_file: str, log_dir: str
) -> str:
    from aifactory.tasks.stages.training import fill_template

    per_proc_cores = max(1, spec.cores // spec.processes)
    directives = list(spec.job_extra_directives) + ([f"--qos={spec.qos}"] if spec.qos else [])
    iface = f"--interface {spec.interface}" if spec.interface else ""
    return fill_template(
        TEMPLATE,
        {
            "job_name": job_name,
            "account": account,
            "partition": spec.partition,
            "walltime": spec.walltime,
            "ntasks": spec.workers * spec.processes,
            "cpus_per_task": per_proc_cores,
            "mem_per_cpu_mb": max(1, _mb(spec.memory) // spec.cores),
            "log_dir": log_dir,
            "directives": "\n".join(f"#SBATCH {d}" for d in directives),
            "prologue": "\n".join(job_prologue(spec)),
            "scheduler_file": scheduler_file,
            "python": shlex.quote(sys.executable),  # a venv under "my work/" stays one word
            "interface_arg": iface,
            "threads": per_proc_cores,
            "worker_memory": f"{_mb(spec.memory) // spec.processes}MiB",
            "worker_args": "",
        },
    )


@contextlib.contextmanager
def allocation_cluster(
    spec: DaskSpec,
    *,
    account: str,
    job_name: str,
    slurm: SlurmClient,
    run_dir: str,
    log: Callable[[str], None] = print,
) -> Iterator[tuple[Any, ClusterInfo]]:
    """Submit the allocation, connect, yield; scancel it on exit, however the stage ends."""
    from distributed import Client

    slurm.run(["sinfo", "-h", "-o", "%P"])  # fail fast and clearly when Slurm is down
    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    sched_file = root / f"{job_name}.scheduler.json"
    script = render_allocation_script(spec, account, job_name, str(sched_file), str(root))
    path = root / f"{job_name}.sbatch"
    path.write_text(script)
    job_id = slurm.submit(str(path))
    log(f"Dask allocation job {job_id}: scheduler and {spec.workers * spec.processes} workers")
    info = ClusterInfo(kind="slurm-allocation", job_name=job_name, job_ids=[job_id],
                       job_script=script)  # fmt: skip
    client: Any = None
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while not (sched_file.exists() and sched_file.stat().st_size > 0):
            state = slurm.state(job_id)
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "UNKNOWN"):
                out = root / f"dask-allocation-{job_id}.out"
                tail = read_job_text(out, 2**20).strip().splitlines()[-1:] if out.exists() else []
                raise SlurmError(f"Dask allocation job {job_id} ended ({state}) before its "
                                 f"scheduler started: {' '.join(tail) or 'no output'}")  # fmt: skip
            if time.monotonic() > deadline:
                raise SlurmError(
                    f"Dask allocation job {job_id} did not start its scheduler within "
                    f"{WORKER_START_TIMEOUT_S:.0f}s ({state}): check squeue"
                )
            time.sleep(0.3)
        client = Client(scheduler_file=str(sched_file), timeout="30s")
        want = spec.workers * spec.processes
        client.wait_for_workers(want, timeout=WORKER_START_TIMEOUT_S)
        info.dashboard = client.dashboard_link
        info.workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        log(f"Dask workers up in allocation {job_id}; dashboard {info.dashboard}")
        yield client, info
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        with contextlib.suppress(Exception):
            slurm.cancel([job_id])
        if slurm.wait_gone([job_id], timeout=60):
            raise SlurmError(f"Dask allocation job {job_id} is still in squeue after scancel")
        sched_file.unlink(missing_ok=True)
