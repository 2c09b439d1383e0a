"""Who the orchestrator is towards the registry (issue 17): on a site whose MLflow checks
permissions, a start-up's run acts as the start-up's own MLflow user in its own experiment,
the operators' tools as the read-only operator; the identity is never part of the config
hash, never in the resolved config, and a refusal by the server is one audited line."""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from aifactory.infra.site import mlflow_auth
from aifactory.infra.site.layout import Site
from aifactory.tasks.core.audit import refusal_of
from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.errors import ConfigError
from aifactory.tasks.doors import registry
from aifactory.tasks.doors.registry import (
    OPERATOR,
    RegistryRefused,
    auth_headers,
    read_password,
    registry_identity,
)

USER_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture
def creds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "mlflow-secrets"
    folder.mkdir()
    for user in ("startup-a", "startup-b", OPERATOR):
        (folder / f"{user}.secret").write_text(f"pw-of-{user}\n")
    for k in USER_ENV:
        monkeypatch.delenv(k, raising=False)
    return folder


def _site_profile(creds: Path) -> Any:
    return load_profile("site", {"mlflow.tenant_credentials": str(creds)})


def test_a_startups_run_acts_as_its_own_user_in_its_own_experiment(creds: Path) -> None:
    cfg = _site_profile(creds)
    mine = cfg.registry_for("startup-a")
    assert mine.username == "startup-a" and mine.run_experiment == "aifactory-startup-a"
    assert cfg.mlflow.username is None and cfg.mlflow.run_experiment == "aifactory"
    assert cfg.as_operator().mlflow.username == OPERATOR
    # Who acts is not what runs: the hash of a start-up's run is the platform's.
    acting = cfg.model_copy(update={"mlflow": mine})
    assert acting.config_hash() == cfg.config_hash()
    assert "pw-of" not in json.dumps(acting.public_dict())  # the password is never resolved


def test_without_tenant_credentials_the_registry_is_the_profiles() -> None:
    cfg = load_profile("local")
    assert cfg.registry_for(cfg.default_startup) is cfg.mlflow
    assert cfg.as_operator() is cfg
    assert cfg.mlflow.run_experiment == cfg.mlflow.experiment


def test_the_identity_holds_inside_the_block_only(
    creds: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _site_profile(creds)
    monkeypatch.setenv(USER_ENV[0], "outer")
    monkeypatch.setenv(USER_ENV[1], "outer-pw")
    with registry_identity(cfg.registry_for("startup-b")):
        assert [os.environ[k] for k in USER_ENV] == ["startup-b", "pw-of-startup-b"]
        want = base64.b64encode(b"startup-b:pw-of-startup-b").decode()
        assert auth_headers() == {"Authorization": f"Basic {want}"}
        with registry_identity(cfg.as_operator().mlflow):
            assert os.environ[USER_ENV[0]] == OPERATOR
        assert os.environ[USER_ENV[0]] == "startup-b"
    assert [os.environ[k] for k in USER_ENV] == ["outer", "outer-pw"]
    # A spec without a user (a registry without permissions) changes nothing.
    with registry_identity(cfg.mlflow), registry_identity(None):
        assert os.environ[USER_ENV[0]] == "outer"
    monkeypatch.delenv(USER_ENV[0])
    assert auth_headers() == {}


def test_our_rest_calls_carry_the_identity(creds: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, str]] = []

    class Answer:
        def __enter__(self) -> Answer:
            return self

        def __exit__(self, *a: object) -> None:
            return None

        def read(self) -> bytes:
            return b"{}"

    def urlopen(req: urllib.request.Request, timeout: float) -> Answer:
        seen.append(dict(req.header_items()))
        return Answer()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with registry_identity(_site_profile(creds).registry_for("startup-a")):
        registry.rest("http://mlflow:5050", "GET", "model-versions/search")
    registry.rest("http://mlflow:5050", "GET", "model-versions/search")
    assert seen[0]["Authorization"].startswith("Basic ")
    assert "Authorization" not in seen[1]


def test_a_refusal_by_the_registry_is_one_audited_line(creds: Path) -> None:
    from mlflow.exceptions import MlflowException

    spec = _site_profile(creds).registry_for("startup-b")
    with pytest.raises(RegistryRefused) as err, registry_identity(spec):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/registered-models/"
                              "alias failed with error code 403 != 200. Response body: "
                              "'Permission denied'", error_code="PERMISSION_DENIED")  # fmt: skip
    msg = str(err.value)
    assert "registry user startup-b was refused" in msg and "\n" not in msg
    assert "pw-of" not in msg and len(msg) < 600
    assert refusal_of(err.value) == "registry"
    # Any other failure goes through as it is.
    with pytest.raises(ValueError, match="not a refusal"), registry_identity(spec):
        raise ValueError("not a refusal")


@pytest.mark.parametrize(("content", "why"), [(None, "no registry user startup-c"),
                                               ("  \n", "empty")])  # fmt: skip
def test_a_missing_or_empty_password_is_one_line(tmp_path: Path, content: str | None,
                                                 why: str) -> None:  # fmt: skip
    if content is not None:
        (tmp_path / "startup-c.secret").write_text(content)
    with pytest.raises(ConfigError) as err:
        read_password(str(tmp_path), "startup-c")
    assert why in str(err.value) and str(tmp_path) in str(err.value)
    assert "\n" not in str(err.value)


def test_the_auth_config_and_passwords_are_private_and_stable(tmp_path: Path) -> None:
    site = Site(tmp_path / "site")
    env = mlflow_auth.server_env(site)
    conf = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    text = conf.read_text()
    assert "default_permission = NO_PERMISSIONS" in text
    assert f"admin_username = {mlflow_auth.ADMIN}" in text
    assert mlflow_auth.password(site, mlflow_auth.ADMIN) in text
    for path in (conf, mlflow_auth.secrets_dir(site) / "flask.secret"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(mlflow_auth.secrets_dir(site).stat().st_mode) == 0o700
    first = mlflow_auth.password(site, "startup-a")
    assert mlflow_auth.password(site, "startup-a") == first and len(first) >= 24
    assert mlflow_auth.password(site, "startup-b") != first
    assert mlflow_auth.server_env(site) == env  # an up does not make new secrets


def test_the_site_registry_remembers_a_checked_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's auth app checks the password (scrypt) up to three times a request: without
    its credential cache every site request took about 0.4 s. The config we write turns the
    cache on, and MLflow's own reader takes it."""
    from mlflow.server.auth.config import read_auth_config

    path = mlflow_auth.write_config(Site(tmp_path))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    assert read_auth_config().auth_cache_ttl_seconds == mlflow_auth.AUTH_CACHE_TTL_S > 0
