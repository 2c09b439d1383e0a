"""A start-up's own git repository is read by git running as the start-up's user, never
as the orchestrator (root): root's git refuses a repository of another owner ("dubious
ownership", so the commit was lost from the lineage), and one told to trust it would run
what the repository's config names (core.fsmonitor) as root."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from aifactory.tasks.core.provenance import git_info

USER = "nobody"  # a user that is not the orchestrator's, present on every Debian machine

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the site's orchestrator)")


@pytest.fixture
def their_repo() -> Iterator[Path]:
    """A committed repository owned by USER, whose config runs a marker-writing fsmonitor."""
    base = Path(tempfile.mkdtemp(prefix="aif-git-owner-"))
    os.chmod(base, 0o755)
    repo = base / "project"
    repo.mkdir()
    (repo / "train.py").write_text("print('hi')\n")
    who = ["-c", "user.name=S", "-c", "user.email=s@example.org"]
    for args in (["init", "-q"], ["add", "."], [*who, "commit", "-q", "-m", "first"]):
        subprocess.run(["git", "-c", f"safe.directory={repo}", *args], cwd=repo, check=True,
                       capture_output=True)  # fmt: skip
    hook = base / "fsmonitor.sh"
    hook.write_text(f"#!/bin/sh\nid -u > {base}/ran-as\n")
    hook.chmod(0o755)
    subprocess.run(["git", "-c", f"safe.directory={repo}", "config", "core.fsmonitor",
                    str(hook)], cwd=repo, check=True)  # fmt: skip
    uid = pwd.getpwnam(USER).pw_uid
    for p in [base, *base.rglob("*")]:
        os.lchown(p, uid, uid)
    yield repo
    shutil.rmtree(base, ignore_errors=True)


def test_a_startups_repository_is_read_as_the_startup(their_repo: Path) -> None:
    trusted = ["git", "-c", f"safe.directory={their_repo}"]
    head = subprocess.run([*trusted, "rev-parse", "HEAD"], cwd=their_repo, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    got = git_info(their_repo, owner=USER)
    assert got == {"commit": head, "dirty": False}
    ran = their_repo.parent / "ran-as"
    if ran.exists():  # the repository's fsmonitor ran: as its owner, never as root
        assert ran.read_text().strip() == str(pwd.getpwnam(USER).pw_uid)


def test_root_never_runs_git_in_a_repository_that_is_not_the_named_owners(
    their_repo: Path,
) -> None:
    """Without the owner (or with another one), root's git refuses it: nothing of the
    repository's config runs as root, and the commit is recorded as unknown."""
    assert git_info(their_repo)["commit"] == "unknown"
    assert git_info(their_repo, owner="root")["commit"] == "unknown"
    assert not (their_repo.parent / "ran-as").exists()
