"""The site's PostgreSQL (infra/site/postgres.py) as a real private cluster in a temporary
folder: initdb as the postgres user, roles and databases, and the one-time copy of an
earlier site's SQLite databases (Prefect, MLflow's stores, MLflow's users), read back
through the applications' own stores."""

from __future__ import annotations

import socket
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from aifactory.infra.site import postgres, procs, services
from aifactory.infra.site.layout import Site
from aifactory.tasks.core.errors import SiteError

MLFLOW_ONLY = tuple(m for m in postgres.MIGRATIONS if m.app is postgres.MLFLOW)
PREFECT_ONLY = tuple(m for m in postgres.MIGRATIONS if m.app is postgres.PREFECT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A site folder whose only part is a running PostgreSQL with the apps' databases."""
    root = tmp_path_factory.mktemp("pg site")  # a space: the site's paths never split
    root.chmod(0o711)
    site = Site(root, pg_port=_free_port())
    postgres.ensure_cluster(site, lambda _m: None)
    log = root / "postgres.log"
    rec = procs.start("postgres", postgres.argv(site), log, cwd=root,
                      launcher=postgres.launcher(site))  # fmt: skip
    try:
        procs.wait_until("postgres", lambda: postgres.ok(site), rec["pid"], log, 60)
        postgres.ensure_databases(site, lambda _m: None)
        yield site
    finally:
        procs.stop(rec, "postgres")


@pytest.fixture
def clean(pg: Site) -> Site:
    """Every app database empty again and no SQLite file of an earlier test."""
    for m in postgres.MIGRATIONS:
        postgres._drop_and_create(pg, m.app, m.database)
        for f in m.sqlite(pg).parent.glob(f"{m.sqlite(pg).name}*"):
            f.unlink()
    return pg


def _pg_engine(site: Site, database: str) -> sa.Engine:
    pw = postgres.password(site, postgres.SUPERUSER)
    return sa.create_engine(postgres.url(site, postgres.SUPERUSER, database),
                            connect_args={"password": pw})  # fmt: skip


def _pg_uri(site: Site, database: str) -> str:
    """MLflow's URI of ``database`` on the cluster, new in each test (see _mlflow_sqlite)."""
    pw = postgres.password(site, postgres.MLFLOW.role)
    return (f"postgresql+psycopg2://mlflow:{pw}@127.0.0.1:{site.pg_port}/{database}"
            f"?application_name=t{uuid.uuid4().hex}")  # fmt: skip


def _mlflow_sqlite(site: Site) -> dict[str, str]:
    """An earlier site's MLflow: an experiment, a run with a metric, param and tag, a
    registered model with a tagged version and an alias; a user in the auth store."""
    import mlflow
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    # Made under a name of its own, then moved into place: MLflow keeps one store per URI
    # in the process, and each test needs a new one.
    made = site.root / f"made-{uuid.uuid4().hex}"
    made.mkdir()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{made / 'mlflow.db'}")
    exp = client.create_experiment("trips-startup-a", artifact_location=str(site.root / "art"))
    run = client.create_run(exp, tags={"aif.startup": "startup-a"})
    client.log_metric(run.info.run_id, "test_rmse", 0.25, step=3)
    client.log_param(run.info.run_id, "epochs", "4")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("trips")
    mv = client.create_model_version("trips", f"runs:/{run.info.run_id}/model",
                                     run_id=run.info.run_id,
                                     tags={"aif.startup": "startup-a"})  # fmt: skip
    client.set_registered_model_alias("trips", "champion", mv.version)
    auth = SqlAlchemyStore()
    auth.init_db(f"sqlite:///{made / 'auth.db'}")
    auth.create_user("startup-a", "a-password-1234", is_admin=False)
    auth.engine.dispose()
    (site.root / "mlflow").mkdir(exist_ok=True)
    for name in ("mlflow.db", "auth.db"):
        (made / name).rename(site.root / "mlflow" / name)
    return {"experiment": exp, "run": run.info.run_id, "version": mv.version}


def test_an_earlier_sites_mlflow_is_copied_and_reads_back_through_mlflow(clean: Site) -> None:
    import mlflow
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    made = _mlflow_sqlite(clean)
    said: list[str] = []
    assert postgres.migrate_sqlite(clean, said.append, MLFLOW_ONLY) == ["mlflow", "mlflow_auth"]
    uri = _pg_uri(clean, "mlflow")
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(made["run"])
    assert run.data.metrics == {"test_rmse": 0.25} and run.data.params == {"epochs": "4"}
    assert run.data.tags["aif.startup"] == "startup-a"
    assert run.info.status == "FINISHED"
    mv = client.get_model_version_by_alias("trips", "champion")
    assert mv.version == made["version"] and mv.tags == {"aif.startup": "startup-a"}
    # The experiments' id sequence goes on after the copied ids (a new one does not collide).
    new = client.create_experiment("another")
    assert int(new) > int(made["experiment"])
    auth = SqlAlchemyStore()
    auth.init_db(_pg_uri(clean, "mlflow_auth"))
    assert auth.authenticate_user("startup-a", "a-password-1234")
    assert not auth.authenticate_user("startup-a", "wrong")
    # The SQLite files are kept, renamed; nothing is left to copy, a second call copies nothing.
    assert not (clean.root / "mlflow" / "mlflow.db").exists()
    assert list((clean.root / "mlflow").glob("mlflow.db.migrated-*"))
    assert postgres.pending(clean) == []
    assert postgres.migrate_sqlite(clean, said.append, MLFLOW_ONLY) == []
    assert any("rows in" in line and "kept as mlflow.db.migrated-" in line for line in said)


def test_an_earlier_sites_prefect_keeps_its_types(clean: Site) -> None:
    """UUIDs, time stamps, JSON and intervals: SQLite's text becomes PostgreSQL's types."""
    from prefect.server.database import orm_models

    db = clean.root / "prefect" / "prefect.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    postgres._prefect_upgrade(clean, f"sqlite+aiosqlite:///{db}")
    flow_id, run_id = uuid.uuid4(), uuid.uuid4()
    when = datetime(2026, 12, 1, 1, 0, 5, 123456, tzinfo=UTC)
    md = orm_models.Base.metadata
    src = sa.create_engine(f"sqlite:///{db}")
    with src.begin() as conn:
        conn.execute(md.tables["flow"].insert(), [{"id": flow_id, "name": "aif-pipeline"}])
        conn.execute(md.tables["flow_run"].insert(), [{
            "id": run_id, "name": "startup-b/agri-yield nightly 2026-12-01", "flow_id": flow_id,
            "parameters": {"startup": "startup-b", "overrides": {"training.epochs": 2}},
            "tags": ["startup:startup-b"], "expected_start_time": when,
            "total_run_time": timedelta(seconds=93.5), "state_type": "COMPLETED",
        }])  # fmt: skip
    src.dispose()
    assert postgres.migrate_sqlite(clean, lambda _m: None, PREFECT_ONLY) == ["prefect"]
    with _pg_engine(clean, "prefect").connect() as conn:
        row = conn.execute(sa.select(md.tables["flow_run"]).where(
            md.tables["flow_run"].c.id == run_id)).one()._mapping  # fmt: skip
        kind = conn.execute(sa.text("SELECT pg_typeof(total_run_time)::text, "
                                    "pg_typeof(id)::text FROM flow_run")).one()  # fmt: skip
    assert row["parameters"] == {"startup": "startup-b", "overrides": {"training.epochs": 2}}
    assert row["tags"] == ["startup:startup-b"] and row["flow_id"] == flow_id
    assert row["expected_start_time"] == when
    assert row["total_run_time"] == timedelta(seconds=93.5)
    assert tuple(kind) == ("interval", "uuid")


def test_a_failed_copy_changes_nothing(clean: Site) -> None:
    """A copy that fails half-way (here: a row SQLite took that PostgreSQL refuses) leaves
    the PostgreSQL database empty and the SQLite file where it was, in one line."""
    _mlflow_sqlite(clean)
    db = clean.root / "mlflow" / "mlflow.db"
    with sqlite3.connect(db) as conn:  # SQLite does not enforce the column's type
        conn.execute("UPDATE metrics SET step = 'not a number'")
    with pytest.raises(SiteError) as err:
        postgres.migrate_sqlite(clean, lambda _m: None, MLFLOW_ONLY[:1])
    msg = str(err.value)
    assert msg.startswith(f"site part postgres: copying {db} into database mlflow failed (")
    assert msg.endswith("nothing was changed, the SQLite file is kept")
    assert "\n" not in msg and len(msg) < 500
    assert db.exists() and postgres.pending(clean)
    with _pg_engine(clean, "mlflow").connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM information_schema.tables "
                                    "WHERE table_schema = 'public'")).scalar() == 0  # fmt: skip


