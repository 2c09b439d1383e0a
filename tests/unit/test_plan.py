"""`aif run --dry-run`'s plan (tasks/stages/plan.py): which stages a run would reuse and which
it would run, computed with the stages' own keys and without a side effect (issue 16)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from aifactory.tasks.core.config import load_profile
from aifactory.tasks.stages.plan import STAGES, StagePlan, plan, render_plan


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and modification time."""
    if not root.exists():
        return {}
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "aif home"
    monkeypatch.setenv("AIF_HOME", str(h))
    return h


def _ingested(cfg: Any, sid: str, rows: int = 3000, objects: int = 2) -> str:
    """Seed the profile's data space (small) and commit a snapshot, as a run's ingest does."""
    from aifactory.tasks.data.generators import seed_entry
    from aifactory.tasks.stages.ingest import IngestOptions, ingest

    entry = cfg.dataset_entry()
    src, lake = cfg.dataset_url(entry), cfg.lake_url_for(sid)
    seed_entry(entry, src, None, None, rows, objects)
    purpose, declared = cfg.purpose(sid)
    opts = IngestOptions(startup=sid, purpose=purpose, declared_purposes=declared, entry=entry)
    return ingest(src, lake, entry.id, None, None, opts).snapshot_id


def test_before_any_run_every_stage_runs_and_nothing_is_written(home: Path) -> None:
    cfg = load_profile("local")
    before = _tree(home)
    plans = plan(cfg, None)
    assert _tree(home) == before  # no folder, key, data or registry made
    assert [p.stage for p in plans] == list(STAGES)
    assert [p.action for p in plans] == ["run"] * 4
    assert "is empty: the run seeds it from the catalog generator of mobility-trips" \
        in plans[0].reason  # fmt: skip
    assert [p.reason for p in plans[1:]] == ["after ingest"] * 3
    text = render_plan(plans)
    assert text.splitlines()[1].startswith("ingest: run (the data space file://")
    assert text.splitlines()[2:] == [
        "preprocess: run (after ingest)", "train: run (after ingest)",
        "register: run (after ingest)", "summary: run: ingest, preprocess, train, register",
    ]  # fmt: skip


def test_a_committed_snapshot_is_reused_and_a_changed_data_space_is_not(home: Path) -> None:
    cfg = load_profile("local")
    snap_id = _ingested(cfg, "startup-a")
    before = _tree(home)
    ingest_step, pre, train, register = plan(cfg, "startup-a")
    assert _tree(home) == before
    assert ingest_step.action == "reuse" and ingest_step.key == snap_id
    assert ingest_step.line().startswith(f"ingest: reuse snapshot {snap_id[:12]}… (2 objects")
    assert pre.action == "run" and pre.key and f"no feature set {pre.key[:12]}…" in pre.reason
    assert (train.action, train.reason) == ("run", "after preprocess")
    assert (register.action, register.reason) == ("run", "after preprocess")

    src = Path(cfg.dataset_url(cfg.dataset_entry()).removeprefix("file://"))
    one = sorted(src.rglob("*.parquet"))[0]
    (one.parent / "extra-0001.parquet").write_bytes(one.read_bytes())  # a new object
    changed = plan(cfg, "startup-a")
    assert changed[0] == StagePlan("ingest", "run", "the data space has 1 object(s) not in "
                                   f"snapshot {snap_id[:12]}… (new or changed)",
                                   changed[0].key)  # fmt: skip
    assert changed[0].key != snap_id
    assert [p.line() for p in changed[1:]] == [f"{s}: run (after ingest)" for s in STAGES[1:]]


def test_a_missing_pseudonymisation_key_is_a_new_snapshot_and_not_created(home: Path) -> None:
    cfg = load_profile("local", {"dataspace.dataset": "health-records"})
    key = home / "local" / "secrets" / "pseudonymisation.key"
    entry = cfg.dataset_entry()
    if not entry.policy.personal_data:
        pytest.skip("the catalog's health dataset has no personal data")
    from aifactory.tasks.data.generators import seed_entry

    seed_entry(entry, cfg.dataset_url(entry), None, None, 500, 1)
    (ingest_step, *_) = plan(cfg, "startup-c")
    assert not key.exists()
    assert ingest_step.action == "run" and "no pseudonymisation key yet" in ingest_step.reason


def test_the_plan_imports_neither_prefect_nor_mlflow(home: Path) -> None:
    code = ("import sys\nfrom aifactory.tasks.core.config import load_profile\n"
            "from aifactory.tasks.stages.plan import plan\nplan(load_profile('local'), None)\n"
            "print(sorted(m for m in ('prefect', 'mlflow', 'distributed')\n"
            "             if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "AIF_HOME": str(home)})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert not home.exists()
