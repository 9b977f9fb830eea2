"""The one interface every rail adapter has, and what flows through it.

A rail takes a payout (`Submission`: the payouts package's `RailSubmission`
satisfies it structurally), sends it to its bank endpoint and answers a
`RailReceipt`; the bank's answers (status reports, returns, return files)
come back through `poll()` as `RailOutcome`s, which `deliver()` hands to an
`OutcomeSink` (the payouts service's `record_outcome`, which posts the ledger
effect exactly once: a rail may report the same outcome twice).

Nothing here imports grpc (import-linter `domain-without-grpc`).
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field
from typing import Protocol
from zoneinfo import ZoneInfo

from money_plane.formats._common import check_currency, refuse
from money_plane.payouts.settlement import is_business_day


class Outcome(enum.IntEnum):
    """The same numbers as money_plane.payouts.domain.PayoutOutcome (and the
    RecordPayoutOutcome RPC's enum)."""

    SETTLED = 1
    RETURNED = 2
    FAILED = 3


class Submission(Protocol):
    """What a rail needs of one payout (read-only; the payouts package's
    `RailSubmission` dataclass is one). The destination is in clear: never
    logged or persisted by a rail."""

    @property
    def tenant_id(self) -> str: ...
    @property
    def payout_id(self) -> str: ...
    @property
    def end_to_end_id(self) -> str: ...
    @property
    def amount_minor(self) -> int: ...
    @property
    def currency(self) -> str: ...
    @property
    def beneficiary_kind(self) -> str: ...
    @property
    def holder_name(self) -> str: ...
    @property
    def country(self) -> str: ...
    @property
    def iban(self) -> str: ...
    @property
    def bic(self) -> str: ...
    @property
    def routing_number(self) -> str: ...
    @property
    def account_number(self) -> str: ...
    @property
    def account_type(self) -> str: ...
    @property
    def token(self) -> str: ...
    @property
    def description(self) -> str: ...


@dataclass(frozen=True, slots=True)
class RailReceipt:
    """The bank took the payment (or said at once what became of it)."""

    rail: str
    reference: str  # the rail's reference: message id + end-to-end id, trace number, ...
    end_to_end_id: str
    # accepted: in flight, the outcome comes later; settled / failed: the bank
    # answered at once (instant rails), and the same outcome is also polled.
    status: str
    reason_code: str = ""


@dataclass(frozen=True, slots=True)
class RailOutcome:
    rail: str
    tenant_id: str
    payout_id: str
    end_to_end_id: str
    outcome: Outcome
    reason_code: str = ""
    reason: str = ""
    rail_reference: str = ""
    amount_minor: int | None = None  # what the bank said moved, where it says
    key: str = ""  # the bank's reference it was found by (end-to-end id, trace)


class OutcomeSink(Protocol):
    """Where outcomes go: money_plane.payouts.service.Payouts.record_outcome
    has this signature (posting once per payout and outcome)."""

    async def record_outcome(
        self,
        tenant_id: str,
        payout_id: str,
        outcome: int,
        *,
        reason_code: str = "",
        reason: str = "",
        rail_reference: str = "",
    ) -> object: ...


@dataclass(frozen=True, slots=True)
class Cutoff:
    """A window closes at `time` (local to `tz`) on business days."""

    time: dt.time
    tz: str = "America/New_York"


@dataclass(frozen=True, slots=True)
class Capabilities:
    rail: str
    currencies: frozenset[str]
    max_amount_minor: int
    beneficiary_kinds: frozenset[str]  # iban | us_bank | card | wallet
    # Empty: always open (24/7/365, instant rails and card pushes).
    cutoffs: tuple[Cutoff, ...] = ()
    holidays: frozenset[dt.date] = field(default_factory=frozenset)
    # The business-day calendar (the settlement schedules' names: FED,
    # NYSE, TARGET from the `holidays` package; "": weekends only).
    calendar: str = ""
    fixed_cost_minor: int = 0
    cost_bps: float = 0.0
    # Countries it reaches (ISO 3166); empty: any.
    countries: frozenset[str] = field(default_factory=frozenset)

    def cost_minor(self, amount_minor: int) -> int:
        return self.fixed_cost_minor + round(amount_minor * self.cost_bps / 10_000)

    def is_business_day(self, day: dt.date) -> bool:
        return day not in self.holidays and is_business_day(day, self.calendar)

    def next_window(self, at: dt.datetime) -> dt.datetime | None:
        """The next cut-off at or after `at` (aware) a payment submitted now
        makes; None for an always-open rail."""
        if not self.cutoffs:
            return None
        for days in range(15):
            for cutoff in sorted(self.cutoffs, key=lambda c: c.time):
                local = at.astimezone(ZoneInfo(cutoff.tz))
                day = local.date() + dt.timedelta(days=days)
                if not self.is_business_day(day):
                    continue
                close = dt.datetime.combine(day, cutoff.time, tzinfo=ZoneInfo(cutoff.tz))
                if close >= at:
                    return close
        return None

    def unreachable_because(self, sub: Submission) -> tuple[str, str] | None:
        """(field, why) when this rail cannot carry the payout; None when it can."""
        if sub.currency not in self.currencies:
            return "currency", f"{self.rail} carries {sorted(self.currencies)}"
        if sub.amount_minor > self.max_amount_minor:
            return (
                "amount_minor",
                f"{self.rail} carries at most {self.max_amount_minor} minor units",
            )
        if sub.beneficiary_kind not in self.beneficiary_kinds:
            return "beneficiary_kind", f"{self.rail} pays {sorted(self.beneficiary_kinds)}"
        if self.countries and sub.country not in self.countries:
            return "country", f"{self.rail} does not reach {sub.country or 'that country'}"
        return None

    def reaches(self, sub: Submission) -> bool:
        return self.unreachable_because(sub) is None


def check_submission(caps: Capabilities, sub: Submission) -> None:
    """Refuses (INVALID_ARGUMENT, the field named `submission.<field>`) what
    the rail cannot carry, before anything is sent."""
    for name in ("tenant_id", "payout_id", "end_to_end_id", "holder_name"):
        if not getattr(sub, name):
            raise refuse("FIELD_REQUIRED", f"submission.{name} is required", f"submission.{name}")
    check_currency(sub.currency, "submission.currency")
    if sub.amount_minor <= 0:
        raise refuse(
            "AMOUNT_INVALID", "submission.amount_minor must be positive", "submission.amount_minor"
        )
    why = caps.unreachable_because(sub)
    if why is not None:
        raise refuse("RAIL_CANNOT_CARRY", why[1], f"submission.{why[0]}")


class Rail(Protocol):
    """One rail adapter. `submit` is idempotent on the end-to-end id (the
    bank answers a second submission of it as the first)."""

    @property
    def name(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def submit(self, submission: Submission) -> RailReceipt: ...

    async def poll(self) -> list[RailOutcome]:
        """The outcomes the bank reported since the last poll."""
        ...

    async def aclose(self) -> None: ...
