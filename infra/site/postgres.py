"""PostgreSQL: the database of the site's Prefect server and of MLflow (tracking store,
registry, users and permissions). The local profile keeps SQLite.

A private cluster of Debian's PostgreSQL, like MariaDB for Slurm: its data under
``<site>/postgres/data`` (owned by the ``postgres`` user: the server refuses to run as
root), TCP on 127.0.0.1 only (no Unix socket; a compute node cannot reach the login
node's loopback), password logins only (SCRAM). Each application has a role of its own
(``prefect``, ``mlflow``) that owns its databases; the superuser ``aif_pg`` is used by
``aif site up`` alone. The passwords are made once and kept in ``<site>/secrets/postgres``
(root only); the services read them from a libpq password file (``PGPASSFILE``), so no
password is on a command line or in a URL.

A site that ran on SQLite before: ``up`` copies its Prefect and MLflow databases into
PostgreSQL once, table by table through the applications' own models (their types turn
SQLite's text into PostgreSQL's timestamps, UUIDs, JSON and intervals), before the
servers start. The SQLite files are kept, renamed ``*.migrated-<time>``. A copy that fails
leaves the PostgreSQL database empty again and the SQLite file in place.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aifactory.infra.site import procs
from aifactory.infra.site.layout import Site, kept_secret, private_file
from aifactory.tasks.core.errors import SiteError

PACKAGES = {"pg_ctlcluster": "postgresql"}  # the server's binaries are not on PATH
OS_USER = "postgres"  # Debian's package makes it
SUPERUSER = "aif_pg"
MAX_CONNECTIONS = 300  # Prefect's server pool, MLflow's, the migration: see services.py


@dataclass(frozen=True)
class App:
    """One application's databases on the site's cluster."""

    role: str
    databases: tuple[str, ...]


PREFECT = App("prefect", ("prefect",))
MLFLOW = App("mlflow", ("mlflow", "mlflow_auth"))
APPS = (PREFECT, MLFLOW)


def bin_dir() -> Path:
    """The newest installed PostgreSQL's binaries (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(Path(p).parent.parent.name))  # fmt: skip
    if not found:
        raise SiteError("site part postgres: PostgreSQL is not installed (Debian package "
                        "postgresql; `infra/dev.sh setup` installs it)")  # fmt: skip
    return Path(found[-1]).parent


def data_dir(site: Site) -> Path:
    return site.root / "postgres" / "data"


def secrets_dir(site: Site) -> Path:
    return site.root / "secrets" / "postgres"


def password(site: Site, role: str) -> str:
    return kept_secret(secrets_dir(site) / f"{role}.secret", lambda: secrets.token_urlsafe(24))


def pgpass_file(site: Site) -> Path:
    """libpq's password file of the site's services (root only; psycopg2 and asyncpg read
    it through PGPASSFILE)."""
    path = secrets_dir(site) / "pgpass"
    lines = [f"127.0.0.1:{site.pg_port}:*:{role}:{password(site, role)}"
             for role in (SUPERUSER, *(a.role for a in APPS))]  # fmt: skip
    text = "\n".join(lines) + "\n"
    if not path.exists() or path.read_text() != text:
        private_file(path, text)
    return path


def env(site: Site) -> dict[str, str]:
    """What a client of the site's databases needs beside its URL."""
    return {"PGPASSFILE": str(pgpass_file(site))}


def url(site: Site, role: str, database: str, driver: str = "psycopg2") -> str:
    """SQLAlchemy's URL of ``database`` as ``role``: no password (the password file has it)."""
    return f"postgresql+{driver}://{role}@127.0.0.1:{site.pg_port}/{database}"


def _as_postgres() -> list[str]:
    return ["setpriv", f"--reuid={OS_USER}", f"--regid={OS_USER}", "--init-groups"]


def open_path(path: Path) -> list[str]:
    """Give the ``postgres`` user traverse (x, an ACL entry) on each folder above ``path``
    that denies it (a site under /root); the folders opened."""
    from aifactory.infra.site.slurm_parts import open_path_to

    return open_path_to(path, f"u:{OS_USER}:x", _as_postgres())


