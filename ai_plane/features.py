"""Feature definitions, as versioned code.

One definition serves training and serving: the synthetic stream is replayed
through the same `updates_for` and `compute_features` that the NATS pipeline
and the scorer use, so there is no train/serve skew by construction.

Windowed features are bucketed counters: an event increments one record per
(entity, bucket size, bucket index); a read sums the buckets that overlap the
window. A window is therefore exact to within one bucket (2 minutes for 10m,
10 minutes for 1h, 4 hours for 24h, 1 day for 30d; the 7-day figures are the
newest seven of the 30d window's day buckets), which is what keeps a read to a
fixed, small number of keys on every backend (82 for a payment). Every bucket record expires
once no window can see it, so the store never grows without bound.

Changing any definition means bumping FEATURE_SET_VERSION: the registry records
it in every model's lineage, and a model is only served with its own version.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

# fs-2: offers are described by their catalog entry (hashed product and
# attributes, log value) instead of their position in the simulator's tuple.
FEATURE_SET_VERSION = "fs-2"

MICROS_PER_S = 1_000_000


class ActivityKind(enum.StrEnum):
    """What happened, as far as features are concerned."""

    PAYMENT = "payment"
    DECLINED = "declined"
    RETRIED = "retried"
    KYC_FAILED = "kyc_failed"
    INFLOW = "inflow"
    REPAYMENT_MADE = "repayment_made"
    REPAYMENT_MISSED = "repayment_missed"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Activity:
    """One fact from the spine (a ledger entry side or a behavioural event)."""

    event_id: str
    tenant_id: str
    kind: ActivityKind
    account_id: str
    occurred_at_us: int
    amount_minor: int = 0
    device_id: str = ""
    merchant_id: str = ""


@dataclass(frozen=True, slots=True)
class Increment:
    """Add `delta` to `field` of record `key`; the record expires at
    `expire_at_us` (event time based; 0: never)."""

    key: str
    field: str
    delta: float
    expire_at_us: int


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    window_s: int
    bucket_s: int

    @property
    def buckets(self) -> int:
        return self.window_s // self.bucket_s


WINDOWS: tuple[Window, ...] = (
    Window("10m", 600, 120),
    Window("1h", 3600, 600),
    Window("24h", 86400, 14400),
    # The monthly spend the KYC limits count (30 days, not 24 hours).
    Window("30d", 2_592_000, 86400),
)
WINDOW_BY_NAME = {w.name: w for w in WINDOWS}
LIFETIME = "life"

# Entity kinds and the windows each one keeps (30d only matters per account).
ACCOUNT, DEVICE, MERCHANT = "acct", "dev", "merch"
ENTITY_WINDOWS: dict[str, tuple[Window, ...]] = {
    ACCOUNT: WINDOWS,
    DEVICE: WINDOWS[:3],
    MERCHANT: WINDOWS[:3],
}

# Merchant category codes the models know, by rough risk; others map to 0.
MERCHANT_CATEGORIES: tuple[str, ...] = (
    "other",
    "5411",  # grocery
    "5812",  # restaurants
    "4111",  # transport
    "4900",  # utilities
    "5732",  # electronics
    "5816",  # digital goods
    "5947",  # gift cards
    "6051",  # crypto / quasi-cash
)
CATEGORY_INDEX = {code: i for i, code in enumerate(MERCHANT_CATEGORIES)}

# Channels as numbers (the proto enum values).
CHANNELS = ("unspecified", "card_present", "ecommerce", "in_app", "transfer")


def entity_prefix(namespace: str, tenant_id: str, kind: str, entity_id: str) -> str:
    return f"{namespace}:{tenant_id}:{kind}:{entity_id}"


def bucket_key(prefix: str, window: Window, bucket_index: int) -> str:
    return f"{prefix}:{window.bucket_s}:{bucket_index}"


def _bucket_increments(
    prefix: str, windows: Sequence[Window], fields: Mapping[str, float], at_us: int
) -> list[Increment]:
    out: list[Increment] = []
    at_s = at_us // MICROS_PER_S
    for window in windows:
        index = at_s // window.bucket_s
        # The bucket is visible to reads until its end plus one window.
        expire_at_us = ((index + 1) * window.bucket_s + window.window_s) * MICROS_PER_S
        key = bucket_key(prefix, window, index)
        for name, delta in fields.items():
            out.append(Increment(key, name, delta, expire_at_us))
    return out


def _account_fields(activity: Activity) -> dict[str, float]:
    amount = float(activity.amount_minor)
    kind = activity.kind
    if kind is ActivityKind.PAYMENT:
        return {"txn_count": 1.0, "txn_amount": amount, "outflow": amount}
    if kind is ActivityKind.DECLINED:
        return {"declines": 1.0}
    if kind is ActivityKind.RETRIED:
        return {"retries": 1.0}
    if kind is ActivityKind.KYC_FAILED:
        return {"kyc_failed": 1.0}
    if kind is ActivityKind.INFLOW:
        return {"inflow": amount}
    return {}


def _lifetime_fields(activity: Activity) -> dict[str, float]:
    kind = activity.kind
    if kind is ActivityKind.PAYMENT:
        return {"spend": float(activity.amount_minor), "payments": 1.0}
    if kind is ActivityKind.REPAYMENT_MADE:
        return {"repay_made": 1.0}
    if kind is ActivityKind.REPAYMENT_MISSED:
        return {"repay_missed": 1.0}
    return {}


def updates_for(activity: Activity, namespace: str) -> list[Increment]:
    """The increments one activity makes (pure; the same for every backend)."""
    tenant, at_us = activity.tenant_id, activity.occurred_at_us
    out: list[Increment] = []
    account = entity_prefix(namespace, tenant, ACCOUNT, activity.account_id)
    fields = _account_fields(activity)
    if fields:
        out += _bucket_increments(account, ENTITY_WINDOWS[ACCOUNT], fields, at_us)
    lifetime = _lifetime_fields(activity)
    if lifetime:
        out += [Increment(f"{account}:{LIFETIME}", k, v, 0) for k, v in lifetime.items()]
    if activity.kind is ActivityKind.PAYMENT:
        payment = {"txn_count": 1.0, "txn_amount": float(activity.amount_minor)}
        for kind, entity_id in ((DEVICE, activity.device_id), (MERCHANT, activity.merchant_id)):
            if entity_id:
                prefix = entity_prefix(namespace, tenant, kind, entity_id)
                out += _bucket_increments(prefix, ENTITY_WINDOWS[kind], payment, at_us)
    return out


@dataclass(frozen=True, slots=True)
class EntityRef:
    tenant_id: str
    account_id: str
    device_id: str = ""
    merchant_id: str = ""


@lru_cache(maxsize=16)
def _suffixes(kind: str, newest: tuple[int, ...]) -> tuple[str, ...]:
    """ ":<bucket_s>:<index>" of every bucket a read at this time needs; the
    same for every entity of a kind, so computed once per bucket boundary."""
    out: list[str] = []
    for window, last in zip(ENTITY_WINDOWS[kind], newest, strict=True):
        out += [f":{window.bucket_s}:{last - i}" for i in range(window.buckets)]
    return tuple(out)


def _window_keys(prefix: str, kind: str, now_s: int) -> list[str]:
    newest = tuple(now_s // w.bucket_s for w in ENTITY_WINDOWS[kind])
    return [prefix + suffix for suffix in _suffixes(kind, newest)]


def keys_for(ref: EntityRef, namespace: str, now_us: int) -> list[str]:
    """Every record one feature read needs, in a fixed order."""
    now_s = now_us // MICROS_PER_S
    account = entity_prefix(namespace, ref.tenant_id, ACCOUNT, ref.account_id)
    keys = _window_keys(account, ACCOUNT, now_s)
    keys.append(f"{account}:{LIFETIME}")
    for kind, entity_id in ((DEVICE, ref.device_id), (MERCHANT, ref.merchant_id)):
        prefix = entity_prefix(namespace, ref.tenant_id, kind, entity_id or "-")
        keys += _window_keys(prefix, kind, now_s)
    return keys


def _sum_windows(
    records: Sequence[Mapping[str, float]], windows: Sequence[Window], start: int
) -> tuple[dict[str, dict[str, float]], int]:
    """Per window name, the summed fields of its buckets; and the next offset."""
    sums: dict[str, dict[str, float]] = {}
    offset = start
    for window in windows:
        total: dict[str, float] = {}
        for record in records[offset : offset + window.buckets]:
            if record:  # most old buckets of an entity are empty
                for name, value in record.items():
                    total[name] = total.get(name, 0.0) + value
        sums[window.name] = total
        offset += window.buckets
    return sums, offset


def stored_features(records: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The store-backed features from the records `keys_for` named, in order."""
    account, offset = _sum_windows(records, ENTITY_WINDOWS[ACCOUNT], 0)
    lifetime = records[offset]
    offset += 1
    device, offset = _sum_windows(records, ENTITY_WINDOWS[DEVICE], offset)
    merchant, offset = _sum_windows(records, ENTITY_WINDOWS[MERCHANT], offset)
    assert offset == len(records), "records do not match keys_for"
    out: dict[str, float] = {}
    for name in ("10m", "1h", "24h"):
        out[f"acct_txn_count_{name}"] = account[name].get("txn_count", 0.0)
        out[f"acct_txn_amount_log_{name}"] = math.log1p(account[name].get("txn_amount", 0.0))
        out[f"dev_txn_count_{name}"] = device[name].get("txn_count", 0.0)
        out[f"merch_txn_count_{name}"] = merchant[name].get("txn_count", 0.0)
    out["acct_declines_1h"] = account["1h"].get("declines", 0.0)
    out["acct_retries_10m"] = account["10m"].get("retries", 0.0)
    out["acct_kyc_failed_24h"] = account["24h"].get("kyc_failed", 0.0)
    out["dev_txn_amount_log_1h"] = math.log1p(device["1h"].get("txn_amount", 0.0))
    out["merch_txn_amount_log_1h"] = math.log1p(merchant["1h"].get("txn_amount", 0.0))
    # The 30-day spend and count, for the policy's monthly limits and
    # velocity (server-side counters the gateway passes on; no model reads them).
    out["acct_txn_count_30d"] = account["30d"].get("txn_count", 0.0)
    out["acct_txn_amount_log_30d"] = math.log1p(account["30d"].get("txn_amount", 0.0))
    # Near real time: today's spend (the current day bucket) and 7-day net flow
    # (the newest seven day buckets).
    day0 = _offset_of_current_day()
    today = records[day0]
    out["acct_daily_spend_log"] = math.log1p(today.get("outflow", 0.0))
    week = _sum_windows(records[day0 : day0 + 7], (_WEEK,), 0)[0][_WEEK.name]
    out["acct_cashflow_7d_slog"] = _signed_log(week.get("inflow", 0.0) - week.get("outflow", 0.0))
    # Batch-style: lifetime value, repayment consistency, segment.
    spend = lifetime.get("spend", 0.0)
    made, missed = lifetime.get("repay_made", 0.0), lifetime.get("repay_missed", 0.0)
    out["acct_lifetime_spend_log"] = math.log1p(spend)
    out["acct_repayment_consistency"] = (made + 1.0) / (made + missed + 2.0)
    out["acct_segment"] = float(segment_of(spend))
    out["acct_mean_amount_log_24h"] = math.log1p(
        account["24h"].get("txn_amount", 0.0) / max(1.0, account["24h"].get("txn_count", 0.0))
    )
    return out


