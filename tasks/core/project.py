"""A start-up's own project: what to train (its data set, features, trainer, model), kept
in its own folder or git repository as ``aifactory.yaml``, apart from where it runs (the
profile: the site's services, accounts and policies).

    name: agri-yield
    startup: startup-b
    data: {dataset: agriculture-fields, purpose: crop-yield-forecasting}
    features: {function: features.py:yield_features, key: reading_id, target: yield_t_ha}
    train:
      script: train.py
      config: {epochs: 4, lr: 0.002}
      resources: {gpus: 1, cpus: 1, memory_gb: 2, time_min: 20}
    model:
      name: agri-yield
      flavour: pytorch
      class: model.py:YieldNet
      metric: test_rmse
    deploy: {schedule: "0 2 * * *", timezone: Europe/Brussels}

:func:`project_overrides` turns it into the profile settings it stands for (``features``,
``training.script``, ``mlflow.flavour`` …), with the project's paths made absolute; the
pipeline applies them over the profile, so every guarantee of a run (policy before any
byte is read, snapshots, cache keys, admission, checkpoint and requeue, lineage) is the
same for a project as for the reference model.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from aifactory.tasks.core.config import MetricCheck, fmt_validation
from aifactory.tasks.core.errors import ConfigError

PROJECT_FILE = "aifactory.yaml"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TEMPLATE = "agriculture-yield"
_NAME = re.compile(r"^[a-z][a-z0-9-]{1,62}$")


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ProjectData(_M):
    dataset: str
    purpose: str | None = None  # default: the start-up's first declared purpose


class Resources(_M):
    """Generic names (the same as the profile's training section, shorter)."""

    gpus: int | None = Field(default=None, ge=0)  # per node
    nodes: int | None = Field(default=None, ge=1)
    cpus: int | None = Field(default=None, ge=1)
    memory_gb: float | None = Field(default=None, gt=0)
    time_min: int | None = Field(default=None, ge=1)
    partition: str | None = None


class ProjectTrain(_M):
    script: str | None = None  # relative to the project folder; its folder is the job's code
    # ...or the platform's reference trainer: "tabular" (an MLP; config: its
    # hyperparameters epochs, batch_size, hidden, lr, seed).
    trainer: Literal["tabular"] | None = None
    config: dict[str, Any] = Field(default_factory=dict)  # job.config
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="after")
    def _one_trainer(self) -> ProjectTrain:
        if (self.script is None) == (self.trainer is None):
            raise ValueError("give either script (your own trainer) or trainer: tabular")
        return self


class ProjectModel(_M):
    name: str
    flavour: Literal["pytorch", "sklearn", "pyfunc", "tabular"] = "pytorch"
    model_class: str | None = Field(default=None, alias="class")
    python_model: str | None = None
    metric: str  # the held-out metric promotion compares
    higher_is_better: bool = False
    margin: float = 0.0
    checks: list[MetricCheck] = Field(default_factory=list)


class ProjectDeploy(_M):
    profile: str = "site"
    schedule: str | None = "0 2 * * *"
    timezone: str = "UTC"
    promote: bool = True


class Project(_M):
    name: str
    startup: str
    description: str = ""
    data: ProjectData
    features: dict[str, Any]
    train: ProjectTrain
    model: ProjectModel
    deploy: ProjectDeploy = Field(default_factory=ProjectDeploy)


def find_project(where: str | os.PathLike[str] | None = None) -> Path | None:
    """``where`` (a project folder or its file), else ``aifactory.yaml`` in the working
    folder; None when there is none."""
    if where is None:
        p = Path.cwd() / PROJECT_FILE
        return p if p.is_file() else None
    p = Path(where)
    if p.is_dir():
        p = p / PROJECT_FILE
    if not p.is_file():
        raise ConfigError(f"project {where}: no {PROJECT_FILE} there")
    return p.resolve()


