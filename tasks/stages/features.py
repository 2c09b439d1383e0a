"""Feature engineering: the platform's part of it, whatever the project.

Each lake file of a snapshot is one partition. ``featurize_partition`` reads it, calls the
project's **feature function** (profile ``features.function``: ``module:function`` or
``path/to/file.py:function``; the embedded default is the bundled mobility project's,
examples/mobility-trips/features.py), checks
what it returned, assigns every row to train/val/test by a stable hash of its key (so the
test set stays the test set across nightly runs), writes one Parquet file per split under
fixed names (idempotent overwrite) and returns the counts and the train split's sums, from
which the driver fits the normalisation on the train split only.

A feature function is ``fn(frame: pandas.DataFrame, config: dict) -> DataFrame`` (or
``(DataFrame, {reason: rows dropped})``); ``config`` is the resolved ``features`` section
(its own settings are under ``config["params"]``). It returns the key column, the target
column and its numeric features; every other column is a feature, in the order returned.
What the platform keeps, whoever wrote the function: the split by key hash, statistics
fitted on the train split only, deterministic output files, the row accounting, and a cache
key that includes the function's source.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pandas is imported where it is used: a cached run never needs it
    import pandas as pd

# Bump when the transform's code changes: part of the FeatureSet id (cache key).
FEATURES_VERSION = "3"
SPLITS = ("train", "val", "test")

# Keys of a features section (the platform's keys; the function's own are under params).
USER_KEYS = ("function", "key", "target", "split", "params", "text")


def resolve_config(section: dict[str, Any] | None) -> dict[str, Any]:
    """The profile's (or project's) ``features:`` section, checked key by key."""
    from aifactory.tasks.core.errors import ConfigError

    if not section:
        raise ConfigError("features: no feature function (features.function: "
                          "path/to/file.py:NAME or module:NAME, with key and target)")  # fmt: skip
    section = dict(section)
    section.pop("version", None)  # a resolved section again: the version is the platform's
    return _resolve_user_config(section)


def _check_split(split: Any, where: str) -> dict[str, int]:
    from aifactory.tasks.core.errors import ConfigError

    if not isinstance(split, dict):
        raise ConfigError(f"{where}: must be a mapping of {', '.join(SPLITS)} to percentages")
    out = {}
    for name in SPLITS:
        pct = split.get(name)
        if not isinstance(pct, int) or isinstance(pct, bool) or pct < 0:
            raise ConfigError(f"{where}.{name}: expected a non-negative integer percentage, "
                              f"got {pct!r}")  # fmt: skip
        out[name] = pct
    extra = sorted(set(split) - set(SPLITS))
    if extra:
        raise ConfigError(f"{where}: unknown splits {extra} (valid: {', '.join(SPLITS)})")
    if sum(out.values()) != 100:
        raise ConfigError(f"{where}: percentages add up to {sum(out.values())}, not 100")
    return out


def _resolve_user_config(section: dict[str, Any]) -> dict[str, Any]:
    """A features section naming the project's own function: function, key, target, split
    (default 80/10/10), params (anything JSON, handed to the function)."""
    from aifactory.tasks.core.errors import ConfigError

    unknown = sorted(set(section) - set(USER_KEYS))
    if unknown:
        raise ConfigError(f"features.{unknown[0]}: unknown key for a project's own feature "
                          f"function (valid keys: {', '.join(USER_KEYS)})")  # fmt: skip
    for name in ("function", "key", "target"):
        if not isinstance(section.get(name), str) or not section[name].strip():
            raise ConfigError(f"features.{name}: required with a project's own feature "
                              f"function (a column name or module:function), got "
                              f"{section.get(name)!r}")  # fmt: skip
    if section["key"] == section["target"]:
        raise ConfigError(f"features.target: the same column as features.key ({section['key']!r})")
    params = section.get("params", {})
    try:
        params = json.loads(json.dumps(params, sort_keys=True))
    except (TypeError, ValueError):
        raise ConfigError("features.params: must be plain data (JSON: mappings, lists, "
                          "strings, numbers)") from None  # fmt: skip
    text = section.get("text", [])
    if not (isinstance(text, list) and all(isinstance(c, str) and c.strip() for c in text)):
        raise ConfigError(f"features.text: expected a list of column names, got {text!r}")
    clash = sorted({section["key"], section["target"]} & set(text))
    if clash or len(set(text)) != len(text):
        raise ConfigError(f"features.text: {clash or text} repeats the key, the target or "
                          "itself")  # fmt: skip
    # Checked without running it: the orchestrator never imports a start-up's code (on a
    # site it runs as root; the function runs only in the start-up's own jobs).
    check_ref(section["function"], "features.function")
    extra = {"text": list(text)} if text else {}  # absent when unused: ids stay as they were
    return {
        **extra,
        "version": FEATURES_VERSION,
        "function": section["function"],
        "key": section["key"],
        "target": section["target"],
        "split": _check_split(section.get("split", {"train": 80, "val": 10, "test": 10}),
                              "features.split"),
        "params": params,
    }  # fmt: skip


def load_function(ref: str) -> Callable[..., Any]:
    """The feature function named ``module:function`` or ``path/to/file.py:function``."""
    return load_ref(ref, "features.function")


def _split_ref(ref: str, what: str) -> tuple[str, str]:
    from aifactory.tasks.core.errors import ConfigError

    mod_name, sep, attr = ref.rpartition(":")
    if not sep or not mod_name or not attr.isidentifier():
        raise ConfigError(f"{what} {ref!r}: expected module:function or path/to/file.py:function")
    return mod_name, attr


def _find_module(name: str, path: list[str]) -> Any:
    """The module spec of ``name`` (dotted) found on ``path`` without importing anything:
    ``importlib.util.find_spec`` would import (run) the parent packages."""
    import importlib.machinery

    if name in sys.modules and getattr(sys.modules[name], "__spec__", None) is not None:
        return sys.modules[name].__spec__
    spec: Any = None
    search: list[str] = path
    for i, part in enumerate(name.split(".")):
        if i:
            if not spec.submodule_search_locations:
                return None  # a module, not a package: it has no submodules
            search = list(spec.submodule_search_locations)
        spec = importlib.machinery.PathFinder.find_spec(part, search)
        if spec is None and i == 0:
            spec = importlib.machinery.BuiltinImporter.find_spec(part)
            spec = spec or importlib.machinery.FrozenImporter.find_spec(part)
        if spec is None:
            return None
    return spec


def _top_level_names(tree: Any) -> tuple[set[str], bool]:
    """Names a module defines at its top level (functions, classes, assignments, imports);
    True when it may define others that cannot be seen without running it (``import *``,
    a module ``__getattr__``)."""
    import ast

    names: set[str] = set()
    dynamic = False
    todo = list(tree.body)  # the module's statements, and those of its if/try/with/for blocks
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
            dynamic |= node.name == "__getattr__"
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    dynamic = True
                else:
                    names.add(alias.asname or alias.name.split(".")[0])
        else:  # if / try / with / for / while at the top level: their blocks run too
            for field in ("body", "orelse", "finalbody"):
                todo.extend(getattr(node, field, None) or [])
            for handler in getattr(node, "handlers", None) or []:
                todo.extend(handler.body)
    return names, dynamic


def _unimportable(tree: Any, path: list[str]) -> str | None:
    """The first module that an unconditional top-level import of ``tree`` names and that
    is not installed (an import inside ``try`` or a function may be optional)."""
    import ast

    for node in tree.body:
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module]
        else:
            continue
        for mod in mods:
            top = mod.split(".")[0]
            if _find_module(top, path) is None:
                return top
    return None


def _why_not_a_file(path: str) -> str:
    """Why ``path`` cannot be read here: absent, or closed to this user (a start-up's jobs
    run as its own user, who must be able to read its project's folder)."""
    import pwd

    try:
        os.stat(path)
    except PermissionError:
        try:
            who = pwd.getpwuid(os.getuid()).pw_name
        except KeyError:
            who = f"uid {os.getuid()}"
        return (
            f"{path} cannot be reached by user {who}: a folder above it is closed to it "
            "(a start-up's jobs run as its own user: put the project where it can read)"
        )
    except OSError:
        pass
    return f"no such file {path}"


def check_ref(ref: str, what: str) -> Path | None:
    """Check ``module:NAME`` or ``path/to/file.py:NAME`` **without running its code**: the
    file (or module source) exists and parses, defines ``NAME`` at its top level, and its
    unconditional top-level imports are installed. Returns the source file (None for a
    module without Python source, e.g. a compiled one). A start-up's code runs only in its
    own jobs, as its own user; the orchestrator (root on a site) only reads it."""
    import ast

    from aifactory.tasks.core.errors import ConfigError

    where = f"{what} {ref!r}"
    mod_name, attr = _split_ref(ref, what)
    if mod_name.endswith(".py"):
        path: Path | None = Path(os.path.abspath(mod_name))
        assert path is not None
        if not path.is_file():
            raise ConfigError(f"{where}: no such file {path}")
        search = [str(path.parent), *sys.path]
    else:
        search = list(sys.path)
        spec = _find_module(mod_name, search)
        if spec is None:
            raise ConfigError(f"{where}: the module does not import: ModuleNotFoundError: "
                              f"No module named {mod_name!r}")  # fmt: skip
        origin = getattr(spec, "origin", None)
        path = Path(origin) if origin and str(origin).endswith(".py") else None
        if path is None:
            return None  # compiled or built in: found, and nothing to read
    try:
        source = path.read_bytes()
        tree = ast.parse(source, filename=str(path))
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        msg = " ".join(str(getattr(exc, "msg", exc)).split())[:200]
        raise ConfigError(f"{where}: the module does not import: SyntaxError: {msg}"
                          + (f" (line {line})" if line else "")) from None  # fmt: skip
    missing = _unimportable(tree, search)
    if missing:
        raise ConfigError(f"{where}: the module does not import: ModuleNotFoundError: No "
                          f"module named {missing!r}")  # fmt: skip
    names, dynamic = _top_level_names(tree)
    if attr not in names and not dynamic:
        raise ConfigError(f"{where}: {mod_name} has no function or class {attr!r}")
    return path


_IMPORT_LOCK = threading.RLock()


def _import_file(name: str, path: str) -> Any:
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def load_ref(ref: str, what: str) -> Callable[..., Any]:
    """The function or class named ``module:NAME`` or ``path/to/file.py:NAME`` (a file is
    imported by its path, its folder first on sys.path, so a project's own ``features.py``
    or ``model.py`` never collides with another module of that name); ``what`` names the
    setting in the one-line ConfigError."""
    from aifactory.tasks.core.errors import ConfigError

    where = f"{what} {ref!r}"
    mod_name, attr = _split_ref(ref, what)
    try:
        if mod_name.endswith(".py"):
            path = os.path.abspath(mod_name)
            if not os.path.isfile(path):
                raise ConfigError(f"{where}: {_why_not_a_file(path)}")
            name = "aif_features_" + hashlib.sha256(path.encode()).hexdigest()[:12]
            # One import at a time: a Dask worker's threads load the same file at once,
            # and a module is in sys.modules before its body has run.
            with _IMPORT_LOCK:
                module = sys.modules.get(name)
                if module is None:
                    module = _import_file(name, path)
        else:
            module = importlib.import_module(mod_name)
    except ConfigError:
        raise
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{where}: the module does not import: {type(exc).__name__}: "
                          f"{msg}") from None  # fmt: skip
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{where}: {mod_name} has no function or class {attr!r}")
    return cast(Callable[..., Any], fn)


