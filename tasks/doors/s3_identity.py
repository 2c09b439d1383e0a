"""Temporary object-store credentials of one start-up (STS GetSessionToken).

On a site whose object store knows each start-up as a user of its own (profile key
``object_store.tenant_keys``: a folder of ``<start-up>.json`` keys that `aif site up`
writes, readable by the orchestrator only), a run of start-up X never uses the platform's
key: the flow and every job it submits get X's temporary credentials, which the store
itself limits to X's lake prefix and the data sets X's usage policies grant. They expire
a little after the run's longest time limit; the long-lived key never leaves the folder.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory.tasks.core.errors import ConfigError, StorageError

MIN_SECONDS = 900  # STS's shortest session
MAX_SECONDS = 12 * 3600  # RGW 16 refuses a longer GetSessionToken session ("Unknown")


@dataclass(frozen=True)
class Session:
    startup: str
    access_key: str
    secret_key: str
    token: str
    expires: dt.datetime

    def left(self) -> float:
        return (self.expires - dt.datetime.now(dt.UTC)).total_seconds()


_CACHE: dict[tuple[str, str, str], Session] = {}
_LOCK = threading.Lock()


def read_key(keys_dir: str, startup: str) -> dict[str, str]:
    """The start-up's long-lived key from ``keys_dir`` (one-line errors)."""
    path = Path(keys_dir) / f"{startup}.json"
    where = f"object_store.tenant_keys: {path}"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: no object-store identity for start-up {startup} (the site makes one "
            "for each of its start-ups at `aif site up`)"
        ) from None
    except PermissionError:
        raise ConfigError(f"{where}: not readable by this user (the orchestrator's)") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: unreadable ({str(exc)[:120]})") from None
    if not isinstance(raw, dict) or not raw.get("access_key") or not raw.get("secret_key"):
        raise ConfigError(f"{where}: needs access_key and secret_key")
    return {"access_key": str(raw["access_key"]), "secret_key": str(raw["secret_key"])}


def session(keys_dir: str, startup: str, endpoint_url: str | None, region: str,
            seconds: int) -> Session:  # fmt: skip
    """Temporary credentials of ``startup`` valid for at least ``seconds`` more (a cached
    session is reused while it has that long left)."""
    seconds = max(MIN_SECONDS, min(MAX_SECONDS, int(seconds)))
    cache_key = (str(Path(keys_dir).resolve()), startup, endpoint_url or "")
    with _LOCK:
        have = _CACHE.get(cache_key)
        if have is not None and have.left() >= seconds:
            return have
    key = read_key(keys_dir, startup)
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    sts = boto3.client(
        "sts", endpoint_url=endpoint_url, region_name=region,
        aws_access_key_id=key["access_key"], aws_secret_access_key=key["secret_key"],
        config=Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3,
                                                                   "mode": "standard"}),
    )  # fmt: skip
    try:
        got: dict[str, Any] = sts.get_session_token(DurationSeconds=seconds)["Credentials"]
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(
            f"object store {endpoint_url or 'AWS'}: temporary credentials for start-up "
            f"{startup} refused ({' '.join(str(exc).split())[:160]})"
        ) from None
    new = Session(startup, got["AccessKeyId"], got["SecretAccessKey"], got["SessionToken"],
                  got["Expiration"])  # fmt: skip
    with _LOCK:
        _CACHE[cache_key] = new
    return new
