"""Payout state changes to the partner's webhook.

The money plane writes `money.payout.<state>` on its outbox in the
transaction that moves a payout (a rail's settled, returned or failed come
back there, never through the gateway), and its relay publishes them to the
TRIPLANE_MONEY stream. One durable JetStream consumer, shared by every
gateway replica (`gateway.payout_webhooks.durable_name`: each event goes to
one of them), queues each as a partner webhook; the delivery's dedupe key is
the payout and its state, so a redelivered event, or a state the gateway
queued itself when it created the payout, is queued once.
"""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from gateway.payouts import Payouts
from triplane.common.v1 import envelope_pb2
from triplane.money.v1 import money_pb2
from triplane.runtime.config import PayoutWebhooksConfig
from triplane.runtime.tasks import cancel_and_wait

log = logging.getLogger("gateway.payout_events")

MONEY_STREAM = "TRIPLANE_MONEY"
SUBJECT = "triplane.money.*.payout.>"


def payout_of_event(data: bytes) -> money_pb2.Payout:
    """The payout an outbox event carries (DecodeError when it is not one)."""
    envelope = envelope_pb2.EventEnvelope.FromString(data)
    if envelope.payload_type != money_pb2.PayoutChangedEvent.DESCRIPTOR.full_name:
        raise DecodeError(f"not a payout event: {envelope.payload_type}")
    return money_pb2.PayoutChangedEvent.FromString(envelope.payload).payout


class PayoutWebhookConsumer:
    def __init__(
        self,
        js: JetStreamContext,
        payouts: Payouts,
        config: PayoutWebhooksConfig | None = None,
    ) -> None:
        self._js = js
        self._payouts = payouts
        self._config = config or PayoutWebhooksConfig()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        config = self._config
        sub = await self._js.pull_subscribe(
            SUBJECT,
            durable=config.durable_name,
            stream=MONEY_STREAM,
            config=ConsumerConfig(
                durable_name=config.durable_name,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=config.ack_wait_s,
                max_deliver=config.max_deliver,
            ),
        )
        self._tasks.append(asyncio.create_task(self._run(sub), name="gateway-payout-webhooks"))

    async def handle(self, data: bytes) -> None:
        await self._payouts.notify(payout_of_event(data))

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
                log.warning("payout event fetch failed: %r", error)
                await asyncio.sleep(self._config.fetch_timeout_s)
                continue
            for message in messages:
                try:
                    await self.handle(message.data)
                except DecodeError:
                    await message.term()
                    continue
                except Exception:
                    log.exception("payout webhook not queued; left for redelivery")
                    continue
                await message.ack()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
