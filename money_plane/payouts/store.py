"""Payout rows in the ledger's database, written in the ledger's transactions.

Every statement names tenant_id first (the schema rule of version 2). The
functions run inside `LedgerStore.run_transaction`, so a payout's state and
the ledger entry that goes with it commit together or not at all: a crash
between them cannot leave a payout settled without its entry, or the entry
posted twice (the payout row is locked, its state read, the entry posted
under a key derived from the payout, the state written, then one commit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from money_plane.domain import scoped_key
from money_plane.engine import Job
from money_plane.payouts.domain import LIVE_STATES, Beneficiary, Payout
from money_plane.store.base import LedgerStore
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.errors import AlreadyExists, error_for

PayoutEventEncoder = Callable[[Payout, int], OutgoingEvent]

_encode = msgspec.msgpack.encode
_decode_beneficiary = msgspec.msgpack.Decoder(Beneficiary).decode
_decode_payout = msgspec.msgpack.Decoder(Payout).decode
_LIVE = ", ".join(str(int(s)) for s in LIVE_STATES)


def insert_beneficiary(store: LedgerStore, beneficiary: Beneficiary) -> tuple[Beneficiary, bool]:
    """Stores a new beneficiary, or finds the same one again (replayed);
    another under the same id is ALREADY_EXISTS naming the field."""
    tenant = beneficiary.tenant_id
    key = scoped_key(tenant, beneficiary.beneficiary_id)

    def work(cur: Any) -> tuple[Beneficiary, bool]:
        cur.execute(
            store.sql(
                "SELECT body FROM beneficiaries WHERE tenant_id = %s AND beneficiary_key = %s"
            ),
            (tenant, key),
        )
        row = cur.fetchone()
        if row is not None:
            found = _decode_beneficiary(bytes(row[0]))
            for (name, old), (_, new) in zip(
                found.fingerprint, beneficiary.fingerprint, strict=True
            ):
                if old != new:
                    raise AlreadyExists(
                        "BENEFICIARY_EXISTS",
                        f"beneficiary_id is taken by another beneficiary ({name} differs)",
                        f"beneficiary.{name}",
                    )
            return found, True
        cur.execute(
            store.sql(
                "INSERT INTO beneficiaries (tenant_id, beneficiary_key, merchant_id, "
                "created_at_us, body) VALUES (%s, %s, %s, %s, %s)"
            ),
            (tenant, key, beneficiary.merchant_id, beneficiary.created_at_us, _encode(beneficiary)),
        )
        return beneficiary, False

    return store.run_transaction(work)


def get_beneficiary(store: LedgerStore, tenant_id: str, beneficiary_id: str) -> Beneficiary | None:
    def work(cur: Any) -> Beneficiary | None:
        cur.execute(
            store.sql(
                "SELECT body FROM beneficiaries WHERE tenant_id = %s AND beneficiary_key = %s"
            ),
            (tenant_id, scoped_key(tenant_id, beneficiary_id)),
        )
        row = cur.fetchone()
        return None if row is None else _decode_beneficiary(bytes(row[0]))

    return store.run_transaction(work)


def get_payout(store: LedgerStore, tenant_id: str, payout_id: str) -> Payout | None:
    def work(cur: Any) -> Payout | None:
        return _load_payout(store, cur, tenant_id, payout_id, lock=False)

    return store.run_transaction(work)


def _load_payout(
    store: LedgerStore, cur: Any, tenant_id: str, payout_id: str, lock: bool
) -> Payout | None:
    suffix = store.lock_suffix if lock else ""
    cur.execute(
        store.sql(f"SELECT body FROM payouts WHERE tenant_id = %s AND payout_key = %s{suffix}"),
        (tenant_id, scoped_key(tenant_id, payout_id)),
    )
    row = cur.fetchone()
    return None if row is None else _decode_payout(bytes(row[0]))


def beneficiary_payouts(store: LedgerStore, tenant_id: str, beneficiary_id: str) -> int:
    """Payouts to the beneficiary that were not refused on the way."""

    def work(cur: Any) -> int:
        cur.execute(
            store.sql(
                "SELECT COUNT(*) FROM payouts WHERE tenant_id = %s AND beneficiary_id = %s "
                f"AND state IN ({_LIVE})"
            ),
            (tenant_id, beneficiary_id),
        )
        return int(cur.fetchone()[0])

    return store.run_transaction(work)


def payout_velocity(
    store: LedgerStore, tenant_id: str, account_id: str, since_us: list[int]
) -> list[tuple[int, int]]:
    """(count, amount) of the account's live payouts created since each instant."""

    def work(cur: Any) -> list[tuple[int, int]]:
        out = []
        for since in since_us:
            cur.execute(
                store.sql(
                    "SELECT COUNT(*), COALESCE(SUM(amount_minor), 0) FROM payouts "
                    "WHERE tenant_id = %s AND debit_account_id = %s AND created_at_us >= %s "
                    f"AND state IN ({_LIVE})"
                ),
                (tenant_id, account_id, since),
            )
            count, amount = cur.fetchone()
            out.append((int(count), int(amount)))
        return out

    return store.run_transaction(work)


