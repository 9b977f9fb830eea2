"""Re-routing against the real sandbox bank, in a running money plane
(manual clocks on both sides, moved by the test): a rail that fails a
payout before settlement with a re-routable reason (rails.reroute_reasons)
sends it to its decision's next alternate rail, where it settles with
exactly one debit and no reversal; a reason that is not re-routable, or no
alternate left, fails it with one reversal as before; a rail that cannot
carry it at hand-off passes it to the next alternate too."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from money_helpers import BackendPlace, Kit
from sandbox_helpers import BankClient
from test_rail_worker import TO_FLUSH_S, _advance, _config, _entries, _plane, us_payouts

from money_plane.domain import Kind
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.domain import (
    Payout,
    PayoutState,
    end_to_end_id_for,
    payout_id_for,
)
from money_plane.payouts.service import Payouts, load_cipher
from triplane.runtime.config import SandboxFaultsConfig
from triplane.runtime.errors import InvalidArgument
from triplane_sim.sandbox_bank.bank import _draw

IN_FLIGHT = "payouts_in_flight:USD"
SEED = 11


@pytest.fixture
def state_dir(backend_place: BackendPlace) -> Path:
    return backend_place.state_dir


def _accepted(rail: str, e2e: str, faults: SandboxFaultsConfig) -> bool:
    """Whether the sandbox bank takes this payment on `rail` (its fate is
    drawn from its seed, the rail and the end-to-end id)."""
    return _draw(SEED, rail, e2e).random() >= faults.reject_rate + faults.return_rate


def _key_where(tenant: str, instant_rejects: bool, ach_accepts: bool) -> str:
    """A payout key whose end-to-end id the bank rejects on instant and
    takes on ACH (as asked)."""
    faults = SandboxFaultsConfig(reject_rate=0.5, return_rate=0.0)
    for n in range(500):
        key = f"po-rr{n}"
        e2e = end_to_end_id_for(payout_id_for(tenant, key))
        if (not _accepted("instant", e2e, faults)) == instant_rejects and _accepted(
            "ach", e2e, faults
        ) == ach_accepts:
            return key
    raise AssertionError("no such key in 500")


async def _payout(
    kit: Kit,
    client: BankClient,
    state_dir: Path,
    key: str,
    rail: str,
    alternates: list[str],
) -> Payout:
    """An approved payout to a US account, the policy's route: `rail`,
    then `alternates`."""
    kit.clock.set_us(await client.now_us())
    payouts = await us_payouts(kit, state_dir)
    await kit.fund("merchant", 100_000)
    token = kit.move(key, "merchant", IN_FLIGHT, 4_321, kind=Kind.PAYOUT).decision_token
    payout, _ = await payouts.create_payout(
        kit.tenant,
        key,
        beneficiary_id="ben-us",
        merchant_id="m-1",
        debit_account_id="merchant",
        amount_minor=4_321,
        currency="USD",
        decision_token=token,
        pending_review=False,
        rail=rail,
        alternate_rails=alternates,
    )
    assert payout.state == PayoutState.APPROVED
    return payout


def _debits(kit: Kit, key: str) -> int:
    """PAYOUT entries of the payout (the merchant's debit into in-flight)."""
    return int(
        kit.probe.scalar(
            "SELECT COUNT(*) FROM entries WHERE tenant_id = %s AND idempotency_key = %s",
            (kit.tenant, key),
        )
    )


async def _balance(kit: Kit, account_id: str) -> int:
    account = await kit.ledger.get_account(kit.tenant, account_id)
    return account.credits_posted - account.debits_posted


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_a_reroutable_reject_settles_on_the_alternate_with_one_debit(
    kit: Kit, state_dir: Path, bank_factory: Callable[..., str]
) -> None:
    url = bank_factory(seed=SEED, faults={"reject_rate": 0.5}, reject_reasons=["AG01"])
    client = BankClient(url)
    key = _key_where(kit.tenant, instant_rejects=True, ach_accepts=True)
    try:
        payout = await _payout(kit, client, state_dir, key, "instant", ["ach_same_day", "ach"])
        plane = await _plane(_config(kit, state_dir, url), kit)
        worker = plane.rail_workers[0]
        payouts = worker.payouts
        try:
            assert await worker.hand_off() == 1
            truth = await client.truth()
            assert truth[payout.end_to_end_id]["outcome"] == "rejected"
            # The bank's pacs.002 RJCT AG01: not a failure, a re-route.
            assert await worker.deliver() == 1
            moved = await payouts.get_payout(kit.tenant, payout.payout_id)
            assert moved.state == PayoutState.APPROVED
            assert moved.rail == "ach_same_day"
            # Next-day ACH is the same adapter: not a rail left to try.
            assert moved.alternate_rails == []
            assert [(a.rail, a.reason_code) for a in moved.attempts] == [("instant", "AG01")]
            assert _entries(kit, "payout-reverse:") == 0
            assert await _balance(kit, IN_FLIGHT) == payout.amount_minor

            # Handed over again, to ACH: queued for the same-day file.
            assert await worker.hand_off() == 1
            await _advance(kit, client, TO_FLUSH_S)
            assert await worker.flush_if_due() == 1
            assert await worker.deliver() == 1
            settled = await payouts.get_payout(kit.tenant, payout.payout_id)
            assert settled.state == PayoutState.SETTLED
            assert settled.rail == "ach_same_day"
            assert _debits(kit, key) == 1
            assert _entries(kit, "payout-settle:") == 1
            assert _entries(kit, "payout-reverse:") == 0
            assert await _balance(kit, IN_FLIGHT) == 0
            # The instant rejection reported again changes nothing.
            assert await worker.deliver() == 0
            assert (await payouts.get_payout(kit.tenant, payout.payout_id)).state == (
                PayoutState.SETTLED
            )
        finally:
            await plane.stop()
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_a_reject_that_is_not_reroutable_fails_with_one_reversal(
    kit: Kit, state_dir: Path, bank_factory: Callable[..., str]
) -> None:
    url = bank_factory(seed=SEED, faults={"reject_rate": 1.0}, reject_reasons=["AC04"])
    client = BankClient(url)
    try:
        payout = await _payout(kit, client, state_dir, "po-ac04", "instant", ["ach"])
        plane = await _plane(_config(kit, state_dir, url), kit)
        worker = plane.rail_workers[0]
        try:
            assert await worker.hand_off() == 1
            assert await worker.deliver() == 1
            failed = await worker.payouts.get_payout(kit.tenant, payout.payout_id)
            assert failed.state == PayoutState.FAILED
            assert (failed.rail, failed.reason_code, failed.attempts) == ("instant", "AC04", [])
            assert _entries(kit, "payout-reverse:") == 1
            assert await worker.hand_off() == 0  # not sent anywhere else
            assert await worker.deliver() == 0
            assert _entries(kit, "payout-reverse:") == 1
            assert _debits(kit, "po-ac04") == 1
            assert await _balance(kit, IN_FLIGHT) == 0
        finally:
            await plane.stop()
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_a_reroutable_reject_with_no_alternate_left_fails_once(
    kit: Kit, state_dir: Path, bank_factory: Callable[..., str]
) -> None:
    url = bank_factory(seed=SEED, faults={"reject_rate": 1.0}, reject_reasons=["AG01"])
    client = BankClient(url)
    try:
        payout = await _payout(kit, client, state_dir, "po-alone", "instant", [])
        plane = await _plane(_config(kit, state_dir, url), kit)
        worker = plane.rail_workers[0]
        try:
            assert await worker.hand_off() == 1
            assert await worker.deliver() == 1
            failed = await worker.payouts.get_payout(kit.tenant, payout.payout_id)
            assert (failed.state, failed.reason_code) == (PayoutState.FAILED, "AG01")
            assert _entries(kit, "payout-reverse:") == 1
        finally:
            await plane.stop()
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_a_rail_that_cannot_carry_it_at_hand_off_passes_it_on(
    kit: Kit, state_dir: Path, clean_bank: str
) -> None:
    client = BankClient(clean_bank)
    try:
        # Routed to a card push, but the beneficiary is a bank account.
        payout = await _payout(kit, client, state_dir, "po-card", "card", ["ach"])
        plane = await _plane(_config(kit, state_dir, clean_bank), kit)
        worker = plane.rail_workers[0]
        try:
            assert await worker.hand_off() == 0
            moved = await worker.payouts.get_payout(kit.tenant, payout.payout_id)
            assert (moved.state, moved.rail) == (PayoutState.APPROVED, "ach")
            assert [(a.rail, a.reason_code) for a in moved.attempts] == [
                ("card", "NO_RAIL_REACHES")
            ]
            assert await worker.hand_off() == 1
            submitted = await worker.payouts.get_payout(kit.tenant, payout.payout_id)
            assert submitted.state == PayoutState.SUBMITTED
            assert kit.probe.scalar("SELECT COUNT(*) FROM rail_refusals", ()) == 0
        finally:
            await plane.stop()
    finally:
        await client.aclose()


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_the_payout_context_offers_each_rail_for_the_amount(
    kit: Kit, state_dir: Path, clean_bank: str
) -> None:
    client = BankClient(clean_bank)
    try:
        # Monday 09:00 New York (the bank's start): a same-day window is open.
        await _payout(kit, client, state_dir, "po-ctx", "ach", [])
        config = kit.ledger.config.payouts
        payouts = Payouts(kit.ledger, load_cipher(config, state_dir), config, encode_payout_event)
        context = await payouts.context(kit.tenant, "ben-us", "merchant", 200_000_000)
        offers = {o.rail: o for o in context.rail_options}
        assert list(offers) == ["instant", "ach_same_day", "ach", "sepa", "card"]
        assert (offers["instant"].reachable, offers["instant"].max_amount_minor) == (
            True,
            1_000_000_000,
        )
        same_day = offers["ach_same_day"]
        assert (same_day.reachable, same_day.max_amount_minor, same_day.window_open) == (
            True,
            100_000_000,
            True,
        )
        # 10:30 New York, 15:30 UTC: the first same-day cut-off.
        assert same_day.cutoff_at_us == kit.clock.now_us() + 90 * 60 * 1_000_000
        assert (offers["sepa"].reachable, offers["sepa"].unreachable_because) == (
            False,
            "currency",
        )
        assert offers["card"].unreachable_because == "beneficiary_kind"
        assert offers["card"].cost_minor == 25 + 200_000_000 * 15 // 10_000
        # No amount, no offers (the facts are for an amount).
        assert (await payouts.context(kit.tenant, "ben-us", "merchant")).rail_options == []
        with pytest.raises(InvalidArgument) as refused:
            await payouts.context(kit.tenant, "ben-us", "merchant", -1)
        assert refused.value.field == "amount.amount_minor"
    finally:
        await client.aclose()
