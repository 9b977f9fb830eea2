"""Two gateway replicas on one PostgreSQL database (architecture rule 9): a
retry carrying the same idempotency key is answered once whichever replica
gets it, two replicas racing on one key give one decision, one hold and one
answer; the outbox relays and the delivery workers of both replicas never
send one thing twice. Real servers throughout: PostgreSQL, the money and
policy planes over gRPC with mutual TLS, a real HTTP receiver; the AI plane is
down, so scores degrade to "no score"."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import msgspec
import pytest

from gateway.app import Gateway
from gateway.delivery import Delivery
from gateway.idempotency import IdempotencyStore
from gateway.nba import EXPOSURE_EVENT
from gateway.storage import open_idempotency_db
from money_plane.app import MoneyPlane
from policy_plane.app import build_plane
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime import bus
from triplane.runtime.bus import OutgoingEvent, subject_for
from triplane.runtime.clock import ManualClock, SystemClock
from triplane.runtime.config import Config, ConfigError, GatewayIdempotencyConfig, load_config
from triplane.runtime.errors import AlreadyExists, InvalidArgument
from triplane.runtime.net import free_port
from triplane.runtime.outbox import OutboxRelay, RelaySettings
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for, open_channel

from ..tls_helpers import dev_certificates, partner_files
from ._b_helpers import Receiver, receiver, secret_file
from .auth_helpers import KeyedStub, partner_key

pytestmark = [pytest.mark.postgres]

TENANT = "replicas"
MERCHANT = "merchant_1"
AMOUNT_MINOR = 1_500
ALLOW_ALL = """
apiVersion: triplane.policy/v1
label: allow-all
rules:
  - id: never
    when: "false"
    outcome: deny
    reason_code: NEVER
