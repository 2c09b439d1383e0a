"""Model registration in MLflow: idempotent by fingerprint, tagged with lineage."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import shlex
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aifactory.tasks.core.errors import AifError, ConfigError
from aifactory.tasks.core.jobfiles import copy_job_tree
from aifactory.tasks.core.manifests import DataSnapshot, FeatureSet, ModelVersion, TrainedModel
from aifactory.tasks.core.provenance import key_of, now_iso

FINGERPRINT_TAG = "aif.fingerprint"
PIP_REQUIREMENTS = ["torch==2.13.0", "pandas", "numpy", "pyarrow", "aifactory"]
# The registry user of the site's operators' tools: reads every experiment and model,
# writes none (infra/site/mlflow_auth.py gives it that role).
OPERATOR = "aif-operator"
_USER_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
_IDENTITY_LOCK = threading.RLock()


class RegistryError(AifError):
    """The MLflow registry cannot be reached or refused an operation."""


class RegistryRefused(RegistryError):
    """The registry's own permissions refused the user (HTTP 401/403): audited."""


def startup_experiment(experiment: str, startup: str) -> str:
    """A start-up's own experiment on a registry with permissions (MlflowSpec.run_experiment;
    `aif site up` makes it and gives it to the start-up)."""
    return f"{experiment}-{startup}"


def read_password(folder: str, user: str) -> str:
    """Registry user ``user``'s password from the site's credentials folder (one-line
    errors: a missing file, one the caller cannot read, an empty one)."""
    path = Path(folder) / f"{user}.secret"
    where = f"mlflow.tenant_credentials: {path}"
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no registry user {user} (the site makes one for each of "
                          "its start-ups at `aif site up`)") from None  # fmt: skip
    except PermissionError:
        raise ConfigError(f"{where}: not readable by this user (the orchestrator's)") from None
    except OSError as exc:
        raise ConfigError(f"{where}: unreadable ({exc.strerror})") from None
    if not text:
        raise ConfigError(f"{where}: empty")
    return text


@contextlib.contextmanager
def registry_identity(spec: Any) -> Iterator[None]:
    """Act as ``spec``'s registry user (``MlflowSpec.username``, its password read from
    ``tenant_credentials`` now) inside the block: MLflow's client reads
    MLFLOW_TRACKING_USERNAME/PASSWORD on every request, and so does our own REST
    (``auth_headers``). A spec without a user (a registry without permissions) leaves the
    environment as it is. The variables are restored afterwards; child processes get
    explicit environments (the job layer), never these. A refusal by the server inside
    the block becomes one RegistryRefused line naming the user."""
    user = getattr(spec, "username", None)
    folder = getattr(spec, "tenant_credentials", None)
    password = read_password(folder, user) if user and folder else None
    with _IDENTITY_LOCK:
        saved = {k: os.environ.get(k) for k in _USER_ENV}
        try:
            if user and password:
                os.environ.update(zip(_USER_ENV, (user, password), strict=True))
            yield
        except RegistryRefused:
            raise
        except Exception as exc:
            if not refused(exc):
                raise
            raise RegistryRefused(
                f"MLflow {getattr(spec, 'tracking_uri', '')}: registry user {acting_user()} "
                f"was refused "
                f"({_one_line(exc)}): the registry gives each start-up its own experiments "
                "and models"
            ) from None
        finally:
            for k, old in saved.items():
                if old is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = old


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:240]


def acting_user() -> str:
    """The registry user in effect (``registry_identity``), or "anonymous"."""
    return os.environ.get(_USER_ENV[0]) or "anonymous"


