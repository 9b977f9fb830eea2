"""The product demo's money out and back (issue 14): settle, pay out, reconcile.

After the checkout workload, through the planes' public APIs:

1. settlement: each demo merchant's sales account gets an instant settlement
   schedule (a platform fee to a fee account, the net to the merchant's
   payable account) through the money plane's PutSettlementSchedule, and
   RunSettlements settles them;
2. payouts: a beneficiary per merchant through the gateway's
   CreateBeneficiary (US bank accounts and card tokens), then two payouts
   each through the gateway's CreatePayout; the policy routes them among the
   rails (a first payout to a bank account by ACH, a later one may go
   instant; cards by the card rail) and the money plane's rail worker hands
   them to the sandbox bank, which books them with a few percent of faults;
3. the bank's days go by: its manual clock is moved a day at a time (POST
   /v1/clock) so late bookings, returns and the end of each day happen; the
   money plane's statement intake imports the bank's notifications and
   end-of-day statements by itself and reconciles them.

The summary: settlement totals, payouts by rail and state, the share of bank
lines matched, breaks by class next to the faults the bank's own record
(GET /v1/truth) says it made, and the time from a document's arrival to its
breaks (p50/p99 of the money plane's triplane_money_recon_detection_seconds).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.money.v1 import money_pb2
from triplane.runtime.config import Config
from triplane_client import GatewayClient, LedgerAdminClient, PolicyAdminClient, TriplaneApiError
from triplane_sim.demo_world import World, kyc_profile
from triplane_tools.stack import Stack

# A few percent of each fault (the sandbox bank draws each payment's fate
# from its seed and end-to-end id).
BANK_FAULTS = {
    "reject_rate": 0.04,
    "return_rate": 0.05,
    "duplicate_rate": 0.04,
    "late_rate": 0.05,
    "amount_change_rate": 0.04,
    "batch_rate": 0.3,
}
# Days the bank's clock is moved after the payouts: late bookings (2 days
# late: past the expected window and recon's grace) and returns (2 days
# after booking, 4 for a late one) all happen.
BANK_DAYS = 5
LATE_BY_DAYS = 2
# The loops' intervals in the demo (the defaults are minutes apart).
LOOP_INTERVAL_S = 1.0
# How long a bank day's bookings take to be read and recorded (a few loops).
DAY_SETTLE_S = 4 * LOOP_INTERVAL_S
FEE_ACCOUNT = "settlement-fees"
FEE_BPS = 100
# Under the policy's review threshold for a first payout to a beneficiary.
PAYOUT_CAP_MINOR = 90_000
PAYOUT_MIN_MINOR = 500
HANDOFF_TIMEOUT_S = 60.0
MERCHANT_KYC_TIER = 3
# The bank's faults (besides rejects and returns) a break stands for:
# duplicate, late (when past the expected window and grace) and
# amount_mismatch; a batch booking is matched, not a fault.
FAULTS_SHOWN = ("duplicate", "late", "amount_changed")


def overrides(now: dt.datetime) -> dict[str, Any]:
    """The demo stack's settings for this: the sandbox bank on a manual clock
    starting now (so its days pass when the demo says), faults on; the rail
    worker's and statement intake's loops a second apart; ACH files sent at
    every check whatever the hour (flush_lead_s: longer than any gap to a
    cut-off), so `make demo` pays out at night too."""
    start = now.astimezone(dt.UTC).replace(microsecond=0).isoformat()
    return {
        "sandbox_bank": {
            "clock": "manual",
            "manual_start": start,
            "faults": BANK_FAULTS,
            "late_by_days": LATE_BY_DAYS,
        },
        "rails": {
            "worker": {
                "handoff_interval_s": LOOP_INTERVAL_S,
                "flush_check_interval_s": LOOP_INTERVAL_S,
                "flush_lead_s": 30 * 86_400,
                "deliver_interval_s": LOOP_INTERVAL_S,
            }
        },
        "money": {"recon": {"intake_interval_s": LOOP_INTERVAL_S}},
    }


@dataclass
class PayoutReport:
    settled: Settled | None = None
    # Payout id -> (rail, state) as the gateway last answered; its end-to-end id.
    payouts: dict[str, tuple[str, str]] = field(default_factory=dict)
    end_to_end: dict[str, str] = field(default_factory=dict)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    # What the bank did (GET /v1/truth), for our payouts.
    bank: list[dict[str, Any]] = field(default_factory=list)
    lines: int = 0
    lines_matched: int = 0
    # (class, state) -> count.
    breaks: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    detection_s: tuple[float, float] | None = None
    detections: int = 0
    elapsed_s: float = 0.0

    def by_rail_and_state(self) -> dict[str, collections.Counter[str]]:
        out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for rail, state in self.payouts.values():
            out[rail or "-"][state] += 1
        return dict(out)

    def bank_faults(self) -> collections.Counter[str]:
        """What the bank's record says it did to our payouts, beside booking
        them once on time (a rejected payout fails: its money comes back in
        the ledger and no break is due)."""
        found: collections.Counter[str] = collections.Counter()
        for p in self.bank:
            if p["outcome"] != "accepted":
                found[p["outcome"]] += 1
            for fault in p["faults"]:
                if fault in FAULTS_SHOWN:
                    found[fault] += 1
        return found

    def failures(self) -> list[str]:
        """What makes the demo fail: no payout made, one that never reached
        a rail, or bank bookings the intake never imported."""
        found = []
        if not self.payouts:
            found.append(f"no payout was created ({dict(self.refused)})")
        stuck = sum(state == "approved" for _, state in self.payouts.values())
        if stuck:
            found.append(f"{stuck} payouts never reached a rail")
        # A batch booking is one line for several payouts.
        booked = len({b["account_servicer_ref"] for p in self.bank for b in p["bookings"]})
        if booked and self.lines < booked:
            found.append(
                f"the bank booked {booked} lines; the statement intake imported {self.lines}"
            )
        return found

    def open_breaks_by_class(self) -> collections.Counter[str]:
        found: collections.Counter[str] = collections.Counter()
        for (cls, state), count in self.breaks.items():
            if state == "open":
                found[cls] += count
        return found


def _usd(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="USD")


def payable_of(merchant_id: str) -> str:
    return f"{merchant_id}.payable"


@dataclass
class Settled:
    """What the settlements moved so far: each merchant's net in its payable
    account, the fees in the fee account (read as ledger balances)."""

    runs: int = 0
    net_by_merchant: dict[str, int] = field(default_factory=dict)
    fees_minor: int = 0

    @property
    def net_minor(self) -> int:
        return sum(self.net_by_merchant.values())

    @property
    def gross_minor(self) -> int:
        return self.net_minor + self.fees_minor

    @property
    def merchants(self) -> int:
        return sum(1 for amount in self.net_by_merchant.values() if amount > 0)


async def settle(ledger: LedgerAdminClient, world: World) -> Settled:
    """Instant settlement schedules for the merchants (a fee to the fee
    account, the net to each merchant's payable account); RunSettlements;
    what it moved."""
    tenant = world.tenant_id
    merchants = [m.merchant_id for m in world.merchants]
    await ledger.create_accounts(
        tenant,
        [
            money_pb2.NewAccount(
                account_id=account_id,
                currency=world.currency,
                kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
            )
            for account_id in [FEE_ACCOUNT, *(payable_of(m) for m in merchants)]
        ],
    )
    for merchant_id in merchants:
        await ledger.put_settlement_schedule(
            money_pb2.SettlementSchedule(
                tenant_id=tenant,
                account_id=merchant_id,
                merchant_id=merchant_id,
                payable_account_id=payable_of(merchant_id),
                frequency="instant",
                cut_off="00:00",
                time_zone="UTC",
                fee_bps=FEE_BPS,
                fee_account_id=FEE_ACCOUNT,
            )
        )
    settled = Settled(runs=await ledger.run_settlements())
    for merchant_id in merchants:
        balance = await ledger.get_balance(tenant, payable_of(merchant_id))
        settled.net_by_merchant[merchant_id] = balance.posted_minor
    settled.fees_minor = (await ledger.get_balance(tenant, FEE_ACCOUNT)).posted_minor
    return settled


async def create_payouts(
    client: GatewayClient,
    policy: PolicyAdminClient,
    world: World,
    settled: Settled,
    report: PayoutReport,
) -> None:
    """A beneficiary per settled merchant (even: a US bank account, odd: a
    card token), its KYC profile, then two payouts each (the second to a
    beneficiary already paid once, which the policy may route instant)."""
    tenant = world.tenant_id
    now_us = int(time.time() * 1_000_000)
    plans: list[tuple[str, str, int]] = []
    for index, merchant in enumerate(world.merchants):
        merchant_id = merchant.merchant_id
        amount = min(settled.net_by_merchant.get(merchant_id, 0) // 3, PAYOUT_CAP_MINOR)
        if amount < PAYOUT_MIN_MINOR:
            continue
        # A business with full KYC: tier 3, whose limits a payout of up to
        # PAYOUT_CAP_MINOR stays under.
        profile = kyc_profile(tenant, merchant_id, index, now_us)
        profile.kyc_tier = MERCHANT_KYC_TIER
        await policy.put_customer_profile(
            profile,
            change_id=f"kyc-{merchant_id}",
            actor="synthetic-kyc",
        )
        destination: dict[str, Any] = (
            {
                "routing_number": "011000015",
                "account_number": f"9876{index:05d}",
                "account_type": "checking",
            }
            if index % 2 == 0
            else {"token_kind": "card", "token": f"tok_card_{index:08d}"}
        )
        beneficiary_id = f"ben-{merchant_id}"
        try:
            await client.create_beneficiary(
                idempotency_key=f"demo-{beneficiary_id}",
                beneficiary_id=beneficiary_id,
                merchant_id=merchant_id,
                holder_name=f"Merchant {index}",
                country="US",
                **destination,
            )
        except TriplaneApiError as error:
            report.refused[f"beneficiary {error.reason or error.code.name}"] += 1
            continue
        plans.append((merchant_id, beneficiary_id, amount))
    for round_ in (1, 2):
        for merchant_id, beneficiary_id, amount in plans:
            try:
                answer = await client.create_payout(
                    idempotency_key=f"demo-payout-{merchant_id}-{round_}",
                    merchant_id=merchant_id,
                    account_id=payable_of(merchant_id),
                    beneficiary_id=beneficiary_id,
                    amount=_usd(amount - round_),
                    description=f"demo payout {round_}",
                )
            except TriplaneApiError as error:
                report.refused[f"payout {error.reason or error.code.name}"] += 1
                continue
            if not answer.HasField("payout"):
                outcome = gw.Outcome.Name(answer.outcome).removeprefix("OUTCOME_").lower()
                why = answer.reasons[0].code if answer.reasons else ""
                report.refused[f"payout {outcome} {why}".strip()] += 1
                continue
            p = answer.payout
            report.payouts[p.payout_id] = (p.rail, _state(p.state))
            report.end_to_end[p.payout_id] = p.end_to_end_id
    # Idempotency keys of the two rounds differ: a second create of the
    # same round replays its payout, never a new one.


def _state(state: int) -> str:
    return gw.PayoutState.Name(state).removeprefix("PAYOUT_STATE_").lower()  # type: ignore[arg-type]


async def refresh(client: GatewayClient, report: PayoutReport) -> None:
    for payout_id in list(report.payouts):
        p = (await client.get_payout(payout_id=payout_id)).payout
        report.payouts[payout_id] = (p.rail, _state(p.state))


async def wait_handed_off(client: GatewayClient, report: PayoutReport) -> None:
    """Until no payout waits for its rail (or HANDOFF_TIMEOUT_S)."""
    deadline = time.monotonic() + HANDOFF_TIMEOUT_S
    while time.monotonic() < deadline:
        await refresh(client, report)
        if not any(state == "approved" for _, state in report.payouts.values()):
            return
        await asyncio.sleep(LOOP_INTERVAL_S)


async def pass_bank_days(bank_url: str, days: int) -> None:
    """Moves the bank's clock a day at a time, giving the rail worker and the
    statement intake a few loops to read each day's news."""
    async with aiohttp.ClientSession() as session:
        for _ in range(days):
            await asyncio.sleep(DAY_SETTLE_S)
            async with session.post(f"{bank_url}/v1/clock", json={"advance_s": 86_400}) as resp:
                resp.raise_for_status()
        await asyncio.sleep(DAY_SETTLE_S)


async def bank_truth(bank_url: str, end_to_end_ids: set[str]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{bank_url}/v1/truth") as resp:
        resp.raise_for_status()
        found = await resp.json()
    return [p for p in found["payments"] if p["end_to_end_id"] in end_to_end_ids]


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """Prometheus's histogram_quantile over (upper bound, cumulative count)
    buckets, +Inf last: linear within the bucket the rank falls in."""
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 0.0)
        lower, below = upper, count
    return lower


async def detection_from_metrics(listen: str) -> tuple[tuple[float, float] | None, int]:
    """p50 and p99 of triplane_money_recon_detection_seconds, and its count,
    from the money plane's metrics endpoint."""
    url = f"http://{listen}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        resp.raise_for_status()
        text = await resp.text()
    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(text):
        if family.name != "triplane_money_recon_detection_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), float(sample.value)))
    buckets.sort()
    count = int(buckets[-1][1]) if buckets else 0
    if not count:
        return None, 0
    return (quantile(buckets, 0.5), quantile(buckets, 0.99)), count


def read_recon(config: Config, tenant_id: str, report: PayoutReport) -> None:
    """Bank lines matched and breaks by class and state, from the money
    plane's SQLite database (read-only, beside the running plane)."""
    path = Path(config.money.store.sqlite_path)
    if not path.is_absolute():
        path = config.state_path / path
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        lines, matched = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(match_id <> ''), 0) FROM statement_lines "
            "WHERE tenant_id = ?",
            (tenant_id,),
        ).fetchone()
        report.lines, report.lines_matched = int(lines), int(matched)
        for cls, state, count in db.execute(
            "SELECT break_class, state, COUNT(*) FROM breaks WHERE tenant_id = ? "
            "GROUP BY break_class, state",
            (tenant_id,),
        ):
            report.breaks[(str(cls), str(state))] = int(count)
    finally:
        db.close()


