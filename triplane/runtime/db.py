"""One small database layer for SQLite (embedded) and PostgreSQL (production).

Statements are written once with `?` placeholders and portable types (TEXT,
BIGINT), so both backends run the same SQL and the same tests. Calls are
synchronous; the async layer runs them in a worker thread. One connection per
store, guarded by a lock: the decision log has a single writer anyway, and
consent and offers are served from memory.
"""

from __future__ import annotations

import queue
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psycopg

from triplane.runtime.errors import Unavailable

Row = tuple[Any, ...]


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def executemany(self, sql: str, params_seq: Sequence[Sequence[Any]]) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


def _placeholders(sql: str, dialect: str) -> str:
    """`?` placeholders as the backend's driver spells them."""
    return sql.replace("?", "%s") if dialect == "postgres" else sql


class DatabaseClosed(RuntimeError):
    """A read or write on a database after `close()`."""


class Tx:
    """A transaction: `execute`, `one`, `all` with `?` placeholders."""

    def __init__(self, cursor: Cursor, dialect: str) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def _sql(self, sql: str) -> str:
        return _placeholders(sql, self._dialect)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        result = self._cursor.execute(self._sql(sql), tuple(params))
        return int(getattr(result, "rowcount", -1) if result is not None else -1)

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement over many parameter rows (PostgreSQL pipelines them:
        one round trip rather than one per row)."""
        if rows:
            self._cursor.executemany(self._sql(sql), [tuple(r) for r in rows])

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        self._cursor.execute(self._sql(sql), tuple(params))
        row = self._cursor.fetchone()
        return tuple(row) if row is not None else None

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cursor.execute(self._sql(sql), tuple(params))
        return [tuple(r) for r in self._cursor.fetchall()]


# Column types whose spelling differs between the backends, for the few
# tables that need them (a DDL formats them in).
_BLOB_TYPE = {"sqlite": "BLOB", "postgres": "BYTEA"}
_SERIAL_KEY = {"sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT", "postgres": "BIGSERIAL PRIMARY KEY"}


class Database:
    """A connection to one of the two backends, plus `readers` connections
    for reads (`read()`, `read_one()`), so a long read (a replay page, a log
    verification) never waits for the writer's transaction nor holds it up."""

    def __init__(self, backend: str, target: str, readers: int = 2) -> None:
        assert backend in ("sqlite", "postgres"), backend
        self.dialect = backend
        # Raw bytes, and an increasing integer key (insertion order).
        self.blob_type = _BLOB_TYPE[backend]
        self.serial_key = _SERIAL_KEY[backend]
        self._target = target
        self._lock = threading.Lock()
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        self._readers: queue.LifoQueue[sqlite3.Connection | psycopg.Connection[Any]] = (
            queue.LifoQueue()
        )
        self._reader_count = max(0, readers)
        self._readers_lock = threading.Lock()
        self._closed = False
        self._opened: list[sqlite3.Connection | psycopg.Connection[Any]] = []
        if backend == "sqlite":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._sqlite = conn
        else:
            self._pg = psycopg.connect(target, autocommit=True)

    def _reader(self) -> sqlite3.Connection | psycopg.Connection[Any] | None:
        """A free reader connection (opened on first need), waiting for one
        when all are busy; None when the store has none (reads use the writer's)."""
        try:
            return self._readers.get_nowait()
        except queue.Empty:
            pass
        with self._readers_lock:  # not the writer's lock: it is held for a whole tx
            if self._closed:
                raise DatabaseClosed("database closed")
            if len(self._opened) < self._reader_count:
                conn: sqlite3.Connection | psycopg.Connection[Any]
                if self.dialect == "sqlite":
                    conn = sqlite3.connect(
                        self._target, isolation_level=None, check_same_thread=False
                    )
                    conn.execute("PRAGMA busy_timeout=5000")
                else:
                    conn = _connect_postgres(self._target)
                self._opened.append(conn)
                return conn
        if not self._reader_count:
            return None
        while True:  # every reader is busy: wait for one, or for close()
            try:
                return self._readers.get(timeout=0.1)
            except queue.Empty:
                if self._closed:
                    raise DatabaseClosed("database closed") from None

    @property
    def reads_are_local(self) -> bool:
        """True when a primary-key read costs microseconds (a local SQLite
        file in WAL mode, whose readers never wait for the writer), so a hot
        path may run it on the event loop rather than pay a thread hop; False
        for PostgreSQL, where every read is a network round trip."""
        return self.dialect == "sqlite"

    def read_one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        """One row of one statement on a reader, with no transaction around it
        (a single statement is its own consistent snapshot on both backends):
        the cheapest read there is, for lookups by key."""
        conn = self._reader()
        if conn is None:
            with self.tx() as tx:
                return tx.one(sql, params)
        try:
            if isinstance(conn, sqlite3.Connection):
                row = conn.execute(sql, tuple(params)).fetchone()
            else:
                with _unavailable_when_lost(conn):
                    row = conn.execute(_placeholders(sql, "postgres"), tuple(params)).fetchone()
            return tuple(row) if row is not None else None
        finally:
            self._release(conn)

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """A read-only transaction (one consistent snapshot) on a reader."""
        conn = self._reader()
        if conn is None:
            with self.tx() as tx:
                yield tx
            return
        try:
            if isinstance(conn, sqlite3.Connection):
                cursor = conn.cursor()
                cursor.execute("BEGIN")
                try:
                    yield Tx(cursor, "sqlite")
                finally:
                    cursor.execute("COMMIT")
            else:
                with (
                    _unavailable_when_lost(conn),
                    conn.transaction(),
                    conn.cursor() as pg_cursor,
                ):
                    yield Tx(pg_cursor, "postgres")
        finally:
            self._release(conn)

    def _release(self, conn: sqlite3.Connection | psycopg.Connection[Any]) -> None:
        """A reader back to the pool; one whose server connection was lost
        is closed instead, and the next read opens another."""
        lost = isinstance(conn, psycopg.Connection) and (conn.broken or conn.closed)
        with self._readers_lock:
            if lost or self._closed:
                # A reader in use when the store closed is closed here, by
                # the thread that used it, never under a running statement.
                conn.close()
                if conn in self._opened:
                    self._opened.remove(conn)
                return
            self._readers.put(conn)

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock:
            if self._sqlite is None and self._pg is None:
                # Closed: a clear error, not an assertion deep in a writer.
                raise DatabaseClosed("database closed")
            if self._sqlite is not None:
                cursor = self._sqlite.cursor()
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(cursor, "sqlite")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
                cursor.execute("COMMIT")
            else:
                conn = self._writer()
                with (
                    _unavailable_when_lost(conn),
                    conn.transaction(),
                    conn.cursor() as pg_cursor,
                ):
                    yield Tx(pg_cursor, "postgres")

    def _writer(self) -> psycopg.Connection[Any]:
        """The writer's PostgreSQL connection (its lock held), opened again
        when the server was lost (restarted, failed over): without that, one
        restart of PostgreSQL left every later transaction failing on the dead
        connection, each answered INTERNAL, until the plane itself restarted."""
        assert self._pg is not None
        if self._pg.broken or self._pg.closed:
            self._pg.close()
            self._pg = _connect_postgres(self._target)
        return self._pg

    def migrate(self, ddl: str) -> None:
        statements = [s.strip() for s in re.split(r";\s*\n", ddl) if s.strip()]
        with self.tx() as tx:
            if self.dialect == "postgres":
                # Replicas starting together on an empty database: concurrent
                # CREATE TABLE IF NOT EXISTS of one table fails in all but one
                # (UniqueViolation on pg_type). One migration at a time per
                # database; the lock ends with the transaction.
                tx.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            for statement in statements:
                tx.execute(statement)

    def close(self) -> None:
        with self._readers_lock:
            self._closed = True
            # Only idle readers: closing a SQLite connection while another
            # thread runs a statement on it crashes the process (a
            # background pass reading as a plane stopped did); a reader in
            # use is closed when it is released.
            while True:
                try:
                    idle = self._readers.get_nowait()
                except queue.Empty:
                    break
                idle.close()
                self._opened.remove(idle)
        with self._lock:
            if self._sqlite is not None:
                self._sqlite.close()
                self._sqlite = None
            if self._pg is not None:
                self._pg.close()
                self._pg = None


