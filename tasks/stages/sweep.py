"""`aif sweep`: a hyperparameter search as one job array of the job layer.

Trials come from a grid (every combination) or a random search (seeded, so the same
trials every time). Each trial gets its own folder with its config (the training config
with the trial's values over it); the executor runs them as one array: on Slurm one sbatch
call submits ``--array=0-(N-1)%M`` (at most M running at once), watched by the one
watcher (admission, reattachment, resubmission, cancellation); locally, up to M child
processes. A trial is the same trainer as the pipeline's (the reference tabular payload
or the project's own script, copied once for the whole sweep), checkpointing in its
folder. Then each trial's metrics are read, the best by the chosen metric is kept, and
every trial (parameters, state, metrics) is recorded in ``sweep.json``. A thousand trials
cost one sbatch call and one squeue and one sacct per poll.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shlex
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aifactory.tasks.core.config import TrainingSpec
from aifactory.tasks.core.errors import ConfigError, TrainingError
from aifactory.tasks.core.jobfiles import read_job_text, write_job_file
from aifactory.tasks.core.manifests import FeatureSet
from aifactory.tasks.core.provenance import key_of
from aifactory.tasks.doors.lake import write_text_local
from aifactory.tasks.jobs.executors import Executor, JobRequest
from aifactory.tasks.stages.training import (
    _launcher,
    _target,
    copy_project_code,
    fill_template,
    job_values,
    project_code_hash,
    run_config,
)

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "templates" / "sweep.sbatch"
TUNABLE = ("lr", "batch_size", "hidden", "epochs", "seed")  # the reference payload's


def parse_value(name: str, text: str, own_script: bool = False) -> Any:
    """``hidden=64x32`` -> [64, 32]; numbers as numbers. A project's own config value is
    read as JSON (numbers, true/false, lists), else kept as the string."""
    if own_script:
        try:
            return json.loads(text)
        except ValueError:
            return text
    try:
        if name == "hidden":
            return [int(x) for x in text.split("x")]
        if name in ("batch_size", "epochs", "seed"):
            return int(text)
        return float(text)
    except ValueError:
        raise ConfigError(f"sweep: {name}={text!r} is not a valid value for {name}") from None


def grid_trials(grid: dict[str, list[Any]], own_script: bool = False) -> list[dict[str, Any]]:
    """Every combination. The reference payload tunes only its own hyperparameters; a
    project's script gets any name (it lands in ``job.config``)."""
    for name in grid:
        if not own_script and name not in TUNABLE:
            raise ConfigError(f"sweep: {name!r} cannot be tuned (tunable: {', '.join(TUNABLE)})")
        if own_script and not name.isidentifier():
            raise ConfigError(f"sweep: {name!r} is not a config key (letters, digits, _)")
    names = sorted(grid)
    return [
        dict(zip(names, combo, strict=True))
        for combo in itertools.product(*(grid[n] for n in names))
    ]