def ensure_cluster(site: Site, progress: Callable[[str], None]) -> None:
    """initdb once, as the postgres user, with the superuser's password (SCRAM)."""
    data = data_dir(site)
    if (data / "PG_VERSION").exists():
        return
    try:
        pw = pwd.getpwnam(OS_USER)
    except KeyError:
        raise SiteError(f"site part postgres: there is no Unix user {OS_USER} (Debian's "
                        "postgresql package makes it)") from None  # fmt: skip
    top = data.parent
    top.mkdir(parents=True, exist_ok=True)
    os.chown(top, pw.pw_uid, pw.pw_gid)
    os.chmod(top, 0o700)
    opened = open_path(top)
    if opened:
        progress(f"gave the user {OS_USER} traverse (x, an ACL entry) on {', '.join(opened)}")
    if data.exists():  # an initdb that died half-way: its folder is not a cluster
        shutil.rmtree(data)
    pwfile = top / ".pwfile"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password(site, SUPERUSER) + "\n")
    os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    try:
        procs.run([*_as_postgres(), str(bin_dir() / "initdb"), "-D", str(data),
                   "-U", SUPERUSER, f"--pwfile={pwfile}", "--auth=scram-sha-256",
                   "-E", "UTF8", "--no-locale"], timeout=300)  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    progress(f"postgres: made the cluster in {data}")


def launcher(site: Site) -> list[str]:
    return _as_postgres()


def argv(site: Site) -> list[str]:
    return [str(bin_dir() / "postgres"), "-D", str(data_dir(site)), "-p", str(site.pg_port),
            "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
            "-c", f"max_connections={MAX_CONNECTIONS}", "-c", "shared_buffers=128MB",
            "-c", "timezone=UTC", "-c", "log_timezone=UTC"]  # fmt: skip


def ok(site: Site) -> bool:
    try:
        ready = procs.run([str(bin_dir() / "pg_isready"), "-q", "-h", "127.0.0.1",
                           "-p", str(site.pg_port)], check=False, timeout=10)  # fmt: skip
    except SiteError:
        return False
    return ready.returncode == 0


def _connect(site: Site, database: str = "postgres") -> Any:
    import psycopg2

    return psycopg2.connect(host="127.0.0.1", port=site.pg_port, user=SUPERUSER,
                            password=password(site, SUPERUSER), dbname=database,
                            connect_timeout=10)  # fmt: skip


def ensure_databases(site: Site, progress: Callable[[str], None]) -> None:
    """Each application's role (its password from the site's secrets, set on every
    ``up``) and databases (owned by it, closed to every other role)."""
    from psycopg2 import sql

    conn = _connect(site)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for app in APPS:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (app.role,))
                verb = "ALTER" if cur.fetchone() else "CREATE"
                cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD %s").format(
                    sql.Identifier(app.role)), (password(site, app.role),))  # fmt: skip
                for db in app.databases:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                    if cur.fetchone():
                        continue
                    _create_database(cur, db, app.role)
                    progress(f"postgres: database {db} (owner {app.role})")
    finally:
        conn.close()
    pgpass_file(site)


def _create_database(cur: Any, db: str, role: str) -> None:
    """Database ``db``, owned by ``role``, closed to every other role."""
    from psycopg2 import sql

    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
        sql.Identifier(db), sql.Identifier(role)))  # fmt: skip
    cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))


def _drop_and_create(site: Site, app: App, db: str) -> None:
    from psycopg2 import sql

    conn = _connect(site)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(db)))  # fmt: skip
            _create_database(cur, db, app.role)
    finally:
        conn.close()


def _has_tables(site: Site, db: str) -> bool:
    conn = _connect(site, db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM information_schema.tables "
                        "WHERE table_schema = 'public'")  # fmt: skip
            row = cur.fetchone()
            return bool(row and row[0])
    finally:
        conn.close()


# -- SQLite -> PostgreSQL ---------------------------------------------------------------
def _versions(conn: Any, names: Iterable[str]) -> dict[str, set[str]]:
    import sqlalchemy as sa

    out: dict[str, set[str]] = {}
    for name in names:
        if name.startswith("alembic_version"):
            rows = conn.execute(sa.text(f'SELECT version_num FROM "{name}"'))
            out[name] = {r[0] for r in rows}
    return out


