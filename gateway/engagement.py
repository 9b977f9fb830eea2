"""The gateway's engagement side, assembled from config: trigger rules over
behavioural events, channel delivery (signed webhooks, retries, the dead-letter
queue), experiment assignment and measurement (exposures, conversions, lift),
with the background tasks that run them.

Every piece is a plain import: a dependency that is missing fails the start,
loudly, instead of turning a feature off. The policy plane is reached through
the `PolicyPort` the flows use, so consent, quiet hours and caps are checked
at send time by the same client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from gateway import codec
from gateway.delivery import DeliveryWorker, build_delivery_worker
from gateway.experiments import Experiments
from gateway.measure import (
    ConversionEvent,
    Exposure,
    LiftMetrics,
    LiftReport,
    Measurement,
    MeasurementStore,
)
from gateway.ports import IngestedEvent, PolicyPort
from gateway.storage import open_from_config
from gateway.triggers import (
    ContactQuery,
    ContactVerdict,
    TriggerEngine,
    TriggerEvent,
    TriggerRunner,
    TriggerStore,
)
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.policy.v1 import policy_pb2
from triplane.runtime import codec as wire
from triplane.runtime.clock import Clock
from triplane.runtime.config import Config, PartnerWebhookConfig
from triplane.runtime.db import Database
from triplane.runtime.errors import NotFound
from triplane.runtime.secret_files import read_secret

log = logging.getLogger("gateway.engagement")


class PolicyContacts:
    """The trigger runner's contact check and contact record, asked of the
    policy plane on its budget. A channel or topic the policy plane does not
    know goes as UNSPECIFIED, which it refuses: the send is dropped, not sent."""

    def __init__(self, policy: PolicyPort, budget_s: float) -> None:
        self._policy = policy
        self._budget_s = budget_s

    async def check(self, query: ContactQuery) -> ContactVerdict:
        request = policy_pb2.CheckContactRequest(
            tenant_id=query.tenant_id,
            customer_id=query.customer_id,
            channel=codec.CHANNEL_TO_POLICY.get(query.channel, policy_pb2.CHANNEL_UNSPECIFIED),
            topic=codec.TOPIC_TO_POLICY.get(query.topic, policy_pb2.TOPIC_UNSPECIFIED),
            offer_id=query.offer_id,
        )
        # The moment the runner sends at, not whenever the plane reads it.
        wire.fill_timestamp(request.contact_at, query.at_us)
        answer = await self._policy.check_contact(request, self._budget_s)
        next_us = wire.micros(answer.next_allowed_at, "next_allowed_at")
        return ContactVerdict(
            allowed=answer.allowed,
            block=codec.CONTACT_BLOCKS.get(answer.block, ""),
            detail=answer.detail,
            next_allowed_at_us=next_us,
        )

    async def record(self, query: ContactQuery, contact_id: str, at_us: int) -> None:
        request = policy_pb2.RecordContactRequest(
            tenant_id=query.tenant_id,
            customer_id=query.customer_id,
            contact_id=contact_id,
            channel=codec.CHANNEL_TO_POLICY.get(query.channel, policy_pb2.CHANNEL_UNSPECIFIED),
            topic=codec.TOPIC_TO_POLICY.get(query.topic, policy_pb2.TOPIC_UNSPECIFIED),
            offer_id=query.offer_id,
        )
        wire.fill_timestamp(request.contacted_at, at_us)
        await self._policy.record_contact(request, self._budget_s)


class PartnerWebhooks:
    """Each tenant's partner webhook (`gateway.partner_webhooks`): its URL is
    the customer's address on the partner_webhook channel, its secret signs."""

    def __init__(self, hooks: Sequence[PartnerWebhookConfig]) -> None:
        self._hooks = {hook.tenant_id: hook for hook in hooks}
        # Each secret from its file (a mounted Secret), read once at start.
        self._secrets = {
            hook.tenant_id: read_secret(hook.secret_path) if hook.secret_path else ""
            for hook in hooks
        }

    def secret(self, tenant_id: str) -> str:
        return self._secrets.get(tenant_id, "")

    def endpoint(self, tenant_id: str, customer_id: str, channel: str) -> str:
        """Where a send to the customer on `channel` goes; "" for nowhere."""
        if channel == "partner_webhook":
            hook = self._hooks.get(tenant_id)
            return hook.url if hook else ""
        # Provider channels get the customer's token; the provider maps it.
        return customer_id


