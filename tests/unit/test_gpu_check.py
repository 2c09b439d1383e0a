"""The prepared GPU check (tests/gpu/check.sh) runs end to end here, on a CPU, at --small:
so it is known to work before a session spends its few minutes of GPU time on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_script_runs_and_reports(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    res = subprocess.run([str(REPO / "tests" / "gpu" / "check.sh"), "--small"], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    figures = json.loads((tmp_path / "gpu-figures.json").read_text())
    assert figures["tabular"]["bit_identical"] and figures["lm"]["bit_identical"]
    assert min(figures["lm"]["tokens_per_second"]) > 0
    assert "| tiny LM tokens/s |" in res.stdout
