"""The instant rail against the real sandbox bank process, over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from sandbox_helpers import BankClient, rails_config, us_payout

from money_plane.formats.camt import read_camt
from money_plane.formats.iso20022_in import read_pacs002, read_pacs004
from money_plane.rails.adapters import InstantRail, PayoutsRail
from money_plane.rails.base import Outcome
from triplane.runtime.errors import InvalidArgument


@dataclass
class Sink:
    """Records what a rail reports (the payouts service's record_outcome)."""

    calls: list[tuple[str, str, int, str]] = field(default_factory=list)

    async def record_outcome(
        self,
        tenant_id: str,
        payout_id: str,
        outcome: int,
        *,
        reason_code: str = "",
        reason: str = "",
        rail_reference: str = "",
    ) -> object:
        self.calls.append((tenant_id, payout_id, outcome, reason_code))
        return None


async def test_accepted_payment_settles_and_is_booked(client: BankClient) -> None:
    rail = InstantRail(rails_config(client.url), clock=await client.clock())
    try:
        sub = us_payout(1, salt="ok")
        receipt = await rail.submit(sub)
        assert receipt.status == "settled"
        assert receipt.end_to_end_id == sub.end_to_end_id
        sink = Sink()
        outcomes = await rail.deliver(sink)
        assert [(o.payout_id, o.outcome) for o in outcomes] == [("po_1", Outcome.SETTLED)]
        assert sink.calls == [("t1", "po_1", 1, "")]
        # A second poll reports nothing new.
        assert await rail.poll() == []
        # Submitted again (a crash before the payout was marked): the same
        # payment, not a second booking.
        again = await rail.submit(sub)
        assert again.status == "settled"
        truth = await client.truth()
        assert len(truth[sub.end_to_end_id]["bookings"]) == 1
        notes = [body for kind, body in await client.feed("statements") if kind == "camt.054"]
        lines = [
            line
            for body in notes
            for line in read_camt(body).lines
            if sub.end_to_end_id in line.end_to_end_ids
        ]
        assert len(lines) == 1 and lines[0].amount_minor == 12_345
        # The PayoutsRail view gives the payouts service a reference.
        ref = await PayoutsRail(rail).submit(sub)
        assert ref == receipt.reference
    finally:
        await rail.aclose()


async def test_rejects_and_returns_days_later(bank_factory: Callable[..., str]) -> None:
    url = bank_factory(seed=3, faults={"reject_rate": 0.3, "return_rate": 0.3})
    client = BankClient(url)
    rail = InstantRail(rails_config(url), clock=await client.clock())
    try:
        subs = [us_payout(n, salt="rr") for n in range(20)]
        receipts = {s.end_to_end_id: await rail.submit(s) for s in subs}
        truth = await client.truth()
        rejected = {k for k, p in truth.items() if p["outcome"] == "rejected"}
        returned = {k for k, p in truth.items() if p["outcome"] == "returned"}
        assert rejected and returned  # seed 3 draws both
        for key, receipt in receipts.items():
            if key in rejected:
                assert receipt.status == "failed"
                assert receipt.reason_code == truth[key]["reason_code"]
                assert receipt.reason_code in ("AC01", "AC04", "AC06", "AG01", "RR04")
            else:
                assert receipt.status == "settled"
        first = await rail.poll()
        failed = {o.end_to_end_id for o in first if o.outcome is Outcome.FAILED}
        assert failed == rejected
        assert not [o for o in first if o.outcome is Outcome.RETURNED]
        # Nothing returns before its day.
        await client.advance(1)
        assert await rail.poll() == []
        await client.advance(1)
        later = await rail.poll()
        assert {o.end_to_end_id for o in later if o.outcome is Outcome.RETURNED} == returned
        for o in later:
            assert o.reason_code == truth[o.end_to_end_id]["reason_code"]
            assert o.amount_minor == 12_345
        # The pacs.004 reads back with the formats reader.
        returns = [read_pacs004(b) for k, b in await client.feed("instant") if k == "pacs.004"]
        assert {t.original_end_to_end_id for r in returns for t in r.transactions} == returned
        reports = [read_pacs002(b) for k, b in await client.feed("instant") if k == "pacs.002"]
        assert {
            t.original_end_to_end_id for r in reports for t in r.transactions if t.status == "RJCT"
        } == rejected
    finally:
        await rail.aclose()
        await client.aclose()


async def test_refused_before_sending_naming_the_field(client: BankClient) -> None:
    rail = InstantRail(rails_config(client.url), clock=await client.clock())
    try:
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(us_payout(2, amount=1_000_000_001))
        assert exc.value.field == "submission.amount_minor"
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(us_payout(2, routing_number="123456789"))
        assert exc.value.field == "submission.routing_number"
        from dataclasses import replace

        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(replace(us_payout(2), currency="EUR"))
        assert exc.value.field == "submission.currency"
        assert (await client.truth()).get(us_payout(2).end_to_end_id) is None
    finally:
        await rail.aclose()


async def test_bank_refuses_a_broken_message_naming_the_element(client: BankClient) -> None:
    status, body = await client.post("/v1/instant/pacs008", b"<Document><nope/></Document>")
    assert status == 400 and body["field"]
    status, body = await client.post(
        "/v1/instant/pacs008", b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>'
    )
    assert status == 400 and body["reason"] == "DTD_FORBIDDEN"
