"""Feature transform: deterministic split, exact row accounting, train-only normalisation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from aifactory.tasks.core.config import default_features
from aifactory.tasks.stages import features as F


def _raw(n: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "trip_id": [f"T{i:09d}" for i in range(n)],
        "pickup_ts": pd.Timestamp("2025-01-01", tz="UTC")
        + pd.to_timedelta(rng.integers(0, 365 * 24 * 3600, n), unit="s"),
        "pickup_zone": rng.integers(1, 61, n).astype("int32"),
        "dropoff_zone": rng.integers(1, 61, n).astype("int32"),
        "distance_km": rng.gamma(2.0, 3.0, n),
        "passenger_count": rng.integers(1, 5, n).astype("int8"),
        "vendor": rng.choice(["V1", "V2", "V3"], n),
        "payment_type": rng.choice(["card", "cash", None], n),
        "weather": rng.choice(["clear", "rain", "snow"], n),
        "temperature_c": np.where(rng.random(n) < 0.05, np.nan, rng.normal(12, 8, n)),
        "duration_min": rng.gamma(3.0, 6.0, n) - 2.0,
    })  # fmt: skip


MOBILITY = F.resolve_config(default_features())  # the bundled mobility project's section
MOBILITY_FN = F.load_function(MOBILITY["function"])


def _mobility_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c not in ("trip_id", "duration_min")]


def test_the_default_features_are_the_bundled_mobility_projects() -> None:
    assert MOBILITY["function"].endswith("examples/mobility-trips/features.py:mobility_features")
    assert (MOBILITY["key"], MOBILITY["target"]) == ("trip_id", "duration_min")
    assert F.portable_ref(MOBILITY["function"]) == "features.py:mobility_features"


def test_split_is_stable_and_proportional() -> None:
    keys = pd.Series([f"T{i:09d}" for i in range(20000)])
    a = F.split_of(keys, MOBILITY["split"])
    b = F.split_of(keys.sample(frac=1, random_state=3).sort_index(), MOBILITY["split"])
    assert (a == b).all()
    share = pd.Series(a).value_counts(normalize=True)
    assert abs(share["train"] - 0.8) < 0.02 and abs(share["test"] - 0.1) < 0.02


def test_mobility_features_account_for_every_row() -> None:
    df = _raw()
    feats, dropped = MOBILITY_FN(df, MOBILITY)
    assert len(feats) + sum(dropped.values()) == len(df)
    assert "duration_min_out_of_range" in dropped
    assert not feats[_mobility_columns(feats)].isna().any().any()


def test_inference_keeps_all_rows_and_matches_training() -> None:
    df = _raw(500)
    train, _ = MOBILITY_FN(df, MOBILITY)
    infer, _ = F.call_features(MOBILITY_FN, df.drop(columns=["duration_min"]), MOBILITY,
                               inference=True)  # fmt: skip
    assert len(infer) == len(df)
    cols = _mobility_columns(train)
    kept = infer.set_index(df["trip_id"]).loc[train["trip_id"], cols].to_numpy()
    np.testing.assert_array_equal(kept, train[cols].to_numpy())


def test_partition_files_and_normalisation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    df = _raw(3000)
    src = tmp_path / "in.parquet"
    df.to_parquet(src)
    out = f"file://{tmp_path}/features"
    r1 = F.featurize_partition(0, f"file://{src}", out, {}, MOBILITY)
    r2 = F.featurize_partition(0, f"file://{src}", out, {}, MOBILITY)
    assert r1 == r2  # idempotent overwrite, same bytes
    total = sum(s["rows"] for s in r1["splits"].values()) + sum(r1["dropped"].values())
    assert total == 3000
    assert r1["columns"][:2] == ["distance_km", "log_distance"] and len(r1["columns"]) == 23
    norm = F.fit_normalisation([r1], [*r1["columns"], "duration_min"])
    train = pd.read_parquet(tmp_path / "features" / "train" / "part-00000.parquet")
    assert abs(norm["distance_km"]["mean"] - train["distance_km"].astype("float64").mean()) < 1e-3
    assert not list(tmp_path.glob("features/*/*.tmp*"))


def test_featureset_id_changes_with_config() -> None:
    cfg = dict(MOBILITY)
    a = F.featureset_id("h", cfg)
    cfg2 = {**cfg, "split": {"train": 70, "val": 15, "test": 15}}
    assert a == F.featureset_id("h", dict(MOBILITY))
    assert a != F.featureset_id("h", cfg2) and a != F.featureset_id("h2", cfg)


def test_mobility_params_are_checked_by_its_function(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from aifactory.tasks.core.errors import ConfigError, DataError

    cfg = F.resolve_config({**MOBILITY, "split": {"train": 70, "val": 15, "test": 15},
                            "params": {"clean": {"distance_km": [0.1, 100.0]}}})  # fmt: skip
    assert cfg["split"]["train"] == 70
    feats, dropped = MOBILITY_FN(_raw(), cfg)
    assert "distance_km_out_of_range" in dropped or (feats["distance_km"] <= 100).all()
    with pytest.raises(ConfigError, match=r"features.splitt: unknown key"):
        F.resolve_config({**MOBILITY, "splitt": {}})
    with pytest.raises(ConfigError, match=r"add up to 110"):
        F.resolve_config({**MOBILITY, "split": {"train": 90, "val": 10, "test": 10}})
    with pytest.raises(ConfigError, match=r"features: no feature function"):
        F.resolve_config({})
    src = tmp_path / "in.parquet"
    _raw(50).to_parquet(src)
    for params, match in [({"clean": {"vendor": [0, 1]}}, r"params.clean.vendor: expected a "
                           r"numeric column"),
                          ({"clean": {"distance_km": [5, 1]}}, r"\[low, high\]"),
                          ({"categorical": {"colour": ["red"]}}, r"params.categorical.colour"),
                          ({"zonez": 3}, r"params.zonez: unknown")]:  # fmt: skip
        with pytest.raises(DataError, match=rf"mobility_features on partition 0 .*{match}"):
            F.featurize_partition(0, f"file://{src}", f"file://{tmp_path}/o", {},
                                  {**MOBILITY, "params": params})  # fmt: skip


def test_profile_refuses_bad_features(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from aifactory.tasks.core.config import PROFILES_DIR, load_profile
    from aifactory.tasks.core.errors import ConfigError

    p = tmp_path / "p.yaml"
    p.write_text((PROFILES_DIR / "local.yaml").read_text()
                 + "features:\n  function: json:dumps\n  key: k\n  target: t\n"
                 + "  split: {train: 50, val: 10, test: 10}\n")  # fmt: skip
    with pytest.raises(ConfigError, match="add up to 70"):
        load_profile(str(p), env={})


# -- a project's own feature function (issue 14) ------------------------------------------
FIELDS_FN = """
import numpy as np

