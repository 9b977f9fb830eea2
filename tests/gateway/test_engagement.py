"""The engagement side as the gateway assembles it (`gateway.engagement`): a
behavioural event fires a trigger rule; at send time the real policy plane,
over gRPC, is asked about each channel in order; the send goes out as a
Standard Webhooks-signed partner webhook; an exposure and its conversion reach
the lift report and its Prometheus gauges."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook

from gateway.engagement import Engagement
from gateway.measure import LiftMetrics
from gateway.planes import GrpcPolicy
from gateway.ports import IngestedEvent
from policy_plane.app import PolicyPlane, build_plane
from policy_plane.consent import ConsentRecord, ContactProfile
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.tls import GATEWAY

from ..tls_helpers import channel_as, dev_certificates
from ._b_helpers import SECRET, Receiver, receiver, secret_file

TENANT = "acme"
# Noon in UTC, the customers' time zone: outside quiet hours, whatever the
# hour at which the suite runs.
NOON_US = int(dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC).timestamp() * 1_000_000)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOON_US)


@dataclass
class Policy:
    plane: PolicyPlane
    address: str


@pytest.fixture
async def policy(state_dir: Path, clock: ManualClock) -> AsyncIterator[Policy]:
    """The real policy plane, in process, serving gRPC on a free port (mutual
    TLS, the dev certificates under its state dir)."""
    dev_certificates(state_dir / "policy")
    config = load_config(
        environ={},
        overrides={"runtime": {"state_dir": str(state_dir / "policy")}, "nats": {"url": ""}},
    )
    plane = build_plane(config, clock, listen="127.0.0.1:0")
    port = await plane.start()
    await plane.engine.create_tenant(TENANT, "Acme")
    try:
        yield Policy(plane, f"127.0.0.1:{port}")
    finally:
        await plane.stop()


@pytest.fixture
async def http() -> AsyncIterator[Receiver]:
    async with receiver() as state:
        yield state


def gateway_config(state_dir: Path, webhook_url: str, **gateway: object) -> Config:
    return load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir / "gateway")},
            "nats": {"url": ""},
            "gateway": {
                "partner_webhooks": [
                    {"tenant_id": TENANT, "url": webhook_url, "secret_path": secret_file()}
                ],
                **gateway,
            },
        },
    )


@pytest.fixture
async def engagement(
    state_dir: Path, clock: ManualClock, policy: Policy, http: Receiver
) -> AsyncIterator[Engagement]:
    # As the gateway dials it: its own certificate, from the policy plane's CA.
    channel = channel_as(state_dir / "policy", policy.address, GATEWAY)
    built = Engagement.open(
        gateway_config(state_dir, f"{http.url}/partner"), clock, GrpcPolicy(channel)
    )
    try:
        yield built
    finally:
        await built.close()
        await channel.close()


def consent_partner_webhook(policy: Policy, customer: str) -> None:
    consent = policy.plane.engine.consent
    consent.put_profile(ContactProfile(tenant_id=TENANT, customer_id=customer, time_zone="UTC"))
    consent.set_consent(
        TENANT,
        customer,
        ConsentRecord(
            channel="partner_webhook", topic="marketing", status="granted", lawful_basis="consent"
        ),
    )


def event(customer: str, event_id: str, event_type: str, **attributes: str) -> IngestedEvent:
    return IngestedEvent(
        event_id=event_id,
        tenant_id=TENANT,
        event_type=event_type,
        customer_id=customer,
        customer_token=f"tok_{customer}",
        account_id=f"acct_{customer}",
        occurred_at_us=NOON_US,
        amount_minor=500_000,
        currency="USD",
        attributes=attributes,
    )


async def abandon_a_loan(engagement: Engagement, customer: str) -> int:
    """The default rule's two steps; returns the sends the second scheduled."""
    first = event(customer, f"{customer}-1", "loan.simulated")
    assert await engagement.triggers.on_event(first) == 0, "one step of two: nothing yet"
    return await engagement.triggers.on_event(
        event(customer, f"{customer}-2", "flow.abandoned", step="documentation")
    )


