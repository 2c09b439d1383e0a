"""How a project's trained model is saved, checked, hashed and registered: its flavour.

The flavour is the profile's (or project's) ``mlflow.flavour``:

- ``tabular``: the reference MLP (``model.pt`` with its architecture and normalisation).
- ``pytorch``: ``model.pt`` holds a state dict; ``mlflow.model_class`` (FILE.py:CLASS or
  module:CLASS) is built with the keyword arguments in ``model_init.json`` (if any) and loads
  it strictly. The weights' hash is over the tensors, not the file's bytes.
- ``sklearn``: ``model.pkl``, a pickled estimator with ``predict``.
- ``pyfunc``: ``mlflow.python_model`` (FILE.py:CLASS), an ``mlflow.pyfunc.PythonModel``
  whose ``load_context`` reads ``context.artifacts["model"]``, the run's ``model/`` folder.

Every flavour but the reference one registers as one pyfunc (tasks/models/pyfunc_model.py:
``ProjectPyfunc``): it
carries the project's code (the run's ``code/`` copy), featurises raw data-space rows with
the project's own feature function, standardises them with the train split's fit (as
``job.split()`` gave them to the trainer) and calls the model. Nothing of the user's is
pickled: the classes are imported from the carried code when the model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

from aifactory.tasks.core.errors import ConfigError

MODEL_FILE = {"tabular": "model.pt", "pytorch": "model.pt", "sklearn": "model.pkl",
              "pyfunc": "model"}  # fmt: skip
INIT_FILE = "model_init.json"


def model_path(flavour: str, run_dir: str | Path) -> Path:
    return Path(run_dir) / MODEL_FILE[flavour]


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted). A
    PyTorch state dict (``.pt``/``.pth``) counts by its tensors: ``torch.save`` writes a new
    serialization id into every file, so the same weights never give the same bytes."""
    from aifactory.tasks.core.jobfiles import check_job_tree

    h = hashlib.sha256()
    files = check_job_tree(path)  # a job's output: a link in it is refused, never followed
    for f in files:
        if f != path:
            h.update(f"\n{f.relative_to(path).as_posix()}\n".encode())
        tensors = _state_dict_digest(f) if f.suffix in (".pt", ".pth") else None
        h.update(tensors.encode() if tensors else f.read_bytes())
    return h.hexdigest()


def _state_dict_digest(path: Path) -> str | None:
    """sha256 over a saved state dict's tensors (sorted by name), or None for a file that
    is not one (it then counts by its bytes)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    h = hashlib.sha256(b"state-dict")
    for name, tensor in sorted(state.items()):
        h.update(str(name).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def artifact_sha256(flavour: str, run_dir: str | Path) -> str:
    """What ``aif replay`` compares: the weights (pytorch: the state dict's tensors, sorted
    by name, as the reference payload's weights.sha256), or the saved model's bytes."""
    from aifactory.tasks.core.jobfiles import check_job_tree

    path = model_path(flavour, run_dir)
    if flavour == "pytorch":
        import torch

        check_job_tree(path)  # the job's model: never read through a link it planted
        state = torch.load(path, map_location="cpu", weights_only=True)
        h = hashlib.sha256()
        for name, tensor in sorted(state.items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()
    return tree_sha256(path)  # which checks the tree the same way


def load_trained(flavour: str, run_dir: str | Path, ref: str | None, source_dir: str | Path,
                 ) -> Any:  # fmt: skip
    """The model of a finished run, its class taken from the run's copy of the code (what
    the registered model will carry), not from the project's folder."""
    from aifactory.tasks.stages.training import CODE_DIR

    init = Path(run_dir) / INIT_FILE
    in_copy = absolute_ref(relative_ref(ref, source_dir), str(Path(run_dir) / CODE_DIR))
    return load_model(flavour, model_path(flavour, run_dir), in_copy,
                      init if init.exists() else None)  # fmt: skip


