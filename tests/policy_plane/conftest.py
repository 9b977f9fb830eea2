"""Fixtures of the policy plane suite: engines on SQLite and PostgreSQL, a real
gRPC server on a free port, stubs, and input builders."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import msgspec
import nats
import nats.js.errors
import pytest

from policy_plane.app import PolicyPlane, build_engine, build_plane
from policy_plane.engine import PolicyEngine
from policy_plane.model import EvaluationInput, Party, PaymentInput, ScoreInput, SnapshotInput
from policy_plane.profiles import CustomerProfile
from triplane.policy.v1 import policy_pb2_grpc as pb_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.tls import channel_for

from ..tls_helpers import dev_certificates

TENANT = "acme"
OTHER_TENANT = "globex"
# 2026-06-01T12:00:00Z: a Monday, midday in Europe, morning in the Americas.
START_US = 1_780_315_200_000_000
# The customer the input builders name, with a profile in both tenants (tier
# 2, an account opened 400 days before START_US): what the engine reads.
CUSTOMER = "cust-1"
DAY_US = 86_400_000_000


async def put_customer(
    engine: PolicyEngine,
    tenant_id: str = TENANT,
    customer_id: str = CUSTOMER,
    tier: int = 2,
    pep: bool = False,
    age_days: int = 400,
) -> None:
    await engine.put_customer_profile(
        CustomerProfile(
            tenant_id=tenant_id,
            customer_id=customer_id,
            kyc_tier=tier,
            pep=pep,
            country="US",
            account_opened_at_us=START_US - age_days * DAY_US,
            verified_at_us=START_US - DAY_US,
        ),
        f"kyc-{customer_id}-{tier}-{pep}-{age_days}",
        "ops:test",
    )


def make_config(state_dir: Path, pg_dsn: str = "", **policy: Any) -> Config:
    """A config on `state_dir`, whose dev CA and certificates it creates
    (mutual TLS is on, as in the dev stack)."""
    dev_certificates(state_dir)
    overrides: dict[str, Any] = {"runtime": {"state_dir": str(state_dir)}, "nats": {"url": ""}}
    store: dict[str, Any] = {}
    if pg_dsn:
        store = {"backend": "postgres", "postgres_dsn": pg_dsn}
    overrides["policy"] = {"store": store, **policy} if store else dict(policy)
    return load_config(environ={}, overrides=overrides)


async def started_engine(config: Config, clock: ManualClock) -> PolicyEngine:
    engine = build_engine(config, clock)
    await engine.start()
    await engine.create_tenant(TENANT, "Acme")
    await engine.create_tenant(OTHER_TENANT, "Globex")
    await put_customer(engine, TENANT)
    await put_customer(engine, OTHER_TENANT)
    return engine


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START_US)


@pytest.fixture
async def engine(state_dir: Path, clock: ManualClock) -> AsyncIterator[PolicyEngine]:
    engine = await started_engine(make_config(state_dir), clock)
    yield engine
    await engine.stop()
    engine.store.db.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def any_engine(
    request: pytest.FixtureRequest, state_dir: Path, clock: ManualClock
) -> AsyncIterator[PolicyEngine]:
    """The same engine on each storage backend."""
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else ""
    engine = await started_engine(make_config(state_dir, dsn), clock)
    yield engine
    await engine.stop()
    engine.store.db.close()


@pytest.fixture
async def plane(state_dir: Path, nats_url: str, clock: ManualClock) -> AsyncIterator[PolicyPlane]:
    """A real policy plane: gRPC on a free port, NATS, SQLite state, mutual TLS."""
    dev_certificates(state_dir)
    bucket = f"policy_test_{uuid.uuid4().hex[:10]}"
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": nats_url},
            "policy": {
                "bundles": {"kv_watch": True, "kv_bucket": bucket},
                "outbox": {"relay_interval_s": 0.05},
            },
        },
    )
    plane = build_plane(config, clock, listen="127.0.0.1:0")
    await plane.start()
    try:
        await plane.engine.create_tenant(TENANT, "Acme")
        await plane.engine.create_tenant(OTHER_TENANT, "Globex")
        await put_customer(plane.engine, TENANT)
        await put_customer(plane.engine, OTHER_TENANT)
        yield plane
    finally:
        await plane.stop()
        await _delete_bucket(nats_url, bucket)


async def _delete_bucket(nats_url: str, bucket: str) -> None:
    """Each test's KV bucket reserves space on the shared NATS server: it goes
    with the test, or they pile up run after run."""
    client = await nats.connect(nats_url)
    try:
        with contextlib.suppress(nats.js.errors.NotFoundError, nats.js.errors.BucketNotFoundError):
            await client.jetstream().delete_key_value(bucket)
    finally:
        await client.close()


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.policy = pb_grpc.PolicyServiceStub(channel)
        self.bundles = pb_grpc.BundleServiceStub(channel)
        self.consent = pb_grpc.ConsentServiceStub(channel)
        self.offers = pb_grpc.OfferServiceStub(channel)
        self.cases = pb_grpc.CaseServiceStub(channel)
        self.profiles = pb_grpc.CustomerProfileServiceStub(channel)


@pytest.fixture
async def stubs(plane: PolicyPlane) -> AsyncIterator[Stubs]:
    async with channel_for(plane.config, f"127.0.0.1:{plane.server.port}") as channel:
        yield Stubs(channel)


def payment_input(
    key: str = "k1",
    *,
    tenant_id: str = TENANT,
    amount_minor: int = 2_500,
    currency: str = "USD",
    kind: str = "purchase",
    tier: int = 2,
    score: float | None = 0.1,
    source: str = "triton",
    customer: str = "Jane Example",
    counterparty: str = "Corner Shop",
    movement: str = "",
    **snapshot: Any,
) -> EvaluationInput:
    return EvaluationInput(
        tenant_id=tenant_id,
        idempotency_key=key,
        payment=PaymentInput(
            account_id="acct-1",
            credit_account_id="merchant-1",
            # As the wire's default: a hold (a refund for a refund).
            movement=movement or ("refund" if kind == "refund" else "authorize"),
            kind=kind,
            amount_minor=amount_minor,
            currency=currency,
            merchant_id="m-1",
            merchant_category="5411",
            device_id="dev-1",
            customer=Party(name=customer, country="US"),
            counterparty=Party(name=counterparty, country="US"),
            customer_id=CUSTOMER,
        ),
        snapshot=SnapshotInput(
            kyc_tier=tier,
            kyc_country="US",
            score=ScoreInput(model="payment_risk", version="3", source=source, score=score or 0.0)
            if score is not None
            else ScoreInput(source="none"),
            account_age_days=snapshot.pop("account_age_days", 400),
            **snapshot,
        ),
    )


Replace = Callable[..., EvaluationInput]


def replace_payment(inp: EvaluationInput, **changes: Any) -> EvaluationInput:
    return msgspec.structs.replace(inp, payment=msgspec.structs.replace(inp.payment, **changes))
