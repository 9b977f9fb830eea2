"""Migrating a ledger database an earlier version created, in place, on start.

`LedgerStore.create_schema` calls `migrate` in the transaction that creates
the schema, before the CREATE ... IF NOT EXISTS statements: on PostgreSQL
under the storage layer's one migration lock (`triplane.runtime.db.
MIGRATION_LOCK`, a transaction-level advisory lock, so replicas starting
together migrate once and the others find the new schema), on SQLite inside
BEGIN IMMEDIATE (one writer). The migration commits with the schema or not at
all: a crash half-way leaves the old schema, migrated again on the next start.

The version is read from the tables themselves (no version table, which would
be one more table to key by tenant): no `outbox` table is a new database;
an `outbox` without `order_us` is version 1.

Version 1 -> 2 (every table and key led by tenant_id, no sequences): each of
the eight tables but `tenants` is renamed, created anew, copied and dropped,
since neither engine changes a primary key in place the same way (SQLite not
at all). What the copy derives:

- tenant_id of postings, idempotency and decision_tokens from their scoped
  key ("<tenant>/<id>"), of outbox events from their subject
  ("triplane.<plane>.<tenant>.<event>");
- each posting's number in its account (1, 2, ... in the order of the old
  global sequence), and the account's posting_seq (its postings' count), so
  the history reads in the same order and new postings continue it;
- the outbox order: the old events keep their sequence as order_pos under
  order_us = 0, so the unsent ones are relayed first and in their old order,
  and every later commit (order_us >= its clock) after them.

Additions to version 2 that only add tables (payouts: `beneficiaries` and
`payouts`) need no migration and no version: the CREATE ... IF NOT EXISTS
of the schema makes them on the next start, beside the existing tables.

It stops the world for as long as the copy takes (proportional to the
ledger's size): the plane's replicas must all run the new version, since the
old one cannot write the new tables.
"""

from __future__ import annotations

from typing import Any

# The tables version 2 re-keys, in an order that copies accounts' posting
# counts before their postings are dropped.
_REKEYED = (
    "accounts",
    "entries",
    "postings",
    "holds",
    "reserves",
    "idempotency",
    "decision_tokens",
    "outbox",
)

_COPY_V1 = {
    "accounts": (
        "INSERT INTO accounts (tenant_id, account_key, account_id, currency, kind, "
        "constraint_kind, overdraft_limit_minor, metadata, created_at_us, debits_posted, "
        "credits_posted, debits_pending, credits_pending, posting_seq, event_order_us) "
        "SELECT a.tenant_id, a.account_key, a.account_id, a.currency, a.kind, "
        "a.constraint_kind, a.overdraft_limit_minor, a.metadata, a.created_at_us, "
        "a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending, "
        "COALESCE(c.n, 0), 0 FROM accounts_v1 AS a LEFT JOIN "
        "(SELECT account_key, COUNT(*) AS n FROM postings_v1 GROUP BY account_key) AS c "
        "ON c.account_key = a.account_key"
    ),
    "entries": (
        "INSERT INTO entries (tenant_id, entry_key, idempotency_key, posted_at_us, body) "
        "SELECT tenant_id, entry_key, idempotency_key, posted_at_us, body FROM entries_v1"
    ),
    "postings": (
        "INSERT INTO postings (tenant_id, account_key, seq, entry_id, side, amount_minor, "
        "currency, posted_at_us) "
        "SELECT split_part(account_key, '/', 1), account_key, "
        "ROW_NUMBER() OVER (PARTITION BY account_key ORDER BY seq), "
        "entry_id, side, amount_minor, currency, posted_at_us FROM postings_v1"
    ),
    "holds": (
        "INSERT INTO holds (tenant_id, hold_key, state, expires_at_us, body) "
        "SELECT tenant_id, hold_key, state, expires_at_us, body FROM holds_v1"
    ),
    "reserves": (
        "INSERT INTO reserves (tenant_id, reserve_key, release_at_us, released, body) "
        "SELECT tenant_id, reserve_key, release_at_us, released, body FROM reserves_v1"
    ),
    "idempotency": (
        "INSERT INTO idempotency (tenant_id, scope_key, created_at_us, body) "
        "SELECT split_part(scope_key, '/', 1), scope_key, created_at_us, body "
        "FROM idempotency_v1"
    ),
    "decision_tokens": (
        "INSERT INTO decision_tokens (tenant_id, token_key, fingerprint, expires_at_us, "
        "used_at_us) SELECT split_part(token_key, '/', 1), token_key, fingerprint, "
        "expires_at_us, used_at_us FROM decision_tokens_v1"
    ),
    "outbox": (
        "INSERT INTO outbox (tenant_id, event_id, subject, data, created_at_us, order_us, "
        "order_pos, sent_at_us) SELECT split_part(subject, '.', 3), event_id, subject, data, "
        "created_at_us, 0, seq, sent_at_us FROM outbox_v1"
    ),
}

CURRENT_VERSION = 2


def _columns(cur: Any, dialect: str, table: str) -> set[str]:
    if dialect == "sqlite":
        cur.execute(f"PRAGMA table_info({table})")
        return {row[1] for row in cur.fetchall()}
    cur.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s",
        (table,),
    )
    return {row[0] for row in cur.fetchall()}


def schema_version(cur: Any, dialect: str) -> int | None:
    """The version of the ledger schema in the database; None if it has none."""
    columns = _columns(cur, dialect, "outbox")
    if not columns:
        return None
    return CURRENT_VERSION if "order_us" in columns else 1


def migrate(cur: Any, dialect: str, schema: list[str]) -> int | None:
    """Brings the database's schema to the current version (`schema`, the
    statements that create it); returns the version it found."""
    found = schema_version(cur, dialect)
    if found == 1:
        _v1_to_v2(cur, dialect, schema)
    return found


def _split_part(text: str, separator: str, index: int) -> str:
    """PostgreSQL's split_part, for SQLite."""
    parts = text.split(separator)
    return parts[index - 1] if 0 < index <= len(parts) else ""


def _v1_to_v2(cur: Any, dialect: str, schema: list[str]) -> None:
    if dialect == "sqlite":
        cur.connection.create_function("split_part", 3, _split_part, deterministic=True)
    old = [f"{table}_v1" for table in _REKEYED]
    for table in _REKEYED:
        cur.execute(f"ALTER TABLE {table} RENAME TO {table}_v1")
    # The old indexes' names are the new ones' (the old tables keep them when
    # renamed): renamed out of the way on PostgreSQL, where a primary key's
    # index cannot be dropped alone, dropped on SQLite, which renames its own
    # key indexes (sqlite_autoindex_<table>_N) with the table.
    if dialect == "sqlite":
        marks = ", ".join("?" * len(old))
        cur.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' "
            f"AND tbl_name IN ({marks}) AND name NOT LIKE 'sqlite_autoindex_%'",
            old,
        )
        for (name,) in cur.fetchall():
            cur.execute(f'DROP INDEX "{name}"')
    else:
        cur.execute(
            "SELECT indexname FROM pg_indexes "
            "WHERE schemaname = current_schema() AND tablename = ANY(%s)",
            (old,),
        )
        for (name,) in cur.fetchall():
            cur.execute(f'ALTER INDEX "{name}" RENAME TO "{name}_v1"')
    for statement in schema:
        cur.execute(statement)
    for table in _REKEYED:
        cur.execute(_COPY_V1[table])
    # Dropping the old tables drops their sequences (postings.seq, outbox.seq).
    for name in reversed(old):
        cur.execute(f"DROP TABLE {name}")
