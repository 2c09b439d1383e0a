"""The README's first command, exactly as written: ``infra/dev.sh run`` from a fresh clone.

Default profile, default home (no AIF_HOME or other AIF_* variable: ~/.aif, of a HOME of
the test's own), run from the clone's root, the clone placed under a dotted folder whose
own name has a space, with a quote and non-ASCII letters in the clone's folder name
(issue 13: a data space under ``.aif/`` listed no object, and only a test with its own
AIF_HOME ran; issue 16: the home depended on the folder it ran from). Slow (it builds the
clone's own virtual environment, from pip's cache after the first time): once per suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.processes import prefect_servers_under

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout  # fmt: skip


def _fresh_clone(dest: Path) -> None:
    """A clone of this repository's HEAD plus its uncommitted changes (so that a developer's
    run tests the tree they have; CI's tree has none)."""
    _git("clone", "-q", "--no-hardlinks", str(REPO), str(dest), cwd=REPO)
    changed = _git("ls-files", "-z", "--modified", "--others", "--exclude-standard", cwd=REPO)
    for rel in filter(None, changed.split("\0")):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel in filter(None, _git("ls-files", "-z", "--deleted", cwd=REPO).split("\0")):
        (dest / rel).unlink(missing_ok=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to clone")
def test_readme_first_command_from_a_fresh_clone_under_a_dotted_folder(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    clone = tmp_path_factory.mktemp("readme") / ".work dir" / "aif 'q ü"
    clone.parent.mkdir(parents=True)
    _fresh_clone(clone)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIF_", "PREFECT_", "MLFLOW_", "VIRTUAL_ENV"))}  # fmt: skip
    # The default home is ~/.aif: a home of the test's own (HOME), with pip's own settings
    # and cache kept (they are found under the real HOME).
    user = tmp_path_factory.mktemp("user home")
    env["HOME"] = str(user)
    env.setdefault("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    if (Path.home() / ".config" / "pip" / "pip.conf").is_file():
        env.setdefault("PIP_CONFIG_FILE", str(Path.home() / ".config" / "pip" / "pip.conf"))
    try:
        res = subprocess.run(["infra/dev.sh", "run"], cwd=clone, env=env, capture_output=True,
                             text=True, timeout=1500)  # fmt: skip
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        last = res.stdout.strip().splitlines()[-1]
        assert re.fullmatch(r"models:/mobility-trip-duration/\d+", last), out[-4000:]
        assert (user / ".aif" / "local" / "lake").is_dir()  # the default home: ~/.aif
        assert not (clone / ".aif" / "local").exists()  # not the folder it ran in
    finally:
        aif = clone / ".venv" / "bin" / "aif"
        if aif.exists():
            subprocess.run([str(aif), "server", "stop"], cwd=clone, env=env, timeout=120,
                           capture_output=True)  # fmt: skip
    assert not prefect_servers_under(user), "the home's Prefect server outlived `aif server stop`"
    shutil.rmtree(clone, ignore_errors=True)  # its virtual environment is a few GB
