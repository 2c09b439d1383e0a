"""Feature engineering for the mobility-trips dataset: pure, per-partition functions.

Each lake file of a snapshot is one partition. ``featurize_partition`` cleans it, derives
the features, assigns every row to train/val/test by a stable hash of its key (so the test
set stays the test set across nightly runs), writes one Parquet file per split under fixed
names (idempotent overwrite) and returns the counts and the train split's sums, from which
the driver fits the normalisation on the train split only.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # pandas is imported where it is used: a cached run never needs it
    import pandas as pd

# Bump when the transform's code changes: part of the FeatureSet id (cache key).
FEATURES_VERSION = "1"
SPLITS = ("train", "val", "test")

DEFAULT_FEATURE_CONFIG: dict[str, Any] = {
    "version": FEATURES_VERSION,
    "key": "trip_id",
    "target": "duration_min",
    "split": {"train": 80, "val": 10, "test": 10},  # percent, by hash of the key
    "clean": {
        "duration_min": [1.0, 240.0],  # keep rows with target in [lo, hi]
        "distance_km": [0.05, 200.0],
    },
    "categorical": {
        "weather": ["clear", "rain", "snow"],
        "vendor": ["V1", "V2", "V3"],
        "payment_type": ["card", "cash", "app"],
    },
    "zones": 60,
    "fill": {"temperature_c": 12.0},
}


NUMERIC_COLUMNS = ("distance_km", "duration_min", "temperature_c", "passenger_count")


def resolve_config(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The profile's ``features:`` section over the defaults, checked key by key.

    Only cleaning ranges, split percentages, categorical vocabularies, fill values and the
    zone count are configurable; anything else is refused naming the key.
    """
    from aifactory.tasks.errors import ConfigError

    cfg = json.loads(json.dumps(DEFAULT_FEATURE_CONFIG))
    for key, value in (overrides or {}).items():
        where = f"features.{key}"
        if key not in ("clean", "split", "categorical", "fill", "zones"):
            raise ConfigError(
                f"{where}: unknown key (valid keys: categorical, clean, fill, split, zones)"
            )
        if key == "zones":
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where}: must be a positive integer, got {value!r}")
            cfg["zones"] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping, got {type(value).__name__}")
        for name, item in value.items():
            sub = f"{where}.{name}"
            if key == "split":
                if name not in SPLITS or not isinstance(item, int) or item < 0:
                    raise ConfigError(f"{sub}: expected one of {', '.join(SPLITS)} with a "
                                      "non-negative integer percentage")  # fmt: skip
            elif key == "clean":
                if name not in NUMERIC_COLUMNS:
                    raise ConfigError(f"{sub}: not a numeric column of the dataset "
                                      f"({', '.join(NUMERIC_COLUMNS)})")  # fmt: skip
                if not (isinstance(item, list) and len(item) == 2 and item[0] <= item[1]):
                    raise ConfigError(f"{sub}: expected [low, high], got {item!r}")
            elif key == "categorical":
                if name not in DEFAULT_FEATURE_CONFIG["categorical"]:
                    known = ", ".join(DEFAULT_FEATURE_CONFIG["categorical"])
                    raise ConfigError(f"{sub}: not a categorical column ({known})")
                if not (isinstance(item, list) and item and all(isinstance(v, str) for v in item)):
                    raise ConfigError(f"{sub}: expected a non-empty list of strings")
            elif key == "fill" and name not in DEFAULT_FEATURE_CONFIG["fill"]:
                raise ConfigError(f"{sub}: no fill rule for this column")
            cfg[key][name] = item
    if sum(cfg["split"].values()) != 100:
        raise ConfigError(f"features.split: percentages add up to {sum(cfg['split'].values())}, "
                          "not 100")  # fmt: skip
    return cfg


def feature_columns(config: dict[str, Any]) -> list[str]:
    cols = [
        "distance_km",
        "log_distance",
        "hour_sin",
        "hour_cos",
        "dow_sin",
        "dow_cos",
        "is_weekend",
        "rush_hour",
        "passenger_count",
        "temperature_c",
        "temperature_missing",
        "pickup_zone_norm",
        "dropoff_zone_norm",
        "same_zone",
    ]
    for name, values in sorted(config["categorical"].items()):
        cols += [f"{name}={v}" for v in values]
    return cols


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


