"""The feature pipeline makes state only for tenants that exist: events of a
tenant the money plane never registered (triplane.runtime.tenants) are
dropped, counted and acknowledged (not redelivered), against a real JetStream."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from ai_plane.pipeline import Applier, FeaturePipeline
from ai_plane.store.memory import InProcessStore
from triplane.runtime import bus, tenants
from triplane.runtime.clock import ManualClock, SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.errors import InvalidArgument
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
    nc: NatsClient = await bus.connect(config.nats, "ai-unknown-tenant-test")
    jetstream = nc.jetstream()
    await bus.ensure_streams(
        jetstream, config.nats, ["TRIPLANE_MONEY", "TRIPLANE_GATEWAY", tenants.TENANTS_STREAM]
    )
    yield jetstream
    await nc.close()


def _events(tenant: str) -> list[bus.OutgoingEvent]:
    data = synth.generate(synth.SynthConfig(seed=5, tenant_id=tenant, customers=4, days=1))
    found = [synthetic_envelope(event) for event in data.events]
    return [event for event in found if event is not None]


def _store() -> InProcessStore:
    return InProcessStore(max_keys=100_000, dedupe_ttl_s=3600, clock=ManualClock())


async def _drained(js: JetStreamContext, durable: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = [
            await js.consumer_info("TRIPLANE_MONEY", f"{durable}-money"),
            await js.consumer_info("TRIPLANE_GATEWAY", f"{durable}-gateway"),
        ]
        if all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the pipeline did not drain")


async def test_events_of_an_unregistered_tenant_make_no_state(
    js: JetStreamContext, nats_url: str
) -> None:
    known, invented = f"ai{uuid.uuid4().hex[:8]}", f"ai{uuid.uuid4().hex[:8]}"
    registration = tenants.registration(known, "Known", SystemClock().now_us())
    assert await bus.publish_batch(js, [registration], timeout_s=5) == [True]
    config = _config(nats_url, f"ai-unknown-{invented}")
    # A clock that stands still: "unknown" is remembered for the whole test.
    directory = tenants.TenantDirectory(js, config.nats.tenant_directory, ManualClock())

    # The invented tenant's events: all dropped, counted, and acknowledged.
    events = _events(invented)
    assert all(await bus.publish_batch(js, events, timeout_s=10))
    store = _store()
    applier = Applier(store, NAMESPACE, tenants=directory)
    pipeline = FeaturePipeline(js, config.ai.pipeline, applier, tenant_id=invented)
    await pipeline.start()
    try:
        await _drained(js, f"ai-unknown-{invented}")
    finally:
        await pipeline.stop()
    assert applier.unknown_tenant == len(events) > 0
    assert applier.applied == 0 and not store._records and not store._applied
    # One registry read for the whole flood (the rest answered from memory).
    assert directory.counters.lookups == 1

    # The registered tenant's events, through the same directory: applied.
    known_events = _events(known)
    assert all(await bus.publish_batch(js, known_events, timeout_s=10))
    known_store = _store()
    known_applier = Applier(known_store, NAMESPACE, tenants=directory)
    for event in known_events:
        await known_applier.apply(event.data)
    assert known_applier.unknown_tenant == 0 and known_applier.applied > 0
    assert known_store._records


def test_a_pipeline_for_one_tenant_takes_only_a_tenant_id(nats_url: str) -> None:
    config = _config(nats_url, "ai-unknown-filter")
    store = _store()
    for bad in ("a.b", "*", ">", "acme.>"):
        with pytest.raises(InvalidArgument):
            FeaturePipeline(None, config.ai.pipeline, Applier(store, NAMESPACE), tenant_id=bad)  # type: ignore[arg-type]
