"""PostgreSQL (psycopg 3): the production store.

Rows are locked with SELECT ... FOR UPDATE in a fixed order (see base.py), so
concurrent writers, in this process or another replica, queue instead of
deadlocking.

A group commit of plain transfers costs two round trips, whatever the group's
size: the group's transaction runs in libpq pipeline mode, so BEGIN, the
idempotency read and the locking read of the accounts go in one, and the
writes (one statement: a data-modifying CTE per table) with the COMMIT in the
other. Keys and rows travel as one JSON document per table (encoded by msgspec
in C, expanded by jsonb_array_elements on the server) rather than as arrays
that psycopg would dump element by element in Python; the statements' texts
do not depend on the group's size, so psycopg prepares them once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec
import psycopg
from psycopg import errors as pg_errors

from money_plane.domain import AccountState, IdempotencyRecord
from money_plane.store import records as msgpack_records
from money_plane.store.base import (
    ACCOUNT_COLUMNS,
    SCHEMA,
    AccountEventEncoder,
    EventEncoder,
    GroupWrites,
    LedgerStore,
    StoreConflict,
    _account_from_row,
)
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.retry import RetryPolicy

T = TypeVar("T")
# bytes become base64 strings, which decode(..., 'base64') reads back.
_json = msgspec.json.Encoder()


def _keys_json(keys: Sequence[str]) -> str:
    return _json.encode(keys).decode()


# A JSON array of strings as a text[] the planner can drive an index scan with
# (jsonb_array_elements joined directly would be estimated at 100 rows).
_KEYS = "ANY(ARRAY(SELECT jsonb_array_elements_text(%s::jsonb)))"

_SELECT_IDEMPOTENCY = f"SELECT scope_key, body FROM idempotency WHERE scope_key = {_KEYS}"
_SELECT_USED_TOKENS = (
    f"SELECT token_key, fingerprint FROM decision_tokens WHERE token_key = {_KEYS}"
)
_SELECT_ACCOUNTS = f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_key = {_KEYS}"

# All of a group's plain-transfer writes in one statement. Each CTE writes a
# different table (or, for accounts, distinct rows), so their running on one
# snapshot changes nothing; jsonb_array_elements keeps the array's order, so
# postings and outbox events take their serial numbers in the order given.
_WRITE_GROUP = """
WITH acc_rows AS (
    SELECT (r->>0)::bigint AS dp, (r->>1)::bigint AS cp, (r->>2)::bigint AS dpe,
           (r->>3)::bigint AS cpe, r->>4 AS k
    FROM jsonb_array_elements(%(accounts)s::jsonb) AS r
), acc AS (
    UPDATE accounts AS a SET debits_posted = u.dp, credits_posted = u.cp,
        debits_pending = u.dpe, credits_pending = u.cpe
    FROM acc_rows AS u
    WHERE a.account_key = u.k AND a.account_key = ANY(ARRAY(SELECT k FROM acc_rows))
), ent AS (
    INSERT INTO entries (entry_key, tenant_id, idempotency_key, posted_at_us, body)
    SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, decode(r->>4, 'base64')
    FROM jsonb_array_elements(%(entries)s::jsonb) AS r
), pst AS (
    INSERT INTO postings (account_key, entry_id, side, amount_minor, currency, posted_at_us)
    SELECT r->>0, r->>1, (r->>2)::smallint, (r->>3)::bigint, r->>4, (r->>5)::bigint
    FROM jsonb_array_elements(%(postings)s::jsonb) AS r
), idem AS (
    INSERT INTO idempotency (scope_key, created_at_us, body)
    SELECT r->>0, (r->>1)::bigint, decode(r->>2, 'base64')
    FROM jsonb_array_elements(%(idempotency)s::jsonb) AS r
), tok AS (
    INSERT INTO decision_tokens (token_key, fingerprint, expires_at_us, used_at_us)
    SELECT r->>0, r->>1, (r->>2)::bigint, (r->>3)::bigint
    FROM jsonb_array_elements(%(used_tokens)s::jsonb) AS r
), obx AS (
    INSERT INTO outbox (event_id, subject, data, created_at_us)
    SELECT r->>0, r->>1, decode(r->>2, 'base64'), (r->>3)::bigint
    FROM jsonb_array_elements(%(outbox)s::jsonb) AS r
)
SELECT 1
"""

# What a lost race looks like, by SQLSTATE; each is retried by the one path
# (LedgerStore.commit_jobs, bounded by money.store.conflict_retry):
# 23505 unique_violation (two replicas inserting one key), 40001
# serialization_failure (a REPEATABLE READ or SERIALIZABLE transaction, the
# only isolation CockroachDB and YugabyteDB run by default, whose rows changed
# under it), 40P01 deadlock_detected, 55P03 lock_not_available.
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
    "decision_tokens": ("text", "text", "bigint", "bigint"),
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
        conflict_retry: RetryPolicy,
    ) -> None:
        super().__init__(encode_event, encode_account_event, default_hold_timeout_s, conflict_retry)
        self._dsn = dsn

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self._dsn, autocommit=False)

    @contextmanager
    def _transaction(self, pipeline: bool = False) -> Iterator[Any]:
        conn = self._conn()
        if conn.closed:
            conn = self._connect()
            self._local.conn = conn
        try:
            if pipeline:
                with conn.pipeline(), conn.transaction(), conn.cursor() as cur:
                    yield cur
            else:
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
        except _CONFLICTS as exc:
            # The SQLSTATE leads, so the retry's log line says which race it lost.
            raise StoreConflict(f"SQLSTATE {exc.sqlstate}: {exc}") from exc
        except psycopg.OperationalError:
            # A broken connection is replaced on the next transaction.
            conn.close()
            raise

    @contextmanager
    def _statement(self) -> Iterator[Any]:
        """A cursor on this thread's autocommit connection, for work that is
        one statement: it is its own transaction, so one round trip instead
        of three (BEGIN, the statement, COMMIT), and just as durable."""
        conn = getattr(self._local, "autocommit_conn", None)
        if conn is None or conn.closed:
            conn = psycopg.connect(self._dsn, autocommit=True)
            self._local.autocommit_conn = conn
        try:
            with conn.cursor() as cur:
                yield cur
        except psycopg.OperationalError:
            conn.close()
            raise

    def close(self) -> None:
        super().close()
        conn = getattr(self._local, "autocommit_conn", None)
        if conn is not None:
            conn.close()
            self._local.autocommit_conn = None

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

    # ---- the group commit: two round trips ----

    def _group_transaction(self) -> Any:
        return self._transaction(pipeline=True)

    def _load_idempotency_and_accounts(
        self, cur: Any, scopes: list[str], account_keys: list[str], token_keys: list[str]
    ) -> tuple[dict[str, IdempotencyRecord], dict[str, AccountState], dict[str, str]]:
        # Every statement is queued before any result is read: in pipeline
        # mode they travel (with the BEGIN) in one round trip.
        connection = cur.connection
        with connection.cursor() as accounts_cur, connection.cursor() as tokens_cur:
            if scopes:
                cur.execute(_SELECT_IDEMPOTENCY, (_keys_json(scopes),))
            if token_keys:
                tokens_cur.execute(_SELECT_USED_TOKENS, (_keys_json(token_keys),))
            if account_keys:
                accounts_cur.execute(
                    f"{_SELECT_ACCOUNTS} ORDER BY account_key FOR UPDATE",
                    (_keys_json(account_keys),),
                )
            decode = msgpack_records.decode
            records = (
                {row[0]: decode(row[1], IdempotencyRecord) for row in cur.fetchall()}
                if scopes
                else {}
            )
            used = {row[0]: row[1] for row in tokens_cur.fetchall()} if token_keys else {}
            accounts = (
                {f"{r[0]}/{r[1]}": _account_from_row(r) for r in accounts_cur.fetchall()}
                if account_keys
                else {}
            )
        return records, accounts, used

    def _load_used_tokens(self, cur: Any, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        cur.execute(_SELECT_USED_TOKENS, (_keys_json(keys),))
        return {row[0]: row[1] for row in cur.fetchall()}

    def _load_accounts(
        self, cur: Any, keys: list[str], lock: bool = False
    ) -> dict[str, AccountState]:
        if not keys:
            return {}
        suffix = " ORDER BY account_key FOR UPDATE" if lock else ""
        cur.execute(f"{_SELECT_ACCOUNTS}{suffix}", (_keys_json(keys),))
        return {f"{r[0]}/{r[1]}": _account_from_row(r) for r in cur.fetchall()}

    def _load_bodies(
        self, cur: Any, table: str, key_column: str, keys: list[str], cls: type[T], lock: bool
    ) -> dict[str, T]:
        if not keys:
            return {}
        suffix = f" ORDER BY {key_column} FOR UPDATE" if lock else ""
        cur.execute(
            f"SELECT {key_column}, body FROM {table} WHERE {key_column} = {_KEYS}{suffix}",
            (_keys_json(keys),),
        )
        return {row[0]: msgpack_records.decode(row[1], cls) for row in cur.fetchall()}

    def _apply_writes(self, cur: Any, writes: GroupWrites) -> None:
        encode = _json.encode
        cur.execute(
            _WRITE_GROUP,
            {
                "accounts": encode(writes.accounts).decode(),
                "entries": encode(writes.new_entries).decode(),
                "postings": encode(writes.postings).decode(),
                "idempotency": encode(writes.idempotency).decode(),
                "used_tokens": encode(writes.used_tokens).decode(),
                "outbox": encode(writes.outbox).decode(),
            },
        )
        self._apply_rare_writes(cur, writes)

    # ---- the outbox relay: one statement, one round trip each ----

    def unsent(self, limit: int) -> list[OutgoingEvent]:
        with self._statement() as cur:
            cur.execute(
                "SELECT event_id, subject, data FROM outbox WHERE sent_at_us IS NULL "
                "ORDER BY seq LIMIT %s",
                (limit,),
            )
            return [OutgoingEvent(r[0], r[1], r[2]) for r in cur.fetchall()]

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        if not event_ids:
            return
        with self._statement() as cur:
            cur.execute(
                f"UPDATE outbox SET sent_at_us = %s WHERE event_id = {_KEYS}",
                (now_us, _keys_json(event_ids)),
            )

    def delete_sent_before(self, before_us: int) -> int:
        with self._statement() as cur:
            cur.execute(
                "DELETE FROM outbox WHERE sent_at_us IS NOT NULL AND sent_at_us < %s",
                (before_us,),
            )
            return int(cur.rowcount or 0)
