"""Consent and contact policy, answered from the store.

Per customer x channel x topic: a consent with its lawful basis and times.
Nothing is held in memory: every check reads the customer's contact profile,
consents and newest contacts from the store in one statement (a local read
on SQLite, one round trip on PostgreSQL), so an opt-out or a contact
recorded through any replica is what every replica answers from the next
check on, once the write has committed (ARCHITECTURE.md rule 9).
Marketing, credit and insurance need an explicit grant; servicing messages
rest on the contract and go through unless the customer withdrew them.
Quiet hours are evaluated in the customer's own IANA time zone (zoneinfo), so
daylight-saving changes move them with the customer's clock.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from policy_plane.store import PolicyStore
from triplane.runtime.clock import Clock
from triplane.runtime.config import ConsentConfig
from triplane.runtime.errors import InvalidArgument

CHANNELS = ("push", "in_app", "email", "sms", "whatsapp", "partner_webhook")
TOPICS = ("marketing", "servicing", "credit", "insurance")
LAWFUL_BASES = (
    "consent",
    "contract",
    "legal_obligation",
    "vital_interests",
    "public_task",
    "legitimate_interests",
)
# Topics a contract covers without an explicit grant (withdrawal still wins).
IMPLIED_TOPICS = frozenset({"servicing"})
# Servicing messages are neither capped nor held back by quiet hours.
UNCAPPED_TOPICS = frozenset({"servicing"})
DAY_US = 86_400_000_000
WEEK_US = 7 * DAY_US


class ContactProfile(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    customer_id: str
    time_zone: str = ""
    vulnerable: bool = False
    updated_at_us: int = 0


class ConsentRecord(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    topic: str
    status: str  # granted | withdrawn
    lawful_basis: str
    source: str = ""
    granted_at_us: int = 0
    updated_at_us: int = 0


class ContactRecord(msgspec.Struct, frozen=True, kw_only=True):
    contact_id: str
    channel: str
    topic: str
    offer_id: str = ""
    at_us: int


@dataclass(frozen=True, slots=True)
class ContactCheck:
    allowed: bool
    # "", no_consent, quiet_hours, capped, vulnerable
    block: str = ""
    detail: str = ""
    next_allowed_at_us: int = 0


@dataclass
class CustomerState:
    """What a check reads of one customer, read from the store at once."""

    profile: ContactProfile
    consents: dict[tuple[str, str], ConsentRecord] = field(default_factory=dict)
    # The newest contacts (policy.limits.max_contact_history_per_customer), oldest first.
    contacts: list[ContactRecord] = field(default_factory=list)


def parse_hhmm(text: str, field_name: str) -> dt.time:
    try:
        hours, minutes = text.split(":")
        return dt.time(int(hours), int(minutes))
    except ValueError as exc:
        raise InvalidArgument(
            "TIME_INVALID", f"{field_name}: {text!r} is not HH:MM", field_name
        ) from exc


def zone(name: str, field_name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        # OSError: a name longer than a file name may be (zoneinfo opens it).
        raise InvalidArgument(
            "TIME_ZONE_UNKNOWN", f"{name!r} is not an IANA time zone", field_name
        ) from exc


def in_quiet_hours(local: dt.time, start: dt.time, end: dt.time) -> bool:
    if start <= end:
        return start <= local < end
    return local >= start or local < end


def quiet_hours_end_us(now_us: int, tz: ZoneInfo, start: dt.time, end: dt.time) -> int:
    """When the current quiet period ends, as UTC microseconds."""
    local = dt.datetime.fromtimestamp(now_us / 1e6, tz)
    day = local.date()
    if start > end and local.time() >= start:
        day = day + dt.timedelta(days=1)
    end_local = dt.datetime.combine(day, end, tzinfo=tz)
    return int(end_local.timestamp() * 1_000_000)


class ConsentBook:
    def __init__(
        self, store: PolicyStore, config: ConsentConfig, max_history: int, clock: Clock
    ) -> None:
        self._store = store
        self._config = config
        self._max_history = max_history
        self._clock = clock
        self._default_zone = zone(config.default_time_zone, "policy.consent.default_time_zone")
        self._quiet_start = parse_hhmm(config.quiet_hours_start, "policy.consent.quiet_hours_start")
        self._quiet_end = parse_hhmm(config.quiet_hours_end, "policy.consent.quiet_hours_end")
        self._quiet_topics = frozenset(config.quiet_hours_topics)

    def state(self, tenant_id: str, customer_id: str) -> CustomerState:
        """The customer as the store holds it now (one read)."""
        profile_body, consent_bodies, contact_bodies = self._store.contact_state(
            tenant_id, customer_id, self._max_history
        )
        profile = (
            _profile_decoder.decode(profile_body)
            if profile_body is not None
            else ContactProfile(tenant_id=tenant_id, customer_id=customer_id)
        )
        consents = {}
        for body in consent_bodies:
            record = _consent_decoder.decode(body)
            consents[(record.channel, record.topic)] = record
        contacts = [_contact_decoder.decode(body) for body in contact_bodies]
        return CustomerState(profile, consents, contacts)

    def put_profile(self, profile: ContactProfile) -> ContactProfile:
        if profile.time_zone:
            zone(profile.time_zone, "profile.time_zone")
        stamped = msgspec.structs.replace(profile, updated_at_us=self._clock.now_us())
        self._store.put_profile(
            stamped.tenant_id, stamped.customer_id, msgspec.json.encode(stamped).decode()
        )
        return stamped

    def set_consent(self, tenant_id: str, customer_id: str, record: ConsentRecord) -> ConsentRecord:
        _check_choice(record.channel, CHANNELS, "consent.channel")
        _check_choice(record.topic, TOPICS, "consent.topic")
        _check_choice(record.status, ("granted", "withdrawn"), "consent.status")
        _check_choice(record.lawful_basis, LAWFUL_BASES, "consent.lawful_basis")
        now_us = self._clock.now_us()
        previous = self.state(tenant_id, customer_id).consents.get((record.channel, record.topic))
        granted_at = record.granted_at_us
        if record.status == "granted" and not granted_at:
            granted_at = (
                previous.granted_at_us if previous and previous.status == "granted" else now_us
            )
        elif record.status == "withdrawn" and not granted_at and previous is not None:
            # A withdrawal ends a grant; the record keeps when it was given
            # (what an audit of the consent asks first).
            granted_at = previous.granted_at_us
        stamped = msgspec.structs.replace(record, granted_at_us=granted_at, updated_at_us=now_us)
        body = msgspec.json.encode(stamped).decode()
        self._store.put_consent(tenant_id, customer_id, record.channel, record.topic, body)
        return stamped

    def get(self, tenant_id: str, customer_id: str) -> tuple[ContactProfile, list[ConsentRecord]]:
        customer = self.state(tenant_id, customer_id)
        return customer.profile, sorted(
            customer.consents.values(), key=lambda c: (c.channel, c.topic)
        )

    def profile(self, tenant_id: str, customer_id: str) -> ContactProfile:
        return self.state(tenant_id, customer_id).profile

    def check(
        self,
        tenant_id: str,
        customer_id: str,
        channel: str,
        topic: str,
        offer_id: str = "",
        offer_cooldown_s: int = 0,
        offer_max_per_week: int = 0,
        at_us: int = 0,
    ) -> ContactCheck:
        """One read of the store, then `judge`. `at_us`: the moment the
        contact would be made (0: now), so a send scheduled for later is
        judged by the hour it goes out at."""
        return self.judge(
            self.state(tenant_id, customer_id),
            channel,
            topic,
            offer_id,
            offer_cooldown_s,
            offer_max_per_week,
            at_us,
        )

    def judge(
        self,
        customer: CustomerState,
        channel: str,
        topic: str,
        offer_id: str = "",
        offer_cooldown_s: int = 0,
        offer_max_per_week: int = 0,
        at_us: int = 0,
    ) -> ContactCheck:
        """A check on a state already read. Order: consent, vulnerability,
        caps, quiet hours."""
        now_us = at_us or self._clock.now_us()
        profile = customer.profile
        consent = customer.consents.get((channel, topic))
        if not _consented(consent, topic):
            return ContactCheck(False, "no_consent", f"no {topic} consent on {channel}")
        if profile.vulnerable and topic in self._config.vulnerable_blocked_topics:
            return ContactCheck(
                False, "vulnerable", f"no {topic} contact with a vulnerable customer"
            )
        if topic not in UNCAPPED_TOPICS:
            capped = self._capped(
                customer, now_us, channel, offer_id, offer_cooldown_s, offer_max_per_week
            )
            if capped:
                return ContactCheck(False, "capped", capped)
        if topic in self._quiet_topics:
            tz = (
                zone(profile.time_zone, "profile.time_zone")
                if profile.time_zone
                else self._default_zone
            )
            local = dt.datetime.fromtimestamp(now_us / 1e6, tz).time()
            if in_quiet_hours(local, self._quiet_start, self._quiet_end):
                resume_us = quiet_hours_end_us(now_us, tz, self._quiet_start, self._quiet_end)
                return ContactCheck(False, "quiet_hours", f"quiet hours in {tz.key}", resume_us)
        return ContactCheck(True)

    def _capped(
        self,
        customer: CustomerState,
        now_us: int,
        channel: str,
        offer_id: str,
        offer_cooldown_s: int,
        offer_max_per_week: int,
    ) -> str:
        day_ago, week_ago = now_us - DAY_US, now_us - WEEK_US
        cooldown_us = (offer_cooldown_s or self._config.default_offer_cooldown_s) * 1_000_000
        total = per_channel = offer_week = 0
        for contact in customer.contacts:
            if contact.topic in UNCAPPED_TOPICS:
                continue
            if contact.at_us > day_ago:
                total += 1
                per_channel += contact.channel == channel
            if offer_id and contact.offer_id == offer_id:
                if contact.at_us > now_us - cooldown_us:
                    return f"offer {offer_id} is cooling down"
                offer_week += contact.at_us > week_ago
        if total >= self._config.max_contacts_per_day:
            return f"{total} contacts in 24h (cap {self._config.max_contacts_per_day})"
        if per_channel >= self._config.max_contacts_per_channel_per_day:
            return f"{per_channel} contacts on {channel} in 24h"
        if offer_max_per_week and offer_week >= offer_max_per_week:
            return f"offer {offer_id}: {offer_week} contacts in 7 days"
        return ""

    def record_contact(self, tenant_id: str, customer_id: str, contact: ContactRecord) -> bool:
        """Stores a contact; True when its contact_id was already recorded."""
        _check_choice(contact.channel, CHANNELS, "channel")
        _check_choice(contact.topic, TOPICS, "topic")
        body = msgspec.json.encode(contact).decode()
        existing = self._store.insert_contact(
            tenant_id, contact.contact_id, customer_id, body, contact.at_us
        )
        return existing is not None


_profile_decoder = msgspec.json.Decoder(ContactProfile)
_consent_decoder = msgspec.json.Decoder(ConsentRecord)
_contact_decoder = msgspec.json.Decoder(ContactRecord)


def _consented(consent: ConsentRecord | None, topic: str) -> bool:
    if consent is None:
        return topic in IMPLIED_TOPICS
    return consent.status == "granted"


def _check_choice(value: str, choices: tuple[str, ...], field_name: str) -> None:
    if value not in choices:
        raise InvalidArgument(
            f"{field_name.rsplit('.', 1)[-1].upper()}_INVALID",
            f"{field_name} must be one of {', '.join(choices)}",
            field_name,
        )
