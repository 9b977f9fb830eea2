"""Channel delivery against a real HTTP receiver: Standard Webhooks signatures
(verified by the `standardwebhooks` package), retries with backoff, timeouts,
the dead-letter queue, redelivery, restarts, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.delivery import (
    Delivery,
    DeliveryStore,
    DeliveryWorker,
    build_adapters,
)
from triplane.runtime.clock import ManualClock, SystemClock
from triplane.runtime.config import ChannelEndpointConfig, DeliveryConfig
from triplane.runtime.db import Database
from triplane.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

from ._b_helpers import SECRET, Receiver, delivery_config, open_db, receiver, secret_file

TENANT = "acme"


def now_clock() -> ManualClock:
    # Wall-clock start: the receiver's replay window is checked against real time.
    return ManualClock(SystemClock().now_us())


def delivery_worker(db: Database, config: DeliveryConfig, clock: ManualClock) -> DeliveryWorker:
    adapters = build_adapters(config, lambda _tenant: SECRET)
    return DeliveryWorker(DeliveryStore(db), config, clock, adapters)


def webhook(url: str, key: str = "order-1", **data: object) -> Delivery:
    return Delivery(
        tenant_id=TENANT,
        channel="partner_webhook",
        endpoint=f"{url}/hooks",
        event_type="trigger.sent",
        payload={"text": "hello", **data},
        dedupe_key=key,
    )


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


async def drain(worker: DeliveryWorker, clock: ManualClock, passes: int, step_s: float) -> None:
    for _ in range(passes):
        await worker.run_once()
        clock.advance(step_s)


async def test_signed_webhook_verifies_and_is_delivered(db: Database, http: Receiver) -> None:
    clock = now_clock()
    worker = delivery_worker(db, delivery_config(), clock)
    try:
        record = await worker.enqueue(webhook(http.url, amount="5,000"))
        assert record.status == "pending" and record.delivery_id.startswith("msg_")
        assert await worker.run_once() == 1
        got = http.received[0]
        assert got.path == "/hooks"
        assert got.headers["webhook-id"] == record.delivery_id
        assert got.headers["webhook-signature"].startswith("v1,")
        data = Webhook(SECRET).verify(got.body, got.headers)
        assert data["type"] == "trigger.sent" and data["data"]["amount"] == "5,000"
        stored = await worker.get(TENANT, record.delivery_id)
        assert stored.status == "delivered" and stored.last_status_code == 200
        assert stored.attempts == 1
        # A tampered body or another secret is refused by the receiver.
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(got.body.replace("hello", "HELLO"), got.headers)
        other = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
        with pytest.raises(WebhookVerificationError):
            Webhook(other).verify(got.body, got.headers)
    finally:
        await worker.aclose()


async def test_replayed_old_timestamp_is_rejected(state_dir: Path, http: Receiver) -> None:
    # A sender whose clock says ten minutes ago: what a replay of a captured
    # request looks like to the receiver (its tolerance is five minutes).
    clock = ManualClock(SystemClock().now_us() - 600_000_000)
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, delivery_config(), clock)
    try:
        await worker.enqueue(webhook(http.url))
        await worker.run_once()
        got = http.received[0]
        with pytest.raises(WebhookVerificationError, match="too old"):
            Webhook(SECRET).verify(got.body, got.headers)
    finally:
        await worker.aclose()
        db.close()


async def test_endpoint_fails_then_recovers(db: Database, http: Receiver) -> None:
    clock = now_clock()
    worker = delivery_worker(db, delivery_config(retry={"maximum_attempts": 5}), clock)
    http.plan = [(503, 0.0), (500, 0.0)]
    try:
        record = await worker.enqueue(webhook(http.url))
        await worker.run_once()
        first = await worker.get(TENANT, record.delivery_id)
        assert first.status == "pending" and first.attempts == 1 and first.last_status_code == 503
        # Backoff: not due again before initial_interval_s (1 s).
        assert first.next_attempt_at_us >= clock.now_us() + 1_000_000
        assert await worker.run_once() == 0
        await drain(worker, clock, passes=4, step_s=31)
        final = await worker.get(TENANT, record.delivery_id)
        assert final.status == "delivered" and final.attempts == 3
        assert http.answered == [503, 500, 200]
        # Every attempt carried the same webhook-id, so the receiver can dedupe.
        assert set(http.ids()) == {record.delivery_id}
        for got in http.received:
            Webhook(SECRET).verify(got.body, got.headers)
    finally:
        await worker.aclose()


async def test_slow_endpoint_times_out_and_is_retried(state_dir: Path, http: Receiver) -> None:
    clock = now_clock()
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, delivery_config(request_timeout_s=0.2), clock)
    http.plan = [(200, 1.0)]
    try:
        record = await worker.enqueue(webhook(http.url))
        await worker.run_once()
        slow = await worker.get(TENANT, record.delivery_id)
        # The endpoint did not answer in time: not delivered, whatever it did later.
        assert slow.status == "pending" and slow.last_error == "timeout"
        await drain(worker, clock, passes=2, step_s=31)
        assert (await worker.get(TENANT, record.delivery_id)).status == "delivered"
    finally:
        await worker.aclose()
        db.close()


async def test_dead_letter_after_n_attempts_then_redeliver(db: Database, http: Receiver) -> None:
    clock = now_clock()
    worker = delivery_worker(
        db, delivery_config(retry={"maximum_attempts": 3}, default_page_size=2), clock
    )
    http.default = (500, 0.0)
    try:
        ids = [(await worker.enqueue(webhook(http.url, key=f"k{i}"))).delivery_id for i in range(3)]
        await drain(worker, clock, passes=6, step_s=31)
        assert len(http.received) == 9, "exactly maximum_attempts attempts per delivery"
        page, token = await worker.list_dead_letters(TENANT)
        assert len(page) == 2 and token
        rest, last = await worker.list_dead_letters(TENANT, page_token=token)
        assert len(rest) == 1 and last == ""
        dead = {r.delivery_id for r in page + rest}
        assert dead == set(ids)
        assert all(r.status == "dead" and r.attempts == 3 and r.dead_at_us for r in page + rest)
        assert (await worker.list_dead_letters("globex"))[0] == []
        # Redelivery through the API, once the endpoint is back.
        http.default = (200, 0.0)
        revived = await worker.redeliver(TENANT, ids[0])
        assert revived.status == "pending" and revived.attempts == 0
        # A retried redeliver is harmless; one of a delivered message is refused.
        assert (await worker.redeliver(TENANT, ids[0])).status == "pending"
        await worker.run_once()
        assert (await worker.get(TENANT, ids[0])).status == "delivered"
        with pytest.raises(FailedPrecondition):
            await worker.redeliver(TENANT, ids[0])
        counts = await worker.counts(TENANT)
        assert counts["delivered"] == 1 and counts["dead"] == 2
        with pytest.raises(NotFound):
            await worker.redeliver("globex", ids[1])
        with pytest.raises(NotFound):
            await worker.get("globex", ids[1])
    finally:
        await worker.aclose()


async def test_circuit_opens_on_a_down_endpoint_and_spends_no_attempts(
    db: Database, http: Receiver
) -> None:
    """An endpoint down for longer than the whole retry budget: once its circuit
    opens, its deliveries wait without spending attempts, a single probe tests
    it, and when it is back every message is delivered; none is dead-lettered."""
    clock = now_clock()
    config = delivery_config(
        retry={"maximum_attempts": 3, "maximum_interval_s": 5.0},
        circuit_failures=2,
        circuit_open_s=60.0,
    )
    worker = delivery_worker(db, config, clock)
    http.decide = lambda got: 503 if got.path == "/hooks" else 200
    try:
        ids = [
            (await worker.enqueue(webhook(http.url, key=f"down-{i}"))).delivery_id for i in range(6)
        ]
        assert await worker.run_once() == 6
        assert len(http.received) == 6  # all in flight together before any answer
        assert worker.circuit_open(f"{http.url}/hooks")
        # While open: due deliveries go back to the queue untried and uncounted.
        clock.advance(10)
        assert await worker.run_once() == 6
        assert len(http.received) == 6
        for delivery_id in ids:
            record = await worker.get(TENANT, delivery_id)
            assert record.status == "pending" and record.attempts == 1
        # Another endpoint is not affected by this one's circuit.
        fine = await worker.enqueue(
            Delivery(
                tenant_id=TENANT,
                channel="partner_webhook",
                endpoint=f"{http.url}/other",  # another endpoint (same server)
                event_type="trigger.sent",
                payload={"text": "hi"},
                dedupe_key="other-1",
            )
        )
        await worker.run_once()
        assert (await worker.get(TENANT, fine.delivery_id)).status == "delivered"
        # Half-open, still down: exactly one probe, then open again.
        clock.advance(60)
        await worker.run_once()
        assert len(http.received) == 8  # 6 + the other endpoint + one probe
        assert worker.circuit_open(f"{http.url}/hooks")
        # The endpoint recovers; after the open period a probe closes the circuit.
        http.decide = None
        for _ in range(6):
            clock.advance(61)
            await worker.run_once()
        for delivery_id in ids:
            record = await worker.get(TENANT, delivery_id)
            assert record.status == "delivered", record
            assert record.attempts <= 3
        assert not worker.circuit_open(f"{http.url}/hooks")
        assert (await worker.counts(TENANT))["dead"] == 0
    finally:
        await worker.aclose()


async def test_crash_mid_send_resends_same_id_after_restart(
    state_dir: Path, http: Receiver
) -> None:
    clock = now_clock()
    config = delivery_config(request_timeout_s=2.0, lease_s=5.0)
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, config, clock)
    http.plan = [(200, 1.0)]
    record = await worker.enqueue(webhook(http.url))
    attempt = asyncio.create_task(worker.run_once())
    for _ in range(100):
        if http.received:
            break
        await asyncio.sleep(0.01)
    assert http.received, "the request reached the receiver"
    attempt.cancel()  # the process dies before it hears the answer
    with pytest.raises(asyncio.CancelledError):
        await attempt
    await worker.aclose()
    db.close()
    # Restart: a new process on the same database.
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, config, clock)
    try:
        stuck = await worker.get(TENANT, record.delivery_id)
        assert stuck.status == "sending"
        assert await worker.run_once() == 0, "the lease still holds"
        clock.advance(config.lease_s)
        assert await worker.run_once() == 1
        assert (await worker.get(TENANT, record.delivery_id)).status == "delivered"
        assert http.ids() == [record.delivery_id, record.delivery_id]
        assert len(set(http.ids())) == 1, "the receiver sees one message, sent twice"
    finally:
        await worker.aclose()
        db.close()


async def test_no_message_lost_with_a_flaky_endpoint(db: Database, http: Receiver) -> None:
    clock = now_clock()
    worker = delivery_worker(
        db, delivery_config(retry={"maximum_attempts": 20}, batch_size=16), clock
    )
    rng = random.Random(5)
    http.decide = lambda _r: 200 if rng.random() < 0.5 else 503
    try:
        ids = {
            (await worker.enqueue(webhook(http.url, key=f"m{i}"))).delivery_id for i in range(40)
        }
        for _ in range(40):
            await worker.run_once()
            clock.advance(31)
            if (await worker.counts(TENANT))["delivered"] == len(ids):
                break
        assert (await worker.counts(TENANT))["delivered"] == len(ids)
        assert http.acknowledged_ids() == ids
    finally:
        await worker.aclose()


async def test_provider_channels_post_signed_to_their_endpoints(
    state_dir: Path, http: Receiver
) -> None:
    channels = {
        name: ChannelEndpointConfig(url=f"{http.url}/{name}", secret_path=secret_file())
        for name in ("push", "sms", "email", "whatsapp")
    }
    config = delivery_config(channels=channels)
    clock = now_clock()
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, config, clock)
    try:
        for name in channels:
            await worker.enqueue(
                msgspec.structs.replace(
                    webhook(http.url, key=name), channel=name, endpoint=f"tok_{name}"
                )
            )
        await worker.run_once()
        assert sorted(r.path for r in http.received) == ["/email", "/push", "/sms", "/whatsapp"]
        for got in http.received:
            body = Webhook(SECRET).verify(got.body, got.headers)
            assert body["channel"] == got.path[1:] and body["to"] == f"tok_{got.path[1:]}"
        assert (await worker.counts())["delivered"] == 4
    finally:
        await worker.aclose()
        db.close()


async def test_enqueue_is_idempotent_and_validates(state_dir: Path, http: Receiver) -> None:
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, delivery_config(max_payload_bytes=256), now_clock())
    try:
        first = await worker.enqueue(webhook(http.url))
        again = await worker.enqueue(webhook(http.url))
        assert again.delivery_id == first.delivery_id and again.body == first.body
        with pytest.raises(AlreadyExists) as reused:
            await worker.enqueue(webhook(http.url, text="other"))
        assert reused.value.field == "payload"
        bad: dict[str, dict[str, Any]] = {
            "channel": {"channel": "fax"},
            "endpoint": {"endpoint": "ftp://x"},
            "dedupe_key": {"dedupe_key": ""},
            "tenant_id": {"tenant_id": "a b"},
            "event_type": {"event_type": ""},
            "payload": {"payload": {"blob": "x" * 300}},
        }
        for field_name, change in bad.items():
            with pytest.raises(InvalidArgument) as err:
                await worker.enqueue(msgspec.structs.replace(webhook(http.url, key="z"), **change))
            assert err.value.field == field_name
        with pytest.raises(InvalidArgument) as token:
            await worker.list_dead_letters(TENANT, page_token="!!")
        assert token.value.field == "page_token"
        with pytest.raises(InvalidArgument):
            await worker.list_dead_letters(TENANT, page_size=-1)
        assert http.received == [], "bad input sends nothing"
    finally:
        await worker.aclose()
        db.close()


async def test_queue_bound_and_future_send_at(state_dir: Path, http: Receiver) -> None:
    from triplane.runtime.errors import ResourceExhausted

    clock = now_clock()
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, delivery_config(max_pending=2), clock)
    try:
        later = clock.now_us() + 60_000_000
        await worker.enqueue(msgspec.structs.replace(webhook(http.url, key="a"), send_at_us=later))
        await worker.enqueue(webhook(http.url, key="b"))
        with pytest.raises(ResourceExhausted):
            await worker.enqueue(webhook(http.url, key="c"))
        # A retry of a queued message is answered even when the queue is full.
        assert (await worker.enqueue(webhook(http.url, key="b"))).dedupe_key == "b"
        assert await worker.run_once() == 1, "only the one that is due"
        clock.advance(60)
        assert await worker.run_once() == 1
        assert len(http.received) == 2
    finally:
        await worker.aclose()
        db.close()


async def test_background_worker_delivers_as_soon_as_enqueued(
    state_dir: Path, http: Receiver
) -> None:
    db = open_db("sqlite", state_dir)
    worker = delivery_worker(db, delivery_config(poll_interval_s=5.0), SystemClock())  # type: ignore[arg-type]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        record = await worker.enqueue(webhook(http.url))
        for _ in range(200):
            if (await worker.get(TENANT, record.delivery_id)).status == "delivered":
                break
            await asyncio.sleep(0.01)
        assert (await worker.get(TENANT, record.delivery_id)).status == "delivered"
    finally:
        stop.set()
        await asyncio.wait_for(running, 2.0)
        await worker.aclose()
        db.close()
