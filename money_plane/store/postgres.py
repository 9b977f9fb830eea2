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
do not depend on the group's size, so psycopg prepares the writes once. The
reads by key are planned at each execution instead (see `_by_keys`).
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
    AccountEventEncoder,
    EventEncoder,
    GroupWrites,
    LedgerStore,
    StoreConflict,
    _account_from_row,
)
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.db import MIGRATION_LOCK
from triplane.runtime.retry import RetryPolicy

T = TypeVar("T")
# bytes become base64 strings, which decode(..., 'base64') reads back.
_json = msgspec.json.Encoder()


def _keys_json(keys: Sequence[str]) -> str:
    return _json.encode(keys).decode()


# A JSON array of strings as a text[] the planner can drive an index scan with
# (jsonb_array_elements joined directly would be estimated at 100 rows).
_KEYS = "ANY(ARRAY(SELECT jsonb_array_elements_text(%s::jsonb)))"


def _by_keys(column: str, keys: Sequence[str]) -> tuple[str, tuple[str, str]]:
    """The condition selecting rows by scoped keys, with its parameters: the
    keys' tenant_id (their prefix) and the keys, so an index scan of the
    primary key (tenant_id, key), routed by tenant on a distributed engine.
    A key names its tenant, so exactly the keys' rows.

    One tenant (a group's usual case) is an equality, not `= ANY`. And these
    lookups are planned at each execution, never prepared: the primary key
    also serves "the tenant's whole range, keys filtered", a plan the planner
    rightly picks while a table is nearly empty and, prepared, would keep as
    the table grows (every lookup then read all of a tenant's rows; version
    1's key-only index had no such plan, except for decision_tokens, whose
    prepared plan was a sequential scan)."""
    tenants = sorted({key.partition("/")[0] for key in keys})
    keys_json = _json.encode(keys).decode()
    if len(tenants) == 1:
        return f"tenant_id = %s AND {column} = {_KEYS}", (tenants[0], keys_json)
    return f"tenant_id = {_KEYS} AND {column} = {_KEYS}", (
        _json.encode(tenants).decode(),
        keys_json,
    )


def _select_idempotency(scopes: Sequence[str]) -> tuple[str, tuple[str, str]]:
    where, params = _by_keys("scope_key", scopes)
    return f"SELECT scope_key, body FROM idempotency WHERE {where}", params


def _select_used_tokens(keys: Sequence[str]) -> tuple[str, tuple[str, str]]:
    where, params = _by_keys("token_key", keys)
    return f"SELECT token_key, fingerprint FROM decision_tokens WHERE {where}", params


def _select_accounts(keys: Sequence[str], suffix: str) -> tuple[str, tuple[str, str]]:
    where, params = _by_keys("account_key", keys)
    return f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE {where}{suffix}", params


# All of a group's plain-transfer writes in one statement. Each CTE writes a
# different table (or, for accounts, distinct rows), so their running on one
# snapshot changes nothing. Every number (a posting's, an event's order) is
# in the rows: nothing is drawn from a sequence.
_WRITE_GROUP = """
WITH acc_rows AS (
    SELECT (r->>0)::bigint AS dp, (r->>1)::bigint AS cp, (r->>2)::bigint AS dpe,
           (r->>3)::bigint AS cpe, (r->>4)::bigint AS ps, (r->>5)::bigint AS eo,
           r->>6 AS t, r->>7 AS k
    FROM jsonb_array_elements(%(accounts)s::jsonb) AS r
), acc AS (
    UPDATE accounts AS a SET debits_posted = u.dp, credits_posted = u.cp,
        debits_pending = u.dpe, credits_pending = u.cpe, posting_seq = u.ps,
        event_order_us = u.eo
    FROM acc_rows AS u
    WHERE a.tenant_id = u.t AND a.account_key = u.k AND {tenant_condition}
        AND a.account_key = ANY(ARRAY(SELECT k FROM acc_rows))
), ent AS (
    INSERT INTO entries (tenant_id, entry_key, idempotency_key, posted_at_us, body)
    SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, decode(r->>4, 'base64')
    FROM jsonb_array_elements(%(entries)s::jsonb) AS r
), pst AS (
    INSERT INTO postings (tenant_id, account_key, seq, entry_id, side, amount_minor,
        currency, posted_at_us)
    SELECT r->>0, r->>1, (r->>2)::bigint, r->>3, (r->>4)::smallint, (r->>5)::bigint,
        r->>6, (r->>7)::bigint
    FROM jsonb_array_elements(%(postings)s::jsonb) AS r
), idem AS (
    INSERT INTO idempotency (tenant_id, scope_key, created_at_us, body)
    SELECT r->>0, r->>1, (r->>2)::bigint, decode(r->>3, 'base64')
    FROM jsonb_array_elements(%(idempotency)s::jsonb) AS r
), tok AS (
    INSERT INTO decision_tokens (tenant_id, token_key, fingerprint, expires_at_us, used_at_us)
    SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, (r->>4)::bigint
    FROM jsonb_array_elements(%(used_tokens)s::jsonb) AS r
), obx AS (
    INSERT INTO outbox (tenant_id, event_id, subject, data, created_at_us, order_us, order_pos)
    SELECT r->>0, r->>1, r->>2, decode(r->>3, 'base64'), (r->>4)::bigint, (r->>5)::bigint,
        (r->>6)::bigint
    FROM jsonb_array_elements(%(outbox)s::jsonb) AS r
)
SELECT 1
"""
# The group's accounts: one tenant's by equality (see _by_keys), or several.
_WRITE_ONE_TENANT = _WRITE_GROUP.replace("{tenant_condition}", "a.tenant_id = %(tenant)s")
_WRITE_TENANTS = _WRITE_GROUP.replace(
    "{tenant_condition}", "a.tenant_id = ANY(ARRAY(SELECT DISTINCT t FROM acc_rows))"
)

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
    "postings": ("text", "text", "bigint", "text", "smallint", "bigint", "text", "bigint"),
    "holds": ("text", "text", "smallint", "bigint", "bytea"),
    "reserves": ("text", "text", "bigint", "smallint", "bytea"),
    "idempotency": ("text", "text", "bigint", "bytea"),
    "decision_tokens": ("text", "text", "text", "bigint", "bigint"),
    "outbox": ("text", "text", "text", "bytea", "bigint", "bigint", "bigint"),
}