def load_project(path: str | os.PathLike[str]) -> Project:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"project {path}: cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "?"
        raise ConfigError(f"project {path}: invalid YAML at {where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"project {path}: top level must be a mapping")
    try:
        return Project.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(fmt_validation(err, f"project {path}", Project, most=3)) from None


def abs_ref(ref: str | None, root: Path) -> str | None:
    if ref and ".py:" in ref:
        file, name = ref.rsplit(":", 1)
        return f"{(root / file).resolve()}:{name}"
    return ref


def project_name(path: str | os.PathLike[str]) -> str:
    """The name of the project at ``path`` (its file or folder)."""
    path = Path(path).resolve()
    return load_project(path / PROJECT_FILE if path.is_dir() else path).name


def project_overrides(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(start-up, profile overrides) that the project at ``path`` (its file or folder)
    stands for."""
    path = Path(path).resolve()
    if path.is_dir():
        path = path / PROJECT_FILE
    proj, root = load_project(path), path.parent
    feats = dict(proj.features)
    if isinstance(feats.get("function"), str):
        feats["function"] = abs_ref(feats["function"], root)
    out: dict[str, Any] = {
        "dataspace.dataset": proj.data.dataset,
        "features": feats,
        **_trainer(proj, path, root),
        "mlflow.model_name": proj.model.name,
        "mlflow.flavour": proj.model.flavour,
        "mlflow.model_class": abs_ref(proj.model.model_class, root),
        "mlflow.python_model": abs_ref(proj.model.python_model, root),
        "promotion.metric": proj.model.metric,
        "promotion.higher_is_better": proj.model.higher_is_better,
        "promotion.margin": proj.model.margin,
        "promotion.checks": [c.model_dump() for c in proj.model.checks],
    }
    if proj.data.purpose:
        out["dataspace.purpose"] = proj.data.purpose
    names = {"gpus": "gpus_per_node", "nodes": "nodes", "cpus": "cpus_per_task",
             "memory_gb": "mem_gb", "time_min": "timeout_min",
             "partition": "partition"}  # fmt: skip
    for k, v in proj.train.resources.model_dump().items():
        if v is not None:
            out[f"training.{names[k]}"] = v
    return proj.startup, out


def _trainer(proj: Project, path: Path, root: Path) -> dict[str, Any]:
    """The training settings: the project's script and its job.config, or the reference
    trainer with its hyperparameters."""
    from aifactory.tasks.stages.training import HYPERPARAMS

    if proj.train.trainer == "tabular":
        if proj.model.flavour != "tabular":
            raise ConfigError(f"project {path}: model.flavour {proj.model.flavour}: the tabular "
                              "trainer saves the tabular flavour")  # fmt: skip
        unknown = sorted(set(proj.train.config) - set(HYPERPARAMS))
        if unknown:
            raise ConfigError(f"project {path}: train.config.{unknown[0]}: not a setting of the "
                              f"tabular trainer ({', '.join(HYPERPARAMS)})")  # fmt: skip
        return {"training.payload": "tabular",
                **{f"training.{k}": v for k, v in proj.train.config.items()}}  # fmt: skip
    assert proj.train.script is not None
    script = (root / proj.train.script).resolve()
    if not script.is_file():
        raise ConfigError(f"project {path}: train.script {proj.train.script}: no such file")
    if script.suffix != ".py":
        raise ConfigError(f"project {path}: train.script {proj.train.script}: not a .py file")
    if proj.model.flavour == "tabular":
        raise ConfigError(f"project {path}: model.flavour tabular is the reference trainer's: "
                          "a script's model is pytorch, sklearn or pyfunc")  # fmt: skip
    return {"training.script": str(script), "training.config": proj.train.config}


# -- aif init ------------------------------------------------------------------------------
def init_project(name: str, dest: Path, startup: str | None = None) -> list[Path]:
    """Write a small working project named ``name`` into ``dest`` (which must not exist or
    be empty): the project file (with its nightly deployment's settings), its feature
    function, model, training script and own Prefect flow, from the agriculture-yield
    example."""
    if not _NAME.match(name):
        raise ConfigError(f"aif init {name!r}: a project name is 2-63 lower-case letters, "
                          "digits and hyphens, starting with a letter")  # fmt: skip
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConfigError(f"aif init: {dest} exists and is not empty: nothing written")
    src = EXAMPLES / TEMPLATE
    if not (src / PROJECT_FILE).is_file():
        raise ConfigError(f"aif init: the project template {src} is missing from this install")
    tmp = dest.parent / f".{dest.name}.init-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    pf = tmp / PROJECT_FILE
    text = pf.read_text().replace(TEMPLATE, name)
    if startup:
        text = re.sub(r"(?m)^startup: .*$", f"startup: {startup}", text)
    pf.write_text(text)
    (tmp / ".gitignore").write_text(".aif/\n__pycache__/\n")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest.rmdir()
    os.replace(tmp, dest)
    return sorted(p for p in dest.rglob("*") if p.is_file())
