"""The leak test: no PII at rest in clear, none in flight outside the boundary.

The whole mesh runs as a user would run it (money, policy and AI planes as
processes, the AI plane with a real Triton and its features in Redis, real
NATS with JetStream, PostgreSQL for the money and policy planes and the
gateway's engagement store, mutual TLS, every log at DEBUG). The flows are
driven through the gateway's public API with known raw values: a Luhn-valid
card number, an e-mail address, a phone number, an IBAN and two names, in
the fields made for them, inside free text (attributes, payment method,
flow, step) and as identifiers (refused). Then every store is read back
(every table of every SQLite file and PostgreSQL database, every file under
the state directory byte for byte, every Redis key of the AI plane's
features), every message of every JetStream stream, and every log line the
processes wrote: none holds any of the values in any of their spellings.
What the policy plane must keep (the names) is there sealed, and only a
caller with `pii:read` gets them back."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import msgspec
import psycopg
import pytest
import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from nats.aio.client import Client as NatsClient

from gateway.app import Gateway
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port, port_open
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import open_channel
from triplane_tools.partner_keys import PARTNER_SCOPES
from triplane_tools.stack import Stack

from .auth_helpers import KeyedStub, partner_key

pytestmark = [pytest.mark.nats, pytest.mark.postgres, pytest.mark.timeout(600)]

TENANT = "piileak"
MERCHANT = "merchant_1"
RPC_TIMEOUT_S = 10.0
CREATED_DATABASES: list[str] = []

# The raw values, and every spelling of each that must not be found anywhere.
PAN = "4111 1111 1111 1111"
EMAIL = "Wilhelmina.Quarterstaff@Example.com"
PHONE = "+1 (415) 555-2671"
IBAN = "DE89 3704 0044 0532 0130 00"
CUSTOMER_NAME = "Wilhelmina Quarterstaff"
COUNTERPARTY_NAME = "Bartholomew Zygmuntowicz"
SPELLINGS: dict[str, list[str]] = {
    "pan": ["4111111111111111", "4111 1111 1111 1111", "4111-1111-1111-1111"],
    "email": ["wilhelmina.quarterstaff@example.com"],
    "phone": ["4155552671", "415-555-2671", "415 555 2671", "(415) 555-2671", "415.555.2671"],
    "iban": ["de89370400440532013000", "de89 3704 0044 0532 0130 00"],
    # Names: each part alone too (case-insensitive, as every needle).
    "name": ["wilhelmina", "quarterstaff", "bartholomew", "zygmuntowicz"],
}
NEEDLES = [
    (kind, spelling.lower().encode()) for kind, values in SPELLINGS.items() for spelling in values
]
FREE_TEXT = (
    f"call {PHONE} or write to {EMAIL}; card {PAN}, refunds to {IBAN}; "
    f"ask for {CUSTOMER_NAME.upper()}"
)


@dataclass
class Hit:
    where: str
    kind: str
    spelling: str


@dataclass
class Scan:
    hits: list[Hit] = field(default_factory=list)
    places: int = 0

    def look(self, where: str, data: object) -> None:
        if data is None:
            return
        if isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data)
        else:
            raw = (data if isinstance(data, str) else repr(data)).encode(errors="replace")
        folded = raw.lower()
        self.places += 1
        for kind, needle in NEEDLES:
            if needle in folded:
                self.hits.append(Hit(where, kind, needle.decode()))


class LogCapture(logging.Handler):
    """Every record the in-process gateway logs, formatted as it would be."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _pg_dsns() -> dict[str, str]:
    from tests.conftest import PG_HOST, PG_PORT, PG_USER, _loud_skip, create_pg_database

    if not port_open(PG_HOST, PG_PORT):
        _loud_skip(f"PostgreSQL for the leak test (no server at {PG_HOST}:{PG_PORT})")
    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    dsns = {
        name: create_pg_database(admin, f"triplane_leak_{name}")
        for name in ("money", "policy", "engagement")
    }
    CREATED_DATABASES.extend(dsns.values())
    return dsns


