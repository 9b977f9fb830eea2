"""Behavioural triggers: rules from config over each customer's recent events
schedule follow-up messages that survive restarts, are re-checked against the
policy plane at send time and go out through the delivery queue.

A rule is a sequence of steps (event type plus attribute values); the event
that completes the sequence within `within_s` fires it. The send is stored
(due `delay_s` later) and deduplicated per customer x rule x
`dedupe_window_s`, whatever the channel. At send time the runner asks the
injected contact check about each channel in order of preference: the first
allowed channel is used; quiet hours postpone the send to the time the policy
plane names (never past `send_within_s` after the firing event); no consent,
a cap or vulnerability drop it, with the reason kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import string
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from gateway.delivery.model import Delivery, DeliveryRecord
from triplane.runtime import codec as wire
from triplane.runtime import currencies
from triplane.runtime.clock import Clock
from triplane.runtime.config import TriggerRuleConfig, TriggersConfig
from triplane.runtime.db import Database, Tx
from triplane.runtime.errors import InvalidArgument, TriplaneError
from triplane.runtime.ids import check_tenant_id

log = logging.getLogger("gateway.triggers")

_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
SEND_EVENT_TYPE = "trigger.message"

DDL = """
CREATE TABLE IF NOT EXISTS gw_trigger_events (
  tenant_id TEXT NOT NULL,
  event_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  occurred_at_us BIGINT NOT NULL,
  body TEXT NOT NULL,
  PRIMARY KEY (tenant_id, event_id)
);
CREATE INDEX IF NOT EXISTS gw_trigger_events_customer
  ON gw_trigger_events (tenant_id, customer_id, occurred_at_us);
