"""Tenants on the spine: the registry the money plane writes and the gateway
and the AI plane read (triplane.runtime.tenants), its bounded caches, and the
rule that every subject built from a caller's string is a NATS-safe one.

Against a real nats-server of its own."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from triplane.common.v1 import envelope_pb2
from triplane.money.v1 import money_pb2
from triplane.runtime import bus, tenants
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, TenantDirectoryConfig, load_config
from triplane.runtime.errors import InvalidArgument
from triplane_tools.natsd import EmbeddedNats

CONFIG: Config = load_config(environ={})


@pytest.fixture(scope="module")
def own_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = EmbeddedNats(tmp_path_factory.mktemp("tenants-nats"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
async def js(own_nats: str) -> AsyncIterator[JetStreamContext]:
    client: NatsClient = await nats.connect(own_nats)
    jetstream = client.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await jetstream.delete_stream(tenants.TENANTS_STREAM)
    await bus.ensure_streams(jetstream, CONFIG.nats, [tenants.TENANTS_STREAM])
    yield jetstream
    await client.close()


async def register(js: JetStreamContext, tenant_id: str, name: str = "T") -> None:
    event = tenants.registration(tenant_id, name, 1_790_000_000_000_000)
    assert await bus.publish_batch(js, [event], timeout_s=5) == [True]


def directory(
    js: JetStreamContext,
    clock: ManualClock,
    known_entries: int = 100,
    unknown_ttl_s: float = 1.0,
    unknown_entries: int = 100,
) -> tenants.TenantDirectory:
    config = TenantDirectoryConfig(
        known_entries=known_entries, unknown_ttl_s=unknown_ttl_s, unknown_entries=unknown_entries
    )
    return tenants.TenantDirectory(js, config, clock)


# ------------------------------------------------------------------ registry


async def test_a_registered_tenant_exists_and_an_invented_one_does_not(
    js: JetStreamContext,
) -> None:
    await register(js, "acme", "Acme")
    found = directory(js, ManualClock())
    assert await found.exists("acme")
    assert not await found.exists("globex")
    # What is stored: one message per tenant, the money plane's Tenant record.
    message = await js.get_last_msg(tenants.TENANTS_STREAM, "triplane.tenants.acme.registered")
    assert message.data is not None
    envelope = envelope_pb2.EventEnvelope.FromString(message.data)
    assert (envelope.event_type, envelope.tenant_id) == ("tenants.registered", "acme")
    assert money_pb2.Tenant.FromString(envelope.payload).display_name == "Acme"


async def test_registering_again_keeps_one_message_per_tenant(js: JetStreamContext) -> None:
    for _ in range(3):
        await register(js, "acme")
    info = await js.stream_info(tenants.TENANTS_STREAM, subjects_filter=">")
    assert info.state.subjects == {"triplane.tenants.acme.registered": 1}
    # The registry never ages out (bounded by bytes alone).
    assert info.config.max_age == 0
    assert (info.config.max_bytes or 0) > 0


async def test_an_unknown_tenant_is_remembered_for_the_ttl_only(js: JetStreamContext) -> None:
    clock = ManualClock()
    found = directory(js, clock, unknown_ttl_s=2.0)
    assert not await found.exists("late")
    await register(js, "late")
    # Within the TTL the answer is the remembered one, without a read...
    lookups = found.counters.lookups
    assert not await found.exists("late")
    assert found.counters.lookups == lookups
    # ...and after it the registry is read again.
    clock.advance(2.5)
    assert await found.exists("late")
    assert found.counters.lookups == lookups + 1


async def test_known_tenants_cost_no_read_and_both_caches_are_bounded(
    js: JetStreamContext,
) -> None:
    for name in ("t1", "t2", "t3"):
        await register(js, name)
    found = directory(js, ManualClock(), known_entries=2, unknown_entries=2)
    assert await found.exists("t1") and await found.exists("t2")
    reads = found.counters.lookups
    assert await found.exists("t1")
    assert found.counters.lookups == reads  # answered from memory
    assert await found.exists("t3")  # t2 is the least recently used: dropped
    for name in ("x1", "x2", "x3", "x4"):
        assert not await found.exists(name)
    assert found.cached_entries() == 4  # two known, two unknown, never more
    reads = found.counters.lookups
    assert await found.exists("t2")
    assert found.counters.lookups == reads + 1


@pytest.mark.parametrize("tenant_id", ["", "a.b", "*", ">", "acme.>", "UPPER", "a b", "x" * 64])
async def test_a_malformed_tenant_id_is_simply_unknown(
    js: JetStreamContext, tenant_id: str
) -> None:
    found = directory(js, ManualClock())
    assert not await found.exists(tenant_id)


async def test_no_registry_stream_fails_closed(own_nats: str) -> None:
    client = await nats.connect(own_nats)
    try:
        js = client.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(tenants.TENANTS_STREAM)
        assert not await directory(js, ManualClock()).exists("acme")
    finally:
        await client.close()


# ----------------------------------------------------------------- subjects


@pytest.mark.parametrize(
    ("event_type", "tenant_id"),
    [
        ("money.entry.posted", "acme"),
        ("gateway.behaviour.partner.loyalty_points", "t-1"),
        ("tenants.registered", "a" * 63),
    ],
)
def test_subjects_of_good_parts(event_type: str, tenant_id: str) -> None:
    plane, _, rest = event_type.partition(".")
    assert bus.subject_for(event_type, tenant_id) == f"triplane.{plane}.{tenant_id}.{rest}"


@pytest.mark.parametrize(
    ("event_type", "tenant_id", "field"),
    [
        ("gateway.behaviour.partner.a.b", "acme", ""),  # fine: more tokens are kinds
        ("gateway.behaviour.partner.*", "acme", "event_type"),
        ("gateway.behaviour.partner.>", "acme", "event_type"),
        ("gateway.behaviour.partner. x", "acme", "event_type"),
        ("gateway.behaviour..x", "acme", "event_type"),
        ("gateway.behaviour.partner.Kind", "acme", "event_type"),
        ("gateway", "acme", "event_type"),
        ("elsewhere.entry.posted", "acme", "event_type"),
        ("gateway." + ".".join(["k"] * 8), "acme", "event_type"),
        ("money.entry.posted", "acme.>", "tenant_id"),
        ("money.entry.posted", "*", "tenant_id"),
        ("money.entry.posted", "a b", "tenant_id"),
        ("money.entry.posted", "", "tenant_id"),
    ],
)
def test_subjects_refuse_what_would_escape_their_token(
    event_type: str, tenant_id: str, field: str
) -> None:
    if not field:
        assert bus.subject_for(event_type, tenant_id).startswith("triplane.gateway.acme.")
        return
    with pytest.raises(InvalidArgument) as caught:
        bus.subject_for(event_type, tenant_id)
    assert caught.value.field == field


def test_a_tenant_filter_reads_one_tenant_or_all() -> None:
    assert bus.tenant_filter("money", "acme") == "triplane.money.acme.>"
    assert bus.tenant_filter("gateway") == "triplane.gateway.*.>"
    for bad in ("a.b", "*", ">"):
        with pytest.raises(InvalidArgument):
            bus.tenant_filter("money", bad)
