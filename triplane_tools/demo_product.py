"""`triplane demo` (`make demo`): the whole product through the public gateway API.

A fresh stack (embedded NATS, SQLite, every plane, the gateway), a synthetic
tenant (triplane_sim.synth customers, merchants and offers), then for the run's
duration concurrent customers check out (authorize, then capture or void),
receive next-best-action offers and sometimes convert (with the hidden true
propensity of the synthetic world), simulate loans and abandon flows (the
behavioural events that trigger follow-ups). The summary: authorizations and
decisions per second, p50/p99 per flow, the outcome mix, cases opened,
follow-ups scheduled and webhooks delivered, the ledger's balanced check and
the lift table. The operator console gets one account per role (passwords in a
0600 file under the state dir) and each role's pages are fetched over HTTP
(demo_console). Exit 0 only when the ledger balances, every flow answered and
every page a role may read answered 200.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from console.store import ConsoleStore
from gateway import measure, storage
from gateway.delivery.store import DeliveryStore
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, with_overrides
from triplane_client import GatewayClient, LedgerAdminClient, TriplaneApiError
from triplane_sim import synth
from triplane_sim.demo_world import World, seed
from triplane_tools import demo_console
from triplane_tools.demo_payouts import print_report, run_payouts
from triplane_tools.partner_keys import create_partner_key
from triplane_tools.stack import Stack, describe

TENANT = "demo"
RPC_TIMEOUT_S = 5.0
DEMO_TRIGGER_DELAY_S = 3


@dataclass
class Flow:
    latencies_ms: list[float] = field(default_factory=list)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class Tally:
    flows: dict[str, Flow] = field(default_factory=lambda: collections.defaultdict(Flow))
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    actions: collections.Counter[str] = field(default_factory=collections.Counter)
    # Why offers were left out of decisions that showed nothing (policy's reasons).
    exclusions: collections.Counter[str] = field(default_factory=collections.Counter)
    cases: int = 0
    scheduled_sends: int = 0
    conversions: int = 0

    async def timed(self, name: str, call: Any) -> Any:
        started = time.monotonic()
        try:
            return await call
        except TriplaneApiError as error:
            self.flows[name].errors[error.reason or error.code.name] += 1
            return None
        finally:
            self.flows[name].latencies_ms.append((time.monotonic() - started) * 1000)


def _usd(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="USD")


async def _checkout(client: GatewayClient, world: World, rng: random.Random, tally: Tally) -> None:
    customer = rng.choice(world.customers)
    merchant = rng.choice(world.merchants)
    amount = max(100, int(rng.expovariate(1 / customer.mean_amount_minor)))
    answer = await tally.timed(
        "authorize",
        client.authorize_payment(
            tenant_id=TENANT,
            account_id=customer.account_id,
            credit_account_id=merchant.merchant_id,
            amount=_usd(amount),
            kind=gw.PAYMENT_KIND_PURCHASE,
            device_id=rng.choice(customer.devices),
            merchant_id=merchant.merchant_id,
            merchant_category=merchant.category,
            channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
            customer=gw.Customer(
                customer_id=world.customer_id(customer),
                name=f"Customer {customer.account_id}",
                email=f"{customer.account_id}@example.com",
                # KYC tier and account age are the customer's profile
                # (seeded by triplane_sim.demo_world), not declared here.
                country="US",
            ),
        ),
    )
    if answer is None:
        return
    tally.outcomes[gw.Outcome.Name(answer.outcome).removeprefix("OUTCOME_").lower()] += 1
    tally.cases += bool(answer.case_id)
    if answer.hold_id:
        if rng.random() < 0.85:
            await tally.timed(
                "capture", client.capture_payment(tenant_id=TENANT, hold_id=answer.hold_id)
            )
        else:
            await tally.timed("void", client.void_payment(tenant_id=TENANT, hold_id=answer.hold_id))


async def _offer(client: GatewayClient, world: World, rng: random.Random, tally: Tally) -> None:
    customer = rng.choice(world.customers)
    answer = await tally.timed(
        "decide",
        client.decide_next_action(
            tenant_id=TENANT,
            customer_id=world.customer_id(customer),
            account_id=customer.account_id,
            surface=rng.choice(("checkout", "app_home", "payouts", "push")),
            region="US",
        ),
    )
    if answer is None:
        return
    tally.actions[answer.reasons[0] if answer.reasons else "NONE"] += 1
    if answer.action != gw.ACTION_SHOW_OFFER:
        if list(answer.reasons[:1]) == ["NOTHING_ELIGIBLE"]:
            tally.exclusions.update({e.reason for e in answer.excluded})
        return
    # The hidden truth of the synthetic world, for an average customer.
    context = list(synth._CONTEXT_CENTER)
    converted = rng.random() < synth.true_propensity(answer.offer.offer_id, context)
    tally.conversions += converted
    await tally.timed(
        "outcome",
        client.record_outcome(
            tenant_id=TENANT,
            decision_id=answer.decision_id,
            kind=gw.OUTCOME_KIND_CONVERTED if converted else gw.OUTCOME_KIND_IGNORED,
        ),
    )


async def _behaviour(client: GatewayClient, world: World, rng: random.Random, tally: Tally) -> None:
    customer = rng.choice(world.customers)
    who = gw.Customer(customer_id=world.customer_id(customer))
    events = [
        gw.BehaviourEvent(
            kind=gw.EVENT_KIND_LOAN_SIMULATED,
            customer=who,
            account_id=customer.account_id,
            amount=_usd(rng.choice((100_000, 250_000, 500_000))),
        )
    ]
    if rng.random() < 0.5:
        events.append(
            gw.BehaviourEvent(
                kind=gw.EVENT_KIND_FLOW_ABANDONED,
                customer=who,
                account_id=customer.account_id,
                flow="loan_application",
                step="documentation",
            )
        )
    answer = await tally.timed("ingest", client.ingest_events(tenant_id=TENANT, events=events))
    if answer is not None:
        tally.scheduled_sends += sum(r.scheduled_sends for r in answer.results)


async def _worker(
    client: GatewayClient, world: World, seed_value: int, until: float, tally: Tally
) -> None:
    rng = random.Random(seed_value)
    while time.monotonic() < until:
        pick = rng.random()
        if pick < 0.5:
            await _checkout(client, world, rng, tally)
        elif pick < 0.85:
            await _offer(client, world, rng, tally)
        else:
            await _behaviour(client, world, rng, tally)


def _pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[max(0, round(q / 100 * len(ordered)) - 1)]


def _print_summary(tally: Tally, elapsed_s: float) -> None:
    authorizations = len(tally.flows["authorize"].latencies_ms)
    decisions = len(tally.flows["decide"].latencies_ms)
    print(f"\n== summary ({elapsed_s:.0f} s) ==")
    print(f"authorizations/s  {authorizations / elapsed_s:8.1f}")
    print(f"decisions/s       {decisions / elapsed_s:8.1f}")
    print(f"\n{'flow':<10} {'calls':>7} {'p50 ms':>8} {'p99 ms':>8}  errors")
    for name, flow in sorted(tally.flows.items()):
        lat = flow.latencies_ms
        print(
            f"{name:<10} {len(lat):>7} {_pct(lat, 50):>8.1f} {_pct(lat, 99):>8.1f}  "
            f"{dict(flow.errors) or '-'}"
        )
    print(f"\noutcome mix       {dict(tally.outcomes)}")
    print(f"cases opened      {tally.cases}")
    print(f"offer decisions   {dict(tally.actions)}; conversions {tally.conversions}")
    if tally.exclusions:
        # Each customer comes back many times a minute here, so the contact
        # policy (frequency caps, per-offer cooldowns) soon leaves nothing to show.
        print(f"  nothing eligible: decisions with offers {dict(tally.exclusions.most_common())}")
    print(f"follow-ups scheduled by trigger rules: {tally.scheduled_sends}")


def _engagement_report(config: Config) -> None:
    """Webhooks delivered and the lift table, read from the gateway's
    engagement database once the stack has stopped."""
    db = storage.open_from_config(config)
    try:
        counts = DeliveryStore(db).counts(TENANT)
        print(f"deliveries        {counts} (delivered = acknowledged by the endpoint)")
        measurement = measure.Measurement(
            measure.MeasurementStore(db), config.gateway.measurement, SystemClock()
        )
        report = asyncio.run(measurement.lift_report(TENANT))
        print("\n" + measure.format_table(report))
    finally:
        db.close()


class Receiver:
    """The demo's push provider: a real HTTP endpoint on 127.0.0.1 that checks
    each Standard Webhooks signature and acknowledges (2xx) only valid ones."""

    def __init__(self) -> None:
        self.secret = "whsec_" + base64.b64encode(os.urandom(24)).decode()
        self.valid = 0
        self.refused = 0
        self.messages: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        try:
            Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError:
            self.refused += 1
            return web.Response(status=401)
        self.valid += 1
        if len(self.messages) < 3:
            self.messages.append(body[:200])
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/push", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/push"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _with_delivery(config: Config, receiver: Receiver) -> Config:
    """Push goes to the demo's receiver, and triggered follow-ups are due a
    few seconds after the abandonment instead of 15 minutes, so that they are
    delivered while the demo runs."""
    rules = [
        {**msgspec.to_builtins(rule), "delay_s": DEMO_TRIGGER_DELAY_S}
        for rule in config.gateway.triggers.rules
    ]
    # The dev stack keeps the receiver's secret in a file under the state
    # dir, as a cluster mounts a Secret: config only names the file.
    secret_path = config.state_path / "keys" / "demo-push-webhook.secret"
    secret_path.parent.mkdir(parents=True, exist_ok=True)
    secret_path.touch(mode=0o600)
    secret_path.write_text(receiver.secret + "\n")
    return with_overrides(
        config,
        {
            "gateway": {
                "delivery": {
                    "channels": {"push": {"url": receiver.url, "secret_path": str(secret_path)}}
                },
                "triggers": {"rules": rules},
            }
        },
    )


async def _console_accounts(stack: Stack) -> list[demo_console.Account]:
    """One console account per role, their passwords in a 0600 file under
    the state dir (its path is printed, never the passwords)."""
    if "console" not in stack.addresses:
        return []
    path = stack.state_dir / demo_console.ACCOUNTS_FILE
    store = ConsoleStore.from_config(stack.config)
    try:
        accounts = await demo_console.create_accounts(store, path, SystemClock().now_us())
    finally:
        store.close()
    print(
        f"console           http://{stack.addresses['console']}/  one account per role "
        f"({', '.join(a.username for a in accounts)}); passwords in {path}"
    )
    return accounts


async def _check_console(
    stack: Stack, accounts: list[demo_console.Account]
) -> demo_console.ConsoleReport:
    """Signs in as each role and fetches every page it may read."""
    if "console" not in stack.addresses:
        return demo_console.ConsoleReport(
            [demo_console.PageCheck("-", "/", 0, "the console did not start")]
        )
    report = await demo_console.check_pages(
        f"http://{stack.addresses['console']}", accounts, TENANT
    )
    print(report.summary())
    for failure in report.failures():
        print(f"  {failure}")
    return report


async def run_product_demo(config: Config, environ: dict[str, str], options: Any) -> int:
    receiver = Receiver()
    await receiver.start()
    try:
        return await _run_product_demo(_with_delivery(config, receiver), environ, options, receiver)
    finally:
        await receiver.stop()


async def _run_product_demo(
    config: Config, environ: dict[str, str], options: Any, receiver: Receiver
) -> int:
    print("starting the stack (embedded NATS, SQLite, Triton, every plane) ...", flush=True)
    # optional=True: the sandbox bank too (the rails' bank, issue 14).
    async with Stack(config, environ=environ, optional=True) as stack:
        print(describe(stack), flush=True)
        addresses = stack.addresses
        if "gateway" not in addresses:
            print("the gateway is not available; nothing to drive")
            return 1
        console_accounts = await _console_accounts(stack)
        world = await seed(
            addresses["money"],
            addresses["policy"],
            TENANT,
            options.customers,
            options.merchants,
            options.seed,
            tls=stack.tls_files(),
        )
        print(f"seeded {len(world.customers)} customers, {len(world.merchants)} merchants")
        # The demo platform's key, made as its operator would (`triplane keys
        # create`); it names the tenant on every call.
        api_key = await create_partner_key(
            config, addresses["gateway"], TENANT, display_name="demo", state_dir=stack.state_dir
        )
        tally = Tally()
        client = GatewayClient(
            addresses["gateway"],
            timeout_s=RPC_TIMEOUT_S,
            api_key=api_key,
            tls=stack.partner_tls(),
        )
        started = time.monotonic()
        until = started + options.duration_s
        await asyncio.gather(
            *(
                _worker(client, world, options.seed * 1000 + i, until, tally)
                for i in range(options.workers)
            )
        )
        elapsed_s = time.monotonic() - started
        # Money out and back: settle the merchants, pay them out through the
        # sandbox bank, let the statement intake reconcile (demo_payouts).
        print("settling the merchants and paying them out through the sandbox bank ...", flush=True)
        payouts = await run_payouts(stack, config, world, client)
        # Follow-ups triggered in the last seconds are due a little later.
        await asyncio.sleep(
            DEMO_TRIGGER_DELAY_S + 2 * config.gateway.triggers.runner_poll_interval_s
        )
        await client.close()
        ledger = LedgerAdminClient(addresses["money"], timeout_s=30, tls=stack.tls_files())
        balanced = await ledger.check_balanced(TENANT)
        await ledger.close()
        _print_summary(tally, elapsed_s)
        print(f"ledger balanced   {balanced.balanced} ({balanced.postings_checked} postings)")
        print(
            f"push receiver     {receiver.valid} signed webhooks acknowledged, "
            f"{receiver.refused} refused (bad signature)"
        )
        if receiver.messages:
            print(f"  e.g. {receiver.messages[0]}")
        print_report(payouts)
        console = await _check_console(stack, console_accounts)
        print("\nstopping the stack ...", flush=True)
    await asyncio.to_thread(_engagement_report, config)
    print(f"stopped; state and logs kept in {stack.state_dir}")
    answered = all(len(f.latencies_ms) > sum(f.errors.values()) for f in tally.flows.values())
    failures = payouts.failures() + console.failures()
    if failures:
        print("\nDEMO FAILED:\n  " + "\n  ".join(failures))
    return 0 if balanced.balanced and answered and not failures else 1