def call_features(fn: Callable[..., Any], df: Any, config: dict[str, Any],
                  inference: bool = False) -> Any:  # fmt: skip
    """Call a feature function; at prediction time (``inference``) a function that takes
    an ``inference`` argument is told so (it then keeps every row and needs no target)."""
    if inference:
        try:
            takes = "inference" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            return fn(df, config, inference=True)
    return fn(df, config)


def portable_ref(ref: str) -> str:
    """A feature function's reference without where its project lies (``/home/me/proj/
    features.py:f`` -> ``features.py:f``): the cache key has the code's hash instead, so the
    same project in another folder or clone keeps its feature set ids."""
    mod, sep, attr = ref.rpartition(":")
    return f"{os.path.basename(mod)}:{attr}" if sep and mod.endswith(".py") else ref


def function_source_hash(ref: str) -> str:
    """sha256 (16 hex) of the feature function's source file: part of the cache key. The
    file is found and read, never imported (``check_ref``)."""
    path = check_ref(ref, "features.function")
    data = path.read_bytes() if path is not None else ref.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def split_of(keys: pd.Series, split_pct: dict[str, int]) -> np.ndarray:
    """Stable split assignment: the same key lands in the same split on every run."""
    import pandas as pd

    hashed = pd.util.hash_pandas_object(keys.astype("string"), index=False).to_numpy()
    bucket = (hashed % np.uint64(100)).astype(np.int64)
    out = np.empty(len(keys), dtype=object)
    lo = 0
    for name in SPLITS:
        hi = lo + int(split_pct[name])
        out[(bucket >= lo) & (bucket < hi)] = name
        lo = hi
    return out


