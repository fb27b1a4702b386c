"""Where the store lives and how afina connects to it: the URL, SQLite's settings, the migrations.

SQLite (the default, `AFINA_HOME/afina.db`) is shared by every afina process on the machine: the
journal is a write-ahead log, so readers never wait for a writer; writers wait for each other
(busy timeout) instead of failing; and every write transaction takes the write lock when it begins
(BEGIN IMMEDIATE), so that a transaction that reads and then writes, such as numbering a model
version, cannot interleave with another. PostgreSQL serializes the same transactions with
advisory locks (`lock`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from importlib import resources
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import StaticPool

from afina.errors import AfinaError
from afina.paths import afina_home

URL_HINT = "use sqlite:///path/to/afina.db or postgresql://user@host/database"
BUSY_TIMEOUT_S = 30  # how long a SQLite writer waits for another before giving up
WRITE = "afina_write"  # execution option on connections whose transactions write


def database_url(url: str | None = None) -> str:
    """The store's URL: `url`, else `AFINA_DATABASE_URL`, else SQLite in the afina home (created here)."""
    if url:
        return url
    if from_env := os.environ.get("AFINA_DATABASE_URL"):
        return from_env
    home = afina_home()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AfinaError("store_unavailable", f"cannot create the afina home: {e.strerror or e}", location=str(home),
                         hint="set AFINA_HOME to a writable directory, or AFINA_DATABASE_URL to a database") from None
    return f"sqlite:///{home / 'afina.db'}"


def mask_url(url: str | URL) -> str:
    """The URL to show a user: the password, if any, as ***."""
    if isinstance(url, URL):
        return url.render_as_string(hide_password=True)
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def parse_url(url: str) -> URL:
    """A SQLAlchemy URL for SQLite or PostgreSQL; a plain `postgresql://` uses psycopg 3, the driver afina installs."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise AfinaError("store_unavailable", "not a database URL", location=mask_url(url), hint=URL_HINT) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if (backend := parsed.get_backend_name()) not in ("sqlite", "postgresql"):
        raise AfinaError("store_unavailable", f"afina's store runs on SQLite or PostgreSQL, not {backend}",
                         location=mask_url(parsed), hint=URL_HINT)
    return parsed


def create_store_engine(url: URL) -> Engine:
    """An engine with afina's settings; connections are opened lazily."""
    try:
        if url.get_backend_name() == "postgresql":
            return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        memory = url.database in (None, "", ":memory:")
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
                               **({"poolclass": StaticPool} if memory else {}))
    except (NoSuchModuleError, ImportError) as e:
        raise AfinaError("store_unavailable", f"no driver for this database: {e}", location=mask_url(url),
                         hint="use sqlite:///... or postgresql+psycopg://...") from None

    @event.listens_for(engine, "connect")
    def configure_sqlite(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # transactions begin in `begin_sqlite`, not in the driver
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def begin_sqlite(connection: Connection) -> None:
        # A deferred transaction that reads, then writes, fails at once (not after the busy timeout)
        # when another process wrote in between; taking the write lock first makes it wait its turn.
        immediate = connection.get_execution_options().get(WRITE)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def lock(connection: Connection, key: str) -> None:
    """Serialize the transactions that take the same key, until this one ends. SQLite's write
    transactions are serialized already (BEGIN IMMEDIATE); PostgreSQL takes an advisory lock."""
    if connection.dialect.name == "postgresql":
        number = int.from_bytes(hashlib.sha256(f"afina:{key}".encode()).digest()[:8], "big", signed=True)
        connection.execute(text("SELECT pg_advisory_xact_lock(:number)"), {"number": number})


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """alembic's configuration for the store's migrations, built in code: no alembic.ini needed."""
    config = Config()
    config.set_main_option("script_location", str(Path(str(resources.files("afina.store"))) / "migrations"))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def migrate_store(engine: Engine) -> None:
    """Bring the database to the newest schema. Cheap when it is there already; when it is not, one
    process migrates while the others wait on the lock, then find nothing left to do.

    A new SQLite file is the one place where SQLite answers "locked" at once instead of waiting
    (processes racing to switch it to WAL, or to recover its WAL index): those tries are repeated
    until the busy timeout has passed."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return _migrate(engine)
        except OperationalError as error:
            if engine.dialect.name != "sqlite" or "locked" not in str(error) or time.monotonic() > deadline:
                raise
            engine.dispose()  # a fresh connection sets the pragmas again
            time.sleep(0.2)


def _migrate(engine: Engine) -> None:
    scripts = ScriptDirectory.from_config(alembic_config())
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == scripts.get_current_head():
        return
    if current is not None and current not in {script.revision for script in scripts.walk_revisions()}:
        raise AfinaError("store_unavailable", f"the store is at schema {current}, newer than this afina knows",
                         location=mask_url(engine.url), hint="upgrade afina, or point AFINA_DATABASE_URL elsewhere")
    with engine.execution_options(**{WRITE: True}).begin() as connection:
        lock(connection, "migrations")
        command.upgrade(alembic_config(connection=connection), "head")


def unavailable(error: Exception, url: URL) -> AfinaError:
    """The driver's first line, without the password, where the store is and what to check."""
    reason = str(getattr(error, "orig", None) or error).strip() or type(error).__name__
    reason = reason.splitlines()[0]
    if url.password:
        reason = reason.replace(str(url.password), "***")
    if "locked" in reason:
        hint = f"another afina process held the store's write lock for over {BUSY_TIMEOUT_S} s; try again"
    else:
        hint = "check AFINA_DATABASE_URL (or AFINA_HOME): the database must exist, be reachable and writable"
    return AfinaError("store_unavailable", f"cannot use the store: {reason}", location=mask_url(url), hint=hint)
