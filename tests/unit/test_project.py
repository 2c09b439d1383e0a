"""A start-up's own project: the project file, `aif init`, its training script through the
job layer (local executor), the flavours that load its model, and each bad input."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aifactory.tasks.core.config import TrainingSpec, load_profile
from aifactory.tasks.core.errors import ConfigError, TrainingError
from aifactory.tasks.core.manifests import FeatureSet, SplitFiles
from aifactory.tasks.core.project import init_project, load_project, project_overrides
from aifactory.tasks.models.flavours import artifact_sha256, load_trained
from aifactory.tasks.stages.training import project_code_hash, train

COLS = ["a", "b"]

MODEL = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, n: int = 2):
        super().__init__()
        self.lin = nn.Linear(n, 1)

    def forward(self, x):
        return self.lin(x).squeeze(-1)
"""

TRAIN = """
import json, sys
import torch
from aifactory.tasks.payloads.job import Job, run_job
from model import Net

def train(job: Job) -> None:
    torch.manual_seed(0)
    x, y = job.split("train")
    net = Net(len(job.feature_columns))
    opt = torch.optim.SGD(net.parameters(), lr=job.config["lr"])
    for _ in range(20):
        loss = ((net(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    job.save("model_init.json", json.dumps({"n": len(job.feature_columns)}))
    job.save("model.pt", net.state_dict())
    job.commit({"test_rmse": METRIC}, finite=["test_rmse"])

if __name__ == "__main__":
    EXTRA
    sys.exit(run_job(train, "t"))
"""


def _featureset(root: Path) -> FeatureSet:
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 64), ("val", 16), ("test", 16)):
        a, b = rng.normal(size=n), rng.normal(size=n)
        path = root / "fs" / split / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"k": np.arange(n), "a": a, "b": b, "y": 2 * a - b}), path)
        splits[split] = SplitFiles(files=[f"file://{path}"], rows=n)
    norm = {c: {"mean": 0.0, "std": 1.0} for c in [*COLS, "y"]}
    return FeatureSet(featureset_id="fs1", snapshot_id="s", snapshot_hash="h",
                      lake_url=f"file://{root}/fs", key_column="k", feature_columns=COLS,
                      target="y", normalisation=norm, splits=splits, rows_in=96,
                      feature_config={}, created_at="2026-01-01T00:00:00Z")  # fmt: skip


def _project(root: Path, metric: str = "0.5", extra: str = "pass", model: str = MODEL) -> Path:
    code = root / "proj"
    code.mkdir(parents=True, exist_ok=True)
    (code / "model.py").write_text(model)
    (code / "train.py").write_text(TRAIN.replace("METRIC", metric).replace("EXTRA", extra))
    return code


def _train(root: Path, code: Path, key: str = "k1") -> object:
    spec = TrainingSpec(script=str(code / "train.py"), config={"lr": 0.1})
    lines: list[str] = []
    return train(spec=spec, account="acct", featureset=_featureset(root / key),
                 runs_dir=str(root / "runs"), run_key=key, slurm=None, env={},
                 log=lines.append, flavour="pytorch")  # fmt: skip


def test_a_project_script_trains_through_the_job_layer_and_its_model_loads(tmp_path: Path) -> None:
    code = _project(tmp_path)
    trained = _train(tmp_path, code)
    run_dir = Path(trained.run_dir)  # type: ignore[attr-defined]
    assert (run_dir / "code" / "train.py").read_text() == (code / "train.py").read_text()
    assert trained.weights_sha256 == artifact_sha256("pytorch", run_dir)  # type: ignore[attr-defined]
    assert trained.metrics == {"test_rmse": 0.5}  # type: ignore[attr-defined]
    net = load_trained("pytorch", run_dir, f"{code}/model.py:Net", code)
    assert net.lin.in_features == 2
    # the class comes from the run's copy of the code, not from the project's folder
    assert type(net).__module__.startswith("aif_features_")
    again = _train(tmp_path, code)  # a finished run is collected, not trained again
    assert again.reused and again.weights_sha256 == trained.weights_sha256  # type: ignore[attr-defined]