# Seven of the 30d window's day buckets, newest first.
_WEEK = Window("7d", 604_800, 86400)

# Server-side counters the Score answer carries beside the model's inputs
# (the gateway passes them to the policy plane as velocity; no model reads them).
VELOCITY_FEATURES: tuple[str, ...] = ("acct_txn_count_30d", "acct_txn_amount_log_30d")


def _offset_of_current_day() -> int:
    """Index of the newest 1-day bucket among an account's window keys."""
    return sum(w.buckets for w in WINDOWS[:3])


def _signed_log(value: float) -> float:
    return math.copysign(math.log1p(abs(value)), value)


def segment_of(lifetime_spend_minor: float) -> int:
    """Value segment from lifetime spend: 0 new, 1 light, 2 regular, 3 high."""
    if lifetime_spend_minor <= 0:
        return 0
    if lifetime_spend_minor < 50_000:
        return 1
    if lifetime_spend_minor < 500_000:
        return 2
    return 3


@dataclass(frozen=True, slots=True)
class PaymentInput:
    """The request-time part of a payment's features."""

    amount_minor: int
    merchant_category: str
    channel: int
    hour_of_day: int


RISK_FEATURES: tuple[str, ...] = (
    "amount_log",
    "hour_of_day",
    "channel",
    "merchant_category",
    "amount_to_mean_24h",
    "acct_txn_count_10m",
    "acct_txn_count_1h",
    "acct_txn_count_24h",
    "acct_txn_amount_log_10m",
    "acct_txn_amount_log_1h",
    "acct_txn_amount_log_24h",
    "acct_declines_1h",
    "acct_retries_10m",
    "acct_kyc_failed_24h",
    "dev_txn_count_10m",
    "dev_txn_count_1h",
    "dev_txn_count_24h",
    "dev_txn_amount_log_1h",
    "merch_txn_count_10m",
    "merch_txn_count_1h",
    "merch_txn_count_24h",
    "merch_txn_amount_log_1h",
    "acct_daily_spend_log",
    "acct_cashflow_7d_slog",
    "acct_lifetime_spend_log",
    "acct_repayment_consistency",
    "acct_segment",
)

