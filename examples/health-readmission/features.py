"""Start-up C's features: one admission (JSON Lines record, identifiers already
pseudonymised by the platform at ingest) -> numeric risk factors and the outcome."""

import numpy as np
import pandas as pd

WARDS = ["cardiology", "pulmonology", "orthopaedics", "general-medicine", "neurology", "oncology"]


def admission_features(df: pd.DataFrame, config: dict) -> pd.DataFrame:
    year = config["params"].get("reference_year", 2025)
    out = pd.DataFrame(
        {
            "record_id": df["record_id"],
            "age": (year - df["birth_year"].astype("float64")),
            "systolic_bp": df["systolic_bp"].astype("float64").fillna(125.0),
            "heart_rate": df["heart_rate"].astype("float64").fillna(78.0),
            "bmi": df["bmi"].astype("float64").fillna(26.5),
            "log_stay": np.log1p(df["length_of_stay_days"].astype("float64")),
            "sex_f": (df["sex"] == "F").astype("float64"),
            "readmitted": df["readmitted_30d"].astype("float64"),
        }
    )
    for w in WARDS:
        out[f"ward={w}"] = (df["ward"] == w).astype("float64")
    return out