def auth_headers() -> dict[str, str]:
    """The Basic authorization of the registry user in effect (``registry_identity``)."""
    user, password = (os.environ.get(k) for k in _USER_ENV)
    if not user or not password:
        return {}
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def refused(exc: BaseException) -> bool:
    """Whether an MLflow error is the server's refusal (401/403: the user lacks the right)."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in (401, 403)
    if str(getattr(exc, "error_code", "")) in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return True
    # MLflow's client: "API request to endpoint ... failed with error code 403 != 200"
    return any(f"error code {c} " in str(exc) for c in (401, 403))


REGISTRY_WAIT_S = 600.0  # an outage of the tracking server that a trained model outlasts


def _answers(tracking_uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=5) as r:
            return bool(r.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code in (401, 403)  # it answered: reachable (the calls carry the identity)
    except (urllib.error.URLError, OSError):
        return False


def _check_reachable(tracking_uri: str, wait_s: float = 0.0,
                     log: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """The tracking server answers; else wait up to ``wait_s`` for it (a restart, an
    outage: the model is trained, it is not given up for that), saying so every 30 s."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    t0 = time.monotonic()
    said = -30.0
    while not _answers(tracking_uri):
        waited = time.monotonic() - t0
        if waited >= wait_s:
            raise RegistryError(
                f"MLflow tracking server {tracking_uri} is not reachable"
                + (f" (waited {waited:.0f} s)" if wait_s else "")
                + ": is the site up? (aif site status)"
            )
        if log is not None and waited - said >= 30:
            log(f"MLflow tracking server {tracking_uri} is not reachable: waiting for it "
                f"(up to {wait_s:.0f} s; {waited:.0f} s so far)")  # fmt: skip
            said = waited
        time.sleep(min(5.0, max(0.1, wait_s - waited)))
    if log is not None and time.monotonic() - t0 > 1:
        log(f"MLflow tracking server {tracking_uri} answers again after "
            f"{time.monotonic() - t0:.0f} s")  # fmt: skip


