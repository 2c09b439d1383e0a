"""The data-space catalog: one YAML file, one entry per dataset (DCAT-inspired).

An entry says what a dataset is (id, data space, title, publisher, license), where it is
(a distribution: an fsspec URL or glob and a format), what it promises (a schema
contract: columns with Arrow types, nullability, unit and description, and a primary key)
and on which terms it may be used (a usage policy: allowed start-ups and purposes, a
valid-until date, and the personal-data columns to pseudonymise before the lake).

A distribution URL without a scheme (``mobility/trips/``) is relative to the profile's
data-space root, so the same catalog serves the local folder and the site's S3 endpoint.

    aif catalog ls | show ID | validate FILE

``validate`` names the entry, the key and the reason of every problem, e.g.
``catalog.yaml: datasets[2] (health-records): policy.valid_until: invalid date 'soon'``.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
import zoneinfo
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aifactory.tasks.core.errors import ConfigError

DEFAULT_CATALOG = Path(__file__).resolve().parents[2] / "infra" / "catalog" / "catalog.yaml"

_SIMPLE_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "date32": pa.date32(),
}
_TIMESTAMP = re.compile(r"^timestamp\[(s|ms|us|ns)(?:,\s*(?:tz=)?([A-Za-z0-9_+\-/:]+))?\]$")
EXTENSIONS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}  # format -> file suffix
TYPE_NAMES = [*sorted(_SIMPLE_TYPES), "timestamp[UNIT]", "timestamp[UNIT, TZ]"]


def parse_type(text: str) -> pa.DataType:
    """``int32``, ``float64``, ``string``, ``timestamp[us, UTC]``… as an Arrow type."""
    t = text.strip()
    if t in _SIMPLE_TYPES:
        return _SIMPLE_TYPES[t]
    m = _TIMESTAMP.match(t)
    if m:
        unit, tz = m.group(1), m.group(2)
        if tz and not re.fullmatch(r"[+-]\d\d:\d\d", tz):
            try:
                zoneinfo.ZoneInfo(tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {tz!r}") from None
        return pa.timestamp(unit, tz=tz)
    raise ValueError(f"unknown type {text!r}; known types: {', '.join(TYPE_NAMES)}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Column(_Model):
    name: str = Field(min_length=1)
    type: str
    nullable: bool = True
    unit: str | None = None
    description: str = ""

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        parse_type(v)
        return v

    def arrow(self) -> pa.Field:
        return pa.field(self.name, parse_type(self.type), nullable=self.nullable)


class SchemaContract(_Model):
    primary_key: str
    columns: list[Column] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> SchemaContract:
        names = [c.name for c in self.columns]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"column(s) declared twice: {', '.join(dup)}")
        if self.primary_key not in names:
            raise ValueError(f"primary_key {self.primary_key!r} is not one of the columns")
        pk = self.columns[names.index(self.primary_key)]
        if pk.nullable:
            raise ValueError(f"primary_key column {pk.name!r} must be nullable: false")
        return self

    def arrow(self) -> pa.Schema:
        return pa.schema([c.arrow() for c in self.columns])


class Distribution(_Model):
    url: str = Field(min_length=1)  # fsspec URL or glob; relative: under the data-space root
    format: Literal["parquet", "csv", "jsonl"]
    media_type: str | None = None

    def extension(self) -> str:
        return EXTENSIONS[self.format]


class UsagePolicy(_Model):
    allowed_startups: list[str] = Field(min_length=1)  # "*": any start-up
    allowed_purposes: list[str] = Field(min_length=1)  # "*": any purpose
    valid_until: dt.date
    personal_data: list[str] = Field(default_factory=list)  # columns to pseudonymise
    notes: str = ""


class GeneratorSpec(_Model):
    """How to seed this dataset deterministically where the data space is empty."""

    name: Literal["mobility", "tourism", "health", "agriculture"]
    seed: int = 7
    rows: int = Field(default=100_000, ge=1)
    objects: int = Field(default=4, ge=1)


class DatasetEntry(_Model):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    data_space: str
    title: str
    description: str = ""
    publisher: str
    license: str
    keywords: list[str] = Field(default_factory=list)
    temporal: str | None = None  # e.g. "2025-01-01/2025-12-31"
    distribution: Distribution
    schema_: SchemaContract = Field(alias="schema")
    policy: UsagePolicy
    generator: GeneratorSpec | None = None

    @model_validator(mode="after")
    def _personal_columns(self) -> DatasetEntry:
        cols = {c.name: c for c in self.schema_.columns}
        for name in self.policy.personal_data:
            if name not in cols:
                raise ValueError(f"policy.personal_data names {name!r}, which is not a column")
            if parse_type(cols[name].type) != pa.string():
                raise ValueError(
                    f"policy.personal_data column {name!r} must have type string "
                    f"(its pseudonyms are strings), not {cols[name].type}"
                )
        return self

    def contract(self) -> Any:
        from aifactory.tasks.data.dataspace import DatasetContract

        return DatasetContract(
            name=self.id,
            data_space=self.data_space,
            title=self.title,
            schema=self.schema_.arrow(),
            primary_key=self.schema_.primary_key,
            publisher=self.publisher,
            license=self.license,
            format=self.distribution.format,
            descriptions={c.name: c.description for c in self.schema_.columns},
            units={c.name: c.unit for c in self.schema_.columns if c.unit},
        )

    def public(self) -> dict[str, Any]:
        """The entry as plain data (for manifests, model cards and `aif catalog show`)."""
        return self.model_dump(mode="json", by_alias=True)


class Catalog(_Model):
    title: str = "aifactory data-space catalog"
    datasets: list[DatasetEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_ids(self) -> Catalog:
        ids = [d.id for d in self.datasets]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"dataset id(s) declared twice: {', '.join(dup)}")
        return self

    def get(self, dataset_id: str, where: str = "catalog") -> DatasetEntry:
        for d in self.datasets:
            if d.id == dataset_id:
                return d
        known = ", ".join(d.id for d in self.datasets)
        raise ConfigError(f"{where}: no dataset {dataset_id!r} (known datasets: {known})")


def _describe(loc: tuple[Any, ...], raw: Any) -> str:
    """``datasets[2] (health-records): policy.valid_until`` from a pydantic location."""
    parts: list[str] = []
    i = 0
    if len(loc) >= 2 and loc[0] == "datasets" and isinstance(loc[1], int):
        entry_id = None
        if isinstance(raw, dict) and isinstance(raw.get("datasets"), list):
            items = raw["datasets"]
            if 0 <= loc[1] < len(items) and isinstance(items[loc[1]], dict):
                entry_id = items[loc[1]].get("id")
        parts.append(f"datasets[{loc[1]}]" + (f" ({entry_id})" if entry_id else ""))
        i = 2
    rest = ""
    for p in loc[i:]:
        if isinstance(p, int):
            rest += f"[{p}]"
        elif p not in ("function-after", "literal_error"):
            rest += ("." if rest else "") + str(p)
    if rest:
        parts.append(rest)
    return ": ".join(parts) or "top level"


def _problems(exc: ValidationError, raw: Any) -> list[str]:
    out = []
    for e in exc.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        inp = e.get("input")
        if e["type"] not in ("missing", "extra_forbidden") and isinstance(inp, str | int | float):
            msg = f"{msg} (got {inp!r})"
        out.append(f"{_describe(tuple(e['loc']), raw)}: {msg}")
    return out


def parse_catalog(raw: Any, where: str) -> Catalog:
    """Validate parsed YAML; ConfigError naming every bad entry and key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a catalog is a mapping with a 'datasets' list")
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        problems = _problems(exc, raw)
        head = f"{where}: " if len(problems) == 1 else f"{where}: {len(problems)} problems: "
        raise ConfigError(head + "; ".join(problems)) from None


