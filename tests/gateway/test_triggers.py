"""Behavioural triggers: the abandoned-loan rule across quiet hours with an
injected clock, the real policy plane (in process) answering consent and quiet
hours at send time, a restart between scheduling and sending, dedupe across
channels, and delivery to a real HTTP receiver."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from standardwebhooks.webhooks import Webhook

from gateway.delivery import DeliveryStore, DeliveryWorker, build_adapters
from gateway.triggers import (
    ContactQuery,
    ContactVerdict,
    TriggerEngine,
    TriggerEvent,
    TriggerRunner,
    TriggerStore,
    format_amount,
    render,
)
from policy_plane.app import build_engine
from policy_plane.consent import ConsentRecord, ContactProfile, ContactRecord
from policy_plane.engine import PolicyEngine
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import ChannelEndpointConfig, TriggersConfig, load_config
from triplane.runtime.db import Database
from triplane.runtime.errors import InvalidArgument

from ._b_helpers import SECRET, Receiver, delivery_config, open_db, receiver, secret_file

TENANT = "acme"
TEXT = "Your USD 5,000 loan is ready. Just one document left."


def at(day: int, hour: int, minute: int = 0) -> int:
    moment = dt.datetime(2026, 6, day, hour, minute, tzinfo=dt.UTC)
    return int(moment.timestamp() * 1_000_000)


def triggers_config(**changes: Any) -> TriggersConfig:
    return msgspec.structs.replace(load_config(environ={}).gateway.triggers, **changes)


def loan(customer: str, event_id: str, at_us: int) -> TriggerEvent:
    return TriggerEvent(
        event_id=event_id,
        tenant_id=TENANT,
        customer_id=customer,
        event_type="loan.simulated",
        occurred_at_us=at_us,
        amount_minor=500_000,
        currency="USD",
    )


def abandoned(
    customer: str, event_id: str, at_us: int, step: str = "documentation"
) -> TriggerEvent:
    return TriggerEvent(
        event_id=event_id,
        tenant_id=TENANT,
        customer_id=customer,
        event_type="flow.abandoned",
        occurred_at_us=at_us,
        attributes={"step": step, "flow": "loan_application"},
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(at(1, 12))


@pytest.fixture
async def policy(state_dir: Path, clock: ManualClock) -> AsyncIterator[PolicyEngine]:
    """The real policy plane's engine, in process, on SQLite."""
    config = load_config(
        environ={},
        overrides={"runtime": {"state_dir": str(state_dir / "policy")}, "nats": {"url": ""}},
    )
    engine = build_engine(config, clock)
    await engine.start()
    await engine.create_tenant(TENANT, "Acme")
    yield engine
    await engine.stop()
    engine.store.db.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, state_dir: Path) -> Iterator[Database]:
    dsn = request.getfixturevalue("pg_dsn") if request.param == "postgres" else ""
    database = open_db(request.param, state_dir, dsn)
    yield database
    database.close()


@pytest.fixture
async def http() -> AsyncIterator[Receiver]:
    async with receiver() as state:
        yield state


def consent(
    engine: PolicyEngine, customer: str, *channels: str, tz: str = "America/New_York"
) -> None:
    engine.consent.put_profile(ContactProfile(tenant_id=TENANT, customer_id=customer, time_zone=tz))
    for channel in channels:
        engine.consent.set_consent(
            TENANT,
            customer,
            ConsentRecord(
                channel=channel, topic="marketing", status="granted", lawful_basis="consent"
            ),
        )


def policy_check(engine: PolicyEngine) -> Any:
    """What the gateway wraps around ConsentService.CheckContact / RecordContact."""

    async def check(query: ContactQuery) -> ContactVerdict:
        answer = engine.consent.check(
            query.tenant_id,
            query.customer_id,
            query.channel,
            query.topic,
            query.offer_id,
            at_us=query.at_us,
        )
        return ContactVerdict(
            answer.allowed, answer.block, answer.detail, answer.next_allowed_at_us
        )

    async def record(query: ContactQuery, contact_id: str, at_us: int) -> None:
        engine.consent.record_contact(
            query.tenant_id,
            query.customer_id,
            ContactRecord(
                contact_id=contact_id,
                channel=query.channel,
                topic=query.topic,
                offer_id=query.offer_id,
                at_us=at_us,
            ),
        )

    return check, record


def address(url: str) -> Any:
    def resolve(tenant_id: str, customer_id: str, channel: str) -> str:
        return f"{url}/partner" if channel == "partner_webhook" else f"tok_{customer_id}_{channel}"

    return resolve


def delivery_worker(db: Database, clock: ManualClock, url: str) -> DeliveryWorker:
    channels = {
        name: ChannelEndpointConfig(url=f"{url}/{name}", secret_path=secret_file())
        for name in ("push", "sms", "email", "whatsapp")
    }
    config = delivery_config(channels=channels)
    return DeliveryWorker(
        DeliveryStore(db), config, clock, build_adapters(config, lambda _t: SECRET)
    )


