"""The offer catalog: offers are entries (eligibility in CEL), not code.

`put` launches or changes an offer (a new revision), `stop` stops it; both take
effect on the next eligibility call, without a redeploy. `eligible` filters the
catalog for one customer and says, for each excluded offer, why.

Replicas: the catalog is compiled in memory, but the store is what holds it.
Every write moves the tenant's catalog version on in its own transaction, and
every read of the catalog (eligible, get, list, put, stop) first reads that
version (one primary-key read) and reloads the tenant's offers when it moved,
so an offer put or stopped through one replica is what every replica serves
from its next call. A write reads the stored offer with its row locked, so two
replicas changing one offer at once take turns, each with a revision of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import cel
import msgspec

from policy_plane import cel_check
from policy_plane.consent import CHANNELS, TOPICS, ConsentBook, ContactCheck, CustomerState
from policy_plane.store import PolicyStore
from triplane.runtime import codec as wire
from triplane.runtime.clock import Clock
from triplane.runtime.errors import InvalidArgument, NotFound, ResourceExhausted

PRODUCTS = ("cashback", "bnpl", "credit_line_increase", "insurance_cover", "savings")
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")
OFFER_SCHEMA: dict[str, Any] = {
    "customer": {
        "customer_id": "string",
        "region": "string",
        "kyc_tier": "int",
        "vulnerable": "bool",
    },
    "context": "map",
    "offer": {
        "offer_id": "string",
        "product": "string",
        "value_minor": "int",
        "currency": "string",
    },
}


class OfferVariant(msgspec.Struct, frozen=True, kw_only=True):
    variant_id: str = ""
    value_minor: int = 0
    currency: str = ""
    creative_id: str = ""


class OfferEntry(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: str
    offer_id: str
    product: str
    title: str = ""
    value_minor: int = 0
    currency: str = ""
    eligibility: str = ""
    never_show: str = ""
    topic: str = "marketing"
    channels: list[str] = []
    regions: list[str] = []
    variants: dict[str, OfferVariant] = {}
    conversion_events: list[str] = []
    max_contacts_per_week: int = 0
    cooldown_s: int = 0
    starts_at_us: int = 0
    ends_at_us: int = 0
    status: str = "active"
    revision: int = 0
    updated_at_us: int = 0
    # The partner's description of the offer (what ranking sees besides
    # product and value); bounded by policy.limits.max_offer_attributes.
    attributes: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class _Compiled:
    entry: OfferEntry
    eligibility: cel.Program | None
    never_show: cel.Program | None


@dataclass(frozen=True, slots=True)
class Eligible:
    entry: OfferEntry
    channel: str
    variant: OfferVariant | None


@dataclass(frozen=True, slots=True)
class Excluded:
    offer_id: str
    # not_eligible, no_consent, quiet_hours, capped, suppressed
    reason: str
    detail: str


@dataclass(frozen=True, slots=True)
class CustomerContext:
    tenant_id: str
    customer_id: str
    partner_id: str
    region: str
    kyc_tier: int
    features: dict[str, float]


class OfferCatalog:
    def __init__(
        self,
        store: PolicyStore,
        consent: ConsentBook,
        clock: Clock,
        max_offers_per_tenant: int,
        max_channels: int,
        vulnerable_blocked_products: list[str],
        max_attributes: int,
        max_attribute_length: int,
    ) -> None:
        self._store = store
        self._consent = consent
        self._clock = clock
        self._max_offers = max_offers_per_tenant
        self._max_channels = max_channels
        self._max_attributes = max_attributes
        self._max_attribute_length = max_attribute_length
        self._vulnerable_blocked = frozenset(vulnerable_blocked_products)
        self._offers: dict[str, dict[str, _Compiled]] = {}
        # The catalog version each tenant's compiled offers were read at.
        self._versions: dict[str, int] = {}

    def _fresh(self, tenant_id: str) -> dict[str, _Compiled]:
        """The tenant's offers as the store holds them now: the version read
        first, then the offers, so a write between the two costs one more
        reload, never a stale catalog. Unchanged offers keep their programs."""
        version = self._store.offer_catalog_version(tenant_id)
        cached = self._offers.get(tenant_id)
        if cached is not None and self._versions.get(tenant_id) == version:
            return cached
        offers: dict[str, _Compiled] = {}
        for body in self._store.tenant_offers(tenant_id):
            entry = msgspec.json.decode(body, type=OfferEntry)
            old = (cached or {}).get(entry.offer_id)
            same = old is not None and old.entry == entry
            offers[entry.offer_id] = old if old is not None and same else _compile(entry)
        self._offers[tenant_id] = offers
        self._versions[tenant_id] = version
        return offers

    def put(self, entry: OfferEntry) -> OfferEntry:
        _validate(entry, self._max_channels)
        _validate_attributes(entry.attributes, self._max_attributes, self._max_attribute_length)
        _compile(entry)  # refused before anything is stored
        tenant = self._fresh(entry.tenant_id)
        # Against the catalog as last read: replicas adding offers at once
        # may pass the bound by the few they add together.
        if entry.offer_id not in tenant and len(tenant) >= self._max_offers:
            raise ResourceExhausted(
                "OFFER_LIMIT_REACHED", f"over {self._max_offers} offers", "offer"
            )

        def change(current: str | None) -> str:
            previous = _decode(current).revision if current is not None else 0
            stored = msgspec.structs.replace(
                entry, revision=previous + 1, updated_at_us=self._clock.now_us(), status="active"
            )
            return _encode(stored)

        body = self._store.put_offer(entry.tenant_id, entry.offer_id, change)
        assert body is not None
        return _decode(body)

    def stop(self, tenant_id: str, offer_id: str) -> OfferEntry:
        def change(current: str | None) -> str | None:
            if current is None:
                raise NotFound("OFFER_NOT_FOUND", f"no offer {offer_id!r}", "offer_id")
            entry = _decode(current)
            if entry.status == "stopped":
                return None
            stopped = msgspec.structs.replace(
                entry,
                status="stopped",
                revision=entry.revision + 1,
                updated_at_us=self._clock.now_us(),
            )
            return _encode(stopped)

        self._get(tenant_id, offer_id)  # NOT_FOUND without a write transaction
        body = self._store.put_offer(tenant_id, offer_id, change)
        assert body is not None
        return _decode(body)

    def _get(self, tenant_id: str, offer_id: str) -> _Compiled:
        compiled = self._fresh(tenant_id).get(offer_id)
        if compiled is None:
            raise NotFound("OFFER_NOT_FOUND", f"no offer {offer_id!r}", "offer_id")
        return compiled

    def get(self, tenant_id: str, offer_id: str) -> OfferEntry:
        return self._get(tenant_id, offer_id).entry

    def list_offers(self, tenant_id: str, after_offer_id: str, limit: int) -> list[OfferEntry]:
        offers = self._fresh(tenant_id)
        ids = sorted(i for i in offers if i > after_offer_id)
        return [offers[i].entry for i in ids[:limit]]

    def eligible(self, ctx: CustomerContext) -> tuple[list[Eligible], list[Excluded]]:
        now_us = self._clock.now_us()
        # The customer's consent, profile and contacts: one read for every offer.
        customer = self._consent.state(ctx.tenant_id, ctx.customer_id)
        profile = customer.profile
        activation_base = {
            "customer": {
                "customer_id": ctx.customer_id,
                "region": ctx.region,
                "kyc_tier": ctx.kyc_tier,
                "vulnerable": profile.vulnerable,
            },
            "context": dict(ctx.features),
        }
        eligible: list[Eligible] = []
        excluded: list[Excluded] = []
        offers = self._fresh(ctx.tenant_id)
        for offer_id in sorted(offers):
            compiled = offers[offer_id]
            result = self._judge(compiled, ctx, activation_base, customer, now_us)
            if isinstance(result, Excluded):
                excluded.append(result)
            else:
                eligible.append(result)
        return eligible, excluded

    def _judge(
        self,
        compiled: _Compiled,
        ctx: CustomerContext,
        activation_base: dict[str, Any],
        customer: CustomerState,
        now_us: int,
    ) -> Eligible | Excluded:
        entry = compiled.entry
        vulnerable = customer.profile.vulnerable
        if entry.status != "active":
            return Excluded(entry.offer_id, "not_eligible", "offer stopped")
        if (entry.starts_at_us and now_us < entry.starts_at_us) or (
            entry.ends_at_us and now_us >= entry.ends_at_us
        ):
            return Excluded(entry.offer_id, "not_eligible", "outside the offer's dates")
        if entry.regions and ctx.region not in entry.regions:
            return Excluded(
                entry.offer_id, "not_eligible", f"not offered in {ctx.region or 'unknown region'}"
            )
        if vulnerable and entry.product in self._vulnerable_blocked:
            return Excluded(entry.offer_id, "suppressed", "not offered to vulnerable customers")
        activation = {**activation_base, "offer": _offer_vars(entry)}
        if compiled.never_show is not None and _run(compiled.never_show, activation) is True:
            return Excluded(entry.offer_id, "suppressed", "a never-show rule matched")
        if compiled.eligibility is not None:
            verdict = _run(compiled.eligibility, activation)
            if verdict is not True:
                detail = (
                    "eligibility not met" if verdict is False else f"eligibility error: {verdict}"
                )
                return Excluded(entry.offer_id, "not_eligible", detail)
        return self._pick_channel(entry, ctx, customer)

    def _pick_channel(
        self, entry: OfferEntry, ctx: CustomerContext, customer: CustomerState
    ) -> Eligible | Excluded:
        checks: list[ContactCheck] = []
        for channel in entry.channels:
            check = self._consent.judge(
                customer,
                channel,
                entry.topic,
                entry.offer_id,
                entry.cooldown_s,
                entry.max_contacts_per_week,
            )
            if check.allowed:
                return Eligible(entry, channel, entry.variants.get(ctx.partner_id))
            checks.append(check)
        # Report the block closest to "yes": quiet hours pass by themselves,
        # a cap lapses, vulnerability and missing consent do not.
        for block, reason in (
            ("quiet_hours", "quiet_hours"),
            ("capped", "capped"),
            ("vulnerable", "suppressed"),
            ("no_consent", "no_consent"),
        ):
            for check in checks:
                if check.block == block:
                    return Excluded(entry.offer_id, reason, check.detail)
        return Excluded(entry.offer_id, "no_consent", "no channel")


def _offer_vars(entry: OfferEntry) -> dict[str, Any]:
    return {
        "offer_id": entry.offer_id,
        "product": entry.product,
        "value_minor": entry.value_minor,
        "currency": entry.currency,
    }


def _run(program: cel.Program, activation: dict[str, Any]) -> object:
    try:
        return program.execute(activation)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:120]


def _compile_expr(source: str, field_name: str) -> cel.Program | None:
    if not source.strip():
        return None
    try:
        program = cel.compile(source)
    except Exception as exc:
        raise InvalidArgument(
            "OFFER_RULE_SYNTAX_ERROR", f"{field_name}: {exc}", field_name
        ) from exc
    unknown = cel_check.unknown_roots(program.variables(), source, set(OFFER_SCHEMA))
    bad = unknown or cel_check.unknown_field_paths(source, OFFER_SCHEMA)
    if bad:
        raise InvalidArgument(
            "OFFER_RULE_UNKNOWN_FIELD", f"{field_name}: unknown {bad[0]!r}", field_name
        )
    return program


def _compile(entry: OfferEntry) -> _Compiled:
    return _Compiled(
        entry,
        _compile_expr(entry.eligibility, "offer.eligibility"),
        _compile_expr(entry.never_show, "offer.never_show"),
    )


def _validate_attributes(attributes: dict[str, str], max_count: int, max_length: int) -> None:
    if len(attributes) > max_count:
        raise InvalidArgument(
            "OFFER_ATTRIBUTES_TOO_MANY", f"at most {max_count} attributes", "offer.attributes"
        )
    for key, value in attributes.items():
        if not _ID.fullmatch(key):
            raise InvalidArgument(
                "OFFER_ATTRIBUTE_KEY_INVALID",
                "attribute keys must match [A-Za-z0-9_.:-]{1,64}",
                f"offer.attributes[{key[:64]}]",
            )
        if len(value) > max_length:
            raise InvalidArgument(
                "FIELD_TOO_LONG",
                f"attribute values are at most {max_length} characters",
                f"offer.attributes[{key}]",
            )


def _decode(body: str) -> OfferEntry:
    return msgspec.json.decode(body, type=OfferEntry)


def _encode(entry: OfferEntry) -> str:
    return msgspec.json.encode(entry).decode()


def _validate(entry: OfferEntry, max_channels: int) -> None:
    if not _ID.fullmatch(entry.offer_id):
        raise InvalidArgument(
            "OFFER_ID_INVALID", "offer_id must match [A-Za-z0-9_.:-]{1,64}", "offer.offer_id"
        )
    if entry.product not in PRODUCTS:
        raise InvalidArgument(
            "PRODUCT_INVALID", f"product must be one of {PRODUCTS}", "offer.product"
        )
    if entry.topic not in TOPICS:
        raise InvalidArgument("TOPIC_INVALID", "offer topic unknown", "offer.topic")
    if not entry.channels or len(entry.channels) > max_channels:
        raise InvalidArgument("CHANNELS_INVALID", f"1 to {max_channels} channels", "offer.channels")
    for index, channel in enumerate(entry.channels):
        if channel not in CHANNELS:
            raise InvalidArgument(
                "CHANNEL_INVALID", f"unknown channel {channel!r}", f"offer.channels[{index}]"
            )
    for index, region in enumerate(entry.regions):
        if not _COUNTRY.fullmatch(region):
            raise InvalidArgument(
                "REGION_INVALID", "regions are ISO 3166-1 alpha-2", f"offer.regions[{index}]"
            )
    # An offer may be worth nothing (a servicing nudge), so its value is not
    # the positive amount of a payment; its currency is checked as any is.
    if entry.currency:
        wire.check_currency(entry.currency, "offer.value.currency")
    if entry.value_minor < 0:
        raise InvalidArgument("OFFER_VALUE_INVALID", "value must be >= 0", "offer.value")
    if entry.ends_at_us and entry.ends_at_us <= entry.starts_at_us:
        raise InvalidArgument(
            "OFFER_DATES_INVALID", "ends_at must be after starts_at", "offer.ends_at"
        )
    if entry.max_contacts_per_week < 0 or entry.cooldown_s < 0:
        raise InvalidArgument("OFFER_CAP_INVALID", "caps are >= 0", "offer.cooldown_s")
