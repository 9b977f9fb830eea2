"""Payout state changes to the partner's webhook.

The money plane writes `money.payout.<state>` on its outbox in the
transaction that moves a payout (a rail's settled, returned or failed come
back there, never through the gateway), and its relay publishes them to the
TRIPLANE_MONEY stream. One durable JetStream consumer, shared by every
gateway replica (`gateway.payout_webhooks.durable_name`: each event goes to
one of them), queues each as a partner webhook; the delivery's dedupe key is
the payout and its state, so a redelivered event, or a state the gateway
queued itself when it created the payout, is queued once.

Two more durable consumers, shared the same way:

- Review resolutions (`policy.case.resolved` on the TRIPLANE_POLICY stream,
  `review_durable_name`): a payout's case approved carries the approval's
  decision token, which goes to the money plane's ApprovePayout (the token
  verified there, spent once: pending_review -> approved, and the rail worker
  sends it); declined goes to DeclinePayout (failed, REVIEW_DECLINED, nothing
  posted). Both are idempotent in the money plane, so a redelivered event
  changes nothing; the payout's new state reaches the partner as above.
- Reconciliation breaks (`money.recon.break` on the money stream,
  `break_durable_name`): each new break is queued once (dedupe key: the
  break) as a `recon.break` partner webhook with its class, and how long
  after its detection it was queued is observed
  (triplane_gateway_break_webhook_queued_seconds).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter, Histogram

from gateway.delivery.model import Delivery, DeliveryRecord
from gateway.fields import FieldMap
from gateway.payouts import Payouts, Webhooks
from triplane.common.v1 import envelope_pb2
from triplane.money.v1 import money_pb2, recon_pb2
from triplane.policy.v1 import policy_pb2
from triplane.runtime.clock import Clock
from triplane.runtime.config import PayoutWebhooksConfig
from triplane.runtime.errors import Code, TriplaneError
from triplane.runtime.tasks import cancel_and_wait

log = logging.getLogger("gateway.payout_events")

MONEY_STREAM = "TRIPLANE_MONEY"
POLICY_STREAM = "TRIPLANE_POLICY"
SUBJECT = "triplane.money.*.payout.>"
CASE_RESOLVED_SUBJECT = "triplane.policy.*.case.resolved"
BREAK_SUBJECT = "triplane.money.*.recon.break"
# The money plane's refusals that another delivery of the event would meet
# again (the payout is not held for review, the token is not its own): the
# event is acknowledged, and the refusal logged.
_FINAL = frozenset(
    {Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT}
)
_REVIEW_FIELDS = FieldMap(
    {"idempotency_key": "idempotency_key", "decision_token": "decision_token"}
)

PAYOUT_REVIEWS = Counter(
    "triplane_gateway_payout_reviews",
    "Payout review resolutions handed to the money plane, by resolution (approve, decline) and "
    "result (applied, replayed; refused: the money plane's final refusal, e.g. an expired "
    "approval token, the payout left as it was)",
    ["resolution", "result"],
)
BREAK_WEBHOOK_QUEUED = Histogram(
    "triplane_gateway_break_webhook_queued_seconds",
    "From a reconciliation break's detection (detected_at) to its partner webhook queued",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)


class BreakDeliveries(Protocol):
    async def enqueue(self, delivery: Delivery) -> DeliveryRecord: ...


def payout_of_event(data: bytes) -> money_pb2.Payout:
    """The payout an outbox event carries (DecodeError when it is not one)."""
    envelope = envelope_pb2.EventEnvelope.FromString(data)
    if envelope.payload_type != money_pb2.PayoutChangedEvent.DESCRIPTOR.full_name:
        raise DecodeError(f"not a payout event: {envelope.payload_type}")
    return money_pb2.PayoutChangedEvent.FromString(envelope.payload).payout


def case_resolved_of_event(data: bytes) -> tuple[str, policy_pb2.CaseResolved]:
    """The tenant and the resolution an outbox event carries (DecodeError
    when it is not one)."""
    envelope = envelope_pb2.EventEnvelope.FromString(data)
    if envelope.payload_type != policy_pb2.CaseResolved.DESCRIPTOR.full_name:
        raise DecodeError(f"not a case resolution: {envelope.payload_type}")
    return envelope.tenant_id, policy_pb2.CaseResolved.FromString(envelope.payload)


def break_of_event(data: bytes) -> tuple[str, recon_pb2.ReconBreak]:
    """The tenant and the break an outbox event carries (DecodeError when
    it is not one)."""
    envelope = envelope_pb2.EventEnvelope.FromString(data)
    if envelope.payload_type != recon_pb2.ReconBreakDetectedEvent.DESCRIPTOR.full_name:
        raise DecodeError(f"not a reconciliation break: {envelope.payload_type}")
    event = recon_pb2.ReconBreakDetectedEvent.FromString(envelope.payload)
    return envelope.tenant_id, event.recon_break


def break_webhook_payload(value: recon_pb2.ReconBreak) -> dict[str, object]:
    """What the partner's webhook says of a break: its class, amount and
    where; not the statement line (a bank's free text may name people)."""
    return {
        "break_id": value.break_id,
        "break_class": value.break_class,
        "state": value.state,
        "amount_minor": value.amount.amount_minor,
        "currency": value.amount.currency,
        "direction": value.direction,
        "ledger_account_id": value.ledger_account_id,
        "expected_id": value.expected_id,
        "statement_id": value.statement_id,
        "detected_at_us": value.detected_at.ToMicroseconds(),
    }


class DurableEventConsumer:
    """One durable pull consumer of a stream's subject, shared by every
    gateway replica: each event is handled by one of them and acknowledged
    once handled; one that is not an event of its kind is terminated; a
    failed handling is left for redelivery (after ack_wait_s)."""

    def __init__(
        self,
        js: JetStreamContext,
        config: PayoutWebhooksConfig,
        stream: str,
        subject: str,
        durable_name: str,
    ) -> None:
        self._js = js
        self._config = config
        self._stream = stream
        self._subject = subject
        self._durable = durable_name
        self._tasks: list[asyncio.Task[None]] = []

    async def handle(self, data: bytes) -> None:
        """One event's data (DecodeError: not an event of this kind)."""
        raise NotImplementedError

    async def start(self) -> None:
        config = self._config
        sub = await self._js.pull_subscribe(
            self._subject,
            durable=self._durable,
            stream=self._stream,
            config=ConsumerConfig(
                durable_name=self._durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=config.ack_wait_s,
                max_deliver=config.max_deliver,
            ),
        )
        self._tasks.append(asyncio.create_task(self._run(sub), name=f"gateway-{self._durable}"))

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
                log.warning("%s: fetch failed: %r", self._durable, error)
                await asyncio.sleep(self._config.fetch_timeout_s)
                continue
            for message in messages:
                try:
                    await self.handle(message.data)
                except DecodeError:
                    await message.term()
                    continue
                except Exception:
                    log.exception("%s: event not handled; left for redelivery", self._durable)
                    continue
                await message.ack()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()


class PayoutWebhookConsumer(DurableEventConsumer):
    def __init__(
        self,
        js: JetStreamContext,
        payouts: Payouts,
        config: PayoutWebhooksConfig | None = None,
    ) -> None:
        config = config or PayoutWebhooksConfig()
        super().__init__(js, config, MONEY_STREAM, SUBJECT, config.durable_name)
        self._payouts = payouts

    async def handle(self, data: bytes) -> None:
        await self._payouts.notify(payout_of_event(data))


class PayoutReviewConsumer(DurableEventConsumer):
    """A payout's review case resolved -> the money plane's ApprovePayout
    (with the approval's token) or DeclinePayout; other movements' cases
    are not the gateway's to act on."""

    def __init__(
        self,
        js: JetStreamContext,
        payouts: Payouts,
        config: PayoutWebhooksConfig | None = None,
    ) -> None:
        config = config or PayoutWebhooksConfig()
        super().__init__(
            js,
            config,
            POLICY_STREAM,
            CASE_RESOLVED_SUBJECT,
            config.review_durable_name,
        )
        self._payouts = payouts

    async def handle(self, data: bytes) -> None:
        tenant_id, event = case_resolved_of_event(data)
        if event.movement != policy_pb2.MONEY_MOVEMENT_PAYOUT:
            return
        case = event.case
        request: money_pb2.ApprovePayoutRequest | money_pb2.DeclinePayoutRequest
        if case.resolution == policy_pb2.RESOLUTION_APPROVE:
            method = "ApprovePayout"
            request = money_pb2.ApprovePayoutRequest(
                tenant_id=tenant_id,
                idempotency_key=event.idempotency_key,
                decision_token=event.decision_token,
            )
        elif case.resolution == policy_pb2.RESOLUTION_DECLINE:
            method = "DeclinePayout"
            request = money_pb2.DeclinePayoutRequest(
                tenant_id=tenant_id, idempotency_key=event.idempotency_key, case_id=case.case_id
            )
        else:
            raise DecodeError(f"case {case.case_id} resolved without a resolution")
        resolution = "approve" if method == "ApprovePayout" else "decline"
        core = self._payouts.core
        try:
            answer = await self._payouts.money.call(
                method, request, core.config.budgets.money_budget_ms / 1000, _REVIEW_FIELDS
            )
        except TriplaneError as error:
            if error.code not in _FINAL:
                raise
            PAYOUT_REVIEWS.labels(resolution, "refused").inc()
            log.warning(
                "%s of the payout under case %s refused: %s (%s)",
                method,
                case.case_id,
                error.reason,
                error.field,
            )
            return
        assert isinstance(answer, money_pb2.ApprovePayoutResponse | money_pb2.DeclinePayoutResponse)
        PAYOUT_REVIEWS.labels(resolution, "replayed" if answer.replayed else "applied").inc()


class BreakWebhookConsumer(DurableEventConsumer):
    """New reconciliation breaks -> the tenant's partner webhook, once each."""

    def __init__(
        self,
        js: JetStreamContext,
        webhooks: Webhooks,
        deliveries: BreakDeliveries,
        clock: Clock,
        config: PayoutWebhooksConfig | None = None,
    ) -> None:
        config = config or PayoutWebhooksConfig()
        super().__init__(js, config, MONEY_STREAM, BREAK_SUBJECT, config.break_durable_name)
        self._webhooks = webhooks
        self._deliveries = deliveries
        self._clock = clock

    async def handle(self, data: bytes) -> None:
        tenant_id, found = break_of_event(data)
        endpoint = self._webhooks.endpoint(tenant_id, "", "partner_webhook")
        if not endpoint:
            return
        before_us = self._clock.now_us()
        try:
            queued = await self._deliveries.enqueue(
                Delivery(
                    tenant_id=tenant_id,
                    channel="partner_webhook",
                    endpoint=endpoint,
                    event_type="recon.break",
                    payload=break_webhook_payload(found),
                    dedupe_key=f"recon.break:{found.break_id}",
                )
            )
        except TriplaneError as error:
            if error.code != Code.RESOURCE_EXHAUSTED:
                raise
            log.warning("break webhook not queued: %s", error.reason)
            return
        if queued.created_at_us >= before_us:  # queued by this call, not a redelivery's
            detected_us = found.detected_at.ToMicroseconds()
            BREAK_WEBHOOK_QUEUED.observe(max(0, queued.created_at_us - detected_us) / 1_000_000)
