"""Assembles the gateway from config: channels to the planes, NATS, the
tokenizer, remembered answers, the flows, the engagement pieces (trigger
rules, channel delivery, experiments, measurement) and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from nats.aio.client import Client as NatsClient

from gateway.auth.setup import Auth, open_auth
from gateway.core import Core
from gateway.delivery_admin import delivery_admin_services
from gateway.engagement import Engagement, ExposureMeasurement
from gateway.experiments_admin import experiment_admin_services
from gateway.idempotency import IdempotencyStore
from gateway.ingest import Ingest
from gateway.measure import LiftMetrics
from gateway.nba import NextBestAction
from gateway.payments import Payments
from gateway.payout_events import (
    BreakWebhookConsumer,
    DurableEventConsumer,
    PayoutReviewConsumer,
    PayoutWebhookConsumer,
)
from gateway.payouts import Payouts
from gateway.permissions import PERMISSIONS
from gateway.pii import Tokenizer
from gateway.planes import GrpcAi, GrpcMoney, GrpcPolicy, NatsEventSink, PlaneChannels
from gateway.service import GatewayServicer, gateway_services
from gateway.storage import open_idempotency_db
from triplane.runtime import bus
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import Config
from triplane.runtime.db import Database
from triplane.runtime.outbox import OutboxRelay, RelaySettings
from triplane.runtime.server import ConnectionAge, PlaneServer, ServerSecurity
from triplane.runtime.tasks import cancel_and_wait
from triplane.runtime.tenants import TENANTS_STREAM, TenantDirectory
from triplane.runtime.tls import GATEWAY

log = logging.getLogger("gateway.app")

STOP_DRAIN_S = 2.0

_LIFT_METRICS: list[LiftMetrics] = []


def _lift_metrics() -> LiftMetrics:
    """The process's lift gauges (registered once in the default registry)."""
    if not _LIFT_METRICS:
        _LIFT_METRICS.append(LiftMetrics())
    return _LIFT_METRICS[0]


