"""Assembles the gateway from config: channels to the planes, NATS, the
tokenizer, remembered answers, the flows, the engagement pieces (trigger
rules, channel delivery, experiments, measurement) and the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NatsClient
from prometheus_client import start_http_server

from gateway.core import Core
from gateway.idempotency import IdempotencyStore
from gateway.ingest import Ingest
from gateway.measure import LiftMetrics
from gateway.nba import NextBestAction
from gateway.payments import Payments
from gateway.pii import Tokenizer, load_secret
from gateway.planes import GrpcAi, GrpcMoney, GrpcPolicy, NatsEventSink, PlaneChannels
from gateway.ports import Assigned, ExperimentsPort, IngestedEvent, MeasurementPort, TriggersPort
from gateway.service import DeadLetters, GatewayServicer, gateway_services
from gateway.storage import open_idempotency_db
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.policy.v1 import policy_pb2
from triplane.runtime import bus
from triplane.runtime.clock import Clock, SystemClock
from triplane.runtime.config import Config
from triplane.runtime.db import Database
from triplane.runtime.errors import NotFound, TriplaneError
from triplane.runtime.net import dial_address
from triplane.runtime.outbox import OutboxRelay, RelaySettings
from triplane.runtime.server import PlaneServer
from triplane.runtime.tasks import cancel_and_wait

log = logging.getLogger("gateway.app")

STOP_DRAIN_S = 2.0
_CHANNEL_TO_POLICY = {
    "push": policy_pb2.CHANNEL_PUSH,
    "in_app": policy_pb2.CHANNEL_IN_APP,
    "email": policy_pb2.CHANNEL_EMAIL,
    "sms": policy_pb2.CHANNEL_SMS,
    "whatsapp": policy_pb2.CHANNEL_WHATSAPP,
    "partner_webhook": policy_pb2.CHANNEL_PARTNER_WEBHOOK,
}
_TOPIC_TO_POLICY = {
    "marketing": policy_pb2.TOPIC_MARKETING,
    "servicing": policy_pb2.TOPIC_SERVICING,
    "credit": policy_pb2.TOPIC_CREDIT,
    "insurance": policy_pb2.TOPIC_INSURANCE,
}
_BLOCK = {
    policy_pb2.CONTACT_BLOCK_NO_CONSENT: "no_consent",
    policy_pb2.CONTACT_BLOCK_QUIET_HOURS: "quiet_hours",
    policy_pb2.CONTACT_BLOCK_CAPPED: "capped",
    policy_pb2.CONTACT_BLOCK_VULNERABLE: "vulnerable",
}


_LIFT_METRICS: list[LiftMetrics] = []


def _lift_metrics() -> LiftMetrics:
    """The process's lift gauges (registered once in the default registry)."""
    if not _LIFT_METRICS:
        _LIFT_METRICS.append(LiftMetrics())
    return _LIFT_METRICS[0]


def _optional(module: str) -> Any:
    """A module helper B is still writing; None until it exists."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        return None


class _ExperimentsAdapter:
    """B's gateway.experiments behind the port (its argument order differs)."""

    def __init__(self, config: Config) -> None:
        module = importlib.import_module("gateway.experiments")
        self._experiments = module.Experiments.from_config(config.gateway)

    def assign(self, tenant_id: str, customer_token: str, experiment: str) -> Assigned:
        result: Assigned = self._experiments.assign(tenant_id, experiment, customer_token)
        return result


class _MeasurementAdapter:
    """B's gateway.measure behind the port: exposures of offers (shown or
    withheld from the holdout) and conversions recorded through RecordOutcome."""

    def __init__(self, db: Any, config: Config, clock: Clock) -> None:
        module = importlib.import_module("gateway.measure")
        self._module = module
        self._measurement = module.Measurement(
            module.MeasurementStore(db), config.gateway.measurement, clock
        )

    async def publish_lift(self, metrics: Any) -> int:
        return int(await self._measurement.publish_lift(metrics))

    async def exposure(self, tenant_id: str, at_us: int, exposure: gw.ExposureLogged) -> None:
        if not exposure.offer_id:
            return
        await self._measurement.record_exposures(
            [
                self._module.Exposure(
                    exposure_id=exposure.decision_id,
                    tenant_id=tenant_id,
                    customer_id=exposure.customer_token,
                    offer_id=exposure.offer_id,
                    surface=exposure.surface,
                    experiment=exposure.assignment.experiment,
                    arm=exposure.assignment.arm,
                    holdout=exposure.assignment.holdout,
                    exposed_at_us=at_us,
                    conversion_events=list(exposure.conversion_events),
                    action_probability=exposure.action_probability,
                    decision_id=exposure.decision_id,
                )
            ]
        )

    async def outcome(self, tenant_id: str, at_us: int, outcome: gw.OutcomeRecorded) -> None:
        if outcome.kind == gw.OUTCOME_KIND_CONVERTED and outcome.offer_id:
            try:
                await self._measurement.record_outcome(
                    tenant_id, outcome.decision_id, f"outcome:{outcome.decision_id}", at_us
                )
            except NotFound:
                # No exposure was recorded for that decision (nothing shown):
                # the bandit still learns; there is nothing to attribute.
                log.info("outcome for %s has no exposure to attribute", outcome.decision_id)

    async def conversions(self, events: list[tuple[str, str, str, str, int]]) -> None:
        """Behavioural events that may convert earlier exposures: (event_id,
        tenant_id, customer_token, event_type, occurred_at_us)."""
        await self._measurement.record_conversion_events(
            [
                self._module.ConversionEvent(
                    event_id=event_id,
                    tenant_id=tenant_id,
                    customer_id=customer,
                    event_type=event_type,
                    occurred_at_us=at_us,
                )
                for event_id, tenant_id, customer, event_type, at_us in events
            ]
        )

    async def lift_report(self, tenant_id: str) -> Any:
        return await self._measurement.lift_report(tenant_id)