def check_loads(flavour: str, run_dir: str | Path, ref: str | None, source_dir: str | Path,
                run_as: str | None = None) -> None:  # fmt: skip
    """The trained model loads as its flavour loads it (ConfigError, one line, when not).
    Loading runs the project's code (its class, a pickle): with ``run_as`` (a start-up's
    Unix user on a site, where the orchestrator is root) it runs in a child process as that
    user, with an environment of nothing but PATH, HOME and the locale: never as root."""
    import subprocess
    import sys

    from aifactory.tasks.core.jobfiles import as_user, check_job_tree

    check_job_tree(model_path(flavour, run_dir))
    if run_as is None:  # the submitting user's own code, as that user (no site)
        load_trained(flavour, run_dir, ref, source_dir)
        return
    cmd, env = as_user(run_as, [sys.executable, "-m", __name__, flavour, str(run_dir),
                                ref or "", str(source_dir)])  # fmt: skip
    try:
        res = subprocess.run(cmd, env=env, cwd=str(run_dir), capture_output=True, text=True,
                             timeout=LOAD_CHECK_TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise ConfigError(f"mlflow.flavour {flavour}: loading the model of {run_dir} as "
                          f"{run_as} took over {LOAD_CHECK_TIMEOUT_S} s") from None  # fmt: skip
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr or res.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {res.returncode}"
        raise ConfigError(f"{last[:400]} (loaded as {run_as})" if last.startswith("mlflow.")
                          else f"mlflow.flavour {flavour}: loading the model of {run_dir} as "
                          f"{run_as} failed: {last[:300]}")  # fmt: skip


LOAD_CHECK_TIMEOUT_S = 600


def _ref_label(ref: str | None) -> str:
    if not ref:
        return "?"
    mod, _, attr = ref.rpartition(":")
    return f"{os.path.basename(mod)}:{attr}" if mod.endswith(".py") else ref


def load_model(flavour: str, path: str | Path, ref: str | None,
               init: str | Path | None = None) -> Any:  # fmt: skip
    """The trained model at ``path`` as the flavour loads it (``init``: the pytorch class's
    keyword arguments, JSON); ConfigError (one line) when it cannot."""
    from aifactory.tasks.stages.features import load_ref

    path = Path(path)
    where = f"mlflow.flavour {flavour}"
    if not path.exists():
        raise ConfigError(f"{where}: the training script saved no {path.name} in {path.parent} "
                          f"(the {flavour} flavour loads {MODEL_FILE[flavour]})")  # fmt: skip
    try:
        if flavour == "pytorch":
            import torch

            cls = load_ref(str(ref), "mlflow.model_class")
            kwargs = json.loads(Path(init).read_text()) if init else {}
            if not isinstance(kwargs, dict):
                raise TypeError(f"{INIT_FILE} is not a JSON object of keyword arguments")
            module = cls(**kwargs)
            state = torch.load(path, map_location="cpu", weights_only=True)
            module.load_state_dict(state, strict=True)
            module.eval()
            return module
        if flavour == "sklearn":
            with open(path, "rb") as fh:
                est = pickle.load(fh)
            if not callable(getattr(est, "predict", None)):
                raise TypeError(f"a {type(est).__name__} has no predict()")
            return est
        if flavour == "pyfunc":
            cls = load_ref(str(ref), "mlflow.python_model")
            model = cls()
            if callable(getattr(model, "load_context", None)):
                model.load_context(_Context({"model": str(path)}))
            if not callable(getattr(model, "predict", None)):
                raise TypeError(f"{_ref_label(ref)} has no predict()")
            return model
    except ConfigError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{where}: {_ref_label(ref) if flavour != 'sklearn' else 'pickle'} "
                          f"cannot load {path}: {type(exc).__name__}: {msg}") from None  # fmt: skip
    raise ConfigError(f"{where}: not a flavour a project's model can have")


class _Context:
    """The part of MLflow's PythonModelContext a project's model reads: its artifacts."""

    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts
        self.model_config: dict[str, Any] = {}


def relative_ref(ref: str | None, code_dir: str | Path) -> str | None:
    """FILE.py:NAME under ``code_dir`` as a path relative to it (the registered model carries
    the code, so it must not name the training host's folders); others unchanged."""
    if not ref or ".py:" not in ref:
        return ref
    file, attr = ref.rsplit(":", 1)
    try:
        rel = Path(file).resolve().relative_to(Path(code_dir).resolve())
    except ValueError:
        return ref
    return f"{rel.as_posix()}:{attr}"


def pyfunc_spec(flavour: str, ref: str | None, fset: Any, source_dir: str | Path) -> dict[str, Any]:
    """What :class:`ProjectPyfunc` needs besides the model and the code."""
    fc = dict(fset.feature_config)
    if "function" in fc:
        fc["function"] = relative_ref(fc["function"], source_dir)
    return {
        "flavour": flavour,
        "ref": relative_ref(ref, source_dir),
        "feature_config": fc,
        "feature_columns": list(fset.feature_columns),
        "normalisation": {c: fset.normalisation[c] for c in fset.feature_columns},
    }


def absolute_ref(ref: str | None, code_dir: str) -> str | None:
    if not ref or ".py:" not in ref:
        return ref
    file, attr = ref.rsplit(":", 1)
    return f"{file if os.path.isabs(file) else os.path.join(code_dir, file)}:{attr}"


def _main(argv: list[str]) -> int:
    """``python -m aifactory.tasks.models.flavours FLAVOUR RUN_DIR REF SOURCE_DIR``: the load
    check of ``check_loads``, run as the start-up's user; its one-line error on stderr."""
    import sys

    flavour, run_dir, ref, source_dir = argv
    try:
        load_trained(flavour, run_dir, ref or None, source_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(_main(sys.argv[1:]))