def _write_parquet(fs: Any, path: str, table: pa.Table) -> str:
    """Serialise in memory, then commit the whole file atomically; return its sha256."""
    from aifactory.tasks.doors.lake import atomic_write_bytes

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", write_statistics=True)
    data = buf.getvalue()
    atomic_write_bytes(fs, path, data)
    return hashlib.sha256(data).hexdigest()


def featurize_partition(
    index: int,
    src_url: str,
    out_url: str,
    storage_options: dict[str, Any],
    config: dict[str, Any],
) -> dict[str, Any]:
    """Featurise one lake file with the project's feature function. Runs on a Dask worker
    (possibly a Slurm job). A failing function or an output that breaks the contract is a
    DataError naming the function, the partition and what is wrong."""
    from aifactory.tasks.core.errors import DataError

    ref = config["function"]
    fs, src_path = fsspec.core.url_to_fs(src_url, **storage_options)
    with fs.open(src_path, "rb") as fh:
        table = pq.read_table(fh)
    df = table.to_pandas()
    rows_in = len(df)
    where = f"features function {ref} on partition {index} ({src_url})"
    fn = load_function(ref)
    try:
        out = fn(df, config)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:300]
        raise DataError(f"{where}: raised {type(exc).__name__}: {msg}") from None
    feats, dropped = out if isinstance(out, tuple) else (out, {})
    cols = _check_output(feats, dropped, config, rows_in, where)
    splits = split_of(feats[config["key"]], config["split"])
    target = config["target"]
    ofs, out_path = fsspec.core.url_to_fs(out_url, **storage_options)
    result: dict[str, Any] = {"index": index, "rows_in": rows_in, "dropped": dict(dropped),
                              "splits": {}, "columns": cols}  # fmt: skip
    unaccounted = rows_in - len(feats) - sum(dropped.values())
    if unaccounted > 0:  # rows a function dropped without saying why
        result["dropped"]["dropped_by_feature_function"] = unaccounted
    text = list(config.get("text", []))
    for name in SPLITS:
        part = feats.loc[splits == name].reset_index(drop=True)
        path = f"{out_path.rstrip('/')}/{name}/part-{index:05d}.parquet"
        schema = pa.schema(
            [pa.field(config["key"], pa.string(), nullable=False)]
            + [pa.field(c, pa.string(), nullable=False) for c in text]
            + [pa.field(c, pa.float32(), nullable=False) for c in cols]
            + [pa.field(target, pa.float32(), nullable=False)]
        )
        frame = part[[config["key"], *text, *cols, target]].copy()
        for c in [config["key"], *text]:
            frame[c] = frame[c].astype("string")
        tbl = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        digest = _write_parquet(ofs, path, tbl)
        entry: dict[str, Any] = {
            "file": f"{out_url.rstrip('/')}/{name}/part-{index:05d}.parquet",
            "rows": len(part),
            "sha256": digest,
        }
        if name == "train":
            vals = part[[*cols, target]].to_numpy(dtype="float64")
            entry["sum"] = vals.sum(axis=0).tolist()
            entry["sumsq"] = (vals * vals).sum(axis=0).tolist()
        result["splits"][name] = entry
    return result


