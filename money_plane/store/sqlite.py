"""SQLite in WAL mode: the embedded default. One writer at a time (SQLite's
rule), readers alongside it; synchronous=FULL so a commit survives power loss."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from money_plane.store.base import AccountEventEncoder, EventEncoder, LedgerStore, StoreConflict
from triplane.runtime.retry import RetryPolicy


class SqliteLedgerStore(LedgerStore):
    placeholder = "?"
    blob_type = "BLOB"
    dialect = "sqlite"
    lock_suffix = ""  # BEGIN IMMEDIATE takes the database write lock up front.

    def __init__(
        self,
        path: Path,
        encode_event: EventEncoder,
        encode_account_event: AccountEventEncoder,
        default_hold_timeout_s: int,
        conflict_retry: RetryPolicy,
        busy_timeout_ms: int = 10_000,
    ) -> None:
        super().__init__(encode_event, encode_account_event, default_hold_timeout_s, conflict_retry)
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        path.parent.mkdir(parents=True, exist_ok=True)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        conn = self._conn()
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StoreConflict(str(exc)) from exc
        try:
            yield cur
        except sqlite3.IntegrityError as exc:
            conn.rollback()
            raise StoreConflict(str(exc)) from exc
        except BaseException:
            conn.rollback()
            raise
        else:
            conn.commit()
        finally:
            cur.close()