def copy_tables(sqlite_path: Path, dst_url: str, metadata: Any, password: str | None = None,
                same_revisions: bool = True, batch: int = 2000) -> dict[str, int]:  # fmt: skip
    """Copy every table of ``metadata`` that ``sqlite_path`` has into the (empty,
    migrated to the same schema version) PostgreSQL database ``dst_url``, in one
    transaction; the rows copied per table. The tables' own types read SQLite's values
    and write PostgreSQL's. ``same_revisions``: both databases' alembic revisions must be
    the same (false where an application has one migration chain per dialect, as
    Prefect: both were upgraded to the installed version's head instead)."""
    import sqlalchemy as sa

    src = sa.create_engine(f"sqlite:///{sqlite_path}")
    args = {"options": "-c timezone=UTC", **({"password": password} if password else {})}
    dst = sa.create_engine(dst_url, connect_args=args)
    counts: dict[str, int] = {}
    try:
        src_tables = set(sa.inspect(src).get_table_names())
        dst_tables = set(sa.inspect(dst).get_table_names())
        with src.connect() as inp, dst.begin() as out:
            have, want = _versions(inp, src_tables), _versions(out, dst_tables)
            if same_revisions and have != want:
                raise SiteError(f"schema versions differ: {sqlite_path.name} has {have}, "
                                f"PostgreSQL {want} (same application version needed)")  # fmt: skip
            # Foreign keys are checked once the rows are all in (a cycle, or rows that
            # refer to later ones, must not fail the copy); needs the superuser.
            out.execute(sa.text("SET session_replication_role = replica"))
            src_insp = sa.inspect(src)
            for table in metadata.sorted_tables:
                if table.name not in src_tables:
                    continue
                if table.name not in dst_tables:
                    raise SiteError(f"table {table.name} is not in PostgreSQL's schema")
                cols = {c["name"] for c in src_insp.get_columns(table.name)}
                picked = [c for c in table.columns if c.name in cols]
                out.execute(table.delete())  # rows the migrations seed (the source has them)
                n = 0
                rows = inp.execution_options(stream_results=True).execute(sa.select(*picked))
                for chunk in rows.partitions(batch):
                    out.execute(table.insert(), [dict(r._mapping) for r in chunk])
                    n += len(chunk)
                counts[table.name] = n
            # Tables the models no longer declare but the schema keeps (MLflow's legacy
            # permission tables): copied as they are, by PostgreSQL's own column types.
            for name in sorted((src_tables & dst_tables) - set(counts)):
                if not name.startswith("alembic_version"):
                    counts[name] = _copy_as_is(inp, out, name, batch)
            _reset_sequences(out, list(counts))
    finally:
        src.dispose()
        dst.dispose()
    return counts


def _copy_as_is(inp: Any, out: Any, name: str, batch: int) -> int:
    import sqlalchemy as sa

    table = sa.Table(name, sa.MetaData(), autoload_with=out)
    have = {c["name"] for c in sa.inspect(inp).get_columns(name)}
    cols = [c for c in table.columns if c.name in have]
    flags = {c.name for c in cols if isinstance(c.type, sa.Boolean)}
    names = ", ".join(f'"{c.name}"' for c in cols)
    query = sa.text(f'SELECT {names} FROM "{name}"')
    out.execute(table.delete())
    n = 0
    for chunk in inp.execution_options(stream_results=True).execute(query).partitions(batch):
        rows = [{k: (bool(v) if k in flags and v is not None else v)
                 for k, v in r._mapping.items()} for r in chunk]  # fmt: skip
        out.execute(table.insert(), rows)
        n += len(rows)
    return n


def _reset_sequences(conn: Any, tables: list[str]) -> None:
    """A serial column's sequence continues after the highest copied id."""
    import sqlalchemy as sa

    rows = conn.execute(sa.text(
        "SELECT table_name, column_name FROM information_schema.columns WHERE "
        "table_schema = 'public' AND column_default LIKE 'nextval(%'"))  # fmt: skip
    for table, column in rows.fetchall():
        if table not in tables:
            continue
        seq = f"pg_get_serial_sequence('\"{table}\"', '{column}')"
        conn.execute(sa.text(f'SELECT setval({seq}, coalesce(max("{column}"), 1), '
                             f'max("{column}") IS NOT NULL) FROM "{table}"'))  # fmt: skip


@dataclass(frozen=True)
class Migration:
    """One SQLite database of an earlier site and how its PostgreSQL twin is made."""

    label: str
    sqlite: Callable[[Site], Path]
    app: App
    database: str
    # The application's own migrations, to its installed version's head, of a database URL
    # (both the SQLite file and the empty PostgreSQL database are upgraded first).
    upgrade: Callable[[Site, str], None]
    metadata: Callable[[], Any]
    same_revisions: bool = True  # one migration chain for every dialect
    driver: str = "psycopg2"  # the application's own PostgreSQL driver
    sqlite_scheme: str = "sqlite"  # and its SQLite one


def _prefect_upgrade(site: Site, db_url: str) -> None:
    from aifactory.infra.site import services

    procs.run([services.bin_path("prefect"), "server", "database", "upgrade", "-y"],
              env={**services.prefect_env(site), "PREFECT_LOGGING_LEVEL": "WARNING",
                   "PREFECT_SERVER_DATABASE_CONNECTION_URL": db_url}, timeout=600)  # fmt: skip


def _prefect_metadata() -> Any:
    from prefect.server.database import orm_models

    return orm_models.Base.metadata


