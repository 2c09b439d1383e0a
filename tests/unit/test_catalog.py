"""The data-space catalog: the shipped one is valid and matches its generators; a bad one
is refused naming the entry, the key and why."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml

from aifactory.tasks.cli import main
from aifactory.tasks.core.config import load_profile
from aifactory.tasks.core.errors import ConfigError
from aifactory.tasks.data.catalog import (
    DEFAULT_CATALOG,
    catalog_at,
    load_catalog,
    parse_type,
    resolve_distribution,
)

RAW = yaml.safe_load(DEFAULT_CATALOG.read_text())


def test_shipped_catalog_covers_three_data_spaces_with_generators() -> None:
    cat = catalog_at()
    spaces = {d.data_space for d in cat.datasets}
    assert {"mobility", "health", "agriculture"} <= spaces
    assert {d.distribution.format for d in cat.datasets} == {"parquet", "csv", "jsonl"}
    assert all(d.generator is not None for d in cat.datasets)
    assert cat.get("health-records").policy.personal_data == [
        "patient_id",
        "patient_name",
        "postcode",
    ]


def test_contracts_match_the_generators() -> None:
    from aifactory.tasks.data.dataspace import MOBILITY_SCHEMA, REVIEW_SCHEMA
    from aifactory.tasks.data.generators import AGRI_SCHEMA, HEALTH_SCHEMA

    cat = catalog_at()
    for ds, schema in [("mobility-trips", MOBILITY_SCHEMA), ("tourism-reviews", REVIEW_SCHEMA),
                       ("health-records", HEALTH_SCHEMA),
                       ("agriculture-fields", AGRI_SCHEMA)]:  # fmt: skip
        assert cat.get(ds).schema_.arrow().equals(schema), ds


def test_types() -> None:
    assert parse_type("timestamp[us, UTC]") == pa.timestamp("us", tz="UTC")
    assert parse_type("timestamp[ms]") == pa.timestamp("ms")
    assert parse_type("double") == pa.float64()
    with pytest.raises(ValueError, match="unknown type 'decimal'"):
        parse_type("decimal")


def test_distribution_is_resolved_against_the_profile_root() -> None:
    local = load_profile("local")
    site = load_profile("site")
    entry = catalog_at().get("health-records")
    assert site.dataset_url(entry) == "s3://aif-dataspace/health/admissions/*.jsonl"
    assert local.dataset_url(entry).endswith("/local/dataspace/health/admissions/*.jsonl")
    assert site.dataset_url(site.dataset_entry()) == "s3://aif-dataspace/mobility/trips/"
    with pytest.raises(ConfigError, match=r"is relative, and the profile sets no dataspace\.root"):
        resolve_distribution(entry, None)


def _write(tmp_path: Path, data: Any) -> Path:
    p = tmp_path / "catalog.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _bad(tmp_path: Path, edit: Any) -> str:
    data = copy.deepcopy(RAW)
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_catalog(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"catalog {path}: ")
    return msg


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda d: d["datasets"][2]["policy"].update(valid_until="soon"),
         "datasets[2] (health-records): policy.valid_until: Input should be a valid date"),
        (lambda d: d["datasets"][0]["schema"]["columns"][1].update(type="timestamp[us, Mars/Base]"),
         "datasets[0] (mobility-trips): schema.columns[1].type: unknown time zone 'Mars/Base'"),
        (lambda d: d["datasets"][1]["schema"]["columns"][2].update(type="int128"),
         "datasets[1] (tourism-reviews): schema.columns[2].type: unknown type 'int128'"),
        (lambda d: d["datasets"][3].pop("license"),
         "datasets[3] (agriculture-fields): license: required key is missing"),
        (lambda d: d["datasets"][3].update(licence="x"),
         "datasets[3] (agriculture-fields): licence: unknown key"),
        (lambda d: d["datasets"][2]["policy"].update(personal_data=["ssn"]),
         "datasets[2] (health-records): policy.personal_data names 'ssn', which is not a column"),
        (lambda d: d["datasets"][2]["policy"].update(personal_data=["birth_year"]),
         "personal_data column 'birth_year' must have type string"),
        (lambda d: d["datasets"][0]["schema"].update(primary_key="nope"),
         "datasets[0] (mobility-trips): schema: primary_key 'nope' is not one of the columns"),
        (lambda d: d["datasets"][0]["distribution"].update(format="xlsx"),
         "datasets[0] (mobility-trips): distribution.format: "
         "Input should be 'parquet', 'csv' or 'jsonl'"),
        (lambda d: d["datasets"].append(copy.deepcopy(d["datasets"][0])),
         "dataset id(s) declared twice: mobility-trips"),
    ],
)  # fmt: skip
def test_validate_names_entry_key_and_reason(tmp_path: Path, edit: Any, needle: str) -> None:
    assert needle in _bad(tmp_path, edit)


def test_several_problems_in_one_line(tmp_path: Path) -> None:
    def edit(d: Any) -> None:
        d["datasets"][0]["policy"].pop("allowed_purposes")
        d["datasets"][1]["publisher"] = None

    msg = _bad(tmp_path, edit)
    assert "2 problems" in msg and "allowed_purposes: required key is missing" in msg
    assert "datasets[1] (tourism-reviews): publisher" in msg


def test_not_yaml_and_not_there(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("datasets: [\n  - id: x\n  bad")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_catalog(p)
    with pytest.raises(ConfigError, match="file does not exist"):
        load_catalog(tmp_path / "none.yaml")


def test_cli_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "ls"]) == 0
    out = capsys.readouterr().out
    assert "health-records" in out and "agriculture" in out and "3 column(s)" in out
    assert main(["catalog", "show", "health-records"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["policy"]["allowed_startups"] == ["startup-c"]
    assert shown["schema"]["columns"][8]["unit"] == "mmHg"
    assert main(["catalog", "validate", str(DEFAULT_CATALOG)]) == 0
    assert "valid (4 datasets" in capsys.readouterr().out
    data = copy.deepcopy(RAW)
    data["datasets"][2]["policy"]["valid_until"] = "soon"
    assert main(["catalog", "validate", str(_write(tmp_path, data))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aif: error: catalog ") and "policy.valid_until" in err
    assert main(["catalog", "show", "nope"]) == 2
    assert "no dataset 'nope' (known datasets: mobility-trips" in capsys.readouterr().err
