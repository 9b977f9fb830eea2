"""Payouts in the money plane, on SQLite and PostgreSQL: beneficiaries
validated and sealed, a payout debited into payouts-in-flight exactly once,
its settlement and its return posted exactly once however often (and however
concurrently) a rail reports them, across a restart too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from money_helpers import Kit, ledger_config, make_ledger

from money_plane.domain import Kind
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.domain import (
    NewBeneficiary,
    PayoutOutcome,
    PayoutState,
    RailSubmission,
)
from money_plane.payouts.service import Payouts, load_cipher
from triplane.runtime.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TriplaneError,
)

IBAN = "DE89370400440532013000"
NAME = "Jonas Schmidt Handel"
IN_FLIGHT = "payouts_in_flight:USD"
BANK = "payouts_bank:USD"


def iban_beneficiary(beneficiary_id: str = "ben-1", **changes: str) -> NewBeneficiary:
    values = {
        "beneficiary_id": beneficiary_id,
        "merchant_id": "m-1",
        "holder_name": NAME,
        "country": "DE",
        "kind": "iban",
        "iban": IBAN,
        "bic": "COBADEFFXXX",
        "account_token": "tok_iban_bcdfghjkmnpqrstvbcdfghjkmnpqrstv",
        "holder_name_token": "tok_name_bcdfghjkmnpqrstvbcdfghjkmnpqrstv",
    }
    values.update(changes)
    return NewBeneficiary(**values)


@dataclass
class RecordingRail:
    submissions: list[RailSubmission] = field(default_factory=list)

    async def submit(self, submission: RailSubmission) -> str:
        self.submissions.append(submission)
        return f"rail-ref-{len(self.submissions)}"


@pytest.fixture
def payouts(kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Payouts:
    config = kit.ledger.config.payouts
    state = tmp_path_factory.mktemp("payout-keys")
    return Payouts(kit.ledger, load_cipher(config, state), config, encode_payout_event)


async def approved(kit: Kit, payouts: Payouts, key: str, amount: int, **kw: object) -> object:
    token = kit.move(key, "merchant", IN_FLIGHT, amount, kind=Kind.PAYOUT).decision_token
    payout, _ = await payouts.create_payout(
        kit.tenant,
        key,
        beneficiary_id="ben-1",
        merchant_id="m-1",
        debit_account_id="merchant",
        amount_minor=amount,
        currency="USD",
        decision_token=token,
        pending_review=False,
        **kw,  # type: ignore[arg-type]
    )
    return payout


def entries_of(kit: Kit, prefix: str) -> int:
    return int(
        kit.probe.scalar(
            "SELECT COUNT(*) FROM entries WHERE tenant_id = %s AND idempotency_key LIKE %s",
            (kit.tenant, f"{prefix}%"),
        )
    )


async def test_a_beneficiary_is_validated_and_rests_sealed(kit: Kit, payouts: Payouts) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await payouts.create_beneficiary(
            kit.tenant, iban_beneficiary(iban="DE89370400440532013001")
        )
    assert (bad.value.reason, bad.value.field) == ("IBAN_INVALID", "beneficiary.iban")
    with pytest.raises(InvalidArgument) as bad_rtn:
        await payouts.create_beneficiary(
            kit.tenant,
            iban_beneficiary(
                kind="us_bank", iban="", routing_number="123456789", account_number="1"
            ),
        )
    assert bad_rtn.value.field == "beneficiary.routing_number"
    with pytest.raises(InvalidArgument) as none:
        await payouts.create_beneficiary(kit.tenant, iban_beneficiary(kind=""))
    assert none.value.field == "beneficiary.destination"
    assert (
        kit.probe.scalar("SELECT COUNT(*) FROM beneficiaries WHERE tenant_id = %s", (kit.tenant,))
        == 0
    )

    made, replayed = await payouts.create_beneficiary(kit.tenant, iban_beneficiary())
    assert not replayed and made.masked == "DE89…3000" and made.bic == "COBADEFFXXX"
    again, replayed = await payouts.create_beneficiary(kit.tenant, iban_beneficiary())
    assert replayed and again == made
    with pytest.raises(AlreadyExists) as taken:
        await payouts.create_beneficiary(kit.tenant, iban_beneficiary(merchant_id="m-2"))
    assert taken.value.field == "beneficiary.merchant_id"
    # Neither the IBAN nor the name rests in clear anywhere in the table.
    [(body,)] = kit.probe.rows("SELECT body FROM beneficiaries WHERE tenant_id = %s", (kit.tenant,))
    raw = bytes(body)
    assert IBAN.encode() not in raw and NAME.encode() not in raw
    context = await payouts.context(kit.tenant, "ben-1", "merchant")
    assert context.holder_name == NAME and context.beneficiary_payouts == 0


async def test_a_payout_moves_once_and_settles_once(kit: Kit, payouts: Payouts) -> None:
    await payouts.create_beneficiary(kit.tenant, iban_beneficiary())
    await kit.fund("merchant", 10_000)
    payout = await approved(kit, payouts, "po-1", 4_000, rail="instant_payment")
    assert payout.state == PayoutState.APPROVED and payout.entry_id  # type: ignore[attr-defined]
    # The same request again: the same payout, nothing more moved.
    again = await approved(kit, payouts, "po-1", 4_000, rail="instant_payment")
    assert again == payout
    assert (await kit.balance("merchant"))[0] == 6_000
    assert (await kit.balance(IN_FLIGHT))[0] == 4_000
    with pytest.raises(AlreadyExists) as reused:
        await approved(kit, payouts, "po-1", 4_001)
    assert reused.value.field == "amount.amount_minor"

    rail = RecordingRail()
    pid = payout.payout_id  # type: ignore[attr-defined]
    submitted = await payouts.hand_to_rail(kit.tenant, pid, rail)
    assert submitted.state == PayoutState.SUBMITTED
    [sent] = rail.submissions
    assert (sent.iban, sent.holder_name, sent.rail) == (IBAN, NAME, "instant_payment")
    assert sent.end_to_end_id == submitted.end_to_end_id and len(sent.end_to_end_id) <= 35

    settled, replayed = await payouts.record_outcome(kit.tenant, pid, PayoutOutcome.SETTLED)
    assert settled.state == PayoutState.SETTLED and not replayed
    _, replayed = await payouts.record_outcome(kit.tenant, pid, PayoutOutcome.SETTLED)
    assert replayed
    assert entries_of(kit, "payout-settle:") == 1
    assert (await kit.balance(IN_FLIGHT))[0] == 0
    # A return days later: bank -> merchant, once, reported twice at once.
    results = await asyncio.gather(
        *[
            payouts.record_outcome(kit.tenant, pid, PayoutOutcome.RETURNED, reason_code="R01")
            for _ in range(2)
        ]
    )
    assert sorted(r[1] for r in results) == [False, True]
    assert entries_of(kit, "payout-reverse:") == 1
    assert (await kit.balance("merchant"))[0] == 10_000
    with pytest.raises(FailedPrecondition) as late:
        await payouts.record_outcome(kit.tenant, pid, PayoutOutcome.FAILED, reason_code="AC04")
    assert (late.value.reason, late.value.field) == ("PAYOUT_STATE_CONFLICT", "outcome")
    events = kit.probe.rows(
        "SELECT subject FROM outbox WHERE tenant_id = %s AND subject LIKE %s",
        (kit.tenant, "%.payout.%"),
    )
    assert sorted(s.rsplit(".", 1)[1] for (s,) in events) == [
        "approved",
        "returned",
        "settled",
        "submitted",
    ]
    await kit.assert_balanced()


async def test_a_payout_above_the_available_balance_changes_nothing(
    kit: Kit, payouts: Payouts
) -> None:
    await payouts.create_beneficiary(kit.tenant, iban_beneficiary())
    await kit.fund("merchant", 1_000)
    with pytest.raises(TriplaneError) as refused:
        await approved(kit, payouts, "po-big", 1_001)
    assert refused.value.code == Code.FAILED_PRECONDITION
    assert refused.value.reason == "INSUFFICIENT_FUNDS"
    assert kit.probe.scalar("SELECT COUNT(*) FROM payouts WHERE tenant_id = %s", (kit.tenant,)) == 0
    assert (await kit.balance("merchant"))[0] == 1_000
    with pytest.raises(NotFound):
        await payouts.get_payout(kit.tenant, "po_nope")


async def test_a_review_moves_nothing_and_a_failure_gives_it_back(
    kit: Kit, payouts: Payouts
) -> None:
    await payouts.create_beneficiary(kit.tenant, iban_beneficiary())
    await kit.fund("merchant", 5_000)
    held, _ = await payouts.create_payout(
        kit.tenant,
        "po-review",
        beneficiary_id="ben-1",
        merchant_id="m-1",
        debit_account_id="merchant",
        amount_minor=3_000,
        currency="USD",
        decision_token="",
        pending_review=True,
        case_id="case-1",
    )
    assert held.state == PayoutState.PENDING_REVIEW and not held.entry_id
    assert (await kit.balance("merchant"))[0] == 5_000
    with pytest.raises(FailedPrecondition):
        await payouts.record_outcome(kit.tenant, held.payout_id, PayoutOutcome.SETTLED)
    context = await payouts.context(kit.tenant, "ben-1", "merchant")
    assert context.beneficiary_payouts == 1 and context.velocity[1] == (1, 3_000)

    payout = await approved(kit, payouts, "po-2", 2_000)
    pid = payout.payout_id  # type: ignore[attr-defined]
    failed, _ = await payouts.record_outcome(
        kit.tenant, pid, PayoutOutcome.FAILED, reason_code="AC04", reason="closed account"
    )
    assert failed.state == PayoutState.FAILED and failed.reason_code == "AC04"
    assert (await kit.balance("merchant"))[0] == 5_000
    with pytest.raises(InvalidArgument) as no_reason:
        await payouts.record_outcome(kit.tenant, pid, PayoutOutcome.RETURNED)
    assert no_reason.value.field == "reason_code"


async def test_an_outcome_reported_again_after_a_restart_posts_nothing(
    kit: Kit, payouts: Payouts, tmp_path_factory: pytest.TempPathFactory
) -> None:
    await payouts.create_beneficiary(kit.tenant, iban_beneficiary())
    await kit.fund("merchant", 5_000)
    payout = await approved(kit, payouts, "po-r", 2_500)
    pid = payout.payout_id  # type: ignore[attr-defined]
    await payouts.record_outcome(kit.tenant, pid, PayoutOutcome.RETURNED, reason_code="R03")
    # Another ledger (a restarted or second replica) on the same database.
    config = ledger_config(tmp_path_factory.mktemp("restart"), kit.signer)
    other = make_ledger(kit.backend, kit.where, config, kit.signer, kit.clock)
    await other.start(sweepers=False)
    try:
        again = Payouts(
            other,
            load_cipher(config.money.payouts, tmp_path_factory.mktemp("k")),
            config.money.payouts,
            encode_payout_event,
        )
        result, replayed = await again.record_outcome(
            kit.tenant, pid, PayoutOutcome.RETURNED, reason_code="R03"
        )
        assert replayed and result.state == PayoutState.RETURNED
    finally:
        await other.stop()
    assert entries_of(kit, "payout-reverse:") == 1
    assert (await kit.balance("merchant"))[0] == 5_000
