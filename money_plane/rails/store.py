"""The rails' state in the ledger's database, so no replica keeps it in memory.

Four tables of their own beside the ledger's and the payouts' (additive to
ledger schema version 2, money_plane/store/migration.py: created on start
with CREATE ... IF NOT EXISTS, nothing to copy, no version bump), each led
by tenant_id:

- `rail_refs`: a bank reference (end-to-end id, ACH trace number) -> the
  tenant and payout it belongs to. The bank's answers name only the
  reference, so the lookup is by reference alone (an index not led by
  tenant_id, like the ledger's cross-tenant sweeps; on Citus it fans out).
- `rail_queue`: ACH and SEPA entries waiting for the next file, one per
  payout. A flush claims a file's entries (file_id, trace sequences,
  claimed_until_us) in a transaction serialized on the rail's counter row,
  so two replicas never put one entry in two files; the entries are marked
  sent once the bank took the file. A file not marked sent when its claim
  runs out (a crash between the claim and the mark) is claimed again and
  sent again with the same trace numbers (the bank books an end-to-end id
  once).
- `rail_state`: the platform's rows (tenant_id '': the bank connection is
  the platform's, not a tenant's): each rail's outcome cursor, the ACH trace
  counter, and the leases that let one replica at a time run a unit of the
  worker (hand-off, a rail's delivery).
- `rail_refusals`: approved payouts no rail can carry (no rail reaches the
  beneficiary, or the rail refused its details), left approved and skipped
  by the hand-off until someone acts on them.

Nothing here holds a destination in clear: a queued entry names its payout,
and the file is built from the sealed beneficiary when it is sent.

The functions run inside `LedgerStore.run_transaction` on the ledger's
writer (`Ledger.run_on_writer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from money_plane.payouts.domain import PayoutState
from money_plane.store.base import LedgerStore

PLATFORM = ""  # tenant_id of the platform's own rows (no tenant has it)
TRACE_MAX = 9_999_999  # a NACHA trace sequence has 7 digits

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS rail_refs (
        tenant_id TEXT NOT NULL, reference TEXT NOT NULL, rail TEXT NOT NULL,
        payout_id TEXT NOT NULL, end_to_end_id TEXT NOT NULL, amount_minor BIGINT NOT NULL,
        created_at_us BIGINT NOT NULL, PRIMARY KEY (tenant_id, reference))""",
    "CREATE INDEX IF NOT EXISTS rail_refs_by_reference ON rail_refs (reference, created_at_us)",
    """CREATE TABLE IF NOT EXISTS rail_queue (
        tenant_id TEXT NOT NULL, payout_id TEXT NOT NULL, rail TEXT NOT NULL,
        end_to_end_id TEXT NOT NULL, queued_at_us BIGINT NOT NULL,
        file_id TEXT NOT NULL DEFAULT '', trace_seq BIGINT NOT NULL DEFAULT 0,
        claimed_until_us BIGINT NOT NULL DEFAULT 0, sent_at_us BIGINT,
        PRIMARY KEY (tenant_id, payout_id))""",
    "CREATE INDEX IF NOT EXISTS rail_queue_unsent "
    "ON rail_queue (rail, file_id, queued_at_us) WHERE sent_at_us IS NULL",
    """CREATE TABLE IF NOT EXISTS rail_state (
        tenant_id TEXT NOT NULL, name TEXT NOT NULL, value BIGINT NOT NULL DEFAULT 0,
        owner TEXT NOT NULL DEFAULT '', lease_until_us BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, name))""",
    """CREATE TABLE IF NOT EXISTS rail_refusals (
        tenant_id TEXT NOT NULL, payout_key TEXT NOT NULL, reason TEXT NOT NULL,
        refused_at_us BIGINT NOT NULL, PRIMARY KEY (tenant_id, payout_key))""",
    # The hand-off's scan of approved payouts (the payouts table is the
    # payouts package's; this partial index is the rail worker's).
    f"CREATE INDEX IF NOT EXISTS payouts_approved ON payouts (updated_at_us) "
    f"WHERE state = {int(PayoutState.APPROVED)}",
]


def create_schema(store: LedgerStore) -> None:
    with store._transaction() as cur:
        store._lock_schema(cur)
        for statement in SCHEMA:
            cur.execute(statement)


@dataclass(frozen=True, slots=True)
class Ref:
    tenant_id: str
    payout_id: str
    end_to_end_id: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class QueuedEntry:
    tenant_id: str
    payout_id: str
    end_to_end_id: str
    trace_seq: int


# ---- correlations ----


def remember(store: LedgerStore, reference: str, rail: str, ref: Ref, now_us: int) -> None:
    def work(cur: Any) -> None:
        _insert_ref(store, cur, reference, rail, ref, now_us)

    store.run_transaction(work)