async def test_a_trigger_goes_out_as_a_signed_partner_webhook(
    engagement: Engagement, policy: Policy, clock: ManualClock, http: Receiver
) -> None:
    consent_partner_webhook(policy, "cust_1")  # and nothing else
    assert await abandon_a_loan(engagement, "cust_1") == 1
    rule = load_config(environ={}).gateway.triggers.rules[0]
    clock.advance(rule.delay_s)
    [send] = await engagement.runner.run_once()
    # push, whatsapp, sms and email have no consent: the policy plane, asked
    # about each in order, allows only the partner webhook.
    assert (send.status, send.channel) == ("sent", "partner_webhook"), send
    assert await engagement.delivery.run_once() == 1
    [received] = http.received
    assert received.path == "/partner"
    headers = received.headers
    signed_at = dt.datetime.fromtimestamp(int(headers["webhook-timestamp"]), dt.UTC)
    expected = Webhook(SECRET).sign(headers["webhook-id"], signed_at, received.body)
    assert expected in headers["webhook-signature"].split(" ")
    body = msgspec.json.decode(received.body)
    assert body["data"]["text"] == "Your USD 5,000 loan is ready. Just one document left."
    assert body["data"]["customer_id"] == "cust_1"
    assert (await engagement.delivery.counts(TENANT))["delivered"] == 1


async def test_a_send_no_channel_may_take_is_dropped_with_the_policy_reason(
    engagement: Engagement, policy: Policy, clock: ManualClock, http: Receiver
) -> None:
    policy.plane.engine.consent.put_profile(
        ContactProfile(tenant_id=TENANT, customer_id="cust_2", time_zone="UTC")
    )
    assert await abandon_a_loan(engagement, "cust_2") == 1
    clock.advance(load_config(environ={}).gateway.triggers.rules[0].delay_s)
    [send] = await engagement.runner.run_once()
    assert (send.status, send.reason) == ("dropped", "no_consent"), send
    for channel in ("push", "whatsapp", "sms", "email", "partner_webhook"):
        assert f"{channel}: no_consent" in send.detail
    assert await engagement.delivery.run_once() == 0
    assert http.received == []


async def test_an_exposure_and_its_conversion_reach_the_lift_gauges(
    engagement: Engagement, clock: ManualClock
) -> None:
    exposure = gw.ExposureLogged(
        decision_id="nba_1",
        customer_token="tok_c1",
        surface="checkout",
        offer_id="loan_offer",
        action_probability=0.5,
        assignment=gw.ExperimentAssignment(experiment="nba_default", arm="a", holdout=False),
        conversion_events=["loan.accepted"],
    )
    await engagement.measurement.exposure(TENANT, clock.now_us(), exposure)
    # An exposure with no offer (nothing shown) is not measured.
    await engagement.measurement.exposure(
        TENANT, clock.now_us(), gw.ExposureLogged(decision_id="nba_2", customer_token="tok_c2")
    )
    clock.advance(60)
    await engagement.measurement.outcome(
        TENANT,
        clock.now_us(),
        gw.OutcomeRecorded(
            decision_id="nba_1", offer_id="loan_offer", kind=gw.OUTCOME_KIND_CONVERTED
        ),
    )
    report = await engagement.measurement.lift_report(TENANT)
    [row] = [r for r in report.rows if r.offer_id == "loan_offer" and r.surface == "checkout"]
    assert (row.treatment.customers, row.treatment.conversions) == (1, 1)
    assert {r.offer_id for r in report.rows} <= {"loan_offer", "*"}

    registry = CollectorRegistry()
    stop = asyncio.Event()
    tasks = engagement.start(stop, LiftMetrics(registry))
    try:
        labels = {
            "tenant": TENANT,
            "offer": "loan_offer",
            "surface": "checkout",
            "segment": row.segment,
            "group": "treatment",
        }
        customers = None
        for _ in range(500):
            customers = registry.get_sample_value("triplane_lift_customers", labels)
            if customers is not None:
                break
            await asyncio.sleep(0.01)
        assert customers == 1.0
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_an_unknown_store_backend_fails_the_start(
    state_dir: Path, clock: ManualClock
) -> None:
    """A piece that cannot be built stops the gateway; nothing is turned off quietly."""
    config = gateway_config(state_dir, "http://127.0.0.1:1/partner", store={"backend": "mysql"})
    channel = grpc.aio.insecure_channel("127.0.0.1:1")
    try:
        with pytest.raises(InvalidArgument) as raised:
            Engagement.open(config, clock, GrpcPolicy(channel))
    finally:
        await channel.close()
    assert raised.value.field == "gateway.store.backend"
