"""Ledger behaviour on both backends (SQLite and PostgreSQL), through the
async facade the servicer uses: holds, splits, reserves, refunds, limits,
idempotency, batches, tenant walls, decision tokens and reads."""

from __future__ import annotations

import asyncio
import logging
import uuid

import msgspec
import pytest
from money_helpers import (
    DEBITS_LIMITED,
    BackendPlace,
    Kit,
    bps_leg,
    fixed_leg,
    ledger_config,
    make_ledger,
    new_signer,
    spec,
    unique_tenant,
)

from money_plane.domain import Command, HoldState, Kind, Outcome, Side
from triplane.runtime.clock import ManualClock
from triplane.runtime.currencies import INT64_MAX
from triplane.runtime.errors import AlreadyExists, Code, InvalidArgument, NotFound
from triplane.runtime.tokens import TokenSigner

DAY_S = 86_400


def key() -> str:
    return f"k-{uuid.uuid4().hex[:20]}"


async def refused(
    kit: Kit, command: Command, reason: str, field: str | None = None, code: Code | None = None
) -> Outcome:
    """Runs a command that must be refused and checks nothing moved."""
    before = kit.snapshot()
    entries = kit.probe.entry_count(kit.tenant)
    outcome = await kit.one(command)
    assert outcome.error is not None, f"expected {reason}, got {outcome}"
    assert outcome.error.reason == reason, outcome.error
    if field is not None:
        assert outcome.error.field == field, outcome.error
    if code is not None:
        assert outcome.error.code == code, outcome.error
    assert outcome.entry is None
    assert kit.snapshot() == before
    assert kit.probe.entry_count(kit.tenant) == entries
    return outcome


# ---- two-phase holds ----


async def test_partial_capture_posts_part_and_releases_the_rest(kit: Kit) -> None:
    await kit.fund("alice", 10_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 5_000))
    assert auth.hold is not None and auth.hold.state == HoldState.PENDING
    assert await kit.balance("alice") == (10_000, 5_000, 5_000)
    merchant = await kit.ledger.get_account(kit.tenant, "merchant")
    assert merchant.credits_pending == 5_000 and merchant.posted == 0

    captured = await kit.ok(kit.capture(key(), auth.hold.hold_id, 3_000))
    assert captured.entry is not None and captured.hold is not None
    assert captured.entry.amount_minor == 3_000 and captured.entry.kind == Kind.CAPTURE
    assert captured.hold.state == HoldState.CAPTURED and captured.hold.captured_minor == 3_000
    assert await kit.balance("alice") == (7_000, 0, 7_000)
    merchant = await kit.ledger.get_account(kit.tenant, "merchant")
    assert (merchant.posted, merchant.credits_pending) == (3_000, 0)
    hold = await kit.ledger.get_hold(kit.tenant, auth.hold.hold_id)
    assert hold.state == HoldState.CAPTURED and hold.capture_entry_id == captured.entry.entry_id
    await kit.assert_balanced()


async def test_full_capture_without_amount(kit: Kit) -> None:
    await kit.fund("alice", 800)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 800))
    assert auth.hold is not None
    captured = await kit.ok(kit.capture(key(), auth.hold.hold_id))
    assert captured.entry is not None and captured.entry.amount_minor == 800
    assert await kit.balance("alice") == (0, 0, 0)
    await kit.assert_balanced()


async def test_void_releases_and_a_voided_hold_stays_voided(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 700))
    assert auth.hold is not None
    voided = await kit.ok(kit.void(key(), auth.hold.hold_id))
    assert voided.hold is not None and voided.hold.state == HoldState.VOIDED
    assert voided.entry is None
    assert await kit.balance("alice") == (1_000, 0, 1_000)
    await refused(kit, kit.void(key(), auth.hold.hold_id), "HOLD_ALREADY_VOIDED")
    await refused(
        kit,
        kit.capture(key(), auth.hold.hold_id),
        "HOLD_ALREADY_VOIDED",
        code=Code.FAILED_PRECONDITION,
    )
    await kit.assert_balanced()


async def test_never_capture_twice_nor_void_after_capture(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 600))
    assert auth.hold is not None
    await kit.ok(kit.capture(key(), auth.hold.hold_id, 100))
    await refused(
        kit,
        kit.capture(key(), auth.hold.hold_id, 100),
        "HOLD_ALREADY_CAPTURED",
        field="transfers[0].hold_id",
        code=Code.FAILED_PRECONDITION,
    )
    await refused(kit, kit.capture(key(), auth.hold.hold_id), "HOLD_ALREADY_CAPTURED")
    await refused(kit, kit.void(key(), auth.hold.hold_id), "HOLD_ALREADY_CAPTURED")
    assert await kit.balance("alice") == (900, 0, 900)
    await kit.assert_balanced()


async def test_capture_above_the_hold_is_out_of_range(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 500))
    assert auth.hold is not None
    await refused(
        kit,
        kit.capture(key(), auth.hold.hold_id, 501),
        "CAPTURE_EXCEEDS_HOLD",
        field="transfers[0].amount.amount_minor",
        code=Code.OUT_OF_RANGE,
    )
    hold = await kit.ledger.get_hold(kit.tenant, auth.hold.hold_id)
    assert hold.state == HoldState.PENDING
    await kit.ok(kit.capture(key(), auth.hold.hold_id, 500))
    await kit.assert_balanced()


async def test_capture_in_another_currency_is_refused(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 500))
    assert auth.hold is not None
    await refused(
        kit,
        kit.capture(key(), auth.hold.hold_id, 100, "EUR"),
        "CURRENCY_MISMATCH",
        field="transfers[0].amount.currency",
        code=Code.INVALID_ARGUMENT,
    )


async def test_holds_never_exceed_the_available_balance(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    await kit.ok(kit.authorize(key(), "alice", "merchant", 600))
    await refused(
        kit,
        kit.authorize(key(), "alice", "merchant", 401),
        "INSUFFICIENT_FUNDS",
        field="transfers[0].debit_account_id",
        code=Code.FAILED_PRECONDITION,
    )
    # Pending debits count against what a transfer may spend too.
    await refused(kit, kit.move(key(), "alice", "merchant", 401), "INSUFFICIENT_FUNDS")
    await kit.ok(kit.authorize(key(), "alice", "merchant", 400))
    assert await kit.balance("alice") == (1_000, 1_000, 0)
    await refused(kit, kit.move(key(), "alice", "merchant", 1), "INSUFFICIENT_FUNDS")
    await kit.assert_balanced()


async def test_hold_expires_at_its_timeout_and_late_capture_is_refused(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 300, hold_timeout_s=60))
    assert auth.hold is not None
    assert auth.hold.expires_at_us == auth.hold.created_at_us + 60_000_000
    kit.clock.advance(59)
    assert await kit.ledger.expire_due_holds() == 0
    assert (await kit.ledger.get_hold(kit.tenant, auth.hold.hold_id)).state == HoldState.PENDING
    kit.clock.advance(1)
    assert await kit.ledger.expire_due_holds() == 1
    hold = await kit.ledger.get_hold(kit.tenant, auth.hold.hold_id)
    assert hold.state == HoldState.EXPIRED
    assert await kit.balance("alice") == (1_000, 0, 1_000)
    assert await kit.ledger.expire_due_holds() == 0
    await refused(
        kit,
        kit.capture(key(), auth.hold.hold_id),
        "HOLD_EXPIRED",
        field="transfers[0].hold_id",
        code=Code.FAILED_PRECONDITION,
    )
    await refused(kit, kit.void(key(), auth.hold.hold_id), "HOLD_EXPIRED")
    await kit.assert_balanced()


