"""The ledger asserts its own invariants (money_plane/invariants.py): an entry
forged into the store is caught when it is read back, and a faulty engine's
unbalanced entry or second capture of a hold is refused before anything is
written. A violation is an INTERNAL error, logged at CRITICAL with the
record's id and tenant; it is never remembered under the idempotency key."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import msgspec
import psycopg
import pytest
from money_helpers import Kit, ledger_config, new_signer, unique_tenant

from money_plane.app import MoneyPlane
from money_plane.domain import (
    Command,
    Entry,
    Hold,
    HoldState,
    Kind,
    Outcome,
    Posting,
    Side,
    scoped_key,
)
from money_plane.engine import Engine
from money_plane.invariants import (
    REASON,
    LedgerInvariantViolated,
    entry_problem,
    hold_change_problem,
    hold_problem,
)
from money_plane.store import records as msgpack_records
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.currencies import INT64_MAX
from triplane.runtime.errors import Code, NotFound
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for

INVARIANTS_LOG = "triplane.money.invariants"


def entry(*postings: tuple[int, int, str], amount_minor: int = 100, **changes: Any) -> Entry:
    base = Entry(
        tenant_id="acme",
        entry_id="ent_1",
        idempotency_key="k1",
        kind=Kind.TRANSFER,
        postings=[
            Posting(account_id=f"a{i}", side=side, amount_minor=amount, currency=currency)
            for i, (side, amount, currency) in enumerate(postings)
        ],
        posted_at_us=1,
        amount_minor=amount_minor,
        currency="USD",
    )
    return msgspec.structs.replace(base, **changes)


D, C = Side.DEBIT, Side.CREDIT


# ---- the checks themselves ----


def test_a_balanced_entry_passes() -> None:
    assert entry_problem(entry((D, 100, "USD"), (C, 60, "USD"), (C, 40, "USD"))) == ""


@pytest.mark.parametrize(
    ("postings", "amount_minor", "expected"),
    [
        ([(D, 100, "USD"), (C, 99, "USD")], 100, "debits 100 != credits 99"),
        # Balanced in total, but not per currency.
        ([(D, 100, "USD"), (C, 100, "EUR")], 100, "USD debits 100 != credits 0"),
        ([(D, 0, "USD"), (C, 0, "USD")], 100, "posting 0: amount 0"),
        ([(D, -5, "USD"), (C, -5, "USD")], 100, "posting 0: amount -5"),
        ([(D, INT64_MAX + 1, "USD"), (C, INT64_MAX + 1, "USD")], 100, "posting 0: amount"),
        ([(D, 100, "USD"), (C, 100, "USD")], 90, "its postings move 100"),
        ([(D, 100, "USD"), (C, 100, "USD")], 0, "amount 0 is not in"),
        # Each posting fits in int64, their sum (the entry's amount) does not.
        (
            [(D, INT64_MAX, "USD"), (D, 1, "USD"), (C, INT64_MAX, "USD"), (C, 1, "USD")],
            INT64_MAX + 1,
            f"amount {INT64_MAX + 1} is not in",
        ),
        ([], 100, "no postings"),
        ([(D, 100, "USD"), (3, 100, "USD")], 100, "posting 1: side 3"),
    ],
)
def test_an_entry_that_breaks_an_invariant_is_named(
    postings: list[tuple[int, int, str]], amount_minor: int, expected: str
) -> None:
    assert expected in entry_problem(entry(*postings, amount_minor=amount_minor))


def test_refunds_never_reverse_more_than_was_moved() -> None:
    moved = [(D, 100, "USD"), (C, 100, "USD")]
    assert entry_problem(entry(*moved, refunded_minor=100, refunded_by_posting=[100, 100])) == ""
    assert "refunded 101" in entry_problem(entry(*moved, refunded_minor=101))
    assert "posting 1: refunded 101" in entry_problem(
        entry(*moved, refunded_minor=100, refunded_by_posting=[100, 101])
    )
    assert "1 refund counters for 2" in entry_problem(entry(*moved, refunded_by_posting=[5]))


def hold(state: int = HoldState.PENDING, **changes: Any) -> Hold:
    base = Hold(
        tenant_id="acme",
        hold_id="hld_1",
        idempotency_key="a1",
        debit_account_id="alice",
        credit_account_id="merchant",
        amount_minor=500,
        currency="USD",
        state=state,
        created_at_us=1,
        expires_at_us=2,
    )
    return msgspec.structs.replace(base, **changes)


def test_a_hold_leaves_pending_once() -> None:
    pending = hold()
    captured = hold(HoldState.CAPTURED, captured_minor=500, capture_entry_id="ent_9")
    assert hold_change_problem(None, pending, True, set()) == ""
    assert hold_change_problem(pending, captured, False, {"ent_9"}) == ""
    assert hold_change_problem(pending, hold(HoldState.VOIDED), False, set()) == ""
    assert "left PENDING before" in hold_change_problem(
        captured,
        hold(HoldState.CAPTURED, captured_minor=500, capture_entry_id="ent_10"),
        False,
        {"ent_10"},
    )
    assert "left PENDING before" in hold_change_problem(
        hold(HoldState.EXPIRED), captured, False, {"ent_9"}
    )
    assert "did not post" in hold_change_problem(pending, captured, False, set())
    assert "created in state" in hold_change_problem(None, captured, True, {"ent_9"})
    assert "without being loaded" in hold_change_problem(None, captured, False, {"ent_9"})
    assert "amount_minor changed" in hold_change_problem(
        pending, hold(HoldState.VOIDED, amount_minor=400), False, set()
    )


def test_a_hold_as_stored_is_checked() -> None:
    assert hold_problem(hold()) == ""
    assert "amount 0" in hold_problem(hold(amount_minor=0))
    assert "captured 600" in hold_problem(
        hold(HoldState.CAPTURED, captured_minor=600, capture_entry_id="e")
    )
    assert "without a capture entry" in hold_problem(hold(HoldState.CAPTURED, captured_minor=5))
    assert "carries a capture" in hold_problem(hold(HoldState.VOIDED, captured_minor=5))
    assert "unknown state 9" in hold_problem(hold(9))


# ---- on read: an entry forged into the store ----


def forge(kit: Kit, table: str, key_column: str, key: str, body: bytes) -> None:
    """Writes a row's body behind the ledger's back, on a connection of its own."""
    sql = f"UPDATE {table} SET body = %s WHERE {key_column} = %s"
    if kit.backend == "sqlite":
        with sqlite3.connect(str(kit.where)) as conn:
            changed = conn.execute(sql.replace("%s", "?"), (body, key)).rowcount
    else:
        with psycopg.connect(str(kit.where)) as conn:
            changed = conn.execute(sql, (body, key)).rowcount
    assert changed == 1


def critical_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == INVARIANTS_LOG and r.levelno == logging.CRITICAL
    ]


async def test_a_corrupt_entry_is_detected_when_read_back(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    await kit.fund("alice", 10_000)
    posted = await kit.ok(kit.move("pay-1", "alice", "merchant", 2_500))
    assert posted.entry is not None
    original = posted.entry
    # The credit now says 2,400: the entry no longer balances.
    tampered = msgspec.structs.replace(
        original,
        postings=[
            original.postings[0],
            msgspec.structs.replace(original.postings[1], amount_minor=2_400),
        ],
    )
    forge(
        kit,
        "entries",
        "entry_key",
        scoped_key(kit.tenant, original.entry_id),
        msgpack_records.encode(tampered),
    )
    with caplog.at_level(logging.CRITICAL, logger=INVARIANTS_LOG):
        with pytest.raises(LedgerInvariantViolated) as by_id:
            await kit.ledger.get_entry(kit.tenant, original.entry_id, "")
        with pytest.raises(LedgerInvariantViolated):
            await kit.ledger.get_entry(kit.tenant, "", "pay-1")
    assert by_id.value.code == Code.INTERNAL and by_id.value.reason == REASON
    assert by_id.value.metadata == {
        "tenant_id": kit.tenant,
        "entry_id": original.entry_id,
        "when": "on read",
    }
    logged = critical_records(caplog)
    assert len(logged) == 2
    assert all(original.entry_id in m and kit.tenant in m for m in logged)
    assert "debits 2500 != credits 2400" in logged[0]


async def test_a_refund_of_a_corrupt_entry_writes_nothing(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    await kit.fund("alice", 10_000)
    posted = await kit.ok(kit.move("pay-1", "alice", "merchant", 2_500))
    assert posted.entry is not None
    original = posted.entry
    tampered = msgspec.structs.replace(original, amount_minor=INT64_MAX + 1)
    forge(
        kit,
        "entries",
        "entry_key",
        scoped_key(kit.tenant, original.entry_id),
        msgpack_records.encode(tampered),
    )
    before = (kit.snapshot(), kit.probe.entry_count(kit.tenant), kit.probe.outbox_count())
    remembered = kit.probe.idempotency_count(kit.tenant)
    with (
        caplog.at_level(logging.CRITICAL, logger=INVARIANTS_LOG),
        pytest.raises(LedgerInvariantViolated) as caught,
    ):
        await kit.one(kit.refund("refund-1", original.entry_id))
    assert caught.value.metadata["entry_id"] == original.entry_id
    after = (kit.snapshot(), kit.probe.entry_count(kit.tenant), kit.probe.outbox_count())
    assert after == before
    # Not remembered: once the row is repaired, the same key can still refund.
    assert kit.probe.idempotency_count(kit.tenant) == remembered
    forge(
        kit,
        "entries",
        "entry_key",
        scoped_key(kit.tenant, original.entry_id),
        msgpack_records.encode(original),
    )
    refund = await kit.ok(kit.refund("refund-1", original.entry_id))
    assert refund.entry is not None and refund.entry.amount_minor == 2_500
    await kit.assert_balanced()


async def test_a_corrupt_hold_is_detected_when_read_back(kit: Kit) -> None:
    await kit.fund("alice", 10_000)
    authorized = await kit.ok(kit.authorize("auth-1", "alice", "merchant", 700))
    assert authorized.hold is not None
    forged = msgspec.structs.replace(authorized.hold, captured_minor=700)
    forge(
        kit,
        "holds",
        "hold_key",
        scoped_key(kit.tenant, forged.hold_id),
        msgpack_records.encode(forged),
    )
    with pytest.raises(LedgerInvariantViolated, match="carries a capture"):
        await kit.ledger.get_hold(kit.tenant, forged.hold_id)
    with pytest.raises(LedgerInvariantViolated):
        await kit.one(kit.capture("cap-1", forged.hold_id))


async def test_grpc_answers_a_corrupt_entry_with_internal_and_the_reason(tmp_path: Path) -> None:
    signer = new_signer()
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    clock = ManualClock()
    plane = MoneyPlane(ledger_config(state_dir, signer), clock=clock, listen="127.0.0.1:0")
    port = await plane.start(sweepers=False, relay=False)
    assert plane.ledger is not None
    kit = Kit(plane.ledger, clock, signer, "sqlite", state_dir / "money.db", unique_tenant())
    try:
        await plane.ledger.create_tenant(kit.tenant, "Corrupt")
        await kit.open(("bank", "USD", 1, 0), ("alice", "USD", 1, 0))
        posted = await kit.ok(kit.move("pay-1", "bank", "alice", 1_000))
        assert posted.entry is not None
        tampered = msgspec.structs.replace(
            posted.entry,
            postings=[
                msgspec.structs.replace(p, currency="EUR") if p.side == Side.CREDIT else p
                for p in posted.entry.postings
            ],
        )
        forge(
            kit,
            "entries",
            "entry_key",
            scoped_key(kit.tenant, posted.entry.entry_id),
            msgpack_records.encode(tampered),
        )
        async with channel_for(plane.config, f"127.0.0.1:{port}") as channel:
            stub = money_pb2_grpc.LedgerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetEntry(
                    pb.GetEntryRequest(tenant_id=kit.tenant, entry_id=posted.entry.entry_id)
                )
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert parse_rpc_error(caught.value)[0] == REASON
    finally:
        kit.probe.close()
        await plane.stop()


# ---- before writing: a faulty engine ----


class UnbalancedEngine(Engine):
    """Posts every entry whose key starts with "corrupt" one unit short on
    its last posting (the counters are still moved by the right amounts)."""

    def _post_entry(self, entry: Entry) -> None:
        if entry.idempotency_key.startswith("corrupt"):
            last = entry.postings[-1]
            entry = msgspec.structs.replace(
                entry,
                postings=[
                    *entry.postings[:-1],
                    msgspec.structs.replace(last, amount_minor=last.amount_minor - 1),
                ],
            )
        super()._post_entry(entry)


class CapturesTwiceEngine(Engine):
    """Forgets to look at a hold's state: it would capture a hold again."""

    def _pending_hold(self, cmd: Command, where: str) -> Hold:
        found = self.view.holds.get(scoped_key(cmd.tenant_id, cmd.hold_id))
        assert found is not None
        return found