CREATE TABLE IF NOT EXISTS gw_trigger_dedupe (
  tenant_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  trigger_id TEXT NOT NULL,
  fired_at_us BIGINT NOT NULL,
  PRIMARY KEY (tenant_id, customer_id, trigger_id)
);
CREATE TABLE IF NOT EXISTS gw_trigger_sends (
  send_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  status TEXT NOT NULL,
  due_at_us BIGINT NOT NULL,
  body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS gw_trigger_sends_due ON gw_trigger_sends (status, due_at_us)
"""


class TriggerEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A behavioural event, already tokenized (customer_id is a token)."""

    event_id: str
    tenant_id: str
    customer_id: str
    event_type: str
    occurred_at_us: int
    amount_minor: int = 0
    currency: str = ""
    attributes: dict[str, str] = {}


class ScheduledSend(msgspec.Struct, frozen=True, kw_only=True):
    send_id: str
    tenant_id: str
    customer_id: str
    trigger_id: str
    fired_by_event_id: str
    text: str
    topic: str
    offer_id: str
    channels: list[str]
    due_at_us: int
    expires_at_us: int
    # scheduled, sent, dropped
    status: str = "scheduled"
    # Why it was postponed or dropped: quiet_hours, no_consent, capped, ...
    reason: str = ""
    detail: str = ""
    channel: str = ""
    delivery_id: str = ""
    reschedules: int = 0
    created_at_us: int = 0
    updated_at_us: int = 0


@dataclass(frozen=True, slots=True)
class ContactQuery:
    tenant_id: str
    customer_id: str
    channel: str
    topic: str
    offer_id: str
    # The moment the send would go out: the policy plane judges quiet hours,
    # caps and cooldowns at it (CheckContactRequest.contact_at).
    at_us: int


@dataclass(frozen=True, slots=True)
class ContactVerdict:
    """The policy plane's CheckContact answer: block is "", no_consent,
    quiet_hours, capped or vulnerable; next_allowed_at_us with quiet_hours."""

    allowed: bool
    block: str = ""
    detail: str = ""
    next_allowed_at_us: int = 0


ContactCheck = Callable[[ContactQuery], Awaitable[ContactVerdict]]
# Records a contact (RecordContact) under a contact id, so caps count it.
ContactRecorder = Callable[[ContactQuery, str, int], Awaitable[None]]
# The customer's address on a channel (a token or the partner's webhook URL);
# "" when the customer cannot be reached there.
EndpointResolver = Callable[[str, str, str], str]


class Enqueuer(Protocol):
    async def enqueue(self, delivery: Delivery) -> DeliveryRecord: ...


# ---- storage ----


class TriggerStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(DDL)

    def record_event(
        self, event: TriggerEvent, since_us: int, max_events: int
    ) -> list[TriggerEvent] | None:
        """Stores the event and returns the customer's events since `since_us`
        (oldest first), or None when the event was seen before."""
        with self.db.tx() as tx:
            inserted = tx.execute(
                "INSERT INTO gw_trigger_events "
                "(tenant_id, event_id, customer_id, occurred_at_us, body) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (
                    event.tenant_id,
                    event.event_id,
                    event.customer_id,
                    event.occurred_at_us,
                    msgspec.json.encode(event).decode(),
                ),
            )
            if inserted != 1:
                return None
            _prune(tx, event.tenant_id, event.customer_id, since_us, max_events)
            rows = tx.all(
                "SELECT body FROM gw_trigger_events WHERE tenant_id = ? AND customer_id = ? "
                "AND occurred_at_us >= ? ORDER BY occurred_at_us, event_id",
                (event.tenant_id, event.customer_id, since_us),
            )
        return [msgspec.json.decode(r[0], type=TriggerEvent) for r in rows]

    def schedule(self, send: ScheduledSend, dedupe_window_us: int) -> bool:
        """Stores `send` unless the customer got this trigger within the window."""
        with self.db.tx() as tx:
            won = tx.execute(
                "INSERT INTO gw_trigger_dedupe (tenant_id, customer_id, trigger_id, fired_at_us) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (tenant_id, customer_id, trigger_id) "
                "DO UPDATE SET fired_at_us = excluded.fired_at_us "
                "WHERE gw_trigger_dedupe.fired_at_us <= excluded.fired_at_us - ?",
                (
                    send.tenant_id,
                    send.customer_id,
                    send.trigger_id,
                    send.created_at_us,
                    dedupe_window_us,
                ),
            )
            if won != 1:
                return False
            tx.execute(
                "INSERT INTO gw_trigger_sends (send_id, tenant_id, status, due_at_us, body) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (send.send_id, send.tenant_id, send.status, send.due_at_us, _encode(send)),
            )
        return True

    def claim_due(self, now_us: int, lease_us: int, limit: int) -> list[ScheduledSend]:
        lock = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgres" else ""
        with self.db.tx() as tx:
            rows = tx.all(
                "SELECT body FROM gw_trigger_sends WHERE status = 'scheduled' AND due_at_us <= ? "
                f"ORDER BY due_at_us, send_id LIMIT ?{lock}",
                (now_us, limit),
            )
            sends = [msgspec.json.decode(r[0], type=ScheduledSend) for r in rows]
            for send in sends:
                tx.execute(
                    "UPDATE gw_trigger_sends SET due_at_us = ? WHERE send_id = ?",
                    (now_us + lease_us, send.send_id),
                )
        return sends

    def save(self, send: ScheduledSend) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "UPDATE gw_trigger_sends SET status = ?, due_at_us = ?, body = ? WHERE send_id = ?",
                (send.status, send.due_at_us, _encode(send), send.send_id),
            )

    def get(self, tenant_id: str, send_id: str) -> ScheduledSend | None:
        with self.db.tx() as tx:
            row = tx.one(
                "SELECT body FROM gw_trigger_sends WHERE tenant_id = ? AND send_id = ?",
                (tenant_id, send_id),
            )
        return msgspec.json.decode(row[0], type=ScheduledSend) if row else None

    def sends(self, tenant_id: str, limit: int) -> list[ScheduledSend]:
        with self.db.tx() as tx:
            rows = tx.all(
                "SELECT body FROM gw_trigger_sends WHERE tenant_id = ? ORDER BY send_id LIMIT ?",
                (tenant_id, limit),
            )
        return [msgspec.json.decode(r[0], type=ScheduledSend) for r in rows]


