"""`triplane demo` (`make demo`): a fresh stack on embedded defaults, a bounded
payments workload through the money plane's public gRPC API, and a summary.

The workload is what an embedded-finance platform does all day: customers pay
merchants (authorize, then capture with a platform fee, a fixed tax and a
rolling reserve leg released a few seconds later), some holds are voided, some
captures are partly refunded, merchants are paid out, and peer transfers go
one by one and in batches. Some requests fail on purpose (a payment above the
customer's funds, a capture after the hold expired, refunds beyond what is left),
and some are retried with their idempotency key to show the original result
comes back. Every new money movement carries a decision token signed with the
stack's dev key, as the policy plane will sign them.

The summary: operations per second and p50/p99 latency per kind, outcome counts,
reserves released, outbox events found in JetStream for the tenant against what
the workload implies, and the ledger's CheckBalanced. Exit status 0 only when
the ledger is balanced and every check holds.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import random
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf import timestamp_pb2

from money_plane import codec as money_codec
from money_plane.domain import movement_of
from triplane.common.v1 import envelope_pb2, types_pb2
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime import bus, tokens
from triplane.runtime import codec as wire
from triplane.runtime.config import Config, load_config, with_overrides
from triplane.runtime.nats_security import nats_options
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane_tools import demo_payouts
from triplane_tools.stack import Stack, describe

T = TypeVar("T")

CURRENCY = "USD"
CUSTOMER_FUNDING_MINOR = 10_000_000
DECLINED_AMOUNT_MINOR = 5 * CUSTOMER_FUNDING_MINOR
PLATFORM_FEE_BPS = 290
TAX_FIXED_MINOR = 30
RESERVE_BPS = 1_000
RESERVE_DELAY_S = 3.0
REFUND_SHARE = 0.25
PAYOUT_MINOR = 2_000
BATCH_TRANSFERS = 25
TOKEN_TTL_S = 300
RPC_TIMEOUT_S = 10.0
# Reserve releases are swept every money.reserves.release_sweep_interval_s.
RELEASE_GRACE_S = 3.0
OUTBOX_DRAIN_TIMEOUT_S = 20.0
CAPTURED_REMEMBERED = 4_000
# Deliberate failures: these reasons are part of the workload, not errors.
EXPECTED_REASONS = frozenset(
    {"INSUFFICIENT_FUNDS", "HOLD_EXPIRED", "REFUND_EXCEEDS_ENTRY", "ENTRY_FULLY_REFUNDED"}
)
# Operations a worker picks from, with their weights.
OPERATIONS: dict[str, int] = {
    "payment": 40,
    "void": 10,
    "refund": 12,
    "transfer": 14,
    "payout": 5,
    "declined": 5,
    "batch": 6,
    "retry": 6,
    "late_capture": 2,
}
KIND_ORDER = ["authorize", "capture", "void", "refund", "transfer", "payout", "batch", "retry"]


@dataclass(frozen=True)
class DemoOptions:
    duration_s: float = 20.0
    workers: int = 16
    customers: int = 200
    merchants: int = 20
    seed: int = 7
    all_planes: bool = False
    state_dir: str = ""
    # The money-plane-only workload (the demo before the gateway existed).
    money_only: bool = False


@dataclass
class KindStats:
    latencies_ms: list[float] = field(default_factory=list)
    items: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class Stats:
    kinds: dict[str, KindStats] = field(default_factory=lambda: collections.defaultdict(KindStats))
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    # What the workload implies the outbox must publish, by event subject suffix.
    expected_events: collections.Counter[str] = field(default_factory=collections.Counter)
    reserves_created: int = 0
    last_release_at_s: float = 0.0

    def record(self, kind: str, latency_ms: float, outcomes: list[str]) -> None:
        stats = self.kinds[kind]
        stats.latencies_ms.append(latency_ms)
        stats.items += len(outcomes)
        stats.outcomes.update(outcomes)
        for outcome in outcomes:
            if outcome != "ok" and outcome not in EXPECTED_REASONS:
                self.unexpected[f"{kind}:{outcome}"] += 1


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _money(amount_minor: int) -> types_pb2.Money:
    return wire.money(amount_minor, CURRENCY)


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    return wire.timestamp(int(seconds * 1_000_000))


class DemoClient:
    """The money plane's public API as the demo uses it, timed per call."""

    def __init__(
        self, stub: money_pb2_grpc.LedgerServiceStub, tenant_id: str, signer: tokens.TokenSigner
    ) -> None:
        self.stub = stub
        self.tenant_id = tenant_id
        self.signer = signer
        self.stats = Stats()

    def signed(
        self, transfer: pb.Transfer, debit: str, credit: str, amount_minor: int
    ) -> pb.Transfer:
        """The transfer with a decision token for what it will do (the demo
        stands in for the policy plane, with its key): `debit`, `credit` and
        `amount_minor` as the ledger resolves them (a capture's from its hold,
        a refund's from the entry it gives back)."""
        command = money_codec.command(self.tenant_id, transfer)
        movement = movement_of(
            command,
            debit_account_id=debit,
            credit_account_id=credit,
            amount_minor=amount_minor,
            currency=CURRENCY,
        )
        transfer.decision_token, _ = self.signer.issue(
            movement,
            decision_id=f"dec_{uuid.uuid4().hex}",
            issued_at_s=int(time.time()),
            ttl_s=TOKEN_TTL_S,
            policy_version="demo",
        )
        return transfer

    def movement(
        self, kind: int, key: str, debit: str, credit: str, amount_minor: int
    ) -> pb.Transfer:
        """A new money movement (TRANSFER, PAYOUT, AUTHORIZE) with its token."""
        transfer = pb.Transfer(
            idempotency_key=key,
            kind=kind,  # type: ignore[arg-type]
            debit_account_id=debit,
            credit_account_id=credit,
            amount=_money(amount_minor),
        )
        return self.signed(transfer, debit, credit, amount_minor)

    async def one(self, kind: str, transfer: pb.Transfer) -> pb.TransferResult | None:
        """CreateTransfer; None when it failed (the reason is counted)."""
        request = pb.CreateTransferRequest(tenant_id=self.tenant_id, transfer=transfer)
        result = await self._timed(kind, self.stub.CreateTransfer(request, timeout=RPC_TIMEOUT_S))
        return None if result is None else result.result

    async def many(self, kind: str, transfers: list[pb.Transfer]) -> list[pb.TransferResult]:
        """CreateTransfers (not atomic): one result per transfer."""
        request = pb.CreateTransfersRequest(tenant_id=self.tenant_id, transfers=transfers)
        started = time.perf_counter()
        try:
            response = await self.stub.CreateTransfers(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            reason, _ = parse_rpc_error(err)
            outcomes = [reason or err.code().name] * len(transfers)
            self.stats.record(kind, (time.perf_counter() - started) * 1000, outcomes)
            return []
        outcomes = [r.error.reason if r.HasField("error") else "ok" for r in response.results]
        self.stats.record(kind, (time.perf_counter() - started) * 1000, outcomes)
        return list(response.results)

    async def _timed(self, kind: str, call: Awaitable[T]) -> T | None:
        started = time.perf_counter()
        try:
            result = await call
        except grpc.aio.AioRpcError as err:
            reason, _ = parse_rpc_error(err)
            self.stats.record(
                kind, (time.perf_counter() - started) * 1000, [reason or err.code().name]
            )
            return None
        self.stats.record(kind, (time.perf_counter() - started) * 1000, ["ok"])
        return result


@dataclass
class Accounts:
    customers: list[str]
    merchants: list[str]
    settlement: str = "settlement"
    platform_fee: str = "platform-fee"
    tax: str = "tax-payable"
    reserve: str = "merchant-reserve"


def _new_accounts(accounts: Accounts) -> list[pb.NewAccount]:
    none = pb.BALANCE_CONSTRAINT_NONE
    no_overdraft = pb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS
    specs = [
        (accounts.settlement, pb.ACCOUNT_KIND_ASSET, none, "bank settlement"),
        (accounts.platform_fee, pb.ACCOUNT_KIND_REVENUE, none, "platform fee"),
        (accounts.tax, pb.ACCOUNT_KIND_LIABILITY, none, "tax payable"),
        (accounts.reserve, pb.ACCOUNT_KIND_LIABILITY, no_overdraft, "rolling reserve"),
    ]
    specs += [(c, pb.ACCOUNT_KIND_LIABILITY, no_overdraft, "customer") for c in accounts.customers]
    specs += [(m, pb.ACCOUNT_KIND_LIABILITY, no_overdraft, "merchant") for m in accounts.merchants]
    return [
        pb.NewAccount(
            account_id=account_id,
            currency=CURRENCY,
            kind=kind,
            constraint=constraint,
            metadata={"role": role},
        )
        for account_id, kind, constraint, role in specs
    ]


async def set_up(client: DemoClient, options: DemoOptions) -> Accounts:
    """The tenant, its accounts, and every customer funded from settlement."""
    accounts = Accounts(
        customers=[f"cust-{i:04d}" for i in range(options.customers)],
        merchants=[f"merch-{i:03d}" for i in range(options.merchants)],
    )
    stub, tenant_id = client.stub, client.tenant_id
    await stub.CreateTenant(
        pb.CreateTenantRequest(tenant_id=tenant_id, display_name="Demo Platform"),
        timeout=RPC_TIMEOUT_S,
    )
    new_accounts = _new_accounts(accounts)
    await stub.CreateAccounts(
        pb.CreateAccountsRequest(tenant_id=tenant_id, accounts=new_accounts),
        timeout=RPC_TIMEOUT_S,
    )
    client.stats.expected_events["account.opened"] += len(new_accounts)
    funding = [
        client.movement(
            pb.TRANSFER_KIND_TRANSFER,
            f"fund-{customer}",
            accounts.settlement,
            customer,
            CUSTOMER_FUNDING_MINOR,
        )
        for customer in accounts.customers
    ]
    request = pb.CreateTransfersRequest(tenant_id=tenant_id, transfers=funding, atomic=True)
    response = await stub.CreateTransfers(request, timeout=RPC_TIMEOUT_S)
    failed = [r.error.reason for r in response.results if r.HasField("error")]
    if failed:
        raise RuntimeError(f"funding the customers failed: {collections.Counter(failed)}")
    client.stats.expected_events["entry.posted"] += len(funding)
    return accounts


@dataclass
class Shared:
    """What workers share: captures that can be refunded, and the clock of
    the last reserve release."""

    # (entry id, amount, the account it credited, the account it debited)
    captured: collections.deque[tuple[str, int, str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=CAPTURED_REMEMBERED)
    )


class Worker:
    """One concurrent client running random operations until its deadline."""

    def __init__(
        self, index: int, client: DemoClient, accounts: Accounts, shared: Shared, seed: int
    ) -> None:
        self.index = index
        self.client = client
        self.accounts = accounts
        self.shared = shared
        self.rng = random.Random(seed * 1_000 + index)
        self.sequence = 0
        self.last_transfer: pb.Transfer | None = None
        self.last_entry_id = ""

    def key(self, what: str) -> str:
        self.sequence += 1
        return f"w{self.index}-{self.sequence}-{what}"

    async def run(self, until: float) -> None:
        names, weights = list(OPERATIONS), list(OPERATIONS.values())
        while time.monotonic() < until:
            operation = self.rng.choices(names, weights)[0]
            await getattr(self, f"op_{operation}")()

    def _customer(self) -> str:
        return self.rng.choice(self.accounts.customers)

    def _merchant(self) -> str:
        return self.rng.choice(self.accounts.merchants)

    async def _authorize(self, amount_minor: int, timeout_s: int = 0) -> pb.Hold | None:
        client = self.client
        transfer = client.movement(
            pb.TRANSFER_KIND_AUTHORIZE,
            self.key("auth"),
            self._customer(),
            self._merchant(),
            amount_minor,
        )
        transfer.hold_timeout_s = timeout_s
        result = await client.one("authorize", transfer)
        if result is None:
            return None
        client.stats.expected_events["hold.authorized"] += 1
        return result.hold

    def _splits(self) -> list[pb.SplitLeg]:
        release_at_s = time.time() + RESERVE_DELAY_S
        self.client.stats.last_release_at_s = max(self.client.stats.last_release_at_s, release_at_s)
        return [
            pb.SplitLeg(
                account_id=self.accounts.platform_fee,
                kind=pb.SPLIT_LEG_KIND_BASIS_POINTS,
                basis_points=PLATFORM_FEE_BPS,
                label="platform_fee",
            ),
            pb.SplitLeg(
                account_id=self.accounts.tax,
                kind=pb.SPLIT_LEG_KIND_FIXED,
                amount_minor=TAX_FIXED_MINOR,
                label="tax",
            ),
            pb.SplitLeg(
                account_id=self.accounts.reserve,
                kind=pb.SPLIT_LEG_KIND_BASIS_POINTS,
                basis_points=RESERVE_BPS,
                label="reserve",
                release_at=_timestamp(release_at_s),
            ),
        ]

    async def op_payment(self) -> None:
        hold = await self._authorize(self.rng.randint(500, 50_000))
        if hold is None:
            return
        partial = self.rng.random() < 0.3
        amount = hold.amount.amount_minor * 4 // 5 if partial else hold.amount.amount_minor
        splits = self._splits()
        # The reserve is paid out to the merchant credited by the hold.
        splits[2].release_account_id = hold.credit_account_id
        # A capture that adds split destinations carries a decision of its own.
        capture = self.client.signed(
            pb.Transfer(
                idempotency_key=self.key("capture"),
                kind=pb.TRANSFER_KIND_CAPTURE,
                hold_id=hold.hold_id,
                amount=_money(amount),
                splits=splits,
            ),
            hold.debit_account_id,
            hold.credit_account_id,
            amount,
        )
        result = await self.client.one("capture", capture)
        if result is None:
            return
        stats = self.client.stats
        stats.expected_events.update(["entry.posted", "hold.captured"])
        stats.reserves_created += 1
        entry = result.entry
        self.shared.captured.append(
            (entry.entry_id, amount, entry.credit_account_id, entry.postings[0].account_id)
        )

    async def op_void(self) -> None:
        hold = await self._authorize(self.rng.randint(500, 50_000))
        if hold is None:
            return
        void = pb.Transfer(
            idempotency_key=self.key("void"), kind=pb.TRANSFER_KIND_VOID, hold_id=hold.hold_id
        )
        if await self.client.one("void", void) is not None:
            self.client.stats.expected_events["hold.voided"] += 1

    async def op_late_capture(self) -> None:
        """A hold that expires before its capture: HOLD_EXPIRED, by design."""
        hold = await self._authorize(self.rng.randint(500, 5_000), timeout_s=1)
        if hold is None:
            return
        self.client.stats.expected_events["hold.expired"] += 1
        await asyncio.sleep(1.6)
        capture = pb.Transfer(
            idempotency_key=self.key("late-capture"),
            kind=pb.TRANSFER_KIND_CAPTURE,
            hold_id=hold.hold_id,
        )
        await self.client.one("capture", capture)

    async def op_refund(self) -> None:
        if not self.shared.captured:
            return
        entry_id, amount, payee, payer = self.rng.choice(self.shared.captured)
        refund_minor = max(1, int(amount * REFUND_SHARE))
        # Decided for what it does: from the payee back to the payer.
        refund = self.client.signed(
            pb.Transfer(
                idempotency_key=self.key("refund"),
                kind=pb.TRANSFER_KIND_REFUND,
                entry_id=entry_id,
                amount=_money(refund_minor),
            ),
            payee,
            payer,
            refund_minor,
        )
        if await self.client.one("refund", refund) is not None:
            self.client.stats.expected_events["entry.posted"] += 1

    async def op_transfer(self) -> None:
        transfer = self.client.movement(
            pb.TRANSFER_KIND_TRANSFER,
            self.key("p2p"),
            self._customer(),
            self._merchant(),
            self.rng.randint(100, 20_000),
        )
        result = await self.client.one("transfer", transfer)
        if result is not None:
            self.client.stats.expected_events["entry.posted"] += 1
            self.last_transfer, self.last_entry_id = transfer, result.entry.entry_id

    async def op_payout(self) -> None:
        payout = self.client.movement(
            pb.TRANSFER_KIND_PAYOUT,
            self.key("payout"),
            self._merchant(),
            self.accounts.settlement,
            PAYOUT_MINOR,
        )
        if await self.client.one("payout", payout) is not None:
            self.client.stats.expected_events["entry.posted"] += 1

    async def op_declined(self) -> None:
        """A payment above anything the customer has: INSUFFICIENT_FUNDS."""
        await self._authorize(DECLINED_AMOUNT_MINOR)

    async def op_batch(self) -> None:
        transfers = [
            self.client.movement(
                pb.TRANSFER_KIND_TRANSFER,
                self.key("batch"),
                self._customer(),
                self._merchant(),
                self.rng.randint(100, 5_000),
            )
            for _ in range(BATCH_TRANSFERS)
        ]
        results = await self.client.many("batch", transfers)
        ok = sum(1 for r in results if not r.HasField("error"))
        self.client.stats.expected_events["entry.posted"] += ok

    async def op_retry(self) -> None:
        """The last transfer again, same key: the original entry comes back."""
        if self.last_transfer is None:
            return
        result = await self.client.one("retry", self.last_transfer)
        if result is None:
            return
        if not result.replayed or result.entry.entry_id != self.last_entry_id:
            self.client.stats.unexpected["retry:NOT_REPLAYED"] += 1


# ---- after the workload ----


async def wait_for_reserves(client: DemoClient, accounts: Accounts, config: Config) -> int:
    """Waits until every reserve is due and swept; returns the reserve
    account's posted balance, which is 0 once all were released (refunds take
    their share back from the reserve, or from the merchant once released)."""
    due_in_s = client.stats.last_release_at_s - time.time()
    sweep_s = config.money.reserves.release_sweep_interval_s
    await asyncio.sleep(max(0.0, due_in_s) + sweep_s + RELEASE_GRACE_S)
    deadline = time.monotonic() + OUTBOX_DRAIN_TIMEOUT_S
    while True:
        response = await client.stub.GetBalance(
            pb.GetBalanceRequest(tenant_id=client.tenant_id, account_id=accounts.reserve),
            timeout=RPC_TIMEOUT_S,
        )
        if response.balance.posted_minor == 0 or time.monotonic() > deadline:
            return int(response.balance.posted_minor)
        await asyncio.sleep(sweep_s)


@dataclass
class EventCounts:
    by_subject: dict[str, int]
    reserve_releases: int


async def _count_subjects(js: object, subject: str) -> dict[str, int]:
    info = await js.stream_info("TRIPLANE_MONEY", subjects_filter=subject)  # type: ignore[attr-defined]
    return dict(info.state.subjects or {})


async def _count_reserve_releases(js: object, tenant_id: str, total: int) -> int:
    """Reads the tenant's entry.posted events; a reserve release is the entry
    whose idempotency key the ledger derived from the reserve."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    subject = bus.subject_for("money.entry.posted", tenant_id)
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
    subscription = await js.pull_subscribe(  # type: ignore[attr-defined]
        subject, stream="TRIPLANE_MONEY", config=config
    )
    releases = seen = 0
    try:
        while seen < total:
            try:
                messages = await subscription.fetch(1_000, timeout=2.0)
            except TimeoutError:
                break
            for message in messages:
                envelope = envelope_pb2.EventEnvelope.FromString(message.data)
                releases += envelope.idempotency_key.startswith("reserve-release:")
            seen += len(messages)
    finally:
        await subscription.unsubscribe()
    return releases


async def count_events(nats_url: str, config: Config, tenant_id: str, expected: int) -> EventCounts:
    """The tenant's events in JetStream, once the outbox relay has caught up
    (the count reaches what is expected or stops moving)."""
    import nats

    client = await nats.connect(
        bus.nats_servers(nats_url),
        connect_timeout=config.nats.connect_timeout_s,
        **nats_options(config.nats),
    )
    try:
        js = client.jetstream()
        subject = f"triplane.money.{tenant_id}.>"
        deadline = time.monotonic() + OUTBOX_DRAIN_TIMEOUT_S
        counts: dict[str, int] = {}
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            latest = await _count_subjects(js, subject)
            if latest != counts:
                counts, stable_since = latest, time.monotonic()
            if sum(counts.values()) >= expected or time.monotonic() - stable_since > 3.0:
                break
            await asyncio.sleep(0.25)
        prefix = f"triplane.money.{tenant_id}."
        by_subject = {name.removeprefix(prefix): n for name, n in sorted(counts.items())}
        releases = await _count_reserve_releases(js, tenant_id, by_subject.get("entry.posted", 0))
        return EventCounts(by_subject, releases)
    finally:
        await client.close()


# ---- summary ----


def _outcomes(stats: KindStats) -> str:
    ordered = sorted(stats.outcomes.items(), key=lambda item: (item[0] != "ok", item[0]))
    return " ".join(f"{name}={count}" for name, count in ordered)


def print_workload(stats: Stats, elapsed_s: float, options: DemoOptions) -> None:
    print(
        f"\n== workload: {elapsed_s:.1f} s, {options.workers} concurrent clients, "
        f"{options.customers} customers, {options.merchants} merchants =="
    )
    print(
        f"{'kind':<10} {'calls':>7} {'items':>7} {'items/s':>9} {'p50 ms':>8} {'p99 ms':>8}"
        "  outcomes"
    )
    total_items = 0
    for kind in KIND_ORDER:
        if kind not in stats.kinds:
            continue
        k = stats.kinds[kind]
        total_items += k.items
        print(
            f"{kind:<10} {len(k.latencies_ms):>7} {k.items:>7} {k.items / elapsed_s:>9.1f} "
            f"{percentile(k.latencies_ms, 50):>8.2f} {percentile(k.latencies_ms, 99):>8.2f}"
            f"  {_outcomes(k)}"
        )
    print(f"{'total':<10} {'':>7} {total_items:>7} {total_items / elapsed_s:>9.1f}")
    print(
        f"(batch = CreateTransfers of {BATCH_TRANSFERS}; latency is per call, items per "
        "transfer; retry = same idempotency key again, answered from the original)"
    )


def print_events(stats: Stats, events: EventCounts) -> list[str]:
    """Prints published against expected events; returns the mismatches."""
    expected = collections.Counter(stats.expected_events)
    expected["entry.posted"] += events.reserve_releases
    print("\n== outbox events in JetStream (stream TRIPLANE_MONEY) ==")
    print(f"{'subject':<40} {'published':>10} {'expected':>10}")
    problems = []
    for name in sorted(set(expected) | set(events.by_subject)):
        published = events.by_subject.get(name, 0)
        mark = "" if published == expected[name] else "  <-- MISMATCH"
        if mark:
            problems.append(f"{name}: published {published}, expected {expected[name]}")
        print(f"{'triplane.money.<tenant>.' + name:<40} {published:>10} {expected[name]:>10}{mark}")
    print(f"{'total':<40} {sum(events.by_subject.values()):>10} {sum(expected.values()):>10}")
    return problems


def print_balanced(response: pb.CheckBalancedResponse) -> None:
    verdict = "BALANCED" if response.balanced else "NOT BALANCED"
    print(
        f"\n== CheckBalanced: {verdict} ({response.accounts_checked} accounts, "
        f"{response.postings_checked} postings) =="
    )
    for total in response.totals:
        print(
            f"{total.currency}: debits {total.debits_minor} = credits {total.credits_minor}; "
            f"pending debits {total.pending_debits_minor} = "
            f"pending credits {total.pending_credits_minor}"
        )


# ---- the run ----


def demo_config(options: DemoOptions, stamp: str) -> Config:
    """Embedded defaults whatever the environment says (SQLite, our own
    nats-server, a fresh state dir), on free ports so that the demo never
    collides with a stack started by `make up`."""
    state_dir = options.state_dir or str(Path(".triplane") / f"demo-{stamp}")
    overrides: dict[str, object] = {"runtime": {"state_dir": state_dir, "log_format": "json"}}
    for plane in ("money", "policy", "ai", "gateway"):
        overrides[plane] = {"listen": f"127.0.0.1:{free_port()}"}
    # The sandbox bank (started by the product demo) and the rails pointed at
    # it; its manual clock, faults and the loops' pace (demo_payouts); the
    # money plane's metrics served (the summary reads detection times there).
    bank = f"127.0.0.1:{free_port()}"
    overrides["sandbox_bank"] = {"listen": bank}
    overrides["rails"] = {"bank_url": f"http://{bank}"}
    overrides["money"] = {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
    }
    config = load_config(path=None, environ={}, overrides=overrides)
    return with_overrides(config, demo_payouts.overrides(dt.datetime.now(dt.UTC)))


def clean_environ() -> dict[str, str]:
    """The environment for the demo's planes, without Triplane's own overrides
    (they would point the planes away from the embedded defaults)."""
    import os

    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("TRIPLANE") and name != "NATS_URL"
    }


async def _progress(client: DemoClient, started: float, until: float) -> None:
    while time.monotonic() < until:
        await asyncio.sleep(5.0)
        done = sum(k.items for k in client.stats.kinds.values())
        print(f"  ... {time.monotonic() - started:4.0f} s: {done} operations", flush=True)


async def drive(client: DemoClient, accounts: Accounts, options: DemoOptions) -> float:
    """Runs the workers for options.duration_s; returns the elapsed seconds."""
    shared = Shared()
    workers = [Worker(i, client, accounts, shared, options.seed) for i in range(options.workers)]
    started = time.monotonic()
    until = started + options.duration_s
    ticker = asyncio.create_task(_progress(client, started, until))
    try:
        await asyncio.gather(*(worker.run(until) for worker in workers))
    finally:
        ticker.cancel()
    return time.monotonic() - started


async def _exercise(stack: Stack, config: Config, options: DemoOptions, stamp: str) -> int:
    tenant_id = f"demo-{stamp}"
    signer = tokens.load_signer(config.keys.policy_private_key_path, stack.state_dir)
    # As the admin identity: the money-only demo opens tenants and accounts.
    async with stack.channel("money") as channel:
        client = DemoClient(money_pb2_grpc.LedgerServiceStub(channel), tenant_id, signer)
        accounts = await set_up(client, options)
        print(
            f"tenant {tenant_id}: {len(accounts.customers)} customers funded with "
            f"{CUSTOMER_FUNDING_MINOR / 100:,.2f} {CURRENCY} each, "
            f"{len(accounts.merchants)} merchants; running the workload "
            f"for {options.duration_s:.0f} s ...",
            flush=True,
        )
        elapsed_s = await drive(client, accounts, options)
        print(
            "waiting for the last reserves to be released and the outbox to drain ...", flush=True
        )
        reserve_left_minor = await wait_for_reserves(client, accounts, config)
        balanced = await client.stub.CheckBalanced(
            pb.CheckBalancedRequest(tenant_id=tenant_id), timeout=60.0
        )
    stats = client.stats
    events = await count_events(
        stack.nats_url,
        config,
        tenant_id,
        sum(stats.expected_events.values()) + stats.reserves_created,
    )
    print_workload(stats, elapsed_s, options)
    problems = print_events(stats, events)
    print_balanced(balanced)
    return print_checks(stats, events, reserve_left_minor, balanced, problems)


def print_checks(
    stats: Stats,
    events: EventCounts,
    reserve_left_minor: int,
    balanced: pb.CheckBalancedResponse,
    problems: list[str],
) -> int:
    """The verdict; returns the exit status."""
    failures = list(problems)
    if not balanced.balanced:
        failures.insert(0, "the ledger is NOT balanced")
    if reserve_left_minor != 0:
        failures.append(f"reserve account still holds {reserve_left_minor} minor units")
    failures += [f"unexpected outcome {name} x{count}" for name, count in stats.unexpected.items()]
    replays = stats.kinds["retry"].outcomes["ok"] if "retry" in stats.kinds else 0
    print("\n== checks ==")
    print(f"ledger balanced        {'yes' if balanced.balanced else 'NO'}")
    print(
        f"reserves released      {events.reserve_releases} release entries for "
        f"{stats.reserves_created} reserve legs (a leg refunded in full releases nothing); "
        f"reserve account balance now {reserve_left_minor}"
    )
    print(
        f"outbox exactly once    {'yes' if not problems else 'NO'} "
        f"({sum(events.by_subject.values())} events)"
    )
    print(f"idempotent retries     {replays} answered with the original entry")
    print(f"unexpected outcomes    {dict(stats.unexpected) or 'none'}")
    if failures:
        print("\nDEMO FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\ndemo OK")
    return 0


async def run_demo(options: DemoOptions) -> int:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    config = demo_config(options, stamp)
    if not options.money_only:
        from triplane_tools.demo_product import run_product_demo

        return await run_product_demo(config, clean_environ(), options)
    planes = None if options.all_planes else ["money"]
    print("starting the stack (embedded NATS, SQLite, dev keys) ...", flush=True)
    stack = Stack(config, planes=planes, environ=clean_environ())
    async with stack:
        print(describe(stack), flush=True)
        status = await _exercise(stack, config, options, stamp)
        print("\nstopping the stack ...", flush=True)
    print(f"stopped; state and logs kept in {stack.state_dir}")
    return status
