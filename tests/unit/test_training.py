"""Training on the orchestrator side: the sbatch script, the spec, and the Slurm watcher
against fake sbatch/squeue/sacct/scancel commands (no cluster needed)."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from aifactory.tasks.core.config import TrainingSpec
from aifactory.tasks.core.errors import ConfigError, SlurmError, TrainingError
from aifactory.tasks.doors.slurm import SACCT_FIELDS, SlurmClient
from aifactory.tasks.jobs import slurm_watch
from aifactory.tasks.jobs.slurm_watch import submit_and_watch
from aifactory.tasks.stages.training import render_sbatch, sbatch_options

REF = Path(__file__).parent / "data" / "train.sbatch.ref"


def _spec() -> TrainingSpec:
    return TrainingSpec(
        executor="slurm",
        partition="gpu",
        gpus_per_node=2,
        nodes=1,
        cpus_per_task=4,
        mem_gb=6.5,
        timeout_min=90,
        qos="normal",
        constraint="a100",
        modules=["cuda/12.4", "python/3.11"],
        setup=["source /opt/venv/bin/activate"],
        env={"OMP_NUM_THREADS": "4", "AIF_NOTE": "it's fine"},
    )


def _render(spec: TrainingSpec) -> str:
    return render_sbatch(
        spec,
        account="startup-a",
        job_name="aif-train-abc123",
        run_key="abc123",
        run_dir="/runs/train/abc123",
        python="/opt/venv/bin/python",
        featureset_path="/runs/train/abc123/featureset.json",
        config_path="/runs/train/abc123/config.json",
    )


def test_sbatch_matches_reference_copy() -> None:
    text = _render(_spec())
    if os.environ.get("AIF_RECORD") == "1":
        REF.parent.mkdir(parents=True, exist_ok=True)
        REF.write_text(text)
    expected = REF.read_text().splitlines()
    got = text.splitlines()
    how = f"if the change is intended, re-record with: AIF_RECORD=1 pytest {__file__}"
    for n, (want, have) in enumerate(zip(expected, got, strict=False), 1):
        assert have == want, f"train.sbatch line {n} differs from {REF.name}; {how}"
    assert len(got) == len(expected), (
        f"train.sbatch has {len(got)} lines, not {len(expected)}; {how}"
    )


def test_script_is_valid_bash(tmp_path: Path) -> None:
    script = tmp_path / "train.sbatch"
    script.write_text(_render(_spec()))
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_no_gpu_no_gres_and_short_time() -> None:
    spec = TrainingSpec(gpus_per_node=0, timeout_min=5, mem_gb=1)
    text = _render(spec)
    assert "--gres" not in text and "--qos" not in text and "--constraint" not in text
    assert "#SBATCH --time=00:05:00" in text and "#SBATCH --mem=1024M" in text
    assert sbatch_options(TrainingSpec(timeout_min=24 * 60 + 1))["time"] == "1-00:01:00"


def test_container_and_signal_offset(tmp_path: Path) -> None:
    spec = TrainingSpec(container="/images/aif-train.sif", container_options=["--bind", "/scratch"],
                        signal_before_end_s=120, timeout_min=30)  # fmt: skip
    text = _render(spec)
    assert "#SBATCH --signal=B:USR1@120" in text
    launch = (
        "exec apptainer exec --nv --bind /runs/train/abc123 --bind /scratch "
        "/images/aif-train.sif /opt/venv/bin/python -m aifactory.tasks.payloads.train_tabular"
    )
    assert launch in text
    cpu = _render(TrainingSpec(gpus_per_node=0, container="docker://ghcr.io/x/aif:1"))
    assert "exec apptainer exec --bind /runs/train/abc123 docker://ghcr.io/x/aif:1 " in cpu
    script = tmp_path / "train.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    with pytest.raises(ValueError, match=r"signal_before_end_s \(60\) must be shorter"):
        TrainingSpec(timeout_min=1, signal_before_end_s=60)


def test_multi_node_multi_gpu_goes_through_srun_and_torchrun(tmp_path: Path) -> None:
    text = _render(TrainingSpec(nodes=2, gpus_per_node=4, cpus_per_task=16))
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gres=gpu:4" in text
    assert "#SBATCH --signal=TERM@60" in text  # to every step process, not USR1 to the shell
    assert "exec srun --export=ALL --kill-on-bad-exit=1 --ntasks-per-node=1 " in text
    assert "-m torch.distributed.run --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d" in text
    with pytest.raises(ConfigError, match="'lm' trains on one GPU of one node"):
        _render(TrainingSpec(payload="lm", gpus_per_node=2))
    single = _render(TrainingSpec(gpus_per_node=1))
    assert "srun" not in single and "#SBATCH --signal=B:USR1@60" in single
    script = tmp_path / "train.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_unknown_spec_key_is_rejected() -> None:
    with pytest.raises(Exception, match="gpus_per_nod") as err:
        TrainingSpec.model_validate({"gpus_per_nod": 1})
    assert "extra" in str(err.value).lower()


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN"])
def test_secrets_never_go_into_the_script(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        _render(TrainingSpec(env={name: "x"}))


# -- the watcher against fake Slurm commands ------------------------------------------------
SACCT = "|".join(
    [
        "123", "aif-train-k", "startup-a", "gpu", "{state}", "{code}", "00:00:07", "7",
        "billing=1,cpu=1,gres/gpu=1,mem=2G,node=1", "", "vm",
        "2026-01-01T00:00:00", "2026-01-01T00:00:07", "2026-01-01T00:00:00",
    ]
)  # fmt: skip


class FakeSlurm:
    """sbatch/squeue/sacct/scancel as shell scripts; their calls are recorded in files."""

    def __init__(self, root: Path, *, running_polls: int = 2, sbatch_out: str = "123") -> None:
        self.bin = root / "bin"
        self.state = root / "state"
        self.run_dir = root / "run"
        for d in (self.bin, self.state, self.run_dir):
            d.mkdir()
        (self.state / "running_polls").write_text(str(running_polls))
        (self.state / "sbatch.out").write_text(sbatch_out + "\n")
        self.sacct("COMPLETED", "0:0")
        s = '"$FAKE_DIR"'
        self._cmd("sbatch", f'echo "$@" >> {s}/sbatch.calls; cat {s}/sbatch.out')
        self._cmd(
            "squeue",
            f"""case "$*" in *--name*) cat {s}/live 2>/dev/null; exit 0;; esac
