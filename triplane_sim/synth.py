"""Seeded synthetic embedded-finance data: the training set, the demo workload
and the test fixture, reproducible bit for bit from (seed, GENERATOR_VERSION).

A population of customers (each with devices, favourite merchants, a spending
profile and maybe a loan) and merchants produces a time-ordered stream of
activities: payments, inflows, repayments, declines, retries, failed KYC.
Fraud is injected with the patterns seen in embedded finance:

* card testing: bursts of tiny payments at a digital-goods merchant from a new
  device, with declines in between;
* account takeover: a login from a new device at night, then large payments
  at electronics and gift-card merchants, with retries;
* velocity bursts: many mid-sized payments across merchants in minutes;
* mule accounts: failed KYC, a shared device, inflows then fast outflows to
  quasi-cash merchants.

Activity follows a daily curve over all 24 hours of the customer's local day
(quiet at night, never empty), and no fraud pattern is defined by the hour
alone: a customer paying at night is ordinary, and models trained here must
see it so.

Offers are catalog entries (product, value, the partner's attributes) with
hidden true propensities: a logistic function of the customer's context whose
weights come from the entry's product and attributes, so an offer the world has
never seen behaves like the known offers it resembles. Only the simulator knows
them: models and bandits must learn them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from ai_plane.features import Activity, ActivityKind, OfferEntry, offer_tokens

# synth-2: activity over all 24 hours, takeovers and mules at any hour, ordinary
# merchants in the categories fraud favours, offers as catalog entries whose
# attributes set their hidden propensity.
GENERATOR_VERSION = "synth-2"
# 2026-01-01T00:00:00Z: synthetic time starts here.
EPOCH_US = 1_767_225_600_000_000
DAY_US = 86_400_000_000
MINUTE_US = 60_000_000

CHANNEL_CARD_PRESENT, CHANNEL_ECOMMERCE, CHANNEL_IN_APP, CHANNEL_TRANSFER = 1, 2, 3, 4

# Everyday merchants include a few in every category fraud favours (digital
# goods, gift cards, quasi-cash): ordinary customers shop there too, so no
# merchant category marks fraud by itself, any more than the hour does.
NORMAL_CATEGORIES = ("5411", "5812", "4111", "4900", "5732", "5816", "5947", "6051")
CATEGORY_WEIGHTS = (30, 25, 15, 8, 5, 7, 3, 3)

# Relative activity by local hour of day (00 to 23): a daily curve, quiet in
# the small hours but never zero (night shifts, insomniacs, other time zones'
# merchants), peaking in the evening. About 6% of payments fall in 00-05.
HOURLY_ACTIVITY: tuple[float, ...] = (
    1.5, 1.0, 0.8, 0.7, 0.7, 1.0, 1.8, 3.0, 4.2, 5.0, 5.5, 6.0,
    6.5, 6.2, 6.0, 6.0, 6.2, 6.8, 7.0, 6.5, 5.5, 4.2, 3.0, 2.2,
)  # fmt: skip
assert len(HOURLY_ACTIVITY) == 24 and min(HOURLY_ACTIVITY) > 0


@dataclass(frozen=True, slots=True)
class SynthConfig:
    seed: int = 7
    tenant_id: str = "demo"
    customers: int = 1200
    merchants: int = 150
    days: int = 10
    payments_per_day: float = 3.0
    # Share of customers hit by each fraud pattern over the whole period.
    card_testing_rate: float = 0.03
    takeover_rate: float = 0.03
    velocity_rate: float = 0.03
    mule_rate: float = 0.02


@dataclass(frozen=True, slots=True)
class Customer:
    account_id: str
    devices: tuple[str, ...]
    favourite_merchants: tuple[str, ...]
    mean_amount_minor: int
    has_loan: bool
    reliable_payer: bool
    is_mule: bool


@dataclass(frozen=True, slots=True)
class Merchant:
    merchant_id: str
    category: str


@dataclass(frozen=True, slots=True)
class LabeledActivity:
    """An activity with what the simulator knows: fraud label and pattern."""

    activity: Activity
    channel: int = 0
    merchant_category: str = ""
    is_fraud: bool = False
    pattern: str = ""


@dataclass
class SynthData:
    config: SynthConfig
    customers: list[Customer]
    merchants: list[Merchant]
    events: list[LabeledActivity] = field(default_factory=list)


class _Builder:
    """Accumulates events with deterministic ids."""

    def __init__(self, config: SynthConfig, rng: random.Random) -> None:
        self.config, self.rng = config, rng
        self.events: list[LabeledActivity] = []

    def add(
        self,
        kind: ActivityKind,
        customer: Customer,
        at_us: int,
        amount_minor: int = 0,
        device_id: str = "",
        merchant: Merchant | None = None,
        channel: int = 0,
        fraud: str = "",
    ) -> None:
        event_id = f"syn-{self.config.tenant_id}-{self.config.seed}-{len(self.events):08d}"
        activity = Activity(
            event_id=event_id,
            tenant_id=self.config.tenant_id,
            kind=kind,
            account_id=customer.account_id,
            occurred_at_us=at_us,
            amount_minor=amount_minor,
            device_id=device_id,
            merchant_id=merchant.merchant_id if merchant else "",
        )
        self.events.append(
            LabeledActivity(
                activity,
                channel=channel,
                merchant_category=merchant.category if merchant else "",
                is_fraud=bool(fraud),
                pattern=fraud,
            )
        )


def _merchants(config: SynthConfig, rng: random.Random) -> list[Merchant]:
    out = [
        Merchant(f"mer_{i:05d}", rng.choices(NORMAL_CATEGORIES, CATEGORY_WEIGHTS)[0])
        for i in range(config.merchants)
    ]
    # A few risky merchants that fraud gravitates to.
    out += [
        Merchant(f"mer_risk_{c}_{i}", c) for c in ("5816", "5947", "6051", "5732") for i in (0, 1)
    ]
    return out


def _customers(
    config: SynthConfig, rng: random.Random, merchants: list[Merchant]
) -> list[Customer]:
    normal = [m for m in merchants if not m.merchant_id.startswith("mer_risk")]
    out = []
    for i in range(config.customers):
        devices = tuple(f"dev_{i:06d}_{d}" for d in range(rng.choice((1, 1, 2))))
        out.append(
            Customer(
                account_id=f"acct_{i:06d}",
                devices=devices,
                favourite_merchants=tuple(m.merchant_id for m in rng.sample(normal, 6)),
                mean_amount_minor=int(rng.lognormvariate(math.log(3500), 0.7)),
                has_loan=rng.random() < 0.35,
                reliable_payer=rng.random() < 0.8,
                is_mule=rng.random() < config.mule_rate,
            )
        )
    return out


def _activity_us(rng: random.Random, day: int) -> int:
    """A moment of `day` drawn from the daily activity curve."""
    hour = rng.choices(range(24), HOURLY_ACTIVITY)[0]
    return EPOCH_US + day * DAY_US + hour * 3600_000_000 + rng.randrange(3600_000_000)


def _normal_life(b: _Builder, customer: Customer, by_id: dict[str, Merchant]) -> None:
    rng, config = b.rng, b.config
    for day in range(config.days):
        for _ in range(_poisson(rng, config.payments_per_day)):
            at = _activity_us(rng, day)
            merchant = by_id[rng.choice(customer.favourite_merchants)]
            amount = max(100, int(rng.lognormvariate(math.log(customer.mean_amount_minor), 0.5)))
            channel = rng.choice(
                (CHANNEL_CARD_PRESENT, CHANNEL_CARD_PRESENT, CHANNEL_ECOMMERCE, CHANNEL_IN_APP)
            )
            device = rng.choice(customer.devices)
            if rng.random() < 0.01:
                b.add(
                    ActivityKind.DECLINED,
                    customer,
                    at - MINUTE_US,
                    device_id=device,
                    merchant=merchant,
                )
            b.add(ActivityKind.PAYMENT, customer, at, amount, device, merchant, channel)
        if day % 5 == 0:
            salary = customer.mean_amount_minor * int(rng.uniform(8, 14))
            b.add(ActivityKind.INFLOW, customer, EPOCH_US + day * DAY_US + 9 * 3600_000_000, salary)
        if customer.has_loan and day % 7 == 3:
            made = customer.reliable_payer or rng.random() < 0.4
            kind = ActivityKind.REPAYMENT_MADE if made else ActivityKind.REPAYMENT_MISSED
            b.add(kind, customer, EPOCH_US + day * DAY_US + 10 * 3600_000_000)


def _poisson(rng: random.Random, mean: float) -> int:
    threshold, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= threshold:
            return k
        k += 1


def _pattern_day(rng: random.Random, days: int) -> int:
    """The day a fraud pattern strikes: after the first day (so that the
    entity has some normal history first), or day 0 of a one-day world."""
    return rng.randrange(1, days) if days > 1 else 0


def _card_testing(b: _Builder, customer: Customer, risky: list[Merchant]) -> None:
    rng = b.rng
    start = EPOCH_US + _pattern_day(rng, b.config.days) * DAY_US + rng.randrange(DAY_US)
    device = f"dev_fraud_ct_{customer.account_id}"
    merchant = rng.choice([m for m in risky if m.category == "5816"])
    at = start
    for _ in range(rng.randint(8, 25)):
        at += rng.randrange(5_000_000, 40_000_000)
        if rng.random() < 0.4:
            b.add(
                ActivityKind.DECLINED, customer, at - 1_000_000, device_id=device, merchant=merchant
            )
        amount = rng.randrange(100, 900)
        b.add(
            ActivityKind.PAYMENT,
            customer,
            at,
            amount,
            device,
            merchant,
            CHANNEL_ECOMMERCE,
            "card_testing",
        )


def _takeover(b: _Builder, customer: Customer, risky: list[Merchant]) -> None:
    rng = b.rng
    day = _pattern_day(rng, b.config.days)
    # Any hour: what marks a takeover is the new device, the merchants and the
    # amounts, not the time of day.
    login = EPOCH_US + day * DAY_US + rng.randrange(DAY_US)
    device = f"dev_fraud_ato_{customer.account_id}"
    b.add(ActivityKind.OTHER, customer, login, device_id=device)
    at = login
    targets = [m for m in risky if m.category in ("5732", "5947")]
    for _ in range(rng.randint(2, 5)):
        at += rng.randrange(2 * MINUTE_US, 15 * MINUTE_US)
        merchant = rng.choice(targets)
        amount = int(customer.mean_amount_minor * rng.uniform(3, 10))
        if rng.random() < 0.5:
            b.add(
                ActivityKind.RETRIED, customer, at - 20_000_000, device_id=device, merchant=merchant
            )
        b.add(
            ActivityKind.PAYMENT,
            customer,
            at,
            amount,
            device,
            merchant,
            CHANNEL_IN_APP,
            "account_takeover",
        )


def _velocity(b: _Builder, customer: Customer, merchants: list[Merchant]) -> None:
    rng = b.rng
    at = _activity_us(rng, _pattern_day(rng, b.config.days))
    device = rng.choice(customer.devices)
    for _ in range(rng.randint(6, 12)):
        at += rng.randrange(MINUTE_US // 2, 4 * MINUTE_US)
        merchant = rng.choice(merchants)
        amount = int(customer.mean_amount_minor * rng.uniform(0.8, 2.5))
        b.add(
            ActivityKind.PAYMENT,
            customer,
            at,
            amount,
            device,
            merchant,
            CHANNEL_ECOMMERCE,
            "velocity",
        )


def _mule(b: _Builder, customer: Customer, risky: list[Merchant], ring_device: str) -> None:
    rng = b.rng
    day = _pattern_day(rng, b.config.days)
    at = EPOCH_US + day * DAY_US + rng.randrange(DAY_US)
    b.add(ActivityKind.KYC_FAILED, customer, at - 3600_000_000)
    for _ in range(rng.randint(3, 6)):
        at += rng.randrange(5 * MINUTE_US, 30 * MINUTE_US)
        b.add(ActivityKind.INFLOW, customer, at, rng.randrange(50_000, 300_000))
    targets = [m for m in risky if m.category == "6051"]
    for _ in range(rng.randint(2, 4)):
        at += rng.randrange(MINUTE_US, 10 * MINUTE_US)
        amount = rng.randrange(80_000, 400_000)
        b.add(
            ActivityKind.PAYMENT,
            customer,
            at,
            amount,
            ring_device,
            rng.choice(targets),
            CHANNEL_TRANSFER,
            "mule",
        )


def generate(config: SynthConfig | None = None) -> SynthData:
    """The whole synthetic world, its events sorted by time (then event id)."""
    config = config or SynthConfig()
    if config.days < 1:
        raise ValueError(f"days must be >= 1, not {config.days}")
    rng = random.Random(config.seed)
    merchants = _merchants(config, rng)
    customers = _customers(config, rng, merchants)
    by_id = {m.merchant_id: m for m in merchants}
    risky = [m for m in merchants if m.merchant_id.startswith("mer_risk")]
    b = _Builder(config, rng)
    ring_device = f"dev_mule_ring_{config.seed}"
    for customer in customers:
        _normal_life(b, customer, by_id)
        if customer.is_mule:
            _mule(b, customer, risky, ring_device)
        if rng.random() < config.card_testing_rate:
            _card_testing(b, customer, risky)
        if rng.random() < config.takeover_rate:
            _takeover(b, customer, risky)
        if rng.random() < config.velocity_rate:
            _velocity(b, customer, merchants)
    b.events.sort(key=lambda e: (e.activity.occurred_at_us, e.activity.event_id))
    return SynthData(config, customers, merchants, b.events)


# ---- offers: catalog entries with hidden propensities ----

# The synthetic catalog: what a partner registers (product, value, attributes).
# Products are the policy plane's product names.
CATALOG: dict[str, OfferEntry] = {
    "cashback_grocery": OfferEntry(
        "cashback", 300, {"category": "grocery", "benefit": "cashback", "commitment": "none"}
    ),
    "bnpl_electronics": OfferEntry(
        "bnpl", 1500, {"category": "electronics", "benefit": "deferral", "commitment": "low"}
    ),
    "savings_roundup": OfferEntry(
        "savings", 500, {"category": "everyday", "benefit": "interest", "commitment": "low"}
    ),
    "credit_line_increase": OfferEntry(
        "credit_line_increase",
        5000,
        {"category": "everyday", "benefit": "credit", "commitment": "high"},
    ),
    "travel_insurance": OfferEntry(
        "insurance_cover", 1200, {"category": "travel", "benefit": "cover", "commitment": "low"}
    ),
    "loyalty_boost": OfferEntry(
        "cashback", 200, {"category": "everyday", "benefit": "points", "commitment": "none"}
    ),
}
OFFERS: tuple[str, ...] = tuple(CATALOG)

# What entries are made of: every product and attribute value the world knows.
PRODUCTS: tuple[str, ...] = (
    "cashback",
    "bnpl",
    "savings",
    "credit_line_increase",
    "insurance_cover",
)
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "category": ("grocery", "electronics", "travel", "everyday", "dining"),
    "benefit": ("cashback", "deferral", "interest", "credit", "cover", "points"),
    "commitment": ("none", "low", "high"),
}

# Hidden truth. Each token of an entry (its product, each attribute pair) adds
# an intercept and weights over the standardized context (see
# features.PROPENSITY_CONTEXT: channel, hour, txn count 24h, amount 24h, daily
# spend, cash flow 7d, lifetime spend, repayment consistency, segment); the
# value adds VALUE_WEIGHT per e-fold over 1,000 minor units.
_CONTEXT_CENTER = (2.0, 14.0, 3.0, 8.0, 7.0, 0.0, 10.0, 0.7, 2.0)
_CONTEXT_SCALE = (1.0, 5.0, 2.0, 3.0, 4.0, 10.0, 3.0, 0.2, 1.0)
_Z = (0.0,) * 9
_TOKEN_EFFECTS: dict[str, tuple[float, tuple[float, ...]]] = {
    "product=cashback": (-1.2, (0.0, 0.0, 0.5, 0.2, 0.2, 0.0, 0.0, 0.0, -0.2)),
    "product=bnpl": (-1.5, (0.4, 0.1, 0.0, 0.2, 0.3, -0.6, 0.0, -0.3, 0.0)),
    "product=savings": (-1.4, (0.0, -0.1, 0.0, 0.0, -0.2, 0.7, 0.2, 0.4, 0.0)),
    "product=credit_line_increase": (-1.7, (0.0, 0.0, 0.2, 0.2, 0.0, 0.0, 0.5, 1.0, 0.4)),
    "product=insurance_cover": (-1.6, (0.0, 0.3, 0.0, 0.3, 0.0, 0.2, 0.4, 0.0, 0.3)),
    "attr:category=grocery": (-0.4, (0.0, 0.0, 0.4, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0)),
    "attr:category=electronics": (-0.5, (0.2, 0.1, 0.0, 0.2, 0.1, -0.2, 0.0, 0.0, 0.0)),
    "attr:category=travel": (-0.6, (0.0, 0.3, 0.0, 0.2, 0.0, 0.0, 0.3, 0.0, 0.1)),
    "attr:category=everyday": (-0.3, _Z),
    "attr:category=dining": (-0.4, (0.0, 0.2, 0.2, 0.0, 0.1, 0.0, 0.0, 0.0, 0.0)),
    "attr:benefit=cashback": (-0.3, (0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
    "attr:benefit=deferral": (-0.4, (0.0, 0.0, 0.0, 0.0, 0.0, -0.2, 0.0, 0.0, 0.0)),
    "attr:benefit=interest": (-0.4, (0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.1, 0.0)),
    "attr:benefit=credit": (-0.5, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.1)),
    "attr:benefit=cover": (-0.4, (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.0, 0.0)),
    "attr:benefit=points": (-0.2, (0.0, 0.0, 0.2, 0.0, 0.0, 0.0, -0.2, 0.0, -0.3)),
    "attr:commitment=none": (0.3, _Z),
    "attr:commitment=low": (0.0, _Z),
    "attr:commitment=high": (-0.4, _Z),
}
VALUE_WEIGHT = 0.15


def true_propensity(offer: str | OfferEntry, context: Sequence[float]) -> float:
    """The hidden probability that a customer in `context` takes `offer` (a
    catalog entry, or the id of one of CATALOG's). Tokens the world does not
    know add nothing."""
    entry = CATALOG[offer] if isinstance(offer, str) else offer
    z = VALUE_WEIGHT * math.log(max(1, entry.value_minor) / 1000.0)
    standardized = [
        (value - center) / scale
        for value, center, scale in zip(context, _CONTEXT_CENTER, _CONTEXT_SCALE, strict=True)
    ]
    for token in offer_tokens(entry):
        intercept, weights = _TOKEN_EFFECTS.get(token, (0.0, _Z))
        z += intercept + sum(w * v for w, v in zip(weights, standardized, strict=True))
    return 1.0 / (1.0 + math.exp(-z))


def random_offer(rng: random.Random) -> OfferEntry:
    """An entry no partner registered (yet): a random product, attributes and
    value, so models learn what each part of an entry is worth."""
    attributes = {key: rng.choice(values) for key, values in ATTRIBUTE_VALUES.items()}
    value_minor = int(math.exp(rng.uniform(math.log(100), math.log(10_000))))
    return OfferEntry(rng.choice(PRODUCTS), value_minor, attributes)
