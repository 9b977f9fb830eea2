"""Assembles the money plane from config: store, verifier, ledger, relay, server."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from money_plane import codec
from money_plane import metrics as m
from money_plane.ledger import Ledger
from money_plane.permissions import PERMISSIONS
from money_plane.service import ledger_service
from money_plane.store.base import LedgerStore
from money_plane.store.postgres import PostgresLedgerStore
from money_plane.store.sqlite import SqliteLedgerStore
from triplane.common.v1 import envelope_pb2
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import Config
from triplane.runtime.outbox import OutboxRelay, RelaySettings
from triplane.runtime.server import PlaneServer, ServerSecurity
from triplane.runtime.tasks import cancel_and_wait
from triplane.runtime.tls import MONEY_PLANE
from triplane.runtime.tokens import TokenVerifier, token_key_set

log = logging.getLogger("triplane.money")


def build_store(config: Config) -> LedgerStore:
    ledger_store = _build_store(config)
    ledger_store.reserve_retry_s = config.money.reserves.refused_retry_s
    return ledger_store


def _build_store(config: Config) -> LedgerStore:
    store = config.money.store
    timeout_s = config.money.holds.default_timeout_s
    if store.backend == "postgres":
        return PostgresLedgerStore(
            store.postgres_dsn,
            codec.encode_event,
            codec.encode_account_event,
            timeout_s,
            store.conflict_retry,
        )
    path = Path(store.sqlite_path)
    if not path.is_absolute():
        path = config.state_path / path
    return SqliteLedgerStore(
        path, codec.encode_event, codec.encode_account_event, timeout_s, store.conflict_retry
    )


@dataclass(frozen=True)
class MeasuredOutbox:
    """The ledger's outbox as the relay reads it, measured on the way: how
    old the oldest unpublished event is (its envelope's occurred_at is its
    commit time) and how many events were published. Costs one envelope
    parse per batch read, no query of its own."""

    store: LedgerStore
    clock: Clock

    def unsent(self, limit: int) -> list[OutgoingEvent]:
        events = self.store.unsent(limit)
        lag_s = 0.0
        if events:
            committed = envelope_pb2.EventEnvelope.FromString(events[0].data).occurred_at
            lag_s = max(0.0, (self.clock.now_us() - committed.ToMicroseconds()) / 1e6)
        m.OUTBOX_LAG_SECONDS.set(lag_s)
        return events

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        self.store.mark_sent(event_ids, now_us)
        m.OUTBOX_PUBLISHED.inc(len(event_ids))

    def delete_sent_before(self, before_us: int) -> int:
        return self.store.delete_sent_before(before_us)


@dataclass
class MoneyPlane:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    listen: str | None = None
    ledger: Ledger | None = None
    server: PlaneServer | None = None
    relay: OutboxRelay | None = None
    _relay_task: asyncio.Task[None] | None = None
    _relay_executor: ThreadPoolExecutor | None = None

    async def start(self, sweepers: bool = True, relay: bool = True, metrics: bool = True) -> int:
        """Starts everything; returns the bound gRPC port. Extra serving
        processes (money.server_processes) run neither sweepers nor relay
        nor the metrics endpoint: the primary does that for all of them."""
        config = self.config
        store = build_store(config)
        tokens = config.money.tokens
        verifier = TokenVerifier(
            token_key_set(
                config.keys.policy_public_keys,
                config.keys.policy_public_key_paths,
                config.state_path,
                tokens.key_reload_interval_s,
            ),
            tokens.clock_skew_s,
        )
        self.ledger = Ledger(
            store,
            verifier,
            self.clock,
            config.money,
            single_writer=config.money.store.backend == "sqlite",
        )
        await self.ledger.start(sweepers=sweepers)
        if config.nats.url and relay:
            loop = asyncio.get_running_loop()
            ledger = self.ledger
            if config.money.store.backend == "sqlite":
                run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]] = ledger.run_on_writer
            else:
                executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay")
                self._relay_executor = executor

                def run_blocking(fn: Callable[[], Any]) -> Awaitable[Any]:
                    return loop.run_in_executor(executor, fn)

            outbox = config.money.outbox
            self.relay = OutboxRelay(
                MeasuredOutbox(store, self.clock),
                config.nats,
                RelaySettings.from_config(outbox, ["TRIPLANE_MONEY", "TRIPLANE_TENANTS"]),
                self.clock,
                client_name="money-plane-relay",
                # SQLite: the writer's thread (one writer, no lock races);
                # PostgreSQL: a thread and connection of the relay's own.
                run_blocking=run_blocking,
                wakeup=self.ledger.committed,
            )
            self._relay_task = asyncio.create_task(self.relay.run(), name="outbox-relay")
        elif relay:
            log.warning("nats.url is empty: ledger events stay in the outbox until a relay runs")
        self.server = PlaneServer(
            name="money_plane",
            listen=self.listen or config.money.listen,
            services=[ledger_service(self.ledger, self.clock)],
            security=ServerSecurity.from_config(config, MONEY_PLANE, PERMISSIONS),
            shutdown_grace_s=config.runtime.shutdown_grace_s,
            max_message_bytes=config.runtime.max_message_bytes,
            otel_exporter=config.runtime.otel_exporter,
            reuse_port=config.money.server_processes > 1,
            on_stop=[self._stop_internals],
            metrics_listen=config.money.metrics_listen if metrics else "",
        )
        return await self.server.start()

    async def _stop_internals(self) -> None:
        await cancel_and_wait([self._relay_task])
        if self.relay is not None:
            await self.relay.close()
        if self.ledger is not None:
            await self.ledger.stop()
        if self._relay_executor is not None:
            assert self.ledger is not None
            self._relay_executor.submit(self.ledger.store.close)
            self._relay_executor.shutdown(wait=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
