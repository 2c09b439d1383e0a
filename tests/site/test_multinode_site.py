"""A multi-node site (`aif site up --nodes 2`, the default): two compute nodes, each a slurmd
in network, UTS and mount namespaces of its own on the site's bridge. These tests run after
every other site test (tests/conftest.py orders them last) on the same site; a site of
another layout is switched to two nodes and back, and the last test switches to one node
(the module's fixture restores the layout it found). A flow run inside an allocation (`aif
run --in-allocation`) reaches Prefect and MLflow only through the relay's spool."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aifactory.infra.site import manager, nodes
from aifactory.infra.site.layout import Site
from aifactory.tasks.core.config import DaskSpec, Profile, default_features, load_profile
from aifactory.tasks.core.home import site_dir
from aifactory.tasks.data.datagen import generate_mobility
from aifactory.tasks.doors.dask_cluster import open_cluster
from aifactory.tasks.doors.slurm import SlurmClient
from aifactory.tasks.stages import features as F
from aifactory.tasks.stages.features import resolve_config
from aifactory.tasks.stages.ingest import IngestOptions, ingest
from aifactory.tasks.stages.preprocess import plan, run_preprocess
from tests.site.conftest import aif

pytestmark = [pytest.mark.site, pytest.mark.multinode]
NODES = ["aif-n1", "aif-n2"]
OBJECTS = 12


@pytest.fixture(scope="module")
def multinode(site_profile: Profile) -> Iterator[tuple[Site, Profile]]:
    """Two compute nodes: a switch on a site of another layout (the suite's one-node site),
    which is restored at the end; a no-op on a two-node site."""
    before = manager.recorded_layout(site_dir()).get("nodes")
    res = aif("site", "up", "--nodes", "2", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    site = manager._site(site_dir())
    assert site.node_names() == NODES
    yield site, load_profile("site")
    # The last test leaves one node: a two-node site gets its second node back here, a
    # one-node site (the suite's default) needs no switch.
    if before is not None and before != manager.recorded_layout(site_dir()).get("nodes"):
        back = aif("site", "up", "--nodes", str(before), timeout=600)
        assert back.returncode == 0, back.stdout + back.stderr


def _slurm(profile: Profile) -> SlurmClient:
    return SlurmClient(env=profile.child_env())


def test_nodes_are_separate_hosts_that_cannot_reach_the_control_plane(
    multinode: tuple[Site, Profile],
) -> None:
    site, profile = multinode
    st = aif("site", "status")
    assert st.returncode == 0, st.stdout
    assert "slurmd-aif-n1" in st.stdout and "slurmd-aif-n2" in st.stdout, st.stdout
    assert " slurmd " not in st.stdout  # the login node runs no slurmd of its own
    # The profile follows the layout: the object store and the Dask scheduler are at the
    # bridge address, which both sides reach.
    assert profile.object_store.endpoint_url == f"http://{site.service_address}:9010"
    assert profile.dask.scheduler_host == site.service_address
    for node in NODES:
        # What the nodes need: Slurm's controller and the object store.
        assert nodes.can_connect(node, site.service_address, site.ctld_port)
        assert nodes.can_connect(node, site.service_address, site.s3_port)
        # The control plane is not reachable from a compute node at any address: not at
        # the bridge's, not at this host's own, not on the node's own loopback.
        for port in (site.prefect_port, site.mlflow_port, site.db_port):
            for addr in (site.service_address, "127.0.0.1", *_host_addresses()):
                assert not nodes.can_connect(node, addr, port), (node, addr, port)
    # The nodes' services bind to the bridge address, never to every address.
    listening = _listening()
    assert (site.service_address, site.s3_port) in listening
    assert ("0.0.0.0", site.s3_port) not in listening and ("::", site.s3_port) not in listening


def _host_addresses() -> list[str]:
    import psutil

    own = ("127.", "10.87.")
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family.name == "AF_INET" and not a.address.startswith(own)]  # fmt: skip


def _listening() -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}  # fmt: skip


def test_one_job_spans_both_nodes_with_a_gpu_each(
    multinode: tuple[Site, Profile], tmp_path: Path
) -> None:
    _, profile = multinode
    out = tmp_path / "out"
    script = tmp_path / "j.sh"
    script.write_text(
        "#!/bin/bash\nsrun bash -c 'echo $(hostname) $SLURMD_NODENAME "
        '$CUDA_VISIBLE_DEVICES $(getent hosts aif-n2 | cut -d" " -f1)\'\n'
    )
    slurm = _slurm(profile)
    slurm.run(["sbatch", "--wait", "-N2", "--ntasks-per-node=1", "-p", "gpu",
                      "--gres=gpu:1", "-A", "startup-a", f"--output={out}", str(script)],
                     timeout=120)  # fmt: skip
    lines = sorted(out.read_text().split("\n")[:-1])
    assert lines == ["aif-n1 aif-n1 0 10.87.0.12", "aif-n2 aif-n2 0 10.87.0.12"], lines


def test_a_startups_job_on_a_node_cannot_reach_the_control_plane(
    multinode: tuple[Site, Profile],
) -> None:
    """The same from inside a job that runs as a start-up's user: no connection to Prefect
    or MLflow, and no way back into the login side's network namespace (nsenter needs
    privileges its user has not)."""
    import pwd
    import sys

    site, profile = multinode
    home = Path(pwd.getpwnam("startup-a").pw_dir)
    out = home / f"mn-probe-{time.time_ns()}.out"
    probe = (
        "import socket, sys\n"
        "for a, p in [(h, int(q)) for h, q in (x.split(':') for x in sys.argv[1:])]:\n"
        "    try:\n"
        "        socket.create_connection((a, p), timeout=3); print(a, p, 'open')\n"
        "    except OSError:\n"
        "        print(a, p, 'refused')\n"
    )
    targets = [f"{a}:{p}" for a in (site.service_address, "127.0.0.1", *_host_addresses())
               for p in (site.prefect_port, site.mlflow_port)] + [
        f"{site.service_address}:{site.s3_port}"]  # fmt: skip
    code = home / f"mn-probe-{time.time_ns()}.py"
    code.write_text(probe)
    user = pwd.getpwnam("startup-a")
    os.chown(code, user.pw_uid, user.pw_gid)
    script = (
        f"{shlex.quote(sys.executable)} {shlex.quote(str(code))} {' '.join(targets)}; "
        "nsenter --net=/proc/1/ns/net true 2>/dev/null && echo nsenter open || "
        "echo nsenter refused; id -un"
    )
    slurm = _slurm(profile)
    try:
        slurm.run(["sbatch", "--wait", "-p", "cpu", "-A", "startup-a", "--uid=startup-a",
                   "--gid=startup-a", f"--output={out}", f"--chdir={home}", "--wrap", script],
                  timeout=120)  # fmt: skip
        lines = out.read_text().splitlines()
    finally:
        out.unlink(missing_ok=True)
        code.unlink(missing_ok=True)
    assert lines[-1] == "startup-a" and lines[-2] == "nsenter refused", lines
    opened = [ln for ln in lines if ln.endswith(" open")]
    assert opened == [f"{site.service_address} {site.s3_port} open"], lines


@pytest.fixture(scope="module")
def snapshot(multinode: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("mn")
    generate_mobility(f"file://{root}/ds", rows=240_000, objects=OBJECTS, seed=5)
    opts = IngestOptions(startup="startup-a", purpose="trip-duration-prediction")
    snap = ingest(f"file://{root}/ds", f"file://{root}/lake", "mobility-trips", {}, {}, opts)
    return root, snap


def _ledgered(ledger: Path, delay_s: float) -> Any:
    def transform(i: int, *args: Any) -> dict[str, Any]:
        # One file per attempt on the shared disk: partition, node, job; "done" once written.
        tag = f"{i:03d}-{os.uname().nodename}-{os.environ.get('SLURM_JOB_ID')}-{time.time_ns()}"
        (ledger / f"{tag}.start").touch()
        time.sleep(delay_s)
        out = F.featurize_partition(i, *args)
        (ledger / f"{tag}.done").touch()
        return out

    return transform


def _attempts(ledger: Path, suffix: str) -> list[tuple[str, str]]:
    return sorted((p.name.split("-")[0], "-".join(p.name.split("-")[1:3]))
                  for p in ledger.glob(f"*{suffix}"))  # fmt: skip


def _same_bytes_as_one_node(fset: Any, snap: Any, cfg: Any, ref_lake: str) -> None:
    """Byte for byte the feature set of the same transform computed on the login node."""
    for i, o in enumerate(snap.objects):
        ref = F.featurize_partition(i, o.lake_path, ref_lake, {}, cfg)
        for name, entry in ref["splits"].items():
            got = Path(fset.splits[name].files[i].removeprefix("file://")).read_bytes()
            assert hashlib.sha256(got).hexdigest() == entry["sha256"], (name, i)


def _preprocess(profile: Profile, root: Path, snap: Any, name: str, transform: Any,
                progress: Any = None) -> tuple[Any, Any]:  # fmt: skip
    # Each worker takes a whole node's 2 CPUs: the two workers are on two nodes.
    spec = DaskSpec(kind="slurm", workers=2, cores=2, memory="2GiB", walltime="00:10:00",
                    scheduler_host=profile.dask.scheduler_host)  # fmt: skip
    fs_id, cfg = plan(snap, resolve_config(default_features()))
    slurm = _slurm(profile)
    job_name = f"aif-dask-mn-{name}"
    logs = str(root / f"logs-{name}")
    with open_cluster(spec, account="startup-a", job_name=job_name, slurm=slurm,
                      log_dir=logs, log=lambda m: None) as (client, info):  # fmt: skip
        fset = run_preprocess(snap, lake_url=f"file://{root}/lake-{name}", storage_options={},
                              client=client, config=cfg, fs_id=fs_id,
                              cluster_info=info.as_dict(), cluster=info,
                              progress=progress or (lambda m: None),
                              transform=transform)  # fmt: skip
    assert slurm.jobs_named(job_name) == [], "worker jobs left in squeue"
    return fset, cfg


def test_dask_workers_on_two_nodes_give_the_one_node_result(
    multinode: tuple[Site, Profile], snapshot: Any
) -> None:
    _, profile = multinode
    root, snap = snapshot
    ledger = root / "ledger-spread"
    ledger.mkdir()
    fset, cfg = _preprocess(profile, root, snap, "spread", _ledgered(ledger, 0.5))
    done = _attempts(ledger, ".done")
    assert sorted(p for p, _ in done) == [f"{i:03d}" for i in range(OBJECTS)], done
    on_nodes = {p.name.split("-")[1] + "-" + p.name.split("-")[2] for p in ledger.glob("*.done")}
    assert on_nodes == set(NODES), f"partitions ran on {on_nodes}, not on both nodes"
    _same_bytes_as_one_node(fset, snap, cfg, f"file://{root}/ref-spread")


def test_scheduler_inside_an_allocation_across_nodes(
    multinode: tuple[Site, Profile], snapshot: Any
) -> None:
    """dask.scheduler: allocation on two nodes: the scheduler in the batch step on the
    first node, a worker per node (2 CPUs each), the flow on the login side connected
    through the scheduler file; the same bytes as on one node."""
    _, profile = multinode
    root, snap = snapshot
    ledger = root / "ledger-alloc"
    ledger.mkdir()
    spec = DaskSpec(kind="slurm", scheduler="allocation", workers=2, cores=2, memory="2GiB",
                    walltime="00:10:00")  # fmt: skip
    slurm = _slurm(profile)
    fs_id, cfg = plan(snap, resolve_config(default_features()))
    job_name, logs = "aif-dask-mn-alloc", str(root / "alloc")
    with open_cluster(spec, account="startup-a", job_name=job_name, slurm=slurm,
                      log_dir=logs, log=lambda m: None) as (client, info):  # fmt: skip
        assert info.kind == "slurm-allocation" and len(info.job_ids) == 1
        sched = client.run_on_scheduler(lambda: __import__("os").uname().nodename)
        assert sched == "aif-n1", sched
        fset = run_preprocess(snap, lake_url=f"file://{root}/lake-alloc", storage_options={},
                              client=client, config=cfg, fs_id=fs_id,
                              cluster_info=info.as_dict(), cluster=info, progress=lambda m: None,
                              transform=_ledgered(ledger, 0.5))  # fmt: skip
    assert slurm.jobs_named(job_name) == [], "the allocation was left in squeue"
    # Right after the cancel, slurmdbd may still hold the job's first record (JobName
    # "allocation", no partition): wait for the one slurmctld sends when the job ends.
    deadline = time.monotonic() + 30
    while True:
        rec = slurm.sacct_record(info.job_ids[0])
        if (rec and rec.get("JobName") == job_name) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert rec is not None and rec["NodeList"] == "aif-n[1-2]", rec
    on_nodes = {p.name.split("-")[1] + "-" + p.name.split("-")[2] for p in ledger.glob("*.done")}
    assert on_nodes == set(NODES), f"partitions ran on {on_nodes}, not on both nodes"
    assert len(list(ledger.glob("*.done"))) == OBJECTS
    _same_bytes_as_one_node(fset, snap, cfg, f"file://{root}/ref-alloc")


def test_a_node_dies_under_dask_workers_and_its_partitions_run_again_once(
    multinode: tuple[Site, Profile], snapshot: Any
) -> None:
    _, profile = multinode
    root, snap = snapshot
    ledger = root / "ledger-kill"
    ledger.mkdir()
    killed: list[int] = []
    killed_at: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            # Kill aif-n2 while one of its partitions is in flight (started, not done).
            started = {p.name.removesuffix(".start") for p in ledger.glob("*aif-n2*.start")}
            finished = {p.name.removesuffix(".done") for p in ledger.glob("*aif-n2*.done")}
            if started - finished and finished:
                killed.extend(nodes.kill_node("aif-n2"))
                killed_at.append(time.time_ns())  # nothing runs on aif-n2 after this
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        fset, cfg = _preprocess(profile, root, snap, "kill", _ledgered(ledger, 1.0))
    finally:
        t.join(timeout=5)
        up = aif("site", "up", timeout=600)  # the dead node's slurmd again, back in service
        assert up.returncode == 0, up.stdout + up.stderr
    assert killed, "aif-n2 was never killed"
    by_part: dict[str, list[tuple[int, str, bool]]] = {}
    done = {p.stem for p in ledger.glob("*.done")}
    for p in ledger.glob("*.start"):
        part, node, _, t_ns = p.stem.split("-", 1)[0], *p.stem.split("-", 1)[1].rsplit("-", 2)
        by_part.setdefault(part, []).append((int(t_ns), node, p.stem in done))
    assert sorted(by_part) == [f"{i:03d}" for i in range(OBJECTS)], sorted(by_part)
    again = {k: sorted(v) for k, v in by_part.items() if len(v) > 1}
    # What the dead node held (in flight, or done but not yet handed back) ran again, once,
    # after the kill, on the surviving node; nothing else ran twice.
    assert again, "no partition of the dead node ran again"
    assert any(not ok for v in again.values() for _, _, ok in v), again
    for part, attempts in again.items():
        *lost, last = attempts
        assert all(node == "aif-n2" and t < killed_at[0] for t, node, _ in lost), (part, attempts)
        assert last[1] == "aif-n1" and last[2], (part, attempts)
        assert len(lost) == 1, (part, attempts)
    _same_bytes_as_one_node(fset, snap, cfg, f"file://{root}/ref-kill")
    states = set(_slurm(profile).run(["sinfo", "-h", "-N", "-n", "aif-n2", "-o", "%T"]).split())
    assert states <= {"idle", "mixed", "allocated"}, f"aif site up left aif-n2 {states}"


def _run_record(profile: Profile, res: Any) -> dict[str, Any]:
    ui = [ln for ln in res.stdout.splitlines() if ln.startswith("Prefect UI:")]
    run_id = ui[0].rsplit("/", 1)[-1]
    return dict(json.loads((Path(profile.runs_dir) / "pipeline" / f"{run_id}.json").read_text()))


def _weights(run_dir: str) -> str:
    return (Path(run_dir) / "weights.sha256").read_text().strip()


def test_training_across_two_nodes_equals_two_gpus_on_one(
    multinode: tuple[Site, Profile],
) -> None:
    _, profile = multinode
    seed = str(int(time.time()) % 1_000_000 + 77)
    runs = {}
    for label, (n, g) in {"2x1": (2, 1), "1x2": (1, 2)}.items():
        env = {"AIF_TRAINING__NODES": str(n), "AIF_TRAINING__GPUS_PER_NODE": str(g),
               "AIF_TRAINING__SEED": seed}  # fmt: skip
        res = aif("run", "--profile", "site", "--epochs", "2", env=env)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "rank 0 of 2" in res.stdout and "rank 1 of 2" in res.stdout, res.stdout
        runs[label] = _run_record(profile, res)["trained"]
    rec = _slurm(profile).sacct_record(runs["2x1"]["slurm_job_ids"][-1])
    assert rec is not None and rec["NodeList"] == "aif-n[1-2]", rec
    assert _weights(runs["2x1"]["run_dir"]) == _weights(runs["1x2"]["run_dir"])


def test_a_node_dies_under_training_and_the_job_resumes_on_the_other(
    multinode: tuple[Site, Profile],
) -> None:
    """The training job's node is killed (its slurmd and the job's processes at once):
    Slurm sets the node down and requeues the job, which resumes from its last checkpoint
    on the other node; no step is lost or repeated, and `aif site up` brings the node back."""
    import math
    import subprocess

    from tests.site.conftest import AIF, REPO, child_environ, running_training

    _, profile = multinode
    slurm = _slurm(profile)
    epochs = 40
    env = child_environ({"AIF_TRAINING__SEED": str(int(time.time()) % 1_000_000 + 91)})
    proc = subprocess.Popen([AIF, "run", "--profile", "site", "--epochs", str(epochs)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    out: list[str] = []
    job = run_dir = ""
    try:
        job, run_dir = running_training(proc, out)
        ledger = Path(run_dir, "ledger.jsonl")
        node = slurm.run(["squeue", "-h", "-j", job, "-o", "%N"]).strip()
        assert node in NODES, node
        assert nodes.kill_node(node), f"nothing ran on {node}"
        rest, _ = proc.communicate(timeout=600)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
        up = aif("site", "up", timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
    text = "".join(out)
    assert proc.returncode == 0, text
    other = next(n for n in NODES if n != node)
    assert f"aif: job {job} on {other} restart 1 " in text, text
    assert "resumed from checkpoint at epoch" in text, text
    # The run's log (the Prefect run's) says what happened.
    assert f"job {job}: requeued after NODE_FAIL on {node} (restart 1)" in text, text
    attempts: dict[str, dict[str, Any]] = {}
    for e in (json.loads(ln) for ln in ledger.read_text().splitlines()):
        attempts[e["restart"]] = e
    assert sorted(attempts) == ["0", "1"], attempts
    first, second = attempts["0"], attempts["1"]
    metrics = json.loads(Path(run_dir, "metrics.json").read_text())
    steps_per_epoch = math.ceil(metrics["train_rows"] / 512)
    assert second["to"] == [epochs, 0]
    # Resumed from the last checkpoint: the steps of the dead node after it were done again.
    assert second["from"][0] <= first["to"][0] and second["from"] != [0, 0], attempts
    assert (second["to"][0] - second["from"][0]) * steps_per_epoch <= epochs * steps_per_epoch
    for n in NODES:
        states = set(slurm.run(["sinfo", "-h", "-N", "-n", n, "-o", "%T"]).split())
        assert states <= {"idle", "mixed", "allocated"}, f"{n} is {states} after aif site up"


def test_a_flow_run_inside_an_allocation_reports_through_the_relay_only(
    multinode: tuple[Site, Profile],
) -> None:
    """`aif run --in-allocation`: the whole pipeline is one job on a compute node, as the
    start-up's user; the node cannot connect to Prefect or MLflow (first test of this
    module), yet the operator sees the run, its stages, task runs and logs in Prefect, and
    the version is the start-up's in MLflow: every call went through the relay's files. The
    relay refused nothing a pipeline needs, and the run's spool is gone afterwards."""
    import re

    from mlflow import MlflowClient
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter, TaskRunFilter

    from tests.site.conftest import prefect_client

    site, profile = multinode
    relay_log = site.logs / "relay.log"
    log_before = relay_log.stat().st_size if relay_log.exists() else 0
    res = aif("run", "--profile", "site", "--in-allocation", "--epochs", "2", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    uri = res.last_line
    assert uri.startswith("models:/"), res.stdout[-2000:]
    run_id = next(ln for ln in res.stdout.splitlines() if ln.startswith("Prefect UI:")).rsplit(
        "/", 1)[-1]  # fmt: skip
    job = re.search(r"submitted Slurm job (\d+) \((aif-flow-[^)]+)\)", res.stdout)
    assert job, res.stdout[-2000:]
    rec = _slurm(profile).run(["sacct", "-n", "-X", "-P", "-j", job.group(1),
                               "-o", "NodeList,User,State"]).split("|")  # fmt: skip
    assert rec[0] in NODES and rec[1] == "startup-a" and rec[2].strip() == "COMPLETED", rec
    with prefect_client(profile) as client:
        top = client.read_flow_run(run_id)
        assert top.state is not None and top.state.is_completed(), top.state
        assert {"startup:startup-a", "in-allocation", "profile:site"} <= set(top.tags), top.tags
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id={"any_": [top.id]}))  # fmt: skip
        assert len(subs) == 4, subs  # ingest, preprocess, train, register
        assert all(f.state is not None and f.state.is_completed() for f in subs)
        ids = [top.id, *(f.id for f in subs)]
        deadline = time.monotonic() + 60  # task runs are recorded from the relayed events
        while True:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": ids}),
                                          task_run_filter=TaskRunFilter())  # fmt: skip
            done = [t for t in tasks if t.state is not None and t.state.is_completed()]
            if (tasks and len(done) == len(tasks)) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert tasks and len(done) == len(tasks), [(t.name, t.state_name) for t in tasks]
        logs = client.read_logs(LogFilter(flow_run_id={"any_": ids}))
        messages = [lg.message for lg in logs]
        name, version = uri.removeprefix("models:/").split("/")
        # "registered NAME version V" (or "already registered as ...", inputs unchanged)
        assert any(f"{name} version {version}" in m for m in messages), messages
        assert any("Beginning subflow run" in m for m in messages), messages
    mv = MlflowClient(profile.mlflow.tracking_uri).get_model_version(name, version)
    run = MlflowClient(profile.mlflow.tracking_uri).get_run(mv.run_id)
    exp = MlflowClient(profile.mlflow.tracking_uri).get_experiment(run.info.experiment_id)
    assert exp.name.endswith("-startup-a"), exp.name
    assert mv.user_id in ("startup-a", None, ""), mv.user_id
    key = job.group(2).removeprefix("aif-flow-")
    assert not (site.root / "relay" / key).exists()  # the spool went with the job
    with open(relay_log, "rb") as fh:
        fh.seek(log_before)
        new = fh.read().decode(errors="replace")
    assert "refused" not in new, new[-2000:]


