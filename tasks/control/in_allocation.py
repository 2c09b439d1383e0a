"""`aif run --in-allocation`: the whole flow run as one Slurm job on a compute node.

For a start-up whose site gives it no long-running process on the login node: the login
side only submits the job and follows it (and may go away: the run does not depend on it);
ingest, preprocessing (Dask inside the allocation), training (a process of the allocation,
on its GPU) and registration all run in the job, as the start-up's own Unix user. The
compute nodes cannot connect to Prefect or MLflow, so the job talks to a node-local endpoint
that passes every call through files to the site's relay (tasks/control/relay.py): the
operator sees the run in the Prefect UI as usual, tagged ``startup:<id>`` and
``in-allocation``, and the model version is the start-up's own in MLflow.

The job's folder ``<runs_dir>/flows/<key>/`` (the start-up's, mode 700) holds its script,
its profile (``profile.yaml``: the site profile with the start-up's temporary object-store
credentials, Dask and training inside the allocation, Prefect and MLflow at the endpoint; no
site secret), the pipeline's run folders and ``result.json``. The relay's spool of the run
is removed when the job has ended.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from aifactory.tasks.control.prefect_server import CLIENT_MAX_RETRIES
from aifactory.tasks.core.config import Profile, _walltime_s, profile_path
from aifactory.tasks.core.errors import ConfigError, TrainingError

TEMPLATE = Path(__file__).resolve().parents[2] / "infra" / "templates" / "flow.sbatch"
RESULT = "result.json"
TAG = "in-allocation"


def job_profile(cfg: Profile, sid: str, profile_ref: str, job_dir: Path) -> dict[str, Any]:
    """The profile the job loads: the site's profile file, with what differs inside the
    allocation (its run folders and state in the job's folder, which the start-up owns).
    Only the start-up's own credentials are in it (temporary ones, from its key), never the
    platform's or another start-up's."""
    spec = cfg.allocation
    assert spec is not None
    store: dict[str, Any] | None = None
    if cfg.object_store is not None:
        store = {"tenant_keys": None}
        if cfg.object_store.tenant_keys:
            from aifactory.tasks.doors.s3_identity import session

            s = session(cfg.object_store.tenant_keys, sid, cfg.object_store.endpoint_url,
                        cfg.object_store.region, _walltime_s(spec.time_limit) + 1800)  # fmt: skip
            store.update(key=s.access_key, secret=s.secret_key, token=s.token)
    mlflow: dict[str, Any] = {"tracking_uri": "${AIF_RELAY_URL}/mlflow", "registry_uri": None,
                              "tenant_credentials": None,
                              "experiment": cfg.registry_for(sid).run_experiment}  # fmt: skip
    doc: dict[str, Any] = {
        "extends": str(profile_path(profile_ref).resolve()),
        "name": cfg.name,
        "home_dir": str(job_dir / "home"),
        "runs_dir": str(job_dir / "runs"),
        "description": f"{cfg.description} (inside an allocation)".strip(),
        # Already the start-up's user: no sbatch --uid, no runuser.
        "startups": {s: {"user": None} for s in cfg.startups},
        "dask": {"kind": "local", "workers": spec.cpus, "cores": 1, "processes": 1},
        "training": {"executor": "local"},
        "mlflow": mlflow,
        "prefect": {"api_url": "${AIF_RELAY_URL}/prefect/api"},
        "allocation": None,
    }
    if store is not None:
        doc["object_store"] = store
    return doc


# AIF_<SECTION>__<KEY> variables of the submitting process that the job gets too (the same
# precedence there: above the profile file, below flags and the project), except secrets and
# what the job's profile sets itself.
_NOT_PASSED = ("object_store", "mlflow", "prefect", "startups", "allocation", "notifications",
               "slurm", "runs_dir", "home_dir", "dataspace.pseudonymisation_key", "dask.kind",
               "dask.workers", "dask.cores", "dask.processes", "training.executor")  # fmt: skip


def passed_env(environ: dict[str, str]) -> dict[str, str]:
    """The profile variables of ``environ`` that the flow's job gets (``_NOT_PASSED``)."""
    out = {}
    for name, value in environ.items():
        if not name.startswith("AIF_") or "__" not in name:
            continue
        dotted = ".".join(part.lower() for part in name[4:].split("__"))
        if any(dotted == n or dotted.startswith(n + ".") for n in _NOT_PASSED):
            continue
        out[name] = value
    return out


def _ids(user: str) -> tuple[int, int]:
    try:
        return pwd.getpwnam(user).pw_uid, grp.getgrnam(user).gr_gid
    except KeyError:
        raise ConfigError(f"start-up Unix user {user!r} does not exist on this host (the "
                          "site makes one per start-up; startups.<id>.user)") from None  # fmt: skip


def run_in_allocation(cfg: Profile, sid: str, profile_ref: str, overrides: dict[str, Any] | None,
                      project: str | None, log: Any = print) -> dict[str, Any]:  # fmt: skip
    """Submit the flow's job, follow it to its end (requeues included) and return its
    ``result.json``. Raises ConfigError before anything is made when the profile offers no
    allocation or the process cannot hand the job to the start-up's user."""
    from aifactory.tasks.control.relay import Grant, make_spool, relay_alive, remove_spool
    from aifactory.tasks.core.jobfiles import read_job_text
    from aifactory.tasks.doors.slurm import SlurmClient
    from aifactory.tasks.jobs.executors import JobRequest, SlurmExecutor
    from aifactory.tasks.stages.training import fill_template

    spec = cfg.allocation
    if spec is None:
        raise ConfigError(f"aif run --in-allocation: profile {cfg.name} has no allocation "
                          "section (a site with the relay: see the site profile)")  # fmt: skip
    st = cfg.startups[sid]
    if not st.user:
        raise ConfigError(f"aif run --in-allocation: start-up {sid} has no Unix user "
                          "(startups.<id>.user): the flow's job runs as the start-up")  # fmt: skip
    if os.geteuid() != 0:
        raise ConfigError(
            "aif run --in-allocation: the site's orchestrator (root) submits "
            "the flow's job as the start-up's user, and makes its spool"
        )
    relay_dir = Path(spec.relay_dir)
    if not relay_alive(relay_dir):
        raise ConfigError(f"aif run --in-allocation: the site's relay does not answer in "
                          f"{relay_dir} (aif site up starts it)")  # fmt: skip
    uid, gid = _ids(st.user)
    key = f"{sid}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    flows = Path(cfg.runs_dir) / "flows"
    flows.mkdir(parents=True, exist_ok=True)
    os.chmod(flows, 0o711)  # only root makes the jobs' folders in it
    job_dir = flows / key
    job_dir.mkdir(mode=0o700)
    profile_doc = job_profile(cfg, sid, profile_ref, job_dir)
    fd = os.open(job_dir / "profile.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# The flow job's profile (tasks/control/in_allocation.py): the start-up's "
                 "own temporary credentials; mode 600.\n")  # fmt: skip
        yaml.safe_dump(profile_doc, fh, sort_keys=False)
    # The Prefect UI of the login side: the links in the run's logs point there, not at the
    # job's own endpoint.
    ui = cfg.prefect.api_url.rstrip("/").removesuffix("/api")
    args = {
        "startup": sid,
        "overrides": overrides or {},
        "project": project,
        "ui_url": ui,
        "env": passed_env(dict(os.environ)),
    }
    (job_dir / "args.json").write_text(json.dumps(args))
    name = f"aif-flow-{key}"
    spool = make_spool(relay_dir, key, Grant(key, sid, st.user, sid, name), uid, gid)
    from aifactory.tasks.core.home import site_address, site_dir

    script = fill_template(TEMPLATE, {
        "key": key, "job_name": name, "account": st.account, "partition": spec.partition,
        "gres_line": f"#SBATCH --gres=gpu:{spec.gpus}\n" if spec.gpus else "",
        "cpus": spec.cpus, "mem_gb": spec.mem_gb, "time_limit": spec.time_limit,
        "home_sh": shlex.quote(cfg.home_dir), "site_sh": shlex.quote(str(site_dir())),
        "site_addr_sh": shlex.quote(site_address()),
        "job_dir_sh": shlex.quote(str(job_dir)), "spool_sh": shlex.quote(str(spool)),
        "python_sh": shlex.quote(sys.executable),
    })  # fmt: skip
    script_path = job_dir / "flow.sbatch"
    script_path.write_text(script)
    log(f"flow job {name}: the pipeline runs in an allocation ({spec.partition}, "
        f"{spec.cpus} CPUs, {spec.gpus} GPU(s), {spec.time_limit}); Prefect and MLflow through "
        f"the relay ({spool})")  # fmt: skip
    # As the start-up's user (sbatch --uid; the job's folder handed to it), with none of
    # this process's credentials in the job's environment: its own are in profile.yaml.
    slurm = SlurmClient(env={"SLURM_CONF": cfg.slurm.conf} if cfg.slurm.conf else {},
                        bin_dir=cfg.slurm.bin_dir, run_as=st.user)  # fmt: skip
    executor = SlurmExecutor(slurm, poll_seconds=1.0, max_resubmits=2)
    failed: TrainingError | None = None
    try:
        res = executor.run(JobRequest(name=name, run_dir=job_dir, script_path=script_path,
                                      command=[], log=log))  # fmt: skip
    except TrainingError as exc:  # the job ended: its spool goes
        failed = exc
    except KeyboardInterrupt:  # the watcher cancelled the job with it
        remove_spool(spool)
        raise
    except Exception:  # Slurm did not answer: the job may still run and needs its spool
        log(f"flow job {name}: left running; its relay spool {spool} stays until it ends")
        raise
    remove_spool(spool)
    try:
        out = json.loads(read_job_text(job_dir / RESULT, limit=1 << 20))
    except (OSError, ValueError) as exc:
        if failed is not None:  # the job ended before the flow could say why
            raise TrainingError(str(failed).replace("training job", "flow job", 1)) from None
        raise TrainingError(f"flow job {name} ended without a readable {job_dir / RESULT} "
                            f"({exc})") from None  # fmt: skip
    out = dict(out) if isinstance(out, dict) else {}
    out["job_dir"] = str(job_dir)
    if failed is None:
        out["job_ids"] = res.job_ids
        out["node"] = res.sacct.get("NodeList", "")
    return out


# -- inside the job ------------------------------------------------------------------------------
def job_main(spool: Path, job_dir: Path) -> int:
    """The flow run in the allocation: the endpoint up, the pipeline run against it, its
    events and logs delivered, ``result.json`` written."""
    from aifactory.tasks.control.relay import start_endpoint

    endpoint = start_endpoint(spool)
    os.environ["AIF_RELAY_URL"] = endpoint.url
    os.environ["PREFECT_API_URL"] = f"{endpoint.url}/prefect/api"
    # The endpoint answers only calls with the job's token (another job may share the node).
    os.environ["PREFECT_API_AUTH_STRING"] = ":".join(endpoint.auth)
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = endpoint.auth
    os.environ["PREFECT_HOME"] = str(job_dir / ".prefect")
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", CLIENT_MAX_RETRIES)  # outages
    args = json.loads((job_dir / "args.json").read_text())
    os.environ.update({str(k): str(v) for k, v in dict(args.get("env") or {}).items()})
    if args.get("ui_url"):
        os.environ["PREFECT_UI_URL"] = str(args["ui_url"])
    result: dict[str, Any] = {"state": "FAILED"}
    code = 1
    try:
        from prefect import tags

        from aifactory.flows.pipeline import pipeline
        from aifactory.tasks.control.prefect_runs import run_tags
        from aifactory.tasks.core.config import load_profile

        profile = str(job_dir / "profile.yaml")
        cfg = load_profile(profile)
        with tags(*run_tags(args["startup"], cfg.name), TAG):
            state = pipeline(profile=profile, startup=args["startup"],
                             overrides=args["overrides"] or None, project=args["project"],
                             return_state=True)  # fmt: skip
        result["flow_run_id"] = str(state.state_details.flow_run_id)
        result["state"] = state.type.value
        if state.is_completed():
            result["model_uri"] = state.result()
            code = 0
        else:
            try:
                state.result()
            except Exception as exc:
                result["error"] = str(exc)[:1200]
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {str(exc)[:1200]}"
        print(f"aif: flow job failed: {result['error']}", flush=True)
    finally:
        _deliver()
        endpoint.drain()
        tmp = job_dir / f".{RESULT}.tmp"
        tmp.write_text(json.dumps(result))
        os.replace(tmp, job_dir / RESULT)
        endpoint.stop()
    return code


def _deliver() -> None:
    """Send Prefect's queued logs and events to the endpoint before the job ends."""
    import contextlib

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=60)


if __name__ == "__main__":
    raise SystemExit(job_main(Path(sys.argv[1]), Path(sys.argv[2])))
