"""The metadata database: one SQLAlchemy engine per service, its schema by Alembic migrations.

URLs: ``sqlite:///path/to/file.db`` (the embedded default: a file in the data dir),
``sqlite://`` (in memory, one process, for unit tests) or ``postgresql+psycopg://user:pw@host/db``
(deployments). Each stateful service owns its tables and its migrations (``services/X/migrations``,
with a version table of its own), so services may share one database (the embedded stack, tests) or
have one each (Kubernetes) without ever reading each other's tables.

Transactions: :meth:`Database.write` for anything that writes (on SQLite ``BEGIN IMMEDIATE``, so two
writers queue on the lock instead of deadlocking when both upgrade a read lock; on PostgreSQL READ
COMMITTED with explicit row locks in the stores), :meth:`Database.read` for reads. A database that
cannot be reached is :class:`~ftps.common.errors.Unavailable` ("retry"), the details in the log.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import event, exc as sa_exc
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from ftps.common.errors import Unavailable

log = logging.getLogger(__name__)


class MigrationError(RuntimeError):
    """The schema could not be brought to the code's version: the service must not start."""


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the settings each backend needs (see the module docstring)."""
    if not url:
        raise ValueError("a database URL is required (FTPS_DATABASE_URL)")
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        if not memory:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30},
            # In memory: one connection shared by every thread, or each would see its own database.
            poolclass=StaticPool if memory else None, pool_pre_ping=False)
        _sqlite_transactions(engine, wal=not memory)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=10,
                                connect_args={"connect_timeout": 5})
    raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql+psycopg://")


def _sqlite_transactions(engine: Engine, *, wal: bool) -> None:
    # SQLAlchemy's documented recipe: let pysqlite emit no BEGIN of its own, and emit ours, so that a
    # write transaction takes the write lock when it begins (BEGIN IMMEDIATE).
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:  # noqa: ANN001
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if wal:  # readers do not block the writer, nor the writer readers
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("ftps_write") else "BEGIN")


class Database:
    """A service's database: its engine, transactions, and the mapping of outages to UNAVAILABLE."""

    def __init__(self, url: str, *, name: str = "database") -> None:
        self.url = url
        self.name = name
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        # SQLite in memory shares one connection: its transactions must not interleave.
        self._serial = threading.RLock() if isinstance(self.engine.pool, StaticPool) else None
        # A SQLite file has one writer at a time anyway; this process's writers queue on a lock in
        # arrival order instead of polling the file lock with sqlite's growing sleeps (under 50
        # concurrent submitters that polling put p99 in seconds). Other processes still wait on
        # busy_timeout.
        self._writers = threading.Lock() if self.dialect == "sqlite" and self._serial is None else None

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Connection]:
        lock = self._serial if self._serial is not None else (self._writers if write else None)
        if lock is not None:
            lock.acquire()
        try:
            with self.engine.connect() as conn:
                if write:
                    conn = conn.execution_options(ftps_write=True)
                with conn.begin():
                    yield conn
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as e:
            # Unreachable, restarting, or (SQLite) locked past busy_timeout: the caller may retry.
            log.warning("%s unavailable: %s", self.name, getattr(e, "orig", e))
            raise Unavailable(f"{self.name} unavailable, retry", reason="DATABASE_UNAVAILABLE") from e
        finally:
            if lock is not None:
                lock.release()

    def write(self):
        """A transaction that writes: committed when the block ends, rolled back on an exception."""
        return self._transaction(True)

    def read(self):
        """A read-only transaction (a consistent snapshot on PostgreSQL per statement)."""
        return self._transaction(False)

    def migrate(self, migrations: str, *, version_table: str) -> None:
        """Bring this service's tables to the code's version (``migrations``: the package holding
        its ``env.py`` and ``versions/``). Raises :class:`MigrationError` with one line on failure."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", migrations)
        try:
            # A write transaction from its BEGIN (SQLite: IMMEDIATE): services that start together
            # on one SQLite file take turns, instead of failing "database is locked" when a read
            # transaction cannot be upgraded to a write.
            with self.engine.connect() as conn, conn.execution_options(ftps_write=True).begin():
                if self.dialect == "postgresql":
                    # Replicas starting together (initContainers) migrate one at a time; the later
                    # ones then find the schema at head. Held until this transaction ends.
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_lock_key(version_table)})")
                cfg.attributes["connection"] = conn
                cfg.attributes["version_table"] = version_table
                command.upgrade(cfg, "head")
        except Exception as e:  # noqa: BLE001 - any failure stops the service with its reason
            reason = getattr(e, "orig", None) or e
            raise MigrationError(f"{self.name}: migrations of {migrations} could not be applied: "
                                 f"{type(reason).__name__}: {str(reason).splitlines()[0] if str(reason) else ''}") from e

    def dispose(self) -> None:
        self.engine.dispose()


def _lock_key(name: str) -> int:
    """A stable, signed 63-bit advisory-lock key for a name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def run_migrations() -> None:
    """The body of every service's ``migrations/env.py``: online migrations on the connection and
    version table that :meth:`Database.migrate` passes in (no alembic.ini, no URL in files)."""
    from alembic import context

    conn = context.config.attributes["connection"]
    context.configure(connection=conn, version_table=context.config.attributes["version_table"],
                      transaction_per_migration=False)
    with context.begin_transaction():
        context.run_migrations()