def yield_features(df, config):
    p = config["params"]
    out = df[["field_id", "yield_t_ha"]].copy()
    out["rain"] = df["rain_mm"] / p["rain_scale"]
    out["n"] = df["nitrogen"].astype("float64")
    out["sandy"] = df["soil"] == "sand"
    return out[df["yield_t_ha"] > 0]

def broken(df, config):
    raise ValueError("no column soil_ph")

def drops_key(df, config):
    return df[["yield_t_ha", "rain_mm"]]

def text_feature(df, config):
    return df[["field_id", "yield_t_ha", "soil"]]

def nan_feature(df, config):
    out = df[["field_id", "yield_t_ha"]].copy()
    out["bad"] = np.where(df["rain_mm"] > 500, np.nan, 1.0)
    return out
"""


def _fields(n: int = 1200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "field_id": [f"F{i:06d}" for i in range(n)],
        "rain_mm": rng.uniform(100, 900, n),
        "nitrogen": rng.integers(0, 200, n).astype("int32"),
        "soil": rng.choice(["sand", "clay", "loam"], n),
        "yield_t_ha": np.where(rng.random(n) < 0.05, 0.0, rng.uniform(2, 9, n)),
    })  # fmt: skip


def _user(tmp_path, fn: str = "yield_features") -> dict:  # type: ignore[no-untyped-def]
    src = tmp_path / "proj" / "features.py"
    src.parent.mkdir(exist_ok=True)
    src.write_text(FIELDS_FN)
    return F.resolve_config({"function": f"{src}:{fn}", "key": "field_id",
                             "target": "yield_t_ha", "params": {"rain_scale": 100.0}})  # fmt: skip


def test_a_projects_own_feature_function_gets_the_platforms_split_and_accounting(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    cfg = _user(tmp_path)
    assert cfg["split"] == {"train": 80, "val": 10, "test": 10}
    src = tmp_path / "in.parquet"
    df = _fields()
    df.to_parquet(src)
    r = F.featurize_partition(3, f"file://{src}", f"file://{tmp_path}/out", {}, cfg)
    assert r["columns"] == ["rain", "n", "sandy"]
    kept = int((df["yield_t_ha"] > 0).sum())
    assert sum(s["rows"] for s in r["splits"].values()) == kept
    assert r["dropped"] == {"dropped_by_feature_function": len(df) - kept}
    test = pd.read_parquet(tmp_path / "out" / "test" / "part-00003.parquet")
    assert list(test.columns) == ["field_id", "rain", "n", "sandy", "yield_t_ha"]
    expect = F.split_of(df.loc[df["yield_t_ha"] > 0, "field_id"].reset_index(drop=True),
                        cfg["split"])  # fmt: skip
    assert len(test) == int((expect == "test").sum())
    norm = F.fit_normalisation([r], [*r["columns"], "yield_t_ha"])
    train = pd.read_parquet(tmp_path / "out" / "train" / "part-00003.parquet")
    assert abs(norm["rain"]["mean"] - train["rain"].astype("float64").mean()) < 1e-4
    # the cache key follows the function's source
    before = F.function_source_hash(cfg["function"])
    (tmp_path / "proj" / "features.py").write_text(FIELDS_FN + "\n# changed\n")
    assert F.function_source_hash(cfg["function"]) != before


def test_feature_function_faults_are_one_line_naming_function_partition_and_cause(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    import pytest

    from aifactory.tasks.core.errors import DataError

    src = tmp_path / "in.parquet"
    _fields(200).to_parquet(src)
    cases = [
        ("broken", r"features function .*features\.py:broken on partition 7 \(file://.*in\.parquet"
                   r"\): raised ValueError: no column soil_ph"),
        ("drops_key", r"drops_key on partition 7 .*: the output has no key column 'field_id'"),
        ("text_feature", r"column 'soil' is (object|str), expected a number"),
        ("nan_feature", r"column 'bad' has \d+ missing or infinite values"),
    ]  # fmt: skip
    for fn, match in cases:
        with pytest.raises(DataError, match=match) as e:
            F.featurize_partition(
                7, f"file://{src}", f"file://{tmp_path}/o", {}, _user(tmp_path, fn)
            )
        assert "\n" not in str(e.value)
    assert not (tmp_path / "o").exists()  # nothing written for a refused partition


def test_feature_function_config_is_checked_before_any_job(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from aifactory.tasks.core.errors import ConfigError

    src = tmp_path / "features.py"
    src.write_text("import nonexistent_package_xyz\n")
    bad = [
        ({"function": "x.py:f", "key": "k", "target": "t", "clean": {}},
         r"features.clean: unknown key for a project's own feature function \(valid keys: "
         r"function, key, target, split, params, text\)"),
        ({"function": "mymod:f", "target": "t"}, r"features.key: required"),
        ({"function": f"{src}:f", "key": "k", "target": "t"},
         r"the module does not import: ModuleNotFoundError: No module named "
         r"'nonexistent_package_xyz'"),
        ({"function": "no-colon", "key": "k", "target": "t"}, r"expected module:function"),
        ({"function": "json:nothing_here", "key": "k", "target": "t"},
         r"json has no function or class 'nothing_here'"),
        ({"function": "json:dumps", "key": "k", "target": "t",
          "split": {"train": 50, "val": 10, "test": 10}}, r"add up to 70"),
    ]  # fmt: skip
    for section, match in bad:
        with pytest.raises(ConfigError, match=match):
            F.resolve_config(section)


def test_text_columns_reach_the_trainer_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``features.text``: free text (a language model's) kept as strings, outside the
    numeric contract and the normalisation; job.text() reads it back per split."""
    import json

    import pytest

    from aifactory.tasks.core.errors import ConfigError, DataError
    from aifactory.tasks.payloads.job import Job, PayloadError

    src = tmp_path / "proj" / "features.py"
    src.parent.mkdir()
    src.write_text(FIELDS_FN + "\ndef with_text(df, config):\n"
                   "    return df[['field_id', 'soil', 'yield_t_ha']]\n"
                   "def text_with_gaps(df, config):\n"
                   "    out = df[['field_id', 'soil', 'yield_t_ha']].copy()\n"
                   "    out.loc[out.index[:3], 'soil'] = None\n    return out\n")  # fmt: skip
    base = {"function": f"{src}:with_text", "key": "field_id", "target": "yield_t_ha"}
    cfg = F.resolve_config({**base, "text": ["soil"]})
    assert cfg["text"] == ["soil"] and "text" not in F.resolve_config(base)  # ids kept
    data = tmp_path / "in.parquet"
    df = _fields(300)
    df.to_parquet(data)
    r = F.featurize_partition(0, f"file://{data}", f"file://{tmp_path}/out", {}, cfg)
    assert r["columns"] == []  # no numeric feature: the text is the input
    train = pd.read_parquet(tmp_path / "out" / "train" / "part-00000.parquet")
    assert list(train.columns) == ["field_id", "soil", "yield_t_ha"]
    fset = {"feature_columns": [], "target": "yield_t_ha", "normalisation": {},
            "feature_config": cfg, "splits": {name: {"files": [str(tmp_path / "out" / name /
                                                                  "part-00000.parquet")]}
                                              for name in F.SPLITS}}  # fmt: skip
    job = Job(tmp_path / "run", inputs=json.loads(json.dumps(fset)))
    assert job.text("train") == train["soil"].tolist()
    with pytest.raises(PayloadError, match="no text column 'colour'"):
        job.text("train", "colour")

    for bad, match in [(["field_id"], "repeats the key"), ("soil", "expected a list"),
                       (["soil", "soil"], "repeats")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"features.text: .*{match}"):
            F.resolve_config({**base, "text": bad})
    for fn, text, match in [
        ("with_text", ["place"], "no text column 'place'"),
        ("text_with_gaps", ["soil"], "'soil' has 3 missing"),
        ("yield_features", ["rain"], "'rain' is float64, expected strings"),
    ]:
        gaps = F.resolve_config({**base, "function": f"{src}:{fn}", "text": text, "params":
                                 {"rain_scale": 1.0}})  # fmt: skip
        with pytest.raises(DataError, match=match):
            F.featurize_partition(1, f"file://{data}", f"file://{tmp_path}/o", {}, gaps)


