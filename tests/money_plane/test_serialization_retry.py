"""SQLSTATE 40001 (serialization_failure) on real PostgreSQL: the ledger's one
conflict-retry path (money.store.conflict_retry) takes it like a deadlock or a
unique violation, so the transfer commits exactly once after the retry.

CockroachDB and YugabyteDB run every transaction SERIALIZABLE and answer a
lost race with 40001; neither server can be installed here, so the failure is
made on PostgreSQL itself: the ledger's connections run SERIALIZABLE (libpq
`options`), and a competing transaction from the test updates the account the
ledger's group commit is waiting to lock. When the competitor commits, the
ledger's SELECT ... FOR UPDATE finds a row changed since its snapshot and
PostgreSQL fails the transaction with 40001 ("could not serialize access due
to concurrent update"). No mocks: the failure and the retry are the server's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest
from money_helpers import (
    NO_CONSTRAINT,
    DbProbe,
    Kit,
    ledger_config,
    make_ledger,
    spec,
    unique_tenant,
)

from money_plane.domain import Command, Outcome, Side
from triplane.runtime.clock import ManualClock
from triplane.runtime.tokens import TokenSigner

pytestmark = pytest.mark.postgres
T = TypeVar("T")

SERIALIZABLE = " options='-c default_transaction_isolation=serializable'"
# A bound on waiting for the ledger to queue behind the competitor's lock, so a
# broken test fails instead of hanging; not a timing assertion.
LOCK_WAIT_POLLS = 2_000


async def _kit(pg_dsn: str, tmp_path: Path, signer: TokenSigner, attempts: int) -> Kit:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    config = ledger_config(
        state_dir,
        signer,
        store={
            "conflict_retry": {
                "initial_interval_s": 0.001,
                "maximum_interval_s": 0.05,
                "maximum_attempts": attempts,
            }
        },
    )
    clock = ManualClock()
    ledger = make_ledger("postgres", pg_dsn + SERIALIZABLE, config, signer, clock)
    await ledger.start(sweepers=False)
    tenant = unique_tenant()
    await ledger.create_tenant(tenant, "Serializable tenant")
    # The probe reads at the server's default (READ COMMITTED), on its own connection.
    kit = Kit(ledger, clock, signer, "postgres", pg_dsn, tenant)
    await kit.open(("bank", "USD", NO_CONSTRAINT, 0), ("alice", "USD", NO_CONSTRAINT, 0))
    return kit


async def _across_competitor(
    pg_dsn: str, competing_sql: str, params: tuple[object, ...], work: Awaitable[T]
) -> T:
    """Runs `work` while another transaction holds the rows `competing_sql`
    writes; commits that transaction once the ledger is waiting for them."""
    probe = DbProbe("postgres", pg_dsn)
    with psycopg.connect(pg_dsn, autocommit=False) as competitor:
        competitor.execute(competing_sql, params)
        started = asyncio.ensure_future(work)
        waiting = 0
        for _ in range(LOCK_WAIT_POLLS):
            waiting = probe.scalar(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            if waiting or started.done():
                break
            await asyncio.sleep(0.005)
        assert not started.done(), "the ledger did not wait for the competitor's rows"
        assert waiting == 1, "the ledger never queued behind the competitor's rows"
        competitor.commit()
    probe.close()
    return await started


async def _submit_across_competitor(kit: Kit, pg_dsn: str, command: Command) -> list[Outcome]:
    """Submits `command` while another transaction has updated the bank account."""
    return await _across_competitor(
        pg_dsn,
        "UPDATE accounts SET metadata = metadata WHERE account_key = %s",
        (f"{kit.tenant}/bank",),
        kit.ledger.submit(kit.tenant, [command]),
    )


async def test_serialization_failure_is_retried_and_commits_once(
    pg_dsn: str, tmp_path: Path, signer: TokenSigner, caplog: pytest.LogCaptureFixture
) -> None:
    kit = await _kit(pg_dsn, tmp_path, signer, attempts=4)
    try:
        caplog.set_level(logging.INFO, logger="triplane.money.store")
        outcomes = await _submit_across_competitor(
            kit, pg_dsn, kit.move("k1", "bank", "alice", 700)
        )
        assert outcomes[0].ok and outcomes[0].entry is not None, outcomes

        # The first attempt failed with 40001 and was retried by the conflict path.
        retries = [r.getMessage() for r in caplog.records if "lost a race" in r.getMessage()]
        assert len(retries) == 1, retries
        assert "SQLSTATE 40001" in retries[0] and "attempt 1 of 4" in retries[0], retries

        # Exactly once: one entry, one idempotency record, two postings, the
        # counters moved once, the books balance.
        assert kit.probe.entries_by_key(kit.tenant) == {"k1": 1}
        assert kit.probe.idempotency_count(kit.tenant) == 1
        assert sorted(kit.probe.postings(kit.tenant)) == [
            ("alice", int(Side.CREDIT), 700, "USD"),
            ("bank", int(Side.DEBIT), 700, "USD"),
        ]
        counters = kit.probe.counters(kit.tenant)
        assert counters["bank"] == (700, 0, 0, 0)
        assert counters["alice"] == (0, 700, 0, 0)
        assert kit.probe.invariant_problems(kit.tenant) == []

        # A client's retry of the same key is answered from the record, not again.
        again = await kit.ledger.submit(kit.tenant, [kit.move("k1", "bank", "alice", 700)])
        assert again[0].replayed and again[0].entry == outcomes[0].entry
        assert kit.probe.entries_by_key(kit.tenant) == {"k1": 1}
    finally:
        kit.probe.close()
        await kit.ledger.stop()


async def test_serialization_failure_past_the_bound_leaves_the_store(
    pg_dsn: str, tmp_path: Path, signer: TokenSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """maximum_attempts bounds the store's retries: with one attempt the
    40001 leaves the store's retry unretried (no "lost a race" line) and
    reaches the ledger, whose failed group is committed again one job at a
    time (its own, separate, single pass); the rolled-back attempt wrote
    nothing, so the transfer still exists exactly once."""
    kit = await _kit(pg_dsn, tmp_path, signer, attempts=1)
    try:
        caplog.set_level(logging.INFO)
        outcomes = await _submit_across_competitor(
            kit, pg_dsn, kit.move("k1", "bank", "alice", 700)
        )
        assert outcomes[0].ok and not outcomes[0].replayed, outcomes
        messages = [r.getMessage() for r in caplog.records]
        assert not [m for m in messages if "lost a race" in m], messages
        failed = [r for r in caplog.records if "committing them one by one" in r.getMessage()]
        assert len(failed) == 1
        assert failed[0].exc_info is not None and "SQLSTATE 40001" in str(failed[0].exc_info[1])

        assert kit.probe.entries_by_key(kit.tenant) == {"k1": 1}
        assert kit.probe.idempotency_count(kit.tenant) == 1
        assert kit.probe.counters(kit.tenant)["bank"] == (700, 0, 0, 0)
        assert kit.probe.invariant_problems(kit.tenant) == []
    finally:
        kit.probe.close()
        await kit.ledger.stop()


async def test_account_opened_by_a_concurrent_writer_is_retried_and_found(
    pg_dsn: str, tmp_path: Path, signer: TokenSigner, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening accounts takes the same retry path: another writer (a replica)
    inserts the same account while the ledger's SERIALIZABLE transaction is
    inserting it; the ledger's transaction fails (40001, or 23505 where the
    server reports the unique violation), is retried, finds the account with
    the same spec and returns it: one account, counters untouched."""
    kit = await _kit(pg_dsn, tmp_path, signer, attempts=4)
    try:
        caplog.set_level(logging.INFO, logger="triplane.money.store")
        insert = (
            "INSERT INTO accounts (account_key, tenant_id, account_id, currency, kind, "
            "constraint_kind, overdraft_limit_minor, metadata, created_at_us) "
            "VALUES (%s, %s, 'carol', 'USD', 2, %s, 0, '{}', 1)"
        )
        opened = await _across_competitor(
            pg_dsn,
            insert,
            (f"{kit.tenant}/carol", kit.tenant, NO_CONSTRAINT),
            kit.ledger.create_accounts(kit.tenant, [spec("carol")]),
        )
        assert [a.account_id for a in opened] == ["carol"]
        assert opened[0].created_at_us == 1  # the competitor's row, found on the retry
        retries = [r.getMessage() for r in caplog.records if "lost a race" in r.getMessage()]
        assert len(retries) == 1, retries
        assert "SQLSTATE 40001" in retries[0] or "SQLSTATE 23505" in retries[0], retries
        assert (
            kit.probe.scalar(
                "SELECT COUNT(*) FROM accounts WHERE account_key = %s", (f"{kit.tenant}/carol",)
            )
            == 1
        )
    finally:
        kit.probe.close()
        await kit.ledger.stop()