n=$(cat {s}/polls 2>/dev/null || echo 0); echo $((n+1)) > {s}/polls
if [ "$n" -lt "$(cat {s}/running_polls)" ]; then
  j=$(echo "$*" | sed -n 's/.*-j \\([0-9]*\\).*/\\1/p')
  echo "epoch $n line" >> "$FAKE_RUN/slurm-123.out"; echo "$j|$j|RUNNING"
fi""",
        )
        self._cmd("sacct", f"echo '{'|'.join(SACCT_FIELDS)}'; cat {s}/sacct.out")
        self._cmd("scancel", f'echo "$@" >> {s}/scancel.calls')
        self.client = SlurmClient(
            env={"FAKE_DIR": str(self.state), "FAKE_RUN": str(self.run_dir)}, bin_dir=str(self.bin)
        )

    def _cmd(self, name: str, body: str) -> None:
        p = self.bin / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(0o755)

    def sacct(self, state: str, code: str) -> None:
        (self.state / "sacct.out").write_text(SACCT.format(state=state, code=code) + "\n")

    def calls(self, name: str) -> str:
        p = self.state / f"{name}.calls"
        return p.read_text() if p.exists() else ""

    def watch(
        self, log: list[str], cancel_event: threading.Event | None = None
    ) -> tuple[str, dict[str, str]]:
        return submit_and_watch(
            self.client,
            str(self.run_dir / "train.sbatch"),
            str(self.run_dir),
            "aif-train-k",
            log.append,
            poll_s=0.01,
            cancel_event=cancel_event,
        )


def test_completed_job_streams_its_log(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    log: list[str] = []
    job_id, rec = fake.watch(log)
    assert job_id == "123" and rec["State"] == "COMPLETED" and rec["Partition"] == "gpu"
    assert "train.sbatch" in fake.calls("sbatch")
    assert "epoch 0 line" in log and "epoch 1 line" in log
    assert "job 123: RUNNING" in log and "job 123: COMPLETED" in log
    assert fake.calls("scancel") == ""


def test_failed_job_raises_with_exit_code_and_log_tail(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.sacct("FAILED", "1:0")
    with pytest.raises(TrainingError) as err:
        fake.watch([])
    msg = str(err.value)
    assert msg.startswith("training job 123 on partition gpu ended FAILED (exit code 1:0)")
    assert "log tail: epoch 0 line | epoch 1 line" in msg and "\n" not in msg


def test_out_of_memory_has_its_own_wording(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    fake.sacct("OUT_OF_MEMORY", "0:125")
    with pytest.raises(TrainingError, match=r"ran out of memory \(allocated 2G.*training\.mem_gb"):
        fake.watch([])


def test_timeout_and_cancelled_wording(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path, running_polls=0)
    fake.sacct("TIMEOUT", "0:0")
    with pytest.raises(TrainingError, match=r"hit its time limit.*training\.timeout_min"):
        fake.watch([])
    fake.sacct("CANCELLED by 1001", "0:15")
    with pytest.raises(TrainingError, match="was CANCELLED by 1001"):
        fake.watch([])


def test_reattaches_to_a_live_job_instead_of_submitting(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path)
    (fake.state / "live").write_text("77\n")
    log: list[str] = []
    fake.sacct("COMPLETED", "0:0")
    (fake.state / "sacct.out").write_text(
        (fake.state / "sacct.out").read_text().replace("123|", "77|", 1)
    )
    job_id, _ = fake.watch(log)
    assert job_id == "77" and fake.calls("sbatch") == ""
    assert any("reattaching to live Slurm job 77" in line for line in log)


def test_unparsable_job_id_shows_the_raw_output(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path, sbatch_out="sbatch: queued somewhere, no id")
    with pytest.raises(SlurmError, match="sbatch: queued somewhere, no id"):
        fake.watch([])


def test_interrupted_watcher_cancels_the_job(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path, running_polls=100)

    def log(line: str) -> None:
        if line == "epoch 1 line":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        submit_and_watch(fake.client, "s.sbatch", str(fake.run_dir), "aif-train-k", log, 0.01)
    assert fake.calls("scancel").split() == ["123"]


def test_cancel_event_cancels_the_job(tmp_path: Path) -> None:
    fake = FakeSlurm(tmp_path, running_polls=100)
    event = threading.Event()
    event.set()
    with pytest.raises(TrainingError, match="cancelled with its watcher"):
        fake.watch([], cancel_event=event)
    assert fake.calls("scancel").split() == ["123"]


def test_failing_sacct_leaves_the_job_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSlurm(tmp_path, running_polls=0)
    fake._cmd("sacct", 'echo "sacct: error: slurmdbd down" >&2; exit 1')
    monkeypatch.setattr(slurm_watch, "OUTAGE_LIMIT_S", 0.05)
    log: list[str] = []
    with pytest.raises(TrainingError, match=r"accounting \(slurmdbd or its database\) has not "
                                            r"answered .* the job is left as it is"):  # fmt: skip
        fake.watch(log)
    assert fake.calls("scancel") == ""
    said = [line for line in log if "slurmdbd down" in line]
    assert len(said) == 1 and "unreachable since" in said[0], log  # said once, not per poll


def test_partition_from_the_script_when_sacct_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSlurm(tmp_path, running_polls=0)
    (fake.state / "sacct.out").write_text(
        SACCT.format(state="FAILED", code="2:0").replace("|gpu|", "||")
    )
    (fake.run_dir / "train.sbatch").write_text("#!/bin/bash\n#SBATCH --partition=gpu-x\n")
    monkeypatch.setattr(slurm_watch, "SACCT_WAIT_S", 0.05)
    with pytest.raises(TrainingError, match="on partition gpu-x ended FAILED"):
        fake.watch([])


# -- a finished run collected by a second process (issue 15: one record, one owner) --------
def _finished_run(tmp_path: Path) -> tuple[Path, object, TrainingSpec]:
    from aifactory.tasks.core.manifests import FeatureSet, SplitFiles

    run_dir = tmp_path / "train" / "k1"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text('{"test_r2": 0.8, "device": "cpu"}')
    (run_dir / "model.pt").write_bytes(b"weights")
    (run_dir / "weights.sha256").write_text("ab" * 32)
    fset = FeatureSet(featureset_id="fs1", snapshot_id="s", snapshot_hash="h",
                      lake_url="file:///l", key_column="k", feature_columns=["a"], target="t",
                      normalisation={}, splits={"train": SplitFiles(files=[], rows=0)},
                      rows_in=0, feature_config={}, created_at="now")  # fmt: skip
    return run_dir, fset, TrainingSpec(executor="slurm")


class RecordingExecutor:
    kind = "slurm"

    def __init__(self) -> None:
        self.asked: list[str] = []

    def record(self, job_id: str, log: object) -> dict[str, str]:
        self.asked.append(job_id)
        return {"JobID": job_id, "State": "COMPLETED", "Partition": "gpu"}


def test_a_run_whose_owner_died_is_collected_with_its_jobs_and_record(tmp_path: Path) -> None:
    """The owner died between the job's end and its record (or the accounting was down):
    the collector finds the job ids in the run directory (the job log names them) and asks
    the accounting for the record, never collects an executor '?' with no jobs."""
    from aifactory.tasks.stages.training import _collect_finished

    run_dir, fset, spec = _finished_run(tmp_path)
    (run_dir / "slurm-41.out").write_text("aif: job 41 ...\n")
    (run_dir / "slurm-40.out").write_text("aif: job 40 ...\n")
    ex = RecordingExecutor()
    said: list[str] = []
    got = _collect_finished(run_dir, "k1", fset, spec, ex, said.append, 0.0, "tabular")  # type: ignore[arg-type]
    assert got.executor == "slurm" and got.slurm_job_ids == ["40", "41"]
    assert got.sacct["JobID"] == "41" and ex.asked == ["41"]
    # A second collector gets the very same manifest, without asking again.
    again = _collect_finished(run_dir, "k1", fset, spec, ex, said.append, 0.0, "tabular")  # type: ignore[arg-type]
    assert again == got and ex.asked == ["41"]


def test_a_slurm_run_without_any_job_id_is_not_collected(tmp_path: Path) -> None:
    from aifactory.tasks.stages.training import _collect_finished

    run_dir, fset, spec = _finished_run(tmp_path)
    with pytest.raises(TrainingError, match="names its Slurm job: its lineage is lost"):
        _collect_finished(run_dir, "k1", fset, spec, RecordingExecutor(), print, 0.0, "tabular")  # type: ignore[arg-type]


# -- one owner per local run, for the life of its training process (issue 16) --------------
_FLOW = """
import sys
from pathlib import Path
from aifactory.tasks.jobs.executors import JobRequest, LocalExecutor, owner
run = Path(sys.argv[1])
payload = [sys.executable, "-c", "import os, time; "
           "open('payload.pid', 'w').write(str(os.getpid())); "
           "print('training', flush=True); time.sleep(120)"]
