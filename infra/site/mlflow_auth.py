"""MLflow's own permissions on the site: the basic-auth app that MLflow ships.

The tracking server runs ``--app-name basic-auth`` with ``default_permission =
NO_PERMISSIONS``, so the server itself, not aifactory, decides who reads and writes what:

- each start-up is an MLflow user of its own (its password in
  ``<site>/secrets/mlflow/<start-up>.secret``, a folder only root reads; profile key
  ``mlflow.tenant_credentials``). What a user creates (its experiment's runs, its registered
  models and their versions) is its own (MANAGE); another start-up's is invisible (searches
  leave it out) and refused (HTTP 403). ``aif site up`` creates each start-up's experiment
  ``<experiment>-<start-up>`` itself and gives it to the start-up, so no other user can take
  the name first.
- the operators' user ``aif-operator`` holds one role, ``aif-operators``: READ on every
  experiment and registered model (wildcard grants), and nothing else: every write is 403.
- the admin ``aif-admin`` (its password in the same folder) is used by ``aif site up`` only:
  users, the operators' role, the start-ups' experiments, and the adoption of the models of
  a site that ran before permissions (a model whose versions all carry one start-up's
  ``aif.startup`` tag becomes that start-up's).
- anonymous requests get 401; ``/health`` stays open for the site's health check.

Every call here is idempotent, so ``up`` runs all of it on every start.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aifactory.infra.site import postgres
from aifactory.infra.site.layout import ACCOUNTS, Site, kept_secret, private_file
from aifactory.tasks.core.errors import SiteError
from aifactory.tasks.doors.registry import OPERATOR, startup_experiment

ADMIN = "aif-admin"
OPERATOR_ROLE = "aif-operators"
WORKSPACE = "default"  # MLflow's only workspace while workspaces are off (the site's case)
READ_ALL = (("experiment", "*"), ("registered_model", "*"))
AUTH_CACHE_TTL_S = 60


def secrets_dir(site: Site) -> Path:
    """The registry users' passwords (profile key mlflow.tenant_credentials), root only."""
    return site.root / "secrets" / "mlflow"


def password(site: Site, user: str) -> str:
    """``user``'s password: made once, random, kept in a file only root reads."""
    return kept_secret(secrets_dir(site) / f"{user}.secret", lambda: secrets.token_urlsafe(24))


def config_path(site: Site) -> Path:
    return secrets_dir(site) / "basic_auth.ini"


def write_config(site: Site) -> Path:
    """The auth app's configuration (root only: it names the admin's first password)."""
    path = config_path(site)
    private_file(path, "\n".join([
        "[mlflow]",
        "default_permission = NO_PERMISSIONS",
        f"database_uri = {postgres.url(site, postgres.MLFLOW.role, 'mlflow_auth')}",
        f"admin_username = {ADMIN}",
        f"admin_password = {password(site, ADMIN)}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "grant_default_workspace_access = false",
        # A checked password is remembered for a minute: every request checks it (scrypt)
        # up to three times, 0.4 s a request on this machine; a removed user or a changed
        # password is refused at most a minute later.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}",
        "",
    ]))  # fmt: skip
    return path