async def test_capture_after_the_timeout_is_refused_even_before_the_sweep(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 300, hold_timeout_s=10))
    assert auth.hold is not None
    kit.clock.advance(10)
    outcome = await kit.one(kit.capture(key(), auth.hold.hold_id))
    assert outcome.error is not None and outcome.error.reason == "HOLD_EXPIRED"
    # The expiry itself took effect: the money is released, the hold expired.
    assert (await kit.ledger.get_hold(kit.tenant, auth.hold.hold_id)).state == HoldState.EXPIRED
    assert await kit.balance("alice") == (1_000, 0, 1_000)
    assert kit.probe.entry_count(kit.tenant) == 1
    await kit.assert_balanced()


async def test_default_hold_timeout_applies(kit: Kit) -> None:
    await kit.fund("alice", 100)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 100))
    assert auth.hold is not None
    default_s = kit.ledger.config.holds.default_timeout_s
    assert auth.hold.expires_at_us - auth.hold.created_at_us == default_s * 1_000_000
    kit.clock.advance(default_s - 1)
    assert await kit.ledger.expire_due_holds() == 0
    kit.clock.advance(1)
    assert await kit.ledger.expire_due_holds() == 1


# ---- splits, reserves, refunds ----


async def test_split_in_one_entry_fee_tax_reserve_and_remainder(kit: Kit) -> None:
    await kit.fund("alice", 20_000)
    release_at_us = kit.clock.now_us() + DAY_S * 1_000_000
    entries_before = kit.probe.entry_count(kit.tenant)
    outcome = await kit.ok(
        kit.move(
            key(),
            "alice",
            "merchant",
            10_001,
            splits=[
                bps_leg("fee", 290, "platform_fee"),
                fixed_leg("tax", 50, "tax"),
                bps_leg("reserve", 1_000, "reserve", release_at_us, "merchant"),
            ],
        )
    )
    entry = outcome.entry
    assert entry is not None
    assert kit.probe.entry_count(kit.tenant) == entries_before + 1
    postings = [(p.account_id, p.side, p.amount_minor, p.label) for p in entry.postings]
    # 2.9% of 10001 = 290.029 -> 290; 10% = 1000.1 -> 1000; remainder 8661.
    assert postings == [
        ("alice", Side.DEBIT, 10_001, ""),
        ("fee", Side.CREDIT, 290, "platform_fee"),
        ("tax", Side.CREDIT, 50, "tax"),
        ("reserve", Side.CREDIT, 1_000, "reserve"),
        ("merchant", Side.CREDIT, 8_661, "remainder"),
    ]
    assert (await kit.balance("merchant"))[0] == 8_661
    assert (await kit.balance("reserve"))[0] == 1_000
    await kit.assert_balanced()


async def test_capture_with_splits(kit: Kit) -> None:
    await kit.fund("alice", 5_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 5_000))
    assert auth.hold is not None
    captured = await kit.ok(
        kit.capture(
            key(), auth.hold.hold_id, 4_000, splits=[bps_leg("fee", 250), fixed_leg("tax", 7)]
        )
    )
    assert captured.entry is not None
    assert {p.account_id: p.amount_minor for p in captured.entry.postings} == {
        "alice": 4_000,
        "fee": 100,
        "tax": 7,
        "merchant": 3_893,
    }
    assert await kit.balance("alice") == (1_000, 0, 1_000)
    await kit.assert_balanced()


async def test_splits_larger_than_a_capture_are_refused(kit: Kit) -> None:
    await kit.fund("alice", 5_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 5_000))
    assert auth.hold is not None
    await refused(
        kit,
        kit.capture(key(), auth.hold.hold_id, splits=[fixed_leg("fee", 5_001)]),
        "SPLITS_EXCEED_AMOUNT",
    )
    assert (await kit.ledger.get_hold(kit.tenant, auth.hold.hold_id)).state == HoldState.PENDING


async def _reserve_payment(kit: Kit, amount: int = 10_000) -> tuple[Outcome, int]:
    await kit.fund("alice", amount)
    release_at_us = kit.clock.now_us() + DAY_S * 1_000_000
    paid = await kit.ok(
        kit.move(
            key(),
            "alice",
            "merchant",
            amount,
            splits=[
                bps_leg("fee", 300, "fee"),
                bps_leg("reserve", 1_000, "reserve", release_at_us, "merchant"),
            ],
        )
    )
    return paid, release_at_us


async def test_rolling_reserve_is_released_exactly_once(kit: Kit) -> None:
    await _reserve_payment(kit)
    assert await kit.ledger.release_due_reserves() == 0
    kit.clock.advance(DAY_S - 1)
    assert await kit.ledger.release_due_reserves() == 0
    assert (await kit.balance("reserve"))[0] == 1_000
    kit.clock.advance(1)
    released = await asyncio.gather(*[kit.ledger.release_due_reserves() for _ in range(5)])
    released_more = [await kit.ledger.release_due_reserves() for _ in range(3)]
    assert sum(released) + sum(released_more) == 1
    assert (await kit.balance("reserve"))[0] == 0
    assert (await kit.balance("merchant"))[0] == 8_700 + 1_000
    keys = kit.probe.entries_by_key(kit.tenant)
    releases = {k: n for k, n in keys.items() if k.startswith("reserve-release:")}
    assert list(releases.values()) == [1]
    await kit.assert_balanced()


async def test_a_refused_release_is_reported_by_id_and_tried_again_later(
    kit: Kit, caplog: pytest.LogCaptureFixture
) -> None:
    await _reserve_payment(kit)
    await kit.ok(kit.move(key(), "reserve", "bank", 1_000))  # the reserve is spent
    kit.clock.advance(DAY_S)
    with caplog.at_level(logging.ERROR, logger="triplane.money.ledger"):
        assert await kit.ledger.release_due_reserves() == 0
        assert await kit.ledger.release_due_reserves() == 0  # deferred: not due again yet
    reports = [r.getMessage() for r in caplog.records if "reserve release refused" in r.message]
    assert len(reports) == 1, reports
    assert "INSUFFICIENT_FUNDS" in reports[0] and kit.tenant in reports[0] and "rsv_" in reports[0]
    # With the money back the release still waits out the retry delay, then
    # goes through, once.
    await kit.ok(kit.move(key(), "bank", "reserve", 1_000))
    kit.clock.advance(kit.ledger.config.reserves.refused_retry_s - 1)
    assert await kit.ledger.release_due_reserves() == 0
    kit.clock.advance(1)
    assert await kit.ledger.release_due_reserves() == 1
    assert await kit.ledger.release_due_reserves() == 0
    assert (await kit.balance("reserve"))[0] == 0
    assert (await kit.balance("merchant"))[0] == 8_700 + 1_000
    await kit.assert_balanced()