with owner(run):
    LocalExecutor().run(JobRequest("aif-train-k1", run, run / "train.sbatch", payload))
"""


def _lock_free(lock: Path) -> bool:
    import fcntl

    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def test_a_local_payload_holds_the_owner_lock_after_its_flow_died(tmp_path: Path) -> None:
    """The flow process that owns a local run is killed (SIGKILL: no cleanup) while its
    payload trains on: the run directory stays owned until the payload ends, so a second
    run waits for it instead of training beside it in the same folder. Before, the lock
    went with the flow process and a re-run resumed from the orphan's checkpoint."""
    import contextlib
    import signal
    import sys
    import time

    run = tmp_path / "train" / "k1"
    flow = subprocess.Popen([sys.executable, "-c", _FLOW, str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    pid_file, payload = run / "payload.pid", 0
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline and flow.poll() is None, "the payload never started"
            time.sleep(0.05)
        payload = int(pid_file.read_text())
        flow.kill()
        flow.wait(timeout=30)
        time.sleep(0.2)
        assert not _lock_free(run / ".owner.lock"), "the orphaned payload does not hold the lock"
    finally:
        flow.kill()
        if payload:
            with contextlib.suppress(ProcessLookupError):
                os.kill(payload, signal.SIGKILL)
    deadline = time.monotonic() + 30  # the payload's end releases it
    while not _lock_free(run / ".owner.lock"):
        assert time.monotonic() < deadline, "the lock outlived the payload"
        time.sleep(0.05)
