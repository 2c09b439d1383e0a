"""Start-ups as tenants of one site: each keeps to its own lake prefix and Slurm account.

Rules, checked before a run reads or writes anything (a refusal is one line naming the
rule, TenancyError, exit 6):

``isolation.s3_prefix``
    A run of start-up X reads and writes the lake only under ``<lake.url>/<s3_prefix>``
    (``Profile.lake_url_for``). Refused: an ``s3_prefix`` that is absolute, climbs
    (``..``), overlaps another start-up's, or is missing while other start-ups have one; a
    lake URL (profile, ``AIF_LAKE__URL``) that puts X's lake inside another start-up's
    prefix; a data-space URL (``--dataspace``, ``AIF_DATASPACE__URL``, a catalog
    distribution under ``dataspace.root``, ``train-lm --data``) inside another start-up's
    prefix, or a plain folder above one (listing it would list theirs). Another start-up's
    prefix is guarded under the lake URL in force, the profile file's lake URL and the
    bucket of each (so an override cannot move the lake into it).
``isolation.account``
    X's Slurm account is no other start-up's account (a profile, or an
    ``AIF_STARTUPS__<ID>__ACCOUNT`` override, that gives two start-ups one account).
``isolation.partition`` / ``isolation.qos``
    The Slurm partitions and QoS a run would use (``training.partition``/``qos``,
    ``dask.partition``/``qos`` for Slurm workers) are among the start-up's allowed
    ``partitions`` and ``qos`` (when the profile lists them).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from typing import Any

from aifactory.tasks.core.errors import TenancyError

_GLOB = re.compile(r"[*?\[]")
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def _parts(url: str) -> tuple[str, list[str]]:
    """('s3', ['aif-lake', 'startup-a']) for s3://aif-lake/startup-a; paths are file URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "file", os.path.abspath(url)
    rest = posixpath.normpath("/" + rest)  # "a/../b" is "b": no climbing out of a check
    return scheme.lower(), [p for p in rest.split("/") if p]


def _prefix_parts(prefix: str) -> list[str]:
    return [p for p in prefix.split("/") if p]


def reaches(url: str, area: str, listing: bool = False) -> bool:
    """Whether ``url`` (a glob allowed) names something inside ``area``, or, with
    ``listing``, is a plain folder above it (a recursive listing would reach it)."""
    us, useg = _parts(url)
    as_, aseg = _parts(area)
    if us != as_:
        return False
    for i, a in enumerate(aseg):
        if i >= len(useg):
            return listing and not any(_GLOB.search(s) for s in useg)
        if "**" in useg[i]:
            return True
        if not fnmatch.fnmatchcase(a, useg[i]):
            return False
    return True


def tenant_lake_url(lake_url: str, st: Any) -> str:
    """``<lake_url>/<s3_prefix>``, or ``lake_url`` for a start-up without a prefix."""
    base = lake_url.rstrip("/")
    parts = _prefix_parts(st.s3_prefix or "")
    return f"{base}/{'/'.join(parts)}" if parts else base


def _roots(cfg: Any) -> list[str]:
    """Lake roots under which every start-up's prefix is guarded."""
    out: list[str] = []
    for url in (cfg.lake.url, getattr(cfg, "_file_lake_url", None)):
        if not url:
            continue
        out.append(url.rstrip("/"))
        scheme, parts = _parts(url)
        if scheme in _OBJECT_STORES and parts:
            out.append(f"{scheme}://{parts[0]}")  # the bucket
    return list(dict.fromkeys(out))


def foreign_areas(cfg: Any, sid: str) -> list[tuple[str, str]]:
    """(area URL, owner) for every other start-up's prefix under every guarded root."""
    out = []
    for other, o in sorted(cfg.startups.items()):
        parts = _prefix_parts(o.s3_prefix or "")
        if other == sid or not parts:
            continue
        out += [(f"{root}/{'/'.join(parts)}", other) for root in _roots(cfg)]
    return out


