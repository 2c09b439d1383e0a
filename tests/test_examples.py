"""Start-ups' example projects (examples/), run end to end on the local profile."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.processes import prefect_servers_under

REPO = Path(__file__).resolve().parents[1]
AIF = str(Path(sys.executable).with_name("aif"))


def test_agriculture_yield_example_trains_with_its_own_feature_function(tmp_path: Path) -> None:
    """Start-up B's yield model: its features.py (by file path) runs on the Dask workers, the
    platform splits and normalises, the tabular trainer trains, the model registers."""
    folder = REPO / "examples" / "agriculture-yield"
    env = {**os.environ, "AIF_HOME": str(tmp_path / "home")}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run([AIF, "run", "--profile", "profile.yaml", "--epochs", "2"],
                              cwd=folder, env=env, capture_output=True, text=True,
                              timeout=900)  # fmt: skip

    try:
        res = run()
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        assert res.stdout.strip().splitlines()[-1] == "models:/agri-yield/1", out[-3000:]
        assert "dropped" in out and "registered agri-yield version 1" in out
        again = run()
        assert again.returncode == 0, again.stderr[-2000:]
        assert "cache hit, no cluster started" in again.stdout  # the function's source is keyed
        src = folder / "features.py"
        text = src.read_text()
        try:  # a change to the start-up's own code re-runs preprocessing
            src.write_text(text + "\n# tuned\n")
            third = run()
        finally:
            src.write_text(text)
        assert third.returncode == 0, third.stderr[-2000:]
        assert "cache hit, no cluster started" not in third.stdout
        assert "featurised 3/3 partitions" in third.stdout
    finally:
        subprocess.run([AIF, "server", "stop", "--profile", "profile.yaml"], cwd=folder, env=env,
                       capture_output=True, timeout=120)  # fmt: skip
    assert not prefect_servers_under(tmp_path)