def _prune(tx: Tx, tenant_id: str, customer_id: str, since_us: int, max_events: int) -> None:
    tx.execute(
        "DELETE FROM gw_trigger_events WHERE tenant_id = ? AND customer_id = ? "
        "AND occurred_at_us < ?",
        (tenant_id, customer_id, since_us),
    )
    tx.execute(
        "DELETE FROM gw_trigger_events WHERE tenant_id = ? AND customer_id = ? AND event_id NOT IN "
        "(SELECT event_id FROM gw_trigger_events WHERE tenant_id = ? AND customer_id = ? "
        "ORDER BY occurred_at_us DESC, event_id DESC LIMIT ?)",
        (tenant_id, customer_id, tenant_id, customer_id, max_events),
    )


def _encode(send: ScheduledSend) -> str:
    return msgspec.json.encode(send).decode()


# ---- matching ----


@dataclass(frozen=True, slots=True)
class _Rule:
    config: TriggerRuleConfig
    fields: frozenset[str]


def _compile(rule: TriggerRuleConfig, index: int) -> _Rule:
    where = f"gateway.triggers.rules[{index}]"
    if not _ID.fullmatch(rule.trigger_id):
        raise InvalidArgument("TRIGGER_ID_INVALID", "trigger_id: [A-Za-z0-9_.:-]{1,64}", where)
    if not rule.steps:
        raise InvalidArgument("TRIGGER_STEPS_EMPTY", "a rule needs at least one step", where)
    if not rule.channels:
        raise InvalidArgument("TRIGGER_CHANNELS_EMPTY", "a rule needs a channel", where)
    if min(rule.within_s, rule.send_within_s, rule.dedupe_window_s) <= 0 or rule.delay_s < 0:
        raise InvalidArgument("TRIGGER_WINDOW_INVALID", "windows must be positive", where)
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(rule.template) if name}
    except ValueError as exc:
        raise InvalidArgument("TEMPLATE_INVALID", str(exc), f"{where}.template") from exc
    return _Rule(rule, frozenset(fields))


def _matches(event: TriggerEvent, step_type: str, match: dict[str, str]) -> bool:
    if event.event_type != step_type:
        return False
    return all(event.attributes.get(k) == v for k, v in match.items())


def match_rule(
    rule: TriggerRuleConfig, history: Sequence[TriggerEvent], last: TriggerEvent
) -> list[TriggerEvent] | None:
    """The events that make up the rule's steps, the last one being `last`;
    None when the sequence is incomplete or not within `within_s`."""
    steps = rule.steps
    if not _matches(last, steps[-1].event_type, steps[-1].match):
        return None
    start_us = last.occurred_at_us - rule.within_s * 1_000_000
    chain = [last]
    cursor_us = last.occurred_at_us
    for step in reversed(steps[:-1]):
        found = None
        for event in reversed(history):
            if event.event_id == chain[-1].event_id or event.occurred_at_us > cursor_us:
                continue
            if event.occurred_at_us < start_us:
                break
            if event.event_id not in {e.event_id for e in chain} and _matches(
                event, step.event_type, step.match
            ):
                found = event
                break
        if found is None:
            return None
        chain.append(found)
        cursor_us = found.occurred_at_us
    chain.reverse()
    return chain


def format_amount(amount_minor: int, currency: str) -> str:
    """5000.00 USD as "5,000", 1234.5 as "1,234.50" (ISO 4217 exponents)."""
    exponent = currencies.EXPONENTS.get(currency, 2)
    major, minor = divmod(abs(amount_minor), 10**exponent)
    sign = "-" if amount_minor < 0 else ""
    if minor == 0 or exponent == 0:
        return f"{sign}{major:,}"
    return f"{sign}{major:,}.{minor:0{exponent}d}"


def render(template: str, chain: Sequence[TriggerEvent]) -> str:
    """The template over the chain's attributes (later events win) and the
    amount and currency of the first event that carries one."""
    values: dict[str, Any] = {}
    for event in chain:
        values.update(event.attributes)
    for event in chain:
        if event.currency:
            values["amount"] = format_amount(event.amount_minor, event.currency)
            values["currency"] = event.currency
            break
    return template.format_map(values)


# ---- the engine: events in, sends scheduled ----


