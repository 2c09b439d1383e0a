"""Deterministic generators for the catalog's data spaces, and seeding by catalog entry.

* ``mobility`` (Parquet): tasks/data/datagen.py; ``tourism`` (Parquet): tasks/data/textgen.py;
* ``health`` (JSON Lines): hospital admissions with personal data (patient id, name,
  postcode) and a 30-day readmission outcome;
* ``agriculture`` (CSV): daily field sensor readings with the season's yield.

The same (seed, rows, objects) give byte-identical objects: every chunk of rows draws
from its own random stream derived from (seed, object, first row) and nothing depends on
the clock. Objects are staged and committed in one step (rename, or one PUT).

    python -m aifactory.tasks.data.generators health file:///tmp/health --rows 10000 --objects 2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from aifactory.tasks.core.errors import AifError, ConfigError
from aifactory.tasks.data.catalog import DatasetEntry, resolve_distribution
from aifactory.tasks.data.dataspace import check_store, glob_base, has_objects, storage_error
from aifactory.tasks.doors.lake import staged_file

CHUNK = 20_000
US = 1_000_000
Y2024_US = 1_704_067_200 * US  # 2024-01-01T00:00:00Z
MAR2025_US = 1_740_787_200 * US  # 2025-03-01T00:00:00Z

HEALTH_SCHEMA = pa.schema(
    [
        pa.field("record_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("patient_name", pa.string(), nullable=True),
        pa.field("postcode", pa.string(), nullable=True),
        pa.field("birth_year", pa.int16(), nullable=False),
        pa.field("sex", pa.string(), nullable=False),
        pa.field("admission_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("ward", pa.string(), nullable=False),
        pa.field("systolic_bp", pa.int16(), nullable=True),
        pa.field("heart_rate", pa.int16(), nullable=True),
        pa.field("bmi", pa.float64(), nullable=True),
        pa.field("diagnosis_code", pa.string(), nullable=False),
        pa.field("length_of_stay_days", pa.float64(), nullable=False),
        pa.field("readmitted_30d", pa.bool_(), nullable=False),
    ]
)
AGRI_SCHEMA = pa.schema(
    [
        pa.field("reading_id", pa.string(), nullable=False),
        pa.field("farm_id", pa.string(), nullable=False),
        pa.field("field_id", pa.string(), nullable=False),
        pa.field("sensor_ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("crop", pa.string(), nullable=False),
        pa.field("soil_moisture_pct", pa.float64(), nullable=False),
        pa.field("air_temp_c", pa.float64(), nullable=True),
        pa.field("rainfall_mm", pa.float64(), nullable=False),
        pa.field("ndvi", pa.float64(), nullable=False),
        pa.field("yield_t_ha", pa.float64(), nullable=True),
    ]
)

_SYL = np.array(["an", "be", "ca", "do", "el", "fi", "ga", "ho", "is", "ja", "ko", "lu", "ma",
                 "ni", "or", "pa", "ri", "sa", "to", "va"])  # fmt: skip
_WARDS = np.array(["cardiology", "pulmonology", "orthopaedics", "general-medicine",
                   "neurology", "oncology"])  # fmt: skip
_DIAG = {"cardiology": "I", "pulmonology": "J", "orthopaedics": "M",
         "general-medicine": "K", "neurology": "G", "oncology": "C"}  # fmt: skip
_CROPS = np.array(["wheat", "maize", "barley", "sunflower"])
_CROP_YIELD = np.array([7.5, 9.8, 6.2, 2.6])  # t/ha at good conditions


def _rng(seed: int, obj: int, start: int) -> np.random.Generator:
    return np.random.default_rng([seed, obj, start])


def health_chunk(seed: int, start: int, n: int, obj: int) -> pa.Table:
    rng = _rng(seed, obj, start)
    idx = np.arange(start, start + n)
    patients = rng.integers(0, max(1, (start + n) // 3 + 1000), n)
    prng = [np.random.default_rng([seed, 77, int(p)]) for p in patients]  # stable per patient
    names = [
        "".join(_SYL[r.integers(0, 20, 2)]).capitalize()
        + " "
        + "".join(_SYL[r.integers(0, 20, 3)]).capitalize()
        for r in prng
    ]
    postcodes = [f"{r.integers(10000, 99999)}" for r in prng]
    birth = np.array([r.integers(1930, 2006) for r in prng], dtype=np.int16)
    sex = np.array([["F", "M", "X"][int(r.choice(3, p=[0.5, 0.49, 0.01]))] for r in prng])
    age = 2025 - birth.astype(float)
    ts = Y2024_US + rng.integers(0, 730 * 86_400, n) * US
    ward = _WARDS[rng.choice(len(_WARDS), n, p=[0.2, 0.15, 0.15, 0.3, 0.1, 0.1])]
    sbp = np.clip(rng.normal(118 + 0.45 * (age - 40), 16), 80, 220).round()
    hr = np.clip(rng.normal(78, 13, n), 40, 170).round()
    bmi = np.clip(rng.normal(26.5, 4.8, n), 15, 55).round(1)
    diag = [f"{_DIAG[w]}{rng.integers(0, 99):02d}" for w in ward]
    severity = 0.02 * (age - 50) + 0.015 * (sbp - 120) + (ward == "oncology") * 0.8
    los = np.round(np.exp(1.0 + 0.25 * severity + rng.normal(0, 0.5, n)), 1)
    logit = -2.2 + 0.9 * severity + 0.05 * los + rng.normal(0, 0.4, n)
    readm = rng.uniform(0, 1, n) < 1 / (1 + np.exp(-logit))
    missing = rng.uniform(0, 1, (3, n)) < np.array([[0.03], [0.05], [0.08]])
    return pa.table(
        {
            "record_id": [f"H{i:09d}" for i in idx],
            "patient_id": [f"P{int(p):08d}" for p in patients],
            "patient_name": pa.array(
                [None if missing[2][j] else names[j] for j in range(n)], pa.string()
            ),
            "postcode": postcodes,
            "birth_year": pa.array(birth, pa.int16()),
            "sex": sex,
            "admission_ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "ward": ward,
            "systolic_bp": pa.array(sbp.astype(np.int16), pa.int16(), mask=missing[0]),
            "heart_rate": pa.array(hr.astype(np.int16), pa.int16(), mask=missing[1]),
            "bmi": pa.array(bmi, pa.float64(), mask=missing[2]),
            "diagnosis_code": diag,
            "length_of_stay_days": los,
            "readmitted_30d": readm,
        },
        schema=HEALTH_SCHEMA,
    )


def agriculture_chunk(seed: int, start: int, n: int, obj: int) -> pa.Table:
    rng = _rng(seed, obj, start)
    idx = np.arange(start, start + n)
    field_no = rng.integers(0, 400, n)
    crop_i = (np.random.default_rng([seed, 5]).integers(0, 4, 400))[field_no]
    day = rng.integers(0, 214, n)
    ts = MAR2025_US + day * 86_400 * US + rng.integers(0, 86_400, n) * US
    season = np.sin(np.pi * day / 214)
    temp = np.round(8 + 16 * season + rng.normal(0, 3, n), 1)
    rain = np.round(np.clip(rng.gamma(0.6, 4.0, n) * (rng.uniform(0, 1, n) < 0.4), 0, None), 1)
    moisture = np.round(
        np.clip(18 + 1.5 * rain - 0.4 * (temp - 15) + rng.normal(0, 4, n), 3, 60), 1
    )
    ndvi = np.round(
        np.clip(0.15 + 0.6 * season * (moisture / 30) ** 0.3 + rng.normal(0, 0.05, n), -0.1, 0.95),
        3,
    )
    field_quality = np.random.default_rng([seed, 6]).normal(1.0, 0.12, 400)[field_no]
    yld = np.round(
        _CROP_YIELD[crop_i] * field_quality * (0.7 + 0.6 * np.clip(moisture / 30, 0, 1.2)) / 1.3, 2
    )
    return pa.table(
        {
            "reading_id": [f"R{i:09d}" for i in idx],
            "farm_id": [f"F{int(f) // 8:03d}" for f in field_no],
            "field_id": [f"FLD{int(f):04d}" for f in field_no],
            "sensor_ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "crop": _CROPS[crop_i],
            "soil_moisture_pct": moisture,
            "air_temp_c": pa.array(temp, pa.float64(), mask=rng.uniform(0, 1, n) < 0.02),
            "rainfall_mm": rain,
            "ndvi": ndvi,
            "yield_t_ha": pa.array(yld, pa.float64(), mask=rng.uniform(0, 1, n) < 0.3),
        },
        schema=AGRI_SCHEMA,
    )


def _jsonl(table: pa.Table) -> bytes:
    rows = table.to_pylist()
    out = []
    for r in rows:
        for k, v in r.items():
            if hasattr(v, "isoformat"):
                r[k] = v.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        out.append(json.dumps(r, ensure_ascii=False, separators=(",", ":")))
    return ("\n".join(out) + "\n").encode()


def _write_objects(
    url: str, storage_options: dict[str, Any] | None, rows: int, objects: int, ext: str,
    chunk: Callable[[int, int, int], pa.Table], writer: Callable[[pa.Table, Any, bool], None],
) -> list[str]:  # fmt: skip
    if objects < 1 or rows < objects:
        raise ConfigError(
            f"generator: need at least one object and one row per object "
            f"(got rows={rows}, objects={objects})"
        )
    fs, root = check_store(url, storage_options, "data space")
    per, extra = divmod(rows, objects)
    written, start = [], 0
    for i in range(objects):
        n = per + (1 if i < extra else 0)
        name = f"part-{i:05d}{ext}"
        try:
            with staged_file(fs, f"{root}/{name}") as local, open(local, "wb") as fh:
                for off in range(0, n, CHUNK):
                    writer(chunk(start + off, min(CHUNK, n - off), i), fh, off == 0)
        except Exception as exc:
            raise storage_error(f"data space {url}/{name}", exc, storage_options) from None
        written.append(f"{url.rstrip('/')}/{name}")
        start += n
    return written


def generate_health(url: str, storage_options: dict[str, Any] | None = None, seed: int = 21,
                    rows: int = 40_000, objects: int = 4) -> list[str]:  # fmt: skip
    return _write_objects(
        url, storage_options, rows, objects, ".jsonl",
        lambda s, n, o: health_chunk(seed, s, n, o),
        lambda t, fh, _first: fh.write(_jsonl(t)),
    )  # fmt: skip


def generate_agriculture(url: str, storage_options: dict[str, Any] | None = None, seed: int = 31,
                         rows: int = 60_000, objects: int = 3) -> list[str]:  # fmt: skip
    def write(t: pa.Table, fh: Any, first: bool) -> None:
        pacsv.write_csv(t, fh, pacsv.WriteOptions(include_header=first))

    return _write_objects(
        url, storage_options, rows, objects, ".csv",
        lambda s, n, o: agriculture_chunk(seed, s, n, o), write,
    )  # fmt: skip


def _generators() -> dict[str, Callable[..., list[str]]]:
    from aifactory.tasks.data.datagen import generate_mobility
    from aifactory.tasks.data.textgen import generate_reviews

    return {
        "mobility": generate_mobility,
        "tourism": generate_reviews,
        "health": generate_health,
        "agriculture": generate_agriculture,
    }


def seed_entry(
    entry: DatasetEntry, url: str, storage_options: dict[str, Any] | None,
    seed: int | None = None, rows: int | None = None, objects: int | None = None,
) -> int:  # fmt: skip
    """Generate ``entry``'s data under ``url`` if nothing is there; the objects written."""
    if entry.generator is None:
        raise ConfigError(f"dataset {entry.id}: the catalog declares no generator to seed it with")
    if has_objects(url, storage_options, extension=entry.distribution.extension()):
        return 0
    g = entry.generator
    target = glob_base(url)
    fn = _generators()[g.name]
    return len(fn(target, storage_options, seed if seed is not None else g.seed,
                  rows if rows is not None else g.rows,
                  objects if objects is not None else g.objects))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from aifactory.tasks.data.catalog import catalog_at

    p = argparse.ArgumentParser(
        prog="python -m aifactory.tasks.data.generators", description=__doc__.splitlines()[0]
    )
    p.add_argument("dataset", help="catalog dataset id, or generator name")
    p.add_argument("url", nargs="?", help="fsspec URL (default: the catalog's, under --root)")
    p.add_argument("--root", default=None, help="data-space root for relative distributions")
    p.add_argument("--rows", type=int)
    p.add_argument("--objects", type=int)
    p.add_argument("--seed", type=int)
    a = p.parse_args(argv)
    try:
        cat = catalog_at()
        by_gen = {d.generator.name: d for d in cat.datasets if d.generator}
        entry = by_gen.get(a.dataset) or cat.get(a.dataset)
        url = a.url or resolve_distribution(entry, a.root)
        n = seed_entry(entry, url, None, a.seed, a.rows, a.objects)
        print(
            f"{entry.id}: wrote {n} objects under {glob_base(url)}"
            if n
            else f"{url}: already seeded"
        )
    except AifError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