async def test_refunds_partial_then_full_never_beyond_the_original(kit: Kit) -> None:
    await kit.fund("alice", 10_000)
    paid = await kit.ok(
        kit.move(
            key(), "alice", "merchant", 10_000, splits=[bps_leg("fee", 290), fixed_leg("tax", 33)]
        )
    )
    assert paid.entry is not None
    entry_id = paid.entry.entry_id
    first = await kit.ok(kit.refund(key(), entry_id, 2_500))
    assert first.entry is not None and first.entry.refers_to_entry_id == entry_id
    assert first.entry.kind == Kind.REFUND
    sides = {p.side for p in first.entry.postings if p.account_id == "alice"}
    assert sides == {Side.CREDIT}
    await refused(
        kit,
        kit.refund(key(), entry_id, 7_501),
        "REFUND_EXCEEDS_ENTRY",
        field="transfers[0].amount.amount_minor",
        code=Code.OUT_OF_RANGE,
    )
    rest = await kit.ok(kit.refund(key(), entry_id))
    assert rest.entry is not None and rest.entry.amount_minor == 7_500
    await refused(kit, kit.refund(key(), entry_id, 1), "ENTRY_FULLY_REFUNDED")
    original = await kit.ledger.get_entry(kit.tenant, entry_id, "")
    assert original.refunded_minor == 10_000
    # Everyone is back where they were: the full refund reversed each leg exactly.
    for account_id in ("merchant", "fee", "tax"):
        assert (await kit.balance(account_id))[0] == 0
    assert (await kit.balance("alice"))[0] == 10_000
    await kit.assert_balanced()


async def test_refund_after_the_reserve_release_charges_the_release_account(kit: Kit) -> None:
    paid, _ = await _reserve_payment(kit)
    assert paid.entry is not None
    kit.clock.advance(DAY_S)
    assert await kit.ledger.release_due_reserves() == 1
    refund = await kit.ok(kit.refund(key(), paid.entry.entry_id))
    assert refund.entry is not None
    debited: dict[str, int] = {}
    for posting in refund.entry.postings:
        assert posting.side == Side.DEBIT or posting.account_id == "alice"
        if posting.side == Side.DEBIT:
            debited[posting.account_id] = debited.get(posting.account_id, 0) + posting.amount_minor
    # The reserve leg (1000) comes back from merchant, where it was released to.
    assert debited == {"fee": 300, "merchant": 9_700}
    assert (await kit.balance("reserve"))[0] == 0
    assert (await kit.balance("merchant"))[0] == 0
    assert (await kit.balance("alice"))[0] == 10_000
    await kit.assert_balanced()


async def test_refund_before_the_release_shrinks_the_release(kit: Kit) -> None:
    paid, _ = await _reserve_payment(kit)
    assert paid.entry is not None
    await kit.ok(kit.refund(key(), paid.entry.entry_id, 5_000))
    assert (await kit.balance("reserve"))[0] == 500
    kit.clock.advance(DAY_S)
    assert await kit.ledger.release_due_reserves() == 1
    assert (await kit.balance("reserve"))[0] == 0
    assert (await kit.balance("merchant"))[0] == 4_350 + 500
    rest = await kit.ok(kit.refund(key(), paid.entry.entry_id))
    assert rest.entry is not None and rest.entry.amount_minor == 5_000
    for account_id in ("merchant", "fee", "reserve"):
        assert (await kit.balance(account_id))[0] == 0
    await kit.assert_balanced()


async def test_holds_and_refunds_are_not_refundable_entries(kit: Kit) -> None:
    paid = await kit.fund("alice", 1_000)
    assert paid.entry is not None
    refund = await kit.ok(kit.refund(key(), paid.entry.entry_id, 10))
    assert refund.entry is not None
    await refused(kit, kit.refund(key(), refund.entry.entry_id, 1), "ENTRY_NOT_REFUNDABLE")
    await refused(kit, kit.refund(key(), "ent_nosuch", 1), "ENTRY_NOT_FOUND", code=Code.NOT_FOUND)


# ---- balance limits ----


async def test_overdraft_limit(kit: Kit) -> None:
    await kit.ok(kit.move(key(), "bob", "merchant", 500))
    assert await kit.balance("bob") == (-500, 0, -500)
    await refused(kit, kit.move(key(), "bob", "merchant", 1), "INSUFFICIENT_FUNDS")
    await refused(kit, kit.authorize(key(), "bob", "merchant", 1), "INSUFFICIENT_FUNDS")
    await kit.fund("bob", 1)
    await kit.ok(kit.move(key(), "bob", "merchant", 1))
    await kit.assert_balanced()


async def test_credits_must_not_exceed_debits(kit: Kit) -> None:
    await refused(
        kit,
        kit.move(key(), "bank", "loan", 1),
        "CREDIT_LIMIT_EXCEEDED",
        code=Code.FAILED_PRECONDITION,
    )
    await kit.ok(kit.move(key(), "loan", "alice", 100))
    await kit.ok(kit.move(key(), "alice", "loan", 60))
    await refused(kit, kit.move(key(), "bank", "loan", 41), "CREDIT_LIMIT_EXCEEDED")
    await refused(kit, kit.authorize(key(), "bank", "loan", 41), "CREDIT_LIMIT_EXCEEDED")
    await kit.ok(kit.move(key(), "bank", "loan", 40))
    await kit.assert_balanced()


async def test_balance_overflow_is_out_of_range(kit: Kit) -> None:
    await kit.ok(kit.move(key(), "bank", "fee", INT64_MAX))
    outcome = await refused(
        kit, kit.move(key(), "bank", "tax", 1), "BALANCE_OVERFLOW", code=Code.OUT_OF_RANGE
    )
    assert outcome.error is not None and outcome.error.field == "transfers[0].debit_account_id"
    await refused(kit, kit.move(key(), "tax", "fee", 1), "BALANCE_OVERFLOW")
    await kit.assert_balanced()


async def test_a_refusal_on_the_credit_account_names_that_field(kit: Kit) -> None:
    """The credit account (the remainder leg) is a field of the request: a
    constraint or overflow it breaks is reported against it, as the debit
    account's are."""
    await refused(
        kit,
        kit.move(key(), "bank", "loan", 1),
        "CREDIT_LIMIT_EXCEEDED",
        field="transfers[0].credit_account_id",
    )
    await kit.ok(kit.move(key(), "bank", "fee", INT64_MAX))
    await refused(
        kit,
        kit.move(key(), "tax", "fee", 1),
        "BALANCE_OVERFLOW",
        field="transfers[0].credit_account_id",
    )


async def test_ledger_checks_balance_when_total_volume_exceeds_int64(kit: Kit) -> None:
    """Each counter fits in int64, but the sum of all debits of a currency
    across accounts does not: the check must still answer, not crash."""
    await kit.ok(kit.move(key(), "bank", "fee", INT64_MAX))
    await kit.ok(kit.move(key(), "fee", "tax", INT64_MAX))
    await kit.assert_balanced()


async def test_currency_mismatch_with_the_account(kit: Kit) -> None:
    await refused(
        kit,
        kit.move(key(), "bank", "jcust", 100, "USD"),
        "CURRENCY_MISMATCH",
        field="transfers[0].credit_account_id",
        code=Code.INVALID_ARGUMENT,
    )
    await kit.ok(kit.move(key(), "jbank", "jcust", 100, "JPY"))
    await kit.assert_balanced()


