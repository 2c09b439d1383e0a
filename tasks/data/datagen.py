"""Deterministic generator of the mobility data space's trips dataset ("mobility-trips").

Ride trips in a synthetic city of 60 zones (zone 1 is the centre, numbers grow outwards),
over the year 2025. The same (seed, rows, objects) give byte-identical Parquet objects
(with the same pyarrow version): every chunk of rows has its own random stream derived
from (seed, object, first row), writer options are fixed and nothing depends on the clock.
Rows are generated and written in chunks of at most CHUNK_ROWS, so memory stays bounded
whatever ``rows`` is; each object is staged in a temporary file and committed in one step
(rename locally, one upload on S3).

The target ``duration_min`` is a nonlinear function of distance, time of day (rush hours),
weekday, centrality of the zones, weather, vendor, passengers and payment, with
multiplicative noise and occasional unobservable delays (incidents), so a small MLP reaches
an R² of about 0.85. A few rows carry data-quality problems (negative durations, zero
distances) for the cleaning step to drop and count.

    python -m aifactory.tasks.data.datagen file:///tmp/trips --rows 100000 --objects 4 --seed 7
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aifactory.tasks.core.errors import AifError, ConfigError
from aifactory.tasks.data.dataspace import MOBILITY_SCHEMA, check_store, storage_error
from aifactory.tasks.doors.lake import staged_file

__all__ = ["MOBILITY_SCHEMA", "generate_mobility", "main", "trips_chunk"]

ZONES = 60
VENDORS = np.array(["V1", "V2", "V3"])
WEATHER = np.array(["clear", "rain", "snow"])
PAYMENT = np.array(["card", "cash", "app"])
YEAR_START_US = 1_735_689_600 * 1_000_000  # 2025-01-01T00:00:00Z (a Wednesday)
DAY_US = 86_400 * 1_000_000
HOUR_US = 3_600 * 1_000_000
DAYS = 365
CHUNK_ROWS = 100_000  # rows generated at once = rows per Parquet row group
# Fixed writer options: part of the byte-identical promise.
WRITER: dict[str, Any] = {
    "compression": "snappy",
    "version": "2.6",
    "data_page_version": "1.0",
    "use_dictionary": True,
    "write_statistics": True,
}

# Share of trips per hour of day (0..23), weekdays and weekends.
_WEEKDAY_HOURS = np.array(
    [2, 1, 1, 1, 1, 2, 4, 7, 9, 7, 5, 5, 6, 6, 5, 6, 7, 9, 9, 7, 6, 5, 4, 3], dtype=float
)
_WEEKEND_HOURS = np.array(
    [5, 4, 3, 2, 1, 1, 1, 2, 3, 4, 5, 6, 7, 7, 6, 6, 6, 6, 7, 7, 7, 7, 6, 6], dtype=float
)


class _City:
    """Zone geometry derived from the seed alone (the same for every chunk)."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 999_999])
        r = 11.0 * np.sqrt(rng.uniform(0, 1, ZONES))  # km from the centre, uniform on a disc
        a = rng.uniform(0, 2 * np.pi, ZONES)
        order = np.argsort(r, kind="stable")  # zone 1 is the most central
        xy = np.stack([r[order] * np.cos(a[order]), r[order] * np.sin(a[order])], axis=1)
        self.xy = np.vstack([[np.nan, np.nan], xy])  # index by zone number 1..60
        self.radius = np.concatenate([[np.nan], r[order]])
        self.centrality = np.exp(-(self.radius**2) / (2 * 4.0**2))
        popularity = np.exp(-self.radius[1:] / 5.0)
        self.popularity = popularity / popularity.sum()
        d = np.linalg.norm(xy[:, None, :] - xy[None, :, :], axis=2)
        self.neighbours = np.argsort(d, axis=1, kind="stable")[:, :5] + 1  # itself + 4 nearest


