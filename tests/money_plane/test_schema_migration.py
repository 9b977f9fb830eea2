"""Migration in place: a ledger database written by schema version 1 (every
table keyed by "<tenant>/<id>" text, postings and outbox numbered by global
sequences) is migrated to version 2 (every table and key led by tenant_id, no
sequences) when the store starts, on both backends, and everything the
ledger answered before it answers after: balances, each account's history in
the same order (renumbered 1, 2, ... per account), holds, reserves, the
answers to retried requests (idempotency), and the outbox (what was relayed
stays relayed; what was not is relayed first, in its old order).

The version-1 database is the one `data/make_ledger_v1.py` wrote with the
version-1 code (commit 3b7ec3a): its tables' rows are in `data/ledger_v1.json`
with what that version answered about them, and are loaded here into tables
made by version 1's own DDL (below, as that commit had it)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from money_helpers import BACKENDS, DbProbe, Kit, ledger_config, make_ledger, make_store

from money_plane import codec
from money_plane.domain import Command, Side
from money_plane.store import migration
from triplane.runtime import codec as wire
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.tokens import TokenSigner, private_key_from_b64

DATA = json.loads((Path(__file__).parent / "data" / "ledger_v1.json").read_text())
# Tables version 2 gained later, made empty on the start that migrates.
ADDED_TO_V2 = {"beneficiaries", "payouts", "settlement_schedules", "settlements"}
TENANTS = ("acme", "beta-2")
BLOBS = {"body", "data"}

# Version 1's DDL, verbatim (money_plane/store/base.py at 3b7ec3a).
V1_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tenants (
        tenant_id TEXT PRIMARY KEY, display_name TEXT NOT NULL, created_at_us BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS accounts (
        account_key TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, account_id TEXT NOT NULL,
        currency TEXT NOT NULL, kind INTEGER NOT NULL, constraint_kind INTEGER NOT NULL,
        overdraft_limit_minor BIGINT NOT NULL, metadata TEXT NOT NULL,
        created_at_us BIGINT NOT NULL,
        debits_posted BIGINT NOT NULL DEFAULT 0, credits_posted BIGINT NOT NULL DEFAULT 0,
        debits_pending BIGINT NOT NULL DEFAULT 0, credits_pending BIGINT NOT NULL DEFAULT 0,
        CHECK (debits_posted >= 0 AND credits_posted >= 0
               AND debits_pending >= 0 AND credits_pending >= 0))""",
    "CREATE INDEX IF NOT EXISTS accounts_by_tenant ON accounts (tenant_id, account_key)",
    """CREATE TABLE IF NOT EXISTS entries (
        entry_key TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, idempotency_key TEXT NOT NULL,
        posted_at_us BIGINT NOT NULL, body {blob} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS entries_by_idempotency_key ON entries (tenant_id, idempotency_key)",
    """CREATE TABLE IF NOT EXISTS postings (
        seq {serial}, account_key TEXT NOT NULL, entry_id TEXT NOT NULL,
        side SMALLINT NOT NULL, amount_minor BIGINT NOT NULL, currency TEXT NOT NULL,
        posted_at_us BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS postings_by_account ON postings (account_key, seq)",
    "CREATE INDEX IF NOT EXISTS postings_by_time ON postings (account_key, posted_at_us)",
    """CREATE TABLE IF NOT EXISTS holds (
        hold_key TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, state SMALLINT NOT NULL,
        expires_at_us BIGINT NOT NULL, body {blob} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS holds_pending ON holds (expires_at_us) WHERE state = 1",
    """CREATE TABLE IF NOT EXISTS reserves (
        reserve_key TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, release_at_us BIGINT NOT NULL,
        released SMALLINT NOT NULL, body {blob} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS reserves_due ON reserves (release_at_us) WHERE released = 0",
    """CREATE TABLE IF NOT EXISTS idempotency (
        scope_key TEXT PRIMARY KEY, created_at_us BIGINT NOT NULL, body {blob} NOT NULL)""",
    # Decision token ids spent (tenant/jti), each with the fingerprint of the
    # transfer it was spent on; kept until money.tokens.used_retention_s past
    # the token's expiry. The primary key is what stops two replicas spending
    # one token at once: the second commit conflicts, retries, and sees it.
    """CREATE TABLE IF NOT EXISTS decision_tokens (
        token_key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
        expires_at_us BIGINT NOT NULL, used_at_us BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS decision_tokens_by_expiry ON decision_tokens (expires_at_us)",
    """CREATE TABLE IF NOT EXISTS outbox (
        seq {serial}, event_id TEXT NOT NULL UNIQUE, subject TEXT NOT NULL,
        data {blob} NOT NULL, created_at_us BIGINT NOT NULL, sent_at_us BIGINT)""",
    "CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (seq) WHERE sent_at_us IS NULL",
]


def _v1_database(backend: str, where: Path | str) -> None:
    """Version 1's tables, with the rows version 1 wrote."""
    if backend == "sqlite":
        blob, serial, mark = "BLOB", "INTEGER PRIMARY KEY AUTOINCREMENT", "?"
    else:
        blob, serial, mark = "BYTEA", "BIGSERIAL PRIMARY KEY", "%s"
    statements = [s.format(blob=blob, serial=serial) for s in V1_SCHEMA]
    inserts: list[tuple[str, list[list[Any]]]] = []
    for table, content in DATA["tables"].items():
        columns = content["columns"]
        rows = [
            [
                bytes.fromhex(value) if column in BLOBS else value
                for column, value in zip(columns, row, strict=True)
            ]
            for row in content["rows"]
        ]
        marks = ", ".join([mark] * len(columns))
        inserts.append((f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows))
    if backend == "sqlite":
        conn = sqlite3.connect(str(where))
        with conn:
            for statement in statements:
                conn.execute(statement)
            for sql, rows in inserts:
                conn.executemany(sql, rows)
        conn.close()
        return
    with psycopg.connect(str(where)) as pg, pg.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
        for sql, rows in inserts:
            cur.executemany(sql, rows)
        # As version 1 left them: the sequences past the rows.
        cur.execute("SELECT setval('postings_seq_seq', (SELECT MAX(seq) FROM postings))")
        cur.execute("SELECT setval('outbox_seq_seq', (SELECT MAX(seq) FROM outbox))")


def _place(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path | str:
    if backend == "sqlite":
        return tmp_path / "ledger.db"
    if backend == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        return dsn
    raise AssertionError(backend)


def _tables(probe: DbProbe) -> set[str]:
    if probe.backend == "sqlite":
        rows = probe.rows("SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = probe.rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    return {r[0] for r in rows if r[0] != "sqlite_sequence"}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_version_1_database_is_migrated_in_place_and_answers_as_before(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        request.applymarker(pytest.mark.postgres)
    where = _place(backend, tmp_path, request)
    _v1_database(backend, where)
    signer = TokenSigner(private_key_from_b64(DATA["signer_key"]))
    clock = ManualClock(DATA["clock_us"])
    config = ledger_config(tmp_path / "state", signer)
    ledger = make_ledger(backend, where, config, signer, clock)
    probe = DbProbe(backend, where)
    expected = DATA["expected"]
    try:
        await ledger.start(sweepers=False)
        assert _tables(probe) == set(DATA["tables"]) | ADDED_TO_V2
        if backend == "postgres":
            assert probe.rows("SELECT sequence_name FROM information_schema.sequences") == []
        assert probe.scalar("SELECT COUNT(*) FROM postings") == len(
            DATA["tables"]["postings"]["rows"]
        )

        for tenant in TENANTS:
            # Balances.
            for account_id, counters in expected["balances"][tenant].items():
                account = await ledger.get_account(tenant, account_id)
                assert list(account.counters()) == counters, (tenant, account_id)
            # Each account's history: the same postings in the same order,
            # numbered 1, 2, ... in the account, read in pages of 3.
            for account_id, history in expected["history"][tenant].items():
                rows = []
                after = 0
                while True:
                    page = await ledger.list_postings(tenant, account_id, 3, after)
                    rows.extend(page)
                    if len(page) < 3:
                        break
                    after = page[-1].sequence
                assert [
                    [r.entry_id, r.side, r.amount_minor, r.currency, r.posted_at_us] for r in rows
                ] == history, (tenant, account_id)
                assert [r.sequence for r in rows] == list(range(1, len(history) + 1))
            # Holds and reserves.
            for hold_id, state in expected["holds"][tenant].items():
                assert (await ledger.get_hold(tenant, hold_id)).state == state
            assert {
                reserve_id: [release_at, int(released)]
                for reserve_id, (release_at, released) in probe.reserves(tenant).items()
            } == expected["reserves"][tenant]
            assert (await ledger.check_balanced(tenant)).balanced
            assert probe.invariant_problems(tenant) == []

        # The outbox: what was relayed stays relayed, the rest comes first,
        # in version 1's order.
        unsent = [event_id for event_id, sent in expected["outbox_order"] if not sent]
        assert len(unsent) > 0
        assert [e.event_id for e in ledger.store.unsent(1_000)] == unsent

        # Retried requests get the answers they got before.
        entries_before = probe.entry_count("acme")
        for replay in DATA["replays"]:
            command = msgspec.json.decode(json.dumps(replay["command"]), type=Command)
            [outcome] = await ledger.submit(command.tenant_id, [command])
            assert outcome.error is None, outcome.error
            assert outcome.replayed, replay["command"]
            assert (outcome.entry.entry_id if outcome.entry else "") == replay["entry_id"]
            assert (outcome.hold.hold_id if outcome.hold else "") == replay["hold_id"]
        assert probe.entry_count("acme") == entries_before

        # New work continues each account's numbering, and its events are
        # relayed after every event version 1 left unsent.
        history = expected["history"]["acme"]["alice"]
        kit = Kit(ledger, clock, signer, backend, where, "acme")
        await kit.ok(kit.move("after-migration", "alice", "merchant", 10))
        kit.probe.close()
        rows = await ledger.list_postings("acme", "alice", 100, len(history))
        assert [(r.sequence, r.side, r.amount_minor) for r in rows] == [
            (len(history) + 1, Side.DEBIT, 10)
        ]
        relayed = [e.event_id for e in ledger.store.unsent(1_000)]
        assert relayed[: len(unsent)] == unsent
        assert len(relayed) == len(unsent) + 1
        assert (await ledger.check_balanced("acme")).balanced
    finally:
        probe.close()
        await ledger.stop()

    # Starting again finds version 2 and changes nothing.
    again = make_store(backend, where, config)
    try:
        again.create_schema()
        assert len(again.list_postings("acme", "alice", 0, 100)) == len(history) + 1
    finally:
        again.close()


@pytest.mark.postgres
def test_replicas_starting_together_migrate_once(pg_dsn: str, tmp_path: Path) -> None:
    """Four stores start on one version-1 database at once: the migration
    lock lets one migrate; the others wait, then find version 2."""
    _v1_database("postgres", pg_dsn)
    config = ledger_config(
        tmp_path / "state", TokenSigner(private_key_from_b64(DATA["signer_key"]))
    )
    stores = [make_store("postgres", pg_dsn, config) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def start(store: Any) -> None:
        barrier.wait()
        try:
            store.create_schema()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for store in stores:
        store.close()
    assert errors == []
    probe = DbProbe("postgres", pg_dsn)
    try:
        assert probe.scalar("SELECT COUNT(*) FROM postings") == len(
            DATA["tables"]["postings"]["rows"]
        )
        assert probe.scalar("SELECT COUNT(*) FROM outbox") == len(DATA["tables"]["outbox"]["rows"])
        assert "postings_v1" not in _tables(probe)
    finally:
        probe.close()


def test_a_page_token_of_the_global_sequence_is_refused_saying_why() -> None:
    """A ListAccountPostings token issued before the migration names a number
    of the global sequence, which no longer exists: refused with its own
    reason, while a token of today's kind resumes where it says."""
    old = wire.encode_page_token(codec.GLOBAL_POSTINGS_PAGE, (17,))
    with pytest.raises(InvalidArgument) as refused:
        codec.postings_position(old)
    assert refused.value.reason == wire.PAGE_TOKEN_INVALID
    assert "before postings were numbered per account" in refused.value.message
    with pytest.raises(InvalidArgument) as garbled:
        codec.postings_position("not-a-token")
    assert "before postings" not in garbled.value.message
    assert codec.postings_position(wire.encode_page_token(codec.POSTINGS_PAGE, (5,))) == 5
    assert codec.postings_position("") == 0


def test_the_version_is_read_from_the_tables(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "v.db")
    cur = conn.cursor()
    assert migration.schema_version(cur, "sqlite") is None
    conn.close()
    _v1_database("sqlite", tmp_path / "v.db")
    conn = sqlite3.connect(tmp_path / "v.db")
    assert migration.schema_version(conn.cursor(), "sqlite") == 1
    conn.close()
