"""Training: render the sbatch script, submit it (or run locally), watch it to the end.

Generic resource names from :class:`TrainingSpec` are translated to Slurm's here. The run
directory (``<runs_dir>/train/<run_key>``) keeps the rendered script, the config, the job's
log, checkpoints and outputs. The job's name carries the run key, so a second call with the
same key reattaches to a live job, and a finished run is collected instead of run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import string
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aifactory.tasks.core.config import TrainingSpec
from aifactory.tasks.core.errors import ConfigError, TrainingError
from aifactory.tasks.core.jobfiles import read_job_bytes, read_job_text, replace_job_folder
from aifactory.tasks.core.manifests import FeatureSet, TrainedModel
from aifactory.tasks.core.provenance import environment_hash, now_iso
from aifactory.tasks.doors.lake import write_text_local
from aifactory.tasks.doors.slurm import SlurmClient
from aifactory.tasks.jobs.executors import Executor, JobRequest, executor_for, owner
from aifactory.tasks.models.flavours import artifact_sha256, model_path

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "templates" / "train.sbatch"
PAYLOADS = {"tabular": "train_tabular", "lm": "train_lm"}
HYPERPARAMS = ("epochs", "batch_size", "hidden", "lr", "seed")
# Environment names that must never be written into a job script (they travel by name in
# sbatch's --export list, their values in its environment: tasks/doors/slurm.py).
_SECRET_NAME = re.compile(r"SECRET|PASSW|TOKEN|ACCESS_KEY|CREDENTIAL|PRIVATE", re.IGNORECASE)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def slurm_time(minutes: int) -> str:
    """Minutes as Slurm's --time: HH:MM:SS, or D-HH:MM:SS from one day on."""
    d, rem = divmod(minutes, 24 * 60)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00" if d else f"{h:02d}:{m:02d}:00"


def sbatch_options(spec: TrainingSpec) -> dict[str, str]:
    """Generic resource names in, Slurm's names out (only the options the spec sets)."""
    opts = {
        "partition": spec.partition,
        "nodes": str(spec.nodes),
        "ntasks-per-node": "1",
        "cpus-per-task": str(spec.cpus_per_task),
        "mem": f"{int(spec.mem_gb * 1024)}M",
        "time": slurm_time(spec.timeout_min),
    }
    if spec.gpus_per_node:
        opts["gres"] = f"gpu:{spec.gpus_per_node}"
    if spec.qos:
        opts["qos"] = spec.qos
    if spec.constraint:
        opts["constraint"] = spec.constraint
    return opts


def _check_env(env: Mapping[str, str]) -> None:
    for name in env:
        if not _ENV_NAME.match(name):
            raise ConfigError(f"training.env: {name!r} is not a valid environment variable name")
        if _SECRET_NAME.search(name):
            raise ConfigError(
                f"training.env.{name} looks like a secret: job scripts are kept with the run, "
                "so pass it through the submitting environment and name it in slurm.export instead"
            )


def render_sbatch(
    spec: TrainingSpec, *, account: str, job_name: str, run_dir: str, python: str,
    featureset_path: str, config_path: str, run_key: str | None = None,
    payload_args: Sequence[str] | None = None,
) -> str:  # fmt: skip
    """The job script for this spec (generic names in, Slurm's names out); no secrets.

    ``payload_args`` replaces the tabular payload's arguments (--featureset, --run-dir,
    --config) for payloads that take other inputs, such as the language model's --data.
    """
    if payload_args is None:
        payload_args = ["--featureset", featureset_path, "--run-dir", run_dir,
                        "--config", config_path]  # fmt: skip
    _check_env(spec.env)
    if distributed(spec) and spec.payload != "tabular" and not spec.script:
        raise ConfigError(
            f"training.payload {spec.payload!r} trains on one GPU of one node: set "
            f"gpus_per_node to 1 and nodes to 1 (got {spec.gpus_per_node} and {spec.nodes})"
        )
    values = {
        **job_values(spec),
        "run_key": run_key or job_name,
        "job_name": job_name,
        "account": account,
        "run_dir": run_dir,
        "signal_spec": _signal_spec(spec),
        "exec_lines": _exec_lines(spec, run_dir, python, list(payload_args)),
        "run_dir_sh": shlex.quote(run_dir),
    }
    return fill_template(TEMPLATE, values)


