"""`rerouted`: which failure moves a payout to its next alternate rail, and
which is recorded as it is (a pure function of the payout)."""

from __future__ import annotations

import msgspec
import pytest

from money_plane.payouts.domain import (
    NotRerouted,
    Payout,
    PayoutAttempt,
    PayoutState,
    rerouted,
)


def _payout(rail: str, alternates: list[str], state: PayoutState = PayoutState.SUBMITTED) -> Payout:
    return Payout(
        tenant_id="t1",
        payout_id="po_1",
        idempotency_key="k1",
        beneficiary_id="b1",
        merchant_id="m1",
        debit_account_id="merchant",
        amount_minor=1_000,
        currency="USD",
        state=state,
        decision_id="d1",
        case_id="",
        rail=rail,
        end_to_end_id="TP1",
        created_at_us=1,
        updated_at_us=1,
        rail_reference="ref-1",
        alternate_rails=alternates,
    )


def _move(payout: Payout, from_rail: str, max_attempts: int = 3) -> Payout | None:
    return rerouted(
        payout,
        from_rail=from_rail,
        reason_code="AG01",
        reason="forbidden",
        max_attempts=max_attempts,
        now_us=50,
    )


def test_the_next_alternate_takes_it_back_to_approved() -> None:
    moved = _move(_payout("instant", ["ach", "card"]), "instant")
    assert moved is not None
    assert (moved.state, moved.rail, moved.alternate_rails) == (
        PayoutState.APPROVED,
        "ach",
        ["card"],
    )
    assert moved.attempts == [PayoutAttempt("instant", "AG01", "forbidden", 50)]
    assert (moved.rail_reference, moved.updated_at_us, moved.amount_minor) == ("", 50, 1_000)


def test_an_earlier_rail_reporting_again_changes_nothing() -> None:
    moved = _move(_payout("instant", ["ach_same_day", "card"]), "instant")
    assert moved is not None and moved.rail == "ach_same_day"
    assert _move(msgspec.structs.replace(moved, state=PayoutState.SUBMITTED), "instant") is None


def test_a_rail_the_same_adapter_serves_is_not_tried_twice() -> None:
    moved = _move(_payout("ach_same_day", ["ach", "instant"]), "ach")
    assert moved is not None and (moved.rail, moved.alternate_rails) == ("instant", [])
    with pytest.raises(NotRerouted):
        _move(_payout("ach_same_day", ["ach"]), "ach")


@pytest.mark.parametrize("state", [PayoutState.SETTLED, PayoutState.FAILED, PayoutState.RETURNED])
def test_past_the_rails_it_is_not_rerouted(state: PayoutState) -> None:
    with pytest.raises(NotRerouted):
        _move(_payout("instant", ["ach"], state), "instant")


def test_attempts_are_bounded() -> None:
    first = _move(_payout("instant", ["ach", "card"]), "instant", max_attempts=2)
    assert first is not None and first.rail == "ach"
    with pytest.raises(NotRerouted):
        _move(first, "ach", max_attempts=2)
    with pytest.raises(NotRerouted):
        _move(_payout("instant", ["ach"]), "instant", max_attempts=1)