# ---- idempotency ----


async def test_retry_returns_the_original_and_writes_nothing(kit: Kit) -> None:
    k = key()
    command = kit.move(k, "bank", "alice", 1_000)
    first = await kit.ok(command)
    before = kit.snapshot()
    again = await kit.ok(command)
    assert again.replayed and not first.replayed
    assert again.entry is not None and first.entry is not None
    assert again.entry.entry_id == first.entry.entry_id
    # A retry may carry a freshly signed token (another token id).
    fresh = kit.move(k, "bank", "alice", 1_000)
    assert fresh.decision_token != command.decision_token
    third = await kit.ok(fresh)
    assert third.replayed and third.entry is not None
    assert third.entry.entry_id == first.entry.entry_id
    assert kit.snapshot() == before
    assert kit.probe.entries_by_key(kit.tenant)[k] == 1


async def test_retries_of_holds_captures_voids_and_refunds_replay(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth_cmd = kit.authorize(key(), "alice", "merchant", 400)
    auth = await kit.ok(auth_cmd)
    assert auth.hold is not None
    again = await kit.ok(auth_cmd)
    assert again.replayed and again.hold is not None and again.hold.hold_id == auth.hold.hold_id
    capture_cmd = kit.capture(key(), auth.hold.hold_id, 100)
    captured = await kit.ok(capture_cmd)
    replay = await kit.ok(capture_cmd)
    assert replay.replayed and replay.entry is not None and captured.entry is not None
    assert replay.entry.entry_id == captured.entry.entry_id
    refund_cmd = kit.refund(key(), captured.entry.entry_id, 40)
    refunded = await kit.ok(refund_cmd)
    replayed_refund = await kit.ok(refund_cmd)
    assert replayed_refund.replayed and refunded.entry is not None
    assert replayed_refund.entry is not None
    assert replayed_refund.entry.entry_id == refunded.entry.entry_id
    original = await kit.ledger.get_entry(kit.tenant, captured.entry.entry_id, "")
    assert original.refunded_minor == 40
    auth2 = await kit.ok(kit.authorize(key(), "alice", "merchant", 100))
    assert auth2.hold is not None
    void_cmd = kit.void(key(), auth2.hold.hold_id)
    await kit.ok(void_cmd)
    before = kit.snapshot()
    assert (await kit.ok(void_cmd)).replayed
    assert kit.snapshot() == before
    await kit.assert_balanced()


async def test_a_remembered_failure_is_returned_even_after_funding(kit: Kit) -> None:
    k = key()
    command = kit.move(k, "alice", "merchant", 100)
    first = await kit.one(command)
    assert first.error is not None and first.error.reason == "INSUFFICIENT_FUNDS"
    assert not first.replayed
    await kit.fund("alice", 1_000)
    before = kit.snapshot()
    again = await kit.one(command)
    assert again.replayed
    assert again.error is not None and again.error.reason == "INSUFFICIENT_FUNDS"
    assert kit.snapshot() == before
    assert k not in kit.probe.entries_by_key(kit.tenant)
    # A new key goes through.
    await kit.ok(kit.move(key(), "alice", "merchant", 100))


async def test_a_request_level_failure_is_not_remembered(kit: Kit) -> None:
    k = key()
    outcome = await kit.one(kit.move(k, "bank", "nosuch", 100))
    assert outcome.error is not None and outcome.error.reason == "ACCOUNT_NOT_FOUND"
    await kit.open(("nosuch", "USD", 1, 0))
    ok = await kit.ok(kit.move(k, "bank", "nosuch", 100))
    assert not ok.replayed


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"amount_minor": 101}, "transfers[0].amount.amount_minor"),
        ({"credit_account_id": "bob"}, "transfers[0].credit_account_id"),
        ({"description": "other"}, "transfers[0].description"),
        ({"kind": Kind.PAYOUT}, "transfers[0].kind"),
    ],
)
async def test_same_key_different_payload_is_already_exists(
    kit: Kit, change: dict[str, object], field: str
) -> None:
    k = key()
    await kit.ok(kit.move(k, "bank", "alice", 100))
    args: dict[str, object] = {"amount_minor": 100, "credit_account_id": "alice"}
    args.update(change)
    amount = int(args["amount_minor"])  # type: ignore[call-overload]
    other = kit.move(
        k,
        "bank",
        str(args["credit_account_id"]),
        amount,
        kind=Kind(args.get("kind", Kind.TRANSFER)),  # type: ignore[arg-type]
        description=str(args.get("description", "")),
    )
    before = kit.snapshot()
    outcome = await kit.one(other)
    assert outcome.error is not None
    assert (outcome.error.code, outcome.error.reason, outcome.error.field) == (
        Code.ALREADY_EXISTS,
        "IDEMPOTENCY_KEY_REUSED",
        field,
    )
    assert kit.snapshot() == before
    assert kit.probe.entries_by_key(kit.tenant)[k] == 1


async def test_reused_key_after_a_remembered_failure_names_the_field(kit: Kit) -> None:
    k = key()
    assert (await kit.one(kit.move(k, "alice", "merchant", 100))).error is not None
    outcome = await kit.one(kit.move(k, "alice", "merchant", 50))
    assert outcome.error is not None and outcome.error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert outcome.error.field == "transfers[0].amount.amount_minor"


async def test_keys_are_scoped_per_tenant(kit: Kit) -> None:
    other = unique_tenant()
    await kit.ledger.create_tenant(other, "Other")
    await kit.open(("bank", "USD", 1, 0), ("alice", "USD", DEBITS_LIMITED, 0), tenant=other)
    k = key()
    mine = await kit.ok(kit.move(k, "bank", "alice", 100))
    theirs = await kit.ok(kit.move(k, "bank", "alice", 999, tenant=other))
    assert not theirs.replayed
    assert mine.entry is not None and theirs.entry is not None
    assert mine.entry.entry_id != theirs.entry.entry_id
    assert (await kit.ledger.get_account(other, "alice")).posted == 999
    assert (await kit.ledger.get_account(kit.tenant, "alice")).posted == 100


# ---- batches ----


async def test_atomic_batch_is_all_or_nothing(kit: Kit) -> None:
    await kit.fund("alice", 100)
    before = kit.snapshot()
    entries = kit.probe.entry_count(kit.tenant)
    batch = [
        kit.move(key(), "bank", "bob", 50),
        kit.move(key(), "alice", "merchant", 60),
        kit.move(key(), "alice", "merchant", 60),
        kit.move(key(), "bank", "fee", 5),
    ]
    outcomes = await kit.submit(*batch, atomic=True)
    reasons = [o.error.reason if o.error else "" for o in outcomes]
    assert reasons == [
        "LINKED_TRANSFER_FAILED",
        "LINKED_TRANSFER_FAILED",
        "INSUFFICIENT_FUNDS",
        "LINKED_TRANSFER_FAILED",
    ]
    assert all(o.entry is None for o in outcomes)
    assert outcomes[0].error is not None and outcomes[0].error.field == "transfers[0]"
    assert outcomes[2].error is not None
    assert outcomes[2].error.field == "transfers[2].debit_account_id"
    assert kit.snapshot() == before
    assert kit.probe.entry_count(kit.tenant) == entries
    # The failure is remembered under its own key only: the batch retried
    # fails the same way, replaying it; its neighbours were judged afresh.
    again = await kit.submit(*batch, atomic=True)
    assert [o.error.reason if o.error else "" for o in again] == reasons
    assert [o.replayed for o in again] == [False, False, True, False]
    assert kit.snapshot() == before


