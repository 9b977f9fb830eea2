"""The ledger schema's distribution readiness, read from PostgreSQL's catalog
(the schema the store creates, not a copy of it), so the audit in the README
(money plane, "The ledger past one database") cannot drift from the tables:
which primary keys (and unique indexes) lead with tenant_id, which tables have
no tenant_id column, and which sequences the schema uses. A table added or re-keyed changes these
sets and fails here until the README says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from money_helpers import DbProbe, ledger_config, make_store, new_signer

pytestmark = pytest.mark.postgres

TABLES = {
    "tenants",
    "accounts",
    "entries",
    "postings",
    "holds",
    "reserves",
    "idempotency",
    "decision_tokens",
    "outbox",
    # Payouts (money_plane/payouts).
    "beneficiaries",
    "payouts",
    "settlement_schedules",
    "settlements",
}
# Primary keys led by tenant_id (the README's "yes" rows): every table's.
LED_BY_TENANT = TABLES
# Tables with no tenant_id column at all.
NO_TENANT_COLUMN: set[str] = set()
SEQUENCES: set[str] = set()


def test_schema_audit_matches_the_readme(pg_dsn: str, tmp_path: Path) -> None:
    store = make_store("postgres", pg_dsn, ledger_config(tmp_path, new_signer()))
    store.create_schema()
    store.close()
    probe = DbProbe("postgres", pg_dsn)
    try:
        tables = {
            r[0]
            for r in probe.rows(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
        assert tables == TABLES
        first_key_column = {
            r[0]: r[1]
            for r in probe.rows(
                "SELECT tc.table_name, kcu.column_name "
                "FROM information_schema.table_constraints tc "
                "JOIN information_schema.key_column_usage kcu "
                "ON kcu.constraint_name = tc.constraint_name AND kcu.table_name = tc.table_name "
                "WHERE tc.table_schema = 'public' AND tc.constraint_type = 'PRIMARY KEY' "
                "AND kcu.ordinal_position = 1"
            )
        }
        assert set(first_key_column) == TABLES
        assert {t for t, c in first_key_column.items() if c == "tenant_id"} == LED_BY_TENANT
        # Citus refuses a unique index (a constraint's or not) that does not
        # include the distribution column; every one here leads with it.
        unique_first_column = {
            (r[0], r[1]): r[2]
            for r in probe.rows(
                "SELECT t.relname, i.relname, a.attname FROM pg_index x "
                "JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid "
                "JOIN pg_namespace n ON n.oid = t.relnamespace "
                "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = x.indkey[0] "
                "WHERE n.nspname = 'public' AND x.indisunique"
            )
        }
        assert {table for table, _ in unique_first_column} == TABLES
        assert {
            index: column for index, column in unique_first_column.items() if column != "tenant_id"
        } == {}
        with_tenant = {
            r[0]
            for r in probe.rows(
                "SELECT table_name FROM information_schema.columns "
                "WHERE table_schema = 'public' AND column_name = 'tenant_id'"
            )
        }
        assert TABLES - with_tenant == NO_TENANT_COLUMN
        sequences = {
            r[0]
            for r in probe.rows(
                "SELECT sequence_name FROM information_schema.sequences "
                "WHERE sequence_schema = 'public'"
            )
        }
        assert sequences == SEQUENCES
    finally:
        probe.close()