async def run_payouts(
    stack: Stack, config: Config, world: World, client: GatewayClient
) -> PayoutReport:
    report = PayoutReport()
    started = time.monotonic()
    addresses = stack.addresses
    if "sandbox_bank" not in addresses:
        report.refused["no sandbox bank in the stack"] += 1
        return report
    bank_url = f"http://{addresses['sandbox_bank']}"
    ledger = LedgerAdminClient(addresses["money"], timeout_s=30, tls=stack.tls_files())
    policy = PolicyAdminClient(addresses["policy"], timeout_s=30, tls=stack.tls_files())
    try:
        report.settled = await settle(ledger, world)
        await create_payouts(client, policy, world, report.settled, report)
    finally:
        await ledger.close()
        await policy.close()
    await wait_handed_off(client, report)
    await pass_bank_days(bank_url, BANK_DAYS)
    await refresh(client, report)
    report.bank = await bank_truth(bank_url, set(report.end_to_end.values()))
    read_recon(config, world.tenant_id, report)
    if config.money.metrics_listen:
        report.detection_s, report.detections = await detection_from_metrics(
            config.money.metrics_listen
        )
    report.elapsed_s = time.monotonic() - started
    return report


def print_report(report: PayoutReport) -> None:
    settled = report.settled or Settled()
    print(
        f"\n== money out and back (settlement, payouts, reconciliation; "
        f"{report.elapsed_s:.0f} s) =="
    )
    print(
        f"settlements       {settled.merchants} merchants settled ({FEE_BPS} bps fee): "
        f"gross {settled.gross_minor / 100:,.2f}, fees {settled.fees_minor / 100:,.2f}, "
        f"net {settled.net_minor / 100:,.2f} USD"
    )
    print(f"payouts           {len(report.payouts)} created; refused {dict(report.refused) or '-'}")
    for rail, states in sorted(report.by_rail_and_state().items()):
        print(f"  {rail:<13} {sum(states.values()):>4}  {dict(sorted(states.items()))}")
    share = report.lines_matched / report.lines if report.lines else math.nan
    print(
        f"bank lines        {report.lines} imported by the statement intake, "
        f"{report.lines_matched} matched ({share:.0%})"
    )
    print(f"bank's record     {dict(sorted(report.bank_faults().items())) or '-'}")
    by_class: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for (cls, state), count in sorted(report.breaks.items()):
        by_class[cls][state] = count
    print(f"breaks by class   {dict(by_class) or '-'}")
    if report.detection_s is not None:
        p50, p99 = report.detection_s
        print(
            f"time to detection p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms "
            f"({report.detections} breaks; bank document in the intake -> break event)"
        )