def job_values(spec: TrainingSpec) -> dict[str, str]:
    """What every job script of a training spec shares (the training job, a sweep's array):
    resources, optional directives, module loads, set-up lines and exported variables."""
    _check_env(spec.env)
    opts = sbatch_options(spec)
    optional = [f"#SBATCH --{k}={opts[k]}" for k in ("qos", "constraint") if k in opts]
    return {
        "partition": opts["partition"],
        "gres_line": f"#SBATCH --gres={opts['gres']}\n" if "gres" in opts else "",
        "nodes": opts["nodes"],
        "cpus_per_task": opts["cpus-per-task"],
        "mem": opts["mem"],
        "time": opts["time"],
        "optional_lines": "\n".join(optional),
        "module_lines": "".join(f"module load {m}\n" for m in spec.modules),
        "setup_lines": "".join(f"{line}\n" for line in spec.setup),
        "env_lines": "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(spec.env.items())),
    }


def fill_template(path: Path, values: Mapping[str, object]) -> str:
    """A job-script template with its values, empty lines dropped."""
    text = string.Template(path.read_text()).substitute(values)
    return "\n".join(line for line in text.splitlines() if line != "") + "\n"


def distributed(spec: TrainingSpec) -> bool:
    return spec.nodes > 1 or spec.gpus_per_node > 1


def _signal_spec(spec: TrainingSpec) -> str:
    """Single process: USR1 to the batch shell, which execs the payload. Distributed: TERM
    to every step process; torchrun forwards it to its workers, which agree to checkpoint
    and stop together (USR1 would end torchrun itself)."""
    sig = "TERM" if distributed(spec) else "B:USR1"
    return f"{sig}@{spec.signal_before_end_s}"


def _target(spec: TrainingSpec, run_dir: str) -> list[str]:
    """What python runs: the project's script (its copy in the run directory) or the
    reference payload's module."""
    if spec.script:
        return [str(Path(run_dir) / CODE_DIR / Path(spec.script).name)]
    return ["-m", f"aifactory.tasks.payloads.{PAYLOADS[spec.payload]}"]


def _exec_lines(spec: TrainingSpec, run_dir: str, python: str, payload_args: list[str]) -> str:
    target = " ".join(shlex.quote(a) for a in _target(spec, run_dir))
    args = " ".join(shlex.quote(a) for a in payload_args)
    py = shlex.quote(python)
    if not distributed(spec):
        return f"exec {_launcher(spec, run_dir)}{py} {target} {args}"
    # One torchrun per node (srun), one worker per GPU; rendezvous on the first node.
    procs = max(1, spec.gpus_per_node)
    return (
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
        "MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n"
        # --export=ALL: the job's environment as this script made it (modules, training.env);
        # sbatch's --export list is in SLURM_EXPORT_ENV, which srun would apply again.
        f"exec srun --export=ALL --kill-on-bad-exit=1 --ntasks-per-node=1 "
        f"{_launcher(spec, run_dir)}{py} "
        f"-m torch.distributed.run --nnodes={spec.nodes} --nproc_per_node={procs} "
        '--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" '
        f'--rdzv_id="$SLURM_JOB_ID" {target} {args}'
    )


def _launcher(spec: TrainingSpec, run_dir: str) -> str:
    """``apptainer exec [--nv] --bind RUN_DIR [options] IMAGE `` or nothing."""
    if not spec.container:
        return ""
    parts = ["apptainer", "exec"]
    if spec.gpus_per_node > 0:
        parts.append("--nv")
    parts += ["--bind", run_dir, *spec.container_options, spec.container]
    return " ".join(shlex.quote(p) for p in parts) + " "


# -- running locally ------------------------------------------------------------------------
def payload_command(
    spec: TrainingSpec, python: str, featureset_path: str, run_dir: str, config_path: str
) -> list[str]:
    return [python, *_target(spec, run_dir), "--featureset", featureset_path, "--run-dir",
            run_dir, "--config", config_path]  # fmt: skip


# -- a project's own code -------------------------------------------------------------------
CODE_DIR = "code"
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml", ".txt", ".cfg")
CODE_MAX_BYTES = 20 * 1024 * 1024


