"""The platform's deployments (issue 16): one root prefect.yaml, as Prefect's docs lay a
project out, deployed by `aif deploy` with the profile the user chose."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from aifactory.deployments import deploy as dp
from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.errors import AifError, ConfigError

REPO = Path(__file__).resolve().parents[2]


def _root() -> dict[str, Any]:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_one_root_prefect_yaml_is_the_source_of_aif_deploy() -> None:
    assert dp.PREFECT_FILE == REPO / "prefect.yaml" and dp.PREFECT_FILE.exists()
    # one source: no second copy that could drift
    assert not (REPO / "deployments" / "prefect.yaml").exists()
    assert dp.platform_deployments("site", load_profile("site")) == _root()


def test_the_root_file_works_from_the_repository_root() -> None:
    """Entrypoints relative to the root; the pull step makes the folder the deploy ran in
    (the root, recorded by the build step) the flow run's working directory."""
    data = _root()
    names = [d["name"] for d in data["deployments"]]
    assert names == ["startup-a-nightly", "startup-b-nightly"]
    for d in data["deployments"]:
        path, _, func = d["entrypoint"].partition(":")
        assert (REPO / path).is_file() and f"def {func}(" in (REPO / path).read_text()
        project = d["parameters"].get("project")
        assert project is None or (REPO / project).is_file()
    (build,) = data["build"]
    step = build["prefect.deployments.steps.run_shell_script"]
    assert step["script"] == "pwd" and step["id"] == "checkout"
    (pull,) = data["pull"]
    assert pull == {"prefect.deployments.steps.set_working_directory":
                    {"directory": "{{ checkout.stdout }}"}}  # fmt: skip


@pytest.mark.parametrize("profile", ["local", "site"])
def test_aif_deploy_and_the_root_file_agree_but_for_profile_and_pool(profile: str) -> None:
    root, mine = _root(), dp.platform_deployments(profile, load_profile(profile))
    assert [d["name"] for d in mine["deployments"]] == [d["name"] for d in root["deployments"]]
    for ours, theirs in zip(mine["deployments"], root["deployments"], strict=True):
        assert ours["parameters"]["profile"] == profile
        own = f"-{ours['parameters']['startup']}" if profile == "site" else ""
        assert ours["work_pool"] == {"name": f"aif-{profile}{own}"}  # the site: per start-up
        same = {k: v for k, v in ours.items() if k not in ("parameters", "work_pool")}
        assert same == {k: v for k, v in theirs.items() if k not in ("parameters", "work_pool")}
        rest = {k: v for k, v in ours["parameters"].items() if k != "profile"}
        assert rest == {k: v for k, v in theirs["parameters"].items() if k != "profile"}
    assert {k: v for k, v in mine.items() if k != "deployments"} == {
        k: v for k, v in root.items() if k != "deployments"}  # fmt: skip


def test_work_pool_and_profile_parameter_of_a_profile_file(tmp_path: Path) -> None:
    assert dp.work_pool_for("local") == "aif-local" and dp.work_pool_for("site") == "aif-site"
    site = load_profile("site")
    assert dp.work_pool_for("site", "startup-b", site) == "aif-site-startup-b"
    assert dp.work_pool_for("site", None, site) == "aif-site-startup-a"  # default_startup
    assert dp.work_pools("site", site) == {"aif-site-startup-a": 2, "aif-site-startup-b": 2,
                                           "aif-site-startup-c": 1}  # fmt: skip
    assert dp.work_pools("local", load_profile("local")) == {"aif-local": None}
    with pytest.raises(ConfigError, match="startup-z"):
        dp.work_pool_for("site", "startup-z", site)  # not a start-up of the site
    f = tmp_path / "mine.yaml"
    assert dp.work_pool_for(str(f)) == "aif-mine"
    (d, *_) = dp.platform_deployments(str(f))["deployments"]
    assert d["parameters"]["profile"] == str(f) and d["work_pool"]["name"] == "aif-mine"


