"""`aif deploy`: the pipeline's deployments, the crashed-run detector and notifications.

1. ``prefect deploy --all`` with the repository's root ``prefect.yaml`` (one nightly
   deployment per start-up), deployed with the profile the user chose: each deployment's
   parameter ``profile`` is that profile and its work pool is ``aif-<profile>``
   (``aif-site``, whose worker `aif site up` starts; ``aif-local``, whose worker aif starts
   in the background: tasks/control/worker.py). The pool is created first if it is missing.
   The root file is the one source: ``prefect deploy --all`` at the root deploys the same
   deployments for the site, and `aif deploy` for another profile deploys a copy of it
   with only those two values changed.
2. Automations, created or replaced by name (so a redeploy never duplicates them):
   - ``aif-crashed-run-detector``: a flow run that was sending heartbeats and has sent none
     for ``CRASH_AFTER_S`` (and has not finished) is set to Crashed. Its deployment's
     concurrency slot is then free, so the next scheduled run proceeds; the Slurm jobs the
     dead run left are found by name by that run (reattached) or cancelled with it.
   - ``aif-notify-failure`` and ``aif-notify-promotion``: a failed or crashed pipeline run,
     and a model promoted to champion (event ``aif.model.promoted``), are sent to the
     profile's webhook (``notifications.webhook``, a secret kept in the block's secrets).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

from aifactory.tasks.core.errors import AifError, ConfigError
from aifactory.tasks.models.promotion import PROMOTED_EVENT

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "prefect.yaml"  # the platform's deployments (prefect deploy --all)
CRASH_AFTER_S = 75  # heartbeats come every 30 s (Prefect's minimum): 2.5 missed beats
WEBHOOK_BLOCK = "aif-notify"
FAILED_STATES = ["prefect.flow-run.Failed", "prefect.flow-run.Crashed"]
FINAL_EVENTS = [
    "prefect.flow-run.heartbeat",
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Cancelling",
    "prefect.flow-run.Crashed",
]


def work_pool_for(profile: str, startup: str | None = None, cfg: Any = None) -> str:
    """The work pool of a profile's deployments: ``aif-<name>`` (``aif-local``; a profile
    file's name without its folder and suffix); with ``prefect.work_pools: per-startup``
    (the site's) a start-up's own, ``aif-<name>-<start-up>`` (``aif-site-startup-a``)."""
    name = Path(profile).stem if profile.endswith((".yaml", ".yml")) else profile
    if cfg is not None and cfg.prefect.work_pools == "per-startup":
        return f"aif-{name}-{cfg.tenant(startup)[0]}"
    return f"aif-{name}"


def work_pools(profile: str, cfg: Any) -> dict[str, int | None]:
    """Every work pool of the profile's deployments and its concurrency limit: one pool
    (no limit) when shared; per start-up, its own with ``startups.<id>.flow_runs``."""
    if cfg.prefect.work_pools != "per-startup":
        return {work_pool_for(profile): None}
    return {work_pool_for(profile, sid, cfg): st.flow_runs for sid, st in cfg.startups.items()}


def _profile_param(profile: str) -> str:
    """The profile as a flow run on a worker finds it: a name, or a file's absolute path
    (the run works in the repository, not where `aif deploy` ran)."""
    if profile.endswith((".yaml", ".yml")) or os.sep in profile:
        return str(Path(profile).expanduser().resolve())
    return profile


def platform_deployments(profile: str = "site", cfg: Any = None) -> dict[str, Any]:
    """The root prefect.yaml as deployed for ``profile``: every deployment's ``profile``
    parameter is that profile and its work pool the profile's (``work_pool_for``: its
    start-up's own on the site); nothing else changes."""
    data: dict[str, Any] = yaml.safe_load(PREFECT_FILE.read_text())
    for d in data.get("deployments") or []:
        params = d.setdefault("parameters", {})
        params["profile"] = _profile_param(profile)
        d.setdefault("work_pool", {})["name"] = work_pool_for(profile, params.get("startup"),
                                                              cfg)  # fmt: skip
    return data


def _failure_line(output: str) -> str:
    """Prefect's error (its exception message, however the console wrapped it), one line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b:?", lines[i]):
            return " ".join(lines[i:])[:800]
    return " ".join(lines[-3:])[:800] if lines else "no output"


def deploy_all(api_url: str, progress: Callable[[str], None] = print, *,
               profile: str = "site") -> str:  # fmt: skip
    """Deploy the root prefect.yaml's deployments to ``api_url`` for ``profile`` (parameter
    ``profile``, the profile's work pools, created if missing, with their concurrency
    limits) with ``prefect deploy --all`` in the repository root; return its output."""
    from aifactory.tasks.control.worker import ensure_work_pool
    from aifactory.tasks.core.config import load_profile

    cfg = load_profile(profile)
    pools = work_pools(profile, cfg)
    for name, limit in pools.items():
        if ensure_work_pool(api_url, name, limit):
            progress(f"created the process work pool {name}")
    pool = ", ".join(pools)
    data = platform_deployments(profile, cfg)
    prefect = str(Path(sys.executable).with_name("prefect"))
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}
    with tempfile.TemporaryDirectory(prefix="aif-deploy-") as tmp:
        prefect_file = PREFECT_FILE
        if data != yaml.safe_load(PREFECT_FILE.read_text()):  # another profile: a copy
            prefect_file = Path(tmp) / "prefect.yaml"
            prefect_file.write_text(f"# {PREFECT_FILE} for profile {profile}\n"
                                    + yaml.safe_dump(data, sort_keys=False))  # fmt: skip
        cmd = [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
        progress(f"prefect deploy --all ({PREFECT_FILE.relative_to(REPO)}, profile {profile}, "
                 f"work pool {pool}) -> {api_url}")  # fmt: skip
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=600)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise AifError("prefect deploy --all did not finish within 600 s") from None
    if proc.returncode != 0:
        raise AifError(f"prefect deploy --all failed with exit code {proc.returncode}: "
                       f"{_failure_line(proc.stderr + proc.stdout)}")  # fmt: skip
    return proc.stdout


def webhook_url(spec: str | None) -> str | None:
    """The webhook URL from ``env:VAR``, ``prefect-secret:BLOCK`` or ``file:PATH``."""
    if not spec:
        return None
    if spec.startswith("env:"):
        return os.environ.get(spec[4:]) or None
    if spec.startswith("file:"):
        path = Path(spec[5:]).expanduser()
        return path.read_text().strip() or None if path.exists() else None
    if spec.startswith("prefect-secret:"):
        from prefect.blocks.system import Secret

        secret: Any = Secret.load(spec.split(":", 1)[1])
        return str(secret.get())
    raise ConfigError("notifications.webhook: give the URL as env:VAR, prefect-secret:BLOCK "
                      "or file:PATH (it is a secret, not a profile value)")  # fmt: skip


def _replace(client: Any, automation: Any) -> None:
    for old in client.read_automations_by_name(automation.name):
        client.delete_automation(old.id)
    client.create_automation(automation)


CRASH_DETECTOR = "aif-crashed-run-detector"


def crash_detector() -> Any:
    """The automation that marks a flow run Crashed when its heartbeats stop (its process
    or its worker died): on the site from `aif site up` on, replaced by `aif deploy`."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=CRASH_DETECTOR,
        description=f"A flow run with no heartbeat for {CRASH_AFTER_S} s is Crashed: its "
        "process or its worker died",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect=set(FINAL_EVENTS),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=CRASH_AFTER_S),
        ),
        actions=[
            ChangeFlowRunState(
                name=None,
                force=False,
                state=StateType.CRASHED,
                message=f"no heartbeat for {CRASH_AFTER_S} s: the flow run's process or "
                f"its worker died ({CRASH_DETECTOR})",
            )
        ],
    )