def transform(
    df: pd.DataFrame, config: dict[str, Any], inference: bool = False
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean and derive features. Returns (frame with key, features, target) and drops.

    With ``inference=True`` no row is dropped and the target and key may be absent: the
    same code turns raw rows into model inputs at training and at prediction time.
    """
    import pandas as pd

    dropped: dict[str, int] = {}
    keep = np.ones(len(df), dtype=bool)
    # Sorted: the result must not depend on the order a config's keys came in (a config read
    # back from JSON, e.g. by `aif replay`, may list them in another order).
    for col, (lo, hi) in [] if inference else sorted(config["clean"].items()):
        vals = df[col].to_numpy(dtype="float64", na_value=np.nan)
        bad = ~((vals >= lo) & (vals <= hi)) & keep
        if bad.any():
            dropped[f"{col}_out_of_range"] = int(bad.sum())
        keep &= ~bad
    df = df.loc[keep]
    ts = pd.to_datetime(df["pickup_ts"], utc=True)
    hour = ts.dt.hour.to_numpy() + ts.dt.minute.to_numpy() / 60.0
    dow = ts.dt.day_of_week.to_numpy()
    dist = df["distance_km"].to_numpy(dtype="float64")
    temp = df["temperature_c"].to_numpy(dtype="float64", na_value=np.nan)
    zones = float(config["zones"])
    out: dict[str, Any] = {
        "distance_km": dist,
        "log_distance": np.log1p(dist),
        "hour_sin": np.sin(2 * np.pi * hour / 24.0),
        "hour_cos": np.cos(2 * np.pi * hour / 24.0),
        "dow_sin": np.sin(2 * np.pi * dow / 7.0),
        "dow_cos": np.cos(2 * np.pi * dow / 7.0),
        "is_weekend": (dow >= 5).astype("float64"),
        "rush_hour": (((hour >= 7) & (hour < 10)) | ((hour >= 16) & (hour < 19))).astype("float64"),
        "passenger_count": df["passenger_count"].to_numpy(dtype="float64"),
        "temperature_c": np.where(np.isnan(temp), config["fill"]["temperature_c"], temp),
        "temperature_missing": np.isnan(temp).astype("float64"),
        "pickup_zone_norm": df["pickup_zone"].to_numpy(dtype="float64") / zones,
        "dropoff_zone_norm": df["dropoff_zone"].to_numpy(dtype="float64") / zones,
        "same_zone": (df["pickup_zone"].to_numpy() == df["dropoff_zone"].to_numpy()).astype(
            "float64"
        ),
    }
    for name, values in sorted(config["categorical"].items()):
        col = df[name].astype("string").fillna("")
        for v in values:
            out[f"{name}={v}"] = (col == v).to_numpy(dtype="float64")
    if config["key"] in df.columns:
        out[config["key"]] = df[config["key"]].astype("string").to_numpy()
    if config["target"] in df.columns:
        out[config["target"]] = df[config["target"]].to_numpy(dtype="float64")
    return pd.DataFrame(out, index=df.index if inference else None), dropped


def _write_parquet(fs: Any, path: str, table: pa.Table) -> str:
    """Serialise in memory, then commit the whole file atomically; return its sha256."""
    from aifactory.tasks.lake import atomic_write_bytes

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
    """Featurise one lake file. Runs on a Dask worker (possibly a Slurm job)."""
    fs, src_path = fsspec.core.url_to_fs(src_url, **storage_options)
    with fs.open(src_path, "rb") as fh:
        table = pq.read_table(fh)
    df = table.to_pandas()
    rows_in = len(df)
    feats, dropped = transform(df, config)
    splits = split_of(feats[config["key"]], config["split"])
    cols = feature_columns(config)
    target = config["target"]
    ofs, out_path = fsspec.core.url_to_fs(out_url, **storage_options)
    result: dict[str, Any] = {"index": index, "rows_in": rows_in, "dropped": dropped, "splits": {}}
    for name in SPLITS:
        part = feats.loc[splits == name].reset_index(drop=True)
        path = f"{out_path.rstrip('/')}/{name}/part-{index:05d}.parquet"
        schema = pa.schema(
            [pa.field(config["key"], pa.string(), nullable=False)]
            + [pa.field(c, pa.float32(), nullable=False) for c in cols]
            + [pa.field(target, pa.float32(), nullable=False)]
        )
        tbl = pa.Table.from_pandas(
            part[[config["key"], *cols, target]], schema=schema, preserve_index=False
        )
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
