"""Test options: site tests run against the real local site only with --site."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The suite keeps its state (lake, MLflow, the local Prefect server, the site) in the
# clone's own .aif, never in the user's home (~/.aif, the default outside the suite); a
# test of the default home (test_readme_command.py) sets HOME instead.
os.environ.setdefault("AIF_HOME", str(Path(__file__).resolve().parents[1] / ".aif"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--site",
        action="store_true",
        default=os.environ.get("AIF_SITE_TESTS") == "1",
        help="run tests marked 'site' against the local site (aif site up)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The multi-node tests switch the one shared site to two compute nodes, kill nodes and
    # switch layouts: they run after every other test.
    items.sort(key=lambda item: item.get_closest_marker("multinode") is not None)
    if config.getoption("--site"):
        return
    skip = pytest.mark.skip(reason="needs the local site: run with --site after aif site up")
    for item in items:
        if item.get_closest_marker("site") is not None:
            item.add_marker(skip)