def _refuse_prefix(sid: str, area: str, owner: str, how: str) -> TenancyError:
    return TenancyError(
        f"isolation.s3_prefix: start-up {sid} may not use {area}/...: that prefix belongs to "
        f"{owner} ({how})"
    )


def check_isolation(cfg: Any, sid: str) -> None:
    """The start-up's account and lake prefix are its own (raises TenancyError)."""
    st = cfg.startups[sid]
    for other, o in sorted(cfg.startups.items()):
        if other != sid and o.account == st.account:
            raise TenancyError(
                f"isolation.account: start-up {sid} may not run under Slurm account "
                f"{st.account}: that account belongs to {other} (each start-up needs its own "
                f"account: startups.{sid}.account)"
            )
    mine = _prefix_parts(st.s3_prefix or "")
    if st.s3_prefix and (st.s3_prefix.startswith("/") or {".", ".."} & set(mine) or not mine):
        raise TenancyError(
            f"isolation.s3_prefix: start-up {sid} has s3_prefix {st.s3_prefix!r}: a prefix is "
            "a relative path under the lake, without '.' or '..'"
        )
    others = {k: _prefix_parts(v.s3_prefix or "") for k, v in cfg.startups.items() if k != sid}
    if not mine and any(others.values()):
        raise TenancyError(
            f"isolation.s3_prefix: start-up {sid} has no s3_prefix while other start-ups of "
            f"profile {cfg.name!r} have theirs: its runs would use the lake above their "
            f"prefixes (set startups.{sid}.s3_prefix)"
        )
    base = cfg.lake.url.rstrip("/")
    for other, theirs in sorted(others.items()):
        n = min(len(mine), len(theirs))
        if theirs and mine[:n] == theirs[:n]:
            raise _refuse_prefix(sid, f"{base}/{'/'.join(theirs)}", other,
                                 f"startups.{sid}.s3_prefix is {st.s3_prefix!r}")  # fmt: skip
    lake = tenant_lake_url(cfg.lake.url, st)
    for area, owner in foreign_areas(cfg, sid):
        if reaches(lake, area):
            raise _refuse_prefix(sid, area, owner, f"its lake would be {lake}")
    check_resources(cfg, sid)


def check_resources(cfg: Any, sid: str) -> None:
    """The run's Slurm partitions and QoS are among those the start-up is allowed."""
    st = cfg.startups[sid]
    uses: list[tuple[str, str, str | None]] = []
    if cfg.training.executor == "slurm":
        uses += [("partition", "training.partition", cfg.training.partition),
                 ("qos", "training.qos", cfg.training.qos)]  # fmt: skip
    if cfg.dask.kind == "slurm":
        uses += [("partition", "dask.partition", cfg.dask.partition),
                 ("qos", "dask.qos", cfg.dask.qos)]  # fmt: skip
    for kind, key, value in uses:
        allowed = st.partitions if kind == "partition" else st.qos
        if value and allowed is not None and value not in allowed:
            raise TenancyError(
                f"isolation.{kind}: start-up {sid} may not use {kind} {value!r} ({key}): "
                f"allowed are {', '.join(allowed) or 'none'} (startups.{sid}.{kind}"
                f"{'s' if kind == 'partition' else ''})"
            )


def check_dataspace_url(cfg: Any, sid: str, url: str, what: str = "data-space URL") -> None:
    """A URL the run reads from is not inside (nor a folder above) another's prefix."""
    for area, owner in foreign_areas(cfg, sid):
        if reaches(url, area, listing=True):
            raise _refuse_prefix(sid, area, owner, f"{what} {url}")


def check_run(cfg: Any, sid: str) -> None:
    """Everything a run of ``sid`` is about to use: account, lake and data-space URLs."""
    check_isolation(cfg, sid)
    if cfg.dataspace.url:
        check_dataspace_url(cfg, sid, cfg.dataspace.url, "dataspace.url")
    entry = cfg.dataset_entry()
    check_dataspace_url(cfg, sid, cfg.dataset_url(entry), f"data space of {entry.id}")
