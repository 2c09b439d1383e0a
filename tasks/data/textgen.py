"""Deterministic text for the tourism data space: visitor reviews, as Parquet objects.

The corpus of the reference language-model payload. Same (seed, rows, objects) give
byte-identical objects.

    python -m aifactory.tasks.data.textgen file:///tmp/reviews --rows 20000 --objects 2
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aifactory.tasks.data.dataspace import REVIEW_SCHEMA
from aifactory.tasks.doors.lake import atomic_write_bytes

PLACES = ["the old harbour", "the cathedral", "the alpine hut", "the vineyard",
          "the museum", "the lakeside campsite", "the castle", "the night market",
          "the thermal baths"]  # fmt: skip
OPENERS = ["We visited", "I stayed at", "Our family went to", "Last spring we explored",
           "On a rainy day we tried"]  # fmt: skip
GOOD = ["the staff were friendly", "the view was stunning", "the food was fresh and local",
        "everything was clean", "the guided tour was worth it"]  # fmt: skip
BAD = ["the queue was long", "prices were high", "the signs were confusing",
       "parking was hard to find", "it was crowded at noon"]  # fmt: skip
CLOSERS = ["We would come back.", "Recommended for families.", "Go early in the morning.",
           "Book ahead in summer.", "Not worth a detour."]  # fmt: skip


def reviews(seed: int, start: int, n: int) -> pa.Table:
    rng = np.random.default_rng([seed, start])
    ids, places, ratings, texts = [], [], [], []
    for i in range(n):
        place = PLACES[rng.integers(len(PLACES))]
        rating = int(rng.integers(1, 6))
        good = [GOOD[j] for j in rng.choice(len(GOOD), 2, replace=False)]
        bad = BAD[rng.integers(len(BAD))]
        body = (f"{OPENERS[rng.integers(len(OPENERS))]} {place}. "
                + (f"Overall {good[0]} and {good[1]}, though {bad}. " if rating >= 3
                   else f"Sadly {bad}, even if {good[0]}. ")
                + f"{rating} of 5. {CLOSERS[rng.integers(len(CLOSERS))]}")  # fmt: skip
        ids.append(f"R{start + i:09d}")
        places.append(place)
        ratings.append(rating)
        texts.append(body)
    return pa.table({"review_id": ids, "place": places,
                     "rating": pa.array(ratings, pa.int8()), "text": texts},
                    schema=REVIEW_SCHEMA)  # fmt: skip


def generate_reviews(url: str, storage_options: dict[str, Any] | None = None, seed: int = 11,
                     rows: int = 20_000, objects: int = 2) -> list[str]:  # fmt: skip
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    per, extra = divmod(rows, objects)
    out, start = [], 0
    for i in range(objects):
        n = per + (1 if i < extra else 0)
        buf = io.BytesIO()
        pq.write_table(reviews(seed, start, n), buf, compression="snappy")
        atomic_write_bytes(fs, f"{root.rstrip('/')}/part-{i:05d}.parquet", buf.getvalue())
        out.append(f"{url.rstrip('/')}/part-{i:05d}.parquet")
        start += n
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--objects", type=int, default=2)
    p.add_argument("--seed", type=int, default=11)
    a = p.parse_args(argv)
    print("\n".join(generate_reviews(a.url, None, a.seed, a.rows, a.objects)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