def _insert_ref(
    store: LedgerStore, cur: Any, reference: str, rail: str, ref: Ref, now_us: int
) -> None:
    cur.execute(
        store.sql(
            "INSERT INTO rail_refs (tenant_id, reference, rail, payout_id, end_to_end_id, "
            "amount_minor, created_at_us) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (tenant_id, reference) DO UPDATE SET payout_id = excluded.payout_id, "
            "end_to_end_id = excluded.end_to_end_id, amount_minor = excluded.amount_minor, "
            "created_at_us = excluded.created_at_us"
        ),
        (
            ref.tenant_id,
            reference,
            rail,
            ref.payout_id,
            ref.end_to_end_id,
            ref.amount_minor,
            now_us,
        ),
    )


def recall(store: LedgerStore, reference: str) -> Ref | None:
    """The payout a bank reference names (the latest, where a trace number
    came round again)."""

    def work(cur: Any) -> Ref | None:
        cur.execute(
            store.sql(
                "SELECT tenant_id, payout_id, end_to_end_id, amount_minor FROM rail_refs "
                "WHERE reference = %s ORDER BY created_at_us DESC LIMIT 1"
            ),
            (reference,),
        )
        row = cur.fetchone()
        return None if row is None else Ref(str(row[0]), str(row[1]), str(row[2]), int(row[3]))

    return store.run_transaction(work)


# ---- the hand-off ----


def approved_payouts(store: LedgerStore, limit: int) -> list[tuple[str, str]]:
    """(tenant_id, payout_id) of approved payouts not refused, oldest first."""

    def work(cur: Any) -> list[tuple[str, str]]:
        cur.execute(
            store.sql(
                "SELECT p.tenant_id, p.payout_key FROM payouts AS p "
                f"WHERE p.state = {int(PayoutState.APPROVED)} AND NOT EXISTS ("
                "SELECT 1 FROM rail_refusals AS r "
                "WHERE r.tenant_id = p.tenant_id AND r.payout_key = p.payout_key) "
                "ORDER BY p.updated_at_us LIMIT %s"
            ),
            (limit,),
        )
        return [(str(t), str(k).partition("/")[2]) for t, k in cur.fetchall()]

    return store.run_transaction(work)


def refuse(store: LedgerStore, tenant_id: str, payout_id: str, reason: str, now_us: int) -> None:
    def work(cur: Any) -> None:
        cur.execute(
            store.sql(
                "INSERT INTO rail_refusals (tenant_id, payout_key, reason, refused_at_us) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, payout_key) DO NOTHING"
            ),
            (tenant_id, f"{tenant_id}/{payout_id}", reason[:500], now_us),
        )

    store.run_transaction(work)


def enqueue(store: LedgerStore, rail: str, ref: Ref, now_us: int) -> None:
    """Queues the payout for its rail's next file (once: a second hand-off
    of it finds it queued) with its end-to-end id's correlation."""

    def work(cur: Any) -> None:
        cur.execute(
            store.sql(
                "INSERT INTO rail_queue (tenant_id, payout_id, rail, end_to_end_id, "
                "queued_at_us) VALUES (%s, %s, %s, %s, %s) "
                "ON CONFLICT (tenant_id, payout_id) DO NOTHING"
            ),
            (ref.tenant_id, ref.payout_id, rail, ref.end_to_end_id, now_us),
        )
        _insert_ref(store, cur, ref.end_to_end_id, rail, ref, now_us)

    store.run_transaction(work)


def queued_count(store: LedgerStore, rail: str) -> int:
    def work(cur: Any) -> int:
        cur.execute(
            store.sql("SELECT COUNT(*) FROM rail_queue WHERE rail = %s AND sent_at_us IS NULL"),
            (rail,),
        )
        return int(cur.fetchone()[0])

    return store.run_transaction(work)


# ---- the platform's rows: counters, cursors, leases ----


def _state_row(store: LedgerStore, cur: Any, name: str, lock: bool) -> tuple[int, str, int]:
    cur.execute(
        store.sql(
            "INSERT INTO rail_state (tenant_id, name) VALUES (%s, %s) "
            "ON CONFLICT (tenant_id, name) DO NOTHING"
        ),
        (PLATFORM, name),
    )
    suffix = store.lock_suffix if lock else ""
    cur.execute(
        store.sql(
            "SELECT value, owner, lease_until_us FROM rail_state "
            f"WHERE tenant_id = %s AND name = %s{suffix}"
        ),
        (PLATFORM, name),
    )
    value, owner, until = cur.fetchone()
    return int(value), str(owner), int(until)


def take_lease(store: LedgerStore, name: str, owner: str, now_us: int, until_us: int) -> int | None:
    """The unit `name` for `owner` until `until_us`, unless another holds it
    (None); answers the row's value (a rail's outcome cursor)."""

    def work(cur: Any) -> int | None:
        value, holder, until = _state_row(store, cur, name, lock=True)
        if holder and holder != owner and until > now_us:
            return None
        cur.execute(
            store.sql(
                "UPDATE rail_state SET owner = %s, lease_until_us = %s "
                "WHERE tenant_id = %s AND name = %s"
            ),
            (owner, until_us, PLATFORM, name),
        )
        return value

    return store.run_transaction(work)


