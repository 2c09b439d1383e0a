"""Seeding happens only into the profile's own demo data space or when the run asks for it
(issue 16, item 1); --rows with a data space that already has objects is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aifactory.tasks.core.config import load_profile, profile_path
from aifactory.tasks.core.errors import ConfigError, DataError
from aifactory.tasks.data.seeding import (
    check_seeding,
    demo_dataset_url,
    ensure_seeded,
    rows_asked,
    same_place,
)

SMALL = {"dataspace.generate.rows": 600, "dataspace.generate.objects": 2}
HINT = "seeding happens only into the profile's demo data space or with --seed-demo-data"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh AIF_HOME for profile local, and no AIF_<SECTION>__<KEY> variable."""
    for k in list(os.environ):
        if k.upper().startswith("AIF_") and "__" in k:
            monkeypatch.delenv(k)
    monkeypatch.setenv("AIF_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _demo(home: Path) -> Path:
    return home / "local" / "dataspace" / "mobility" / "trips"


def _parts(folder: Path, ext: str = ".parquet") -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{ext}")) if folder.exists() else []


def test_the_profiles_own_demo_data_space_is_seeded(home: Path) -> None:
    cfg = load_profile("local", SMALL)
    assert check_seeding(cfg, "local", SMALL) and not _demo(home).exists()  # a check only
    assert ensure_seeded(cfg, "local", SMALL) == 2
    assert not check_seeding(cfg, "local", {})
    assert _parts(_demo(home)) == ["part-00000.parquet", "part-00001.parquet"]


def test_another_data_space_is_not_seeded_but_named(home: Path, tmp_path: Path) -> None:
    """`aif run --dataspace ~/nothing` seeded ~/nothing and trained on synthetic data."""
    nothing = tmp_path / "nothing"
    over = {**SMALL, "dataspace.url": str(nothing)}
    with pytest.raises(DataError) as e:
        ensure_seeded(load_profile("local", over), "local", over)
    assert str(e.value) == (
        f"data space file://{nothing}: no objects match *.parquet (missing folder); {HINT}"
    )
    assert not nothing.exists()  # nothing written
    nothing.mkdir()
    (nothing / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no objects match \*\.parquet \(1 other file\);"):
        ensure_seeded(load_profile("local", over), "local", over)
    assert _parts(nothing) == []


def test_an_environment_variable_is_not_the_profiles_demo(home: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("AIF_DATASPACE__URL", f"file://{elsewhere}")
    with pytest.raises(DataError, match=f"data space file://{elsewhere}: .*{HINT}"):
        ensure_seeded(load_profile("local", SMALL), "local", SMALL)
    monkeypatch.delenv("AIF_DATASPACE__URL")
    monkeypatch.setenv("AIF_DATASPACE__ROOT", f"file://{elsewhere}")  # another root
    with pytest.raises(DataError, match=HINT):
        ensure_seeded(load_profile("local", SMALL), "local", SMALL)
    assert not elsewhere.exists()


def test_asked_for_seeding_seeds_anywhere(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "asked"
    over = {**SMALL, "dataspace.url": f"file://{target}"}
    assert ensure_seeded(load_profile("local", over), "local", over, seed=True) == 2
    assert len(_parts(target)) == 2


def test_the_demo_in_another_spelling_is_still_the_demo(home: Path) -> None:
    spelled = f"{_demo(home)}/../trips/"  # a plain path, '..' and a trailing slash
    over = {**SMALL, "dataspace.url": spelled}
    assert ensure_seeded(load_profile("local", over), "local", over) == 2
    assert same_place(spelled, f"file://{_demo(home)}")
    assert not same_place(f"file://{_demo(home).parent}", f"file://{_demo(home)}")


def test_a_glob_distribution_is_named_with_its_pattern(home: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       ) -> None:  # fmt: skip
    monkeypatch.setenv("AIF_DATASPACE__ROOT", f"file://{tmp_path}/other")
    over = {"dataspace.dataset": "health-records"}
    cfg = load_profile("local", over)
    with pytest.raises(DataError) as e:
        ensure_seeded(cfg, "local", over)
    assert str(e.value) == (f"data space file://{tmp_path}/other/health/admissions/*.jsonl: no "
                            f"objects match *.jsonl (missing folder); {HINT}")  # fmt: skip
    # the profile's own root: that dataset's demo data space is seeded
    monkeypatch.delenv("AIF_DATASPACE__ROOT")
    own = demo_dataset_url("local", load_profile("local", over).dataset_entry())
    assert own == f"file://{home}/local/dataspace/health/admissions/*.jsonl"


def test_rows_with_a_data_space_that_has_objects_is_refused(home: Path) -> None:
    cfg = load_profile("local", SMALL)
    assert ensure_seeded(cfg, "local", SMALL) == 2  # --rows on an empty demo: used
    with pytest.raises(ConfigError) as e:
        ensure_seeded(cfg, "local", SMALL)
    assert str(e.value) == (
        f"--rows 600: data space file://{_demo(home)} already holds 2 object(s) of "
        "mobility-trips, so nothing is generated and the rows would be ignored; run without "
        "--rows, or give an empty --dataspace with --seed-demo-data"
    )
    # without --rows (the profile's own generator settings) a seeded data space is fine
    plain = {"dataspace.generate.objects": 2}
    assert ensure_seeded(load_profile("local", plain), "local", plain) == 0


def test_rows_asked() -> None:
    assert rows_asked({"dataspace.generate.rows": 5})
    assert rows_asked({"dataspace": {"generate": {"rows": 5}}})
    assert rows_asked({"dataspace.generate": {"rows": 5}})
    assert not rows_asked({"dataspace.generate.objects": 5}) and not rows_asked(None)
    assert not rows_asked({"dataspace.generate.rows": None})


def test_the_ingest_flow_asks_before_seeding(home: Path, tmp_path: Path) -> None:
    """The flow's seeding task goes through the rule (no Prefect server: the task's fn)."""
    from aifactory.flows.ingest import seed_dataspace

    over = {**SMALL, "dataspace.url": str(tmp_path / "nothing")}
    with pytest.raises(DataError, match=HINT):
        seed_dataspace.fn("local", "mobility-trips", over)
    assert not (tmp_path / "nothing").exists()
    assert seed_dataspace.fn("local", "mobility-trips", SMALL) == 2


def test_rows_do_not_make_a_profile_without_a_generator_a_demo(home: Path, tmp_path: Path,
                                                              ) -> None:  # fmt: skip
    """A profile file without dataspace.generate (a real data space): its own URL is never
    seeded, --rows (which creates the section as an override) or not."""
    profile = tmp_path / "real.yaml"
    text = (
        profile_path("local")
        .read_text()
        .replace("  generate: {}", "  url: file://" + str(tmp_path / "real") + "\n  generate: null")
    )
    assert "generate: null" in text
    profile.write_text(text)
    over = {"dataspace.generate.rows": 600}
    cfg = load_profile(str(profile), over)
    assert cfg.dataspace.generate is not None  # made by the override
    with pytest.raises(DataError, match=HINT):
        ensure_seeded(cfg, str(profile), over)
    assert not check_seeding(load_profile(str(profile)), str(profile), {})  # nothing to seed
    assert not (tmp_path / "real").exists()
