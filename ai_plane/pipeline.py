"""The feature pipeline: NATS JetStream events in, online store updates out.

Sources: ledger events from the money plane's outbox
(`triplane.money.<tenant>.entry.posted`) and behavioural events from the
gateway (`triplane.gateway.<tenant>.behaviour.<kind>`, payload
`triplane.ai.v1.BehaviourEvent`); offer outcomes
(`triplane.gateway.<tenant>.offer.outcome`) go to the bandit.

Durable pull consumers resume where they left off after a restart. Delivery is
at least once, so every update is idempotent: each activity carries a dedupe
id derived from the envelope's event_id, and the store applies an id once.

`backfill` rebuilds one tenant (or an account cohort) from the streams'
history into any store with an ephemeral consumer; because increments are
sums and every event is applied once, the rebuilt store equals the live one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter

from ai_plane.features import Activity, ActivityKind, updates_for
from ai_plane.store.base import FeatureStore
from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import envelope_pb2
from triplane.money.v1 import money_pb2
from triplane.runtime import bus
from triplane.runtime import codec as wire
from triplane.runtime.config import AiPipelineConfig
from triplane.runtime.ids import check_tenant_id
from triplane.runtime.tasks import cancel_and_wait
from triplane.runtime.tenants import TenantDirectory

log = logging.getLogger("triplane.ai.pipeline")

MONEY_STREAM, GATEWAY_STREAM = "TRIPLANE_MONEY", "TRIPLANE_GATEWAY"
ENTRY_POSTED = "money.entry.posted"
OUTCOME = "gateway.offer.outcome"
_PAYMENT_KINDS = {
    money_pb2.TRANSFER_KIND_TRANSFER,
    money_pb2.TRANSFER_KIND_AUTHORIZE,
    money_pb2.TRANSFER_KIND_PAYOUT,
}
_BEHAVIOUR_KIND: dict[int, ActivityKind] = {
    ai_pb2.BEHAVIOUR_KIND_PAYMENT_DECLINED: ActivityKind.DECLINED,
    ai_pb2.BEHAVIOUR_KIND_PAYMENT_RETRIED: ActivityKind.RETRIED,
    ai_pb2.BEHAVIOUR_KIND_KYC_FAILED: ActivityKind.KYC_FAILED,
    ai_pb2.BEHAVIOUR_KIND_REPAYMENT_MADE: ActivityKind.REPAYMENT_MADE,
    ai_pb2.BEHAVIOUR_KIND_REPAYMENT_MISSED: ActivityKind.REPAYMENT_MISSED,
}


def _occurred_us(envelope: envelope_pb2.EventEnvelope) -> int:
    return wire.micros(envelope.occurred_at, "occurred_at")


def _entry_activities(envelope: envelope_pb2.EventEnvelope) -> list[Activity]:
    event = money_pb2.EntryPostedEvent.FromString(envelope.payload)
    entry = event.entry
    if entry.kind not in _PAYMENT_KINDS:
        return []
    at_us = _occurred_us(envelope)
    credits = [p.account_id for p in entry.postings if p.side == money_pb2.POSTING_SIDE_CREDIT]
    merchant = entry.metadata.get("merchant_id") or (credits[0] if credits else "")
    out: list[Activity] = []
    for i, posting in enumerate(entry.postings):
        debit = posting.side == money_pb2.POSTING_SIDE_DEBIT
        out.append(
            Activity(
                event_id=f"{envelope.event_id}:{i}",
                tenant_id=envelope.tenant_id,
                kind=ActivityKind.PAYMENT if debit else ActivityKind.INFLOW,
                account_id=posting.account_id,
                occurred_at_us=at_us,
                amount_minor=posting.amount.amount_minor,
                device_id=entry.metadata.get("device_id", "") if debit else "",
                merchant_id=merchant if debit else "",
            )
        )
    return out


def _behaviour_activities(envelope: envelope_pb2.EventEnvelope) -> list[Activity]:
    event = ai_pb2.BehaviourEvent.FromString(envelope.payload)
    kind = _BEHAVIOUR_KIND.get(event.kind, ActivityKind.OTHER)
    if kind is ActivityKind.OTHER:
        return []
    return [
        Activity(
            event_id=envelope.event_id,
            tenant_id=envelope.tenant_id,
            kind=kind,
            account_id=event.account_id or envelope.account_id,
            occurred_at_us=_occurred_us(envelope),
            amount_minor=event.amount.amount_minor,
            device_id=event.device_id,
            merchant_id=event.merchant_id,
        )
    ]


def activities_of(envelope: envelope_pb2.EventEnvelope) -> list[Activity]:
    """The feature-relevant facts in one envelope (none for other events)."""
    if envelope.payload_type == "triplane.money.v1.EntryPostedEvent":
        return _entry_activities(envelope)
    if envelope.payload_type == "triplane.ai.v1.BehaviourEvent":
        return _behaviour_activities(envelope)
    return []


OutcomeHandler = Callable[[envelope_pb2.EventEnvelope, ai_pb2.OfferOutcomeEvent], Awaitable[None]]


# Events dropped because their tenant is not registered (an invented or a
# misrouted tenant): counted, never applied.
UNREADABLE_EVENTS = Counter(
    "triplane_ai_events_unreadable_total",
    "Spine events the feature pipeline could not decode (terminated, not redelivered)",
)
UNKNOWN_TENANT_EVENTS = Counter(
    "triplane_ai_events_unknown_tenant_total",
    "Events the feature pipeline dropped because their tenant does not exist",
)


@dataclass
class Applier:
    """Applies envelopes to a store, optionally only for an account cohort.

    With a tenant directory, an event whose tenant the money plane never
    registered is dropped and counted (`unknown_tenant`) before it can make
    any state (features, dedupe ids, bandit updates): publishing on the spine
    for a made-up tenant costs the plane nothing but the lookup."""

    store: FeatureStore
    namespace: str
    cohort: Collection[str] | None = None
    on_outcome: OutcomeHandler | None = None
    tenants: TenantDirectory | None = None
    applied: int = 0
    duplicates: int = 0
    unknown_tenant: int = 0

    async def apply(self, data: bytes) -> None:
        envelope = envelope_pb2.EventEnvelope.FromString(data)
        if self.tenants is not None and not await self.tenants.exists(envelope.tenant_id):
            self.unknown_tenant += 1
            UNKNOWN_TENANT_EVENTS.inc()
            log.debug("event %s of unknown tenant dropped", envelope.event_id)
            return
        if envelope.payload_type == "triplane.ai.v1.OfferOutcomeEvent":
            if self.on_outcome is not None:
                await self.on_outcome(
                    envelope, ai_pb2.OfferOutcomeEvent.FromString(envelope.payload)
                )
            return
        for activity in activities_of(envelope):
            if self.cohort is not None and activity.account_id not in self.cohort:
                continue
            if await self.store.apply(activity.event_id, updates_for(activity, self.namespace)):
                self.applied += 1
            else:
                self.duplicates += 1


class FeaturePipeline:
    """Durable pull consumers on the money and gateway streams."""

    def __init__(
        self, js: JetStreamContext, config: AiPipelineConfig, applier: Applier, tenant_id: str = ""
    ) -> None:
        self._js = js
        self._config = config
        self.applier = applier
        # Empty: every tenant (the plane); one tenant: tests and per-tenant
        # workers (a token of the subject filter, so checked: `a.b` or `*`
        # would read other tenants' events).
        self._subjects = (
            bus.tenant_filter("money", tenant_id),
            bus.tenant_filter("gateway", tenant_id),
        )
        self._tasks: list[asyncio.Task[None]] = []

    def _consumer(self, suffix: str) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=f"{self._config.durable_name}-{suffix}",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self._config.ack_wait_s,
            max_deliver=self._config.max_deliver,
            max_ack_pending=self._config.batch_size * 4,
        )

    async def start(self) -> None:
        sources = (
            (MONEY_STREAM, self._subjects[0], "money"),
            (GATEWAY_STREAM, self._subjects[1], "gateway"),
        )
        for stream, subject, suffix in sources:
            sub = await self._js.pull_subscribe(
                subject,
                durable=f"{self._config.durable_name}-{suffix}",
                stream=stream,
                config=self._consumer(suffix),
            )
            self._tasks.append(asyncio.create_task(self._run(sub), name=f"ai-pipeline-{suffix}"))

    async def _run(self, sub: JetStreamContext.PullSubscription) -> None:
        while True:
            try:
                messages = await sub.fetch(
                    self._config.batch_size, timeout=self._config.fetch_timeout_s
                )
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("feature pipeline fetch failed: %r", error)
                await asyncio.sleep(self._config.fetch_timeout_s)
                continue
            for message in messages:
                try:
                    await self.applier.apply(message.data)
                except DecodeError:
                    # A message that cannot be read now never will be: end its
                    # redeliveries (term) instead of retrying it max_deliver
                    # times, each logging a traceback.
                    UNREADABLE_EVENTS.inc()
                    log.warning(
                        "unreadable event on %s (sequence %s) terminated",
                        message.subject,
                        message.metadata.sequence.stream,
                    )
                    await message.term()
                    continue
                except Exception:
                    # Not acked: JetStream redelivers (up to max_deliver times).
                    log.exception("feature update failed; leaving it for redelivery")
                    continue
                await message.ack()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()


async def backfill(
    js: JetStreamContext,
    applier: Applier,
    tenant_id: str,
    config: AiPipelineConfig,
) -> int:
    """Replays one tenant's history from both streams into `applier`'s store
    with ephemeral consumers; returns the number of messages read."""
    # The tenant is a token of the subject filter: `a.b` or `*` would read
    # other tenants' history into this one's features.
    check_tenant_id(tenant_id, "tenant")
    read = 0
    for stream, plane in ((MONEY_STREAM, "money"), (GATEWAY_STREAM, "gateway")):
        subject = bus.tenant_filter(plane, tenant_id)
        try:
            info = await js.stream_info(stream)
        except Exception:
            continue
        if info.state.messages == 0:
            continue
        sub = await js.pull_subscribe(
            subject,
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.ALL,
                inactive_threshold=60.0,
            ),
        )
        try:
            read += await _drain(sub, applier, config, config.backfill_max_events - read)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    return read


async def _drain(
    sub: JetStreamContext.PullSubscription, applier: Applier, config: AiPipelineConfig, limit: int
) -> int:
    read = 0
    while read < limit:
        info = await sub.consumer_info()
        pending = int(info.num_pending or 0)
        if pending == 0:
            break
        batch = min(config.backfill_batch_size, limit - read, pending)
        try:
            messages = await sub.fetch(batch, timeout=config.fetch_timeout_s)
        except TimeoutError:
            continue
        for message in messages:
            await applier.apply(message.data)
        read += len(messages)
    return read