def runner(
    db: Database, clock: ManualClock, engine: PolicyEngine, worker: DeliveryWorker, url: str
) -> TriggerRunner:
    check, record = policy_check(engine)
    return TriggerRunner(
        TriggerStore(db), triggers_config(), clock, check, worker, address(url), record
    )


async def test_abandoned_loan_across_quiet_hours(
    db: Database, state_dir: Path, clock: ManualClock, policy: PolicyEngine, http: Receiver
) -> None:
    # 20:30 in New York (EDT, UTC-4) on June 1st: quiet hours start at 21:00.
    clock.set_us(at(2, 0, 30))
    # Push is the preferred channel but has no consent: WhatsApp is the best allowed one.
    consent(policy, "cust_1", "whatsapp", "email")
    engine = TriggerEngine(TriggerStore(db), triggers_config(), clock)
    assert await engine.on_event(loan("cust_1", "ev1", at(2, 0, 30))) == []
    clock.set_us(at(2, 0, 50))
    [send] = await engine.on_event(abandoned("cust_1", "ev2", at(2, 0, 50)))
    assert send.text == TEXT
    assert send.due_at_us == at(2, 1, 5), "delay_s after the firing event"
    # A restart between scheduling and sending: the send lives in the database.
    trigger_db_restart = isinstance(db, Database) and db.dialect == "sqlite"
    if trigger_db_restart:
        db.close()
        db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, clock, http.url)
    run = runner(db, clock, policy, worker, http.url)
    try:
        clock.set_us(at(2, 1, 5))  # 21:05 local: quiet hours
        [postponed] = await run.run_once()
        assert postponed.status == "scheduled" and postponed.reason == "quiet_hours"
        assert postponed.due_at_us == at(2, 12), "08:00 in New York"
        assert "push: no_consent" in postponed.detail
        assert await worker.run_once() == 0 and http.received == []
        clock.set_us(at(2, 6))  # 02:00 local: still quiet, nothing due
        assert await run.run_once() == []
        clock.set_us(at(2, 12))
        [sent] = await run.run_once()
        assert sent.status == "sent" and sent.channel == "whatsapp" and sent.delivery_id
        assert await worker.run_once() == 1
        [got] = http.received
        assert got.path == "/whatsapp"
        body = msgspec.json.decode(got.body)
        assert body["data"]["text"] == TEXT and body["to"] == "tok_cust_1_whatsapp"
        moment = dt.datetime.fromtimestamp(int(got.headers["webhook-timestamp"]), dt.UTC)
        expected = Webhook(SECRET).sign(got.headers["webhook-id"], moment, got.body)
        assert got.headers["webhook-signature"] == expected
        assert (await worker.get(TENANT, sent.delivery_id)).status == "delivered"
        # The contact was recorded with the policy plane (a second record is a duplicate).
        again = ContactRecord(
            contact_id=sent.send_id, channel="whatsapp", topic="marketing", at_us=at(2, 12)
        )
        assert policy.consent.record_contact(TENANT, "cust_1", again) is True
        # One send per customer x trigger x window, whatever the channel.
        engine = TriggerEngine(TriggerStore(db), triggers_config(), clock)
        clock.set_us(at(2, 12, 30))
        assert await engine.on_event(loan("cust_1", "ev3", at(2, 12, 30))) == []
        assert await engine.on_event(abandoned("cust_1", "ev4", at(2, 12, 31))) == []
        assert await engine.on_event(abandoned("cust_1", "ev2", at(2, 0, 50))) == [], "redelivery"
        # The next day's abandonment is a new window.
        clock.set_us(at(3, 13))
        await engine.on_event(loan("cust_1", "ev5", at(3, 13)))
        assert len(await engine.on_event(abandoned("cust_1", "ev6", at(3, 13)))) == 1
    finally:
        await worker.aclose()
        if trigger_db_restart:
            db.close()


async def test_no_consent_drops_with_reason(
    db: Database, clock: ManualClock, policy: PolicyEngine, http: Receiver
) -> None:
    clock.set_us(at(2, 15))  # 11:00 in New York
    consent(policy, "cust_2")  # a profile, no consent on any channel
    engine = TriggerEngine(TriggerStore(db), triggers_config(), clock)
    await engine.on_event(loan("cust_2", "e1", at(2, 15)))
    [send] = await engine.on_event(abandoned("cust_2", "e2", at(2, 15)))
    worker = delivery_worker(db, clock, http.url)
    try:
        clock.advance(900)
        [dropped] = await runner(db, clock, policy, worker, http.url).run_once()
        assert dropped.status == "dropped" and dropped.reason == "no_consent"
        stored = TriggerStore(db).get(TENANT, send.send_id)
        assert stored is not None and stored.status == "dropped"
        assert (await worker.counts(TENANT))["pending"] == 0
    finally:
        await worker.aclose()


