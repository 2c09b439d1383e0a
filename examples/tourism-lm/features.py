"""The reviews' text for the language model: one row per review, the text cleaned of
surrounding blanks; reviews without text are dropped (and counted by the platform)."""

import pandas as pd


def review_text(df: pd.DataFrame, config: dict) -> tuple[pd.DataFrame, dict]:
    text = df["text"].fillna("").astype(str).str.strip()
    keep = text.str.len() > 0
    out = pd.DataFrame(
        {
            "review_id": df["review_id"][keep],
            "text": text[keep],
            "rating": df["rating"][keep].astype("float32"),
        }
    )
    return out, {"empty_text": int((~keep).sum())}