def server_env(site: Site) -> dict[str, str]:
    """What the tracking server needs for its auth app: the config and Flask's CSRF key."""
    flask_key = kept_secret(secrets_dir(site) / "flask.secret", lambda: secrets.token_hex(32))
    return {"MLFLOW_AUTH_CONFIG_PATH": str(write_config(site)),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": flask_key}  # fmt: skip


class _Api:
    """The tracking server's REST API as one user; errors are one SiteError line."""

    def __init__(self, site: Site, user: str) -> None:
        self.url, self.auth = site.mlflow_url, (user, password(site, user))

    def call(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw: Any) -> Any:
        import requests

        try:
            r = requests.request(method, f"{self.url}/api/{path}", auth=self.auth, timeout=30,
                                 **kw)  # fmt: skip
        except requests.RequestException as exc:
            raise SiteError(f"site part mlflow: {method} {path}: {exc}"[:400]) from None
        if r.status_code not in ok:
            raise SiteError(f"site part mlflow: {method} {path} as {self.auth[0]}: HTTP "
                            f"{r.status_code} {' '.join(r.text.split())[:200]}")  # fmt: skip
        return r

    def json(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        return dict(self.call(method, path, **kw).json() or {})

    def pages(self, path: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        token = None
        while True:
            q = {**params, "max_results": 1000, **({"page_token": token} if token else {})}
            res = self.json("GET", path, params=q)
            yield from res.get(key, [])
            token = res.get("next_page_token")
            if not token:
                return


def _ensure_user(site: Site, admin: _Api, user: str) -> str | None:
    """``user`` exists with its kept password; returns what was done, or None."""
    mine = _Api(site, user)
    if mine.call("GET", "2.0/mlflow/users/current", ok=(200, 401)).status_code == 200:
        return None
    exists = admin.call("GET", "2.0/mlflow/users/get", ok=(200, 404),
                        params={"username": user}).status_code == 200  # fmt: skip
    if exists:  # its password file was made again: the server takes the kept one
        admin.call("PATCH", "2.0/mlflow/users/update-password",
                   json={"username": user, "password": mine.auth[1]})  # fmt: skip
        return f"{user} (password reset)"
    admin.call("POST", "2.0/mlflow/users/create", json={"username": user, "password": mine.auth[1]})
    return user


def _grant(admin: _Api, user: str, kind: str, resource: str, permission: str) -> bool:
    """Give ``user`` ``permission`` on one resource; False if it had it already."""
    got = admin.json("GET", "3.0/mlflow/users/permissions/get", params={
        "username": user, "resource_type": kind, "resource_id": resource})  # fmt: skip
    if got.get("permission") == permission:
        return False
    admin.call("POST", "3.0/mlflow/users/permissions/revoke", ok=(200, 404), json={
        "username": user, "resource_type": kind, "resource_id": resource})  # fmt: skip
    admin.call("POST", "3.0/mlflow/users/permissions/grant", json={
        "username": user, "resource_type": kind, "resource_id": resource,
        "permission": permission})  # fmt: skip
    return True


def _ensure_operator_role(admin: _Api) -> None:
    """Role aif-operators (READ on every experiment and registered model), held by the
    operators' user and by no one else."""
    roles = admin.json("GET", "3.0/mlflow/roles/list", params={"workspace": WORKSPACE})
    role = next((r for r in roles.get("roles", []) if r.get("name") == OPERATOR_ROLE), None)
    if role is None:
        about = "Site operators: read every start-up's experiments and models"
        body = {"name": OPERATOR_ROLE, "workspace": WORKSPACE, "description": about}
        role = admin.json("POST", "3.0/mlflow/roles/create", json=body)["role"]
    have = {(p.get("resource_type"), p.get("resource_pattern")): p.get("permission")
            for p in role.get("permissions", [])}  # fmt: skip
    for kind, pattern in READ_ALL:
        if have.get((kind, pattern)) != "READ":
            admin.call("POST", "3.0/mlflow/roles/permissions/add", json={
                "role_id": role["id"], "resource_type": kind, "resource_pattern": pattern,
                "permission": "READ"})  # fmt: skip
    held = admin.json("GET", "3.0/mlflow/roles/users/list", params={"role_id": role["id"]})
    op = admin.json("GET", "2.0/mlflow/users/get", params={"username": OPERATOR})["user"]
    if op["id"] not in {a.get("user_id") for a in held.get("assignments", [])}:
        admin.call("POST", "3.0/mlflow/roles/assign",
                   json={"role_id": role["id"], "username": OPERATOR})  # fmt: skip


def _ensure_experiment(admin: _Api, name: str, owner: str) -> bool:
    """The start-up's experiment exists and is its own (MANAGE); True if made now."""
    got = admin.call("GET", "2.0/mlflow/experiments/get-by-name", ok=(200, 404),
                     params={"experiment_name": name})  # fmt: skip
    made = got.status_code == 404
    if made:
        exp_id = str(admin.json("POST", "2.0/mlflow/experiments/create",
                                json={"name": name})["experiment_id"])  # fmt: skip
    else:
        exp_id = str(got.json()["experiment"]["experiment_id"])
    _grant(admin, owner, "experiment", exp_id, "MANAGE")
    return made


def _adopt_models(admin: _Api) -> list[str]:
    """Models registered before the site had permissions: each whose versions all name one
    of the site's start-ups (tag aif.startup) becomes that start-up's. Returns them."""
    adopted = []
    for model in admin.pages("2.0/mlflow/registered-models/search", "registered_models"):
        name = model["name"]
        q = f"name='{name}'" if "'" not in name else None
        if q is None:
            continue
        owners = set()
        for v in admin.pages("2.0/mlflow/model-versions/search", "model_versions", filter=q):
            tags = {t.get("key"): t.get("value") for t in v.get("tags", [])}
            owners.add(tags.get("aif.startup"))
        if len(owners) != 1 or next(iter(owners)) not in ACCOUNTS:
            continue
        owner = str(next(iter(owners)))
        if _grant(admin, owner, "registered_model", name, "MANAGE"):
            adopted.append(f"{name} -> {owner}")
    return adopted


def ensure_access(site: Site, experiment: str, progress: Callable[[str], None]) -> None:
    """Users, the operators' role, the start-ups' experiments and the adoption of older
    models, as the admin (idempotent; on every ``up``)."""
    admin = _Api(site, ADMIN)
    made = [m for m in (_ensure_user(site, admin, u) for u in (*ACCOUNTS, OPERATOR)) if m]
    if made:
        progress(f"mlflow: registry users {', '.join(made)} (passwords in {secrets_dir(site)})")
    _ensure_operator_role(admin)
    new = [startup_experiment(experiment, sid) for sid in ACCOUNTS
           if _ensure_experiment(admin, startup_experiment(experiment, sid), sid)]  # fmt: skip
    if new:
        progress(f"mlflow: experiments {', '.join(new)}, each its start-up's own")
    adopted = _adopt_models(admin)
    if adopted:
        progress(f"mlflow: models registered before permissions, now their start-up's: "
                 f"{', '.join(adopted)}")  # fmt: skip
