"""Where aif keeps its state: the home (lake, MLflow database, pseudonymisation key, runs,
managed Prefect server) and the local site's folder, both independent of the current folder.

The home is ``$AIF_HOME`` (made absolute) when set, else ``~/.aif``; the site's folder is
``$AIF_SITE_DIR`` (made absolute) when set, else ``<home>/site``. Older versions kept the
home in ``./.aif`` of whatever folder aif ran from, so a run from another folder silently
started over (a new lake, model registry and key): ``stray_state_hint`` notices that state.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

HOME_VAR = "AIF_HOME"
SITE_DIR_VAR = "AIF_SITE_DIR"
# Folders of an older version's ``./.aif`` that hold a home's state.
_STATE_FOLDERS = ("local", "site")


def _absolute(value: str, cwd: Path | None) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else ((cwd or Path.cwd()) / path).resolve()


def _user_home(env: Mapping[str, str] | None) -> Path:
    # A given environment's HOME (tests, a job's environment); else this process's.
    home = env.get("HOME") if env is not None else None
    return Path(home) if home else Path.home()


def aif_home(env: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> Path:
    """The state home: ``$AIF_HOME`` (a relative one against ``cwd``, default the current
    folder) if set and not empty, else ``~/.aif``. ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    value = env.get(HOME_VAR)
    if value:
        return _absolute(value, cwd)
    return _user_home(env) / ".aif"


def site_dir(env: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> Path:
    """The local site's folder: ``$AIF_SITE_DIR`` (made absolute) if set, else
    ``<aif_home>/site``."""
    env = os.environ if env is None else env
    value = env.get(SITE_DIR_VAR)
    if value:
        return _absolute(value, cwd)
    return aif_home(env, cwd=cwd) / "site"


SITE_ADDR_VAR = "AIF_SITE_ADDR"


def site_address(env: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> str:
    """Where compute nodes reach the site's services: ``$AIF_SITE_ADDR`` if set, else the
    address that `aif site up` recorded for the site's layout (a multi-node site's bridge),
    else loopback."""
    import json

    env = os.environ if env is None else env
    if env.get(SITE_ADDR_VAR):
        return env[SITE_ADDR_VAR]
    try:
        state = json.loads((site_dir(env, cwd=cwd) / "site.json").read_text())
        addr = state.get("_layout", {}).get("service_address")
    except (OSError, ValueError, AttributeError):
        addr = None
    return addr if isinstance(addr, str) and addr else "127.0.0.1"


def stray_state_hint(cwd: Path, home: Path) -> str | None:
    """A one-line note when ``cwd/.aif`` holds an older version's state (its ``local`` or
    ``site`` folder) and is not the home; None otherwise. The CLI prints it once."""
    stray = cwd / ".aif"
    found = [name for name in _STATE_FOLDERS if (stray / name).is_dir()]
    if not found:
        return None
    try:
        if stray.resolve() == home.resolve():
            return None
    except OSError:
        return None
    what = " and ".join(f"{stray / name}" for name in found)
    return (
        f"note: {what} holds state of an older aif (lake, MLflow, pseudonymisation key), "
        f"which now lives in {home} whatever the current folder; to keep using it, set "
        f"AIF_HOME={stray} or move its contents to {home}"
    )