def ui_url(tracking_uri: str, name: str, version: str) -> str | None:
    """The version's page in the MLflow UI of an HTTP tracking server; None for a local
    store (sqlite, file), which has no UI until one is started on it."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"


def version_markdown(tracking_uri: str, name: str, version: str) -> str:
    """The version for a Prefect artifact: a link to its MLflow page, or, for a local store,
    its model URI and the command that opens the MLflow UI on the store (no URL exists)."""
    uri = f"models:/{name}/{version}"
    url = ui_url(tracking_uri, name, version)
    if url is not None:
        return f"[{uri}]({url})"
    return (f"`{uri}` in the local MLflow store `{tracking_uri}` (to browse it: "
            f"`mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}`)")  # fmt: skip


def fingerprint(trained: TrainedModel, model_name: str, flavour: str = "tabular") -> str:
    """What was trained, never who collected it or where: the feature set's id (its data
    snapshot, feature code and config), the weights, the software, the flavour. Neither the
    executor, the Slurm job ids nor the lake URL the run used changes it."""
    weights = trained.weights_sha256 or trained.content_hash()
    return key_of("register/2", model_name, trained.featureset_id, weights,
                  trained.environment_hash, flavour)  # fmt: skip


def register_model(
    trained: TrainedModel,
    featureset: FeatureSet,
    snapshot: DataSnapshot,
    *,
    tracking_uri: str,
    model_name: str,
    experiment: str,
    artifact_location: str | None,
    lineage: dict[str, str],
    feature_config: dict[str, Any],
    log: Callable[[str], None] = print,
    documents: Callable[[str], dict[str, str | dict[str, Any]]] | None = None,
    extra_artifacts: dict[str, dict[str, Any]] | None = None,
    flavour: str = "tabular",
    model_ref: str | None = None,
    source_dir: str | None = None,
    run_as: str | None = None,
) -> ModelVersion:
    """Log the run and register one model version (or return the existing one).

    Idempotent, also under concurrency: a version is found by its fingerprint tag before
    anything is created; if two registrations of the same model race, both see every
    version with the fingerprint right after registering, the lowest version wins and the
    other one is deleted (with its run), so exactly one version remains. ``documents``
    (given the version) returns the files to attach under ``docs/`` (model card,
    training-data summary, RO-Crate). A project's model (``flavour`` pytorch, sklearn or
    pyfunc; ``model_ref`` its class in the project's folder ``source_dir``) is loaded
    first: one that its flavour cannot load is refused before anything is logged."""
    fp = fingerprint(trained, model_name, flavour)
    found = _registered_over_rest(tracking_uri, model_name, fp)
    if found is not None:  # the nightly no-change path: no MLflow import at all
        log(f"model already registered as {model_name} version {found.version} (fingerprint {fp})")
        return found
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # A trained model outlasts an outage of the tracking server or of its database (503s):
    # 9 retries back off 2, 4, ... 64, then 120 s (urllib3's cap), about 8 minutes in all.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow(\..*)?")
    from aifactory.tasks.models.pyfunc_model import TabularPyfunc

    _check_reachable(tracking_uri, REGISTRY_WAIT_S, log)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    existing = _versions_with(client, model_name, fp, tracking_uri)
    if existing:
        mv = sorted(existing, key=lambda v: int(v.version))[0]
        log(f"model already registered as {model_name} version {mv.version} (fingerprint {fp})")
        # Registering nothing moves no alias; only a registration cut off before it set the
        # alias (the model has none) gets it here.
        if "candidate" not in (client.get_registered_model(model_name).aliases or {}):
            client.set_registered_model_alias(model_name, "candidate", mv.version)
        mv = client.get_model_version(model_name, mv.version)  # its aliases as they are now
        return _manifest(mv, model_name, fp, tracking_uri).model_copy(update={"reused": True})

    _claim_model(client, model_name, tracking_uri)  # before anything is logged
    if flavour != "tabular":  # a new version: its model must load (a cache hit loads nothing)
        from aifactory.tasks.models.flavours import check_loads

        # Loading runs the start-up's code: as its own user (run_as), never as the orchestrator.
        check_loads(flavour, trained.run_dir, model_ref, source_dir or ".", run_as)
    exp_id = _experiment_id(client, experiment, artifact_location)
    tags = {
        FINGERPRINT_TAG: fp,
        "aif.snapshot_id": snapshot.snapshot_id,
        "aif.snapshot_hash": snapshot.content_hash(),
        "aif.featureset_id": featureset.featureset_id,
        "aif.featureset_hash": featureset.content_hash(),
        "aif.run_key": trained.run_key,
        "aif.slurm_job_ids": ",".join(trained.slurm_job_ids) or "none",
        "aif.executor": trained.executor,
        "aif.environment_hash": trained.environment_hash,
        "aif.weights_sha256": trained.weights_sha256,
        "aif.seed": str(trained.params.get("seed", "")),
        "aif.sacct": _sacct_tag(trained.sacct),
        **lineage,
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=f"train-{trained.run_key}") as run:
        mlflow.log_params({k: _param(v) for k, v in trained.params.items()})
        mlflow.log_metrics({k: float(v) for k, v in trained.metrics.items()})
        mlflow.set_tags(tags)
        if trained.sacct:
            mlflow.log_dict(trained.sacct, "lineage/sacct.json")
        for path, data in (extra_artifacts or {}).items():
            mlflow.log_dict(data, path)
        mlflow.log_dict(snapshot.canonical(), "lineage/data_snapshot.json")
        mlflow.log_dict(featureset.canonical(), "lineage/featureset.json")
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            # Everything uploaded from the job's folder is a copy read without following a
            # link (tasks/core/jobfiles.py): the job's own code could have planted one.
            sbatch = Path(trained.run_dir) / "train.sbatch"
            if sbatch.exists():
                mlflow.log_artifact(str(copy_job_tree(sbatch, Path(tmp, "lineage", sbatch.name))),
                                    "lineage")  # fmt: skip
            if flavour == "tabular":
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=TabularPyfunc(),
                    artifacts=_tabular_artifacts(trained, feature_config, Path(tmp)),
                    pip_requirements=PIP_REQUIREMENTS,
                )
            else:
                info = _log_project_model(mlflow, trained, featureset, flavour, model_ref,
                                          source_dir or ".", tmp)  # fmt: skip
        run_id = run.info.run_id
    with _quiet():
        mv = mlflow.register_model(info.model_uri, model_name, tags={**tags, "aif.run_id": run_id})
    same = _versions_with(client, model_name, fp, tracking_uri)
    winner = min(same, key=lambda v: int(v.version)) if same else mv
    if str(winner.version) != str(mv.version):
        # A concurrent registration of the same model got there first: keep one version.
        with contextlib.suppress(MlflowException):
            client.delete_model_version(model_name, mv.version)
        with contextlib.suppress(MlflowException):
            client.delete_run(run_id)
        log(f"{model_name} version {winner.version} registered the same model concurrently: "
            f"version {mv.version} withdrawn")  # fmt: skip
        return _manifest(winner, model_name, fp, tracking_uri).model_copy(update={"reused": True})
    if documents is not None:
        docs = documents(str(mv.version))
        for doc, body in docs.items():
            text = body if isinstance(body, str) else json.dumps(body, indent=2)
            client.log_text(run_id, text, f"docs/{doc}")
        card = docs.get("model_card.md")
        if isinstance(card, str):
            client.update_model_version(model_name, mv.version, description=card[:5000])
    client.set_registered_model_alias(model_name, "candidate", mv.version)
    log(f"registered {model_name} version {mv.version}; alias candidate -> {mv.version}")
    return _manifest(client.get_model_version(model_name, mv.version), model_name, fp, tracking_uri)


def _tabular_artifacts(trained: TrainedModel, feature_config: dict[str, Any],
                       tmp: Path) -> dict[str, str]:  # fmt: skip
    """The reference model's file, its feature config and, for a feature function in a
    project's file, that project's code (its folder's sources, named relative to it): the
    registered model featurises raw rows wherever it is loaded."""
    from aifactory.tasks.models.flavours import relative_ref
    from aifactory.tasks.stages.training import copy_project_code

    fc = dict(feature_config)
    model = Path(trained.model_path)
    out = {"model": str(copy_job_tree(model, tmp / "job" / model.name))}
    file = str(fc.get("function", "")).rpartition(":")[0]
    if file.endswith(".py") and os.path.isfile(file):
        out["code"] = str(copy_project_code(file, tmp))
        fc["function"] = relative_ref(fc["function"], Path(file).resolve().parent)
    path = tmp / "feature_config.json"
    path.write_text(json.dumps(fc, sort_keys=True, indent=2))
    out["feature_config"] = str(path)
    return out


def _log_project_model(mlflow: Any, trained: TrainedModel, featureset: FeatureSet, flavour: str,
                       model_ref: str | None, source_dir: str, tmp: str) -> Any:  # fmt: skip
    """A project's model as one pyfunc (tasks/models/flavours.py): the model file, the run's copy
    of the project's code, and the spec that ties them to the feature function."""
    from aifactory.tasks.models.flavours import INIT_FILE, pyfunc_spec
    from aifactory.tasks.models.pyfunc_model import ProjectPyfunc
    from aifactory.tasks.stages.training import CODE_DIR

    run_dir = Path(trained.run_dir)
    spec = Path(tmp) / "project_model.json"
    spec.write_text(json.dumps(pyfunc_spec(flavour, model_ref, featureset, source_dir),
                               sort_keys=True, indent=2))  # fmt: skip
    job = Path(tmp) / "job"  # copies of the job's files, read without following a link
    model = Path(trained.model_path)
    artifacts = {
        "model": str(copy_job_tree(model, job / model.name)),
        "code": str(copy_job_tree(run_dir / CODE_DIR, job / CODE_DIR)),
        "spec": str(spec),
    }
    if (run_dir / INIT_FILE).exists():
        artifacts["init"] = str(copy_job_tree(run_dir / INIT_FILE, job / INIT_FILE))
    extra = ["scikit-learn"] if flavour == "sklearn" else []
    return mlflow.pyfunc.log_model(name="model", python_model=ProjectPyfunc(), artifacts=artifacts,
                                   pip_requirements=[*PIP_REQUIREMENTS, *extra])  # fmt: skip


def rest(tracking_uri: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/{path}"
    headers = {"Content-Type": "application/json", **auth_headers()}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=15) as r:
        return json.loads(r.read() or b"{}")


def _registered_over_rest(tracking_uri: str, model_name: str, fp: str) -> ModelVersion | None:
    """The version already registered with fingerprint ``fp``, found through the tracking
    server's REST API; None when there is none or the registry is not an HTTP server, so
    that the full MLflow client path decides. As there, registering nothing moves no alias:
    ``candidate`` is set only when the model has none (a registration cut off before it)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        name_q = model_name.replace("'", "")
        query = urllib.parse.urlencode({"filter": f"name='{name_q}'", "max_results": 1000})
        res = rest(tracking_uri, "GET", f"model-versions/search?{query}")
        same = [v for v in res.get("model_versions", [])
                if any(t.get("key") == FINGERPRINT_TAG and t.get("value") == fp
                       for t in v.get("tags", []))]  # fmt: skip
        if not same:
            return None
        mv = min(same, key=lambda v: int(v["version"]))
        version = str(mv["version"])
        get = urllib.parse.urlencode({"name": model_name})
        model = rest(tracking_uri, "GET", f"registered-models/get?{get}")["registered_model"]
        aliases = {a.get("alias"): str(a.get("version")) for a in model.get("aliases") or []}
        if "candidate" not in aliases:
            alias = {"name": model_name, "alias": "candidate", "version": version}
            rest(tracking_uri, "POST", "registered-models/alias", alias)
            aliases["candidate"] = version
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None
    tags = {t["key"]: t["value"] for t in mv.get("tags", [])}
    own = sorted(a for a, v in aliases.items() if v == version)
    return _version_manifest(model_name, fp, tracking_uri, version, mv.get("run_id") or "", own,
                             tags).model_copy(update={"reused": True})  # fmt: skip


def _claim_model(client: Any, model_name: str, tracking_uri: str) -> None:
    """The registered model is this user's before anything is logged. A registry with
    permissions answers 403 alike for a model that does not exist and for another user's,
    and its searches leave the other's out: a model the user cannot see is created, which
    makes it the user's own; if the name is taken (and still unseen after a concurrent
    creation of the user's own), it is another start-up's, and the run is refused."""
    from mlflow.exceptions import MlflowException

    def seen() -> bool:
        q = f"name='{model_name.replace(chr(39), '')}'"
        return bool(client.search_registered_models(filter_string=q, max_results=10))

    if seen():
        return
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
        if seen():  # the user's own, made by a concurrent registration
            return
        raise RegistryRefused(
            f"MLflow {tracking_uri}: registered model {model_name!r} is not registry user "
            f"{acting_user()}'s (the server hides it: another start-up registered that "
            "name): choose another mlflow.model_name"
        ) from None


def _experiment_id(client: Any, experiment: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it; a concurrent creation by another run is fine."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(experiment, artifact_location=artifact_location))
    except MlflowException as exc:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise RegistryError(f"MLflow: cannot create experiment {experiment!r}: {exc}") from None
        return str(exp.experiment_id)


def _sacct_tag(rec: dict[str, str]) -> str:
    keys = ("JobID", "State", "ExitCode", "Elapsed", "AllocTRES", "MaxRSS", "NodeList")
    return " ".join(f"{k}={rec[k]}" for k in keys if rec.get(k))[:480] or "none"


def _versions_with(client: Any, model_name: str, fp: str, tracking_uri: str) -> list[Any]:
    from mlflow.exceptions import MlflowException

    try:
        return [
            v
            for v in client.search_model_versions(f"name='{model_name}'")
            if v.tags.get(FINGERPRINT_TAG) == fp
        ]
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
            raise RegistryError(
                f"MLflow {tracking_uri}: cannot search model versions: {exc}"
            ) from None
        return []


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MLflow prints progress to stdout/stderr; keep the terminal to our own lines."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _param(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list | dict) else str(v)


def _manifest(mv: Any, name: str, fp: str, tracking_uri: str) -> ModelVersion:
    """The manifest of an MLflow ModelVersion object."""
    return _version_manifest(name, fp, tracking_uri, str(mv.version), mv.run_id or "",
                             list(getattr(mv, "aliases", []) or []), dict(mv.tags))  # fmt: skip


def _version_manifest(name: str, fp: str, tracking_uri: str, version: str, run_id: str,
                      aliases: list[str], tags: dict[str, str]) -> ModelVersion:  # fmt: skip
    """A registered version as a manifest, with the aliases that point at it."""
    return ModelVersion(
        name=name,
        version=version,
        uri=f"models:/{name}/{version}",
        run_id=run_id,
        fingerprint=fp,
        aliases=list(aliases),
        tags=tags,
        tracking_uri=tracking_uri,
        created_at=now_iso(),
    )