class _NoMeasurement:
    async def exposure(self, tenant_id: str, at_us: int, exposure: gw.ExposureLogged) -> None:
        return None

    async def outcome(self, tenant_id: str, at_us: int, outcome: gw.OutcomeRecorded) -> None:
        return None

    async def conversions(self, events: list[tuple[str, str, str, str, int]]) -> None:
        return None


@dataclass
class Gateway:
    config: Config
    clock: Clock = field(default_factory=SystemClock)
    listen: str | None = None
    # Plane addresses; default: their configured listen addresses.
    money_address: str | None = None
    policy_address: str | None = None
    ai_address: str | None = None
    experiments: ExperimentsPort | None = None
    measurement: MeasurementPort | None = None
    server: PlaneServer | None = None
    core: Core | None = None
    channels: PlaneChannels | None = None
    events: NatsEventSink | None = None
    relay: OutboxRelay | None = None
    _relay_task: asyncio.Task[None] | None = None
    nats: NatsClient | None = None
    store_db: Database | None = None
    store: IdempotencyStore | None = None
    engagement: Any = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> int:
        config = self.config
        gateway = config.gateway
        self.channels = PlaneChannels(
            self.money_address or dial_address(config.money.listen),
            self.policy_address or dial_address(config.policy.listen),
            self.ai_address or dial_address(config.ai.listen),
        )
        js = None
        if config.nats.url:
            self.nats = await bus.connect(config.nats, "gateway")
            js = self.nats.jetstream()
            await bus.ensure_streams(js, config.nats, ["TRIPLANE_GATEWAY"])
        else:
            log.warning("nats.url is empty: events are not published")
        self.store_db = open_idempotency_db(gateway.idempotency, config.state_path)
        self.store = IdempotencyStore(gateway.idempotency, self.store_db, self.clock)
        await self.store.start()
        self.events = NatsEventSink(js, config.nats.publish_timeout_s, self.store)
        if js is not None:
            outbox = gateway.outbox
            self.relay = OutboxRelay(
                self.store,
                config.nats,
                RelaySettings.from_config(outbox, ["TRIPLANE_GATEWAY"]),
                self.clock,
                client_name="gateway-relay",
            )
            # Not kicked on every flush: the relay polls every relay_idle_poll_ms,
            # so it publishes tens of events a cycle instead of one or two
            # (each cycle costs two SQLite transactions).
            self._relay_task = asyncio.create_task(
                self.relay.run_with(js), name="gateway-outbox-relay"
            )
        tokenizer = Tokenizer(
            load_secret(gateway.pii.tokenization_key_b64, config.state_path),
            gateway.pii.token_prefix,
        )
        policy = GrpcPolicy(self.channels.policy)
        self.core = Core(
            gateway,
            GrpcAi(self.channels.ai),
            policy,
            GrpcMoney(self.channels.money),
            self.events,
            tokenizer,
            self.store,
            self.clock,
        )
        triggers, dead_letters = await self._engagement(policy)
        if self.measurement is None:
            db = self.engagement["db"] if self.engagement else None
            self.measurement = (
                _MeasurementAdapter(db, config, self.clock)
                if db is not None and _optional("gateway.measure") is not None
                else _NoMeasurement()
            )
        if self.experiments is None:
            self.experiments = _ExperimentsAdapter(config)
        payments = Payments(self.core)
        nba = NextBestAction(self.core, self.experiments, self.measurement)
        servicer = GatewayServicer(
            payments,
            nba,
            Ingest(self.core, triggers, self.measurement),
            dead_letters,
            gateway.budgets.default_deadline_ms,
        )
        self.server = PlaneServer(
            name="gateway",
            listen=self.listen or gateway.listen,
            services=gateway_services(servicer),
            shutdown_grace_s=config.runtime.shutdown_grace_s,
            max_message_bytes=config.runtime.max_message_bytes,
            otel_exporter=config.runtime.otel_exporter,
        )
        self.server.on_stop.append(self._stop_background)
        if gateway.metrics_listen:
            self._serve_metrics(gateway.metrics_listen)
        return await self.server.start()

    def _serve_metrics(self, listen: str) -> None:
        """Prometheus on `listen`: delivery attempts, and the lift report's
        figures recomputed every measurement.metrics_interval_s."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")
        publish = getattr(self.measurement, "publish_lift", None)
        if publish is None:
            return
        metrics = _lift_metrics()
        interval_s = self.config.gateway.measurement.metrics_interval_s

        async def loop() -> None:
            while not self._stop.is_set():
                try:
                    await publish(metrics)
                except Exception:
                    log.exception("publishing lift metrics failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), interval_s)

        self._tasks.append(asyncio.create_task(loop(), name="gateway-lift-metrics"))

    async def _engagement(
        self, policy: GrpcPolicy
    ) -> tuple[TriggersPort | None, DeadLetters | None]:
        """Channel delivery and trigger rules (B's libraries), wired to the
        policy plane's consent checks; absent pieces are skipped with a note."""
        delivery_mod = _optional("gateway.delivery")
        triggers_mod = _optional("gateway.triggers")
        storage_mod = _optional("gateway.storage")
        if delivery_mod is None or triggers_mod is None or storage_mod is None:
            log.warning("engagement libraries not available: triggers and delivery are off")
            return None, None
        config, clock = self.config, self.clock
        db = storage_mod.open_from_config(config)
        webhooks = {w.tenant_id: w for w in config.gateway.partner_webhooks}

        def partner_secret(tenant_id: str) -> str:
            hook = webhooks.get(tenant_id)
            return hook.secret if hook else ""

        delivery = delivery_mod.build_delivery_service(
            db, config.gateway.delivery, clock, partner_secret
        )
        trigger_store = triggers_mod.TriggerStore(db)
        engine = triggers_mod.TriggerEngine(trigger_store, config.gateway.triggers, clock)
        budget_s = config.gateway.budgets.policy_budget_ms / 1000.0

        async def check_contact(query: Any) -> Any:
            answer = await policy.check_contact(
                policy_pb2.CheckContactRequest(
                    tenant_id=query.tenant_id,
                    customer_id=query.customer_id,
                    channel=_CHANNEL_TO_POLICY.get(query.channel, 0),  # type: ignore[arg-type]
                    topic=_TOPIC_TO_POLICY.get(query.topic, 0),  # type: ignore[arg-type]
                    offer_id=query.offer_id,
                ),
                budget_s,
            )
            next_us = (
                answer.next_allowed_at.ToMicroseconds() if answer.HasField("next_allowed_at") else 0
            )
            return triggers_mod.ContactVerdict(
                allowed=answer.allowed,
                block=_BLOCK.get(answer.block, ""),
                detail=answer.detail,
                next_allowed_at_us=next_us,
            )

        async def record_contact(query: Any, contact_id: str, at_us: int) -> None:
            request = policy_pb2.RecordContactRequest(
                tenant_id=query.tenant_id,
                customer_id=query.customer_id,
                contact_id=contact_id,
                channel=_CHANNEL_TO_POLICY.get(query.channel, 0),  # type: ignore[arg-type]
                topic=_TOPIC_TO_POLICY.get(query.topic, 0),  # type: ignore[arg-type]
                offer_id=query.offer_id,
            )
            request.contacted_at.FromMicroseconds(at_us)
            await policy.record_contact(request, budget_s)

        def resolve_endpoint(tenant_id: str, customer_id: str, channel: str) -> str:
            if channel == "partner_webhook":
                hook = webhooks.get(tenant_id)
                return hook.url if hook else ""
            # Provider channels get the customer's token; the provider maps it.
            return customer_id

        runner = triggers_mod.TriggerRunner(
            trigger_store,
            config.gateway.triggers,
            clock,
            check_contact,
            delivery,
            resolve_endpoint,
            record_contact,
        )
        self.engagement = {"db": db, "delivery": delivery, "engine": engine, "runner": runner}
        self._tasks.append(asyncio.create_task(delivery.run(self._stop), name="gateway-delivery"))
        self._tasks.append(asyncio.create_task(runner.run(self._stop), name="gateway-triggers"))

        class _Triggers:
            async def on_event(self, event: IngestedEvent) -> int:
                sends = await engine.on_event(
                    triggers_mod.TriggerEvent(
                        event_id=event.event_id,
                        tenant_id=event.tenant_id,
                        customer_id=event.customer_id or event.customer_token,
                        event_type=event.event_type,
                        occurred_at_us=event.occurred_at_us,
                        amount_minor=event.amount_minor,
                        currency=event.currency,
                        attributes=event.attributes,
                    )
                )
                return len(sends)

        return _Triggers(), delivery

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
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                await asyncio.wait_for(task, STOP_DRAIN_S)
        self._tasks.clear()
        if self.engagement is not None:
            with contextlib.suppress(Exception):
                await self.engagement["delivery"].aclose()
        await self._drain_outbox()
        if self.store is not None:
            await self.store.stop()
        if self.store_db is not None:
            self.store_db.close()
        if self.nats is not None:
            with contextlib.suppress(Exception):
                await self.nats.close()
        if self.channels is not None:
            await self.channels.close()

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()


_ = TriplaneError