async def test_an_unbalanced_entry_is_refused_before_anything_is_written(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    await kit.fund("alice", 10_000)
    kit.ledger.store.engine_type = UnbalancedEngine
    before = (kit.snapshot(), kit.probe.entry_count(kit.tenant), kit.probe.outbox_count())
    remembered = kit.probe.idempotency_count(kit.tenant)
    with caplog.at_level(logging.CRITICAL, logger=INVARIANTS_LOG):
        results: list[Outcome | BaseException] = await asyncio.gather(
            kit.one(kit.move("corrupt-1", "alice", "merchant", 1_000)),
            kit.one(kit.move("fine-1", "alice", "merchant", 300)),
            return_exceptions=True,
        )
    bad, good = results
    assert isinstance(bad, LedgerInvariantViolated), bad
    assert bad.code == Code.INTERNAL and bad.metadata["when"] == "before writing"
    assert bad.metadata["tenant_id"] == kit.tenant
    logged = critical_records(caplog)
    # Logged once per try (the group, then the job alone), each with a fresh entry id.
    assert logged and all(kit.tenant in m for m in logged)
    assert bad.metadata["entry_id"] in logged[-1]
    # The neighbour in the same group still commits; the bad one left no trace.
    assert not isinstance(good, BaseException) and good.ok
    counters, entries, outbox = before
    counters["alice"] = (counters["alice"][0] + 300, *counters["alice"][1:])
    counters["merchant"] = (
        counters["merchant"][0],
        counters["merchant"][1] + 300,
        *counters["merchant"][2:],
    )
    assert kit.snapshot() == counters
    assert kit.probe.entry_count(kit.tenant) == entries + 1
    assert kit.probe.outbox_count() == outbox + 1
    assert kit.probe.idempotency_count(kit.tenant) == remembered + 1
    with pytest.raises(NotFound):
        await kit.ledger.get_entry(kit.tenant, "", "corrupt-1")
    await kit.assert_balanced()


async def test_a_hold_is_never_captured_twice(kit: Kit) -> None:
    await kit.fund("alice", 10_000)
    first = await kit.ok(kit.authorize("auth-1", "alice", "merchant", 700))
    # A second hold on the same accounts keeps the pending counters from going
    # below zero, so only the hold's own invariant can stop the second capture.
    await kit.ok(kit.authorize("auth-2", "alice", "merchant", 700))
    assert first.hold is not None
    await kit.ok(kit.capture("cap-1", first.hold.hold_id))
    kit.ledger.store.engine_type = CapturesTwiceEngine
    before = (kit.snapshot(), kit.probe.entry_count(kit.tenant), kit.probe.outbox_count())
    with pytest.raises(LedgerInvariantViolated, match="left PENDING before") as caught:
        await kit.one(kit.capture("cap-2", first.hold.hold_id))
    assert caught.value.metadata["hold_id"] == first.hold.hold_id
    assert (kit.snapshot(), kit.probe.entry_count(kit.tenant), kit.probe.outbox_count()) == before
    stored = await kit.ledger.get_hold(kit.tenant, first.hold.hold_id)
    assert stored.state == HoldState.CAPTURED and stored.capture_entry_id
    await kit.assert_balanced()
