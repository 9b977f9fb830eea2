"""The sandbox bank's statements and record of the truth: XSD-valid camt
(the formats reader validates against the schema of the version it names),
MT940 that reads back, every booking where the truth says, faults as
configured, and the same bookings for the same seed in any arrival order."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from typing import Any

from sandbox_helpers import BankClient, eur_payout, rails_config, us_payout

from money_plane.formats import _xml
from money_plane.formats.camt import read_camt
from money_plane.formats.mt940 import read_mt940
from money_plane.formats.statement import EntryStatus, Sign, StatementLine
from money_plane.rails.adapters import InstantRail, SepaRail

FAULTY = {
    "reject_rate": 0.1,
    "return_rate": 0.15,
    "duplicate_rate": 0.15,
    "late_rate": 0.15,
    "amount_change_rate": 0.15,
    "batch_rate": 1.0,
}


async def _send(url: str, order: list[int]) -> BankClient:
    client = BankClient(url)
    clock = await client.clock()
    instant = InstantRail(rails_config(url), clock=clock)
    sepa = SepaRail(rails_config(url), clock=clock)
    for n in order:
        await instant.submit(us_payout(n, amount=1_000 + n, salt="stmt"))
    for n in order:
        await sepa.submit(eur_payout(n, amount=2_000 + n, salt="stmt-sepa"))
    await sepa.flush()
    await instant.aclose()
    await sepa.aclose()
    return client


def _lines_by_ref(lines: tuple[StatementLine, ...]) -> dict[str, StatementLine]:
    return {line.account_servicer_ref: line for line in lines}


async def test_statements_are_valid_and_read_back_to_the_bookings(
    bank_factory: Callable[..., str],
) -> None:
    url = bank_factory(seed=21, faults=FAULTY)
    client = await _send(url, list(range(30)))
    try:
        day0 = dt.date(2026, 12, 7)
        await client.advance(3)  # late bookings and returns have happened
        truth = await client.truth()
        faults = Counter(f for p in truth.values() for f in p["faults"])
        outcomes = Counter(p["outcome"] for p in truth.values())
        assert outcomes["rejected"] and outcomes["returned"]
        assert {"batch", "duplicate", "late", "amount_changed"} <= set(faults)

        booked: dict[str, StatementLine] = {}
        for offset in range(4):
            day = day0 + dt.timedelta(days=offset)
            raw = await client.statement("camt.053", day)
            root = _xml.parse_xml(raw)
            _xml.validate(root, "camt.053.001.08")
            stmt_file = read_camt(raw)
            assert stmt_file.message_name == "camt.053.001.08"
            for s in stmt_file.statements:
                assert s.balances_agree() is True
            booked.update(_lines_by_ref(stmt_file.lines))
            mt = read_mt940(await client.statement("mt940", day))
            assert {line.amount_minor for line in mt.lines} == {
                line.amount_minor for line in stmt_file.lines
            }
            assert [s.closing_booked for s in mt.statements] == [
                s.closing_booked for s in stmt_file.statements
            ]

        # Every booking in the truth is on the day's statement, as recorded.
        expected_refs = {b["account_servicer_ref"] for p in truth.values() for b in p["bookings"]}
        assert expected_refs == set(booked)
        for p in truth.values():
            refs = [b["account_servicer_ref"] for b in p["bookings"]]
            if p["outcome"] == "rejected":
                assert refs == []
                continue
            debits = [booked[r] for r in refs if booked[r].sign is Sign.DEBIT]
            credits = [booked[r] for r in refs if booked[r].sign is Sign.CREDIT]
            assert len(debits) == (2 if "duplicate" in p["faults"] else 1)
            assert len(credits) == (1 if p["outcome"] == "returned" else 0)
            for line in debits:
                assert p["end_to_end_id"] in line.end_to_end_ids
                assert line.status is EntryStatus.BOOKED
                if "batch" in p["faults"]:
                    assert line.batch is not None and len(line.details) > 1
                    detail = next(
                        d for d in line.details if d.references.end_to_end_id == p["end_to_end_id"]
                    )
                    amount = detail.amount_minor
                else:
                    amount = line.amount_minor
                changed = p["amount_minor"] - 150
                assert amount == (changed if "amount_changed" in p["faults"] else p["amount_minor"])
                late = "late" in p["faults"]
                assert (line.booking_date == day0) is (not late)
            for line in credits:
                assert line.return_reason == p["reason_code"]
                assert line.booking_date is not None
                assert line.booking_date.isoformat() == p["returned_on"]

        # Intraday report: valid, and agrees with what is booked so far today.
        today = dt.date(2026, 12, 10)
        report = read_camt(await client.statement("camt.052"))
        assert report.message_name == "camt.052.001.08"
        assert {line.account_servicer_ref for line in report.lines} == {
            ref for ref, line in booked.items() if line.booking_date == today
        }
        # camt.054 per booking, each valid, together the whole book.
        notes = [read_camt(b) for k, b in await client.feed("statements") if k == "camt.054"]
        assert all(n.message_name == "camt.054.001.08" for n in notes)
        assert {line.account_servicer_ref for n in notes for line in n.lines} == set(booked)
    finally:
        await client.aclose()


async def _essence(client: BankClient) -> dict[tuple[str, str], Any]:
    found = await client.json("/v1/truth")
    return {
        (p["rail"], p["end_to_end_id"]): (
            p["outcome"],
            p["reason_code"],
            p["faults"],
            [b["amount_minor"] for b in p["bookings"]],
        )
        for p in found["payments"]
    }


async def test_same_seed_same_fates_in_any_order(bank_factory: Callable[..., str]) -> None:
    first = await _send(bank_factory(seed=99, faults=FAULTY), list(range(12)))
    second = await _send(bank_factory(seed=99, faults=FAULTY), list(reversed(range(12))))
    other = await _send(bank_factory(seed=100, faults=FAULTY), list(range(12)))
    try:
        a, b, c = [await _essence(x) for x in (first, second, other)]
        assert len(a) == 24
        assert a == b
        assert a != c
    finally:
        for x in (first, second, other):
            await x.aclose()


async def test_statement_requests_refused_naming_the_field(client: BankClient) -> None:
    status, body = await client.post("/v1/clock", b'{"advance_s": -1}')
    assert status == 400 and body["field"] == "advance_s"
    async with client.session.get(client.url + "/v1/statements/camt.053?date=yesterday") as r:
        assert r.status == 400 and (await r.json())["field"] == "date"
    async with client.session.get(client.url + "/v1/statements/camt.099") as r:
        assert r.status == 400 and (await r.json())["field"] == "kind"
