"""Dask-on-Slurm preprocessing survives a worker job cancelled mid-run, exactly."""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.config import DaskSpec, Profile, default_features
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.doors.dask_cluster import open_cluster
from aifactory.tasks.doors.slurm import SlurmClient
from aifactory.tasks.stages.features import resolve_config
from aifactory.tasks.stages.ingest import IngestOptions, ingest
from aifactory.tasks.stages.preprocess import plan, run_preprocess

MOBILITY = IngestOptions(startup="startup-a", purpose="trip-duration-prediction")

pytestmark = pytest.mark.site
OBJECTS = 12


@pytest.fixture(scope="module")
def snapshot(site_profile: Profile, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("pp")
    generate_mobility(f"file://{root}/ds", rows=1_200_000, objects=OBJECTS, seed=3)
    snap = ingest(f"file://{root}/ds", f"file://{root}/lake", "mobility-trips", {}, {}, MOBILITY)
    return root, snap


def _preprocess(site_profile: Profile, root: Path, snap: Any, name: str,
                on_progress: Any = None) -> Any:  # fmt: skip
    spec = DaskSpec(kind="slurm", workers=2, cores=1, memory="2GiB", walltime="00:10:00",
                    scheduler_host=site_profile.dask.scheduler_host)  # fmt: skip
    slurm = SlurmClient(env=site_profile.child_env())
    fs_id, cfg = plan(snap, resolve_config(default_features()))
    lake = f"file://{root}/lake-{name}"
    job_name = f"aif-dask-test-{name}"
    logs = str(root / f"logs-{name}")
    with open_cluster(spec, account="startup-a", job_name=job_name, slurm=slurm,
                      log_dir=logs, log=lambda m: None) as (client, info):  # fmt: skip
        fset = run_preprocess(snap, lake_url=lake, storage_options={}, client=client,
                              config=cfg, fs_id=fs_id, cluster_info=info.as_dict(),
                              progress=on_progress or (lambda m: None))  # fmt: skip
    assert slurm.jobs_named(job_name) == [], "worker jobs left in squeue"
    return fset, info


def test_cancelled_worker_job_loses_no_rows(site_profile: Profile, snapshot: Any) -> None:
    root, snap = snapshot
    reference, _ = _preprocess(site_profile, root, snap, "ref")
    assert reference.rows_in == snap.rows
    out = sum(s.rows for s in reference.splits.values())
    assert out + sum(reference.rows_dropped.values()) == snap.rows

    slurm = SlurmClient(env=site_profile.child_env())
    started = threading.Event()
    killed: list[str] = []
    events: list[tuple[float, str]] = []

    def progress(msg: str) -> None:
        events.append((time.monotonic(), msg))
        if msg.startswith("featurised") and not started.is_set():
            started.set()

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            jobs = slurm.jobs_named("aif-dask-test-kill")
            if len(jobs) == 2 and started.wait(0.2):
                slurm.cancel([jobs[0]])
                killed.append(jobs[0])
                events.append((time.monotonic(), "killed"))
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    fset, _ = _preprocess(site_profile, root, snap, "kill", progress)
    t.join(timeout=5)
    assert killed, "no worker job was cancelled during the run"
    order = [m for _, m in sorted(events)]
    assert order.index("killed") < order.index(f"featurised {OBJECTS}/{OBJECTS} partitions"), (
        f"the worker was cancelled only after all partitions were done: {order}"
    )
    rec = slurm.sacct_record(killed[0])
    assert rec is not None and rec["State"] == "CANCELLED", rec
    # Complete and exact: same rows, same drops, same files' content as the undisturbed run.
    assert fset.rows_in == reference.rows_in
    assert fset.rows_dropped == reference.rows_dropped
    assert {k: v.rows for k, v in fset.splits.items()} == {
        k: v.rows for k, v in reference.splits.items()
    }
    assert fset.normalisation == reference.normalisation


def test_run_longer_than_a_worker_walltime_loses_and_repeats_nothing(
    site_profile: Profile, tmp_path: Path
) -> None:
    """Workers with a 1-minute walltime and a ~35 s lifetime; the stage takes well over a
    minute. Workers are drained before their deadline and replaced; every partition runs
    exactly once and no worker job reaches its time limit."""

    from aifactory.tasks.stages import features as F

    objects, delay_s = 24, 5.0
    generate_mobility(f"file://{tmp_path}/ds", rows=240_000, objects=objects, seed=11)
    snap = ingest(f"file://{tmp_path}/ds", f"file://{tmp_path}/lake", "mobility-trips", {}, {},
                  MOBILITY)  # fmt: skip
    fs_id, cfg = plan(snap, resolve_config(default_features()))
    ledger = tmp_path / "attempts"
    ledger.mkdir()

    def slow_partition(i: int, *args: Any) -> dict[str, Any]:
        # A heavier transform, the same result: one ledger file per attempt (shared disk).
        (ledger / f"{i:03d}-{os.environ.get('SLURM_JOB_ID')}-{time.time_ns()}").touch()
        time.sleep(delay_s)
        return F.featurize_partition(i, *args)

    spec = DaskSpec(kind="slurm", workers=2, cores=1, memory="1GiB", walltime="00:01:00",
                    lifetime="35s", lifetime_stagger="5s", drain_margin="3s",
                    scheduler_host=site_profile.dask.scheduler_host)  # fmt: skip
    slurm = SlurmClient(env=site_profile.child_env())
    logs: list[str] = []
    job_name = "aif-dask-test-walltime"
    t0 = time.monotonic()
    log_dir = str(tmp_path / "logs")
    with open_cluster(spec, account="startup-a", job_name=job_name, slurm=slurm,
                      log_dir=log_dir, log=logs.append) as (client, info):  # fmt: skip
        fset = run_preprocess(snap, lake_url=f"file://{tmp_path}/lake", storage_options={},
                              client=client, config=cfg, fs_id=fs_id,
                              cluster_info=info.as_dict(), progress=logs.append, cluster=info,
                              margin_s=3.0, transform=slow_partition)  # fmt: skip
    took = time.monotonic() - t0
    assert slurm.jobs_named(job_name) == [], "worker jobs left in squeue"
    assert took > 60, f"the stage took {took:.0f} s, not longer than the 60 s walltime"

    attempts = sorted(p.name.split("-")[0] for p in ledger.iterdir())
    assert attempts == [f"{i:03d}" for i in range(objects)], (
        f"every partition must run exactly once: {attempts}"
    )
    jobs = sorted({p.name.split("-")[1] for p in ledger.iterdir()}, key=int)
    assert len(jobs) >= 3, f"expected replacement worker jobs, work ran on {jobs}"
    assert len(info.retired) >= 2, logs
    print(f"stage {took:.0f} s; partitions ran on jobs {jobs}; retired {info.retired}")
    for jid in jobs:
        rec = slurm.sacct_record(jid)
        assert rec is not None and rec["State"] != "TIMEOUT", (jid, rec)
    assert fset.rows_in == snap.rows
    assert sum(s.rows for s in fset.splits.values()) + sum(fset.rows_dropped.values()) == snap.rows
    # Byte for byte the feature set of an undisturbed in-process run of the same transform.
    import hashlib

    for i, o in enumerate(snap.objects):
        ref = F.featurize_partition(i, o.lake_path, f"file://{tmp_path}/ref", {}, cfg)
        for name, entry in ref["splits"].items():
            got = Path(fset.splits[name].files[i].removeprefix("file://")).read_bytes()
            assert hashlib.sha256(got).hexdigest() == entry["sha256"], (name, i)


def test_dataset_larger_than_the_workers_memory(site_profile: Profile, tmp_path: Path) -> None:
    """Out of core: 2 workers of 512 MiB (Dask's limit and Slurm's --mem) featurise a
    dataset whose Arrow size is 1.5x their total memory (CI; ``AIF_TEST_OOC_TIMES=3`` for
    3x, 42 M rows); no worker dies or restarts. A worker holds a partition at a time, so
    its peak does not grow with the number of partitions."""
    import pyarrow.parquet as pq

    limit = 512 * 2**20
    times = float(os.environ.get("AIF_TEST_OOC_TIMES", "1.5"))
    objects = math.ceil(72 * times)  # 200,000 rows, about 15 MiB of Arrow each
    rows = objects * 200_000
    generate_mobility(f"file://{tmp_path}/ds", rows=rows, objects=objects, seed=17)
    snap = ingest(f"file://{tmp_path}/ds", f"file://{tmp_path}/lake", "mobility-trips", {}, {},
                  MOBILITY)  # fmt: skip
    arrow_bytes = sum(pq.read_table(o.lake_path.removeprefix("file://")).nbytes
                      for o in snap.objects)  # fmt: skip
    assert arrow_bytes >= times * 2 * limit, f"only {arrow_bytes / 2**30:.2f} GiB in memory"

    spec = DaskSpec(kind="slurm", workers=2, cores=1, memory="512MiB", walltime="00:15:00",
                    scheduler_host=site_profile.dask.scheduler_host)  # fmt: skip
    slurm = SlurmClient(env=site_profile.child_env())
    fs_id, cfg = plan(snap, resolve_config(default_features()))
    log_dir = tmp_path / "logs"
    peak: dict[str, int] = {}
    stop = threading.Event()

    def rss() -> int:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def sample(client: Any) -> None:
        while not stop.wait(0.5):
            try:
                for addr, b in client.run(rss).items():
                    peak[addr] = max(peak.get(addr, 0), b)
            except Exception:
                pass

    with open_cluster(spec, account="startup-a", job_name="aif-dask-test-ooc", slurm=slurm,
                      log_dir=str(log_dir), log=lambda m: None) as (client, info):  # fmt: skip
        sampler = threading.Thread(target=sample, args=(client,), daemon=True)
        sampler.start()
        t0 = time.monotonic()
        fset = run_preprocess(snap, lake_url=f"file://{tmp_path}/lake", storage_options={},
                              client=client, config=cfg, fs_id=fs_id,
                              cluster_info=info.as_dict(), progress=lambda m: None,
                              cluster=info)  # fmt: skip
        took = time.monotonic() - t0
        stop.set()
        sampler.join(timeout=5)
    assert fset.rows_in == rows
    assert sum(s.rows for s in fset.splits.values()) + sum(fset.rows_dropped.values()) == rows
    assert len(info.job_ids) == 2, f"a worker job was replaced (died?): {info.job_ids}"
    for jid in info.job_ids:
        rec = slurm.sacct_record(jid)
        assert rec is not None and rec["State"] not in ("OUT_OF_MEMORY", "FAILED"), rec
    logs = "".join(p.read_text(errors="replace") for p in log_dir.glob("*"))
    # Dask may pause a worker briefly at 80% (it then waits for memory to come back) but
    # must never restart or kill one (95%).
    for sign in ("memory budget", "Restarting worker", "KilledWorker"):
        assert sign not in logs, f"worker log says {sign!r}"
    pauses = logs.count("Pausing worker")
    assert peak and max(peak.values()) < 0.95 * limit, {a: b >> 20 for a, b in peak.items()}
    print(f"out of core: {arrow_bytes / 2**30:.2f} GiB Arrow on 2 x 512 MiB workers in "
          f"{took:.0f} s; peak worker RSS {max(peak.values()) >> 20} MiB; "
          f"{pauses} short pause(s) at 80%")  # fmt: skip


def test_scheduler_inside_an_allocation(site_profile: Profile, snapshot: Any) -> None:
    """dask.scheduler: allocation: one Slurm job runs the scheduler and both workers; the
    result is the same feature set; the job is gone afterwards."""
    root, snap = snapshot
    spec = DaskSpec(kind="slurm", scheduler="allocation", workers=2, cores=1, memory="1GiB",
                    walltime="00:10:00")  # fmt: skip
    slurm = SlurmClient(env=site_profile.child_env())
    fs_id, cfg = plan(snap, resolve_config(default_features()))
    job_name = "aif-dask-test-alloc"
    alloc = str(root / "alloc")
    with open_cluster(spec, account="startup-a", job_name=job_name, slurm=slurm,
                      log_dir=alloc, log=lambda m: None) as (client, info):  # fmt: skip
        assert info.kind == "slurm-allocation" and len(info.job_ids) == 1
        assert slurm.jobs_named(job_name) == info.job_ids  # one job holds everything
        # The scheduler is not in this process: it runs in the allocation's batch step.
        sched = client.run_on_scheduler(lambda: __import__("os").environ.get("SLURM_JOB_ID"))
        assert sched == info.job_ids[0]
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        # Settings the job script gives: no work stealing (the dispatcher places partitions)
        # and the workers' malloc pad (Dask's own trim threshold kept).
        exts = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.extensions))
        assert "stealing" not in exts, exts
        malloc = {"MALLOC_TOP_PAD_": "67108864", "MALLOC_TRIM_THRESHOLD_": "65536"}
        envs = client.run(lambda: {k: __import__("os").environ.get(k) for k in malloc})
        assert all(e == malloc for e in envs.values()), envs
        fset = run_preprocess(snap, lake_url=f"file://{root}/lake-alloc", storage_options={},
                              client=client, config=cfg, fs_id=fs_id,
                              cluster_info=info.as_dict(), progress=lambda m: None,
                              cluster=info)  # fmt: skip
    assert slurm.jobs_named(job_name) == [], "the allocation was left in squeue"
    rec = slurm.sacct_record(info.job_ids[0])
    assert rec is not None and rec["Account"] == "startup-a", rec
    assert fset.rows_in == snap.rows
    assert sum(s.rows for s in fset.splits.values()) + sum(fset.rows_dropped.values()) == snap.rows