class TriggerRules:
    """The ingest flow's TriggersPort: a behavioural event to the trigger engine."""

    def __init__(self, engine: TriggerEngine) -> None:
        self.engine = engine

    async def on_event(self, event: IngestedEvent) -> int:
        sends = await self.engine.on_event(
            TriggerEvent(
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


class ExposureMeasurement:
    """The flows' MeasurementPort: exposures of offers (shown, or withheld
    from the holdout), conversions recorded through RecordOutcome or matched
    from behavioural events, and the lift report over them."""

    def __init__(self, measurement: Measurement) -> None:
        self.measurement = measurement

    async def exposure(self, tenant_id: str, at_us: int, exposure: gw.ExposureLogged) -> None:
        if not exposure.offer_id:
            return
        await self.measurement.record_exposures(
            [
                Exposure(
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
        if outcome.kind != gw.OUTCOME_KIND_CONVERTED or not outcome.offer_id:
            return
        try:
            await self.measurement.record_outcome(
                tenant_id, outcome.decision_id, f"outcome:{outcome.decision_id}", at_us
            )
        except NotFound:
            # No exposure was recorded for that decision (nothing shown): the
            # bandit still learns; there is nothing to attribute.
            log.info("outcome for %s has no exposure to attribute", outcome.decision_id)

    async def conversions(self, events: list[tuple[str, str, str, str, int]]) -> None:
        """Behavioural events that may convert earlier exposures: (event_id,
        tenant_id, customer_token, event_type, occurred_at_us)."""
        await self.measurement.record_conversion_events(
            [
                ConversionEvent(
                    event_id=event_id,
                    tenant_id=tenant_id,
                    customer_id=customer,
                    event_type=event_type,
                    occurred_at_us=at_us,
                )
                for event_id, tenant_id, customer, event_type, at_us in events
            ]
        )

    async def lift_report(self, tenant_id: str) -> LiftReport:
        return await self.measurement.lift_report(tenant_id)


@dataclass
class Engagement:
    """The engagement pieces on their database (`gateway.store`)."""

    db: Database
    experiments: Experiments
    measurement: ExposureMeasurement
    triggers: TriggerRules
    runner: TriggerRunner
    delivery: DeliveryWorker
    # Seconds between two refreshes of the lift gauges.
    metrics_interval_s: float
    # Each tenant's partner webhook (payout state changes go there too).
    webhooks: PartnerWebhooks | None = None

    @classmethod
    def open(cls, config: Config, clock: Clock, policy: PolicyPort) -> Engagement:
        """Opens the engagement database and builds every piece on it."""
        gateway = config.gateway
        db = open_from_config(config)
        try:
            webhooks = PartnerWebhooks(gateway.partner_webhooks)
            contacts = PolicyContacts(policy, gateway.budgets.policy_budget_ms / 1000.0)
            delivery = build_delivery_worker(db, gateway.delivery, clock, webhooks.secret)
            trigger_store = TriggerStore(db)
            runner = TriggerRunner(
                trigger_store,
                gateway.triggers,
                clock,
                contacts.check,
                delivery,
                webhooks.endpoint,
                contacts.record,
            )
            measurement = Measurement(MeasurementStore(db), gateway.measurement, clock)
            return cls(
                db=db,
                experiments=Experiments.from_config(gateway),
                measurement=ExposureMeasurement(measurement),
                triggers=TriggerRules(TriggerEngine(trigger_store, gateway.triggers, clock)),
                runner=runner,
                delivery=delivery,
                metrics_interval_s=gateway.measurement.metrics_interval_s,
                webhooks=webhooks,
            )
        except BaseException:
            db.close()
            raise

    def start(
        self, stop: asyncio.Event, lift_metrics: LiftMetrics | None
    ) -> list[asyncio.Task[None]]:
        """The background tasks, running until `stop` is set: the delivery
        worker, the trigger runner and, given gauges to fill, the lift figures
        recomputed every `metrics_interval_s`."""
        tasks = [
            asyncio.create_task(self.delivery.run(stop), name="gateway-delivery"),
            asyncio.create_task(self.runner.run(stop), name="gateway-triggers"),
        ]
        if lift_metrics is not None:
            tasks.append(
                asyncio.create_task(
                    self._publish_lift(stop, lift_metrics), name="gateway-lift-metrics"
                )
            )
        return tasks

    async def _publish_lift(self, stop: asyncio.Event, metrics: LiftMetrics) -> None:
        while not stop.is_set():
            try:
                await self.measurement.measurement.publish_lift(metrics)
            except Exception:
                log.exception("publishing lift metrics failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.metrics_interval_s)

    async def close(self) -> None:
        """Closes the delivery adapters' connections and the database (the
        background tasks have ended)."""
        try:
            await self.delivery.aclose()
        finally:
            self.db.close()
