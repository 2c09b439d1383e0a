"""Deterministic generator of the mobility data space's trips dataset.

The same (seed, rows, objects) give byte-identical Parquet objects: every object has its
own random stream derived from (seed, object index), rows are generated in bounded chunks,
and nothing depends on the clock. The target ``duration_min`` is a nonlinear function of
distance, time of day, weekday, zones, weather and vendor, plus noise.

    python -m tasks.datagen file:///tmp/trips --rows 100000 --objects 4 --seed 7
"""

from __future__ import annotations

import argparse
import io
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.dataspace import MOBILITY_SCHEMA
from tasks.lake import atomic_write_bytes

ZONES = 60
VENDORS = np.array(["V1", "V2", "V3"])
WEATHER = np.array(["clear", "rain", "snow"])
PAYMENT = np.array(["card", "cash", "app"])
YEAR_START_US = 1735689600 * 1_000_000  # 2025-01-01T00:00:00Z
YEAR_US = 365 * 24 * 3600 * 1_000_000
CHUNK_ROWS = 250_000


def _zone_centres(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 999_999])
    return rng.uniform(0, 20, size=(ZONES + 1, 2))  # km grid of zone centres


def trips_chunk(seed: int, start: int, n: int, obj: int) -> pa.Table:
    """Rows [start, start+n) of the dataset, from object ``obj``'s own random stream."""
    rng = np.random.default_rng([seed, obj, start])
    centres = _zone_centres(seed)
    pu = rng.integers(1, ZONES + 1, n).astype(np.int32)
    # Most trips stay near their pickup zone.
    near = rng.random(n) < 0.6
    do = np.where(
        near, np.clip(pu + rng.integers(-3, 4, n), 1, ZONES), rng.integers(1, ZONES + 1, n)
    )
    do = do.astype(np.int32)
    straight = np.linalg.norm(centres[pu] - centres[do], axis=1)
    distance = np.round(straight * rng.uniform(1.1, 1.5, n) + rng.gamma(1.5, 0.6, n), 3)
    ts = YEAR_START_US + rng.integers(0, YEAR_US, n, dtype=np.int64)
    hour = (ts // 3_600_000_000) % 24
    dow = ((ts // 86_400_000_000) + 2) % 7  # 2025-01-01 was a Wednesday (0 = Monday)
    weather = WEATHER[rng.choice(3, n, p=[0.7, 0.22, 0.08])]
    vendor = VENDORS[rng.integers(0, 3, n)]
    payment = PAYMENT[rng.integers(0, 3, n)].astype(object)
    payment[rng.random(n) < 0.03] = None
    temp = np.round(rng.normal(11, 8, n), 1)
    temp_missing = rng.random(n) < 0.04
    passengers = rng.choice([1, 2, 3, 4, 5, 6], n, p=[0.62, 0.2, 0.08, 0.05, 0.03, 0.02])

    rush = np.exp(-((hour - 8.5) ** 2) / 2.0) + 0.9 * np.exp(-((hour - 17.5) ** 2) / 3.0)
    weekend = dow >= 5
    congestion = 1.0 + 0.9 * rush * np.where(weekend, 0.35, 1.0)
    congestion *= np.where(weather == "rain", 1.18, np.where(weather == "snow", 1.45, 1.0))
    centre_zone = (pu <= 12) | (do <= 12)
    congestion *= np.where(centre_zone, 1.25, 1.0)
    speed_kmh = np.where(vendor == "V3", 27.0, 30.0) / congestion
    duration = 2.0 + 60.0 * distance / speed_kmh + 0.6 * np.sqrt(distance) * (passengers > 4)
    duration *= rng.lognormal(0.0, 0.12, n)
    duration = np.round(duration + rng.normal(0, 0.5, n), 2)
    # A few data-quality problems that cleaning must catch (counted, never silently lost).
    bad = rng.random(n) < 0.002
    duration[bad] = -rng.uniform(1, 10, bad.sum())

    ids = np.char.add("T", np.char.zfill((np.arange(start, start + n)).astype(str), 10))
    cols: dict[str, Any] = {
        "trip_id": pa.array(ids, pa.string()),
        "pickup_ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "pickup_zone": pa.array(pu, pa.int32()),
        "dropoff_zone": pa.array(do, pa.int32()),
        "distance_km": pa.array(distance, pa.float64()),
        "passenger_count": pa.array(passengers.astype(np.int8), pa.int8()),
        "vendor": pa.array(vendor, pa.string()),
        "payment_type": pa.array(payment, pa.string()),
        "weather": pa.array(weather, pa.string()),
        "temperature_c": pa.array(np.where(temp_missing, np.nan, temp), pa.float64(),
                                  mask=temp_missing),
        "duration_min": pa.array(duration, pa.float64()),
    }  # fmt: skip
    return pa.table(cols, schema=MOBILITY_SCHEMA)


def object_bytes(seed: int, start: int, n: int, obj: int) -> bytes:
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, MOBILITY_SCHEMA, compression="snappy", version="2.6") as w:
        for off in range(0, n, CHUNK_ROWS):
            m = min(CHUNK_ROWS, n - off)
            w.write_table(trips_chunk(seed, start + off, m, obj), row_group_size=CHUNK_ROWS)
    return buf.getvalue()


def generate_mobility(
    url: str,
    storage_options: dict[str, Any] | None = None,
    seed: int = 7,
    rows: int = 200_000,
    objects: int = 8,
) -> list[str]:
    """Write ``objects`` Parquet objects holding ``rows`` trips under ``url``."""
    if rows < objects:
        raise ValueError(f"rows ({rows}) must be at least objects ({objects})")
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    per, extra = divmod(rows, objects)
    written, start = [], 0
    for i in range(objects):
        n = per + (1 if i < extra else 0)
        path = f"{root.rstrip('/')}/part-{i:05d}.parquet"
        atomic_write_bytes(fs, path, object_bytes(seed, start, n, i))
        written.append(f"{url.rstrip('/')}/part-{i:05d}.parquet")
        start += n
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    for u in generate_mobility(a.url, None, a.seed, a.rows, a.objects):
        print(u)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