def end_lease(store: LedgerStore, name: str, owner: str, value: int | None = None) -> None:
    """Gives the unit back, moving its value forward to `value` (never back)."""

    def work(cur: Any) -> None:
        cur.execute(
            store.sql(
                "UPDATE rail_state SET owner = '', lease_until_us = 0, "
                "value = CASE WHEN %s > value THEN %s ELSE value END "
                "WHERE tenant_id = %s AND name = %s AND owner = %s"
            ),
            (value or 0, value or 0, PLATFORM, name, owner),
        )

    store.run_transaction(work)


# ---- files ----


def claim_file(
    store: LedgerStore,
    rail: str,
    file_id: str,
    now_us: int,
    until_us: int,
    limit: int,
) -> tuple[str, list[QueuedEntry]]:
    """The entries of the rail's next file, claimed until `until_us`: a file
    claimed before whose claim ran out unsent (the same file id and trace
    sequences again), else up to `limit` queued entries as a new file
    `file_id` (ACH: consecutive trace sequences from the rail's counter).
    Serialized per rail on its counter row, so concurrent claims (any
    replica) never share an entry. ("", []) when nothing waits."""

    def work(cur: Any) -> tuple[str, list[QueuedEntry]]:
        counter, _, _ = _state_row(store, cur, f"{rail}/files", lock=True)
        cur.execute(
            store.sql(
                "SELECT file_id FROM rail_queue WHERE rail = %s AND sent_at_us IS NULL "
                "AND file_id <> '' AND claimed_until_us <= %s ORDER BY queued_at_us LIMIT 1"
            ),
            (rail, now_us),
        )
        row = cur.fetchone()
        if row is not None:
            again = str(row[0])
            cur.execute(
                store.sql(
                    "UPDATE rail_queue SET claimed_until_us = %s "
                    "WHERE rail = %s AND file_id = %s AND sent_at_us IS NULL"
                ),
                (until_us, rail, again),
            )
            return again, _file_entries(store, cur, rail, again)
        cur.execute(
            store.sql(
                "SELECT tenant_id, payout_id FROM rail_queue "
                "WHERE rail = %s AND file_id = '' AND sent_at_us IS NULL "
                "ORDER BY queued_at_us, tenant_id, payout_id LIMIT %s"
            ),
            (rail, limit),
        )
        picked = [(str(t), str(p)) for t, p in cur.fetchall()]
        if not picked:
            return "", []
        first = counter + 1
        if first + len(picked) - 1 > TRACE_MAX:
            first = 1
        cur.executemany(
            store.sql(
                "UPDATE rail_queue SET file_id = %s, trace_seq = %s, claimed_until_us = %s "
                "WHERE tenant_id = %s AND payout_id = %s"
            ),
            [
                (file_id, first + i, until_us, tenant, payout)
                for i, (tenant, payout) in enumerate(picked)
            ],
        )
        cur.execute(
            store.sql("UPDATE rail_state SET value = %s WHERE tenant_id = %s AND name = %s"),
            (first + len(picked) - 1, PLATFORM, f"{rail}/files"),
        )
        return file_id, _file_entries(store, cur, rail, file_id)

    return store.run_transaction(work)


def _file_entries(store: LedgerStore, cur: Any, rail: str, file_id: str) -> list[QueuedEntry]:
    cur.execute(
        store.sql(
            "SELECT tenant_id, payout_id, end_to_end_id, trace_seq FROM rail_queue "
            "WHERE rail = %s AND file_id = %s AND sent_at_us IS NULL ORDER BY trace_seq"
        ),
        (rail, file_id),
    )
    return [QueuedEntry(str(t), str(p), str(e), int(s)) for t, p, e, s in cur.fetchall()]


def file_sent(store: LedgerStore, rail: str, file_id: str, now_us: int) -> None:
    """The bank took the file: its entries are sent (their trace numbers'
    correlations were stored before it went)."""

    def work(cur: Any) -> None:
        cur.execute(
            store.sql(
                "UPDATE rail_queue SET sent_at_us = %s "
                "WHERE rail = %s AND file_id = %s AND sent_at_us IS NULL"
            ),
            (now_us, rail, file_id),
        )

    store.run_transaction(work)


def release_file(store: LedgerStore, rail: str, file_id: str) -> None:
    """The file could not be sent now: claimable again at once (the same
    file id and trace sequences)."""

    def work(cur: Any) -> None:
        cur.execute(
            store.sql(
                "UPDATE rail_queue SET claimed_until_us = 0 "
                "WHERE rail = %s AND file_id = %s AND sent_at_us IS NULL"
            ),
            (rail, file_id),
        )

    store.run_transaction(work)
