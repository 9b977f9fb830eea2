"""Assembles the money plane from config: store, verifier, ledger, relay, server."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from money_plane import codec
from money_plane import metrics as m
from money_plane.ledger import Ledger
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.service import Payouts, Settlements, load_cipher
from money_plane.permissions import PERMISSIONS
from money_plane.rails.worker import RailWorker
from money_plane.recon.codec import encode_break_event
from money_plane.recon.intake import StatementIntake
from money_plane.recon.reconciler import Reconciler
from money_plane.recon.service import reconciliation_service
from money_plane.service import ledger_service
from money_plane.shards import ShardDirectory, ShardedLedger
from money_plane.store.base import LedgerStore
from money_plane.store.postgres import PostgresLedgerStore
from money_plane.store.sqlite import SqliteLedgerStore
from triplane.common.v1 import envelope_pb2
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import Config
from triplane.runtime.outbox import OutboxRelay, RelaySettings
from triplane.runtime.server import ConnectionAge, PlaneServer, ServerSecurity
from triplane.runtime.tasks import cancel_and_wait, every
from triplane.runtime.tls import MONEY_PLANE
from triplane.runtime.tokens import TokenVerifier, token_key_set

log = logging.getLogger("triplane.money")


def build_store(config: Config) -> LedgerStore:
    ledger_store = _build_store(config)
    ledger_store.reserve_retry_s = config.money.reserves.refused_retry_s
    return ledger_store


def build_shard_store(config: Config, dsn: str) -> LedgerStore:
    """The store of one shard of money.store.shards (PostgreSQL)."""
    store = PostgresLedgerStore(
        dsn,
        codec.encode_event,
        codec.encode_account_event,
        config.money.holds.default_timeout_s,
        config.money.store.conflict_retry,
    )
    store.reserve_retry_s = config.money.reserves.refused_retry_s
    return store


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


async def _settle_all(settlements: list[Settlements]) -> int:
    return sum([await each.settle_due() for each in settlements])


@dataclass
class MoneyPlane:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    listen: str | None = None
    ledger: Ledger | None = None
    # With money.store.shards: the ledger of every shard, routed by tenant
    # (`ledger` is then None).
    sharded: ShardedLedger | None = None
    server: PlaneServer | None = None
    relay: OutboxRelay | None = None
    relays: list[OutboxRelay] = field(default_factory=list)
    _relay_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _recons: list[Reconciler] = field(default_factory=list)
    _relay_executors: list[tuple[ThreadPoolExecutor, Ledger]] = field(default_factory=list)
    # One per ledger (shard), where sweepers run (money_plane/rails/worker.py).
    rail_workers: list[RailWorker] = field(default_factory=list)
    # One per ledger (shard) beside its rail worker (money_plane/recon/intake.py).
    intakes: list[StatementIntake] = field(default_factory=list)

    async def start(self, sweepers: bool = True, relay: bool = True, metrics: bool = True) -> int:
        """Starts everything; returns the bound gRPC port. Extra serving
        processes (money.server_processes) run neither sweepers nor relay
        nor the metrics endpoint: the primary does that for all of them."""
        config = self.config
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
        shards = config.money.store.shards
        served: Ledger | ShardedLedger
        if shards:
            # One ledger (store, group commit, sweepers, relay) per shard.
            ledgers = {
                shard.name: Ledger(
                    build_shard_store(config, shard.postgres_dsn),
                    verifier,
                    self.clock,
                    config.money,
                )
                for shard in shards
            }
            directory = ShardDirectory(shards[0].postgres_dsn, [shard.name for shard in shards])
            self.sharded = ShardedLedger(directory, ledgers, self.clock)
            await self.sharded.start(sweepers=sweepers)
            served = self.sharded
            payouts_of = {id(ledger): self._payouts(ledger) for ledger in ledgers.values()}
            every_payouts = list(payouts_of.values())
            settlements_of = {id(ledger): Settlements(ledger) for ledger in ledgers.values()}
            sharded = self.sharded

            async def payouts_for(tenant_id: str) -> Payouts:
                return payouts_of[id(await sharded.ledger_of(tenant_id))]

            async def settlements_for(tenant_id: str) -> Settlements:
                return settlements_of[id(await sharded.ledger_of(tenant_id))]

            recon_of = {id(ledger): await self._recon(ledger) for ledger in ledgers.values()}

            async def recon_for(tenant_id: str) -> Reconciler:
                return recon_of[id(await sharded.ledger_of(tenant_id))]

            relayed = [(f"money-plane-relay-{name}", ledger) for name, ledger in ledgers.items()]
        else:
            self.ledger = Ledger(
                build_store(config),
                verifier,
                self.clock,
                config.money,
                single_writer=config.money.store.backend == "sqlite",
            )
            await self.ledger.start(sweepers=sweepers)
            served = self.ledger
            single = self._payouts(self.ledger)
            every_payouts = [single]
            settlements_of = {id(self.ledger): Settlements(self.ledger)}
            one = settlements_of[id(self.ledger)]

            async def payouts_for(tenant_id: str) -> Payouts:
                return single

            async def settlements_for(tenant_id: str) -> Settlements:
                return one

            one_recon = await self._recon(self.ledger)

            async def recon_for(tenant_id: str) -> Reconciler:
                return one_recon

            relayed = [("money-plane-relay", self.ledger)]
        if config.nats.url and relay:
            for client_name, ledger in relayed:
                self._start_relay(client_name, ledger)
            self.relay = self.relays[0]
        elif relay:
            log.warning("nats.url is empty: ledger events stay in the outbox until a relay runs")
        self.server = PlaneServer(
            name="money_plane",
            listen=self.listen or config.money.listen,
            services=[
                ledger_service(
                    served,
                    self.clock,
                    payouts_for,
                    settlements_for,
                    functools.partial(_settle_all, list(settlements_of.values())),
                ),
                reconciliation_service(recon_for),
            ],
            security=ServerSecurity.from_config(config, MONEY_PLANE, PERMISSIONS),
            shutdown_grace_s=config.runtime.shutdown_grace_s,
            max_message_bytes=config.runtime.max_message_bytes,
            otel_exporter=config.runtime.otel_exporter,
            reuse_port=config.money.server_processes > 1,
            connection_age=ConnectionAge.from_config(config),
            on_stop=[self._stop_internals],
            metrics_listen=config.money.metrics_listen if metrics else "",
        )
        if sweepers:
            # Any replica may sweep: a period's claim makes it settle once.
            self._relay_tasks.append(
                asyncio.create_task(
                    every(
                        config.money.payouts.settlement_sweep_interval_s,
                        functools.partial(_settle_all, list(settlements_of.values())),
                        "settlement sweep",
                    ),
                    name="settlements",
                )
            )
        if sweepers and config.money.recon.sweep_interval_s > 0:
            # Any replica may sweep: a break's id is its cause, so one is raised.
            for index, recon in enumerate(self._recons):
                self._relay_tasks.append(
                    asyncio.create_task(
                        recon.run_sweeper(config.money.recon.sweep_interval_s),
                        name=f"recon-sweeper-{index}",
                    )
                )
        if sweepers:
            await self._start_rail_workers(every_payouts)
            await self._start_intakes(every_payouts)
        return await self.server.start()

    async def _start_rail_workers(self, every_payouts: list[Payouts]) -> None:
        """Payouts to their rails and the bank's outcomes back; any replica
        may run it (each unit is claimed in the database)."""
        rails = self.config.rails
        if not rails.bank_url:
            log.warning("rails.bank_url is empty: no rail worker; approved payouts stay approved")
            return
        for index, payouts in enumerate(every_payouts):
            worker = RailWorker(payouts, rails, self.clock)
            await worker.start()
            self.rail_workers.append(worker)
            self._relay_tasks.append(asyncio.create_task(worker.run(), name=f"rail-worker-{index}"))

    async def _start_intakes(self, every_payouts: list[Payouts]) -> None:
        """The bank's statements read and reconciled as they come; any
        replica may run it (each unit is claimed in the database)."""
        if not self.config.rails.bank_url or self.config.money.recon.intake_interval_s <= 0:
            return
        # Both lists are in the ledgers' (shards') order.
        for index, (recon, payouts) in enumerate(zip(self._recons, every_payouts, strict=True)):
            intake = StatementIntake(recon, payouts, self.config.rails, self.clock)
            await intake.start()
            self.intakes.append(intake)
            self._relay_tasks.append(
                asyncio.create_task(intake.run(), name=f"statement-intake-{index}")
            )

    def _payouts(self, ledger: Ledger) -> Payouts:
        cipher = load_cipher(self.config.money.payouts, self.config.state_path)
        return Payouts(
            ledger, cipher, self.config.money.payouts, encode_payout_event, self.config.rails
        )

    async def _recon(self, ledger: Ledger) -> Reconciler:
        """The ledger's reconciliation, its tables created (money_plane/recon)."""
        recon = Reconciler(ledger, self.config.money.recon, self.clock, encode_break_event)
        await recon.start()
        self._recons.append(recon)
        return recon

    def _start_relay(self, client_name: str, ledger: Ledger) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        if config.money.store.backend == "sqlite":
            run_blocking: Callable[[Callable[[], Any]], Awaitable[Any]] = ledger.run_on_writer
        else:
            executor = ThreadPoolExecutor(1, thread_name_prefix="outbox-relay")
            self._relay_executors.append((executor, ledger))

            def run_blocking(fn: Callable[[], Any]) -> Awaitable[Any]:
                return loop.run_in_executor(executor, fn)

        relay = OutboxRelay(
            MeasuredOutbox(ledger.store, self.clock),
            config.nats,
            RelaySettings.from_config(config.money.outbox, ["TRIPLANE_MONEY", "TRIPLANE_TENANTS"]),
            self.clock,
            client_name=client_name,
            # SQLite: the writer's thread (one writer, no lock races);
            # PostgreSQL: a thread and connection of the relay's own.
            run_blocking=run_blocking,
            wakeup=ledger.committed,
        )
        self.relays.append(relay)
        self._relay_tasks.append(asyncio.create_task(relay.run(), name=client_name))

    async def _stop_internals(self) -> None:
        await cancel_and_wait(self._relay_tasks)
        for worker in self.rail_workers:
            await worker.aclose()
        for intake in self.intakes:
            await intake.aclose()
        for relay in self.relays:
            await relay.close()
        if self.ledger is not None:
            await self.ledger.stop()
        if self.sharded is not None:
            await self.sharded.stop()
        for executor, ledger in self._relay_executors:
            executor.submit(ledger.store.close)
            executor.shutdown(wait=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