# The advisory lock key schema migrations take (any constant of the project's).
MIGRATION_LOCK = 0x7472_6970_6C61_6E  # "triplan"


class DatabaseUnavailable(Unavailable):
    """The database server was lost during the transaction (a restart, a
    failover, the network) or cannot be reached: nothing of the transaction
    is known to be committed, and the call may be retried (UNAVAILABLE,
    reason DATABASE_UNAVAILABLE), its idempotency key deciding what a retry
    does. The lost connection is replaced on the next use."""


def _connect_postgres(target: str) -> psycopg.Connection[Any]:
    """A new connection, or DatabaseUnavailable while the server cannot take
    one (down, or "the database system is starting up" in its recovery)."""
    try:
        return psycopg.connect(target, autocommit=True)
    except psycopg.OperationalError as error:
        raise DatabaseUnavailable(
            "DATABASE_UNAVAILABLE", f"the database cannot be reached: {error}"
        ) from error


@contextmanager
def _unavailable_when_lost(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """A PostgreSQL error that lost the connection is DatabaseUnavailable;
    any other error (a constraint, a conflict) goes through as it is."""
    try:
        yield
    except psycopg.OperationalError as error:
        if not (conn.broken or conn.closed):
            raise
        raise DatabaseUnavailable(
            "DATABASE_UNAVAILABLE", f"the database connection was lost: {error}"
        ) from error


def is_unique_violation(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    return isinstance(exc, psycopg.errors.UniqueViolation)
