"""Profiles: every shipped profile validates; bad ones fail with one precise line that
blames the source of the bad value; `extends`; secrets; the state home; the reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from aifactory.tasks.core.config import (
    MAX_ERROR_CHARS,
    PROFILES_DIR,
    Profile,
    load_profile,
    reference_markdown,
)
from aifactory.tasks.core.errors import ConfigError
from aifactory.tasks.data.catalog import catalog_at

REFERENCE = PROFILES_DIR.parents[1] / "docs" / "profile-reference.md"


def _error(*args: Any, **kwargs: Any) -> str:
    """The one line load_profile fails with."""
    with pytest.raises(ConfigError) as err:
        load_profile(*args, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) <= MAX_ERROR_CHARS, msg
    return msg


@pytest.mark.parametrize("path", sorted(PROFILES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_profiles_validate(path: Path) -> None:
    cfg = load_profile(str(path), env={"HOME": "/home/user"})
    assert cfg.startups and cfg.default_startup in cfg.startups
    assert cfg.lake.url and cfg.dataset_url(cfg.dataset_entry())
    for st in cfg.startups.values():  # every declared purpose is allowed by some dataset
        for purpose in st.purposes:
            assert any(purpose in d.policy.allowed_purposes for d in catalog_at().datasets)


def test_paths_become_absolute(tmp_path: Path) -> None:
    cfg = load_profile("local", env={"AIF_HOME": "rel home"}, base_dir=tmp_path)
    assert cfg.lake.url == f"file://{tmp_path}/rel home/local/lake"
    assert cfg.runs_dir == f"{tmp_path}/rel home/local/runs"
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/rel home/local/mlflow.db"
    p = tmp_path / "p.yaml"
    p.write_text("extends: local\nslurm: {conf: etc/slurm.conf}\n")
    assert (
        load_profile(str(p), env={}, base_dir=tmp_path).slurm.conf == f"{tmp_path}/etc/slurm.conf"
    )


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
    msg = _error(str(bad), env={})
    assert msg.startswith(f"profile {bad}: training.gpus: unknown key (valid keys: ")
    assert "gpus_per_node" in msg


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
        (PROFILES_DIR / "local.yaml").read_text().replace("${AIF_HOME}/local/lake", "${LAKE_ROOT}")
    )
    msg = _error(str(p), env={})
    want = "lake.url: environment variable ${LAKE_ROOT} is not set and has no default"
    assert msg == f"profile {p}: {want}"


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


def test_secrets_are_secret_strings_that_repr_and_str_hide() -> None:
    env = {"AWS_ACCESS_KEY_ID": "CANARY-KEY", "AWS_SECRET_ACCESS_KEY": "CANARY-SECRET",
           "AIF_PSEUDONYMISATION_KEY": "CANARY-PSEUDO"}  # fmt: skip
    cfg = load_profile("site", env=env)
    store = cfg.object_store
    assert store is not None and isinstance(store.secret, SecretStr)
    assert isinstance(store.key, SecretStr) and isinstance(
        cfg.dataspace.pseudonymisation_key, SecretStr
    )
    for shown in (repr(cfg), str(cfg), repr(store), str(cfg.dataspace), cfg.model_dump_json()):
        assert "CANARY" not in shown
    shown = cfg.public_dict()["object_store"] | {"endpoint_url": None, "tenant_keys": None}
    assert shown == {"endpoint_url": None, "key": "***", "secret": "***", "region": "us-east-1",
                     "token": None, "tenant_keys": None}  # fmt: skip
    assert cfg.public_dict()["dataspace"]["pseudonymisation_key"] == "***"
    opts = cfg.storage_options("s3://aif-lake")
    assert (opts["key"], opts["secret"]) == ("CANARY-KEY", "CANARY-SECRET")
    assert store.key.get_secret_value() == "CANARY-KEY"
    # a key given by reference is resolved when used: shown as such, not masked
    ref = load_profile("site", env={}).public_dict()["dataspace"]["pseudonymisation_key"]
    assert ref.startswith("file:/") and ref.endswith("/secrets/pseudonymisation.key")


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


# -- issue 16: an error names the source of the bad value -----------------------------------
def test_an_unknown_key_of_the_environment_is_blamed_on_its_variable() -> None:
    msg = _error("local", env={"AIF_TRAINING__EPOCHZ": "3"})
    assert msg.startswith("environment variable AIF_TRAINING__EPOCHZ: training.epochz: unknown "
                          "key (valid keys: batch_size, "), msg  # fmt: skip
    assert "local.yaml" not in msg


def test_a_bad_value_of_the_environment_is_blamed_on_its_variable() -> None:
    msg = _error("local", env={"AIF_TRAINING__EPOCHS": "many"})
    assert msg.startswith("environment variable AIF_TRAINING__EPOCHS: training.epochs: Input "
                          "should be a valid integer"), msg  # fmt: skip


def test_a_bad_flag_is_blamed_on_the_flag_and_an_unlabelled_override_on_its_key() -> None:
    over = {"training.epochs": -1}
    msg = _error("local", over, env={}, origins={"training.epochs": "flag --epochs"})
    assert msg == "flag --epochs: training.epochs: Input should be greater than or equal to 1"
    msg = _error("local", over, env={"AIF_TRAINING__EPOCHS": "3"})
    assert msg.startswith("override training.epochs: training.epochs: Input should be greater")
    label = "project /p/aifactory.yaml"
    msg = _error("local", {"training": {"lr": 0}}, env={}, origins={"training": label})
    assert msg.startswith(f"{label}: training.lr: Input should be greater than 0"), msg


def test_a_rule_across_keys_is_blamed_on_the_sources_it_names() -> None:
    env = {"AIF_DASK__ADAPTIVE_MIN": "3", "AIF_DASK__ADAPTIVE_MAX": "1", "AIF_DASK__WORKERS": "4"}
    msg = _error("local", env=env)
    assert msg == ("environment variables AIF_DASK__ADAPTIVE_MAX, AIF_DASK__ADAPTIVE_MIN: dask: "
                   "adaptive_min is larger than adaptive_max")  # fmt: skip
    msg = _error("local", {"mlflow.flavour": "sklearn"}, env={},
                 origins={"mlflow.flavour": "flag --flavour"})  # fmt: skip
    assert msg.startswith("flag --flavour: mlflow.flavour sklearn: needs training.script"), msg


def test_a_bad_features_section_is_blamed_on_its_source() -> None:
    msg = _error("local", env={"AIF_FEATURES__SPLIT": "{train: 50, val: 10, test: 10}"})
    assert msg.startswith("environment variable AIF_FEATURES__SPLIT: features.split: "
                          "percentages add up to 70"), msg  # fmt: skip


def test_many_problems_give_one_capped_line() -> None:
    env = {f"AIF_TRAINING__X{i}": "1" for i in range(6)}
    msg = _error("local", env=env)
    assert msg.count("valid keys") == 1 and msg.endswith("(and 3 more problems)"), msg


# -- environment variables (pydantic-settings) ----------------------------------------------
def test_an_unknown_section_of_the_environment_names_the_variable() -> None:
    msg = _error("local", env={"AIF_TRAINIG__EPOCHS": "3"})
    assert msg.startswith("environment variable AIF_TRAINIG__EPOCHS: trainig: unknown key "
                          "(valid keys: allocation, dask, dataspace, "), msg  # fmt: skip


def test_environment_values_are_yaml_and_names_case_insensitive() -> None:
    env = {"aif_training__epochs": "3", "AIF_TRAINING__HIDDEN": "[16, 8]",
           "AIF_DASK__JOB_EXTRA_DIRECTIVES": "[--hint=nomultithread]", "AIF_TRAINING__QOS": "",
           "AIF_TRAINING__ENV": '{"A": "1"}', "AIF_DATASPACE__GENERATE__ROWS": "5",
           "AIF_TRAINING__SETUP": "[a: b: c]"}  # fmt: skip
    cfg = load_profile("local", env={**env, "AIF_TRAINING__SETUP": "[echo 1]"})
    assert (cfg.training.epochs, cfg.training.hidden, cfg.training.qos) == (3, [16, 8], None)
    assert cfg.dask.job_extra_directives == ["--hint=nomultithread"]
    assert cfg.training.env == {"A": "1"} and cfg.training.setup == ["echo 1"]
    assert cfg.dataspace.generate is not None and cfg.dataspace.generate.rows == 5
    # not YAML: a plain string (here not a list, so one line naming the variable)
    assert _error("local", env=env).startswith("environment variable AIF_TRAINING__SETUP: ")


def test_variables_without_a_delimiter_are_not_keys() -> None:
    env = {"AIF_PROFILE": "site", "AIF_S3_ENDPOINT": "x", "AIF_TRAINING": "{epochs: 3}",
           "AIF_NAME": "other", "AIF_PSEUDONYMISATION_KEY": "k" * 20}  # fmt: skip
    cfg = load_profile("local", env=env)
    assert cfg.name == "local" and cfg.training.epochs == 8


def test_the_environment_is_read_by_pydantic_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic_settings import EnvSettingsSource

    seen: list[str] = []
    real = EnvSettingsSource.explode_env_vars

    def spy(self: Any, name: str, field: Any, env_vars: Any) -> Any:
        seen.append(name)
        return real(self, name, field, env_vars)

    monkeypatch.setattr(EnvSettingsSource, "explode_env_vars", spy)
    assert load_profile("local", env={"AIF_TRAINING__EPOCHS": "2"}).training.epochs == 2
    assert "training" in seen


# -- extends --------------------------------------------------------------------------------
def test_a_profile_extending_local_differs_only_where_it_says(tmp_path: Path) -> None:
    p = tmp_path / "short.yaml"
    p.write_text("# three epochs\nextends: local\ntraining:\n  epochs: 3\n")
    env = {"HOME": str(tmp_path)}
    child, local = load_profile(str(p), env=env), load_profile("local", env=env)
    assert child.training.epochs == 3
    want = json.loads(json.dumps(local.public_dict()))
    want["training"]["epochs"] = 3
    assert child.public_dict() == want


def test_a_typo_in_a_short_override_file_is_one_line_naming_it(tmp_path: Path) -> None:
    p = tmp_path / "short.yaml"
    p.write_text("name: short\nextends: local\ntraining:\n  epocs: 3\n")
    msg = _error(str(p), env={})
    assert msg.startswith(f"profile {p}: training.epocs: unknown key (valid keys: "), msg
    assert "epochs" in msg and "required" not in msg and ";" not in msg
    # without `extends`: the typo first, and a hint instead of a list of missing keys
    p.write_text("name: short\ntraining:\n  epocs: 3\n")
    msg = _error(str(p), env={})
    assert msg.startswith(f"profile {p}: training.epocs: unknown key") and "required" not in msg
    assert msg.endswith("starts with: extends: local)"), msg


def test_extends_chains_merge_recursively_and_blame_the_file_that_set_the_key(
    tmp_path: Path,
) -> None:
    (tmp_path / "sub").mkdir()
    base = tmp_path / "base.yaml"
    base.write_text("extends: site\nname: base\ntraining: {epochs: 5, lr: 0.01}\n"
                    "startups: {startup-b: {title: B}}\n")  # fmt: skip
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("extends: ../base.yaml\ntraining: {epochs: 6}\n")
    cfg = load_profile(str(child), env={})
    assert (cfg.name, cfg.training.epochs, cfg.training.lr) == ("base", 6, 0.01)
    assert cfg.training.executor == "slurm" and cfg.startups["startup-b"].title == "B"
    assert cfg.startups["startup-b"].account == "startup-b"
    base.write_text(base.read_text().replace("lr: 0.01", "lr: -1"))
    assert _error(str(child), env={}).startswith(f"profile {base}: training.lr: ")
    child.write_text("extends: ../base.yaml\ntraining: {epochs: 0}\n")
    assert _error(str(child), env={}).startswith(f"profile {child}: training.epochs: ")


def test_an_extends_cycle_names_the_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: ./a.yaml\n")
    msg = _error(str(a), env={})
    assert "extends makes a cycle" in msg and f"{a} -> {b} -> {a}" in msg, msg
    a.write_text("extends: nope\n")
    assert "extends nope: unknown profile (use one of " in _error(str(a), env={})


# -- the state home -------------------------------------------------------------------------
def test_the_home_does_not_depend_on_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"HOME": str(tmp_path / "user")}
    seen = []
    for cwd in (tmp_path / "a", tmp_path / "b"):
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        cfg = load_profile("local", env=env)
        seen.append((cfg.lake.url, cfg.mlflow.tracking_uri, cfg.runs_dir, cfg.home_dir,
                     cfg.public_dict()["dataspace"]["pseudonymisation_key"]))  # fmt: skip
    home = tmp_path / "user" / ".aif"
    assert seen[0] == seen[1] == (f"file://{home}/local/lake", f"sqlite:///{home}/local/mlflow.db",
                                  f"{home}/local/runs", str(home),
                                  f"file:{home}/local/secrets/pseudonymisation.key")  # fmt: skip
    site = load_profile("site", env=env)
    assert site.slurm.conf == f"{home}/site/slurm/slurm.conf"
    site = load_profile("site", env={**env, "AIF_SITE_DIR": "s"}, base_dir=tmp_path)
    assert site.slurm.conf == f"{tmp_path}/s/slurm/slurm.conf"


def test_an_older_state_folder_in_the_current_folder_is_noted_not_fatal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aifactory.tasks.core.config import stray_state_hint

    (tmp_path / ".aif" / "local" / "lake").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = load_profile("local", env={"HOME": str(tmp_path / "user")})
    note = stray_state_hint(Path.cwd(), Path(cfg.home_dir))
    assert note is not None and f"AIF_HOME={tmp_path / '.aif'}" in note and "\n" not in note


# -- the reference of every key -------------------------------------------------------------
def _keys(model: Any, prefix: str = "") -> list[str]:
    from aifactory.tasks.core.config import _unwrap

    out = []
    for name, field in model.model_fields.items():
        assert field.description, f"{prefix}{name} has no description"
        out.append(f"{prefix}{name}")
        inner = _unwrap(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            sep = "[]." if "list" in str(field.annotation) else "."
            ident = ".ID" if name == "startups" else ""
            out += _keys(inner, f"{prefix}{name}{ident}{sep}")
    return out


def test_the_profile_reference_is_generated_from_the_models() -> None:
    """docs/profile-reference.md documents every key and cannot drift from the models:
    regenerate it with the command in its header."""
    text = reference_markdown()
    assert REFERENCE.read_text() == text, f"regenerate: {text.splitlines()[3].strip()}"
    for key in _keys(Profile):
        assert f"| `{key}` |" in text, key
    for word in ("`AIF_TRAINING__EPOCHS`", "`AIF_PROFILE`", "`AIF_HOME`", "`AIF_SITE_DIR`",
                 "## `extends`", "`AIF_STARTUPS__ID__GPU_HOURS_BUDGET`"):  # fmt: skip
        assert word in text, word
    cmd = [sys.executable, "-m", "aifactory.tasks.core.config"]  # the header's command
    assert subprocess.run(cmd, capture_output=True, text=True, check=True).stdout == text


def test_os_environ_is_the_default_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIF_TRAINING__EPOCHS", "4")
    monkeypatch.setenv("AIF_HOME", "/tmp/aif-home-x")
    cfg = load_profile("local")
    assert cfg.training.epochs == 4 and cfg.home_dir == "/tmp/aif-home-x"


def test_retention_reaches_prefects_own_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server's environment for prefect.retention is what Prefect's settings parse (a
    bare number of seconds fails for the events' period and the server does not start)."""
    import datetime as dt

    from prefect.settings import Settings

    from aifactory.tasks.core.config import RetentionSpec

    for k, v in (
        RetentionSpec(flow_runs_days=3, events_days=1.5, vacuum_every_s=60).server_env().items()
    ):
        monkeypatch.setenv(k, v)
    got = Settings().server
    assert got.services.db_vacuum.enabled_vacuum_types == {"events", "flow_runs", "orphans"}
    assert got.services.db_vacuum.retention_period == dt.timedelta(days=3)
    assert got.events.retention_period == dt.timedelta(days=1.5)
    assert got.services.db_vacuum.loop_seconds == 60