@dataclass
class Gateway:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    listen: str | None = None
    # Plane addresses; default: their configured listen addresses.
    money_address: str | None = None
    policy_address: str | None = None
    ai_address: str | None = None
    # The parts, built by start().
    server: PlaneServer | None = None
    core: Core | None = None
    channels: PlaneChannels | None = None
    events: NatsEventSink | None = None
    relay: OutboxRelay | None = None
    _relay_task: asyncio.Task[None] | None = None
    nats: NatsClient | None = None
    store_db: Database | None = None
    store: IdempotencyStore | None = None
    engagement: Engagement | None = None
    payout_events: PayoutWebhookConsumer | None = None
    event_consumers: list[DurableEventConsumer] = field(default_factory=list)
    # Partner credentials (None with gateway.auth off).
    auth: Auth | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def measurement(self) -> ExposureMeasurement | None:
        """Exposures, conversions and the lift report (once started)."""
        return self.engagement.measurement if self.engagement is not None else None

    async def start(self) -> int:
        config = self.config
        gateway = config.gateway
        self.channels = PlaneChannels.from_config(
            config, self.money_address, self.policy_address, self.ai_address
        )
        js = None
        if config.nats.url:
            self.nats = await bus.connect(config.nats, "gateway")
            js = self.nats.jetstream()
            await bus.ensure_streams(js, config.nats, ["TRIPLANE_GATEWAY", TENANTS_STREAM])
        else:
            log.warning("nats.url is empty: events are not published")
        # The tokenization key from its file (never from config): every replica
        # reading the same file tokenizes alike.
        tokenizer = Tokenizer.from_config(gateway.pii, config.state_path)
        self.store_db = open_idempotency_db(gateway.idempotency, config.state_path)
        self.store = IdempotencyStore(
            gateway.idempotency, self.store_db, self.clock, rehash=tokenizer.digest_fields
        )
        await self.store.start()
        self.events = NatsEventSink(js, config.nats.publish_timeout_s, self.store)
        if js is not None:
            self.relay = OutboxRelay(
                self.store,
                config.nats,
                RelaySettings.from_config(gateway.outbox, ["TRIPLANE_GATEWAY"]),
                self.clock,
                client_name="gateway-relay",
            )
            # Not kicked on every flush: the relay polls every relay_idle_poll_ms,
            # so it publishes tens of events a cycle instead of one or two
            # (each cycle costs two transactions); idle, its polls back off
            # up to relay_idle_max_ms.
            self._relay_task = asyncio.create_task(
                self.relay.run_with(js), name="gateway-outbox-relay"
            )
        policy = GrpcPolicy(self.channels.policy)
        money = GrpcMoney(self.channels.money)
        self.core = Core(
            gateway,
            GrpcAi(self.channels.ai),
            policy,
            money,
            self.events,
            tokenizer,
            self.store,
            self.clock,
        )
        engagement = self.engagement = Engagement.open(config, self.clock, policy)
        servicer = GatewayServicer(
            Payments(self.core),
            NextBestAction(self.core, engagement.experiments, engagement.measurement),
            Ingest(
                self.core,
                engagement.triggers,
                engagement.measurement,
                TenantDirectory(js, config.nats.tenant_directory, self.clock) if js else None,
            ),
            engagement.delivery,
            gateway.budgets.default_deadline_ms,
            payouts=(
                payouts := Payouts(self.core, money, engagement.webhooks, engagement.delivery)
            ),
        )
        auth = self.auth = await open_auth(config, self.clock)
        self.server = PlaneServer(
            name="gateway",
            listen=self.listen or gateway.listen,
            services=[
                *gateway_services(servicer),
                *delivery_admin_services(engagement.delivery),
                *experiment_admin_services(engagement.measurement.measurement),
                *(auth.services if auth else []),
            ],
            # The public port: partners come with API keys, not certificates;
            # admins may use the port that requires one (gateway.admin_listen).
            # Reflection has its own switch.
            security=ServerSecurity.from_config(
                config,
                GATEWAY,
                PERMISSIONS,
                require_client_cert=False,
                reflection=gateway.reflection,
                mtls_listen=gateway.admin_listen,
            ),
            shutdown_grace_s=config.runtime.shutdown_grace_s,
            max_message_bytes=config.runtime.max_message_bytes,
            otel_exporter=config.runtime.otel_exporter,
            # Every call's credential, scope, tenant and rate limit.
            interceptors=[auth.interceptor] if auth else [],
            # Prometheus: RED per RPC, delivery attempts, the lift report.
            metrics_listen=gateway.metrics_listen,
            connection_age=ConnectionAge.from_config(config),
        )
        self.server.on_stop.append(self._stop_background)
        # The lift report's figures are worth computing only where served.
        lift_metrics = _lift_metrics() if gateway.metrics_listen else None
        self._tasks.extend(engagement.start(self._stop, lift_metrics))
        if js is not None:
            # A payout's later states (a rail's outcome) to the partner's
            # webhook; a payout's review resolved to the money plane; new
            # reconciliation breaks to the partner's webhook.
            hooks = gateway.payout_webhooks
            self.payout_events = PayoutWebhookConsumer(js, payouts, hooks)
            self.event_consumers = [self.payout_events, PayoutReviewConsumer(js, payouts, hooks)]
            if engagement.webhooks is not None:
                self.event_consumers.append(
                    BreakWebhookConsumer(
                        js, engagement.webhooks, engagement.delivery, self.clock, hooks
                    )
                )
            try:
                await bus.ensure_streams(js, config.nats, ["TRIPLANE_MONEY", "TRIPLANE_POLICY"])
                for consumer in self.event_consumers:
                    await consumer.start()
            except Exception:
                log.exception("payout and break events: cannot consume the money/policy streams")
        return await self.server.start()

    async def _drain_outbox(self) -> None:
        """Commits what is queued and publishes what JetStream will take within
        STOP_DRAIN_S; the rest stays in the outbox for the next start."""
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.flush()
        task, self._relay_task = self._relay_task, None
        if task is None:
            return
        await cancel_and_wait([task])
        if self.relay is not None and self.nats is not None:
            relay, js = self.relay, self.nats.jetstream()

            async def drain() -> None:
                while (await relay.relay_once(js))[1]:
                    pass

            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(drain(), STOP_DRAIN_S)

    async def _stop_background(self) -> None:
        self._stop.set()
        for consumer in self.event_consumers:
            await consumer.stop()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(task, STOP_DRAIN_S)
        self._tasks.clear()
        if self.engagement is not None:
            with contextlib.suppress(Exception):
                await self.engagement.close()
        await self._drain_outbox()
        if self.store is not None:
            await self.store.stop()
        if self.store_db is not None:
            self.store_db.close()
        if self.auth is not None:
            await self.auth.close()
        if self.nats is not None:
            with contextlib.suppress(Exception):
                await self.nats.close()
        if self.channels is not None:
            await self.channels.close()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