def test_the_orchestrator_checks_a_feature_function_without_running_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """On a site the orchestrator runs as root: a start-up's features.py is read and parsed
    there, never imported (its code runs only in the start-up's own jobs). Before, checking
    the profile imported it, so its top-level code ran as root."""
    import sys

    import pytest

    from aifactory.tasks.core.errors import ConfigError

    marker = tmp_path / "ran-as-orchestrator"
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helpers.py").write_text("X = 1\n")
    src = proj / "features.py"
    src.write_text(
        "import pathlib\nimport helpers\n"
        f"pathlib.Path({str(marker)!r}).write_text('owned')\n"
        "try:\n    import not_installed_but_optional_xyz\nexcept ImportError:\n    pass\n"
        "if True:\n    def inside_if(df, config):\n        return df\n"
        "def fields(df, config):\n    hidden = 1\n    return df\n"
    )
    cfg = F.resolve_config({"function": f"{src}:fields", "key": "k", "target": "t"})
    assert cfg["function"] == f"{src}:fields"
    F.resolve_config({"function": f"{src}:inside_if", "key": "k", "target": "t"})
    before = F.function_source_hash(cfg["function"])
    assert not marker.exists(), "the orchestrator ran the start-up's module"
    assert str(proj) not in sys.path  # nor let its folder shadow the orchestrator's imports
    assert not [m for m in sys.modules if m.startswith("aif_features_")
                and getattr(sys.modules[m], "__file__", "") == str(src)]  # fmt: skip
    with pytest.raises(ConfigError, match=r"has no function or class 'hidden'"):
        F.resolve_config({"function": f"{src}:hidden", "key": "k", "target": "t"})
    src.write_text(src.read_text() + "# edited\n")
    assert F.function_source_hash(cfg["function"]) != before  # the bytes, read not imported
    src.write_text(src.read_text() + "def broken(:\n")
    with pytest.raises(ConfigError, match=r"does not import: SyntaxError: .*\(line \d+\)"):
        F.resolve_config({"function": f"{src}:fields", "key": "k", "target": "t"})
    with pytest.raises(ConfigError, match=r"No module named 'no_such_pkg_xyz\.sub'"):
        F.resolve_config({"function": "no_such_pkg_xyz.sub:f", "key": "k", "target": "t"})
    # A dotted module is found without running its parent package either.
    pkg = tmp_path / "pkgroot" / "evilpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('owned')\n")
    (pkg / "feats.py").write_text("def f(df, config):\n    return df\n")
    sys.path.insert(0, str(pkg.parent))
    try:
        F.resolve_config({"function": "evilpkg.feats:f", "key": "k", "target": "t"})
    finally:
        sys.path.remove(str(pkg.parent))
    assert not marker.exists()