PROPENSITY_CONTEXT: tuple[str, ...] = (
    "channel",
    "hour_of_day",
    "acct_txn_count_24h",
    "acct_txn_amount_log_24h",
    "acct_daily_spend_log",
    "acct_cashflow_7d_slog",
    "acct_lifetime_spend_log",
    "acct_repayment_consistency",
    "acct_segment",
)
# An offer is described to the propensity model by its catalog entry, never by
# its id or its position in any list: the log of its value, then its product and
# the partner's attributes hashed into OFFER_HASH_BUCKETS counters (feature
# hashing, as Vowpal Wabbit does). A partner's own offer whose entry equals a
# known one is that offer to the model, and a similar entry scores similarly.
# The bucket count is part of the feature set (a model's input width), so it is
# a named constant tied to FEATURE_SET_VERSION, not a config key.
OFFER_HASH_BUCKETS = 64
OFFER_FEATURES: tuple[str, ...] = (
    "offer_value_log",
    *(f"offer_hash_{i:02d}" for i in range(OFFER_HASH_BUCKETS)),
)
PROPENSITY_FEATURES: tuple[str, ...] = (*OFFER_FEATURES, *PROPENSITY_CONTEXT)


def risk_vector(payment: PaymentInput, stored: Mapping[str, float]) -> list[float]:
    """The payment risk model's input, in RISK_FEATURES order."""
    amount_log = math.log1p(max(0, payment.amount_minor))
    values = dict(stored)
    values["amount_log"] = amount_log
    values["hour_of_day"] = float(payment.hour_of_day)
    values["channel"] = float(payment.channel)
    values["merchant_category"] = float(CATEGORY_INDEX.get(payment.merchant_category, 0))
    values["amount_to_mean_24h"] = amount_log - stored["acct_mean_amount_log_24h"]
    return [values[name] for name in RISK_FEATURES]


