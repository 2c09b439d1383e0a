"""`aif sweep`: a hyperparameter search submitted as one Slurm job array.

Trials come from a grid (every combination) or a random search (seeded, so the same
trials every time). Each trial gets its own run directory with its config; one sbatch
call submits them all as ``--array=0-(N-1)%M`` (at most M running at once), each task a
checkpointing training payload. The watcher follows the array until every task ended,
then reads each trial's metrics: the best by the validation metric is chosen and every
trial (parameters, state, metrics) is recorded in ``sweep.json``. A thousand trials cost
one sbatch call and one squeue per poll.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aifactory.tasks.config import TrainingSpec
from aifactory.tasks.errors import ConfigError, TrainingError
from aifactory.tasks.lake import write_text_local
from aifactory.tasks.manifests import FeatureSet
from aifactory.tasks.provenance import key_of
from aifactory.tasks.slurm import TERMINAL_STATES, SlurmClient
from aifactory.tasks.training import HYPERPARAMS, _launcher, fill_template, job_values

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "templates" / "sweep.sbatch"
TUNABLE = ("lr", "batch_size", "hidden", "epochs", "seed")


def parse_value(name: str, text: str) -> Any:
    """``hidden=64x32`` -> [64, 32]; numbers as numbers."""
    if name == "hidden":
        return [int(x) for x in text.split("x")]
    if name in ("batch_size", "epochs", "seed"):
        return int(text)
    return float(text)


def grid_trials(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    for name in grid:
        if name not in TUNABLE:
            raise ConfigError(f"sweep: {name!r} cannot be tuned (tunable: {', '.join(TUNABLE)})")
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
    }  # fmt: skip
    return fill_template(TEMPLATE, values)


def _array_states(slurm: SlurmClient, job: str) -> dict[int, dict[str, str]]:
    """Per array task: State, ExitCode, Elapsed (from sacct; pending tasks may be absent)."""
    found: dict[int, dict[str, str]] = {}
    for rec in slurm.sacct(("JobID", "State", "ExitCode", "Elapsed"), jobs=[job]):
        jid = rec["JobID"]
        if "_" not in jid or "[" in jid:
            continue
        found[int(jid.split("_", 1)[1])] = {
            "State": rec["State"], "ExitCode": rec["ExitCode"], "Elapsed": rec["Elapsed"]
        }  # fmt: skip
    return found


def run_sweep(
    trials: list[dict[str, Any]], *, spec: TrainingSpec, account: str, featureset: FeatureSet,
    runs_dir: str, slurm: SlurmClient, max_parallel: int, metric: str = "val_rmse",
    log: Callable[[str], None] = print, poll_s: float = 2.0, timeout_s: float = 3600,
) -> dict[str, Any]:  # fmt: skip
    if not trials:
        raise ConfigError("sweep: no trials (give --grid NAME=V1,V2 or --random N)")
    base = {k: getattr(spec, k) for k in HYPERPARAMS}
    sweep_key = key_of("sweep", featureset.content_hash(), base, trials, account)
    sweep_dir = Path(runs_dir) / "sweeps" / sweep_key
    sweep_dir.mkdir(parents=True, exist_ok=True)
    fs_path = sweep_dir / "featureset.json"
    write_text_local(fs_path, featureset.to_json())
    for i, t in enumerate(trials):
        write_text_local(sweep_dir / f"trial-{i:04d}" / "config.json",
                         json.dumps({**base, **t}, indent=2))  # fmt: skip
    job_name = f"aif-sweep-{sweep_key}"
    script = render_array(spec, account=account, job_name=job_name, sweep_key=sweep_key,
                          sweep_dir=str(sweep_dir), featureset_path=str(fs_path),
                          n_trials=len(trials), max_parallel=max_parallel)  # fmt: skip
    script_path = sweep_dir / "sweep.sbatch"
    write_text_local(script_path, script)
    live = slurm.jobs_named(job_name)
    job = live[0] if live else slurm.submit(str(script_path))
    log(f"{'reattached to' if live else 'submitted'} job array {job}: {len(trials)} trials, "
        f"at most {max_parallel} at once (one sbatch call)")  # fmt: skip
    deadline = time.monotonic() + timeout_s
    states: dict[int, dict[str, str]] = {}
    last_summary = ""
    while True:
        queued = slurm.squeue_states([job])
        states = _array_states(slurm, job)
        done = sum(1 for s in states.values() if s["State"] in TERMINAL_STATES)
        summary = f"{done}/{len(trials)} trials ended"
        if summary != last_summary:
            log(summary)
            last_summary = summary
        if not queued and done == len(trials):
            break
        if time.monotonic() > deadline:
            slurm.cancel([job])
            raise TrainingError(
                f"sweep {sweep_key}: job array {job} did not end in {timeout_s:.0f}s"
            )
        time.sleep(poll_s)
    results: list[dict[str, Any]] = []
    for i, t in enumerate(trials):
        mpath = sweep_dir / f"trial-{i:04d}" / "metrics.json"
        metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
        st = states.get(i, {"State": "UNKNOWN"})
        results.append({"trial": i, "params": t, "state": st["State"],
                        "elapsed": st.get("Elapsed", ""), metric: metrics.get(metric),
                        "test_rmse": metrics.get("test_rmse"), "job": f"{job}_{i}"})  # fmt: skip
    ok = [r for r in results if r["state"] == "COMPLETED" and r[metric] is not None]
    if not ok:
        raise TrainingError(f"sweep {sweep_key}: no trial completed (job array {job}); see "
                            f"{sweep_dir}/slurm-{job}_*.out")  # fmt: skip
    best = min(ok, key=lambda r: float(r[metric]))
    record = {
        "sweep_key": sweep_key, "job_array": job, "metric": metric, "best": best,
        "trials": results, "sweep_dir": str(sweep_dir), "sbatch_calls": 0 if live else 1,
    }  # fmt: skip
    write_text_local(sweep_dir / "sweep.json", json.dumps(record, indent=2))
    log(f"best trial {best['trial']}: {metric}={best[metric]:.4f} with {best['params']} "
        f"({len(ok)}/{len(trials)} trials completed)")  # fmt: skip
    return record
