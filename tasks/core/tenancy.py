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
    URLs are compared as the places fsspec would read, not as text (``_locations``): the
    last target of a chain (``simplecache::s3a://b/k``, ``zip://f::s3://b/a.zip``; every
    target of a chain is checked), one family per store (``s3``/``s3a``/``s3n``,
    ``gs``/``gcs``, ``az``/``abfs``/``abfss``/``adl``, ``file``/``local``/plain paths made
    absolute, symlinks resolved), schemes and bucket names in any case, ``//``, ``.`` and
    ``..`` collapsed (and, for object stores, also as written: S3 keeps them literally),
    percent-decoded and query-stripped spellings too. An ``http(s)://`` URL may be the
    object store's own endpoint (``http://127.0.0.1:9010/aif-lake/…``): it is checked as
    path-style and virtual-hosted bucket URLs of every object store, whatever the host
    (an alias of the endpoint is still the endpoint). Every other protocol is its own
    store (``memory://aif-lake/startup-a`` is not the lake).
``isolation.account``
    X's Slurm account is no other start-up's account (a profile that gives two start-ups
    one account).
``isolation.partition`` / ``isolation.qos``
    The Slurm partitions and QoS a run would use (``training.partition``/``qos``,
    ``dask.partition``/``qos`` for Slurm workers) are among the start-up's allowed
    ``partitions`` and ``qos`` (when the profile lists them).
``isolation.overrides``
    Tenancy comes only from the profile file: a run's ``AIF_STARTUPS__…`` variable or
    ``startups…`` override (``load_profile``'s ``overrides``) that would set a start-up's
    account, prefix, partitions, QoS or any other key but ``RUN_OVERRIDABLE``, add a
    start-up or replace one is refused when the profile is loaded (naming the breach it
    would be, when it would be one).
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
from typing import Any
from urllib.parse import unquote

from aifactory.tasks.core.errors import TenancyError

_GLOB = re.compile(r"[*?\[]")
# One family per store that fsspec reads under several protocol names.
_FAMILIES = {"s3": "s3", "s3a": "s3", "s3n": "s3", "gs": "gs", "gcs": "gs", "az": "az",
             "abfs": "az", "abfss": "az", "adl": "az", "file": "file", "local": "file",
             "asynclocal": "file"}  # fmt: skip
_OBJECT_STORES = ("s3", "gs", "az")
_WEB = ("http", "https")
# A bare word between '::' is a protocol to fsspec (``simplecache::s3://…``).
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_+-]*")
# Start-up keys a run may override (admission, not isolation: the GPU-hour budget and the
# declaration's approval); every other key under ``startups`` is tenancy.
RUN_OVERRIDABLE = frozenset({"gpu_hours_budget", "budget_since", "declaration"})

Location = tuple[str, tuple[str, ...]]


def _targets(url: str) -> list[str]:
    """The targets of an fsspec URL chain, outermost first; a bare word is ``word://``."""
    if "::" not in url:
        return [url]
    return [b + "://" if _WORD.fullmatch(b) else b for b in url.split("::") if b]


def _segments(rest: str) -> list[tuple[str, ...]]:
    """``rest`` as written (no empty parts) and normalised (``.``, ``..`` resolved)."""
    raw = tuple(p for p in rest.split("/") if p)
    norm = tuple(p for p in posixpath.normpath("/" + rest).split("/") if p)
    return list(dict.fromkeys([norm, raw]))


def _spellings(target: str) -> list[Location]:
    """(family, path parts) of one target of a chain, in every spelling a store may read."""
    proto, sep, rest = target.partition("://")
    if not sep or len(proto) < 2:  # a path, or file:/x, local:x as fsspec's local fs reads
        proto, rest = "file", re.sub(r"^(file|local):(?!//)", "", target, flags=re.I)
    proto = proto.lower()
    family = _FAMILIES.get(proto, proto)
    if family == "file":
        path = os.path.abspath(os.path.expanduser(rest or "/"))
        paths = dict.fromkeys([path, os.path.realpath(path), unquote(path)])
        return [(family, tuple(p for p in q.split("/") if p)) for q in paths]
    texts = dict.fromkeys([rest, unquote(rest), rest.split("?")[0], unquote(rest.split("?")[0])])
    out: list[Location] = []
    for text in texts:
        for segs in _segments(text):
            if family in _OBJECT_STORES and segs:  # bucket names know no case; az: c@account
                b = segs[0].lower()
                out += [(family, (x, *segs[1:])) for x in dict.fromkeys([b.split("@")[0], b])]
            else:
                out.append((family, segs))
            if family in _WEB and segs:  # the object store's endpoint, any host spelling
                host = segs[0].rpartition("@")[2].lower()
                path_style = (segs[1].lower(), *segs[2:]) if len(segs) > 1 else ()
                virtual = (host.split(".")[0].split(":")[0], *segs[1:])
                out += [(store, s) for store in _OBJECT_STORES for s in (path_style, virtual)]
    return list(dict.fromkeys(out))


def _locations(url: str) -> list[Location]:
    """Every place ``url`` may read: each target of its chain, in each spelling."""
    out: list[Location] = []
    for target in _targets(url.strip()) or [url]:
        out += _spellings(target)
    return list(dict.fromkeys(out))


def _parts(url: str) -> tuple[str, list[str]]:
    """('s3', ['aif-lake', 'startup-a']) for s3a://aif-lake/startup-a: the family and
    normalised parts of the last target of a chain (what is read); paths are file URLs."""
    family, segs = _spellings((_targets(url.strip()) or [url])[-1])[0]
    return family, list(segs)


def _prefix_parts(prefix: str) -> list[str]:
    return [p for p in prefix.split("/") if p]


def _reaches(useg: tuple[str, ...], aseg: tuple[str, ...], listing: bool) -> bool:
    for i, a in enumerate(aseg):
        if i >= len(useg):
            return listing and not any(_GLOB.search(s) for s in useg)
        if "**" in useg[i]:
            return True
        if not fnmatch.fnmatchcase(a, useg[i]):
            return False
    return True


def reaches(url: str, area: str, listing: bool = False) -> bool:
    """Whether ``url`` (a glob allowed) names something inside ``area``, or, with
    ``listing``, is a plain folder above it (a recursive listing would reach it); in any
    spelling of either (``_locations``)."""
    areas = _locations(area)
    return any(
        uf == af and _reaches(useg, aseg, listing)
        for uf, useg in _locations(url)
        for af, aseg in areas
    )


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
        family, parts = _parts(url)
        if family in _OBJECT_STORES and parts:
            out.append(f"{family}://{parts[0]}")  # the bucket
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
    """The start-up's account, lake prefix, partitions and QoS are its own (raises
    TenancyError)."""
    _check_account_and_prefix(cfg, sid)
    check_resources(cfg, sid)


def _check_account_and_prefix(cfg: Any, sid: str) -> None:
    """``isolation.account`` and ``isolation.s3_prefix`` of one start-up."""
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


def refuse_overrides(cfg: Any | None, found: list[tuple[str, str]], profile: str) -> TenancyError:
    """The one-line refusal of a run's overrides of tenancy (``isolation.overrides``).

    ``found``: (the variable or override, the key it sets, ``startups.<id>.<key>``);
    ``cfg``: the profile with them applied (None if it does not validate). When they would
    also breach ``isolation.account`` or ``isolation.s3_prefix``, that rule leads the line."""
    where = ", ".join(dict.fromkeys(w for w, _ in found))
    keys = ", ".join(dict.fromkeys(k for _, k in found))
    why = (f"{where} may not change {keys}: a start-up's tenancy comes only from the profile "
           f"file {profile}, never from a run's environment or overrides")  # fmt: skip
    if cfg is not None:
        ids = [k.split(".")[1] if "." in k else "" for _, k in found]  # "": all replaced
        ids = [i for i in ids if i] + (sorted(cfg.startups) if "" in ids else [])
        for sid in dict.fromkeys(i for i in ids if i in cfg.startups):
            try:
                _check_account_and_prefix(cfg, sid)
            except TenancyError as err:
                return TenancyError(f"{err}; besides, {why}")
    return TenancyError(f"isolation.overrides: {why}")
