"""DeliveryWorker: enqueue, the loop that sends due deliveries, the
dead-letter queue and redelivery.

Retries follow the runtime's one retry policy (`gateway.delivery.retry`:
exponential backoff with jitter, then the dead-letter queue) to pick each next
attempt time, and the schedule is kept in the database rather than in a
sleeping coroutine, so a restart loses neither the message nor its place in
the backoff. A delivery counts as delivered only on a 2xx answer.

Each endpoint has a circuit breaker: after `circuit_failures` consecutive
endpoint failures (no answer, a timeout, 5xx or 429) it opens for
`circuit_open_s`, and deliveries due for it meanwhile are put back without
spending an attempt, so an endpoint that is down for an hour is not hammered
and its messages do not burn their attempt budget into the dead-letter queue.
Then one delivery probes it (half-open): success closes the circuit, failure
opens it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec
from prometheus_client import Counter

from gateway.codec import DEAD_LETTERS_PAGE
from gateway.delivery.adapters import ChannelAdapter
from gateway.delivery.model import (
    STATUSES,
    Delivery,
    DeliveryRecord,
    SendOutcome,
    delivery_id_for,
    encode_body,
    validate,
)
from gateway.delivery.store import DeliveryStore, EndpointSummary
from triplane.runtime import codec as wire
from triplane.runtime.clock import Clock
from triplane.runtime.config import DeliveryConfig
from triplane.runtime.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = logging.getLogger("gateway.delivery")
# The operators' list of deliveries (DeliveryAdminService.ListDeliveries),
# resumed after a (created_at_us, delivery_id) pair.
DELIVERIES_PAGE = "gateway.deliveries"

DELIVERY_ATTEMPTS = Counter(
    "triplane_gateway_delivery_attempts",
    "Delivery attempts by channel and result (delivered, retry, dead; deferred: not sent, "
    "the endpoint's circuit is open).",
    ["channel", "result"],
)


@dataclass
class _Circuit:
    failures: int = 0
    open_until_us: int = 0
    # When the half-open probe was sent (0: none in flight). A probe older
    # than the lease is forgotten, so a cancelled one cannot wedge the circuit.
    probe_at_us: int = 0


def _endpoint_failed(outcome: SendOutcome) -> bool:
    """Failures that say the endpoint is unwell, not that one message is bad."""
    return outcome.status_code == 0 or outcome.status_code >= 500 or outcome.status_code == 429


class DeliveryWorker:
    def __init__(
        self,
        store: DeliveryStore,
        config: DeliveryConfig,
        clock: Clock,
        adapters: Mapping[str, ChannelAdapter],
    ) -> None:
        assert not config.retry.until_cancelled, "a failing delivery must reach the dead letters"
        assert config.batch_size >= 1 and config.max_in_flight >= 1
        assert config.lease_s > config.request_timeout_s, "a live send must never lose its lease"
        self.store = store
        self._config = config
        self._clock = clock
        self._adapters = dict(adapters)
        self._channels = tuple(sorted(self._adapters))
        self._retry = config.retry
        self._in_flight = asyncio.Semaphore(config.max_in_flight)
        self._wakeup = asyncio.Event()
        self._circuits: dict[str, _Circuit] = {}

    # ---- the API ----

    async def enqueue(self, delivery: Delivery) -> DeliveryRecord:
        """Queues `delivery` once per (tenant, dedupe_key); a retry returns the
        stored record, a different message under the same key is refused."""
        validate(delivery, self._channels, self._config.max_payload_bytes)
        now_us = self._clock.now_us()
        record = DeliveryRecord(
            delivery_id=delivery_id_for(delivery.tenant_id, delivery.dedupe_key),
            tenant_id=delivery.tenant_id,
            dedupe_key=delivery.dedupe_key,
            channel=delivery.channel,
            endpoint=delivery.endpoint,
            event_type=delivery.event_type,
            body=encode_body(delivery, delivery.send_at_us or now_us),
            status="pending",
            attempts=0,
            next_attempt_at_us=max(now_us, delivery.send_at_us),
            created_at_us=now_us,
            send_at_us=delivery.send_at_us,
        )
        full = await asyncio.to_thread(self.store.in_queue) >= self._config.max_pending
        if full:
            # A retry of a message already queued still gets its answer.
            known = await asyncio.to_thread(self.store.get, record.tenant_id, record.delivery_id)
            full = known is None
        if full:
            raise ResourceExhausted(
                "DELIVERY_QUEUE_FULL",
                f"{self._config.max_pending} deliveries already queued",
                "gateway.delivery.max_pending",
            )
        stored, existing = await asyncio.to_thread(self.store.insert, record)
        if existing:
            _same_or_refuse(record, stored)
        else:
            self._wakeup.set()
        return stored

    async def get(self, tenant_id: str, delivery_id: str) -> DeliveryRecord:
        record = await asyncio.to_thread(self.store.get, tenant_id, delivery_id)
        if record is None:
            raise NotFound("DELIVERY_NOT_FOUND", f"no delivery {delivery_id!r}", "delivery_id")
        return record

    async def list_dead_letters(
        self, tenant_id: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[DeliveryRecord], str]:
        """One page of the tenant's dead letters, oldest first, and the next token."""
        config = self._config
        size = wire.page_size(page_size, config.default_page_size, config.max_page_size)
        position = wire.decode_page_token(page_token, DEAD_LETTERS_PAGE, (int, str))
        after_us, after_id = (int(position[0]), str(position[1])) if position else (-1, "")
        rows = await asyncio.to_thread(
            self.store.dead_letters, tenant_id, after_us, after_id, size + 1
        )
        page = rows[:size]
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = wire.encode_page_token(
                DEAD_LETTERS_PAGE, (last.dead_at_us, last.delivery_id)
            )
        return page, next_token

    async def list_deliveries(
        self,
        tenant_id: str,
        status: str = "",
        endpoint: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[DeliveryRecord], str]:
        """One page of the tenant's deliveries, newest first, and the next token."""
        if status and status not in STATUSES:
            raise InvalidArgument(
                "STATUS_INVALID", f"status must be one of {', '.join(STATUSES)}", "status"
            )
        config = self._config
        size = wire.page_size(page_size, config.default_page_size, config.max_page_size)
        position = wire.decode_page_token(page_token, DELIVERIES_PAGE, (int, str))
        before_us, before_id = (int(position[0]), str(position[1])) if position else (-1, "")
        rows = await asyncio.to_thread(
            self.store.deliveries, tenant_id, status, endpoint, before_us, before_id, size + 1
        )
        page = rows[:size]
        next_token = ""
        if len(rows) > size:
            last = page[-1]
            next_token = wire.encode_page_token(
                DELIVERIES_PAGE, (last.created_at_us, last.delivery_id)
            )
        return page, next_token

    async def endpoints(self, tenant_id: str) -> list[EndpointSummary]:
        return await asyncio.to_thread(self.store.endpoints, tenant_id)

    async def redeliver(self, tenant_id: str, delivery_id: str) -> DeliveryRecord:
        """Puts a dead letter back in the queue, due now, with a fresh attempt budget
        (a retry while it is still queued changes nothing)."""
        revived = await asyncio.to_thread(
            self.store.revive, tenant_id, delivery_id, self._clock.now_us()
        )
        record = await self.get(tenant_id, delivery_id)
        if not revived and record.status != "pending":
            raise FailedPrecondition(
                "DELIVERY_NOT_DEAD",
                f"delivery {delivery_id!r} is {record.status}, not dead",
                "delivery_id",
            )
        self._wakeup.set()
        return record

    async def counts(self, tenant_id: str = "") -> dict[str, int]:
        return await asyncio.to_thread(self.store.counts, tenant_id)

    # ---- the worker ----

    async def run_once(self) -> int:
        """Claims one batch of due deliveries and attempts each; returns how many."""
        lease_us = int(self._config.lease_s * 1_000_000)
        claimed = await asyncio.to_thread(
            self.store.claim_due, self._clock.now_us(), lease_us, self._config.batch_size
        )
        if claimed:
            await asyncio.gather(*(self._attempt(record) for record in claimed))
        return len(claimed)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Sends due deliveries until `stop` is set (or the task is cancelled)."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                handled = await self.run_once()
            except Exception:
                log.exception("delivery pass failed; retrying")
                handled = 0
            if handled >= self._config.batch_size:
                continue
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(self._wakeup, stop), self._config.poll_interval_s)

    async def aclose(self) -> None:
        for adapter in self._adapters.values():
            await adapter.aclose()

    def circuit_open(self, endpoint: str) -> bool:
        circuit = self._circuits.get(endpoint)
        threshold = self._config.circuit_failures
        return bool(circuit and threshold and circuit.failures >= threshold)

    def _admit(self, endpoint: str, now_us: int) -> int:
        """0 when a delivery to `endpoint` may be sent now; else when to try again."""
        circuit = self._circuits.get(endpoint)
        if circuit is None or not self.circuit_open(endpoint):
            return 0
        if now_us < circuit.open_until_us:
            return circuit.open_until_us
        lease_us = int(self._config.lease_s * 1_000_000)
        if circuit.probe_at_us and now_us - circuit.probe_at_us < lease_us:
            return now_us + int(self._config.poll_interval_s * 1_000_000) + 1
        circuit.probe_at_us = now_us
        return 0

    def _observe(self, endpoint: str, outcome: SendOutcome, now_us: int) -> None:
        circuit = self._circuits.setdefault(endpoint, _Circuit())
        circuit.probe_at_us = 0
        if outcome.delivered or not _endpoint_failed(outcome):
            if circuit.failures or circuit.open_until_us:
                self._circuits.pop(endpoint, None)
            return
        circuit.failures += 1
        threshold = self._config.circuit_failures
        if threshold and circuit.failures >= threshold:
            circuit.open_until_us = now_us + int(self._config.circuit_open_s * 1_000_000)
            if circuit.failures == threshold:
                log.warning(
                    "endpoint %s failed %d times in a row: circuit open for %.0f s",
                    endpoint,
                    circuit.failures,
                    self._config.circuit_open_s,
                )

    async def _attempt(self, record: DeliveryRecord) -> None:
        retry_at_us = self._admit(record.endpoint, self._clock.now_us())
        if retry_at_us:
            await asyncio.to_thread(
                self.store.defer, record.delivery_id, record.attempts, retry_at_us
            )
            DELIVERY_ATTEMPTS.labels(record.channel, "deferred").inc()
            return
        async with self._in_flight:
            outcome = await self._send(record)
        now_us = self._clock.now_us()
        self._observe(record.endpoint, outcome, now_us)
        if outcome.delivered:
            await asyncio.to_thread(
                self.store.mark_delivered, record.delivery_id, now_us, outcome.status_code
            )
            DELIVERY_ATTEMPTS.labels(record.channel, "delivered").inc()
            return
        dead = self._retry.exhausted(record.attempts)
        next_at_us = now_us + int(self._retry.backoff_s(record.attempts) * 1_000_000)
        await asyncio.to_thread(
            self.store.mark_failed,
            record.delivery_id,
            record.attempts,
            outcome.status_code,
            outcome.error,
            0 if dead else next_at_us,
            now_us if dead else 0,
        )
        DELIVERY_ATTEMPTS.labels(record.channel, "dead" if dead else "retry").inc()
        if dead:
            log.warning(
                "delivery %s dead after %d attempts: %s",
                record.delivery_id,
                record.attempts,
                outcome.error,
            )

    async def _send(self, record: DeliveryRecord) -> SendOutcome:
        adapter = self._adapters.get(record.channel)
        if adapter is None:
            return SendOutcome(False, 0, f"no adapter for channel {record.channel}")
        try:
            return await adapter.send(record, self._clock.now_us())
        except Exception as exc:
            log.exception("adapter %s failed", record.channel)
            return SendOutcome(False, 0, f"{type(exc).__name__}: {exc}")


async def _first(wakeup: asyncio.Event, stop: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waits:
            waiter.cancel()


def _same_or_refuse(new: DeliveryRecord, stored: DeliveryRecord) -> None:
    for name in ("channel", "endpoint", "event_type", "send_at_us"):
        if getattr(new, name) != getattr(stored, name):
            raise AlreadyExists(
                "IDEMPOTENCY_KEY_REUSED",
                f"dedupe_key {new.dedupe_key!r} was used with another {name}",
                name,
            )
    # The body carries the enqueue time; compare the payload the caller sent.
    if _data(new.body) != _data(stored.body):
        raise AlreadyExists(
            "IDEMPOTENCY_KEY_REUSED",
            f"dedupe_key {new.dedupe_key!r} was used with another payload",
            "payload",
        )


def _data(body: str) -> object:
    decoded = msgspec.json.decode(body)
    return decoded.get("data") if isinstance(decoded, dict) else decoded