class TriggerEngine:
    def __init__(self, store: TriggerStore, config: TriggersConfig, clock: Clock) -> None:
        self.store = store
        self._config = config
        self._clock = clock
        self._rules = [_compile(rule, i) for i, rule in enumerate(config.rules)]
        self._history_us = (
            max([config.event_retention_s] + [r.within_s for r in config.rules]) * 1_000_000
        )

    async def on_event(self, event: TriggerEvent) -> list[ScheduledSend]:
        """Stores the event, then schedules the sends of the rules it completes.
        A redelivered event (same event_id) schedules nothing again."""
        self._validate(event)
        now_us = self._clock.now_us()
        history = await asyncio.to_thread(
            self.store.record_event,
            event,
            now_us - self._history_us,
            self._config.max_events_per_customer,
        )
        if history is None:
            return []
        scheduled: list[ScheduledSend] = []
        for rule in self._rules:
            send = self._fire(rule, history, event, now_us)
            if send is None:
                continue
            window_us = rule.config.dedupe_window_s * 1_000_000
            if await asyncio.to_thread(self.store.schedule, send, window_us):
                scheduled.append(send)
        return scheduled

    def _fire(
        self, rule: _Rule, history: list[TriggerEvent], event: TriggerEvent, now_us: int
    ) -> ScheduledSend | None:
        chain = match_rule(rule.config, history, event)
        if chain is None:
            return None
        try:
            text = render(rule.config.template, chain)
        except (KeyError, ValueError, IndexError) as exc:
            log.warning("trigger %s: template needs %s", rule.config.trigger_id, exc)
            return None
        send_id = _send_id(event.tenant_id, rule.config.trigger_id, event.event_id)
        return ScheduledSend(
            send_id=send_id,
            tenant_id=event.tenant_id,
            customer_id=event.customer_id,
            trigger_id=rule.config.trigger_id,
            fired_by_event_id=event.event_id,
            text=text,
            topic=rule.config.topic,
            offer_id=rule.config.offer_id,
            channels=list(rule.config.channels),
            due_at_us=now_us + rule.config.delay_s * 1_000_000,
            expires_at_us=max(event.occurred_at_us, now_us) + rule.config.send_within_s * 1_000_000,
            created_at_us=now_us,
            updated_at_us=now_us,
        )

    def _validate(self, event: TriggerEvent) -> None:
        check_tenant_id(event.tenant_id)
        for name in ("event_id", "customer_id"):
            if not _ID.fullmatch(getattr(event, name)):
                raise InvalidArgument(
                    f"{name.upper()}_INVALID", f"{name} must match [A-Za-z0-9_.:-]{{1,64}}", name
                )
        if not _EVENT_TYPE.fullmatch(event.event_type):
            raise InvalidArgument(
                "EVENT_TYPE_INVALID", "event_type: [A-Za-z0-9_.-]{1,64}", "event_type"
            )
        if event.occurred_at_us <= 0:
            raise InvalidArgument(
                "OCCURRED_AT_INVALID", "occurred_at must be set", "occurred_at_us"
            )
        if event.currency:
            wire.check_currency(event.currency, "currency")
        if len(event.attributes) > self._config.max_attributes:
            raise InvalidArgument(
                "TOO_MANY_ATTRIBUTES", f"at most {self._config.max_attributes}", "attributes"
            )
        limit = self._config.max_attribute_length
        for key, value in event.attributes.items():
            if len(key) > limit or len(value) > limit:
                raise InvalidArgument(
                    "ATTRIBUTE_TOO_LONG", f"over {limit} characters", f"attributes.{key[:64]}"
                )


def _send_id(tenant_id: str, trigger_id: str, event_id: str) -> str:
    digest = hashlib.sha256(f"{tenant_id}\x1f{trigger_id}\x1f{event_id}".encode()).hexdigest()
    return f"send_{digest[:32]}"


# ---- the runner: due sends re-checked and enqueued ----