async def test_rules_need_the_whole_sequence_in_time(state_dir: Path, clock: ManualClock) -> None:
    db = open_db("sqlite", state_dir)
    engine = TriggerEngine(TriggerStore(db), triggers_config(), clock)
    try:
        # Wrong step.
        await engine.on_event(loan("c1", "a1", at(1, 12)))
        assert await engine.on_event(abandoned("c1", "a2", at(1, 12, 5), step="income")) == []
        # Abandoned before simulating: the order matters.
        assert await engine.on_event(abandoned("c2", "b1", at(1, 12))) == []
        assert await engine.on_event(loan("c2", "b2", at(1, 12, 5))) == []
        # Simulated more than 24 hours before.
        await engine.on_event(loan("c3", "c1", at(1, 12)))
        clock.set_us(at(2, 13))
        assert await engine.on_event(abandoned("c3", "c2", at(2, 13))) == []
        # Another tenant's events never complete this customer's sequence.
        other = msgspec.structs.replace(loan("c4", "d1", at(2, 13)), tenant_id="globex")
        await engine.on_event(other)
        assert await engine.on_event(abandoned("c4", "d2", at(2, 13))) == []
    finally:
        db.close()


async def test_history_is_bounded_per_customer(state_dir: Path, clock: ManualClock) -> None:
    db = open_db("sqlite", state_dir)
    engine = TriggerEngine(TriggerStore(db), triggers_config(max_events_per_customer=3), clock)
    try:
        await engine.on_event(loan("c1", "x0", at(1, 12)))
        for i in range(3):
            opened = TriggerEvent(
                event_id=f"x{i + 1}",
                tenant_id=TENANT,
                customer_id="c1",
                event_type="app.opened",
                occurred_at_us=at(1, 12, i + 1),
            )
            await engine.on_event(opened)
        # The loan simulation fell out of the bounded history.
        assert await engine.on_event(abandoned("c1", "x9", at(1, 12, 9))) == []
        with db.tx() as tx:
            row = tx.one("SELECT COUNT(*) FROM gw_trigger_events WHERE customer_id = 'c1'")
        assert row is not None and row[0] == 3
    finally:
        db.close()


async def test_quiet_hours_past_the_deadline_drop_and_bad_input(
    state_dir: Path, clock: ManualClock
) -> None:
    db = open_db("sqlite", state_dir)
    config = triggers_config()
    rule = msgspec.structs.replace(config.rules[0], send_within_s=3600, delay_s=0)
    config = msgspec.structs.replace(config, rules=[rule])
    engine = TriggerEngine(TriggerStore(db), config, clock)
    sent: list[str] = []

    async def always_quiet(query: ContactQuery) -> ContactVerdict:
        return ContactVerdict(False, "quiet_hours", "quiet", clock.now_us() + 8 * 3600 * 1_000_000)

    class Queue:
        async def enqueue(self, delivery: Any) -> Any:
            sent.append(delivery.dedupe_key)
            raise AssertionError("nothing is sent in quiet hours")

    run = TriggerRunner(TriggerStore(db), config, clock, always_quiet, Queue(), address("http://x"))
    clock.set_us(at(1, 22))
    try:
        await engine.on_event(loan("c1", "q1", at(1, 22)))
        [_send] = await engine.on_event(abandoned("c1", "q2", at(1, 22)))
        [dropped] = await run.run_once()
        assert dropped.status == "dropped" and dropped.reason == "expired"
        assert sent == []
        bad: dict[str, dict[str, Any]] = {
            "currency": {"currency": "XXY"},
            "customer_id": {"customer_id": ""},
            "event_type": {"event_type": "bad type"},
            "attributes": {"attributes": {str(i): "v" for i in range(40)}},
            "occurred_at_us": {"occurred_at_us": 0},
        }
        for field_name, change in bad.items():
            with pytest.raises(InvalidArgument) as err:
                await engine.on_event(
                    msgspec.structs.replace(loan("c9", "z1", at(1, 22)), **change)
                )
            assert err.value.field == field_name
    finally:
        db.close()


def test_amounts_and_templates() -> None:
    assert format_amount(500_000, "USD") == "5,000"
    assert format_amount(123_450, "EUR") == "1,234.50"
    assert format_amount(500_000, "JPY") == "500,000"
    assert format_amount(1_234_567, "KWD") == "1,234.567"
    chain = [loan("c", "1", 1), abandoned("c", "2", 2)]
    assert render("{currency} {amount} at {step}", chain) == "USD 5,000 at documentation"
    with pytest.raises(KeyError):
        render("{missing}", chain)