"""
SCOPE = f"{TENANT}\x1fAuthorizePayment"


def _config(
    state_dir: Path, pg_dsn: str, webhook_url: str, idempotency: dict[str, Any] | None = None
) -> Config:
    dev_certificates(state_dir)  # as the dev stack makes them: mutual TLS is on
    return load_config(
        # As a pod gets it: one DSN puts both gateway databases on PostgreSQL.
        environ={"TRIPLANE_GATEWAY_DSN": pg_dsn},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": ""},
            "gateway": {
                "listen": "127.0.0.1:0",
                "holdout_share": 0.0,
                "partner_webhooks": [
                    {"tenant_id": TENANT, "url": webhook_url, "secret_path": secret_file()}
                ],
                "idempotency": idempotency or {},
            },
        },
    )


@dataclass
class Replicas:
    config: Config
    a: Gateway
    b: Gateway
    stub_a: Any
    stub_b: Any
    money_address: str
    policy_address: str
    http: Receiver

    async def pending_debits(self, account_id: str) -> int:
        async with channel_for(self.config, self.money_address) as channel:
            found = await money_pb2_grpc.LedgerServiceStub(channel).GetBalance(
                money_pb2.GetBalanceRequest(tenant_id=TENANT, account_id=account_id)
            )
        return int(found.balance.debits_pending_minor)

    async def decisions(self, account_id: str) -> int:
        async with channel_for(self.config, self.policy_address) as channel:
            replayed = await policy_pb2_grpc.PolicyServiceStub(channel).ReplayDecisions(
                policy_pb2.ReplayDecisionsRequest(tenant_id=TENANT, account_id=account_id)
            )
        return int(replayed.decisions_replayed)


async def _seed(
    config: Config, money_address: str, policy_address: str, accounts: list[str]
) -> None:
    async with channel_for(config, money_address) as channel:
        ledger = money_pb2_grpc.LedgerServiceStub(channel)
        await ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=TENANT))
        await ledger.CreateAccounts(
            money_pb2.CreateAccountsRequest(
                tenant_id=TENANT,
                accounts=[
                    money_pb2.NewAccount(
                        account_id=account,
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    )
                    for account in [*accounts, MERCHANT]
                ],
            )
        )
    async with channel_for(config, policy_address) as channel:
        await policy_pb2_grpc.PolicyServiceStub(channel).CreateTenant(
            policy_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="Replicas")
        )
        await policy_pb2_grpc.BundleServiceStub(channel).LoadBundle(
            policy_pb2.LoadBundleRequest(content=ALLOW_ALL, target=policy_pb2.BUNDLE_TARGET_LIVE)
        )


@pytest.fixture
async def replicas(
    state_dir: Path, pg_dsn: str, request: pytest.FixtureRequest
) -> AsyncIterator[Replicas]:
    """Two gateway replicas; `gateway.idempotency` overrides by indirect
    parametrization."""
    async with receiver() as http, contextlib.AsyncExitStack() as stack:
        idempotency = getattr(request, "param", None)
        config = _config(state_dir, pg_dsn, f"{http.url}/hooks", idempotency)
        assert config.gateway.idempotency.backend == "postgres"
        assert config.gateway.store.backend == "postgres"
        # One clock for all: a decision token is checked on the money plane's;
        # it never moves, so no claim or lease lapses during a test.
        clock = ManualClock(SystemClock().now_us())
        money = MoneyPlane(config, clock, listen="127.0.0.1:0")
        stack.push_async_callback(money.stop)
        money_address = f"127.0.0.1:{await money.start(sweepers=False, relay=False)}"
        policy = build_plane(config, clock, listen="127.0.0.1:0")
        stack.push_async_callback(policy.stop)
        policy_address = f"127.0.0.1:{await policy.start()}"
        await _seed(config, money_address, policy_address, ["cust_1", "cust_2", "cust_3"])
        gateways: list[Gateway] = []
        stubs: list[Any] = []
        for _ in range(2):
            replica = Gateway(
                config,
                clock,
                money_address=money_address,
                policy_address=policy_address,
                ai_address=f"127.0.0.1:{free_port()}",  # down: scores degrade
            )
            stack.push_async_callback(replica.stop)
            port = await replica.start()
            channel = open_channel(f"127.0.0.1:{port}", partner_files(state_dir))
            stack.push_async_callback(channel.close)
            gateways.append(replica)
            stubs.append(gateway_pb2_grpc.GatewayServiceStub(channel))
        # A key made through replica A is known to B: the key store is shared.
        key = await partner_key(gateways[0], TENANT)
        yield Replicas(
            config,
            gateways[0],
            gateways[1],
            KeyedStub(stubs[0], key),
            KeyedStub(stubs[1], key),
            money_address,
            policy_address,
            http,
        )


def _authorize(key: str, account_id: str, amount_minor: int = AMOUNT_MINOR) -> Any:
    return gw.AuthorizePaymentRequest(
        tenant_id=TENANT,
        idempotency_key=key,
        account_id=account_id,
        credit_account_id=MERCHANT,
        amount=types_pb2.Money(amount_minor=amount_minor, currency="USD"),
        kind=gw.PAYMENT_KIND_PURCHASE,
        customer=gw.Customer(customer_id="c1", name="Jane Example", country="US"),
    )


def _without_replayed(answer: gw.AuthorizePaymentResponse) -> gw.AuthorizePaymentResponse:
    copy = gw.AuthorizePaymentResponse()
    copy.CopyFrom(answer)
    copy.replayed = False
    return copy


# ---------------------------------------------------------------- same key, two replicas


async def test_a_retry_on_the_other_replica_gets_the_same_answer_and_one_hold(
    replicas: Replicas,
) -> None:
    request = _authorize("pay-a-then-b", "cust_1")
    first = await replicas.stub_a.AuthorizePayment(request)
    assert first.outcome == gw.OUTCOME_ALLOW and first.hold_id
    retried = await replicas.stub_b.AuthorizePayment(request)
    assert retried.replayed and not first.replayed
    assert _without_replayed(retried) == first  # the trace id included: the same answer
    assert await replicas.pending_debits("cust_1") == AMOUNT_MINOR  # one hold
    assert await replicas.decisions("cust_1") == 1


async def test_two_replicas_racing_on_one_key_give_one_answer(replicas: Replicas) -> None:
    request = _authorize("pay-race", "cust_2")
    answers = await asyncio.gather(
        replicas.stub_a.AuthorizePayment(request),
        replicas.stub_b.AuthorizePayment(request),
        replicas.stub_a.AuthorizePayment(request),
        replicas.stub_b.AuthorizePayment(request),
    )
    # One flow ran; every other call got its answer.
    assert sorted(answer.replayed for answer in answers) == [False, True, True, True]
    assert len({_without_replayed(a).SerializeToString(deterministic=True) for a in answers}) == 1
    assert answers[0].outcome == gw.OUTCOME_ALLOW and answers[0].hold_id
    assert await replicas.pending_debits("cust_2") == AMOUNT_MINOR
    assert await replicas.decisions("cust_2") == 1


# The flusher commits at once, then sleeps a minute: only a commit the
# flow asks for lands sooner.
SLOW_FLUSH = {"flush_interval_ms": 60_000}


@pytest.mark.parametrize("replicas", [SLOW_FLUSH], indirect=True)
async def test_an_outcome_through_the_other_replica_finds_the_decision_just_answered(
    replicas: Replicas,
) -> None:
    """RecordOutcome reads the decision's exposure from the shared store:
    DecideNextAction commits it before answering (it used to leave it to the
    next group commit, so the other replica answered DECISION_NOT_FOUND about
    half the time in the end-to-end suite)."""
    for i in range(3):
        decided = await replicas.stub_a.DecideNextAction(
            gw.DecideNextActionRequest(
                tenant_id=TENANT,
                idempotency_key=f"decide-{i}",
                customer_id="c1",
                account_id="cust_1",
                surface="app_home",
            )
        )
        assert decided.decision_id and not decided.replayed
        recorded = await replicas.stub_b.RecordOutcome(
            gw.RecordOutcomeRequest(
                tenant_id=TENANT,
                idempotency_key=f"outcome-{i}",
                decision_id=decided.decision_id,
                kind=gw.OUTCOME_KIND_IGNORED,
            )
        )
        assert recorded.decision_id == decided.decision_id and not recorded.replayed


async def test_another_payload_under_a_key_in_flight_on_the_other_replica_is_refused(
    replicas: Replicas,
) -> None:
    results = await asyncio.gather(
        replicas.stub_a.AuthorizePayment(_authorize("pay-reused", "cust_3")),
        replicas.stub_b.AuthorizePayment(_authorize("pay-reused", "cust_3", AMOUNT_MINOR + 1)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    answered = [r for r in results if isinstance(r, gw.AuthorizePaymentResponse)]
    assert len(refused) == 1 and len(answered) == 1, results
    assert refused[0].code() == grpc.StatusCode.ALREADY_EXISTS
    assert parse_rpc_error(refused[0]) == ("IDEMPOTENCY_KEY_REUSED", "amount.amount_minor")
    # One hold, of the payload that won the key.
    assert await replicas.pending_debits("cust_3") in (AMOUNT_MINOR, AMOUNT_MINOR + 1)
    assert await replicas.decisions("cust_3") == 1


# ---------------------------------------------------------------- delivery, two workers


async def test_queued_webhooks_are_delivered_once_with_both_replicas_workers_running(
    replicas: Replicas,
) -> None:
    engagement_a, engagement_b = replicas.a.engagement, replicas.b.engagement
    assert engagement_a is not None and engagement_b is not None
    count = 30
    for index in range(count):
        await engagement_a.delivery.enqueue(
            Delivery(
                tenant_id=TENANT,
                channel="partner_webhook",
                endpoint=f"{replicas.http.url}/hooks",
                event_type="trigger.sent",
                payload={"n": index},
                dedupe_key=f"order-{index}",
            )
        )
    # Both replicas' workers poll the one queue; wait until it is empty (each
    # look is a read of the shared queue, not a time bound).
    for _ in itertools.count():
        if (await engagement_b.delivery.counts(TENANT))["delivered"] == count:
            break
        await asyncio.sleep(0.02)
    ids = replicas.http.ids()
    assert len(ids) == count and len(set(ids)) == count  # each once, none twice
    assert await engagement_a.delivery.counts(TENANT) == {
        "pending": 0,
        "sending": 0,
        "delivered": count,
        "dead": 0,
    }


# ---------------------------------------------------------------- the store itself


def _store_config() -> GatewayIdempotencyConfig:
    return GatewayIdempotencyConfig(
        sqlite_path="unused.db",
        memory_entries=1000,
        retention_s=3600,
        flush_interval_ms=1.0,
        max_pending_writes=1000,
        backend="postgres",
        claim_lease_s=60.0,
        claim_poll_ms=5.0,
        outbox_lease_s=30.0,
    )


@contextlib.asynccontextmanager
async def _two_stores(
    pg_dsn: str, clock: ManualClock
) -> AsyncIterator[tuple[IdempotencyStore, IdempotencyStore]]:
    config = msgspec.structs.replace(_store_config(), postgres_dsn=pg_dsn)
    opened = [open_idempotency_db(config, Path("/nonexistent")) for _ in range(2)]
    stores = [IdempotencyStore(config, db, clock) for db in opened]
    for store in stores:
        await store.start()
    try:
        yield stores[0], stores[1]
    finally:
        for store in stores:
            await store.stop()
        for db in opened:
            db.close()


async def test_a_key_held_by_one_replica_waits_on_the_other_until_answered(pg_dsn: str) -> None:
    async with _two_stores(pg_dsn, ManualClock()) as (a, b):
        fields = {"amount": "h:1"}
        assert await a.claim(SCOPE, "k1", fields) is None  # A holds the key
        # Another payload under the held key is refused at once, naming the field.
        with pytest.raises(AlreadyExists) as refused:
            await b.claim(SCOPE, "k1", {"amount": "h:2"})
        assert refused.value.field == "amount"
        waiting = asyncio.create_task(b.claim(SCOPE, "k1", fields))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # it cannot end before A answers
        a.put(SCOPE, "k1", fields, b"the answer")
        found = await waiting
        assert found is not None and found.body == b"the answer"


async def test_a_key_given_up_without_an_answer_is_taken_by_the_other_replica(
    pg_dsn: str,
) -> None:
    async with _two_stores(pg_dsn, ManualClock()) as (a, b):

        async def failing_flow() -> None:
            assert await a.claim(SCOPE, "k2", {}) is None
            raise RuntimeError("a plane was down")

        with pytest.raises(RuntimeError):
            await asyncio.create_task(failing_flow())
        # The claim went with the task: B gets the key (it does not wait a lease).
        assert await b.claim(SCOPE, "k2", {}) is None


async def test_a_dead_replicas_claim_is_taken_over_when_its_lease_lapses(pg_dsn: str) -> None:
    clock = ManualClock()
    async with _two_stores(pg_dsn, clock) as (a, b):
        holder = asyncio.Event()

        async def stuck_flow() -> None:
            assert await a.claim(SCOPE, "k3", {}) is None
            holder.set()
            await asyncio.Event().wait()  # never answers, never ends: a dead pod

        stuck = asyncio.create_task(stuck_flow())
        await holder.wait()
        waiting = asyncio.create_task(b.claim(SCOPE, "k3", {}))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        clock.advance(_store_config().claim_lease_s + 1)
        assert await waiting is None  # B took the key over
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stuck


async def test_two_replicas_relays_publish_each_event_once(pg_dsn: str, nats_url: str) -> None:
    tenant = f"gwrep{uuid.uuid4().hex[:8]}"
    clock = ManualClock()
    config = load_config(environ={}, overrides={"nats": {"url": nats_url}})
    client = await bus.connect(config.nats, "test-gateway-replicas")
    async with _two_stores(pg_dsn, clock) as (a, b):
        try:
            js = client.jetstream()
            await bus.ensure_streams(js, config.nats, ["TRIPLANE_GATEWAY"])
            a.add_events(
                [
                    OutgoingEvent(
                        f"{tenant}-ev-{i}", subject_for(EXPOSURE_EVENT, tenant), b"%d" % i
                    )
                    for i in range(40)
                ]
            )
            await a.flush()
            settings = dataclasses.replace(
                RelaySettings.from_config(config.gateway.outbox, ["TRIPLANE_GATEWAY"]),
                batch_size=8,
            )
            relays = [
                OutboxRelay(store, config.nats, settings, clock, client_name=f"relay-{n}")
                for n, store in enumerate((a, b))
            ]

            async def drain(relay: OutboxRelay) -> None:
                while (await relay.relay_once(js))[1]:
                    pass

            await asyncio.gather(*(drain(relay) for relay in relays))
            assert a.unsent_count() == 0
            # Both relays ran on the same rows; none was published twice.
            assert relays[0].published + relays[1].published == 40
            # A relay that holds rows and dies: the other takes them once the lease lapses.
            a.add_events(
                [OutgoingEvent(f"{tenant}-ev-late", subject_for(EXPOSURE_EVENT, tenant), b"")]
            )
            await a.flush()
            assert [e.event_id for e in a.unsent(8)] == [f"{tenant}-ev-late"]
            assert b.unsent(8) == []
            clock.advance(_store_config().outbox_lease_s + 1)
            assert [e.event_id for e in b.unsent(8)] == [f"{tenant}-ev-late"]
        finally:
            await client.close()


# ---------------------------------------------------------------- config


def test_one_dsn_selects_postgres_for_both_gateway_databases() -> None:
    config = load_config(environ={"TRIPLANE_GATEWAY_DSN": "host=db user=gw dbname=gw"})
    for store in (config.gateway.store, config.gateway.idempotency):
        assert (store.backend, store.postgres_dsn) == ("postgres", "host=db user=gw dbname=gw")
    # A file (or an override) may still keep one of them on SQLite.
    kept = load_config(
        environ={"TRIPLANE_GATEWAY_DSN": "host=db"},
        overrides={"gateway": {"idempotency": {"backend": "sqlite"}}},
    )
    assert kept.gateway.idempotency.backend == "sqlite"
    assert kept.gateway.store.backend == "postgres"
    no_dsn = load_config(
        environ={}, overrides={"gateway": {"idempotency": {"backend": "postgres"}}}
    )
    with pytest.raises(InvalidArgument) as refused:
        open_idempotency_db(no_dsn.gateway.idempotency, Path("/nonexistent"))
    assert refused.value.field == "gateway.idempotency.postgres_dsn"
    with pytest.raises(ConfigError, match="claim_lease_s"):
        load_config(environ={}, overrides={"gateway": {"idempotency": {"claim_lease_s": 0}}})