class PostgresLedgerStore(LedgerStore):
    placeholder = "%s"
    blob_type = "BYTEA"
    dialect = "postgres"
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

    def _lock_schema(self, cur: Any) -> None:
        # Concurrent start-ups of several replicas must not race on DDL or
        # migrate twice: the storage layer's one migration lock, held until
        # this transaction commits.
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))

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

    def _update_accounts(
        self, cur: Any, rows: list[tuple[int, int, int, int, int, int, str, str]]
    ) -> None:
        if len(rows) < 4:
            super()._update_accounts(cur, rows)
            return
        arrays = [list(column) for column in zip(*rows, strict=True)]
        cur.execute(
            "UPDATE accounts AS a SET debits_posted = u.dp, credits_posted = u.cp, "
            "debits_pending = u.dpe, credits_pending = u.cpe, posting_seq = u.ps, "
            "event_order_us = u.eo "
            "FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], "
            "%s::bigint[], %s::bigint[], %s::text[], %s::text[]) "
            "AS u(dp, cp, dpe, cpe, ps, eo, t, k) WHERE a.tenant_id = u.t AND a.account_key = u.k",
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
                cur.execute(*_select_idempotency(scopes), prepare=False)
            if token_keys:
                tokens_cur.execute(*_select_used_tokens(token_keys), prepare=False)
            if account_keys:
                accounts_cur.execute(
                    *_select_accounts(account_keys, " ORDER BY account_key FOR UPDATE"),
                    prepare=False,
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
        cur.execute(*_select_used_tokens(keys), prepare=False)
        return {row[0]: row[1] for row in cur.fetchall()}

    def _load_accounts(
        self, cur: Any, keys: list[str], lock: bool = False
    ) -> dict[str, AccountState]:
        if not keys:
            return {}
        suffix = " ORDER BY account_key FOR UPDATE" if lock else ""
        cur.execute(*_select_accounts(keys, suffix), prepare=False)
        return {f"{r[0]}/{r[1]}": _account_from_row(r) for r in cur.fetchall()}

    def _load_bodies(
        self, cur: Any, table: str, key_column: str, keys: list[str], cls: type[T], lock: bool
    ) -> dict[str, T]:
        if not keys:
            return {}
        suffix = f" ORDER BY {key_column} FOR UPDATE" if lock else ""
        where, params = _by_keys(key_column, keys)
        cur.execute(
            f"SELECT {key_column}, body FROM {table} WHERE {where}{suffix}", params, prepare=False
        )
        return {row[0]: msgpack_records.decode(row[1], cls) for row in cur.fetchall()}

    def _apply_writes(self, cur: Any, writes: GroupWrites) -> None:
        encode = _json.encode
        tenants = {row[6] for row in writes.accounts}
        cur.execute(
            _WRITE_ONE_TENANT if len(tenants) == 1 else _WRITE_TENANTS,
            {
                "tenant": min(tenants, default=""),
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
                "SELECT tenant_id, event_id, subject, data FROM outbox "
                "WHERE sent_at_us IS NULL ORDER BY order_us, order_pos, event_id LIMIT %s",
                (limit,),
            )
            rows = cur.fetchall()
        self._remember_tenants(rows)
        return [OutgoingEvent(r[1], r[2], r[3]) for r in rows]

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        if not event_ids:
            return
        tenants = self._tenants_of_events(event_ids)
        with self._statement() as cur:
            if tenants is None:
                cur.execute(
                    f"UPDATE outbox SET sent_at_us = %s WHERE event_id = {_KEYS}",
                    (now_us, _keys_json(event_ids)),
                )
            elif len(tenants) == 1:
                cur.execute(
                    "UPDATE outbox SET sent_at_us = %s "
                    f"WHERE tenant_id = %s AND event_id = {_KEYS}",
                    (now_us, tenants[0], _keys_json(event_ids)),
                )
            else:
                # One statement per tenant (see _by_keys); each is its own
                # transaction, and an event left unmarked by a crash between
                # them is published again, which JetStream drops by its id.
                by_tenant: dict[str, list[str]] = {}
                with self._unsent_lock:
                    known = dict(self._unsent_tenants)
                for event_id in event_ids:
                    by_tenant.setdefault(known[event_id], []).append(event_id)
                for tenant, ids in sorted(by_tenant.items()):
                    cur.execute(
                        "UPDATE outbox SET sent_at_us = %s "
                        f"WHERE tenant_id = %s AND event_id = {_KEYS}",
                        (now_us, tenant, _keys_json(ids)),
                    )

    def delete_sent_before(self, before_us: int) -> int:
        with self._statement() as cur:
            cur.execute(
                "DELETE FROM outbox WHERE sent_at_us IS NOT NULL AND sent_at_us < %s",
                (before_us,),
            )
            return int(cur.rowcount or 0)