def test_a_database_in_use_is_never_overwritten(clean: Site) -> None:
    import mlflow

    live = mlflow.MlflowClient(tracking_uri=_pg_uri(clean, "mlflow"))
    live.create_experiment("made-on-postgres")
    _mlflow_sqlite(clean)
    said: list[str] = []
    assert postgres.migrate_sqlite(clean, said.append, MLFLOW_ONLY[:1]) == []
    # Kept, set aside: the next `up` does not stop the servers for it again.
    assert list((clean.root / "mlflow").glob("mlflow.db.not-migrated-*"))
    assert not (clean.root / "mlflow" / "mlflow.db").exists()
    assert str(clean.root / "mlflow" / "mlflow.db") not in postgres.pending(clean)
    assert any("is left alone" in line and "already in use" in line for line in said)
    assert live.get_experiment_by_name("made-on-postgres") is not None
    assert live.get_experiment_by_name("trips-startup-a") is None


def test_no_password_on_a_command_line_or_in_a_url(pg: Site) -> None:
    """The services find their passwords in the password file (root only), not in argv
    (which every local user sees in ps) or a URL that a log could print."""
    secret = postgres.password(pg, postgres.PREFECT.role)
    mlflow_secret = postgres.password(pg, postgres.MLFLOW.role)
    env = services.prefect_env(pg)
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == (
        f"postgresql+asyncpg://prefect@127.0.0.1:{pg.pg_port}/prefect"
    )
    seen = " ".join([*services.mlflow_argv(pg), *postgres.argv(pg), *env.values()])
    assert secret not in seen and mlflow_secret not in seen
    pgpass = Path(env["PGPASSFILE"])
    assert pgpass.stat().st_mode & 0o777 == 0o600
    assert f"127.0.0.1:{pg.pg_port}:*:prefect:{secret}" in pgpass.read_text().splitlines()
    # The cluster takes passwords only: a wrong one is refused.
    import psycopg2

    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=pg.pg_port, user="prefect", password="x",
                         dbname="prefect", connect_timeout=5)  # fmt: skip
