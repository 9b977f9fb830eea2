"""The NATS feature pipeline against a real JetStream: durable consumers,
idempotent updates under redelivery, and a backfill that equals the live store."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from ai_plane.features import Increment, updates_for
from ai_plane.pipeline import UNREADABLE_EVENTS, Applier, FeaturePipeline, activities_of, backfill
from ai_plane.store.memory import InProcessStore
from triplane.common.v1 import envelope_pb2
from triplane.runtime import bus
from triplane.runtime.clock import Clock, ManualClock, SystemClock
from triplane.runtime.config import Config, load_config
from triplane_sim import synth
from triplane_sim.spine import synthetic_envelope

pytestmark = pytest.mark.nats
NAMESPACE = "live"


def _config(nats_url: str, durable: str) -> Config:
    return load_config(
        environ={},
        overrides={
            "nats": {"url": nats_url},
            "ai": {
                "pipeline": {"durable_name": durable, "ack_wait_s": 1.0, "fetch_timeout_s": 0.2}
            },
        },
    )


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[JetStreamContext]:
    config = load_config(environ={}, overrides={"nats": {"url": nats_url}})
    nc: NatsClient = await bus.connect(config.nats, "ai-pipeline-test")
    jetstream = nc.jetstream()
    await bus.ensure_streams(jetstream, config.nats, ["TRIPLANE_MONEY", "TRIPLANE_GATEWAY"])
    yield jetstream
    await nc.close()


class FlakyStore(InProcessStore):
    """Applies, then fails once for some events: the worst moment to crash
    (after the write, before the ack), so JetStream redelivers them."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(max_keys=1_000_000, dedupe_ttl_s=3600, clock=clock)
        self.failed: set[str] = set()

    async def apply(self, event_id: str, increments: Sequence[Increment]) -> bool:
        applied = self.apply_sync(event_id, increments)
        if zlib.crc32(event_id.encode()) % 4 == 0 and event_id not in self.failed:
            self.failed.add(event_id)
            raise ConnectionError("simulated crash after the write")
        return applied


def _world(tenant: str, now_us: int) -> list[bus.OutgoingEvent]:
    """A synthetic world moved so that its last event happens at `now_us`."""
    data = synth.generate(synth.SynthConfig(seed=21, tenant_id=tenant, customers=15, days=2))
    shift_us = now_us - data.events[-1].activity.occurred_at_us
    events = []
    for event in data.events:
        moved = dataclasses.replace(
            event,
            activity=dataclasses.replace(
                event.activity, occurred_at_us=event.activity.occurred_at_us + shift_us
            ),
        )
        outgoing = synthetic_envelope(moved)
        if outgoing is not None:
            events.append(outgoing)
    return events


def _reference(events: Sequence[bus.OutgoingEvent], clock: Clock) -> InProcessStore:
    store = InProcessStore(max_keys=1_000_000, dedupe_ttl_s=3600, clock=clock)
    for event in events:
        for activity in activities_of(envelope_pb2.EventEnvelope.FromString(event.data)):
            store.apply_sync(activity.event_id, updates_for(activity, NAMESPACE))
    return store


def _records(store: InProcessStore) -> Mapping[str, Mapping[str, float]]:
    return {k: dict(v) for k, v in store._records.items()}


async def _wait_drained(
    js: JetStreamContext, durable: str, store: InProcessStore, expected: int, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(store._applied) < expected:
            await asyncio.sleep(0.1)
            continue
        infos = [
            await js.consumer_info("TRIPLANE_MONEY", f"{durable}-money"),
            await js.consumer_info("TRIPLANE_GATEWAY", f"{durable}-gateway"),
        ]
        if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("pipeline did not drain in time")


async def test_redelivery_never_double_counts_and_backfill_equals_live(
    js: JetStreamContext, nats_url: str
) -> None:
    tenant = f"ai{uuid.uuid4().hex[:8]}"
    # Every store judges expiry at the same fixed moment, so no record can
    # expire between filling one store and the next (a 10-minute bucket ends
    # every 2 minutes of wall time).
    clock = ManualClock(SystemClock().now_us())
    events = _world(tenant, clock.now_us())
    assert all(await bus.publish_batch(js, events, timeout_s=10))
    config = _config(nats_url, f"ai-test-{tenant}")
    store = FlakyStore(clock)
    expected = _reference(events, clock)
    applier = Applier(store, NAMESPACE)
    pipeline = FeaturePipeline(js, config.ai.pipeline, applier, tenant_id=tenant)
    await pipeline.start()
    try:
        await _wait_drained(js, f"ai-test-{tenant}", store, len(expected._applied), 30)
    finally:
        await pipeline.stop()
    assert store.failed, "some messages must have been redelivered"
    assert pipeline.applier.duplicates >= len(store.failed)
    assert _records(store) == _records(expected)

    # Publishing the same events again: JetStream drops them (Nats-Msg-Id).
    before = (await js.stream_info("TRIPLANE_MONEY")).state.messages
    assert all(await bus.publish_batch(js, events[:50], timeout_s=10))
    assert (await js.stream_info("TRIPLANE_MONEY")).state.messages == before

    # Rebuild from history into an empty store: identical to the live one.
    rebuilt = InProcessStore(max_keys=1_000_000, dedupe_ttl_s=3600, clock=clock)
    read = await backfill(js, Applier(rebuilt, NAMESPACE), tenant, config.ai.pipeline)
    assert read == len(events)
    assert _records(rebuilt) == _records(store)

    # A cohort backfill touches only the cohort's accounts.
    cohort = InProcessStore(max_keys=1_000_000, dedupe_ttl_s=3600, clock=clock)
    await backfill(
        js, Applier(cohort, NAMESPACE, cohort={"acct_000003"}), tenant, config.ai.pipeline
    )
    assert cohort._records
    assert all(":acct_000003:" in k or ":dev:" in k or ":merch:" in k for k in cohort._records)


async def test_an_unreadable_event_is_terminated_and_the_next_one_applied(
    js: JetStreamContext, nats_url: str
) -> None:
    """A message that is not an envelope never becomes one: it is terminated
    at once (not redelivered max_deliver times), and the pipeline goes on."""
    tenant = f"ai{uuid.uuid4().hex[:8]}"
    clock = ManualClock(SystemClock().now_us())
    good = _world(tenant, clock.now_us())[:1]
    garbage = bus.OutgoingEvent(
        f"garbage-{tenant}", bus.subject_for("money.entry.posted", tenant), b"\xff\x00not-proto"
    )
    assert all(await bus.publish_batch(js, [garbage, *good], timeout_s=10))
    durable = f"ai-test-{tenant}"
    config = _config(nats_url, durable)
    store = InProcessStore(max_keys=1_000_000, dedupe_ttl_s=3600, clock=clock)
    pipeline = FeaturePipeline(js, config.ai.pipeline, Applier(store, NAMESPACE), tenant_id=tenant)
    before = UNREADABLE_EVENTS._value.get()
    await pipeline.start()
    try:
        await _wait_drained(js, durable, store, len(_reference(good, clock)._applied), 30)
        info = await js.consumer_info("TRIPLANE_MONEY", f"{durable}-money")
    finally:
        await pipeline.stop()
    assert UNREADABLE_EVENTS._value.get() == before + 1
    # Terminated on its first delivery: nothing left pending or redelivered.
    assert info.num_pending == 0 and info.num_ack_pending == 0 and info.num_redelivered == 0
