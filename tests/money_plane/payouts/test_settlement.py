"""Settlement schedules: periods closing at a cut-off in a time zone on a
business-day calendar, fees and the rolling reserve netted, and each period
settled exactly once on SQLite and PostgreSQL, by a restarted plane and by
two replicas sweeping at once. Time is the ManualClock's."""

from __future__ import annotations

import asyncio
import datetime as dt
from zoneinfo import ZoneInfo

import grpc
import pytest
from money_helpers import DEBITS_LIMITED, Kit, ledger_config, make_ledger, new_signer

from money_plane.app import MoneyPlane
from money_plane.payouts.service import Settlements
from money_plane.payouts.settlement import (
    Schedule,
    check_schedule,
    is_business_day,
    latest_closed_period,
    net,
)
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.runtime.errors import InvalidArgument, NotFound
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for


def at_us(zone: str, year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    local = dt.datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone))
    return int(local.timestamp() * 1_000_000)


def schedule(tenant: str = "t", **changes: object) -> Schedule:
    values: dict[str, object] = {
        "tenant_id": tenant,
        "account_id": "merchant",
        "merchant_id": "m-1",
        "payable_account_id": "payable",
        "frequency": "daily",
        "cut_off": "17:00",
        "time_zone": "America/New_York",
        "calendar": "NYSE",
        "fee_fixed_minor": 30,
        "fee_bps": 290,
        "fee_account_id": "fee",
        "reserve_bps": 1000,
        "reserve_days": 7,
        "reserve_account_id": "reserve",
    }
    values.update(changes)
    return Schedule(**values)  # type: ignore[arg-type]


def test_periods_close_at_the_cut_off_on_business_days() -> None:
    daily = schedule()
    # 2026-07-03 (a Friday) is an NYSE holiday (Independence Day observed).
    assert not is_business_day(dt.date(2026, 7, 3), "NYSE")
    assert is_business_day(dt.date(2026, 7, 3), "")
    evening = latest_closed_period(daily, at_us("America/New_York", 2026, 7, 3, 18))
    assert evening is not None and evening.key == "D2026-07-02"
    before = latest_closed_period(daily, at_us("America/New_York", 2026, 7, 6, 16, 59))
    assert before is not None and before.key == "D2026-07-02"
    after = latest_closed_period(daily, at_us("America/New_York", 2026, 7, 6, 17))
    assert after is not None and after.key == "D2026-07-06"
    assert after.closes_at_us == at_us("America/New_York", 2026, 7, 6, 17)
    # Weekly on Mondays, TARGET: Easter Monday 2026-04-06 moves it to Tuesday.
    weekly = schedule(frequency="weekly", calendar="TARGET", time_zone="Europe/Berlin")
    monday_night = latest_closed_period(weekly, at_us("Europe/Berlin", 2026, 4, 6, 20))
    assert monday_night is not None and monday_night.key == "W2026-14"
    tuesday = latest_closed_period(weekly, at_us("Europe/Berlin", 2026, 4, 7, 17, 1))
    assert tuesday is not None and tuesday.key == "W2026-15"
    instant = latest_closed_period(schedule(frequency="instant"), 120_000_000)
    assert instant is not None and instant.key == "I2"


def test_fees_and_the_reserve_are_netted_and_schedules_checked() -> None:
    netting = net(schedule(), 10_000)
    assert (netting.fee_minor, netting.reserve_minor, netting.net_minor) == (320, 968, 8_712)
    assert net(schedule(), 10).net_minor == 0
    for field, bad in (
        ("frequency", "hourly"),
        ("time_zone", "Mars/Olympus"),
        ("calendar", "LSE"),
        ("cut_off", "5pm"),
        ("fee_bps", 10_001),
    ):
        with pytest.raises(InvalidArgument) as refused:
            check_schedule(schedule(**{field: bad}))
        assert refused.value.field == f"schedule.{field}"


async def _setup(kit: Kit, **changes: object) -> Settlements:
    await kit.open(("payable", "USD", DEBITS_LIMITED, 0))
    settlements = Settlements(kit.ledger)
    await settlements.put_schedule(schedule(kit.tenant, **changes))
    return settlements


def settle_entries(kit: Kit) -> int:
    return int(
        kit.probe.scalar(
            "SELECT COUNT(*) FROM entries WHERE tenant_id = %s AND idempotency_key LIKE %s",
            (kit.tenant, "settle:%"),
        )
    )


async def test_a_period_settles_once_with_fees_and_reserve(kit: Kit) -> None:
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 16))
    settlements = await _setup(kit)
    await kit.fund("merchant", 10_000)
    assert await settlements.settle_due() == 0  # 2026-05-29's period: nothing then
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 17, 10))
    await kit.fund("merchant", 5_000)  # after the cut-off: the next period's
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 17, 30))
    assert await settlements.settle_due() == 1
    assert await settlements.settle_due() == 0
    assert (await kit.balance("merchant"))[0] == 5_000
    assert (await kit.balance("payable"))[0] == 8_712
    assert (await kit.balance("fee"))[0] == 320
    assert (await kit.balance("reserve"))[0] == 968
    [done] = [s for s in await settlements.settlements(kit.tenant, "merchant") if s.state]
    assert (done.period, done.state, done.gross_minor) == ("D2026-06-01", "settled", 10_000)
    # The rolling reserve comes back to the payable account after 7 days.
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 8, 18))
    await kit.ledger.release_due_reserves()
    assert (await kit.balance("payable"))[0] == 8_712 + 968
    assert settle_entries(kit) == 1
    await kit.assert_balanced()
    with pytest.raises(NotFound):
        await settlements.put_schedule(schedule(kit.tenant, payable_account_id="ghost"))