def test_the_run_key_follows_the_project_code(tmp_path: Path) -> None:
    code = _project(tmp_path)
    before = project_code_hash(str(code / "train.py"))
    (code / "notes.txt").write_text("x")  # small text files are part of the code
    assert project_code_hash(str(code / "train.py")) != before
    after = project_code_hash(str(code / "train.py"))
    (code / ".aif").mkdir()
    (code / ".aif" / "state.json").write_text("{}")  # hidden folders are not
    (code / "data.parquet").write_bytes(b"x" * 10)  # nor data files
    assert project_code_hash(str(code / "train.py")) == after


@pytest.mark.parametrize(
    ("metric", "extra", "message"),
    [
        ("0.5", "sys.exit(3)", r"exited with code 3"),
        ("0.5", "raise RuntimeError('boom in the trainer')", r"RuntimeError: boom in the trainer"),
        (
            "0.5",
            "import nonexistent_module_xyz",
            r"ModuleNotFoundError: No module named 'nonexistent_module_xyz'",
        ),
        (
            "float('nan')",
            "pass",
            r"code 2.*t: error: metrics must be finite numbers, got "
            r"test_rmse=nan: the run is not committed",
        ),
        ("0.5", "run_job = lambda *a: 0", r"ended without writing metrics.json"),
    ],
)
def test_a_failing_training_script_is_one_clear_error(tmp_path: Path, metric: str, extra: str,
                                                      message: str) -> None:  # fmt: skip
    code = _project(tmp_path, metric, extra)
    with pytest.raises(TrainingError, match=message) as err:
        _train(tmp_path, code)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs" / "train" / "k1" / "metrics.json").exists()


def test_a_model_its_flavour_cannot_load_is_refused(tmp_path: Path) -> None:
    code = _project(tmp_path)
    trained = _train(tmp_path, code)
    run_dir = Path(trained.run_dir)  # type: ignore[attr-defined]
    wrong = MODEL.replace("nn.Linear(n, 1)", "nn.Linear(n, 3)")
    (run_dir / "code" / "model.py").write_text(wrong)
    with pytest.raises(ConfigError, match=r"mlflow.flavour pytorch: model.py:Net cannot load "
                       r".*model.pt: RuntimeError: Error\(s\) in loading state_dict"):  # fmt: skip
        load_trained("pytorch", run_dir, f"{code}/model.py:Net", code)
    (run_dir / "model.pt").unlink()
    with pytest.raises(ConfigError, match=r"the training script saved no model.pt"):
        load_trained("pytorch", run_dir, f"{code}/model.py:Net", code)


# -- the project file ------------------------------------------------------------------------
def test_aif_init_writes_a_project_that_resolves(tmp_path: Path) -> None:
    dest = tmp_path / "my proj"
    files = init_project("crop-model", dest, "startup-b")
    names = {f.relative_to(dest).as_posix() for f in files}
    assert {"aifactory.yaml", "features.py", "model.py", "train.py", "flow.py",
            ".gitignore"} <= names  # fmt: skip
    proj = load_project(dest / "aifactory.yaml")
    assert proj.name == proj.model.name == "crop-model" and proj.startup == "startup-b"
    _, over = project_overrides(dest / "aifactory.yaml")
    assert over["training.script"] == str(dest / "train.py")
    assert over["features"]["function"] == f"{dest}/features.py:yield_features"
    assert over["mlflow.model_class"] == f"{dest}/model.py:YieldNet"
    cfg = load_profile("local", over, env={"AIF_HOME": str(tmp_path / "h")})
    assert cfg.training.script == str(dest / "train.py") and cfg.mlflow.flavour == "pytorch"
    assert cfg.features["key"] == "reading_id" and "clean" not in cfg.features
    assert cfg.promotion.metric == "test_rmse" and cfg.training.gpus_per_node == 1
    with pytest.raises(ConfigError, match=r"exists and is not empty: nothing written"):
        init_project("crop-model", dest)
    with pytest.raises(ConfigError, match=r"a project name is 2-63 lower-case letters"):
        init_project("Bad Name", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("name: x\n", "name: x\nflavor: pytorch\n", 1),
            r"flavor: unknown key \(valid keys: data, deploy, description, features, model, name, "
            r"startup, train\)",
        ),
        (
            lambda t: t.replace("  script: train.py", "  script: train.py\n  epochs: 3"),
            r"train.epochs: unknown key \(valid keys: config, resources, script, trainer\)",
        ),
        (
            lambda t: t.replace("flavour: pytorch", "flavour: keras"),
            r"model.flavour: Input should be 'pytorch', 'sklearn', 'pyfunc' or 'tabular'",
        ),
        (
            lambda t: t.replace("script: train.py", "script: train.py\n  trainer: tabular"),
            r"train: Value error, give either script \(your own trainer\) or trainer: tabular",
        ),
        (
            lambda t: t.replace("flavour: pytorch", "flavour: tabular"),
            r"model.flavour tabular is the reference trainer's",
        ),
        (
            lambda t: t.replace("script: train.py", "trainer: tabular"),
            r"model.flavour pytorch: the tabular trainer saves the tabular flavour",
        ),
        (
            lambda t: t.replace(
                "script: train.py", "trainer: tabular\n  config: {depth: 3}"
            ).replace("flavour: pytorch", "flavour: tabular"),
            r"train.config.depth: not a setting of the tabular trainer",
        ),
        (
            lambda t: t.replace("script: train.py", "script: nothere.py"),
            r"train.script nothere.py: no such file",
        ),
        (lambda t: t + "  - bad", r"invalid YAML at line"),
    ],
)
def test_bad_project_files_are_one_line_errors(tmp_path: Path, edit: object,
                                               message: str) -> None:  # fmt: skip
    (tmp_path / "train.py").write_text("")
    text = textwrap.dedent("""\
        name: x
        startup: startup-b
        data: {dataset: agriculture-fields}
        features: {function: f.py:g, key: k, target: t}
        train:
          script: train.py
        model:
          name: x
          flavour: pytorch
          class: model.py:Net
          metric: test_rmse
    """)
    (tmp_path / "aifactory.yaml").write_text(edit(text))  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message) as err:
        project_overrides(tmp_path / "aifactory.yaml")
    assert "\n" not in str(err.value) and str(err.value).startswith("project ")