def _config(state_dir: Path, redis_url: str, dsns: dict[str, str]) -> Config:
    return load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "log_format": "text", "log_level": "DEBUG"},
            # The stack's own nats-server, its JetStream under the state dir:
            # every message of every stream is this test's, on disk there too.
            "nats": {"url": ""},
            "money": {
                "listen": f"127.0.0.1:{free_port()}",
                "store": {"backend": "postgres", "postgres_dsn": dsns["money"]},
            },
            "policy": {
                "listen": f"127.0.0.1:{free_port()}",
                "store": {"backend": "postgres", "postgres_dsn": dsns["policy"]},
            },
            "ai": {
                "listen": f"127.0.0.1:{free_port()}",
                "features": {
                    "backend": "redis",
                    "redis_url": redis_url,
                    "namespace": f"leak{uuid.uuid4().hex[:8]}",
                },
            },
            "gateway": {
                "listen": "127.0.0.1:0",
                "holdout_share": 0.0,
                "store": {"backend": "postgres", "postgres_dsn": dsns["engagement"]},
            },
            "stack": {
                "start_timeout_s": 150.0,
                "planes": [
                    {"name": "money", "module": "money_plane"},
                    {"name": "policy", "module": "policy_plane"},
                    {"name": "ai", "module": "ai_plane"},
                ],
            },
        },
    )


@dataclass
class Mesh:
    stack: Stack
    gateway: Gateway
    config: Config
    stub: KeyedStub
    reader: KeyedStub
    channels: list[grpc.aio.Channel]
    logs: LogCapture
    dsns: dict[str, str]


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> AsyncIterator[Mesh]:
    state_dir = tmp_path_factory.mktemp("leak-state")
    dsns = _pg_dsns()
    config = _config(state_dir, redis_url, dsns)
    logs = LogCapture()
    logs.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(logs)
    root.setLevel(logging.DEBUG)
    stack = Stack(
        config, environ={k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE")}
    )
    await stack.start()
    assert stack.nats_url
    config = msgspec.structs.replace(
        config, nats=msgspec.structs.replace(config.nats, url=stack.nats_url)
    )
    gateway = Gateway(
        config,
        money_address=stack.addresses["money"],
        policy_address=stack.addresses["policy"],
        ai_address=stack.addresses["ai"],
    )
    channels: list[grpc.aio.Channel] = []
    try:
        port = await gateway.start()
        address = f"127.0.0.1:{port}"
        key = await partner_key(gateway, TENANT)
        reader_key = await partner_key(gateway, TENANT, [*PARTNER_SCOPES, "pii:read"])
        channel = open_channel(address, stack.partner_tls())
        channels.append(channel)
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        built = Mesh(
            stack,
            gateway,
            config,
            KeyedStub(stub, key),
            KeyedStub(stub, reader_key),
            channels,
            logs,
            dsns,
        )
        await _seed(built)
        yield built
    finally:
        for channel in channels:
            await channel.close()
        await gateway.stop()
        await stack.stop()
        root.removeHandler(logs)
        root.setLevel(level)
        _drop_created_databases()


def _drop_created_databases() -> None:
    from tests.conftest import PG_HOST, PG_PORT, PG_USER, drop_pg_database

    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    while CREATED_DATABASES:
        drop_pg_database(admin, CREATED_DATABASES.pop())


def _usd(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="USD")


async def _seed(mesh: Mesh) -> None:
    money_channel = mesh.stack.channel("money")
    policy_channel = mesh.stack.channel("policy")
    mesh.channels.extend([money_channel, policy_channel])
    money = money_pb2_grpc.LedgerServiceStub(money_channel)
    await money.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="t"))
    await money.CreateAccounts(
        money_pb2.CreateAccountsRequest(
            tenant_id=TENANT,
            accounts=[
                money_pb2.NewAccount(
                    account_id=account_id,
                    currency="USD",
                    kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                    constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                )
                for account_id in ("cust_1", MERCHANT)
            ],
        )
    )
    policy = policy_pb2_grpc.PolicyServiceStub(policy_channel)
    await policy.CreateTenant(policy_pb2.CreateTenantRequest(tenant_id=TENANT, display_name="t"))
    # The customer's KYC profile (what the policy plane decides on).
    await policy_pb2_grpc.CustomerProfileServiceStub(policy_channel).PutCustomerProfile(
        policy_pb2.PutCustomerProfileRequest(
            profile=policy_pb2.CustomerProfile(
                tenant_id=TENANT,
                customer_id="c1",
                kyc_tier=2,
                country="US",
                account_opened_at=Timestamp(seconds=1_700_000_000),
            ),
            change_id="kyc-c1",
            actor="tests",
        )
    )
    # The tenant reaches the gateway's directory through NATS.
    await asyncio.sleep(0.5)


