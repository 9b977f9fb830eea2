"""The transactional outbox relay: ledger events to JetStream, exactly once.

Events are written in the same transaction as the entries they describe. The
relay publishes unsent rows with `Nats-Msg-Id` = event_id and marks them sent
only after JetStream acknowledged them. NATS being down only delays events;
a relay that dies between the ack and the mark re-publishes rows JetStream
already has, and JetStream drops them as duplicates (the stream's duplicate
window, `nats.dedupe_window_s`, is far longer than a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

from nats.aio.client import Client as NatsClient
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from money_plane.store.base import LedgerStore
from triplane.runtime import bus
from triplane.runtime.clock import Clock
from triplane.runtime.config import NatsConfig, OutboxConfig

log = logging.getLogger("triplane.money.relay")
T = TypeVar("T")


class OutboxRelay:
    def __init__(
        self,
        store: LedgerStore,
        nats: NatsConfig,
        outbox: OutboxConfig,
        executor: Executor,
        clock: Clock,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        self._store = store
        self._nats = nats
        self._outbox = outbox
        self._executor = executor
        self._clock = clock
        self._wakeup = wakeup or asyncio.Event()
        self._client: NatsClient | None = None
        self.published = 0

    async def _run_db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _connect(self) -> NatsClient:
        # One retry policy for the whole project: tenacity, exponential with
        # jitter, capped; the relay never gives up while the plane runs.
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(Exception),
            wait=wait_exponential_jitter(
                multiplier=self._outbox.relay_backoff_initial_s,
                max=self._outbox.relay_backoff_max_s,
                jitter=self._outbox.relay_backoff_initial_s,
            ),
            reraise=True,
        ):
            with attempt:
                client = await bus.connect(self._nats, "money-plane-relay")
                await bus.ensure_streams(client.jetstream(), self._nats, ["TRIPLANE_MONEY"])
                return client
        raise AssertionError("unreachable")

    async def run(self) -> None:
        self._client = await self._connect()
        js = self._client.jetstream()
        backoff_s = self._outbox.relay_backoff_initial_s
        next_cleanup_s = 0.0
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= next_cleanup_s:
                retention_us = self._outbox.sent_retention_s * 1_000_000
                await self._run_db(
                    self._store.outbox_delete_sent_before, self._clock.now_us() - retention_us
                )
                next_cleanup_s = loop.time() + self._outbox.cleanup_interval_s
            rows = await self._run_db(self._store.outbox_unsent, self._outbox.relay_batch_size)
            if not rows:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._wakeup.wait(), self._outbox.relay_idle_poll_ms / 1000.0
                    )
                continue
            events = [bus.OutgoingEvent(r.event_id, r.subject, r.data) for r in rows]
            try:
                acked = await bus.publish_batch(js, events, self._nats.publish_timeout_s)
            except Exception:
                log.warning("publishing to JetStream failed; will retry", exc_info=True)
                acked = [False] * len(rows)
            sent = [row.seq for row, ok in zip(rows, acked, strict=True) if ok]
            await self._run_db(self._store.outbox_mark_sent, sent, self._clock.now_us())
            self.published += len(sent)
            if len(sent) < len(rows):
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, self._outbox.relay_backoff_max_s)
            else:
                backoff_s = self._outbox.relay_backoff_initial_s

    async def close(self) -> None:
        if self._client is not None and not self._client.is_closed:
            await self._client.drain()