def project_files(script: str) -> list[Path]:
    """The project's code beside its training script: source and small config files in its
    folder and subfolders, skipping hidden folders (.aif, .git), __pycache__ and data."""
    root = Path(script).resolve().parent
    out: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if name.startswith(".") or not name.endswith(CODE_SUFFIXES):
                continue
            if p.is_symlink():  # root copies the project: a link could name the site's files
                raise ConfigError(f"training.script: {p} is a symbolic link; the project's "
                                  "code is copied as plain files")  # fmt: skip
            if not p.is_file():
                continue
            total += p.stat().st_size
            if total > CODE_MAX_BYTES:
                raise ConfigError(f"training.script: the code in {root} is over "
                                  f"{CODE_MAX_BYTES >> 20} MiB of {', '.join(CODE_SUFFIXES)} "
                                  "files: keep data out of the project's folder")  # fmt: skip
            out.append(p)
    return out


def project_code_hash(script: str) -> str:
    """sha256 (16 hex) of the project's code (names and bytes): part of the run key."""
    root = Path(script).resolve().parent
    h = hashlib.sha256(Path(script).name.encode())
    for p in project_files(script):
        h.update(f"\n{p.relative_to(root).as_posix()}\n".encode())
        h.update(read_job_bytes(p, CODE_MAX_BYTES + 1, under=root))
    return h.hexdigest()[:16]


def copy_project_code(script: str, run_dir: Path) -> Path:
    """The code the job runs: a copy in ``<run_dir>/code`` made once per run key (its hash
    is in the key), so edits to the project while the job queues do not reach it. Built in
    a folder only root writes (beside the run's), then renamed into the run's folder,
    which the start-up's user owns once a job ran: a link it planted there is replaced,
    never written through."""
    dest = run_dir / CODE_DIR
    if dest.is_dir():
        return dest
    root = Path(script).resolve().parent
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".aif-stage-", dir=run_dir.parent))
    try:
        tmp = stage / CODE_DIR
        tmp.mkdir()
        for p in project_files(script):
            target = tmp / p.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            # Read without following a link anywhere below the project's folder: a file
            # swapped for a link after project_files() looked is refused, not copied.
            target.write_bytes(read_job_bytes(p, CODE_MAX_BYTES + 1, under=root))
            shutil.copystat(p, target, follow_symlinks=False)
        tmp.chmod(0o755)
        try:
            replace_job_folder(tmp, CODE_DIR, run_dir)
        except OSError:
            if not dest.is_dir():  # not a concurrent copy of the same run that got there first
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return dest


def run_config(spec: TrainingSpec) -> dict[str, Any]:
    """``job.config``: the project's ``training.config``, or the reference payload's
    hyperparameters."""
    if spec.script:
        return dict(spec.config)
    return {k: getattr(spec, k) for k in HYPERPARAMS}


