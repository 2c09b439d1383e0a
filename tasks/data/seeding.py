"""Seeding a data space with its catalog generator: only where the profile or the run asks.

A data space is seeded (the dataset generated deterministically, tasks/data/generators.py)
only when it holds no object of the dataset and

a) it is the profile's own demo data space: the profile *file* declares
   ``dataspace.generate`` (an override such as ``--rows`` does not make a demo), and the
   data space is where the file puts the dataset (its ``dataspace.url`` for its own
   dataset, else the catalog distribution under its ``dataspace.root``, the file's
   ``${VAR}`` references resolved), not a location that ``--dataspace``, an override or
   an ``AIF_DATASPACE__…`` variable put there; places are compared, not spellings
   (tenancy.reaches); or
b) the run asks for it: ``dataspace.seed: true`` (the CLI's ``--seed-demo-data``).

Anywhere else an empty or missing data space is one error line naming it, and nothing is
written. ``--rows`` (the override ``dataspace.generate.rows``) is refused when the data
space already holds objects: nothing is generated, so the rows would be silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from aifactory.tasks.core.errors import AifError, ConfigError, DataError
from aifactory.tasks.data.dataspace import display_url, has_objects, list_objects, why_empty

SEED_FLAG = "--seed-demo-data"  # the CLI flag setting dataspace.seed
ROWS_KEY = "dataspace.generate.rows"  # the override the CLI's --rows sets


def demo_dataset_url(profile: str, entry: Any) -> str | None:
    """Where the profile file alone puts ``entry``'s objects, if the file declares
    ``dataspace.generate`` (a demo data space): the file with its ``${VAR}`` references
    resolved, and neither overrides nor ``AIF_<SECTION>__<KEY>`` variables applied. None
    when the file declares no generator or does not resolve alone (no root, invalid)."""
    from aifactory.tasks.core.config import load_profile

    env = {k: v for k, v in os.environ.items()
           if not (k.upper().startswith("AIF_") and "__" in k)}  # fmt: skip
    try:
        own = load_profile(profile, None, env=env)
        return str(own.dataset_url(entry)) if own.dataspace.generate is not None else None
    except AifError:
        return None


def same_place(a: str, b: str) -> bool:
    """Whether two data-space URLs name the same place, in any spelling of either."""
    from aifactory.tasks.core.tenancy import reaches

    return reaches(a, b) and reaches(b, a)


def rows_asked(overrides: Mapping[str, Any] | None) -> bool:
    """Whether the run's overrides set ``dataspace.generate.rows`` (the CLI's ``--rows``),
    dotted or nested; the profile's own value and variables are not a request."""
    over = dict(overrides or {})
    if over.get(ROWS_KEY) is not None:
        return True
    section = over.get("dataspace")
    gen = over.get("dataspace.generate") or (
        section.get("generate") if isinstance(section, Mapping) else None
    )
    return isinstance(gen, Mapping) and gen.get("rows") is not None


def check_seeding(cfg: Any, profile: str, overrides: Mapping[str, Any] | None = None,
                  dataset: str | None = None, seed: bool | None = None) -> bool:  # fmt: skip
    """Whether the data space of ``dataset`` (default: the profile's) is to be seeded
    (True) or already has objects (False); raises as :func:`ensure_seeded` does, and
    writes nothing: a CLI can call it before any service is started.

    ``profile``: the profile's name or file, as the run was given it; ``overrides``: the
    run's (to tell an explicit ``--rows``); ``seed``: default ``dataspace.seed``.
    Raises DataError for an empty data space where seeding is not allowed, ConfigError
    for ``--rows`` with a data space that already has objects, StorageError when the
    store cannot be reached."""
    asked = bool(getattr(cfg.dataspace, "seed", False)) if seed is None else seed
    if cfg.dataspace.generate is None and not asked and not rows_asked(overrides):
        return False  # nothing to seed with: the ingest's own listing tells an empty one
    entry = cfg.dataset_entry(dataset)
    url = str(cfg.dataset_url(entry))
    so = cfg.storage_options(url)
    ext = entry.distribution.extension()
    if has_objects(url, so, extension=ext):
        if rows_asked(overrides):
            n = len(list_objects(url, so, extension=ext))
            rows = getattr(cfg.dataspace.generate, "rows", None)
            raise ConfigError(
                f"--rows {rows}: data space {display_url(url)} already holds {n} object(s) of "
                f"{entry.id}, so nothing is generated and the rows would be ignored; run "
                f"without --rows, or give an empty --dataspace with {SEED_FLAG}"
            )
        return False
    demo = False
    if not asked:
        own = demo_dataset_url(profile, entry)
        demo = own is not None and same_place(url, own)
    if not (asked or demo):
        raise DataError(
            f"data space {display_url(url)}: {why_empty(url, so, ext)}; seeding happens "
            f"only into the profile's demo data space or with {SEED_FLAG}"
        )
    return True


def ensure_seeded(cfg: Any, profile: str, overrides: Mapping[str, Any] | None = None,
                  dataset: str | None = None, seed: bool | None = None) -> int:  # fmt: skip
    """Seed the data space of ``dataset`` (default: the profile's) if it is empty and
    seeding is allowed there (:func:`check_seeding`, same arguments); the number of
    objects written (0: it already had objects)."""
    from aifactory.tasks.data.generators import seed_entry

    if not check_seeding(cfg, profile, overrides, dataset, seed):
        return 0
    entry = cfg.dataset_entry(dataset)
    url = str(cfg.dataset_url(entry))
    gen = cfg.dataspace.generate
    return seed_entry(entry, url, cfg.storage_options(url), gen.seed if gen else None,
                      gen.rows if gen else None, gen.objects if gen else None)  # fmt: skip
