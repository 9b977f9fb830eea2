"""PostgreSQL (psycopg 3): the production store.

Rows are locked with SELECT ... FOR UPDATE in a fixed order (see base.py), so
concurrent writers, in this process or another replica, queue instead of
deadlocking. Bulk writes go through unnest() arrays: one statement per table
per group commit, whatever the group's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from money_plane.store.base import (
    SCHEMA,
    AccountEventEncoder,
    EventEncoder,
    LedgerStore,
    StoreConflict,
)

_CONFLICTS = (
    pg_errors.UniqueViolation,
    pg_errors.SerializationFailure,
    pg_errors.DeadlockDetected,
    pg_errors.LockNotAvailable,
)

_ARRAY_TYPES = {
    "accounts": None,
    "entries": ("text", "text", "text", "bigint", "bytea"),
    "postings": ("text", "text", "smallint", "bigint", "text", "bigint"),
    "holds": ("text", "text", "smallint", "bigint", "bytea"),
    "reserves": ("text", "text", "bigint", "smallint", "bytea"),
    "idempotency": ("text", "bigint", "bytea"),
    "outbox": ("text", "text", "bytea", "bigint"),
}


class PostgresLedgerStore(LedgerStore):
    placeholder = "%s"
    blob_type = "BYTEA"
    serial_type = "BIGSERIAL PRIMARY KEY"
    lock_suffix = " FOR UPDATE"

    def __init__(
        self,
        dsn: str,
        encode_event: EventEncoder,
        encode_account_event: AccountEventEncoder,
        default_hold_timeout_s: int,
        conflict_retries: int = 3,
    ) -> None:
        super().__init__(
            encode_event, encode_account_event, default_hold_timeout_s, conflict_retries
        )
        self._dsn = dsn

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._dsn, autocommit=False)

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        conn = self._conn()
        if conn.closed:
            conn = self._connect()
            self._local.conn = conn
        try:
            with conn.transaction(), conn.cursor() as cur:
                yield cur
        except _CONFLICTS as exc:
            raise StoreConflict(str(exc)) from exc
        except psycopg.OperationalError:
            # A broken connection is replaced on the next transaction.
            conn.close()
            raise

    def create_schema(self) -> None:
        # Concurrent start-ups of several replicas must not race on DDL: the
        # advisory lock is held until this transaction commits.
        with self._transaction() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7406171)")
            for statement in SCHEMA:
                cur.execute(statement.format(blob=self.blob_type, serial=self.serial_type))

    def _insert_many(self, cur: Any, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        types = _ARRAY_TYPES.get(table)
        if types is None or len(rows) < 4:
            super()._insert_many(cur, table, columns, rows)
            return
        arrays = [list(column) for column in zip(*rows, strict=True)]
        unnest = ", ".join(f"%s::{t}[]" for t in types)
        cur.execute(f"INSERT INTO {table} ({columns}) SELECT * FROM unnest({unnest})", arrays)

    def _update_accounts(self, cur: Any, rows: list[tuple[int, int, int, int, str]]) -> None:
        if len(rows) < 4:
            super()._update_accounts(cur, rows)
            return
        arrays = [list(column) for column in zip(*rows, strict=True)]
        cur.execute(
            "UPDATE accounts AS a SET debits_posted = u.dp, credits_posted = u.cp, "
            "debits_pending = u.dpe, credits_pending = u.cpe "
            "FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::text[]) "
            "AS u(dp, cp, dpe, cpe, k) WHERE a.account_key = u.k",
            arrays,
        )