def test_deploy_all_deploys_with_the_chosen_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    """`aif deploy --profile local` failed: the file said profile site and pool aif-site,
    which a local server does not have (issue 16)."""
    from aifactory.tasks.control import worker

    pools: list[tuple[str, str, int | None]] = []
    seen: dict[str, Any] = {}

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        i = cmd.index("--prefect-file")
        seen.update(cmd=cmd, cwd=kw["cwd"], env=kw["env"],
                    data=yaml.safe_load(Path(cmd[i + 1]).read_text()))  # fmt: skip
        return subprocess.CompletedProcess(cmd, 0, "deployed", "")

    monkeypatch.setattr(
        worker, "ensure_work_pool", lambda url, pool, limit=None: pools.append((url, pool, limit))
    )
    monkeypatch.setattr(dp.subprocess, "run", run)
    url = "http://127.0.0.1:4299/api"
    assert dp.deploy_all(url, lambda s: None, profile="local") == "deployed"
    assert pools == [(url, "aif-local", None)]  # the pool exists before prefect deploy needs it
    assert seen["cwd"] == dp.REPO and seen["cmd"][-4:-2] == ["deploy", "--all"]
    assert seen["env"]["PREFECT_API_URL"] == url
    assert seen["data"] == dp.platform_deployments("local", load_profile("local"))
    pools.clear()
    dp.deploy_all(url, lambda s: None)  # the site: the root file itself
    assert seen["cmd"][-1] == str(dp.PREFECT_FILE)
    # each start-up's own pool, with its limit, before its deployments need it
    assert pools == [(url, "aif-site-startup-a", 2), (url, "aif-site-startup-b", 2),
                     (url, "aif-site-startup-c", 1)]  # fmt: skip


def test_a_failed_deploy_says_prefects_whole_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from aifactory.tasks.control import worker

    out = ("Traceback (most recent call last):\n  File x\nValueError: This deployment "
           "configuration references work pool\n'aif-x' which does not exist. This means no "
           "worker will be able to pick up its\nruns. You can create a work pool in the "
           "Prefect UI.\n")  # fmt: skip
    monkeypatch.setattr(worker, "ensure_work_pool", lambda url, pool, limit=None: False)
    monkeypatch.setattr(dp.subprocess, "run",
                        lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", out))  # fmt: skip
    with pytest.raises(AifError) as err:
        dp.deploy_all("http://127.0.0.1:4299/api", lambda s: None, profile="local")
    said = str(err.value)
    assert "ValueError: This deployment configuration references work pool 'aif-x' which " in said
    assert "does not exist." in said and said.endswith("create a work pool in the Prefect UI.")


def test_a_projects_deployment_uses_the_chosen_profile_and_its_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`aif deploy --project P --profile local` made a deployment with profile site on pool
    aif-site (the project's deploy.profile), which no local worker polls (issue 16)."""
    import prefect.client.orchestration as orchestration

    from aifactory.tasks.control import worker

    made: dict[str, Any] = {}
    pools: list[str] = []

    class Client:
        def __enter__(self) -> Client:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def create_flow_from_name(self, name: str) -> str:
            return "flow-id"

        def create_deployment(self, **kw: Any) -> None:
            made.update(kw)

    monkeypatch.setattr(orchestration, "get_client", lambda **kw: Client())
    limits: list[int | None] = []
    monkeypatch.setattr(
        worker,
        "ensure_work_pool",
        lambda url, pool, limit=None: (pools.append(pool), limits.append(limit)),
    )
    src = {"repository": "https://example.org/b.git", "commit": "0" * 40,
           "project": "aifactory.yaml"}  # fmt: skip
    project = REPO / "examples" / "agriculture-yield" / "aifactory.yaml"
    url = "http://127.0.0.1:4299/api"
    name = dp.deploy_project(project, url, src=src, profile="local")
    assert name == "aif-pipeline/agriculture-yield-nightly"
    assert pools == ["aif-local"] and made["work_pool_name"] == "aif-local"
    assert made["parameters"]["profile"] == "local"
    dp.deploy_project(project, url, src=src)  # default: the project's deploy.profile (site)
    # B's project on the site: B's own pool, with B's limit (startups.startup-b.flow_runs)
    assert pools[-1] == "aif-site-startup-b" and made["parameters"]["profile"] == "site"
    assert made["work_pool_name"] == "aif-site-startup-b" and limits == [None, 2]


def test_per_startup_pools_need_the_sites_workers() -> None:
    """A managed Prefect server runs one local worker: per-start-up pools there would leave
    every start-up but one without a worker, so it is refused in one line."""
    from types import SimpleNamespace

    from aifactory.tasks import cli

    cfg = SimpleNamespace(prefect=SimpleNamespace(api_url="managed", work_pools="per-startup"),
                          home_dir="/nonexistent")  # fmt: skip
    with pytest.raises(ConfigError, match=r"per-startup needs one worker per start-up's pool"):
        cli._local_worker(cfg, "http://127.0.0.1:4299/api", "mine")
