"""The README's main job: `aif run` on the embedded default profile, in a fresh AIF_HOME.

Needs no site: the data space is a folder seeded by the generator, Dask is a LocalCluster,
training is a local process, MLflow is SQLite, Prefect is the server aif starts and reuses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import prefect_servers_under

REPO = Path(__file__).resolve().parents[1]
AIF = str(Path(sys.executable).with_name("aif"))


def _run(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [AIF, "run", *args], capture_output=True, text=True, cwd=REPO, timeout=900,
        env={**os.environ, "AIF_HOME": str(home), **(env or {})},
    )  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh AIF_HOME; its managed Prefect server is stopped when the module ends (issue
    13: it outlived the suite, and the next `aif run` wrote into its deleted database)."""
    home = tmp_path_factory.mktemp("aif-home")
    yield home
    stop = subprocess.run([AIF, "server", "stop"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AIF_HOME": str(home)})  # fmt: skip
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not prefect_servers_under(home), "the managed Prefect server outlived `aif server stop`"


def test_local_run_registers_a_model_and_reruns_from_cache(home: Path) -> None:
    # Seeds the fresh home's demo data space with 20000 rows; the later runs reuse it, without
    # --rows (refused once the data space has objects: nothing would be generated).
    first = _run(home, "--rows", "20000", "--epochs", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    lines = first.stdout.strip().splitlines()
    assert lines[-1] == "models:/mobility-trip-duration/1", first.stdout
    ui = [i for i, ln in enumerate(lines) if ln.startswith("Prefect UI: http://127.0.0.1:")]
    assert ui and ui[0] < lines.index("[1/4] ingest"), first.stdout  # the URL comes first
    assert "summary: Ran: ingest, preprocess, train, register." in lines
    records = list((home / "local" / "runs" / "pipeline").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert "***" not in json.dumps(rec) or rec["profile"]["object_store"] is None

    _check_documents(home)

    again = _run(home, "--epochs", "2")
    assert again.returncode == 0, again.stderr
    out = again.stdout
    assert "nothing changed, no object read" in out
    assert "cache hit, no cluster started" in out
    assert "already finished" in out and "already registered" in out
    assert "summary: Nothing changed: no data bytes read, no Slurm job submitted" in out
    assert again.stdout.strip().splitlines()[-1] == "models:/mobility-trip-duration/1"


def _check_documents(home: Path) -> None:
    """Model card, training-data summary and RO-Crate: beside the run and in MLflow."""
    folder = home / "local" / "runs" / "models" / "mobility-trip-duration" / "1"
    card = (folder / "model_card.md").read_text()
    assert "# Model card: mobility-trip-duration version 1" in card
    assert "## Responsible-AI declaration" in card and "approved by A. Lindqvist" in card
    assert "## Metrics (held-out splits)" in card and "test_rmse" in card
    assert "## Limitations" in card
    summary = (folder / "training_data_summary.md").read_text()
    for needle in ("City Mobility Data Space", "CC-BY-4.0", "20,000 rows", "valid until 2027-12-31",
                   "`pickup_ts`: 2025-", "no personal data declared"):  # fmt: skip
        assert needle in summary, needle
    crate = json.loads((folder / "ro-crate-metadata.json").read_text())
    assert crate["@context"] == "https://w3id.org/ro/crate/1.1/context"
    graph = {e["@id"]: e for e in crate["@graph"]}
    root = graph["./"]
    assert {"@id": "https://w3id.org/ro/wfrun/workflow/0.5"} in root["conformsTo"]
    run = graph[root["mentions"][0]["@id"]]
    assert (
        run["@type"] == "CreateAction"
        and {"@id": "models:/mobility-trip-duration/1"} in run["result"]
    )
    snapshot = graph[run["object"][0]["@id"]]
    assert len(snapshot["hasPart"]) == 8 and graph["environment.json"]["identifier"]
    assert graph["flows/pipeline.py"]["version"] == graph["flows/pipeline.py"]["identifier"][4:]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home}/local/mlflow.db")
    mv = client.get_model_version("mobility-trip-duration", "1")
    assert mv.description.startswith("# Model card")
    for tag in ("aif.snapshot_id", "aif.snapshot_hash", "aif.featureset_hash", "aif.git_commit",
                "aif.git_dirty", "aif.environment_hash", "aif.config_hash", "aif.seed",
                "aif.prefect_flow_run_id", "aif.startup", "aif.project"):  # fmt: skip
        assert mv.tags.get(tag), tag
    names = {a.path for a in client.list_artifacts(mv.run_id, "docs")}
    assert names == {"docs/model_card.md", "docs/training_data_summary.md",
                     "docs/ro-crate-metadata.json", "docs/environment.json"}  # fmt: skip


def test_local_run_bad_dataspace_is_one_line(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "trips"
    bad.mkdir()
    (bad / "part-00000.parquet").write_bytes(b"PAR1 this is not parquet")
    res = _run(home, "--dataspace", f"file://{bad}")
    assert res.returncode == 1
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("aif: error:")]
    assert len(errors) == 1 and "part-00000.parquet" in errors[0], res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_profile_exit_2(home: Path) -> None:
    res = _run(home, "--profile", "nope")
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "aif: error: unknown profile 'nope': use one of eurohpc-example, local, site, "
        "or a path to a YAML file"
    )


def test_snapshot_ls_and_show(home: Path) -> None:
    env = {**os.environ, "AIF_HOME": str(home)}

    def aif(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([AIF, *args], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=120)  # fmt: skip

    ls = aif("snapshot", "ls")
    assert ls.returncode == 0, ls.stderr
    rows = ls.stdout.strip().splitlines()[1:]
    assert rows and rows[0].split()[3] == "20000", ls.stdout  # rows of the module's run
    sid = rows[0].split()[0]
    show = aif("snapshot", "show", sid)
    assert show.returncode == 0 and json.loads(show.stdout)["snapshot_id"] == sid
    bad = aif("snapshot", "show", "0000000000000000")
    assert bad.returncode == 1 and bad.stderr.startswith("aif: error: snapshot 0000000000000000")


def test_promote_and_rollback(home: Path) -> None:
    env = {**os.environ, "AIF_HOME": str(home)}

    def aif(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([AIF, *args], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=600)  # fmt: skip

    first = aif("model", "promote", "--version", "1")
    assert (
        first.returncode == 0
        and "version 1: promoted to champion (no champion yet; every check passed)"
        in (first.stdout)
    ), first.stdout + first.stderr
    none_before = aif("model", "rollback")
    assert none_before.returncode == 1
    assert "champion version 1 replaced no earlier champion" in none_before.stderr

    run2 = _run(home, "--epochs", "3")  # a new candidate: version 2
    assert run2.stdout.strip().splitlines()[-1] == "models:/mobility-trip-duration/2"
    assert "summary: Ran: train, register." in run2.stdout  # only what is downstream of epochs
    kept = aif("model", "promote", "--margin", "0.99")  # needs a 99% better RMSE
    assert kept.returncode == 0 and "version 2: not promoted" in kept.stdout, kept.stdout
    forced = aif("model", "promote", "--margin", "-1")  # any regression tolerated
    assert "version 2: promoted to champion" in forced.stdout, forced.stdout + forced.stderr
    back = aif("model", "rollback")
    assert back.returncode == 0 and "version 2 -> 1" in back.stdout, back.stdout + back.stderr

    # configured checks gate the promotion whatever the metric says
    env["AIF_PROMOTION__CHECKS"] = '[{"metric": "test_r2", "min": 0.999}]'
    gated = aif("model", "promote", "--version", "2", "--margin", "-1")
    assert (
        gated.returncode == 0
        and "version 2: not promoted (failed check(s): test_r2 >= 0.999" in (gated.stdout)
    ), gated.stdout + gated.stderr
    assert "check FAIL: test_r2 >= 0.999" in gated.stdout
    assert "check pass: documents attached (all)" in gated.stdout
    assert "check pass: responsible-AI declaration approved" in gated.stdout
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home}/local/mlflow.db")
    tags = client.get_model_version("mobility-trip-duration", "2").tags
    assert (
        tags["aif.promotion.decision"] == "kept"
        and "test_r2 >= 0.999: FAIL" in tags["aif.promotion.checks"]
    )
    assert (
        str(client.get_model_version_by_alias("mobility-trip-duration", "champion").version) == "1"
    )

    # Version 1's inputs again: nothing registered, and no alias moves (candidate stays 2).
    again = _run(home, "--epochs", "2")
    assert again.returncode == 0 and "Nothing changed" in again.stdout, again.stderr[-2000:]
    assert again.stdout.strip().splitlines()[-1] == "models:/mobility-trip-duration/1"
    aliases = client.get_registered_model("mobility-trip-duration").aliases
    assert str(aliases["candidate"]) == "2" and str(aliases["champion"]) == "1", aliases


def test_changed_feature_config_reruns_from_preprocess(home: Path) -> None:
    split = '{"train": 70, "val": 15, "test": 15}'
    res = _run(home, "--epochs", "2", env={"AIF_FEATURES__SPLIT": split})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "summary: Ran: preprocess, train, register." in res.stdout
    assert "nothing changed, no object read" in res.stdout  # the snapshot is reused


def test_code_hash_follows_the_stage_sources(tmp_path: Path) -> None:
    from aifactory.tasks.core.provenance import STAGE_CODE, code_hash

    for rel in STAGE_CODE["preprocess"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((REPO / rel).read_text())
    before = code_hash("preprocess", root=tmp_path)
    assert before == code_hash("preprocess")
    target = tmp_path / STAGE_CODE["preprocess"][0]
    target.write_text(target.read_text() + "\n# a change\n")
    assert code_hash("preprocess", root=tmp_path) != before


def test_replay_matches_then_refuses_a_changed_object(home: Path) -> None:
    """Version 1 rebuilt from its record gives the same weights; after a data object changes
    the replay is refused with the difference named."""
    from aifactory.tasks.core.provenance import git_info

    env = {**os.environ, "AIF_HOME": str(home)}
    # A clean checkout (CI) replays strictly; a working tree under edit needs --allow-dirty.
    dirty = ["--allow-dirty"] if git_info()["dirty"] else []

    def aif(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([AIF, *args], capture_output=True, text=True, cwd=REPO, env=env,
                              timeout=600)  # fmt: skip

    uri = "models:/mobility-trip-duration/1"
    ok = aif("replay", uri, *dirty)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith(f"MATCH {uri}: weights sha256 ")
    victim = home / "local" / "dataspace" / "mobility" / "trips" / "part-00003.parquet"
    os.utime(victim, (1_700_000_000, 1_700_000_000))
    refused = aif("replay", uri, *dirty)
    assert refused.returncode == 4, refused.stdout + refused.stderr
    err = refused.stderr.strip()
    assert err.startswith(f"aif: error: replay {uri}: 1 difference(s) from what was recorded: ")
    assert f"data: object file://{victim} changed (recorded mtime:" in err and "\n" not in err
    bad = aif("replay", "models:/mobility-trip-duration/99", *dirty)
    assert (
        bad.returncode == 2 and "no model version models:/mobility-trip-duration/99" in bad.stderr
    )


def test_status_runs_ls_and_logs_of_a_run(home: Path, tmp_path: Path) -> None:
    """`aif status`, `aif runs ls --json` and `aif logs RUN` (by an id prefix), from another
    folder: the home is found the same way from anywhere."""
    env = {**os.environ, "AIF_HOME": str(home)}

    def aif(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([AIF, *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=600)  # fmt: skip

    ls = aif("runs", "ls", "--json")
    assert ls.returncode == 0, ls.stderr
    runs = json.loads(ls.stdout)
    assert runs and all(r["startup"] == "startup-a" for r in runs), runs
    done = [r for r in runs if r["flow"] == "aif-pipeline" and r["state"] == "Completed"]
    assert done and done[-1]["model"] == "models:/mobility-trip-duration/1", runs
    status = aif("status")
    assert status.returncode == 0, status.stderr
    assert f"home {home}" in status.stdout and "Prefect: http://127.0.0.1:" in status.stdout
    assert done[0]["id"][-8:] in status.stdout and "Completed" in status.stdout
    logs = aif("logs", done[-1]["id"][:8])
    assert logs.returncode == 0, logs.stderr
    assert logs.stdout.startswith(f"# Prefect logs of run {done[-1]['name']}"), logs.stdout[:500]
    assert "[ingest" in logs.stdout or "ingest" in logs.stdout
    assert "/local.out" in logs.stdout  # the training process's own log, after Prefect's
    missing = aif("logs", "ffffffff")
    assert missing.returncode == 1 and missing.stderr.startswith("aif: error: run ffffffff")
    assert not (tmp_path / ".aif").exists()  # nothing started in the working folder


def test_snapshot_show_takes_a_short_id(home: Path) -> None:
    env = {**os.environ, "AIF_HOME": str(home)}
    ls = subprocess.run([AIF, "snapshot", "ls", "--json"], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=120)  # fmt: skip
    sid = json.loads(ls.stdout)[0]["snapshot"]
    show = subprocess.run([AIF, "snapshot", "show", sid[:6]], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)  # fmt: skip
    assert show.returncode == 0 and json.loads(show.stdout)["snapshot_id"] == sid, show.stderr