def ensure_crash_detector(client: Any) -> bool:
    """Create the crash detector unless the server has it; True when it was created."""
    if client.read_automations_by_name(CRASH_DETECTOR):
        return False
    client.create_automation(crash_detector())
    return True


def ensure_automations(webhook: str | None, progress: Callable[[str], None] = print) -> list[str]:
    """Create (or replace) the crash detector and, with a webhook, the notifications."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.types import SecretDict

    made: list[str] = []
    with get_client(sync_client=True) as client:
        crash = crash_detector()
        _replace(client, crash)
        made.append(crash.name)
        if not webhook:
            progress("notifications: no webhook configured (notifications.webhook): skipped")
            return made
        block = CustomWebhookNotificationBlock(
            name="aifactory",
            url="{{webhook_url}}",
            method="POST",
            json_data={"subject": "{{subject}}", "body": "{{body}}", "source": "{{name}}"},
            headers=None,
            cookies=None,
            secrets=SecretDict({"webhook_url": webhook}),
        )
        block_id = UUID(str(block.save(WEBHOOK_BLOCK, overwrite=True)))

        def notify(
            name: str,
            description: str,
            match: dict[str, str | list[str]],
            expect: set[str],
            subject: str,
            body: str,
            related: dict[str, str | list[str]] | None = None,
        ) -> Any:
            """An automation that sends one notification per matching event."""
            return AutomationCore(
                name=name,
                description=description,
                trigger=EventTrigger(
                    match=match,
                    match_related=related or {},
                    expect=expect,
                    posture=Posture.Reactive,
                    threshold=1,
                    within=timedelta(0),
                ),
                actions=[SendNotification(block_document_id=block_id, subject=subject, body=body)],
            )

        failure = notify(
            "aif-notify-failure",
            "A pipeline run failed or crashed: tell the operators",
            {"prefect.resource.id": "prefect.flow-run.*"},
            set(FAILED_STATES),
            "aifactory: pipeline run {{ flow_run.name }} is {{ flow_run.state.name }}",
            "Flow run {{ flow_run.name }} ({{ flow_run.id }}) of deployment "
            "{{ deployment.name }} ended {{ flow_run.state.name }}: {{ flow_run.state.message }}",
            related={"prefect.resource.role": "flow", "prefect.resource.name": "aif-pipeline"},
        )
        promoted = notify(
            "aif-notify-promotion",
            "A model version became the champion: tell the operators",
            {"prefect.resource.id": "aif.model.*"},
            {PROMOTED_EVENT},
            "aifactory: {{ event.resource.get('aif.model.name') }} version "
            "{{ event.resource.get('aif.model.version') }} promoted to champion",
            "{{ event.payload.get('reason') }}",
        )
        for a in (failure, promoted):
            _replace(client, a)
            made.append(a.name)
    return made


# -- a start-up's own project -----------------------------------------------------------------
ENTRYPOINT = "aifactory.flows.pipeline:pipeline"  # the platform's pipeline, by module


def _git(folder: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"git in {folder}: {exc}") from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"git {' '.join(args)} in {folder}: {why}")
    return out.stdout.strip()


def project_source(project_file: Path) -> dict[str, str]:
    """Where a deployment pulls the project from: its git repository (the ``origin`` remote,
    else the repository's own folder) at the commit checked out now, and the project file's
    path inside it. Refused while the project's folder has uncommitted changes: a nightly
    run must train exactly a commit."""
    folder = project_file.parent
    top = Path(_git(folder, "rev-parse", "--show-toplevel"))
    dirty = _git(folder, "status", "--porcelain", "--", ".")
    if dirty:
        first = dirty.splitlines()[0].split(maxsplit=1)[-1]  # " M path" or "?? path"
        raise ConfigError(f"project {folder}: uncommitted changes ({first}): commit them, so "
                          "that the deployment pins the code it runs")  # fmt: skip
    try:
        repo = _git(folder, "remote", "get-url", "origin")
    except ConfigError:
        repo = str(top)
    return {"repository": repo, "commit": _git(folder, "rev-parse", "HEAD"),
            "project": project_file.resolve().relative_to(top.resolve()).as_posix()}  # fmt: skip


def deploy_project(project_file: Path, api_url: str, *, work_pool: str | None = None,
                   src: dict[str, str] | None = None,
                   profile: str | None = None) -> str:  # fmt: skip
    """Create or replace the project's nightly deployment: the platform's pipeline on the
    project, pulled from its git repository at the pinned commit (Prefect pull steps), run by
    the worker of the profile's pool as the project's start-up; one run at a time.
    ``profile``: the profile its runs use (default: the project's ``deploy.profile``), and
    so its pool ``aif-<profile>`` unless ``work_pool`` is given (created if missing).
    ``src``: the project's :func:`project_source`, if the caller already has it. Returns
    its name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.callables import parameter_schema

    from aifactory.flows.pipeline import pipeline
    from aifactory.tasks.control.worker import ensure_work_pool
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.core.project import load_project

    proj = load_project(project_file)
    src = src or project_source(project_file)
    profile = profile or proj.deploy.profile
    cfg = load_profile(profile)
    limit = None
    if not work_pool:
        work_pool = work_pool_for(profile, proj.startup, cfg)
        limit = work_pools(profile, cfg).get(work_pool)
    ensure_work_pool(api_url, work_pool, limit)
    name = f"{proj.name}-nightly"
    pull = [
        {"prefect.deployments.steps.git_clone": {
            "id": "clone", "repository": src["repository"], "commit_sha": src["commit"]}},
        {"prefect.deployments.steps.set_working_directory": {
            "directory": "{{ clone.directory }}"}},
    ]  # fmt: skip
    params = {"profile": _profile_param(profile), "startup": proj.startup,
              "project": src["project"], "promote": proj.deploy.promote}  # fmt: skip
    schedules = []
    if proj.deploy.schedule:
        schedules = [DeploymentScheduleCreate(schedule=CronSchedule(
            cron=proj.deploy.schedule, timezone=proj.deploy.timezone))]  # fmt: skip
    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(pipeline.name)
        client.create_deployment(
            flow_id=flow_id, name=name, entrypoint=ENTRYPOINT, work_pool_name=work_pool,
            parameters=params, parameter_openapi_schema=parameter_schema(pipeline).model_dump(),
            pull_steps=pull, schedules=schedules, concurrency_limit=1,
            concurrency_options=ConcurrencyOptions(
                collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
            description=f"{proj.description or proj.name}: {src['repository']} at "
            f"{src['commit'][:12]}",
            tags=[f"startup:{proj.startup}", f"project:{proj.name}"],
        )  # fmt: skip
    return f"{pipeline.name}/{name}"
