"""The rail worker in a running money plane against the real sandbox bank
(manual clocks on both sides, moved by the test: no wall clock, no timing):
a payout goes approved -> submitted -> settled and a return days later posts
one reversal; an ACH entry queued before a restart goes out once after it;
two workers on one PostgreSQL database send each entry once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from money_helpers import BackendPlace, Kit, ledger_config, make_ledger
from sandbox_helpers import BankClient

from money_plane.app import MoneyPlane
from money_plane.domain import Kind
from money_plane.ledger import Ledger
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.domain import NewBeneficiary, Payout, PayoutState
from money_plane.payouts.service import Payouts, load_cipher
from money_plane.rails.worker import RailWorker
from triplane.runtime.config import Config, with_overrides

IN_FLIGHT = "payouts_in_flight:USD"
HOUR_S = 3600.0
# The bank starts on Monday 2026-12-07 14:00 UTC (09:00 New York); the first
# same-day ACH window closes 10:30 New York (15:30 UTC); files go 600 s
# before it (rails.worker.flush_lead_s).
TO_FLUSH_S = 85 * 60.0


def _config(kit: Kit, state_dir: Path, url: str, **worker: Any) -> Config:
    """The kit's config (its state dir: the same key ring) for a plane on
    the kit's database, its rails at the bank."""
    store: dict[str, Any] = {"backend": kit.backend}
    if kit.backend == "sqlite":
        store["sqlite_path"] = str(Path(kit.where).resolve())
    else:
        store["postgres_dsn"] = str(kit.where)
    return with_overrides(
        ledger_config(state_dir, kit.signer),
        {
            "money": {"store": store},
            "rails": {
                "bank_url": url,
                # The loops sleep long: the test runs each unit itself.
                "worker": {
                    "handoff_interval_s": HOUR_S,
                    "flush_check_interval_s": HOUR_S,
                    "deliver_interval_s": HOUR_S,
                    **worker,
                },
            },
        },
    )


async def us_payouts(kit: Kit, state_dir: Path) -> Payouts:
    """The tenant's Payouts with one beneficiary, "ben-us": a US checking
    account of merchant m-1."""
    config = kit.ledger.config.payouts
    payouts = Payouts(kit.ledger, load_cipher(config, state_dir), config, encode_payout_event)
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
    return payouts


async def _setup(
    kit: Kit, client: BankClient, state_dir: Path, count: int, rail: str = "bank_transfer"
) -> list[Payout]:
    """`count` approved payouts to a US account (policy routed them to `rail`:
    bank_transfer is ACH)."""
    kit.clock.set_us(await client.now_us())
    payouts = await us_payouts(kit, state_dir)
    await kit.fund("merchant", 100_000)
    made = []
    for n in range(count):
        key = f"po-w{n}"
        token = kit.move(key, "merchant", IN_FLIGHT, 1_000 + n, kind=Kind.PAYOUT).decision_token
        payout, _ = await payouts.create_payout(
            kit.tenant,
            key,
            beneficiary_id="ben-us",
            merchant_id="m-1",
            debit_account_id="merchant",
            amount_minor=1_000 + n,
            currency="USD",
            decision_token=token,
            pending_review=False,
            rail=rail,
        )
        assert payout.state == PayoutState.APPROVED
        made.append(payout)
    return made


async def _plane(config: Config, kit: Kit) -> MoneyPlane:
    plane = MoneyPlane(config, clock=kit.clock, listen="127.0.0.1:0")
    await plane.start(relay=False, metrics=False)
    assert len(plane.rail_workers) == 1
    return plane


async def _advance(kit: Kit, client: BankClient, seconds: float) -> None:
    kit.clock.advance(seconds)
    await client.advance(seconds / 86_400)


def _entries(kit: Kit, prefix: str) -> int:
    return int(
        kit.probe.scalar(
            "SELECT COUNT(*) FROM entries WHERE tenant_id = %s AND idempotency_key LIKE %s",
            (kit.tenant, f"{prefix}%"),
        )
    )


def _unsent(kit: Kit) -> int:
    return int(
        kit.probe.scalar(
            "SELECT COUNT(*) FROM rail_queue WHERE tenant_id = %s AND sent_at_us IS NULL",
            (kit.tenant,),
        )
    )