def test_a_feature_file_closed_to_the_job_says_so(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A start-up's Dask worker (its own user) that cannot reach the project's folder gets
    a line saying so, not 'no such file'."""
    import os

    import pytest

    from aifactory.tasks.core.errors import ConfigError

    real_stat = os.stat

    def closed(path, *a, **k):  # type: ignore[no-untyped-def]
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_stat(path, *a, **k)

    monkeypatch.setattr(os, "stat", closed)
    with pytest.raises(ConfigError, match=r"cannot be reached by user \S+: a folder above it"):
        F.load_function(f"{tmp_path}/features.py:f")
    with pytest.raises(ConfigError, match=r"no such file /nonexistent-aif/features.py"):
        F.load_function("/nonexistent-aif/features.py:f")


def test_threads_loading_one_feature_file_at_once_all_get_the_function(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A Dask worker's threads import a project's features.py at the same moment (in CI:
    'features.py has no function or class mobility_features'): the module was in
    sys.modules before its body had run, and the second thread took the half-run one."""
    import threading

    body = "import time\ntime.sleep(0.3)\n\ndef f(df):\n    return df\n"
    (tmp_path / "features.py").write_text(body)
    ref = f"{tmp_path}/features.py:f"
    got: list[object] = []

    def load() -> None:
        try:
            got.append(F.load_function(ref))
        except Exception as exc:  # the test reports what each thread saw
            got.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(callable(g) for g in got), got
    assert len({id(g) for g in got}) == 1
