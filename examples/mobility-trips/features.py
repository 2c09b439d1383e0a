"""Start-up A's feature function: ride trips -> trip-duration features.

Called by the platform once per partition of the mobility-trips snapshot (on a Dask
worker, possibly a Slurm job) with the resolved ``features`` section; its own settings are
``config["params"]``: cleaning ranges, categorical vocabularies, the zone count and fill
values (defaults below). The registered model calls the same function on raw rows at
prediction time (``inference``: no row dropped, no target needed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

DEFAULTS: dict[str, Any] = {
    "clean": {  # keep rows with the value in [lo, hi]
        "duration_min": [1.0, 240.0],
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
NUMERIC = ("distance_km", "duration_min", "temperature_c", "passenger_count")


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """``config["params"]`` over DEFAULTS, each checked (ValueError names the key)."""
    params = dict(config.get("params") or {})
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    for key, value in params.items():
        where = f"params.{key}"
        if key not in DEFAULTS:
            raise ValueError(f"{where}: unknown (valid: {', '.join(sorted(DEFAULTS))})")
        if key == "zones":
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: must be a positive integer, got {value!r}")
            out[key] = value
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{where}: must be a mapping, got {type(value).__name__}")
        for name, item in value.items():
            if key == "clean" and (
                name not in NUMERIC
                or not (isinstance(item, list) and len(item) == 2 and item[0] <= item[1])
            ):
                raise ValueError(
                    f"{where}.{name}: expected a numeric column "
                    f"({', '.join(NUMERIC)}) and [low, high], got {item!r}"
                )
            if key == "categorical" and (
                name not in DEFAULTS["categorical"]
                or not (isinstance(item, list) and item and all(isinstance(v, str) for v in item))
            ):
                raise ValueError(
                    f"{where}.{name}: expected one of "
                    f"{', '.join(DEFAULTS['categorical'])} and a list of strings"
                )
            if key == "fill" and name not in DEFAULTS["fill"]:
                raise ValueError(f"{where}.{name}: no fill rule for this column")
            out[key][name] = item
    return out


def mobility_features(
    df: pd.DataFrame, config: dict[str, Any], inference: bool = False
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Clean and derive features: (frame with key, features, target, drops by reason).

    With ``inference=True`` no row is dropped and the target and key may be absent: the
    same code turns raw rows into model inputs at training and at prediction time.
    """
    cfg = settings(config)
    dropped: dict[str, int] = {}
    keep = np.ones(len(df), dtype=bool)
    # Sorted: the result must not depend on the order a config's keys came in.
    for col, (lo, hi) in [] if inference else sorted(cfg["clean"].items()):
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
    zones = float(cfg["zones"])
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
        "temperature_c": np.where(np.isnan(temp), cfg["fill"]["temperature_c"], temp),
        "temperature_missing": np.isnan(temp).astype("float64"),
        "pickup_zone_norm": df["pickup_zone"].to_numpy(dtype="float64") / zones,
        "dropoff_zone_norm": df["dropoff_zone"].to_numpy(dtype="float64") / zones,
        "same_zone": (df["pickup_zone"].to_numpy() == df["dropoff_zone"].to_numpy()).astype(
            "float64"
        ),
    }
    for name, values in sorted(cfg["categorical"].items()):
        col = df[name].astype("string").fillna("")
        for v in values:
            out[f"{name}={v}"] = (col == v).to_numpy(dtype="float64")
    key, target = config.get("key", "trip_id"), config.get("target", "duration_min")
    if key in df.columns:
        out[key] = df[key].astype("string").to_numpy()
    if target in df.columns:
        out[target] = df[target].to_numpy(dtype="float64")
    return pd.DataFrame(out, index=df.index if inference else None), dropped