def load_catalog(path: str | Path | None = None) -> Catalog:
    p = Path(path) if path else DEFAULT_CATALOG
    if not p.is_file():
        raise ConfigError(f"catalog {p}: file does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(
            f"catalog {p}: not valid YAML{at} ({getattr(exc, 'problem', exc)})"
        ) from None
    return parse_catalog(raw, f"catalog {p}")


@functools.lru_cache(maxsize=8)
def _cached(path: str, mtime: float) -> Catalog:
    return load_catalog(path)


def catalog_at(path: str | Path | None = None) -> Catalog:
    """The catalog at ``path`` (default: the shipped one), parsed once per file version."""
    p = Path(path) if path else DEFAULT_CATALOG
    try:
        mtime = p.stat().st_mtime
    except OSError:
        return load_catalog(p)  # raises the one-line error
    return _cached(str(p), mtime)


def resolve_distribution(entry: DatasetEntry, root: str | None) -> str:
    """The entry's distribution as an absolute fsspec URL or glob."""
    url = entry.distribution.url
    if "://" in url or url.startswith("/"):
        return url if "://" in url else f"file://{url}"
    if not root:
        raise ConfigError(
            f"dataset {entry.id}: distribution {url!r} is relative, and the profile sets no "
            "dataspace.root to resolve it against"
        )
    return f"{root.rstrip('/')}/{url.lstrip('/')}"