async def test_atomic_batch_commits_together(kit: Kit) -> None:
    outcomes = await kit.submit(
        kit.move(key(), "bank", "alice", 100),
        kit.move(key(), "alice", "merchant", 100),
        atomic=True,
    )
    assert all(o.error is None and o.entry is not None for o in outcomes)
    assert (await kit.balance("merchant"))[0] == 100
    await kit.assert_balanced()


async def test_atomic_batch_with_a_request_error_writes_nothing(kit: Kit) -> None:
    before = kit.snapshot()
    outcomes = await kit.submit(
        kit.move(key(), "bank", "alice", 100),
        kit.move(key(), "bank", "nosuch", 100),
        atomic=True,
    )
    assert [o.error.reason if o.error else "" for o in outcomes] == [
        "LINKED_TRANSFER_FAILED",
        "ACCOUNT_NOT_FOUND",
    ]
    assert kit.snapshot() == before


async def test_atomic_batch_with_a_replayed_transfer_and_a_failure(kit: Kit) -> None:
    """A transfer committed earlier, retried inside an atomic batch that then
    fails: the batch writes nothing new, and the earlier transfer is neither
    duplicated nor reported as failed."""
    done = kit.move(key(), "bank", "alice", 100)
    first = await kit.ok(done)
    assert first.entry is not None
    before = kit.snapshot()
    outcomes = await kit.submit(done, kit.move(key(), "merchant", "bob", 10), atomic=True)
    assert outcomes[1].error is not None
    assert outcomes[1].error.reason == "INSUFFICIENT_FUNDS"
    assert kit.snapshot() == before
    assert kit.probe.entries_by_key(kit.tenant)[done.idempotency_key] == 1
    # Retrying the transfer alone still replays the original entry.
    again = await kit.ok(done)
    assert again.replayed and again.entry is not None
    assert again.entry.entry_id == first.entry.entry_id


async def test_atomic_batch_with_the_same_key_twice(kit: Kit) -> None:
    """Two transfers of one atomic batch under one key: the first commits, the
    second replays it (the batch remembers keys as it runs), and the batch
    commits with one entry; the same key for another request in the batch is
    refused as reused, and then nothing of that batch is written."""
    k = key()
    command = kit.move(k, "bank", "alice", 100)
    first, second = await kit.submit(command, command, atomic=True)
    assert first.error is None and second.error is None, (first, second)
    assert first.entry is not None and second.entry is not None
    assert (first.replayed, second.replayed) == (False, True)
    assert second.entry.entry_id == first.entry.entry_id
    assert kit.probe.entries_by_key(kit.tenant)[k] == 1
    assert (await kit.balance("alice"))[0] == 100
    # Retried alone afterwards: the same entry again.
    again = await kit.ok(command)
    assert again.replayed and again.entry is not None
    assert again.entry.entry_id == first.entry.entry_id

    before = kit.snapshot()
    k2 = key()
    outcomes = await kit.submit(
        kit.move(k2, "bank", "alice", 100), kit.move(k2, "bank", "alice", 101), atomic=True
    )
    assert [(o.error.reason, o.error.field) if o.error else "" for o in outcomes] == [
        ("LINKED_TRANSFER_FAILED", "transfers[0]"),
        ("IDEMPOTENCY_KEY_REUSED", "transfers[1].amount.amount_minor"),
    ]
    assert kit.snapshot() == before
    assert k2 not in kit.probe.entries_by_key(kit.tenant)
    # A request error is not remembered: the key is still free.
    fresh = await kit.ok(kit.move(k2, "bank", "alice", 101))
    assert not fresh.replayed
    await kit.assert_balanced()


async def test_non_atomic_batch_failures_do_not_touch_neighbours(kit: Kit) -> None:
    outcomes = await kit.submit(
        kit.move(key(), "bank", "alice", 100),
        kit.move(key(), "merchant", "bob", 10),  # insufficient
        kit.move(key(), "bank", "bob", 30),
        kit.move(key(), "bank", "nosuch", 10),  # unknown account
        kit.move(key(), "bank", "fee", 5, token="v1.bad.token"),  # bad token
        kit.move(key(), "alice", "merchant", 100),  # sees the first one's credit
    )
    reasons = [o.error.reason if o.error else "" for o in outcomes]
    assert reasons == [
        "",
        "INSUFFICIENT_FUNDS",
        "",
        "ACCOUNT_NOT_FOUND",
        "DECISION_TOKEN_MALFORMED",
        "",
    ]
    assert outcomes[3].error is not None
    assert outcomes[3].error.field == "transfers[3].credit_account_id"
    assert (await kit.balance("alice"))[0] == 0
    assert (await kit.balance("bob"))[0] == 30
    assert (await kit.balance("merchant"))[0] == 100
    assert (await kit.balance("fee"))[0] == 0
    await kit.assert_balanced()


# ---- tenant walls ----


async def _other_tenant(kit: Kit) -> str:
    other = unique_tenant()
    await kit.ledger.create_tenant(other, "Other")
    await kit.open(("bank", "USD", 1, 0), ("theirs", "USD", 1, 0), tenant=other)
    return other


async def test_another_tenants_account_is_not_found(kit: Kit) -> None:
    other = await _other_tenant(kit)
    await refused(
        kit,
        kit.move(key(), "bank", "theirs", 10),
        "ACCOUNT_NOT_FOUND",
        field="transfers[0].credit_account_id",
        code=Code.NOT_FOUND,
    )
    await refused(
        kit,
        kit.move(key(), "theirs", "alice", 10),
        "ACCOUNT_NOT_FOUND",
        field="transfers[0].debit_account_id",
        code=Code.NOT_FOUND,
    )
    with pytest.raises(NotFound):
        await kit.ledger.get_account(kit.tenant, "theirs")
    with pytest.raises(NotFound):
        await kit.ledger.balance_as_of(kit.tenant, "theirs", kit.clock.now_us())
    with pytest.raises(NotFound):
        await kit.ledger.list_postings(kit.tenant, "theirs", 10, 0)
    assert (await kit.ledger.get_account(other, "theirs")).posted == 0


async def test_another_tenants_entries_and_holds_are_not_found(kit: Kit) -> None:
    other = await _other_tenant(kit)
    k = key()
    paid = await kit.ok(kit.move(k, "bank", "theirs", 100, tenant=other))
    auth = await kit.ok(kit.move(key(), "bank", "theirs", 50, kind=Kind.AUTHORIZE, tenant=other))
    assert paid.entry is not None and auth.hold is not None
    with pytest.raises(NotFound):
        await kit.ledger.get_entry(kit.tenant, paid.entry.entry_id, "")
    with pytest.raises(NotFound):
        await kit.ledger.get_entry(kit.tenant, "", k)
    with pytest.raises(NotFound):
        await kit.ledger.get_hold(kit.tenant, auth.hold.hold_id)
    await refused(
        kit, kit.refund(key(), paid.entry.entry_id), "ENTRY_NOT_FOUND", code=Code.NOT_FOUND
    )
    await refused(kit, kit.capture(key(), auth.hold.hold_id), "HOLD_NOT_FOUND", code=Code.NOT_FOUND)
    await refused(kit, kit.void(key(), auth.hold.hold_id), "HOLD_NOT_FOUND")
    hold = await kit.ledger.get_hold(other, auth.hold.hold_id)
    assert hold.state == HoldState.PENDING


