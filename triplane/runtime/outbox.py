"""The one transactional-outbox relay: events written in a plane's database
transaction are published to JetStream, exactly once.

Each plane writes its events into an outbox table in the same transaction as
the facts they describe, and gives this relay an `OutboxSource`. The relay
publishes unsent events with `Nats-Msg-Id` = event_id and marks them sent only
after JetStream acknowledged them. NATS being down only delays events; a relay
that dies between the ack and the mark re-publishes events JetStream already
has, and JetStream drops them as duplicates (its duplicate window,
`nats.dedupe_window_s`, is far longer than a restart).

Connecting and publishing are retried by the plane's `RetryPolicy`
(`<plane>.outbox.relay_retry`) until the relay is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from triplane.runtime import bus
from triplane.runtime.clock import Clock
from triplane.runtime.config import NatsConfig, OutboxConfig
from triplane.runtime.retry import RetryPolicy

log = logging.getLogger("triplane.outbox")
T = TypeVar("T")


class OutboxSource(Protocol):
    """A plane's outbox table. Methods are blocking; the relay runs them off
    the event loop."""

    def unsent(self, limit: int) -> list[bus.OutgoingEvent]: ...

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None: ...

    def delete_sent_before(self, before_us: int) -> int: ...


@dataclass(frozen=True)
class RelaySettings:
    streams: list[str]
    batch_size: int
    # An empty outbox is read again after idle_poll_s, then after twice as
    # long each time it is still empty, up to idle_max_s; a kick (a commit in
    # this process) or a batch found starts again from idle_poll_s. So an
    # idle plane reads its outbox about once every idle_max_s instead of
    # every idle_poll_s, and a fleet's idle replicas stop loading the database
    # (0: no backoff, every idle_poll_s).
    idle_poll_s: float
    # Connecting, and publishing a batch JetStream did not fully acknowledge.
    retry: RetryPolicy
    # Sent events older than this are deleted from the outbox (0: kept).
    sent_retention_s: int = 0
    cleanup_interval_s: float = 60.0
    idle_max_s: float = 0.0

    @classmethod
    def from_config(cls, outbox: OutboxConfig, streams: list[str]) -> RelaySettings:
        """The settings of a plane's `outbox:` config section."""
        return cls(
            streams=streams,
            batch_size=outbox.relay_batch_size,
            idle_poll_s=outbox.relay_idle_poll_ms / 1000.0,
            retry=outbox.relay_retry,
            sent_retention_s=outbox.sent_retention_s,
            cleanup_interval_s=outbox.cleanup_interval_s,
            idle_max_s=outbox.relay_idle_max_ms / 1000.0,
        )

    def next_idle_wait(self, waited_s: float) -> float:
        """How long to wait for a kick after an empty read, the wait before
        it having run out after `waited_s` (0: it found events, or a kick
        ended it)."""
        if waited_s <= 0:
            return self.idle_poll_s
        return min(waited_s * 2, max(self.idle_max_s, self.idle_poll_s))


class PublishIncomplete(Exception):
    """JetStream acknowledged only part of a batch; the rest is tried again."""


class OutboxRelay:
    def __init__(
        self,
        source: OutboxSource,
        nats: NatsConfig,
        settings: RelaySettings,
        clock: Clock,
        client_name: str,
        run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        self._source = source
        self._nats = nats
        self._settings = settings
        self._clock = clock
        self._client_name = client_name
        self._run_blocking = run_blocking
        self._wakeup = wakeup or asyncio.Event()
        self._client: NatsClient | None = None
        self.published = 0
        # Failed attempts so far (observable, e.g. by tests and metrics).
        self.connect_failures = 0
        self.publish_failures = 0

    def kick(self) -> None:
        """Wakes the relay now instead of at its next poll."""
        self._wakeup.set()

    async def _blocking(self, fn: Callable[..., T], *args: object) -> T:
        if self._run_blocking is not None:
            result: T = await self._run_blocking(lambda: fn(*args))
            return result
        return await asyncio.to_thread(fn, *args)

    async def _connect_once(self) -> NatsClient:
        try:
            # fail_fast: an unreachable server fails this attempt at once, so
            # the relay's policy (not nats-py's fixed wait) paces the attempts.
            client = await bus.connect(self._nats, self._client_name, fail_fast=True)
        except Exception:
            self.connect_failures += 1
            raise
        try:
            await bus.ensure_streams(client.jetstream(), self._nats, self._settings.streams)
        except Exception:
            self.connect_failures += 1
            await client.close()
            raise
        return client

    async def _connect(self) -> NatsClient:
        return await self._settings.retry.retry(
            self._connect_once, Exception, "connecting the outbox relay to NATS", log
        )

    async def run(self) -> None:
        """Connects (retrying until it can) and relays until cancelled."""
        self._client = await self._connect()
        await self.run_with(self._client.jetstream())

    async def relay_once(self, js: JetStreamContext) -> tuple[int, int]:
        """Publishes one batch; returns (acknowledged, attempted)."""
        events = await self._blocking(self._source.unsent, self._settings.batch_size)
        if not events:
            return 0, 0
        try:
            acked = await bus.publish_batch(js, events, self._nats.publish_timeout_s)
        except Exception:
            log.warning("publishing to JetStream failed; will retry", exc_info=True)
            acked = [False] * len(events)
        sent = [e.event_id for e, ok in zip(events, acked, strict=True) if ok]
        if sent:
            await self._blocking(self._source.mark_sent, sent, self._clock.now_us())
        self.published += len(sent)
        return len(sent), len(events)

    async def _relay_batch(self, js: JetStreamContext) -> int:
        """One batch, fully acknowledged; returns how many events it held."""
        try:
            sent, attempted = await self.relay_once(js)
        except Exception:
            self.publish_failures += 1
            raise
        if sent < attempted:
            self.publish_failures += 1
            raise PublishIncomplete(f"JetStream acknowledged {sent} of {attempted} events")
        return attempted

    async def run_with(self, js: JetStreamContext) -> None:
        """Relays over an existing JetStream context until cancelled. A batch
        that fails (NATS down, the outbox unreadable) is retried per the
        relay's policy; each retry reads the outbox afresh, so it carries only
        what is still unsent."""
        settings = self._settings
        loop = asyncio.get_running_loop()
        next_cleanup_s = 0.0
        waited_s = 0.0
        while True:
            if settings.sent_retention_s and loop.time() >= next_cleanup_s:
                retention_us = settings.sent_retention_s * 1_000_000
                await self._blocking(
                    self._source.delete_sent_before, self._clock.now_us() - retention_us
                )
                next_cleanup_s = loop.time() + settings.cleanup_interval_s
            attempted = await settings.retry.retry(
                lambda: self._relay_batch(js), Exception, "relaying the outbox", log
            )
            if attempted == 0:
                self._wakeup.clear()
                wait_s = settings.next_idle_wait(waited_s)
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait_s)
                except TimeoutError:
                    waited_s = wait_s
                else:
                    waited_s = 0.0  # kicked: the next empty read waits idle_poll_s
            else:
                waited_s = 0.0

    async def close(self) -> None:
        if self._client is not None and not self._client.is_closed:
            await self._client.drain()
