"""The seam with payouts: a payout handed to a rail through
Payouts.hand_to_rail (PayoutsRail), its outcome polled from the real sandbox
bank and recorded through Payouts.record_outcome (HttpRail.deliver): settled
once, then returned days later and reversed once, however often the rail
reports it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from money_helpers import Kit
from sandbox_helpers import BankClient, rails_config

from money_plane.domain import Kind
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.domain import NewBeneficiary, PayoutState
from money_plane.payouts.service import Payouts, load_cipher
from money_plane.rails.adapters import InstantRail, PayoutsRail

IN_FLIGHT = "payouts_in_flight:USD"

pytestmark = pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)


def _entries(kit: Kit, prefix: str) -> int:
    return int(
        kit.probe.scalar(
            "SELECT COUNT(*) FROM entries WHERE tenant_id = %s AND idempotency_key LIKE %s",
            (kit.tenant, f"{prefix}%"),
        )
    )


async def test_a_payout_settles_then_returns_once_through_the_bank(
    kit: Kit, tmp_path_factory: pytest.TempPathFactory, bank_factory: Callable[..., str]
) -> None:
    url = bank_factory(seed=1, faults={"return_rate": 1.0})
    client = BankClient(url)
    config = kit.ledger.config.payouts
    payouts = Payouts(
        kit.ledger,
        load_cipher(config, tmp_path_factory.mktemp("keys")),
        config,
        encode_payout_event,
    )
    rail = InstantRail(rails_config(url), clock=await client.clock())
    try:
        await payouts.create_beneficiary(
            kit.tenant,
            NewBeneficiary(
                beneficiary_id="ben-us",
                merchant_id="m-1",
                holder_name="Ada Seller",
                country="US",
                kind="us_bank",
                routing_number="011000015",
                account_number="987654321",
                account_type="checking",
                account_token="tok_acct_bcdfghjkmnpqrstvbcdfghjkmnpqrstv",
                holder_name_token="tok_name_bcdfghjkmnpqrstvbcdfghjkmnpqrstv",
            ),
        )
        await kit.fund("merchant", 10_000)
        token = kit.move("po-r1", "merchant", IN_FLIGHT, 4_000, kind=Kind.PAYOUT).decision_token
        payout, _ = await payouts.create_payout(
            kit.tenant,
            "po-r1",
            beneficiary_id="ben-us",
            merchant_id="m-1",
            debit_account_id="merchant",
            amount_minor=4_000,
            currency="USD",
            decision_token=token,
            pending_review=False,
            rail="instant_payment",
        )
        submitted = await payouts.hand_to_rail(kit.tenant, payout.payout_id, PayoutsRail(rail))
        assert submitted.state == PayoutState.SUBMITTED and submitted.rail_reference
        truth = await client.truth()
        assert list(truth) == [payout.end_to_end_id]

        await rail.deliver(payouts)
        settled = await payouts.get_payout(kit.tenant, payout.payout_id)
        assert settled.state == PayoutState.SETTLED
        assert _entries(kit, "payout-settle:") == 1

        await client.advance(2)
        [back] = await rail.deliver(payouts)
        assert back.reason_code == truth[payout.end_to_end_id]["reason_code"]
        returned = await payouts.get_payout(kit.tenant, payout.payout_id)
        assert returned.state == PayoutState.RETURNED
        assert returned.reason_code == back.reason_code
        # The bank's messages read again (a restarted adapter): nothing more posts.
        rail.cursor = 0
        await rail.deliver(payouts)
        assert _entries(kit, "payout-settle:") == 1
        assert _entries(kit, "payout-reverse:") == 1
    finally:
        await rail.aclose()
        await client.aclose()