def _customer() -> gw.Customer:
    return gw.Customer(
        customer_id="c1",
        name=CUSTOMER_NAME,
        email=EMAIL,
        phone=PHONE,
        country="US",
    )


def _authorize(**changes: Any) -> gw.AuthorizePaymentRequest:
    request: dict[str, Any] = dict(
        tenant_id=TENANT,
        idempotency_key=uuid.uuid4().hex,
        account_id="cust_1",
        credit_account_id=MERCHANT,
        amount=_usd(1500),
        kind=gw.PAYMENT_KIND_PURCHASE,
        payment_method="card",
        card_number=PAN,
        device_id="dev_1",
        merchant_id="mer_1",
        merchant_category="5411",
        channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
        customer=_customer(),
        counterparty=gw.Counterparty(name=COUNTERPARTY_NAME, country="US"),
        attributes={"note": FREE_TEXT, "iban": IBAN, "contact": EMAIL},
    )
    request.update(changes)
    return gw.AuthorizePaymentRequest(**request)


async def _refused(call: Any, request: Any) -> tuple[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request, timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return parse_rpc_error(caught.value)


async def _drive(mesh: Mesh) -> str:
    """The flows, with the raw values everywhere a partner might put them;
    returns the id of the authorization's decision."""
    stub = mesh.stub
    answer = await stub.AuthorizePayment(_authorize(), timeout=RPC_TIMEOUT_S)
    assert answer.outcome == gw.OUTCOME_ALLOW, answer
    # A retry is answered from what the gateway remembered (keyed hashes).
    request = _authorize(idempotency_key=uuid.uuid4().hex)
    first = await stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    again = await stub.AuthorizePayment(request, timeout=RPC_TIMEOUT_S)
    assert again.replayed and again.decision_id == first.decision_id
    # The same key with another phone is refused, naming the field.
    changed = gw.AuthorizePaymentRequest()
    changed.CopyFrom(request)
    changed.customer.phone = "+1 415 555 2672"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.AuthorizePayment(changed, timeout=RPC_TIMEOUT_S)
    assert parse_rpc_error(caught.value) == ("IDEMPOTENCY_KEY_REUSED", "customer.phone")
    captured = await stub.CapturePayment(
        gw.CapturePaymentRequest(
            tenant_id=TENANT, idempotency_key=uuid.uuid4().hex, hold_id=answer.hold_id
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert captured.entry_id
    # Identifiers that are PII are refused before anything is forwarded.
    assert await _refused(stub.AuthorizePayment, _authorize(account_id=PAN.replace(" ", ""))) == (
        "PII_IN_IDENTIFIER",
        "account_id",
    )
    ingested = await stub.IngestEvents(
        gw.IngestEventsRequest(
            tenant_id=TENANT,
            events=[
                gw.BehaviourEvent(
                    idempotency_key=uuid.uuid4().hex,
                    # A kind the AI plane's features count (declines): the
                    # event reaches its feature store too.
                    kind=gw.EVENT_KIND_PAYMENT_FAILED,
                    customer=_customer(),
                    account_id="cust_1",
                    device_id="dev_1",
                    flow=f"onboarding for {EMAIL}",
                    step=f"verify {PHONE}",
                    attributes={"note": FREE_TEXT, "card": PAN},
                ),
                gw.BehaviourEvent(
                    idempotency_key=uuid.uuid4().hex,
                    kind=gw.EVENT_KIND_LOAN_SIMULATED,
                    customer=gw.Customer(customer_id=EMAIL.lower()),
                ),
            ],
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert not ingested.results[0].HasField("error"), ingested.results[0]
    refused = ingested.results[1].error
    assert (refused.reason, refused.field) == (
        "PII_IN_IDENTIFIER",
        "events[1].customer.customer_id",
    )
    decided = await stub.DecideNextAction(
        gw.DecideNextActionRequest(
            tenant_id=TENANT,
            idempotency_key=uuid.uuid4().hex,
            customer_id="c1",
            account_id="cust_1",
            surface="checkout",
            region="US",
        ),
        timeout=RPC_TIMEOUT_S,
    )
    assert decided.decision_id
    return str(answer.decision_id)


async def _get_decision(stub: KeyedStub, decision_id: str) -> gw.GetDecisionResponse:
    answer: gw.GetDecisionResponse = await stub.GetDecision(
        gw.GetDecisionRequest(tenant_id=TENANT, decision_id=decision_id), timeout=RPC_TIMEOUT_S
    )
    return answer


# ---------------------------------------------------------------- the scans


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path


def _scan_files(scan: Scan, roots: list[Path]) -> None:
    """Every file byte for byte: SQLite databases with their WAL (deleted
    rows included), logs, keys, models."""
    for root in roots:
        for path in _files(root):
            scan.look(str(path), path.read_bytes())


def _scan_sqlite_tables(scan: Scan, root: Path) -> list[str]:
    import sqlite3

    tables = []
    for path in _files(root):
        with path.open("rb") as handle:
            if handle.read(16) != b"SQLite format 3\x00":
                continue
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"):
                tables.append(f"{path.name}:{table}")
                for row in db.execute(f'SELECT * FROM "{table}"'):
                    for value in row:
                        if isinstance(value, str | bytes):
                            scan.look(f"sqlite {path.name}.{table}", value)
    return tables


def _scan_postgres(scan: Scan, dsns: dict[str, str]) -> list[str]:
    tables = []
    for name, dsn in dsns.items():
        with psycopg.connect(dsn) as db:
            found = db.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchall()
            for (table,) in found:
                tables.append(f"{name}:{table}")
                for row in db.execute(f'SELECT * FROM "{table}"'):
                    for value in row:
                        if value is not None and not isinstance(value, int | float | bool):
                            data = value if isinstance(value, bytes | memoryview) else str(value)
                            scan.look(f"postgres {name}.{table}", data)
    return tables


async def _scan_jetstream(scan: Scan, nats_url: str) -> int:
    """Every message of every stream (the server is this test's own)."""
    client = NatsClient()
    await client.connect(nats_url)
    messages = 0
    try:
        js = client.jetstream()
        for stream in await js.streams_info():
            state, name = stream.state, str(stream.config.name)
            for sequence in range(state.first_seq, state.last_seq + 1):
                try:
                    message = await js.get_msg(name, sequence)
                except Exception:
                    continue  # deleted or purged
                messages += 1
                where = f"jetstream {stream.config.name}#{sequence} {message.subject}"
                scan.look(where, message.data)
                scan.look(where, repr(message.headers or {}))
    finally:
        await client.close()
    return messages


async def _features_written(redis_url: str, namespace: str, timeout_s: float) -> bool:
    """Waits for the AI plane's pipeline to have written this tenant's
    features (it reads the streams from their start, other tests' events
    included)."""
    client = aioredis.from_url(redis_url)
    try:
        for _ in range(int(timeout_s / 0.5)):
            async for _key in client.scan_iter(match=f"{namespace}:{TENANT}:*"):
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await client.aclose()


async def _scan_redis(scan: Scan, redis_url: str, namespace: str) -> int:
    client = aioredis.from_url(redis_url)
    keys = 0
    try:
        async for key in client.scan_iter(match=f"{namespace}:{TENANT}:*"):
            keys += 1
            scan.look("redis key", key)
            found = await client.type(key)
            kind = found.decode() if isinstance(found, bytes) else str(found)
            if kind == "string":
                scan.look(f"redis {key!r}", await client.get(key))
            elif kind == "hash":
                for name, value in (await client.hgetall(key)).items():
                    scan.look(f"redis {key!r}", (name, value))
            elif kind == "zset":
                for member in await client.zrange(key, 0, -1):
                    scan.look(f"redis {key!r}", member)
            elif kind in ("list", "set"):
                items = (
                    await client.lrange(key, 0, -1)
                    if kind == "list"
                    else await client.smembers(key)
                )
                for item in items:
                    scan.look(f"redis {key!r}", item)
    finally:
        await client.aclose()
    return keys


# ---------------------------------------------------------------- the test


async def test_no_raw_pii_at_rest_in_flight_or_in_logs(mesh: Mesh, redis_url: str) -> None:
    decision_id = await _drive(mesh)

    # GetDecision: tokens for a caller without pii:read, clear names with it.
    plain = await _get_decision(mesh.stub, decision_id)
    assert plain.input.customer_name == "" and plain.input.counterparty_name == ""
    assert plain.input.customer_name_token.startswith("ptok_name_")
    assert plain.input.counterparty_name_token.startswith("ptok_name_")
    revealed = await _get_decision(mesh.reader, decision_id)
    assert revealed.input.customer_name == CUSTOMER_NAME
    assert revealed.input.counterparty_name == COUNTERPARTY_NAME
    assert revealed.input.customer_name_token == plain.input.customer_name_token

    # The log still verifies (what is signed is what is stored, sealed), and a
    # replay under the same bundle is deterministic (it opens the names).
    policy = policy_pb2_grpc.PolicyServiceStub(mesh.stack.channel("policy"))
    verified = await policy.VerifyDecisionLog(policy_pb2.VerifyDecisionLogRequest())
    assert verified.valid, verified
    replayed = await policy.ReplayDecisions(
        policy_pb2.ReplayDecisionsRequest(tenant_id=TENANT), timeout=60
    )
    assert replayed.decisions_replayed >= 2, replayed
    assert replayed.determinism_score == 1.0, replayed

    # Let the outboxes and the AI plane's pipeline catch up, then stop
    # everything, so every store is flushed to disk before it is read.
    namespace = mesh.config.ai.features.namespace
    assert await _features_written(redis_url, namespace, 30.0), "no features in Redis"
    await asyncio.sleep(2.0)
    scan = Scan()
    messages = await _scan_jetstream(scan, mesh.config.nats.url)
    redis_keys = await _scan_redis(scan, redis_url, namespace)
    await mesh.gateway.stop()
    await mesh.stack.stop()
    state_dir = mesh.config.state_path
    sqlite_tables = _scan_sqlite_tables(scan, state_dir)
    postgres_tables = _scan_postgres(scan, mesh.dsns)
    _scan_files(scan, [state_dir, mesh.stack.logs_dir])
    for line in mesh.logs.lines:
        scan.look("gateway log", line)

    # What was scanned: every store, stream and log, none of them empty.
    assert messages > 0 and redis_keys > 0, (messages, redis_keys)
    assert any(t.startswith("policy:decision_log") for t in postgres_tables), postgres_tables
    assert any(t.startswith("gateway.db:remembered") for t in sqlite_tables), sqlite_tables
    assert any(path.suffix == ".log" for path in _files(mesh.stack.logs_dir))
    assert mesh.logs.lines
    assert scan.hits == [], "\n".join(
        f"{hit.kind} ({hit.spelling}) in {hit.where}" for hit in scan.hits[:40]
    )
    # The names are in the decision log, sealed.
    with psycopg.connect(mesh.dsns["policy"]) as db:
        bodies = [str(r[0]) for r in db.execute("SELECT body FROM decision_log").fetchall()]
    assert any(re.search(r'"name":"enc:v1:[0-9a-f]{16}:', body) for body in bodies)