async def test_a_token_for_another_tenant_is_refused(kit: Kit) -> None:
    other = await _other_tenant(kit)
    k = key()
    mine = kit.move(k, "bank", "alice", 10, token="")
    await refused(
        kit,
        kit.with_token(mine, tenant_id=other),
        "DECISION_TOKEN_MISMATCH",
        field="transfers[0].decision_token.tenant_id",
        code=Code.PERMISSION_DENIED,
    )


async def test_check_balanced_sees_only_its_own_tenant(kit: Kit) -> None:
    """Tenant ids may contain '_'; the balance check must not take another
    tenant whose id matches it as a pattern."""
    suffix = uuid.uuid4().hex[:12]
    mine, theirs = f"w{suffix}_a", f"w{suffix}xa"
    for tenant in (mine, theirs):
        await kit.ledger.create_tenant(tenant, tenant)
        await kit.open(("bank", "USD", 1, 0), ("cust", "USD", 1, 0), tenant=tenant)
    await kit.ok(kit.move(key(), "bank", "cust", 12_345, tenant=theirs))
    check = await kit.ledger.check_balanced(mine)
    assert check.balanced
    assert check.postings_checked == 0, check
    assert all(t.debits_minor == 0 for t in check.totals), check.totals


# ---- decision tokens ----


@pytest.mark.parametrize(
    ("mutation", "reason", "field_suffix"),
    [
        ("missing", "DECISION_TOKEN_MISSING", ""),
        ("malformed", "DECISION_TOKEN_MALFORMED", ""),
        ("bad_signature", "DECISION_TOKEN_BAD_SIGNATURE", ""),
        ("unknown_key", "DECISION_TOKEN_UNKNOWN_KEY", ""),
        ("deny", "DECISION_NOT_ALLOW", ""),
        ("audience", "DECISION_TOKEN_WRONG_AUDIENCE", ".aud"),
        ("tenant", "DECISION_TOKEN_MISMATCH", ".tenant_id"),
        ("kind", "DECISION_TOKEN_MISMATCH", ".kind"),
        ("debit", "DECISION_TOKEN_MISMATCH", ".debit_account_id"),
        ("credit", "DECISION_TOKEN_MISMATCH", ".credit_account_id"),
        ("amount", "DECISION_TOKEN_MISMATCH", ".amount_minor"),
        ("currency", "DECISION_TOKEN_MISMATCH", ".currency"),
        ("splits", "DECISION_TOKEN_MISMATCH", ".splits_digest"),
        ("key", "DECISION_TOKEN_MISMATCH", ".idempotency_key"),
        ("hold", "DECISION_TOKEN_MISMATCH", ".hold_id"),
        ("entry", "DECISION_TOKEN_MISMATCH", ".entry_id"),
        # Beyond the allowed clock skew, either way.
        ("expired", "DECISION_TOKEN_EXPIRED", ""),
        ("future", "DECISION_TOKEN_NOT_YET_VALID", ""),
    ],
)
@pytest.mark.parametrize("kind", [Kind.TRANSFER, Kind.AUTHORIZE, Kind.PAYOUT])
async def test_decision_token_checks(
    kit: Kit, kind: Kind, mutation: str, reason: str, field_suffix: str
) -> None:
    await kit.fund("alice", 1_000)
    k = key()
    command = kit.move(k, "alice", "merchant", 100, kind=kind, token="")
    other_kind = "payout" if kind != Kind.PAYOUT else "transfer"
    skew = kit.ledger.config.tokens.clock_skew_s
    tokens = {
        "missing": lambda: "",
        "malformed": lambda: "v1.nonsense",
        "bad_signature": lambda: _flip_signature(kit.token_for(command)),
        "unknown_key": lambda: kit.token_for(command, signer=new_signer()),
        "deny": lambda: kit.token_for(command, outcome="deny"),
        "audience": lambda: kit.token_for(command, audience="triplane.gateway"),
        "tenant": lambda: kit.token_for(command, tenant_id="someone-else"),
        "kind": lambda: kit.token_for(command, kind=other_kind),
        "debit": lambda: kit.token_for(command, debit_account_id="bob"),
        "credit": lambda: kit.token_for(command, credit_account_id="bob"),
        "amount": lambda: kit.token_for(command, amount_minor=101),
        "currency": lambda: kit.token_for(command, currency="EUR"),
        "splits": lambda: kit.token_for(command, splits_digest="another-split"),
        "key": lambda: kit.token_for(command, idempotency_key="another-key"),
        "hold": lambda: kit.token_for(command, hold_id="hld_x"),
        "entry": lambda: kit.token_for(command, entry_id="ent_x"),
        "expired": lambda: kit.token_for(command, issued_ago_s=60 + skew, ttl_s=59),
        "future": lambda: kit.token_for(command, issued_ago_s=-(skew + 60)),
    }
    forged = msgspec.structs.replace(command, decision_token=tokens[mutation]())
    spent = kit.probe.used_tokens(kit.tenant)
    await refused(
        kit,
        forged,
        reason,
        field=f"transfers[0].decision_token{field_suffix}",
        code=Code.PERMISSION_DENIED,
    )
    assert kit.probe.hold_count(kit.tenant) == 0
    # Neither remembered nor spent: the same key with a good token goes through.
    assert kit.probe.used_tokens(kit.tenant) == spent
    await kit.ok(kit.with_token(command))


def _flip_signature(token: str) -> str:
    header, body, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    return f"{header}.{body}.{flipped}"


async def test_a_purchase_decision_is_not_a_payout(kit: Kit) -> None:
    """A token for a hold (what a purchase is decided as) cannot pay out the
    same amount between the same accounts under the same key."""
    await kit.fund("alice", 1_000)
    k = key()
    authorize = kit.authorize(k, "alice", "merchant", 100)
    payout = kit.move(k, "alice", "merchant", 100, kind=Kind.PAYOUT, token=authorize.decision_token)
    await refused(
        kit,
        payout,
        "DECISION_TOKEN_MISMATCH",
        field="transfers[0].decision_token.kind",
        code=Code.PERMISSION_DENIED,
    )
    assert kit.probe.entry_count(kit.tenant) == 1  # the funding only


async def test_expired_token_still_replays_a_committed_transfer(kit: Kit) -> None:
    k = key()
    command = kit.with_token(kit.move(k, "bank", "alice", 100, token=""), ttl_s=60)
    first = await kit.ok(command)
    kit.clock.advance(3_600)
    again = await kit.ok(command)
    assert again.replayed and again.entry is not None and first.entry is not None
    assert again.entry.entry_id == first.entry.entry_id
    # A new transfer with an expired token is refused.
    stale = kit.with_token(
        kit.move(key(), "bank", "alice", 100, token=""), issued_ago_s=7_200, ttl_s=3_600
    )
    await refused(kit, stale, "DECISION_TOKEN_EXPIRED")


