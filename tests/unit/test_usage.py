"""Usage report: GPU/CPU hours per account from sacct's allocations, priced."""

from __future__ import annotations

from pathlib import Path

from tasks.slurm import SlurmClient
from tasks.usage import collect, parse_tres, priced_rows


def test_parse_tres() -> None:
    t = parse_tres("billing=2,cpu=2,gres/gpu=1,mem=2G,node=1")
    assert t["cpu"] == 2 and t["gres/gpu"] == 1 and "mem" not in t


def test_collect_and_price(tmp_path: Path) -> None:
    sacct = tmp_path / "sacct"
    sacct.write_text(
        "#!/bin/sh\n"
        "echo '10|startup-a|billing=1,cpu=1,gres/gpu=1,mem=2G,node=1|3600'\n"
        "echo '11|startup-a|billing=2,cpu=2,mem=2G,node=1|1800'\n"
        "echo '12|startup-b|billing=1,cpu=4,gres/gpu=2,mem=8G,node=1|900'\n"
        "echo '13|startup-b||0'\n"  # pending, never allocated
    )
    sacct.chmod(0o755)
    usages = collect(SlurmClient(bin_dir=str(tmp_path)), "now-1days")
    a, b = usages
    assert (a.account, a.jobs, a.cpu_hours, a.gpu_hours) == ("startup-a", 2, 2.0, 1.0)
    assert (b.account, b.gpu_hours, b.cpu_hours) == ("startup-b", 0.5, 1.0)
    rows = priced_rows(usages, gpu_rate=2.0, cpu_rate=0.1, cloud_gpu_rate=4.0)
    assert rows[0]["hpc_cost_eur"] == "2.2000" and rows[0]["cloud_gpu_cost_eur"] == "4.0000"