def _check_output(feats: Any, dropped: Any, config: dict[str, Any], rows_in: int,
                  where: str) -> list[str]:  # fmt: skip
    """The feature columns of a feature function's output, after checking its contract:
    a DataFrame with the key and target, numeric finite features, no more rows than read."""
    import pandas as pd

    from aifactory.tasks.core.errors import DataError

    if not isinstance(feats, pd.DataFrame):
        raise DataError(f"{where}: returned {type(feats).__name__}, expected a pandas DataFrame")
    if not isinstance(dropped, dict):
        raise DataError(f"{where}: its drop counts are {type(dropped).__name__}, not a dict")
    key, target = config["key"], config["target"]
    text = list(config.get("text", []))
    for role, col in (("key", key), ("target", target), *(("text", c) for c in text)):
        if col not in feats.columns:
            raise DataError(f"{where}: the output has no {role} column {col!r} "
                            f"(columns: {', '.join(map(str, feats.columns))[:200]})")  # fmt: skip
    if feats[key].isna().any():
        raise DataError(f"{where}: key column {key!r} has nulls")
    if len(feats) > rows_in:
        raise DataError(f"{where}: returned {len(feats)} rows from {rows_in} (rows may only be "
                        "dropped, never added)")  # fmt: skip
    for col in text:  # free text for the trainer (a language model's), kept as it is
        series = feats[col]
        if not (pd.api.types.is_string_dtype(series) or series.dtype == object):
            raise DataError(f"{where}: text column {col!r} is {series.dtype}, expected strings")
        bad = int(series.map(lambda v: not isinstance(v, str)).sum())
        if bad:
            raise DataError(f"{where}: text column {col!r} has {bad} missing or non-string "
                            "values")  # fmt: skip
    cols = [str(c) for c in feats.columns if c not in (key, target, *text)]
    if not cols and not text:
        raise DataError(f"{where}: the output has no feature column besides {key!r} and "
                        f"{target!r}")  # fmt: skip
    for col in [*cols, target]:
        series = feats[col]
        if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
            raise DataError(f"{where}: column {col!r} is {series.dtype}, expected a number "
                            "(int, float or bool)")  # fmt: skip
        vals = series.to_numpy(dtype="float64", na_value=np.nan)
        if not np.isfinite(vals).all():
            raise DataError(f"{where}: column {col!r} has {int((~np.isfinite(vals)).sum())} "
                            "missing or infinite values")  # fmt: skip
    return cols


def fit_normalisation(
    results: list[dict[str, Any]], columns: list[str]
) -> dict[str, dict[str, float]]:
    """Mean/std per column from the train split's sums only."""
    n = sum(r["splits"]["train"]["rows"] for r in results)
    if n == 0:
        raise ValueError("the train split is empty: no rows left after cleaning")
    s = np.sum([r["splits"]["train"]["sum"] for r in results], axis=0)
    sq = np.sum([r["splits"]["train"]["sumsq"] for r in results], axis=0)
    mean = s / n
    var = np.maximum(sq / n - mean * mean, 0.0)
    std = np.sqrt(var)
    return {
        c: {"mean": float(m), "std": float(sd if sd > 1e-12 else 1.0)}
        for c, m, sd in zip(columns, mean, std, strict=True)
    }


def featureset_id(snapshot_hash: str, config: dict[str, Any], code: str = "") -> str:
    """The feature set's identity: its input snapshot, its config and its code."""
    blob = json.dumps({"snapshot": snapshot_hash, "config": config, "code": code}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