# -- the stage --------------------------------------------------------------------------------
def _collect(run_dir: Path, run_key: str, fset: FeatureSet, spec: TrainingSpec, executor: str,
             job_ids: list[str], sacct: dict[str, str], t0: float,
             flavour: str = "tabular") -> TrainedModel:  # fmt: skip
    try:
        metrics = json.loads(read_job_text(run_dir / "metrics.json"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingError(
            f"training in {run_dir} wrote no readable metrics.json: {exc}"
        ) from None
    if not isinstance(metrics, dict):
        raise TrainingError(f"training in {run_dir}: metrics.json is not a JSON object")
    if spec.script:
        params: dict[str, Any] = {**spec.config, "script": Path(spec.script).name}
        weights = artifact_sha256(flavour, run_dir)
    else:
        params = {k: getattr(spec, k) for k in HYPERPARAMS}
        weights = read_job_text(run_dir / "weights.sha256", 4096).strip()
    env_path = run_dir / "environment.json"
    env: dict[str, Any] = json.loads(read_job_text(env_path)) if env_path.exists() else {}
    # The software, not the host or the job: the same packages give the same hash anywhere.
    software: dict[str, Any] = {k: env[k] for k in ("python", "packages") if k in env}
    slurm_resources = {"partition": spec.partition, "gpus_per_node": spec.gpus_per_node}
    trained = TrainedModel(
        run_key=run_key,
        featureset_id=fset.featureset_id,
        featureset_hash=fset.content_hash(),
        run_dir=str(run_dir),
        model_path=str(model_path(flavour, run_dir)),
        metrics={
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        params={
            **params,
            # Where it ran: Slurm's partition and GPUs only for a Slurm job (a local run
            # used neither, whatever the profile's training section says).
            **(slurm_resources if executor == "slurm" else {}),
            "payload": spec.payload,
            "device": _device(env.get("device"), metrics.get("device")),
        },
        executor=executor,
        slurm_job_ids=job_ids,
        sacct=sacct,
        environment_hash=environment_hash(software) if software else "",
        weights_sha256=weights,
        created_at=now_iso(),
        duration_s=round(time.monotonic() - t0, 3),
    )
    write_text_local(run_dir / "trained.json", trained.to_json())  # the stage's manifest
    return trained


def _device(recorded: Any, metric: Any) -> str:
    """The device the job trained on: environment.json's (cpu, cuda), else the metrics'
    (a name, or the LM payload's 1.0 for a GPU and 0.0 for a CPU)."""
    if isinstance(recorded, str) and recorded:
        return recorded
    if isinstance(metric, int | float) and not isinstance(metric, bool):
        return "cuda" if metric else "cpu"
    return str(metric) if metric else "?"


def train(
    *, spec: TrainingSpec, account: str, featureset: FeatureSet, runs_dir: str, run_key: str,
    slurm: SlurmClient | None, env: Mapping[str, str], log: Callable[[str], None] = print,
    cancel_event: threading.Event | None = None, python: str = sys.executable,
    admit: Callable[[], str] | None = None, flavour: str = "tabular",
) -> TrainedModel:  # fmt: skip
    """Train once per run key: reuse a finished run, reattach to a live job, or start one.

    ``env`` (object-store credentials, SLURM_CONF) goes to the local process or to the
    Slurm client's environment, from which sbatch exports it by name: never into the script.
    ``flavour`` (mlflow.flavour) says which file is the model.
    """
    if spec.payload != "tabular" and not spec.script:
        raise ConfigError(
            f"training.payload {spec.payload!r}: the pipeline trains the tabular payload or a "
            "project's script; the language model is the project examples/tourism-lm "
            "(`aif train-lm`)"
        )
    t0 = time.monotonic()
    run_dir = Path(runs_dir) / "train" / run_key
    executor = executor_for(
        spec.executor, slurm, poll_seconds=spec.poll_seconds, max_resubmits=spec.max_resubmits,
        describe=f"account {account}, partition {spec.partition}, gres gpu:{spec.gpus_per_node}",
    )  # fmt: skip
    with owner(run_dir, log):  # one process trains a run key; others wait, then collect
        return _train_owned(spec, account, featureset, run_dir, run_key, executor, env, log,
                            cancel_event, python, admit, t0, flavour)  # fmt: skip


def _train_owned(
    spec: TrainingSpec, account: str, featureset: FeatureSet, run_dir: Path, run_key: str,
    executor: Executor, env: Mapping[str, str], log: Callable[[str], None],
    cancel_event: threading.Event | None, python: str, admit: Callable[[], str] | None,
    t0: float, flavour: str,
) -> TrainedModel:  # fmt: skip
    done = run_dir / "metrics.json"
    if done.exists() and model_path(flavour, run_dir).exists():
        log(f"run {run_key} already finished: collecting it, nothing submitted")
        return _collect_finished(run_dir, run_key, featureset, spec, executor, log, t0,
                                 flavour).model_copy(update={"reused": True})  # fmt: skip

    fs_path = run_dir / "featureset.json"
    write_text_local(fs_path, featureset.to_json())
    cfg_path = run_dir / "config.json"
    write_text_local(cfg_path, json.dumps(run_config(spec), indent=2, sort_keys=True))
    if spec.script:
        copy_project_code(spec.script, run_dir)
    job_name = f"aif-train-{run_key}"
    script = render_sbatch(
        spec, account=account, job_name=job_name, run_key=run_key, run_dir=str(run_dir),
        python=python, featureset_path=str(fs_path), config_path=str(cfg_path),
    )  # fmt: skip
    script_path = run_dir / "train.sbatch"
    write_text_local(script_path, script)
    cmd = payload_command(spec, python, str(fs_path), str(run_dir), str(cfg_path))
    # An earlier owner's jobs (a reattached or resubmitted run) stay named.
    earlier = list(_read_state(run_dir).get("job_ids") or [])
    state: dict[str, Any] = {"executor": executor.kind, "job_ids": earlier, "sacct": {}}

    def on_job(job_id: str) -> None:  # the run directory names its jobs from submission on
        if job_id not in state["job_ids"]:
            state["job_ids"].append(job_id)
            _write_state(run_dir, state)

    _write_state(run_dir, state)
    res = executor.run(JobRequest(job_name, run_dir, script_path, cmd, env, log, cancel_event,
                                  admit, on_job=on_job))  # fmt: skip
    state.update(
        executor=res.executor,
        sacct=res.sacct,
        job_ids=list(dict.fromkeys([*state["job_ids"], *res.job_ids])),
    )
    _write_state(run_dir, state)
    if not done.exists():
        raise TrainingError(f"training in {run_dir} ended without writing metrics.json "
                            "(job.commit(metrics) is the run's last step)")  # fmt: skip
    return _collect(run_dir, run_key, featureset, spec, res.executor, state["job_ids"], res.sacct,
                    t0, flavour)  # fmt: skip


STATE_FILE = "aif-train.json"  # the run's executor, Slurm job ids and sacct record


def _read_state(run_dir: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(read_job_text(run_dir / STATE_FILE))
        if isinstance(state, dict):
            return state
    return {}


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    write_text_local(run_dir / STATE_FILE, json.dumps(state, indent=2))


_SLURM_OUT = re.compile(r"^slurm-(\d+)\.out$")


def _collect_finished(run_dir: Path, run_key: str, fset: FeatureSet, spec: TrainingSpec,
                      executor: Executor, log: Callable[[str], None], t0: float,
                      flavour: str) -> TrainedModel:  # fmt: skip
    """A finished run's one manifest: its owner's ``trained.json`` when complete, so every
    collector gets the same record; otherwise (the owner died between the job's end and its
    record) rebuilt from the run directory: the job ids from ``aif-train.json`` or the job
    logs (``slurm-<id>.out``), the sacct record from the accounting, waited for while it is
    down. A Slurm run is never collected without its jobs and their record."""
    manifest = run_dir / "trained.json"
    with contextlib.suppress(OSError, ValueError):
        prior = TrainedModel.model_validate_json(read_job_text(manifest))
        if (
            prior.run_key == run_key
            and prior.featureset_hash == fset.content_hash()
            and (prior.executor != "slurm" or (prior.slurm_job_ids and prior.sacct))
        ):
            return prior  # fmt: skip
    state = _read_state(run_dir)
    kind = state.get("executor") or executor.kind
    job_ids = [str(j) for j in state.get("job_ids") or []]
    sacct: dict[str, str] = dict(state.get("sacct") or {})
    if kind == "slurm":
        logged = sorted(int(m.group(1)) for p in run_dir.iterdir()
                         if (m := _SLURM_OUT.match(p.name)))  # fmt: skip
        job_ids = list(dict.fromkeys([*job_ids, *(str(j) for j in logged)]))
        if not job_ids:
            raise TrainingError(f"run {run_key} in {run_dir} finished, but neither its "
                                "aif-train.json nor a slurm-<id>.out names its Slurm job: "
                                "its lineage is lost, so it is not collected (remove the "
                                "folder to train it again)")  # fmt: skip
        if not sacct.get("State"):
            record = getattr(executor, "record", None)
            if record is None:
                raise TrainingError(f"run {run_key}: job {job_ids[-1]} has no sacct record "
                                    "and no Slurm client to ask for it")  # fmt: skip
            sacct = {**record(job_ids[-1], log), "aif_jobs": ",".join(job_ids)}
            log(f"run {run_key}: recovered Slurm job(s) {', '.join(job_ids)} and the record "
                "of the last from the run directory and the accounting")  # fmt: skip
        _write_state(run_dir, {"executor": kind, "job_ids": job_ids, "sacct": sacct})
    return _collect(run_dir, run_key, fset, spec, kind, job_ids, sacct, t0, flavour)


def train_run_key(cfg: Any, account: str, fset: Any) -> str:
    """The training run's key (its folder and Slurm job name): the feature set, the training
    spec, the environment, the account and the training code (and a project's own code and
    flavour). The train flow and the dry run's plan both use this one."""
    from aifactory.tasks.core.provenance import code_hash, environment_hash, key_of

    spec = cfg.training
    return key_of(
        "train", fset.content_hash(), spec.model_dump(mode="json"), environment_hash(),
        account, code_hash("train"),
        *([project_code_hash(spec.script), cfg.mlflow.flavour] if spec.script else []),
    )  # fmt: skip