def test_profile_refuses_a_script_with_the_reference_flavour(tmp_path: Path) -> None:
    (tmp_path / "t.py").write_text("")
    env = {"AIF_HOME": str(tmp_path / "h")}
    with pytest.raises(ConfigError, match=r"needs mlflow.flavour pytorch, sklearn or pyfunc"):
        load_profile("local", {"training.script": str(tmp_path / "t.py")}, env=env)
    with pytest.raises(ConfigError, match=r"flavour sklearn: needs training.script"):
        load_profile("local", {"mlflow.flavour": "sklearn"}, env=env)
    with pytest.raises(ConfigError, match=r"flavour pytorch needs model_class"):
        load_profile("local", {"mlflow.flavour": "pytorch",
                               "training.script": str(tmp_path / "t.py")}, env=env)  # fmt: skip


def test_our_pyfunc_classes_are_typed_so_mlflow_does_not_warn() -> None:
    """MLflow warns "Add type hints to the predict method" (under its own simplefilter
    "once", which no filter of ours overrides) for an untyped predict; ours are typed
    (issue 16: the coloured warning landed in every registration's log)."""
    import warnings

    from mlflow.pyfunc import PythonModel

    from aifactory.tasks.models.pyfunc_model import ProjectPyfunc, TabularPyfunc

    warnings.onceregistry.clear()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")

        class Skips(PythonModel):
            _skip_type_hint_validation = True

            def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
                return model_input

        class Plain(PythonModel):
            def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
                return model_input

    hints = [w for w in seen if "Add type hints" in str(w.message)]
    assert len(hints) == 1  # Plain's; none for Skips
    # Ours are typed (no warning, no private MLflow switch): predict takes a DataFrame.
    import pandas as pd

    for cls in (TabularPyfunc, ProjectPyfunc):
        assert cls().predict_type_hints.input is pd.DataFrame


def test_the_embedded_default_is_the_mobility_project() -> None:
    """`aif run` outside any project and `aif run --project examples/mobility-trips` train
    the same thing: the default profile's features and trainer are that project's."""
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.core.project import EXAMPLES

    startup, over = project_overrides(EXAMPLES / "mobility-trips")
    assert startup == "startup-a" and over["training.payload"] == "tabular"
    plain, project = load_profile("local", env={}), load_profile("local", over, env={})
    assert project.features == plain.features
    assert project.training == plain.training and project.mlflow == plain.mlflow
    assert project.dataspace.dataset == plain.dataspace.dataset == "mobility-trips"
