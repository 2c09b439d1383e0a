"""Start-up B's own feature function: field-sensor readings -> yield features.

Called by the platform once per partition of the agriculture-fields snapshot (on a Dask
worker, possibly a Slurm job), with the resolved ``features`` section as ``config``; its own
settings are in ``config["params"]``. It returns the key, the target and numeric features;
the platform splits by key hash, fits the normalisation on the train split only and checks
the output (profile.yaml names it: ``features.function: features.py:yield_features``).
"""

import numpy as np
import pandas as pd

CROPS = ["wheat", "maize", "barley", "sunflower"]


def yield_features(df: pd.DataFrame, config: dict) -> pd.DataFrame:
    """One row per reading; the yield is the target, readings without one are dropped."""
    df = df[df["yield_t_ha"].notna()]
    ts = pd.to_datetime(df["sensor_ts"], utc=True)
    out = pd.DataFrame(
        {
            "reading_id": df["reading_id"],
            "soil_moisture": df["soil_moisture_pct"] / 100.0,
            "rain": np.log1p(df["rainfall_mm"]),
            "temp": df["air_temp_c"].fillna(config["params"].get("temp_fill", 15.0)),
            "ndvi": df["ndvi"],
            "doy_sin": np.sin(2 * np.pi * ts.dt.day_of_year / 365.0),
            "yield_t_ha": df["yield_t_ha"],
        }
    )
    for c in CROPS:
        out[f"crop={c}"] = (df["crop"] == c).astype("float64")
    return out
