"""The tenant registry on the spine: which tenants exist, for the planes that
do not create them.

The money plane creates tenants (the ledger is their system of record). Its
CreateTenant writes a registration into its outbox in the same transaction
as the tenant's row, and the outbox relay publishes it on the registry stream
(TRIPLANE_TENANTS, subject `triplane.tenants.<tenant_id>.registered`, one
message kept per subject, no age limit, bounded in bytes). A tenant is
therefore registered exactly when it exists, and stays registered; a tenant
made before this registry is registered by calling CreateTenant again (it is
idempotent, and every call registers).

The gateway (IngestEvents refuses an unknown tenant) and the AI plane (its
feature pipeline drops events of unknown tenants instead of creating state
for them) ask `TenantDirectory.exists`. A tenant seen once is remembered (a
bounded LRU: tenants are never deleted), so the hot path costs a dict lookup;
a tenant not yet seen costs one JetStream read of the last message of its
subject. "No such tenant" is remembered for a short time, so a flood of
events for invented tenants costs one read per tenant per `unknown_ttl_s`,
and a tenant created a moment ago is visible after at most that long (plus
the money plane's relay delay, normally tens of milliseconds).

Why not learn tenants from the events themselves (account.opened on the money
stream): a set learned by one consumer lives in its process (lost on restart,
while the durable consumer resumes past the events that taught it) and races
the other stream; and a configured allow-list would need every replica's
config changed at every onboarding.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext

from triplane.money.v1 import money_pb2
from triplane.runtime import bus
from triplane.runtime.clock import Clock
from triplane.runtime.config import TenantDirectoryConfig
from triplane.runtime.errors import InvalidArgument

TENANTS_STREAM = "TRIPLANE_TENANTS"
REGISTERED = "tenants.registered"


def registration(tenant_id: str, display_name: str, created_at_us: int) -> bus.OutgoingEvent:
    """The registry's message for a tenant (written by the money plane's outbox)."""
    envelope = bus.make_envelope(
        event_type=REGISTERED,
        tenant_id=tenant_id,
        payload=money_pb2.Tenant(tenant_id=tenant_id, display_name=display_name),
        occurred_at_us=created_at_us,
        # A fresh id each time: every CreateTenant registers (again), and the
        # stream keeps one message per subject whatever the ids.
        event_id=uuid.uuid4().hex,
    )
    return bus.OutgoingEvent(
        envelope.event_id, bus.subject_for(REGISTERED, tenant_id), envelope.SerializeToString()
    )


@dataclass
class DirectoryCounters:
    lookups: int = 0
    unknown: int = 0


class TenantDirectory:
    """Answers "does this tenant exist" from the registry stream, cached."""

    def __init__(self, js: JetStreamContext, config: TenantDirectoryConfig, clock: Clock) -> None:
        self._js = js
        self._config = config
        self._clock = clock
        self._unknown_ttl_us = int(config.unknown_ttl_s * 1_000_000)
        self._known: OrderedDict[str, None] = OrderedDict()
        # Tenant -> the time (us) until which it is taken as unknown.
        self._unknown: OrderedDict[str, int] = OrderedDict()
        self.counters = DirectoryCounters()

    async def exists(self, tenant_id: str, timeout_s: float | None = None) -> bool:
        """True when the money plane registered `tenant_id`. A tenant id that
        is not a tenant id at all is simply unknown. A registry read waits at
        most `timeout_s` (the JetStream context's own timeout when None);
        errors reading it (NATS unreachable, TimeoutError) propagate: the
        caller fails closed."""
        known = self._known
        if tenant_id in known:
            known.move_to_end(tenant_id)
            return True
        now_us = self._clock.now_us()
        until_us = self._unknown.get(tenant_id)
        if until_us is not None and until_us > now_us:
            return False
        self.counters.lookups += 1
        try:
            subject = bus.subject_for(REGISTERED, tenant_id)
            await asyncio.wait_for(self._js.get_last_msg(TENANTS_STREAM, subject), timeout_s)
        except (nats.js.errors.NotFoundError, InvalidArgument):
            self.counters.unknown += 1
            self._remember_unknown(tenant_id, now_us)
            return False
        self._remember_known(tenant_id)
        return True

    def _remember_known(self, tenant_id: str) -> None:
        self._unknown.pop(tenant_id, None)
        self._known[tenant_id] = None
        while len(self._known) > self._config.known_entries:
            self._known.popitem(last=False)

    def _remember_unknown(self, tenant_id: str, now_us: int) -> None:
        unknown = self._unknown
        unknown[tenant_id] = now_us + self._unknown_ttl_us
        unknown.move_to_end(tenant_id)
        while len(unknown) > self._config.unknown_entries:
            unknown.popitem(last=False)

    def cached_entries(self) -> int:
        return len(self._known) + len(self._unknown)
