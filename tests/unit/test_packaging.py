"""aifactory installs one import package, ``aifactory``; a start-up's own Prefect project,
with its own ``flows/`` and ``tasks/`` folders, imports both its code and ours (issue 14)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib, importlib.util, pkgutil, sys
taken = [n for n in ("tasks", "flows", "infra", "deployments") if importlib.util.find_spec(n)]
assert not taken, f"generic top-level names installed: {taken}"
import aifactory.tasks, aifactory.flows, aifactory.infra, aifactory.deployments
names = []
for pkg in (aifactory.tasks, aifactory.flows, aifactory.infra, aifactory.deployments):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        if not m.name.endswith("__main__"):
            importlib.import_module(m.name)
            names.append(m.name)
stray = sorted(n for n in sys.modules if n.split(".")[0] in ("tasks", "flows", "infra"))
assert not stray, f"modules imported under a generic top-level name: {stray}"
print(len(names))
"""


def test_one_import_package_and_every_module_imports_by_it(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip()) > 40


def test_a_startups_own_flows_and_tasks_folders_do_not_collide(tmp_path: Path) -> None:
    for pkg in ("flows", "tasks"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"OWNER = 'start-up {pkg}'\n")
    code = (
        "import flows, tasks\n"
        "from aifactory.tasks.core.config import load_profile\n"
        "from aifactory.flows.pipeline import pipeline\n"
        "print(flows.OWNER, '|', tasks.OWNER, '|', load_profile('local').name)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "start-up flows | start-up tasks | local"


def test_the_layout_shows_the_architecture() -> None:
    """No flat folder of modules: tasks/ holds its parts as subpackages, and only the CLI
    and the registered models' old class path beside them."""
    tasks = Path(__file__).resolve().parents[2] / "tasks"
    top = sorted(p.name for p in tasks.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "pyfunc_model.py"], top
    parts = sorted(p.parent.name for p in tasks.glob("*/__init__.py"))
    assert parts == ["control", "core", "data", "doors", "jobs", "models", "payloads",
                     "stages"], parts  # fmt: skip
    for part in parts:
        assert len(list((tasks / part).glob("*.py"))) <= 10, part