async def test_settlements_are_listed_for_their_account_alone(kit: Kit) -> None:
    # "_" and case are not patterns: mer_1's list holds neither merX1's nor MER_1's.
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 12))
    await kit.open(("payable", "USD", DEBITS_LIMITED, 0))
    settlements = Settlements(kit.ledger)
    for account in ("mer_1", "merX1", "MER_1"):
        await kit.open((account, "USD", DEBITS_LIMITED, 0))
        await settlements.put_schedule(schedule(kit.tenant, account_id=account))
        await kit.fund(account, 10_000)
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 18))
    assert await settlements.settle_due() == 3
    for account in ("mer_1", "merX1", "MER_1"):
        [listed] = await settlements.settlements(kit.tenant, account)
        assert (listed.account_id, listed.state) == (account, "settled")


async def test_below_the_minimum_the_balance_waits(kit: Kit) -> None:
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 12))
    settlements = await _setup(kit, min_payout_minor=10_000, fee_bps=0, fee_fixed_minor=0)
    await kit.fund("merchant", 6_000)
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 18))
    assert await settlements.settle_due() == 1
    [first] = await settlements.settlements(kit.tenant, "merchant")
    assert first.state == "below_minimum" and not first.entry_id
    await kit.fund("merchant", 6_000)
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 2, 18))
    assert await settlements.settle_due() == 1
    assert (await kit.balance("payable"))[0] == 12_000 - 1_200  # the reserve held back
    assert settle_entries(kit) == 1


async def test_replicas_and_a_restart_settle_a_period_once(
    kit: Kit, tmp_path_factory: pytest.TempPathFactory
) -> None:
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 12))
    settlements = await _setup(kit)
    await kit.fund("merchant", 10_000)
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 18))
    # A second replica (its own ledger and connections) on the same database.
    config = ledger_config(tmp_path_factory.mktemp("replica"), kit.signer)
    other = make_ledger(kit.backend, kit.where, config, kit.signer, kit.clock)
    await other.start(sweepers=False)
    try:
        results = await asyncio.gather(
            settlements.settle_due(), Settlements(other).settle_due(), settlements.settle_due()
        )
        assert sum(results) == 1
        # And after a restart: the period is claimed, nothing more happens.
        assert await Settlements(other).settle_due() == 0
    finally:
        await other.stop()
    assert settle_entries(kit) == 1
    assert (await kit.balance("merchant"))[0] == 0
    await kit.assert_balanced()


async def test_schedules_over_grpc_refuse_bad_input_naming_the_field(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    state_dir = tmp_path_factory.mktemp("settle-grpc")
    plane = MoneyPlane(ledger_config(state_dir, new_signer()), listen="127.0.0.1:0")
    port = await plane.start(sweepers=False, relay=False, metrics=False)
    try:
        async with channel_for(plane.config, f"127.0.0.1:{port}") as channel:
            stub = money_pb2_grpc.LedgerServiceStub(channel)
            await stub.CreateTenant(money_pb2.CreateTenantRequest(tenant_id="settle"))
            await stub.CreateAccounts(
                money_pb2.CreateAccountsRequest(
                    tenant_id="settle",
                    accounts=[
                        money_pb2.NewAccount(
                            account_id=name,
                            currency="USD",
                            kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                            constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                        )
                        for name in ("merchant", "payable")
                    ],
                )
            )
            good = money_pb2.SettlementSchedule(
                tenant_id="settle",
                account_id="merchant",
                merchant_id="m-1",
                payable_account_id="payable",
                frequency="weekly",
                cut_off="16:30",
                time_zone="Europe/Berlin",
                calendar="TARGET",
            )
            stored = await stub.PutSettlementSchedule(
                money_pb2.PutSettlementScheduleRequest(schedule=good)
            )
            assert stored.schedule == good
            bad = money_pb2.SettlementSchedule()
            bad.CopyFrom(good)
            bad.time_zone = "Mars/Olympus"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.PutSettlementSchedule(
                    money_pb2.PutSettlementScheduleRequest(schedule=bad)
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert parse_rpc_error(refused.value) == ("TIME_ZONE_UNKNOWN", "schedule.time_zone")
            ran = await stub.RunSettlements(money_pb2.RunSettlementsRequest())
            assert ran.settled == 0  # nothing accrued
            listed = await stub.ListSettlements(
                money_pb2.ListSettlementsRequest(tenant_id="settle", account_id="merchant")
            )
            assert list(listed.settlements) == []
    finally:
        await plane.stop()


async def test_a_settlement_that_fails_half_way_leaves_no_claim_and_settles_later(
    kit: Kit,
) -> None:
    """The claim and the entry are one transaction: when the entry cannot be
    posted (here its fee account does not exist yet, as a crash before the
    commit would leave it), neither the claim nor anything else is written,
    and the next sweep settles the period once."""
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 12))
    settlements = await _setup(kit, fee_account_id="fee_later")
    await kit.fund("merchant", 10_000)
    kit.clock.set_us(at_us("America/New_York", 2026, 6, 1, 18))
    assert await settlements.settle_due() == 0
    assert await settlements.settlements(kit.tenant, "merchant") == []
    assert settle_entries(kit) == 0 and (await kit.balance("merchant"))[0] == 10_000
    await kit.open(("fee_later", "USD", DEBITS_LIMITED, 0))
    assert await settlements.settle_due() == 1
    assert await settlements.settle_due() == 0
    assert settle_entries(kit) == 1 and (await kit.balance("fee_later"))[0] == 320