@pytest.fixture
def state_dir(backend_place: BackendPlace) -> Path:
    return backend_place.state_dir


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_a_payout_is_sent_settled_and_returned_once_by_the_plane(
    kit: Kit, state_dir: Path, bank_factory: Callable[..., str]
) -> None:
    url = bank_factory(seed=3, faults={"return_rate": 1.0})
    client = BankClient(url)
    try:
        [payout] = await _setup(kit, client, state_dir, 1)
        plane = await _plane(_config(kit, state_dir, url), kit)
        worker = plane.rail_workers[0]
        payouts = worker.payouts
        try:
            assert await worker.hand_off() == 1
            submitted = await payouts.get_payout(kit.tenant, payout.payout_id)
            assert submitted.state == PayoutState.SUBMITTED
            # Queued for the next ACH file, which waits for its cut-off.
            assert await worker.flush_if_due() == 0
            assert await client.truth() == {}
            await _advance(kit, client, TO_FLUSH_S)
            assert await worker.flush_if_due() == 1
            truth = await client.truth()
            assert truth[payout.end_to_end_id]["received"] == 1

            assert await worker.deliver() == 1
            settled = await payouts.get_payout(kit.tenant, payout.payout_id)
            assert settled.state == PayoutState.SETTLED
            assert _entries(kit, "payout-settle:") == 1

            # Returned two days later: the NACHA return file names the trace
            # number, which the database maps back to the payout.
            await _advance(kit, client, 2 * 86_400)
            assert await worker.deliver() == 1
            returned = await payouts.get_payout(kit.tenant, payout.payout_id)
            assert returned.state == PayoutState.RETURNED
            assert returned.reason_code == truth[payout.end_to_end_id]["reason_code"]
            assert await worker.deliver() == 0
            assert _entries(kit, "payout-settle:") == 1
            assert _entries(kit, "payout-reverse:") == 1
        finally:
            await plane.stop()
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_an_entry_queued_before_a_restart_is_sent_once_after_it(
    kit: Kit, state_dir: Path, clean_bank: str
) -> None:
    client = BankClient(clean_bank)
    try:
        [payout] = await _setup(kit, client, state_dir, 1)
        config = _config(kit, state_dir, clean_bank)
        first = await _plane(config, kit)
        try:
            assert await first.rail_workers[0].hand_off() == 1
        finally:
            await first.stop()  # before the cut-off: the entry is only queued
        assert _unsent(kit) == 1

        await _advance(kit, client, TO_FLUSH_S)
        second = await _plane(config, kit)
        try:
            worker = second.rail_workers[0]
            assert await worker.hand_off() == 0
            assert await worker.flush_if_due() == 1
            assert await worker.flush_if_due() == 0
            assert _unsent(kit) == 0
            truth = await client.truth()
            assert truth[payout.end_to_end_id]["received"] == 1
            assert await worker.deliver() == 1
            settled = await worker.payouts.get_payout(kit.tenant, payout.payout_id)
            assert settled.state == PayoutState.SETTLED
        finally:
            await second.stop()
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend_place", ["postgres"], indirect=True)
async def test_two_workers_on_one_database_send_each_entry_once(
    kit: Kit, state_dir: Path, clean_bank: str
) -> None:
    client = BankClient(clean_bank)
    workers: list[RailWorker] = []
    try:
        made = await _setup(kit, client, state_dir, 6)
        config = _config(kit, state_dir, clean_bank, file_batch=2)
        cipher = load_cipher(config.money.payouts, state_dir)
        other_ledger = await _other_ledger(kit, config)
        try:
            for ledger in (kit.ledger, other_ledger):
                payouts = Payouts(ledger, cipher, config.money.payouts, encode_payout_event)
                worker = RailWorker(payouts, config.rails, kit.clock)
                await worker.start()
                workers.append(worker)
            handed = await asyncio.gather(*(w.hand_off() for w in workers))
            handed_again = await asyncio.gather(*(w.hand_off() for w in workers))
            assert sum(handed) + sum(handed_again) == 6
            await _advance(kit, client, TO_FLUSH_S)
            sent = await asyncio.gather(*(w.flush("ach") for w in workers))
            assert sum(sent) == 6
            assert _unsent(kit) == 0
            truth = await client.truth()
            assert {p.end_to_end_id for p in made} <= set(truth)
            assert all(truth[p.end_to_end_id]["received"] == 1 for p in made)
            # Each outcome is recorded once, whichever worker reads it.
            delivered = await asyncio.gather(*(w.deliver() for w in workers))
            assert sum(delivered) == 6
            assert _entries(kit, "payout-settle:") == 6
        finally:
            for w in workers:
                await w.aclose()
            await other_ledger.stop()
    finally:
        await client.aclose()


async def _other_ledger(kit: Kit, config: Config) -> Ledger:
    ledger = make_ledger(kit.backend, kit.where, config, kit.signer, kit.clock)
    await ledger.start(sweepers=False)
    return ledger


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_a_payout_no_rail_carries_stays_approved_and_is_not_retried(
    kit: Kit, state_dir: Path, clean_bank: str
) -> None:
    client = BankClient(clean_bank)
    try:
        # A card payout to a bank account: no rail reaches it.
        [payout] = await _setup(kit, client, state_dir, 1, rail="card")
        plane = await _plane(_config(kit, state_dir, clean_bank), kit)
        try:
            worker = plane.rail_workers[0]
            assert await worker.hand_off() == 0
            assert await worker.hand_off() == 0
            found = await worker.payouts.get_payout(kit.tenant, payout.payout_id)
            assert found.state == PayoutState.APPROVED
            reason = kit.probe.scalar(
                "SELECT reason FROM rail_refusals WHERE tenant_id = %s", (kit.tenant,)
            )
            assert str(reason).startswith("NO_RAIL_REACHES")
            assert payout.end_to_end_id not in await client.truth()
        finally:
            await plane.stop()
    finally:
        await client.aclose()
