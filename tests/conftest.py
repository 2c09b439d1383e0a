"""Test options: site tests run against the real local site only with --site."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--site",
        action="store_true",
        default=os.environ.get("AIF_SITE_TESTS") == "1",
        help="run tests marked 'site' against the local site (aif site up)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--site"):
        return
    skip = pytest.mark.skip(reason="needs the local site: run with --site after aif site up")
    for item in items:
        if item.get_closest_marker("site") is not None:
            item.add_marker(skip)