async def test_token_within_clock_skew_is_accepted(kit: Kit) -> None:
    skew = kit.ledger.config.tokens.clock_skew_s
    late = kit.move(key(), "bank", "alice", 100, token="")
    await kit.ok(kit.with_token(late, issued_ago_s=60 + skew - 1, ttl_s=60))
    early = kit.move(key(), "bank", "alice", 100, token="")
    await kit.ok(kit.with_token(early, issued_ago_s=-(skew - 1)))


# ---- spent token ids ----


async def test_a_retry_of_the_same_transfer_with_the_same_token_is_idempotent(kit: Kit) -> None:
    command = kit.move(key(), "bank", "alice", 100)
    first = await kit.ok(command)
    again = await kit.ok(command)
    assert again.replayed and again.entry == first.entry
    assert len(kit.probe.used_tokens(kit.tenant)) == 1


async def test_a_token_id_is_spent_even_by_a_failure_that_is_not_remembered(kit: Kit) -> None:
    """The transfer fails for a reason that frees its idempotency key (an
    account that does not exist yet); the token cannot then move money for
    another transfer under that key, but the same transfer may be retried."""
    k = key()
    tried = kit.move(k, "bank", "late", 100, description="first try")
    await refused(kit, tried, "ACCOUNT_NOT_FOUND", code=Code.NOT_FOUND)
    assert kit.probe.idempotency_count(kit.tenant) == 0
    await kit.open(("late", "USD", 1, 0))
    another = msgspec.structs.replace(tried, description="another transfer")
    await refused(
        kit,
        another,
        "DECISION_TOKEN_REUSED",
        field="transfers[0].decision_token",
        code=Code.PERMISSION_DENIED,
    )
    assert kit.probe.entry_count(kit.tenant) == 0
    # The same transfer with its token: allowed (the failure was not remembered).
    await kit.ok(tried)
    assert kit.probe.entry_count(kit.tenant) == 1


async def test_a_token_spent_in_a_failed_atomic_batch_stays_spent(kit: Kit) -> None:
    good = kit.move(key(), "bank", "alice", 100)
    bad = kit.move(key(), "alice", "merchant", 1_000_000)  # INSUFFICIENT_FUNDS
    outcomes = await kit.submit(good, bad, atomic=True)
    assert [o.error.reason for o in outcomes if o.error] == [
        "LINKED_TRANSFER_FAILED",
        "INSUFFICIENT_FUNDS",
    ]
    assert kit.probe.entry_count(kit.tenant) == 0
    another = msgspec.structs.replace(good, metadata={"note": "something else"})
    await refused(kit, another, "DECISION_TOKEN_REUSED", code=Code.PERMISSION_DENIED)
    await kit.ok(good)


async def test_one_token_twice_in_one_request_moves_money_once(kit: Kit) -> None:
    first = kit.move(key(), "bank", "alice", 100)
    twin = msgspec.structs.replace(first, description="the same token again")
    outcomes = await kit.submit(first, twin)
    assert outcomes[0].error is None
    assert outcomes[1].error is not None
    # The twin differs in its description under the same key: the key refuses it.
    assert outcomes[1].error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert kit.probe.entry_count(kit.tenant) == 1


async def test_spent_token_ids_are_forgotten_after_their_retention(kit: Kit) -> None:
    tokens = kit.ledger.config.tokens
    await kit.ok(kit.with_token(kit.move(key(), "bank", "alice", 100, token=""), ttl_s=60))
    assert len(kit.probe.used_tokens(kit.tenant)) == 1
    assert await kit.ledger.purge_used_tokens() == 0
    kit.clock.advance(60 + tokens.used_retention_s - 1)
    assert await kit.ledger.purge_used_tokens() == 0
    kit.clock.advance(2)
    assert await kit.ledger.purge_used_tokens() == 1
    assert kit.probe.used_tokens(kit.tenant) == {}


# ---- captures and refunds under a decision ----


async def test_captures_without_splits_and_voids_need_no_token(kit: Kit) -> None:
    await kit.fund("alice", 200)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 100))
    assert auth.hold is not None
    captured = await kit.ok(kit.capture(key(), auth.hold.hold_id))
    assert captured.entry is not None
    assert captured.entry.decision_id == f"dec-{auth.hold.idempotency_key}"
    assert captured.entry.credit_account_id == "merchant"
    other = await kit.ok(kit.authorize(key(), "alice", "merchant", 50))
    assert other.hold is not None
    await kit.ok(kit.void(key(), other.hold.hold_id))


