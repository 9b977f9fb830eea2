"""One small database layer for SQLite (embedded) and PostgreSQL (production).

Statements are written once with `?` placeholders and portable types (TEXT,
BIGINT), so both backends run the same SQL and the same tests. Calls are
synchronous; the async layer runs them in a worker thread. One connection per
store, guarded by a lock: the decision log has a single writer anyway, and
consent and offers are served from memory.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import psycopg

Row = tuple[Any, ...]


class Cursor(Protocol):
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any: ...
    def executemany(self, sql: str, params_seq: Sequence[Sequence[Any]]) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Tx:
    """A transaction: `execute`, `one`, `all` with `?` placeholders."""

    def __init__(self, cursor: Cursor, dialect: str) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._dialect == "postgres" else sql

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


class Database:
    """A connection to one of the two backends."""

    def __init__(self, backend: str, target: str) -> None:
        assert backend in ("sqlite", "postgres"), backend
        self.dialect = backend
        self._lock = threading.Lock()
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        if backend == "sqlite":
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._sqlite = conn
        else:
            self._pg = psycopg.connect(target, autocommit=True)

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock:
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
                assert self._pg is not None
                with self._pg.transaction(), self._pg.cursor() as pg_cursor:
                    yield Tx(pg_cursor, "postgres")

    def migrate(self, ddl: str) -> None:
        statements = [s.strip() for s in re.split(r";\s*\n", ddl) if s.strip()]
        with self.tx() as tx:
            for statement in statements:
                tx.execute(statement)

    def close(self) -> None:
        with self._lock:
            if self._sqlite is not None:
                self._sqlite.close()
                self._sqlite = None
            if self._pg is not None:
                self._pg.close()
                self._pg = None


def is_unique_violation(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.IntegrityError):
        return "UNIQUE" in str(exc)
    return isinstance(exc, psycopg.errors.UniqueViolation)
