"""The money plane registers every tenant it creates on the spine's tenant
registry (triplane.runtime.tenants), through its outbox, in the tenant's own
transaction: what the gateway and the AI plane read to accept events only for
tenants that exist."""

from __future__ import annotations

import pytest
from money_helpers import Kit

from triplane.common.v1 import envelope_pb2
from triplane.money.v1 import money_pb2
from triplane.runtime import bus, tenants
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import load_config
from triplane.runtime.errors import AlreadyExists

pytestmark = pytest.mark.nats


def registrations(kit: Kit, tenant_id: str) -> list[tuple[str, bytes]]:
    rows = kit.probe.rows(
        "SELECT event_id, data FROM outbox WHERE subject = %s ORDER BY order_us, order_pos",
        [f"triplane.tenants.{tenant_id}.registered"],
    )
    return [(str(event_id), bytes(data)) for event_id, data in rows]


async def test_create_tenant_registers_it_in_its_own_transaction(kit: Kit) -> None:
    # The kit's tenant was created by the fixture: registered once.
    (found,) = registrations(kit, kit.tenant)
    envelope = envelope_pb2.EventEnvelope.FromString(found[1])
    assert (envelope.event_type, envelope.tenant_id) == ("tenants.registered", kit.tenant)
    assert money_pb2.Tenant.FromString(envelope.payload).display_name == "Test tenant"
    # Creating it again (idempotent) registers it again: how a tenant made
    # before the registry gets into it.
    await kit.ledger.create_tenant(kit.tenant, "Test tenant")
    assert len(registrations(kit, kit.tenant)) == 2
    # A refused call registers nothing.
    with pytest.raises(AlreadyExists):
        await kit.ledger.create_tenant(kit.tenant, "Another name")
    assert len(registrations(kit, kit.tenant)) == 2


async def test_the_registration_makes_the_tenant_known_on_the_spine(
    kit: Kit, nats_url: str
) -> None:
    config = load_config(environ={}, overrides={"nats": {"url": nats_url}})
    client = await bus.connect(config.nats, "money-tenant-registry-test")
    try:
        js = client.jetstream()
        await bus.ensure_streams(js, config.nats, [tenants.TENANTS_STREAM])
        directory = tenants.TenantDirectory(js, config.nats.tenant_directory, ManualClock())
        assert not await directory.exists(kit.tenant)
        # What the relay does with the outbox row.
        (found,) = registrations(kit, kit.tenant)
        event = bus.OutgoingEvent(found[0], f"triplane.tenants.{kit.tenant}.registered", found[1])
        assert await bus.publish_batch(js, [event], timeout_s=5) == [True]
        fresh = tenants.TenantDirectory(js, config.nats.tenant_directory, ManualClock())
        assert await fresh.exists(kit.tenant)
    finally:
        await client.close()