def test_the_relay_killed_mid_run_loses_nothing_once_site_up_restarts_it(
    multinode: tuple[Site, Profile],
) -> None:
    """kill -9 of the relay while a flow run in an allocation trains: the job's calls wait
    in the spool; `aif site up` starts the relay again, it answers them, and the run ends
    Completed with its model version."""
    import signal
    import subprocess

    from tests.site.conftest import AIF, REPO, child_environ, prefect_client

    site, profile = multinode
    proc = subprocess.Popen([AIF, "run", "--profile", "site", "--in-allocation", "--epochs", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=child_environ())  # fmt: skip
    out: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if "[3/4] train" in line:
                break
        state = json.loads((site.root / "site.json").read_text())
        os.kill(int(state["relay"]["pid"]), signal.SIGKILL)
        time.sleep(3)  # the job's calls wait in its spool meanwhile
        up = aif("site", "up", timeout=300)
        assert up.returncode == 0 and "starting relay" in up.stdout, up.stdout + up.stderr
        rest, _ = proc.communicate(timeout=600)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert proc.returncode == 0, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("models:/"), text[-2000:]
    run_id = next(ln for ln in text.splitlines() if ln.startswith("Prefect UI:")).rsplit(
        "/", 1)[-1]  # fmt: skip
    with prefect_client(profile) as client:
        top = client.read_flow_run(run_id)
        assert top.state is not None and top.state.is_completed(), top.state


def test_a_startups_job_cannot_use_another_startups_spool(
    multinode: tuple[Site, Profile],
) -> None:
    """A relay spool of startup-a: a job of startup-b on a compute node can neither put a
    request in it nor read its answers; startup-a's own job can do both, and writes no
    answer (only root writes them)."""
    import grp
    import pwd

    from aifactory.tasks.control.relay import Grant, make_spool, remove_spool

    site, profile = multinode
    key = f"startup-a-probe-{time.time_ns()}"
    a = pwd.getpwnam("startup-a")
    spool = make_spool(site.root / "relay", key, Grant(key, "startup-a", "startup-a",
                                                       "startup-a"), a.pw_uid,
                       grp.getgrnam("startup-a").gr_gid)  # fmt: skip
    (spool / "resp" / "x.resp").write_text("{}")
    q = shlex.quote
    script = (f"touch {q(str(spool / 'req' / 'x.req'))} 2>/dev/null && echo req-open || "
              f"echo req-refused; cat {q(str(spool / 'resp' / 'x.resp'))} >/dev/null 2>&1 "
              f"&& echo resp-open || echo resp-refused; touch {q(str(spool / 'resp' / 'y'))} "
              "2>/dev/null && echo resp-write || echo resp-nowrite; id -un")  # fmt: skip
    slurm = _slurm(profile)
    try:
        got = {}
        for user in ("startup-b", "startup-a"):
            home = Path(pwd.getpwnam(user).pw_dir)
            out = home / f"spool-probe-{time.time_ns()}.out"
            slurm.run(["sbatch", "--wait", "-p", "cpu", "-A", user, f"--uid={user}",
                       f"--gid={user}", f"--output={out}", f"--chdir={home}", "--wrap", script],
                      timeout=120)  # fmt: skip
            got[user] = out.read_text().split()
            out.unlink()
    finally:
        remove_spool(spool)
    assert got["startup-b"] == ["req-refused", "resp-refused", "resp-nowrite", "startup-b"], got
    assert got["startup-a"] == ["req-open", "resp-open", "resp-nowrite", "startup-a"], got


def test_the_one_node_site_is_still_there(multinode: tuple[Site, Profile], tmp_path: Path) -> None:
    """`--nodes 1` (this host is the login and the compute node; no namespace, no bridge)
    runs jobs. Last in the suite: the module's fixture gives a site that was two nodes its
    second node back; a site that was one node stays so (no switch back and forth)."""
    from aifactory.tasks.core.config import load_profile as load

    one = aif("site", "up", "--nodes", "1", timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    profile = load("site")
    assert profile.dask.scheduler_host == "127.0.0.1", profile.dask.scheduler_host
    out = tmp_path / "one.out"
    _slurm(profile).run(["sbatch", "--wait", "-p", "gpu", "--gres=gpu:2", "-A", "startup-a",
                         f"--output={out}", "--wrap", "echo $(hostname) $CUDA_VISIBLE_DEVICES"],
                        timeout=120)  # fmt: skip
    assert out.read_text().split() == [os.uname().nodename, "0,1"], out.read_text()
    import subprocess

    left = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert "aif-br0" not in left and "aif-n1" not in left, left
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "aif-n" not in netns, netns