def _mlflow_upgrade(site: Site, db_url: str) -> None:
    from aifactory.infra.site import services

    procs.run([services.bin_path("mlflow"), "db", "upgrade", db_url], env=env(site),
              timeout=600)  # fmt: skip


def _mlflow_metadata() -> Any:
    # Importing the models registers their tables.
    import mlflow.store.model_registry.dbmodels.models
    import mlflow.store.tracking.dbmodels.models  # noqa: F401
    from mlflow.store.db.base_sql_model import Base

    return Base.metadata


def _auth_upgrade(site: Site, db_url: str) -> None:
    from aifactory.infra.site import services

    code = ("import sys; from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore; "
            "SqlAlchemyStore().init_db(sys.argv[1])")  # fmt: skip
    procs.run([services.bin_path("python"), "-c", code, db_url], env=env(site), timeout=600)


def _auth_metadata() -> Any:
    from mlflow.server.auth.db.models import Base

    return Base.metadata


MIGRATIONS = (
    Migration("Prefect", lambda s: s.root / "prefect" / "prefect.db", PREFECT, "prefect",
              _prefect_upgrade, _prefect_metadata, same_revisions=False, driver="asyncpg",
              sqlite_scheme="sqlite+aiosqlite"),
    Migration("MLflow tracking and registry", lambda s: s.root / "mlflow" / "mlflow.db", MLFLOW,
              "mlflow", _mlflow_upgrade, _mlflow_metadata),
    Migration("MLflow users and permissions", lambda s: s.root / "mlflow" / "auth.db", MLFLOW,
              "mlflow_auth", _auth_upgrade, _auth_metadata),
)  # fmt: skip


def _checkpoint(path: Path) -> None:
    """Fold SQLite's write-ahead log into the file, so the file kept is whole by itself."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _set_aside(path: Path, why: str) -> str:
    """Rename the SQLite file (its log folded in first) to ``<name>.<why>-<time>``."""
    _checkpoint(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for extra in ("", "-wal", "-shm"):
        side = path.with_name(path.name + extra)
        if side.exists():
            side.rename(side.with_name(f"{side.name}.{why}-{stamp}"))
    return f"{path.name}.{why}-{stamp}"


def pending(site: Site) -> list[str]:
    """The SQLite databases of an earlier site not yet copied into PostgreSQL."""
    return [str(m.sqlite(site)) for m in MIGRATIONS if m.sqlite(site).exists()]


def migrate_sqlite(site: Site, progress: Callable[[str], None],
                   migrations: Iterable[Migration] = MIGRATIONS) -> list[str]:  # fmt: skip
    """Copy each SQLite database of an earlier site into its empty PostgreSQL database
    (before the servers start); the SQLite file is then renamed, and kept. A PostgreSQL
    database already in use is never written: the SQLite file stays and is reported."""
    done = []
    for m in migrations:
        path = m.sqlite(site)
        if not path.exists():
            continue
        if _has_tables(site, m.database):
            # Set aside (not copied, not deleted), so that the next `up` does not stop the
            # servers for it again.
            kept = _set_aside(path, "not-migrated")
            progress(f"postgres: {path} (SQLite, {m.label}) is left alone, kept as {kept}: "
                     f"the site's PostgreSQL database {m.database} is already in use")  # fmt: skip
            continue
        progress(f"postgres: copying {m.label} from {path} (SQLite) into database {m.database}")
        t0 = time.monotonic()
        try:
            m.upgrade(site, f"{m.sqlite_scheme}:///{path}")
            m.upgrade(site, url(site, m.app.role, m.database, driver=m.driver))
            counts = copy_tables(
                path,
                url(site, SUPERUSER, m.database),
                m.metadata(),
                password=password(site, SUPERUSER),
                same_revisions=m.same_revisions,
            )
        except Exception as exc:
            _drop_and_create(site, m.app, m.database)
            why = " ".join(str(exc).split())[:240]
            raise SiteError(f"site part postgres: copying {path} into database {m.database} "
                            f"failed ({why}); nothing was changed, the SQLite file is "
                            "kept") from None  # fmt: skip
        kept = _set_aside(path, "migrated")
        rows = sum(counts.values())
        progress(f"postgres: {m.label}: {rows} rows in {len(counts)} tables copied in "
                 f"{time.monotonic() - t0:.1f}s; the SQLite file is kept as {kept}")  # fmt: skip
        done.append(m.database)
    return done


def after_up(site: Site, progress: Callable[[str], None]) -> None:
    ensure_databases(site, progress)
    migrate_sqlite(site, progress)
