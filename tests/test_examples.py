"""Start-ups' own projects, end to end on the local profile: one made by `aif init` in a
folder outside the repository (with its own flows/ and tasks/ folders, as a Prefect project
has), its own flow built from the platform's stages, and start-up C's high-risk health
model (examples/health-readmission)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.processes import prefect_servers_under

REPO = Path(__file__).resolve().parents[1]
AIF = str(Path(sys.executable).with_name("aif"))


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIF_", "PREFECT_API"))}
    return {**env, "AIF_HOME": str(home)}


def _aif(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([AIF, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def test_a_project_from_aif_init_outside_the_repository(tmp_path: Path) -> None:
    """`aif init` -> `aif run` registers the project's own model (its features, network and
    trainer); unchanged, nothing runs again; its own feature code re-runs preprocessing; its
    own Prefect flow of the platform's stages trains two rates and registers the better."""
    work = tmp_path / "start-up b" / "crop model"
    env = _env(tmp_path / "home")
    made = _aif(tmp_path, env, "init", "crop-model", "--dir", str(work))
    assert made.returncode == 0, made.stderr
    for own in ("flows", "tasks"):  # a Prefect project's folders must not shadow ours
        (work / own).mkdir()
        (work / own / "__init__.py").write_text("raise ImportError('the project\\'s own')\n")
    try:
        res = _aif(work, env, "run", "--epochs", "2")
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        assert res.stdout.strip().splitlines()[-1] == "models:/crop-model/1", out[-3000:]
        assert f"aif run: project {work / 'aifactory.yaml'}, profile local, start-up startup-b" \
            in out  # fmt: skip
        assert "registered crop-model version 1" in out and "test_rmse" in out

        again = _aif(work, env, "run", "--epochs", "2")
        assert again.returncode == 0, again.stderr[-2000:]
        assert "Nothing changed" in again.stdout and "cache hit, no cluster started" in again.stdout

        feats = work / "features.py"
        feats.write_text(feats.read_text() + "\n# tuned\n")  # the project's own code is keyed
        third = _aif(work, env, "run", "--epochs", "2")
        assert third.returncode == 0, third.stderr[-2000:]
        assert "featurised 3/3 partitions" in third.stdout

        api = next(ln for ln in third.stdout.splitlines() if ln.startswith("aif run:"))
        url = api.rsplit("Prefect ", 1)[1].strip() + "/api"
        flow = subprocess.run([sys.executable, "flow.py"], cwd=work, timeout=900, text=True,
                              env={**env, "PREFECT_API_URL": url}, capture_output=True)  # fmt: skip
        assert flow.returncode == 0, (flow.stdout + flow.stderr)[-3000:]
        assert flow.stdout.strip().splitlines()[-1].startswith("models:/crop-model/")

        # A sweep of the project's own config keys: the job layer's local array.
        sweep = _aif(work, env, "sweep", "--profile", "local", "--grid", "lr=0.003,0.01",
                     "--grid", "hidden=16,32", "--max-parallel", "2", "--epochs", "1")  # fmt: skip
        assert sweep.returncode == 0, (sweep.stdout + sweep.stderr)[-3000:]
        last = sweep.stdout.strip().splitlines()[-1]
        assert last.startswith("best trial ") and "of 4: test_rmse=" in last, last
        record = json.loads((Path(last.rsplit(", ", 1)[1].rstrip(")")) / "sweep.json").read_text())
        assert [t["state"] for t in record["trials"]] == ["COMPLETED"] * 4
        configs = [json.loads((Path(record["sweep_dir"]) / f"trial-{i:04d}" / "config.json")
                              .read_text()) for i in range(4)]  # fmt: skip
        assert {(c["lr"], c["hidden"], c["epochs"], c["batch_size"]) for c in configs} == {
            (lr, h, 1, 256) for lr in (0.003, 0.01) for h in (16, 32)}  # fmt: skip
    finally:
        _aif(work, env, "server", "stop")
    assert not prefect_servers_under(tmp_path)


def test_a_high_risk_health_model_needs_a_named_approval(tmp_path: Path) -> None:
    """Start-up C: JSON Lines with pseudonymised identifiers, a scikit-learn classifier (the
    sklearn flavour); its model card says what high-risk means, and promotion needs a name."""
    folder = REPO / "examples" / "health-readmission"
    env = _env(tmp_path / "home")
    try:
        res = _aif(folder, env, "run")
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-3000:]
        assert res.stdout.strip().splitlines()[-1] == "models:/health-readmission/1", out[-3000:]
        card = (tmp_path / "home" / "local" / "runs" / "models" / "health-readmission" / "1"
                / "model_card.md").read_text()  # fmt: skip
        assert "High-risk (EU AI Act, Annex III)" in card and "--approved-by" in card
        refused = _aif(folder, env, "model", "promote")
        assert refused.returncode == 0 and "not promoted" in refused.stdout, refused.stderr
        assert "check FAIL: named approval of a high-risk model" in refused.stdout
        ok = _aif(folder, env, "model", "promote", "--approved-by", "Dr. E. Novak")
        assert "promoted to champion" in ok.stdout, ok.stdout + ok.stderr
        assert "approved by Dr. E. Novak" in ok.stdout

        import mlflow
        import pyarrow.json as pj

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'home' / 'local' / 'mlflow.db'}")
        model = mlflow.pyfunc.load_model("models:/health-readmission@champion")
        src = sorted((tmp_path / "home" / "local" / "dataspace" / "health").rglob("*.jsonl"))[0]
        rows = pj.read_json(src).to_pandas().head(20)
        pred = model.predict(rows)  # raw rows: the project's features travel with the model
        assert len(pred) == 20 and set(pred.tolist()) <= {0.0, 1.0}
    finally:
        _aif(folder, env, "server", "stop")
    assert not prefect_servers_under(tmp_path)