class TriggerRunner:
    def __init__(
        self,
        store: TriggerStore,
        config: TriggersConfig,
        clock: Clock,
        check_contact: ContactCheck,
        delivery: Enqueuer,
        resolve_endpoint: EndpointResolver,
        record_contact: ContactRecorder | None = None,
    ) -> None:
        assert config.runner_batch_size >= 1
        self.store = store
        self._config = config
        self._clock = clock
        self._check = check_contact
        self._delivery = delivery
        self._resolve = resolve_endpoint
        self._record = record_contact

    async def run_once(self) -> list[ScheduledSend]:
        """Handles one batch of due sends; returns them as they ended up."""
        lease_us = int(self._config.runner_lease_s * 1_000_000)
        due = await asyncio.to_thread(
            self.store.claim_due, self._clock.now_us(), lease_us, self._config.runner_batch_size
        )
        done: list[ScheduledSend] = []
        for send in due:
            try:
                result = await self._handle(send)
            except Exception:
                # The lease makes it due again; the policy plane may be restarting.
                log.exception("trigger send %s failed; retried after the lease", send.send_id)
                continue
            await asyncio.to_thread(self.store.save, result)
            done.append(result)
        return done

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                handled = await self.run_once()
            except Exception:
                log.exception("trigger runner pass failed")
                handled = []
            if len(handled) >= self._config.runner_batch_size:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.runner_poll_interval_s)

    async def _handle(self, send: ScheduledSend) -> ScheduledSend:
        now_us = self._clock.now_us()
        if now_us > send.expires_at_us:
            return _ended(send, now_us, "dropped", "expired", "not sent before its deadline")
        verdicts: list[tuple[str, ContactVerdict]] = []
        for channel in send.channels:
            endpoint = self._resolve(send.tenant_id, send.customer_id, channel)
            if not endpoint:
                verdicts.append((channel, ContactVerdict(False, "no_address", f"no {channel}")))
                continue
            query = ContactQuery(
                send.tenant_id, send.customer_id, channel, send.topic, send.offer_id, now_us
            )
            verdict = await self._check(query)
            if verdict.allowed:
                return await self._deliver(send, query, endpoint, now_us)
            verdicts.append((channel, verdict))
        return self._blocked(send, verdicts, now_us)

    async def _deliver(
        self, send: ScheduledSend, query: ContactQuery, endpoint: str, now_us: int
    ) -> ScheduledSend:
        delivery = Delivery(
            tenant_id=send.tenant_id,
            channel=query.channel,
            endpoint=endpoint,
            event_type=SEND_EVENT_TYPE,
            payload={
                "send_id": send.send_id,
                "trigger_id": send.trigger_id,
                "customer_id": send.customer_id,
                "topic": send.topic,
                "offer_id": send.offer_id,
                "text": send.text,
            },
            # One message per send whatever the channel: a re-run after a
            # crash finds the delivery already queued.
            dedupe_key=send.send_id,
        )
        try:
            record = await self._delivery.enqueue(delivery)
        except TriplaneError as exc:
            return _ended(
                send, now_us, "dropped", "delivery_refused", f"{exc.reason}: {exc.message}"
            )
        if self._record is not None:
            await self._record(query, send.send_id, now_us)
        sent = _ended(send, now_us, "sent", "", "")
        return msgspec.structs.replace(sent, channel=query.channel, delivery_id=record.delivery_id)

    def _blocked(
        self, send: ScheduledSend, verdicts: list[tuple[str, ContactVerdict]], now_us: int
    ) -> ScheduledSend:
        detail = "; ".join(f"{ch}: {v.block} {v.detail}".strip() for ch, v in verdicts)
        quiet = [v.next_allowed_at_us for _, v in verdicts if v.block == "quiet_hours"]
        if quiet:
            resume_us = max(min(quiet), now_us + 1)
            if resume_us > send.expires_at_us:
                return _ended(
                    send, now_us, "dropped", "expired", f"quiet hours past the deadline; {detail}"
                )
            if send.reschedules >= self._config.max_reschedules:
                return _ended(send, now_us, "dropped", "too_many_reschedules", detail)
            return msgspec.structs.replace(
                send,
                due_at_us=resume_us,
                reason="quiet_hours",
                detail=detail,
                reschedules=send.reschedules + 1,
                updated_at_us=now_us,
            )
        blocks = [v.block for _, v in verdicts if v.block != "no_address"]
        reason = blocks[0] if blocks else "no_address"
        return _ended(send, now_us, "dropped", reason, detail)


def _ended(
    send: ScheduledSend, now_us: int, status: str, reason: str, detail: str
) -> ScheduledSend:
    return msgspec.structs.replace(
        send, status=status, reason=reason, detail=detail, updated_at_us=now_us
    )
