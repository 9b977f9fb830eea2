"""IngestEvents: behavioural events, batched, each with its own result.

Each event is validated, normalized (a dotted event type, a timestamp), its
identity keys resolved to one customer token, its PII tokenized, then published
on NATS as `gateway.behaviour.<kind>` with the envelope (the payload is the AI
plane's `BehaviourEvent`, which its feature pipeline consumes) and handed to the
trigger rules. The event id is derived from the tenant and the event's
idempotency key: JetStream drops a re-published id, and a re-sent event is
answered from memory (another payload under its key is ALREADY_EXISTS).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from gateway import codec, validate
from gateway.core import CallContext, Core, stable_id
from gateway.idempotency import check_same
from gateway.pii import NameSet
from gateway.ports import IngestedEvent, MeasurementPort, TriggersPort
from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.runtime import bus
from triplane.runtime import codec as wire
from triplane.runtime.errors import (
    Code,
    InvalidArgument,
    NotFound,
    TriplaneError,
    Unavailable,
)
from triplane.runtime.tenants import TenantDirectory

log = logging.getLogger("gateway.ingest")

INGEST_SCOPE = "IngestEvents"


@dataclass(frozen=True, slots=True)
class Prepared:
    index: int
    key: str
    fields: dict[str, str]
    event: IngestedEvent
    outgoing: bus.OutgoingEvent


class Ingest:
    def __init__(
        self,
        core: Core,
        triggers: TriggersPort | None,
        measurement: MeasurementPort | None = None,
        tenants: TenantDirectory | None = None,
    ) -> None:
        self.core = core
        self.limits = core.config.limits
        self.triggers = triggers
        self.measurement = measurement
        # The tenant registry (None: no NATS, so no event is published anyway).
        self.tenants = tenants

    async def _require_known_tenant(self, tenant_id: str, call: CallContext) -> None:
        """Events are accepted only for a tenant the money plane registered:
        one that does not exist is NOT_FOUND before anything is published or
        remembered, so no plane ever makes state for an invented tenant. A
        registry that cannot be read fails closed (UNAVAILABLE)."""
        if self.tenants is None:
            return
        timeout_s = self.core.timeout_s(call, self.core.config.budgets.nats_publish_budget_ms)
        try:
            known = await self.tenants.exists(tenant_id, timeout_s)
        except Exception as error:
            raise Unavailable(
                "TENANT_REGISTRY_UNAVAILABLE",
                "the tenant registry on the event spine cannot be read; retry",
                "tenant_id",
            ) from error
        if not known:
            raise NotFound("TENANT_NOT_FOUND", f"no tenant {tenant_id!r}", "tenant_id")

    def _validate(self, event: gw.BehaviourEvent) -> None:
        limits = self.limits
        validate.require_id(event.idempotency_key, "idempotency_key", limits)
        if event.kind == gw.EVENT_KIND_PARTNER:
            # The partner's kind names a NATS subject: an identifier.
            validate.check_no_pii(event.partner_kind, "partner_kind")
            if not validate.PARTNER_KIND_PATTERN.fullmatch(event.partner_kind):
                raise InvalidArgument(
                    "PARTNER_KIND_INVALID",
                    "partner_kind must match [a-z0-9_]{1,64}",
                    "partner_kind",
                )
        elif event.kind not in codec.EVENT_KINDS:
            raise InvalidArgument("EVENT_KIND_REQUIRED", "kind is required", "kind")
        customer = event.customer
        validate.check_id(customer.customer_id, "customer.customer_id", limits)
        validate.check_id(event.account_id, "account_id", limits)
        for name in ("name", "email", "phone"):
            validate.check_string(getattr(customer, name), f"customer.{name}", limits)
        if not (customer.customer_id or event.account_id or customer.email or customer.phone):
            raise InvalidArgument(
                "IDENTITY_REQUIRED",
                "an event needs customer.customer_id, account_id, customer.email or customer.phone",
                "customer",
            )
        validate.check_id(event.device_id, "device_id", limits)
        validate.check_id(event.merchant_id, "merchant_id", limits)
        validate.check_money(event.amount, "amount", limits, required=False)
        validate.check_mcc(event.merchant_category, "merchant_category")
        validate.check_string(event.flow, "flow", limits)
        validate.check_string(event.step, "step", limits)
        validate.check_attributes(event.attributes, "attributes", limits)

    def _customer_token(self, tenant_id: str, event: gw.BehaviourEvent) -> str:
        """Identity resolution: the partner's customer id first, then e-mail,
        phone, and the account as the last resort."""
        tokens, customer = self.core.tokenizer, event.customer
        if customer.customer_id:
            return tokens.token(tenant_id, "customer", customer.customer_id)
        if customer.email:
            return tokens.token(tenant_id, "email", customer.email)
        if customer.phone:
            return tokens.token(tenant_id, "phone", customer.phone)
        return tokens.token(tenant_id, "account", event.account_id)

    def _prepare(
        self, tenant_id: str, index: int, event: gw.BehaviourEvent, trace_id: str
    ) -> Prepared:
        core = self.core
        tokens = core.tokenizer
        if event.kind == gw.EVENT_KIND_PARTNER:
            event_type, behaviour = (
                f"partner.{event.partner_kind}",
                ai_pb2.BEHAVIOUR_KIND_UNSPECIFIED,
            )
            subject_kind = f"partner.{event.partner_kind}"
        else:
            event_type, behaviour = codec.EVENT_KINDS[event.kind]
            subject_kind = (
                ai_pb2.BehaviourKind.Name(behaviour).removeprefix("BEHAVIOUR_KIND_").lower()
            )
        # Unset: the event happened now, as the gateway received it.
        occurred_at_us = wire.micros(event.occurred_at, "occurred_at") or core.clock.now_us()
        customer_token = self._customer_token(tenant_id, event)
        # Every free text is scanned (PII inside is replaced by its token), and
        # the customer's name, wherever else the event carries it.
        names = NameSet([event.customer.name])
        attributes = tokens.scrub(tenant_id, event.attributes, names)
        attributes["customer_token"] = customer_token
        for name in ("flow", "step"):
            if getattr(event, name):
                attributes[name] = tokens.scrub_text(tenant_id, getattr(event, name), names)
        event_id = stable_id("evt_", tenant_id, event.idempotency_key)
        payload = ai_pb2.BehaviourEvent(
            kind=behaviour,
            account_id=event.account_id,
            device_id=tokens.token(tenant_id, "device", event.device_id),
            merchant_id=event.merchant_id,
            amount=event.amount if event.HasField("amount") else None,
            merchant_category=event.merchant_category,
            channel=int(event.channel),  # type: ignore[arg-type]
            attributes=attributes,
        )
        full_type = f"gateway.behaviour.{subject_kind}"
        envelope = bus.make_envelope(
            event_type=full_type,
            tenant_id=tenant_id,
            payload=payload,
            occurred_at_us=occurred_at_us,
            event_id=event_id,
            account_id=event.account_id,
            idempotency_key=event.idempotency_key,
            amount=event.amount if event.HasField("amount") else None,
            trace_id=trace_id,
        )
        ingested = IngestedEvent(
            event_id=event_id,
            tenant_id=tenant_id,
            event_type=event_type,
            customer_id=event.customer.customer_id,
            customer_token=customer_token,
            account_id=event.account_id,
            occurred_at_us=occurred_at_us,
            amount_minor=event.amount.amount_minor,
            currency=event.amount.currency,
            attributes=attributes,
        )
        outgoing = bus.OutgoingEvent(
            event_id, bus.subject_for(full_type, tenant_id), envelope.SerializeToString()
        )
        fields = core.fingerprint(tenant_id, event)
        return Prepared(index, event.idempotency_key, fields, ingested, outgoing)

    async def ingest(
        self, req: gw.IngestEventsRequest, call: CallContext
    ) -> gw.IngestEventsResponse:
        core, limits = self.core, self.limits
        validate.require_tenant_id(req.tenant_id)
        if not req.events:
            raise InvalidArgument("EVENTS_REQUIRED", "events is empty", "events")
        if len(req.events) > limits.max_events_per_request:
            raise InvalidArgument(
                "TOO_MANY_EVENTS",
                f"at most {limits.max_events_per_request} events per request",
                "events",
            )
        await self._require_known_tenant(req.tenant_id, call)
        scope = f"{req.tenant_id}\x1f{INGEST_SCOPE}"
        results = [gw.IngestResult(index=i) for i in range(len(req.events))]
        fresh: list[Prepared] = []
        for index, event in enumerate(req.events):
            try:
                self._validate(event)
                prepared = self._prepare(req.tenant_id, index, event, call.trace_id)
                results[index].event_id = prepared.event.event_id
                found = await core.store.get(scope, prepared.key)
                if found is not None:
                    check_same(found, prepared.fields)
                    results[index].replayed = True
                    results[index].scheduled_sends = int(found.body or b"0")
                    continue
                fresh.append(prepared)
            except TriplaneError as error:
                results[index].error.CopyFrom(
                    codec.item_error(error.with_field_prefix(f"events[{index}]"))
                )
        await self._publish_and_trigger(scope, fresh, results, call)
        return gw.IngestEventsResponse(results=results)

    async def _publish_and_trigger(
        self,
        scope: str,
        fresh: Sequence[Prepared],
        results: list[gw.IngestResult],
        call: CallContext,
    ) -> None:
        if not fresh:
            return
        core = self.core
        timeout_s = core.timeout_s(call, core.config.budgets.nats_publish_budget_ms)
        acked = await core.events.publish([p.outgoing for p in fresh], timeout_s)
        converted: list[IngestedEvent] = []
        for prepared, ok in zip(fresh, acked, strict=True):
            result = results[prepared.index]
            if not ok:
                result.error.CopyFrom(
                    types_pb2.ItemError(
                        code=int(Code.UNAVAILABLE),
                        reason="EVENT_NOT_PUBLISHED",
                        field=f"events[{prepared.index}]",
                        message="the event spine did not acknowledge the event; retry it",
                    )
                )
                continue
            try:
                scheduled = await self.triggers.on_event(prepared.event) if self.triggers else 0
            except TriplaneError as error:
                result.error.CopyFrom(
                    codec.item_error(error.with_field_prefix(f"events[{prepared.index}]"))
                )
                continue
            result.scheduled_sends = scheduled
            core.store.put(scope, prepared.key, prepared.fields, str(scheduled).encode())
            converted.append(prepared.event)
        if self.measurement is not None and converted:
            # An event may convert an offer shown earlier (its conversion
            # definition, within the attribution window). Measurement is
            # idempotent on event_id, so a retried batch counts once.
            try:
                await self.measurement.conversions(
                    [
                        (e.event_id, e.tenant_id, e.customer_token, e.event_type, e.occurred_at_us)
                        for e in converted
                    ]
                )
            except TriplaneError as error:
                # The events are published and answered; attribution is
                # measurement's concern and must not fail the ingest.
                log.warning("conversion matching skipped: %s", error.reason)
