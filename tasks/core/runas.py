"""Running a command as a start-up's Unix user (the orchestrator is root on a site).

Whatever reads or runs a start-up's own files (its model's class or pickle, its git
repository) does it as that user, through ``runuser``, with an environment of nothing but
PATH, HOME and the locale: never as root, and never with the orchestrator's secrets.
"""

from __future__ import annotations

import os
import pwd

from aifactory.tasks.core.errors import ConfigError


def as_user(run_as: str, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run ``argv`` as ``run_as``."""
    try:
        home = pwd.getpwnam(run_as).pw_dir
    except KeyError:
        raise ConfigError(f"start-up Unix user {run_as!r} does not exist on this host "
                          "(startups.<id>.user)") from None  # fmt: skip
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": home, "LANG": "C.UTF-8",
           "USER": run_as, "LOGNAME": run_as}  # fmt: skip
    return ["runuser", "-u", run_as, "--", *argv], env


def owned_by(path: str | os.PathLike[str], user: str | None) -> bool:
    """Whether ``user`` (a Unix user name) owns ``path`` and is not this process's user."""
    if not user:
        return False
    try:
        uid = pwd.getpwnam(user).pw_uid
        return uid != os.getuid() and os.stat(path).st_uid == uid
    except (KeyError, OSError):
        return False