async def test_a_capture_with_splits_carries_its_own_decision(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    auth = await kit.ok(kit.authorize(key(), "alice", "merchant", 500))
    assert auth.hold is not None
    hold_id = auth.hold.hold_id
    splits = [fixed_leg("fee", 25, "platform_fee")]
    await refused(
        kit,
        kit.capture(key(), hold_id, splits=splits, token=""),
        "DECISION_TOKEN_MISSING",
        code=Code.PERMISSION_DENIED,
    )
    k = key()
    unsplit = kit.capture(k, hold_id, token="")
    # A token for the capture without splits cannot add a destination.
    await refused(
        kit,
        kit.capture(k, hold_id, splits=splits, token=kit.token_for(unsplit)),
        "DECISION_TOKEN_MISMATCH",
        field="transfers[0].decision_token.splits_digest",
        code=Code.PERMISSION_DENIED,
    )
    # Nor one naming another payee, nor another amount.
    wanted = kit.capture(k, hold_id, splits=splits, token="")
    for terms, claim in (
        ({"credit_account_id": "bob"}, "credit_account_id"),
        ({"amount_minor": 400}, "amount_minor"),
    ):
        await refused(
            kit,
            kit.with_token(wanted, **terms),
            "DECISION_TOKEN_MISMATCH",
            field=f"transfers[0].decision_token.{claim}",
            code=Code.PERMISSION_DENIED,
        )
    # Legs in another order are the same splits.
    two = [fixed_leg("fee", 25, "platform_fee"), fixed_leg("tax", 10, "tax")]
    reordered = kit.capture(k, hold_id, splits=list(reversed(two)), token="")
    token = kit.token_for(kit.capture(k, hold_id, splits=two, token=""))
    captured = await kit.ok(msgspec.structs.replace(reordered, decision_token=token))
    assert captured.entry is not None
    assert captured.entry.decision_id == f"dec-{k}"
    await kit.assert_balanced()


async def test_a_refund_is_decided_for_its_entry_accounts_and_amount(kit: Kit) -> None:
    await kit.fund("alice", 1_000)
    paid = await kit.ok(kit.move(key(), "alice", "merchant", 600))
    other = await kit.ok(kit.move(key(), "alice", "merchant", 300))
    assert paid.entry is not None and other.entry is not None
    k = key()
    refund = kit.refund(k, paid.entry.entry_id, 200, token="")
    await refused(
        kit,
        refund,
        "DECISION_TOKEN_MISSING",
        field="transfers[0].decision_token",
        code=Code.PERMISSION_DENIED,
    )
    for terms, claim in (
        # To another instrument than the one the payment debited.
        ({"credit_account_id": "bob"}, "credit_account_id"),
        ({"debit_account_id": "fee"}, "debit_account_id"),
        ({"amount_minor": 201}, "amount_minor"),
        ({"entry_id": other.entry.entry_id}, "entry_id"),
    ):
        await refused(
            kit,
            kit.with_token(refund, **terms),
            "DECISION_TOKEN_MISMATCH",
            field=f"transfers[0].decision_token.{claim}",
            code=Code.PERMISSION_DENIED,
        )
    # A refund of the whole rest names the amount it will move.
    whole = kit.refund(key(), paid.entry.entry_id, token="")
    assert kit.movement(whole).amount_minor == 600
    await kit.ok(kit.with_token(refund))
    original = await kit.ledger.get_entry(kit.tenant, paid.entry.entry_id, "")
    assert (original.refunded_minor, original.refund_count) == (200, 1)
    assert kit.movement(whole).amount_minor == 400
    await kit.ok(kit.with_token(whole))
    assert await kit.balance("alice") == (1_000 - 300, 0, 1_000 - 300)
    await kit.assert_balanced()


# ---- reads ----


async def test_point_in_time_balance(kit: Kit) -> None:
    t0 = kit.clock.now_us()
    await kit.fund("alice", 1_000)
    kit.clock.advance(10)
    t1 = kit.clock.now_us()
    await kit.ok(kit.move(key(), "alice", "merchant", 300))
    await kit.ok(kit.authorize(key(), "alice", "merchant", 200))
    kit.clock.advance(10)
    at_t0 = await kit.ledger.balance_as_of(kit.tenant, "alice", t0)
    assert (at_t0.posted, at_t0.debits_pending) == (1_000, 0)
    before_t0 = await kit.ledger.balance_as_of(kit.tenant, "alice", t0 - 1)
    assert before_t0.posted == 0
    at_t1 = await kit.ledger.balance_as_of(kit.tenant, "alice", t1)
    assert (at_t1.debits_posted, at_t1.credits_posted) == (300, 1_000)
    now = await kit.ledger.get_account(kit.tenant, "alice")
    assert (now.posted, now.available) == (700, 500)


async def test_history_pages_through_every_posting_once(kit: Kit) -> None:
    for _ in range(23):
        await kit.fund("alice", 1)
    await kit.ok(kit.move(key(), "alice", "merchant", 5))
    seen: list[int] = []
    after = 0
    pages = 0
    while True:
        page = await kit.ledger.list_postings(kit.tenant, "alice", 10, after)
        pages += 1
        if not page:
            break
        seen.extend(r.sequence for r in page)
        assert all(r.account_id == "alice" for r in page)
        after = page[-1].sequence
        if len(page) < 10:
            break
    assert pages == 3
    assert len(seen) == 24 and len(set(seen)) == 24 and seen == sorted(seen)
    last = await kit.ledger.list_postings(kit.tenant, "alice", 10, seen[-2])
    assert [r.side for r in last] == [Side.DEBIT] and last[0].amount_minor == 5
    # One page-size rule (triplane.runtime.codec): above the maximum is served
    # as the maximum, negative is refused.
    assert len(await kit.ledger.list_postings(kit.tenant, "alice", 1_001, 0)) == 24
    with pytest.raises(InvalidArgument) as caught:
        await kit.ledger.list_postings(kit.tenant, "alice", -1, 0)
    assert (caught.value.reason, caught.value.field) == ("PAGE_SIZE_INVALID", "page_size")


async def test_entry_lookup_by_id_and_by_idempotency_key(kit: Kit) -> None:
    k = key()
    paid = await kit.ok(
        kit.move(k, "bank", "alice", 100, description="hello", metadata={"order": "42"})
    )
    assert paid.entry is not None
    by_id = await kit.ledger.get_entry(kit.tenant, paid.entry.entry_id, "")
    by_key = await kit.ledger.get_entry(kit.tenant, "", k)
    assert by_id == by_key
    assert by_id.entry_id == paid.entry.entry_id and by_id.idempotency_key == k
    assert (by_id.description, by_id.metadata) == ("hello", {"order": "42"})
    assert by_id.decision_id == f"dec-{k}"
    with pytest.raises(InvalidArgument):
        await kit.ledger.get_entry(kit.tenant, paid.entry.entry_id, k)
    with pytest.raises(InvalidArgument):
        await kit.ledger.get_entry(kit.tenant, "", "")
    with pytest.raises(NotFound):
        await kit.ledger.get_entry(kit.tenant, "ent_nothere", "")
    with pytest.raises(NotFound):
        await kit.ledger.get_entry(kit.tenant, "", "never-used")


async def test_accounts_are_idempotent_and_differences_named(kit: Kit) -> None:
    await kit.open(("alice", "USD", DEBITS_LIMITED, 0))
    with pytest.raises(AlreadyExists) as caught:
        await kit.open(("alice", "EUR", DEBITS_LIMITED, 0))
    assert caught.value.field == "accounts[0].currency"
    with pytest.raises(NotFound) as missing:
        await kit.ledger.create_accounts(unique_tenant(), [spec("alice")])
    assert missing.value.reason == "TENANT_NOT_FOUND"


async def test_a_refused_reserve_release_does_not_block_later_ones(
    backend_place: BackendPlace, signer: TokenSigner, clock: ManualClock
) -> None:
    """A release the reserve account cannot pay (its money was moved out) is
    refused; it must not starve the releases due after it."""
    config = ledger_config(backend_place.state_dir, signer, reserves={"release_sweep_batch": 2})
    ledger = make_ledger(backend_place.backend, backend_place.where, config, signer, clock)
    await ledger.start(sweepers=False)
    tenant = unique_tenant()
    kit = Kit(ledger, clock, signer, backend_place.backend, backend_place.where, tenant)
    try:
        await ledger.create_tenant(tenant, "reserves")
        await kit.open(
            ("bank", "USD", 1, 0),
            ("merchant", "USD", 1, 0),
            ("reserve", "USD", DEBITS_LIMITED, 0),
            ("elsewhere", "USD", 1, 0),
            ("reserve2", "USD", DEBITS_LIMITED, 0),
        )
        release_at = clock.now_us() + DAY_S * 1_000_000
        for i in range(2):
            await kit.ok(
                kit.move(
                    key(),
                    "bank",
                    "merchant",
                    10_000,
                    splits=[bps_leg("reserve", 1_000, "reserve", release_at + i, "merchant")],
                )
            )
        await kit.ok(kit.move(key(), "reserve", "elsewhere", 2_000))
        await kit.ok(
            kit.move(
                key(),
                "bank",
                "merchant",
                10_000,
                splits=[bps_leg("reserve2", 1_000, "reserve", release_at + 10, "merchant")],
            )
        )
        clock.advance(2 * DAY_S)
        released = [await ledger.release_due_reserves() for _ in range(3)]
        # The first sweep (a batch of two) refuses the two unpayable releases
        # and defers them; the second releases the third, payable one.
        assert released == [0, 1, 0]
        assert (await kit.balance("reserve2"))[0] == 0
        # The money back, the deferred two go once their retry time comes.
        await kit.ok(kit.move(key(), "elsewhere", "reserve", 2_000))
        clock.advance(config.money.reserves.refused_retry_s)
        assert [await ledger.release_due_reserves() for _ in range(2)] == [2, 0]
        assert (await kit.balance("reserve"))[0] == 0
        await kit.assert_balanced()
    finally:
        kit.probe.close()
        await ledger.stop()
