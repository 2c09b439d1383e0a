"""Profiles: every shipped profile validates; bad ones fail with one precise line."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifactory.tasks.core.config import PROFILES_DIR, load_profile
from aifactory.tasks.core.errors import ConfigError
from aifactory.tasks.data.catalog import catalog_at


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_profiles_validate(path: Path) -> None:
    cfg = load_profile(str(path), env={"HOME": "/home/user"})
    assert cfg.startups and cfg.default_startup in cfg.startups
    assert cfg.lake.url and cfg.dataset_url(cfg.dataset_entry())
    for st in cfg.startups.values():  # every declared purpose is allowed by some dataset
        for purpose in st.purposes:
            assert any(purpose in d.policy.allowed_purposes for d in catalog_at().datasets)


def test_paths_become_absolute(tmp_path: Path) -> None:
    cfg = load_profile("local", env={}, base_dir=tmp_path)
    assert cfg.lake.url == f"file://{tmp_path}/.aif/local/lake"
    assert cfg.runs_dir.startswith(str(tmp_path))
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/.aif/local/mlflow.db"


def test_precedence_file_env_explicit() -> None:
    env = {"AIF_TRAINING__EPOCHS": "3"}
    assert load_profile("local", env=env).training.epochs == 3
    assert load_profile("local", env=env, overrides={"training.epochs": 5}).training.epochs == 5
    assert load_profile("local", env={}).training.epochs == 8


def test_unknown_profile_lists_known() -> None:
    with pytest.raises(ConfigError, match=r"unknown profile 'nope': use one of .*local.*site"):
        load_profile("nope", env={})


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    src = (PROFILES_DIR / "local.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("  epochs: 8", "  epochs: 8\n  gpus: 2"))
    with pytest.raises(ConfigError) as err:
        load_profile(str(bad), env={})
    msg = str(err.value)
    assert "training.gpus: unknown key" in msg and "gpus_per_node" in msg
    assert "\n" not in msg


def test_bad_type_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((PROFILES_DIR / "local.yaml").read_text().replace("epochs: 8", "epochs: many"))
    with pytest.raises(ConfigError, match=r"bad.yaml: training.epochs: "):
        load_profile(str(bad), env={})


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\n  - : [\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line"):
        load_profile(str(bad), env={})


def test_missing_env_without_default(tmp_path: Path) -> None:
    p = tmp_path / "p.yaml"
    p.write_text(
        (PROFILES_DIR / "local.yaml")
        .read_text()
        .replace("${AIF_HOME:-.aif}/local/lake", "${LAKE_ROOT}")
    )
    with pytest.raises(ConfigError, match=r"LAKE_ROOT.* is not set"):
        load_profile(str(p), env={})


def test_unknown_startup() -> None:
    cfg = load_profile("site", env={})
    with pytest.raises(ConfigError, match=r"unknown start-up 'startup-z'.*startup-a, startup-b"):
        cfg.startup("startup-z")


def test_secrets_masked_and_hash_stable() -> None:
    env = {"AWS_ACCESS_KEY_ID": "CANARY-KEY", "AWS_SECRET_ACCESS_KEY": "CANARY-SECRET",
           "AIF_PSEUDONYMISATION_KEY": "CANARY-PSEUDO"}  # fmt: skip
    cfg = load_profile("site", env=env)
    text = str(cfg.public_dict())
    assert "CANARY" not in text
    assert cfg.config_hash() == load_profile("site", env=env).config_hash()
    assert cfg.child_env()["AWS_SECRET_ACCESS_KEY"] == "CANARY-SECRET"


def test_a_dict_override_merges_into_its_section() -> None:
    from aifactory.tasks.core.config import load_profile

    cfg = load_profile("site", {"training": {"epochs": 400}, "dataspace.purpose": "x"})
    assert cfg.training.epochs == 400
    assert cfg.training.executor == "slurm"  # the rest of the section is kept
    assert cfg.dataspace.purpose == "x" and cfg.dataspace.root == "s3://aif-dataspace"


def test_a_startup_id_with_a_hyphen_is_named_with_an_underscore_in_the_environment() -> None:
    """AIF_STARTUPS__STARTUP_A__… reaches start-up ``startup-a``: a variable whose name has a
    hyphen cannot be exported by a POSIX shell and is dropped by /bin/sh (pip's launcher of
    `aif` when the virtual environment's path has a space)."""
    from aifactory.tasks.core.config import load_profile

    env = {"AIF_STARTUPS__STARTUP_A__GPU_HOURS_BUDGET": "0.1", "AIF_HOME": "/tmp/x"}
    cfg = load_profile("site", env=env)
    assert cfg.startups["startup-a"].gpu_hours_budget == 0.1
    assert "startup_a" not in cfg.startups


def test_a_run_resolves_its_profile_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline resolves its configuration once: the stages' load_profile calls (in any
    thread) get that object; nothing reads the profile file again during the run."""
    import threading

    import aifactory.flows.pipeline as fp
    from aifactory.tasks.core import config as C

    reads: list[str] = []
    real = C.profile_path
    monkeypatch.setattr(C, "profile_path", lambda n: reads.append(n) or real(n))
    seen: list[object] = []

    class Stop(Exception):
        pass

    def ingest(profile: str, sid: str, overrides: dict) -> None:
        seen.append(C.load_profile(profile, overrides))
        t = threading.Thread(target=lambda: seen.append(C.load_profile(profile, overrides)))
        t.start()
        t.join()
        raise Stop

    monkeypatch.setattr(fp, "ingest_flow", ingest)
    with pytest.raises(Stop):
        fp.pipeline.fn(profile="local", overrides={"training.epochs": 2})
    assert len(reads) == 1 and len(seen) == 2 and seen[0] is seen[1]
    assert seen[0].training.epochs == 2  # type: ignore[attr-defined]
    assert not C._SCOPES  # the scope ended with the run
    assert C.load_profile("local", {"training.epochs": 2}) is not seen[0] and len(reads) == 2