def _check_same(found: Payout, fresh: Payout) -> None:
    for (name, old), (_, new) in zip(found.fingerprint(), fresh.fingerprint(), strict=True):
        if old != new:
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                f"idempotency key was used for another payout ({name} differs)",
                name,
            )


def _raise_if_failed(outcomes: list[list[Any]], field: str) -> str:
    """The entry id of a one-command job, or its error raised (which rolls
    the whole transaction back: nothing of the payout is written)."""
    [[outcome]] = outcomes
    if outcome.error is not None:
        err = outcome.error
        raise error_for(err.code, err.reason, err.message, err.field or field)
    return str(outcome.entry.entry_id) if outcome.entry is not None else ""


def insert_payout(
    store: LedgerStore,
    payout: Payout,
    job: Job | None,
    now_us: int,
    encode_event: PayoutEventEncoder,
) -> tuple[Payout, bool]:
    """Records a payout with, for an approved one, its PAYOUT entry (`job`)
    in the same transaction; the same payout again is replayed."""
    tenant = payout.tenant_id

    def work(cur: Any) -> tuple[Payout, bool]:
        found = _load_payout(store, cur, tenant, payout.payout_id, lock=True)
        if found is not None:
            _check_same(found, payout)
            return found, True
        stored = payout
        if job is not None:
            entry_id = _raise_if_failed(store.commit_jobs_in(cur, [job], now_us), "amount")
            stored = msgspec.structs.replace(payout, entry_id=entry_id)
        cur.execute(
            store.sql(
                "INSERT INTO payouts (tenant_id, payout_key, beneficiary_id, debit_account_id, "
                "state, amount_minor, created_at_us, updated_at_us, body) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ),
            (
                tenant,
                scoped_key(tenant, stored.payout_id),
                stored.beneficiary_id,
                stored.debit_account_id,
                stored.state,
                stored.amount_minor,
                stored.created_at_us,
                stored.updated_at_us,
                _encode(stored),
            ),
        )
        store.write_outbox(cur, tenant, [encode_event(stored, now_us)], now_us)
        return stored, False

    return store.run_transaction(work)


def update_payout(
    store: LedgerStore,
    tenant_id: str,
    payout_id: str,
    decide: Callable[[Payout], tuple[Payout, Job | None, str] | None],
    now_us: int,
    encode_event: PayoutEventEncoder,
    also: Callable[[Any, Payout, Payout], None] | None = None,
) -> tuple[Payout, bool] | None:
    """Moves a payout under its row lock: `decide(payout)` answers the new
    payout, the ledger job that goes with the move (or None) and which of
    its entry fields the job's entry id goes to, or None for a replay (the
    payout is already there; nothing is written). None: no such payout.
    `also(cur, before, after)` writes what goes with a move in the same
    transaction (reconciliation's expected payment); not called on a replay."""

    def work(cur: Any) -> tuple[Payout, bool] | None:
        found = _load_payout(store, cur, tenant_id, payout_id, lock=True)
        if found is None:
            return None
        decided = decide(found)
        if decided is None:
            return found, True
        updated, job, entry_field = decided
        if job is not None:
            entry_id = _raise_if_failed(store.commit_jobs_in(cur, [job], now_us), "outcome")
            updated = msgspec.structs.replace(updated, **{entry_field: entry_id})
        cur.execute(
            store.sql(
                "UPDATE payouts SET state = %s, updated_at_us = %s, body = %s "
                "WHERE tenant_id = %s AND payout_key = %s"
            ),
            (
                updated.state,
                updated.updated_at_us,
                _encode(updated),
                tenant_id,
                scoped_key(tenant_id, payout_id),
            ),
        )
        store.write_outbox(cur, tenant_id, [encode_event(updated, now_us)], now_us)
        if also is not None:
            also(cur, found, updated)
        return updated, False

    return store.run_transaction(work)


# ---- settlement schedules and settled periods ----


def put_schedule(store: LedgerStore, schedule: Any, body: bytes, now_us: int) -> None:
    """Creates or replaces a merchant's schedule (keyed by its account)."""
    tenant = schedule.tenant_id
    key = scoped_key(tenant, schedule.account_id)

    def work(cur: Any) -> None:
        cur.execute(
            store.sql(
                "DELETE FROM settlement_schedules WHERE tenant_id = %s AND schedule_key = %s"
            ),
            (tenant, key),
        )
        cur.execute(
            store.sql(
                "INSERT INTO settlement_schedules (tenant_id, schedule_key, updated_at_us, body) "
                "VALUES (%s, %s, %s, %s)"
            ),
            (tenant, key, now_us, body),
        )

    store.run_transaction(work)


def list_schedules(store: LedgerStore, after: tuple[str, str], limit: int) -> list[bytes]:
    """Every tenant's schedules, in (tenant_id, schedule_key) order, a page
    after `after` (("", "") for the first)."""

    def work(cur: Any) -> list[bytes]:
        cur.execute(
            store.sql(
                "SELECT body FROM settlement_schedules WHERE tenant_id > %s "
                "OR (tenant_id = %s AND schedule_key > %s) "
                "ORDER BY tenant_id, schedule_key LIMIT %s"
            ),
            (after[0], after[0], after[1], limit),
        )
        return [bytes(row[0]) for row in cur.fetchall()]

    return store.run_transaction(work)


def settlement_claimed(store: LedgerStore, tenant_id: str, key: str) -> bool:
    def work(cur: Any) -> bool:
        cur.execute(
            store.sql("SELECT 1 FROM settlements WHERE tenant_id = %s AND settlement_key = %s"),
            (tenant_id, key),
        )
        return cur.fetchone() is not None

    return store.run_transaction(work)


def settle_period(
    store: LedgerStore,
    tenant_id: str,
    key: str,
    period: str,
    state: str,
    job: Job | None,
    body: Callable[[str], bytes],
    now_us: int,
) -> bool:
    """Claims the period (the primary key (tenant_id, settlement_key): a
    second claimer, on any replica, finds it and does nothing) and posts its
    entry (`job`) in the same transaction. A refused entry rolls the claim
    back with it, so the period is tried again. `body(entry_id)` is the row.
    False: the period was settled already."""

    def work(cur: Any) -> bool:
        cur.execute(
            store.sql(
                "INSERT INTO settlements (tenant_id, settlement_key, period, state, "
                "settled_at_us, body) VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, settlement_key) DO NOTHING"
            ),
            (tenant_id, key, period, state, now_us, b""),
        )
        if cur.rowcount != 1:
            return False
        entry_id = ""
        if job is not None:
            entry_id = _raise_if_failed(store.commit_jobs_in(cur, [job], now_us), "schedule")
        cur.execute(
            store.sql(
                "UPDATE settlements SET body = %s WHERE tenant_id = %s AND settlement_key = %s"
            ),
            (body(entry_id), tenant_id, key),
        )
        return True

    return store.run_transaction(work)


def list_settlements(store: LedgerStore, tenant_id: str, account_id: str) -> list[bytes]:
    prefix = scoped_key(tenant_id, account_id) + "/"

    def work(cur: Any) -> list[bytes]:
        cur.execute(
            store.sql(
                # A prefix compared exactly, not LIKE: SQLite's LIKE folds
                # case and has no default escape (an account id with "_"
                # matched nothing there).
                "SELECT body FROM settlements WHERE tenant_id = %s "
                "AND substr(settlement_key, 1, %s) = %s ORDER BY settled_at_us"
            ),
            (tenant_id, len(prefix), prefix),
        )
        return [bytes(row[0]) for row in cur.fetchall()]

    return store.run_transaction(work)