@dataclass(frozen=True, slots=True)
class OfferEntry:
    """What the propensity model knows of an offer: its catalog entry."""

    product: str
    value_minor: int
    attributes: Mapping[str, str] = field(default_factory=dict)


@lru_cache(maxsize=4096)
def _bucket(token: str) -> int:
    """A stable bucket (not Python's salted hash: training and serving run in
    different processes and must agree)."""
    digest = hashlib.blake2b(token.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % OFFER_HASH_BUCKETS


def offer_tokens(offer: OfferEntry) -> list[str]:
    """The hashed tokens of an entry: its product and each attribute pair."""
    tokens = [f"product={offer.product}"]
    tokens += [f"attr:{key}={value}" for key, value in sorted(offer.attributes.items())]
    return tokens


def offer_vector(offer: OfferEntry) -> list[float]:
    """The offer part of the propensity model's input, in OFFER_FEATURES order."""
    buckets = [0.0] * OFFER_HASH_BUCKETS
    for token in offer_tokens(offer):
        buckets[_bucket(token)] += 1.0
    return [math.log1p(max(0, offer.value_minor)), *buckets]


def propensity_context(channel: int, hour_of_day: int, stored: Mapping[str, float]) -> list[float]:
    """The customer context of the propensity model, in PROPENSITY_CONTEXT order."""
    values = dict(stored)
    values["channel"] = float(channel)
    values["hour_of_day"] = float(hour_of_day)
    return [values[name] for name in PROPENSITY_CONTEXT]


def hour_of_day(at_us: int) -> int:
    return int((at_us // MICROS_PER_S) % 86400 // 3600)