def trips_chunk(seed: int, start: int, n: int, obj: int, city: _City | None = None) -> pa.Table:
    """Rows [start, start+n) of the dataset, from the random stream (seed, obj, start)."""
    city = city or _City(seed)
    rng = np.random.default_rng([seed, obj, start])

    # When: a day of 2025, an hour from the weekday/weekend profile, a uniform instant in it.
    day = rng.integers(0, DAYS, n)
    dow = (day + 2) % 7  # 0 = Monday
    weekend = dow >= 5
    u = rng.random(n)
    cdf_wd = np.cumsum(_WEEKDAY_HOURS) / _WEEKDAY_HOURS.sum()
    cdf_we = np.cumsum(_WEEKEND_HOURS) / _WEEKEND_HOURS.sum()
    hour_int = np.where(weekend, np.searchsorted(cdf_we, u), np.searchsorted(cdf_wd, u))
    hour_int = np.minimum(hour_int, 23)
    within = rng.integers(0, HOUR_US, n, dtype=np.int64)
    ts = YEAR_START_US + day.astype(np.int64) * DAY_US + hour_int * HOUR_US + within
    hour = hour_int + within / HOUR_US

    # Where: central zones are busier; most trips end near where they started.
    pu = rng.choice(np.arange(1, ZONES + 1), n, p=city.popularity)
    near = rng.random(n) < 0.55
    do_near = city.neighbours[pu - 1, rng.integers(0, 5, n)]
    do_far = rng.choice(np.arange(1, ZONES + 1), n, p=city.popularity)
    do = np.where(near, do_near, do_far)
    straight = np.linalg.norm(city.xy[pu] - city.xy[do], axis=1)
    distance = np.round(straight * rng.uniform(1.15, 1.45, n) + rng.gamma(1.6, 0.7, n), 3)

    # Weather follows the season: cold days bring snow.
    season = 11.0 - 10.0 * np.cos(2 * np.pi * (day - 15) / DAYS)
    temp = season + 3.0 * np.sin(2 * np.pi * (hour - 9) / 24) + rng.normal(0, 3.0, n)
    p_snow = np.where(temp < 0, 0.35, np.where(temp < 3, 0.10, 0.0))
    p_rain = np.where(temp < 0, 0.08, 0.22)
    w = rng.random(n)
    weather = WEATHER[np.where(w < p_snow, 2, np.where(w < p_snow + p_rain, 1, 0))]
    temp = np.round(temp, 1)
    temp_missing = rng.random(n) < 0.04

    vendor = VENDORS[rng.choice(3, n, p=[0.45, 0.35, 0.20])]
    payment = PAYMENT[rng.choice(3, n, p=[0.55, 0.15, 0.30])].astype(object)
    payment[rng.random(n) < 0.03] = None
    passengers = rng.choice([1, 2, 3, 4, 5, 6], n, p=[0.62, 0.2, 0.08, 0.05, 0.03, 0.02])

    # How long: free-flow time scaled by congestion, plus fixed costs and noise.
    rush = np.exp(-((hour - 8.5) ** 2) / 2.0) + 0.9 * np.exp(-((hour - 17.5) ** 2) / 4.5)
    congestion = 1.0 + 1.0 * rush * np.where(weekend, 0.3, 1.0)
    congestion *= np.select([weather == "rain", weather == "snow"], [1.15, 1.45], 1.0)
    congestion *= 1.0 + 0.6 * (city.centrality[pu] + city.centrality[do]) / 2
    speed_kmh = np.select([vendor == "V1", vendor == "V2"], [30.0, 31.5], 26.0) / congestion
    duration = 1.5 + 60.0 * distance / speed_kmh
    duration += 0.5 * np.sqrt(distance) * (passengers >= 5) + 0.6 * (payment == "cash")
    duration *= rng.lognormal(0.0, 0.22, n)
    incident = rng.random(n) < 0.05
    duration += np.where(incident, rng.exponential(10.0, n), 0.0) + rng.normal(0, 0.4, n)
    duration = np.round(np.maximum(duration, 0.5), 2)
    # A few data-quality problems that cleaning must catch (counted, never silently lost).
    bad = rng.random(n) < 0.002
    duration[bad] = -np.round(rng.uniform(1, 10, int(bad.sum())), 2)
    distance[rng.random(n) < 0.001] = 0.0

    ids = [f"T{i:010d}" for i in range(start, start + n)]
    cols: dict[str, pa.Array] = {
        "trip_id": pa.array(ids, pa.string()),
        "pickup_ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "pickup_zone": pa.array(pu.astype(np.int32), pa.int32()),
        "dropoff_zone": pa.array(do.astype(np.int32), pa.int32()),
        "distance_km": pa.array(distance, pa.float64()),
        "passenger_count": pa.array(passengers.astype(np.int8), pa.int8()),
        "vendor": pa.array(vendor, pa.string()),
        "payment_type": pa.array(payment, pa.string()),
        "weather": pa.array(weather, pa.string()),
        "temperature_c": pa.array(temp, pa.float64(), mask=temp_missing),
        "duration_min": pa.array(duration, pa.float64()),
    }
    return pa.table(cols, schema=MOBILITY_SCHEMA)


def write_object(local_path: str, seed: int, start: int, n: int, obj: int, city: _City) -> None:
    """Write rows [start, start+n) as one Parquet file, CHUNK_ROWS rows at a time."""
    with pq.ParquetWriter(local_path, MOBILITY_SCHEMA, **WRITER) as w:
        for off in range(0, n, CHUNK_ROWS):
            m = min(CHUNK_ROWS, n - off)
            w.write_table(trips_chunk(seed, start + off, m, obj, city), row_group_size=CHUNK_ROWS)


def generate_mobility(
    url: str,
    storage_options: dict[str, Any] | None = None,
    seed: int = 7,
    rows: int = 200_000,
    objects: int = 8,
) -> list[str]:
    """Write ``objects`` Parquet objects ``part-00000.parquet``… holding ``rows`` trips in all
    under the fsspec ``url``; return their URLs. Each object is committed atomically."""
    if objects < 1 or rows < objects:
        raise ConfigError(
            f"generator: need at least one object and one row per object "
            f"(got rows={rows}, objects={objects})"
        )
    fs, root = check_store(url, storage_options, "data space")
    city = _City(seed)
    per, extra = divmod(rows, objects)
    written, start = [], 0
    for i in range(objects):
        n = per + (1 if i < extra else 0)
        name = f"part-{i:05d}.parquet"
        try:
            with staged_file(fs, f"{root}/{name}") as local:
                write_object(local, seed, start, n, i, city)
        except Exception as exc:
            raise storage_error(f"data space {url}/{name}", exc, storage_options) from None
        written.append(f"{url.rstrip('/')}/{name}")
        start += n
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m aifactory.tasks.data.datagen",
        description="Write the deterministic mobility-trips dataset under an fsspec URL.",
    )
    p.add_argument("url", help="file:///path or s3://bucket/prefix")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--objects", type=int, default=8)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args(argv)
    try:
        for u in generate_mobility(a.url, None, a.seed, a.rows, a.objects):
            print(u)
    except AifError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
