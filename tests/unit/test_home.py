"""The state home and the site's folder do not depend on the current folder (issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from aifactory.tasks.core.home import aif_home, site_dir, stray_state_hint


def test_the_home_is_aif_home_made_absolute_else_dot_aif_in_the_user_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert aif_home({"AIF_HOME": "/srv/aif", "HOME": "/home/u"}) == Path("/srv/aif")
    assert aif_home({"AIF_HOME": "h"}, cwd=tmp_path) == tmp_path / "h"
    assert aif_home({"HOME": "/home/u"}) == Path("/home/u/.aif")
    assert aif_home({"AIF_HOME": "", "HOME": "/home/u"}) == Path("/home/u/.aif")
    monkeypatch.chdir(tmp_path)
    assert aif_home({"AIF_HOME": "rel"}) == tmp_path / "rel"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("AIF_HOME", raising=False)
    assert aif_home() == aif_home({}) == tmp_path / "user" / ".aif"  # os.environ, Path.home()
    monkeypatch.setenv("AIF_HOME", "elsewhere")
    assert aif_home() == tmp_path / "elsewhere"


def test_the_site_folder_is_aif_site_dir_else_under_the_home(tmp_path: Path) -> None:
    assert site_dir({"HOME": "/home/u"}) == Path("/home/u/.aif/site")
    assert site_dir({"AIF_HOME": "/srv/aif"}) == Path("/srv/aif/site")
    assert site_dir({"AIF_SITE_DIR": "/srv/site", "AIF_HOME": "/srv/aif"}) == Path("/srv/site")
    assert site_dir({"AIF_SITE_DIR": "s"}, cwd=tmp_path) == tmp_path / "s"


def test_an_older_state_folder_is_noted_in_one_line(tmp_path: Path) -> None:
    home = tmp_path / "user" / ".aif"
    assert stray_state_hint(tmp_path, home) is None  # no .aif here
    (tmp_path / ".aif" / "typecheck").mkdir(parents=True)
    assert stray_state_hint(tmp_path, home) is None  # no state in it
    (tmp_path / ".aif" / "local" / "lake").mkdir(parents=True)
    note = stray_state_hint(tmp_path, home)
    assert note is not None and "\n" not in note
    assert str(tmp_path / ".aif" / "local") in note and str(home) in note
    assert f"AIF_HOME={tmp_path / '.aif'}" in note
    assert stray_state_hint(tmp_path, tmp_path / ".aif") is None  # it is the home


def test_a_home_that_is_a_file_is_one_error(tmp_path: Path) -> None:
    from aifactory.tasks.core.config import load_profile
    from aifactory.tasks.core.errors import ConfigError

    bad = tmp_path / "home"
    bad.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"environment variable AIF_HOME: .* is not a folder"):
        load_profile("local", env={"AIF_HOME": str(bad), "HOME": str(tmp_path)})


def test_site_address_follows_the_site_layout(tmp_path: Path) -> None:
    from aifactory.tasks.core.home import site_address

    env = {"AIF_SITE_DIR": str(tmp_path / "s")}
    assert site_address(env) == "127.0.0.1"  # no site yet
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "site.json").write_text('{"_layout": {"service_address": "10.87.0.1"}}')
    assert site_address(env) == "10.87.0.1"
    assert site_address({**env, "AIF_SITE_ADDR": "192.0.2.9"}) == "192.0.2.9"  # env wins
    (tmp_path / "s" / "site.json").write_text("{not json")
    assert site_address(env) == "127.0.0.1"
