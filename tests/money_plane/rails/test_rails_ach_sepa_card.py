"""ACH, SEPA and card/wallet rails against the real sandbox bank process."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest
from sandbox_helpers import BankClient, card_payout, eur_payout, rails_config, us_payout

from money_plane.formats.nacha import read_ach_returns, read_nacha
from money_plane.rails.adapters import (
    AchRail,
    CardRail,
    InstantRail,
    SepaRail,
    build_rails,
    select_rail,
)
from money_plane.rails.base import Outcome
from triplane.runtime.config import RailsConfig
from triplane.runtime.errors import FailedPrecondition, InvalidArgument, Unavailable
from triplane.runtime.net import free_port


async def test_ach_file_settles_on_booking_and_returns_come_as_return_files(
    bank_factory: Callable[..., str],
) -> None:
    url = bank_factory(seed=11, faults={"reject_rate": 0.25, "return_rate": 0.25})
    client = BankClient(url)
    rail = AchRail(rails_config(url), clock=await client.clock())
    try:
        subs = [us_payout(n, amount=10_000 + n, salt="ach") for n in range(16)]
        for s in subs:
            assert (await rail.submit(s)).status == "queued"
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(subs[0])
        assert exc.value.field == "submission.end_to_end_id"
        receipts = await rail.flush()
        assert len(receipts) == 16 and all(len(r.reference) == 15 for r in receipts)
        assert await rail.flush() == []
        truth = await client.truth()
        rejected = {k for k, p in truth.items() if p["outcome"] == "rejected"}
        returned = {k for k, p in truth.items() if p["outcome"] == "returned"}
        assert rejected and returned
        # Same-day: the file was sent at 09:00 New York on a Monday.
        assert {p["trace_number"] for p in truth.values()} == {r.reference for r in receipts}
        settled = await rail.poll()
        assert {o.end_to_end_id for o in settled} == set(truth) - rejected
        assert all(o.outcome is Outcome.SETTLED for o in settled)
        # Next day: the entries the bank could not post come back (R03/R04).
        await client.advance(1)
        bounced = await rail.poll()
        assert {o.end_to_end_id for o in bounced} == rejected
        for o in bounced:
            assert o.outcome is Outcome.RETURNED
            assert o.reason_code in ("R03", "R04") and o.reason
            assert o.reason_code == truth[o.end_to_end_id]["reason_code"]
        await client.advance(1)
        later = await rail.poll()
        assert {o.end_to_end_id for o in later} == returned
        assert {o.reason_code for o in later} <= {"R01", "R02", "R16"}
        files = [b for k, b in await client.feed("ach") if k == "nacha_returns"]
        assert files and all(read_nacha(b).batches for b in files)
        assert sum(len(read_ach_returns(b)) for b in files) == len(rejected) + len(returned)
    finally:
        await rail.aclose()
        await client.aclose()


async def test_ach_refuses_what_it_cannot_carry(client: BankClient) -> None:
    rail = AchRail(rails_config(client.url), clock=await client.clock())
    try:
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(eur_payout(1))
        assert exc.value.field == "submission.currency"
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(us_payout(1, account_number="12 34"))
        assert exc.value.field == "submission.account_number"
        assert rail.queue == []
    finally:
        await rail.aclose()


async def test_bank_refuses_a_broken_nacha_file_naming_the_line(client: BankClient) -> None:
    status, body = await client.post("/v1/ach/files", b"1" * 94 + b"\n" + b"5" * 20 + b"\n")
    assert status == 400
    assert body["field"].startswith("line")


async def test_sepa_file_rejects_books_and_returns(bank_factory: Callable[..., str]) -> None:
    url = bank_factory(seed=5, faults={"reject_rate": 0.25, "return_rate": 0.25})
    client = BankClient(url)
    rail = SepaRail(rails_config(url), clock=await client.clock())
    try:
        subs = [eur_payout(n, salt="sepa") for n in range(12)]
        for s in subs:
            await rail.submit(s)
        receipts = await rail.flush()
        assert len({r.reference for r in receipts}) == 1  # one pain.001
        truth = await client.truth()
        rejected = {k for k, p in truth.items() if p["outcome"] == "rejected"}
        returned = {k for k, p in truth.items() if p["outcome"] == "returned"}
        assert rejected and returned
        first = await rail.poll()
        assert {o.end_to_end_id for o in first if o.outcome is Outcome.FAILED} == rejected
        assert {o.end_to_end_id for o in first if o.outcome is Outcome.SETTLED} == (
            set(truth) - rejected
        )
        for o in first:
            if o.outcome is Outcome.FAILED:
                assert o.reason_code == truth[o.end_to_end_id]["reason_code"]
        await client.advance(2)
        back = await rail.poll()
        assert {o.end_to_end_id for o in back} == returned
        assert all(o.outcome is Outcome.RETURNED for o in back)
    finally:
        await rail.aclose()
        await client.aclose()


async def test_sepa_refuses_naming_the_field(client: BankClient) -> None:
    rail = SepaRail(rails_config(client.url), clock=await client.clock())
    try:
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(eur_payout(1, iban="DE00370400440532013000"))
        assert exc.value.field == "submission.iban"
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(us_payout(1))
        assert exc.value.field == "submission.currency"
    finally:
        await rail.aclose()
    status, body = await client.post("/v1/sepa/pain001", b"<Document/>")
    assert status == 400 and body["field"]


async def test_card_and_wallet_token_payouts(bank_factory: Callable[..., str]) -> None:
    url = bank_factory(seed=2, faults={"reject_rate": 0.4})
    client = BankClient(url)
    rail = CardRail(rails_config(url), clock=await client.clock())
    try:
        subs = [card_payout(n, salt="card") for n in range(10)]
        receipts = [await rail.submit(s) for s in subs]
        truth = await client.truth()
        for s, r in zip(subs, receipts, strict=True):
            expected = "failed" if truth[s.end_to_end_id]["outcome"] == "rejected" else "settled"
            assert r.status == expected
        assert {r.status for r in receipts} == {"failed", "settled"}
        outcomes = await rail.poll()
        assert len(outcomes) == 10
        wallet = card_payout(99).with_(beneficiary_kind="wallet", token="tok_wallet_1")
        assert (await rail.submit(wallet)).status in ("settled", "failed")
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(card_payout(98).with_(token=""))
        assert exc.value.field == "submission.token"
        with pytest.raises(InvalidArgument) as exc:
            await rail.submit(us_payout(97))
        assert exc.value.field == "submission.beneficiary_kind"
    finally:
        await rail.aclose()
        await client.aclose()


def test_policy_methods_map_to_the_rail_that_reaches_the_payout() -> None:
    rails = build_rails(rails_config("http://127.0.0.1:1"))
    assert select_rail(rails, "instant_payment", us_payout(1)).name == "instant"
    assert select_rail(rails, "instant_payment", eur_payout(1)).name == "sepa"
    assert select_rail(rails, "bank_transfer", us_payout(1)).name == "ach"
    assert select_rail(rails, "bank_transfer", eur_payout(1)).name == "sepa"
    assert select_rail(rails, "wallet", card_payout(1)).name == "card"
    # Above the instant limit ($10M): no instant rail reaches it.
    with pytest.raises(FailedPrecondition) as exc:
        select_rail(rails, "instant_payment", us_payout(1, amount=1_000_000_001))
    assert exc.value.field == "rail"
    caps = rails["ach"].capabilities
    assert caps.cost_minor(100_000) == 5
    assert rails["card"].capabilities.cost_minor(100_000) == 25 + 150
    # Cut-offs: Monday 09:00 New York makes the 10:30 same-day window;
    # Friday 21:00 waits for Monday; a holiday is skipped.
    monday = dt.datetime(2026, 12, 7, 14, 0, tzinfo=dt.UTC)
    window = caps.next_window(monday)
    assert window is not None and (window.hour, window.minute) == (10, 30)
    friday_night = dt.datetime(2026, 12, 12, 2, 0, tzinfo=dt.UTC)
    after = caps.next_window(friday_night)
    assert after is not None and after.date() == dt.date(2026, 12, 14)
    holiday = build_rails(RailsConfig(holidays=["2026-12-14"]))["ach"].capabilities
    after = holiday.next_window(friday_night)
    assert after is not None and after.date() == dt.date(2026, 12, 15)
    assert rails["instant"].capabilities.next_window(friday_night) is None
    # Calendars: Christmas (a Friday in 2026) is a Fed and a TARGET holiday.
    christmas_eve_late = dt.datetime(2026, 12, 25, 3, 0, tzinfo=dt.UTC)
    after = caps.next_window(christmas_eve_late)
    assert after is not None and after.date() == dt.date(2026, 12, 28)
    after = rails["sepa"].capabilities.next_window(christmas_eve_late)
    assert after is not None and after.date() == dt.date(2026, 12, 28)


async def test_card_payout_returned_later(bank_factory: Callable[..., str]) -> None:
    url = bank_factory(seed=4, faults={"return_rate": 1.0})
    client = BankClient(url)
    rail = CardRail(rails_config(url), clock=await client.clock())
    try:
        sub = card_payout(1, salt="card-return")
        assert (await rail.submit(sub)).status == "settled"
        assert [o.outcome for o in await rail.poll()] == [Outcome.SETTLED]
        await client.advance(2)
        [back] = await rail.poll()
        assert back.outcome is Outcome.RETURNED
        assert back.reason_code == (await client.truth())[sub.end_to_end_id]["reason_code"]
    finally:
        await rail.aclose()
        await client.aclose()


async def test_a_bank_that_is_down_keeps_the_file_queued(client: BankClient) -> None:
    down = rails_config(f"http://127.0.0.1:{free_port()}")
    rail = AchRail(down, clock=await client.clock())
    try:
        await rail.submit(us_payout(1, salt="down"))
        with pytest.raises(Unavailable):
            await rail.flush()
        assert len(rail.queue) == 1
        rail.url = client.url  # the bank is back
        [receipt] = await rail.flush()
        assert receipt.status == "accepted" and rail.queue == []
        assert (await client.truth())[us_payout(1, salt="down").end_to_end_id]["trace_number"] == (
            receipt.reference
        )
    finally:
        await rail.aclose()
    instant = InstantRail(down, clock=await client.clock())
    try:
        with pytest.raises(Unavailable):
            await instant.submit(us_payout(2, salt="down"))
    finally:
        await instant.aclose()


async def test_bank_refuses_a_bad_card_call_naming_the_field(client: BankClient) -> None:
    status, body = await client.post("/v1/card/payouts", b'{"reference": "x"}')
    assert (status, body["field"]) == (400, "token")
    status, body = await client.post("/v1/card/payouts", b"not json")
    assert (status, body["field"]) == (400, "body")
    bad = b'{"reference": "x", "token": "t", "currency": "USD", "kind": "card", "amount_minor": -5}'
    status, body = await client.post("/v1/card/payouts", bad)
    assert (status, body["field"]) == (400, "amount_minor")