def random_trials(space: dict[str, tuple[float, float]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` trials, each parameter log-uniform in its [low, high] (lr) or uniform."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        trial: dict[str, Any] = {}
        for name, (lo, hi) in sorted(space.items()):
            if name == "lr":
                trial[name] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            elif name in ("batch_size", "epochs"):
                trial[name] = int(rng.randint(int(lo), int(hi)))
            else:
                raise ConfigError(f"sweep: random search over {name!r} is not supported")
        out.append(trial)
    return out


def render_array(spec: TrainingSpec, *, account: str, job_name: str, sweep_key: str,
                 sweep_dir: str, featureset_path: str, n_trials: int, max_parallel: int,
                 python: str = sys.executable) -> str:  # fmt: skip
    values = {
        **job_values(spec),
        "sweep_key": sweep_key, "job_name": job_name, "account": account,
        "last": n_trials - 1, "max_parallel": max(1, max_parallel),
        "sweep_dir": sweep_dir, "sweep_dir_sh": shlex.quote(sweep_dir),
        "featureset_sh": shlex.quote(featureset_path),
        "signal_s": spec.signal_before_end_s,
        "launcher": _launcher(spec, sweep_dir), "python": shlex.quote(python),
        "target": " ".join(shlex.quote(a) for a in _target(spec, sweep_dir)),
    }  # fmt: skip
    return fill_template(TEMPLATE, values)


def run_sweep(
    trials: list[dict[str, Any]], *, spec: TrainingSpec, account: str, featureset: FeatureSet,
    runs_dir: str, executor: Executor, max_parallel: int, metric: str = "val_rmse",
    higher_is_better: bool = False, log: Callable[[str], None] = print,
    cancel_event: threading.Event | None = None, admit: Callable[[], str] | None = None,
    env: dict[str, str] | None = None, python: str = sys.executable,
) -> dict[str, Any]:  # fmt: skip
    if not trials:
        raise ConfigError("sweep: no trials (give --grid NAME=V1,V2 or --random N)")
    if max_parallel < 1:
        raise ConfigError(f"sweep: --max-parallel must be at least 1, got {max_parallel}")
    base = run_config(spec)
    code = project_code_hash(spec.script) if spec.script else ""
    sweep_key = key_of("sweep/2", featureset.content_hash(), base, trials, account, code,
                       spec.script and Path(spec.script).name)  # fmt: skip
    sweep_dir = Path(runs_dir) / "sweeps" / sweep_key
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fs_path = sweep_dir / "featureset.json"
    write_text_local(fs_path, featureset.to_json())
    if spec.script:
        copy_project_code(spec.script, sweep_dir)
    for i, t in enumerate(trials):
        # The sweep's folder is the start-up's once its jobs ran: never through its links.
        write_job_file(sweep_dir / f"trial-{i:04d}" / "config.json",
                       json.dumps({**base, **t}, indent=2, sort_keys=True).encode(),
                       under=sweep_dir)  # fmt: skip
    job_name = f"aif-sweep-{sweep_key}"
    script = render_array(spec, account=account, job_name=job_name, sweep_key=sweep_key,
                          sweep_dir=str(sweep_dir), featureset_path=str(fs_path),
                          n_trials=len(trials), max_parallel=max_parallel,
                          python=python)  # fmt: skip
    script_path = sweep_dir / "sweep.sbatch"
    write_text_local(script_path, script)
    target = _target(spec, str(sweep_dir))

    def task(i: int) -> tuple[Path, list[str]]:
        folder = sweep_dir / f"trial-{i:04d}"
        return folder, [python, *target, "--featureset", str(fs_path), "--run-dir",
                        str(folder), "--config", str(folder / "config.json")]  # fmt: skip

    req = JobRequest(job_name, sweep_dir, script_path, [], env or {}, log, cancel_event, admit,
                     task)  # fmt: skip
    res = executor.run_array(req, len(trials), max_parallel)
    first = res.job_ids[0] if res.job_ids else res.executor
    results: list[dict[str, Any]] = []
    for i, t in enumerate(trials):
        mpath = sweep_dir / f"trial-{i:04d}" / "metrics.json"
        metrics = json.loads(read_job_text(mpath, under=sweep_dir)) if mpath.exists() else {}
        st = res.tasks.get(i, {"State": "UNKNOWN"})
        value = metrics.get(metric)
        results.append({"trial": i, "params": t, "state": st["State"],
                        "elapsed": st.get("Elapsed", ""), metric: value,
                        "job": st.get("JobID", f"{first}_{i}"),
                        "metrics": {k: v for k, v in metrics.items()
                                    if isinstance(v, int | float)}})  # fmt: skip
    ok = [r for r in results if r["state"] == "COMPLETED" and _finite(r[metric])]
    if not ok:
        where = f"job array {first}; see {sweep_dir}/slurm-{first}_*.out" if res.job_ids \
            else f"logs in {sweep_dir}/trial-*/local.out"  # fmt: skip
        raise TrainingError(f"sweep {sweep_key}: no trial completed with a finite {metric} "
                            f"({where})")  # fmt: skip
    pick = max if higher_is_better else min
    best = pick(ok, key=lambda r: float(r[metric]))
    record = {
        "sweep_key": sweep_key, "executor": res.executor, "job_array": first,
        "job_ids": res.job_ids, "metric": metric, "higher_is_better": higher_is_better,
        "best": best, "trials": results, "sweep_dir": str(sweep_dir),
    }  # fmt: skip
    write_text_local(sweep_dir / "sweep.json", json.dumps(record, indent=2))
    log(f"best trial {best['trial']}: {metric}={best[metric]:.4f} with {best['params']} "
        f"({len(ok)}/{len(trials)} trials completed)")  # fmt: skip
    return record


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
