"""Settlement schedules: when a merchant's period closes, and what it nets.

Pure functions of a schedule and an instant (from the runtime's Clock, never
the wall clock). A period closes at the schedule's cut-off (a local time in
its IANA zone) on a business day of its calendar (weekends and the
calendar's holidays, from the `holidays` package: FED the Federal Reserve,
NYSE the New York Stock Exchange, TARGET the ECB's TARGET2; "" weekends
only):

- daily: every business day; the period is that day (`D2026-06-01`);
- weekly: the first business day on or after the schedule's weekday in each
  ISO week (`W2026-23`);
- instant: every sweep (`I<minute since the epoch>`), no cut-off.

Only the latest closed period is settled: after an outage, the periods
missed roll into it (money is never settled twice, and none is left
behind). What a period settles is the merchant's balance as of its cut-off
(what arrived later waits for the next period), capped by what is available
now; fees and the rolling reserve are netted from it, and a net below the
minimum leaves the balance for the next period.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays
from msgspec import Struct

from triplane.runtime.errors import InvalidArgument

# Calendar names -> the `holidays` package's financial calendars.
CALENDARS = {"": "", "FED": "FED", "NYSE": "NYSE", "TARGET": "ECB"}
MINUTE_US = 60_000_000
DAY_US = 86_400_000_000


class Frequency(enum.StrEnum):
    INSTANT = "instant"
    DAILY = "daily"
    WEEKLY = "weekly"


class Schedule(Struct, frozen=True):
    tenant_id: str
    # The merchant's account its sales accrue in (the schedule's id).
    account_id: str
    merchant_id: str
    # Where a settled period's net goes: the account a payout is made from.
    payable_account_id: str
    frequency: str
    # HH:MM local time, in time_zone (daily, weekly).
    cut_off: str = "17:00"
    time_zone: str = "UTC"
    calendar: str = ""
    # weekly: 0 Monday .. 4 Friday.
    weekday: int = 0
    min_payout_minor: int = 0
    fee_fixed_minor: int = 0
    fee_bps: int = 0
    fee_account_id: str = ""
    # Rolling reserve: this share of what is left after the fee, held in
    # reserve_account_id for reserve_days, then released to the payable account.
    reserve_bps: int = 0
    reserve_days: int = 0
    reserve_account_id: str = ""


@dataclass(frozen=True, slots=True)
class Period:
    key: str
    # The cut-off instant (us); for instant, the sweep's own instant.
    closes_at_us: int


@dataclass(frozen=True, slots=True)
class Netting:
    gross_minor: int
    fee_minor: int
    reserve_minor: int
    net_minor: int


def _refuse(reason: str, message: str, field: str) -> InvalidArgument:
    return InvalidArgument(reason, message, f"schedule.{field}")


def check_schedule(schedule: Schedule) -> None:
    """Refuses a schedule that cannot be run, naming the field."""
    try:
        Frequency(schedule.frequency)
    except ValueError:
        raise _refuse(
            "FREQUENCY_INVALID", "frequency is instant, daily or weekly", "frequency"
        ) from None
    try:
        ZoneInfo(schedule.time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise _refuse("TIME_ZONE_UNKNOWN", "time_zone is an IANA zone", "time_zone") from None
    if schedule.calendar not in CALENDARS:
        raise _refuse("CALENDAR_UNKNOWN", "calendar is FED, NYSE, TARGET or empty", "calendar")
    _cut_off(schedule.cut_off)
    if not 0 <= schedule.weekday <= 6:
        raise _refuse("WEEKDAY_INVALID", "weekday is 0 (Monday) .. 6", "weekday")
    for name in ("min_payout_minor", "fee_fixed_minor", "reserve_days"):
        if getattr(schedule, name) < 0:
            raise _refuse("NEGATIVE", f"{name} must be >= 0", name)
    for name in ("fee_bps", "reserve_bps"):
        if not 0 <= getattr(schedule, name) <= 10_000:
            raise _refuse("BASIS_POINTS_INVALID", f"{name} is 0..10000", name)
    if (schedule.fee_bps or schedule.fee_fixed_minor) and not schedule.fee_account_id:
        raise _refuse("FIELD_REQUIRED", "a fee needs fee_account_id", "fee_account_id")
    if schedule.reserve_bps and not schedule.reserve_account_id:
        raise _refuse("FIELD_REQUIRED", "a reserve needs reserve_account_id", "reserve_account_id")
    if schedule.payable_account_id == schedule.account_id:
        raise _refuse("SAME_ACCOUNT", "payable_account_id must differ", "payable_account_id")


def _cut_off(text: str) -> dt.time:
    try:
        hour, minute = (int(part) for part in text.split(":"))
        return dt.time(hour, minute)
    except ValueError:
        raise _refuse("CUT_OFF_INVALID", "cut_off is HH:MM", "cut_off") from None


@functools.lru_cache(maxsize=64)
def _holidays(calendar: str, year: int) -> frozenset[dt.date]:
    name = CALENDARS[calendar]
    if not name:
        return frozenset()
    return frozenset(holidays.financial_holidays(name, years=year).keys())


def is_business_day(day: dt.date, calendar: str) -> bool:
    return day.weekday() < 5 and day not in _holidays(calendar, day.year)


def _closes_at_us(schedule: Schedule, day: dt.date) -> int:
    zone = ZoneInfo(schedule.time_zone)
    local = dt.datetime.combine(day, _cut_off(schedule.cut_off), zone)
    return int(local.timestamp() * 1_000_000)


def _settlement_day(schedule: Schedule, monday: dt.date) -> dt.date:
    day = monday + dt.timedelta(days=schedule.weekday)
    while not is_business_day(day, schedule.calendar):
        day += dt.timedelta(days=1)
    return day


def latest_closed_period(schedule: Schedule, now_us: int) -> Period | None:
    """The latest period whose cut-off has passed at `now_us`."""
    if schedule.frequency == Frequency.INSTANT:
        return Period(f"I{now_us // MINUTE_US}", now_us)
    zone = ZoneInfo(schedule.time_zone)
    today = dt.datetime.fromtimestamp(now_us / 1_000_000, zone).date()
    if schedule.frequency == Frequency.DAILY:
        for back in range(15):
            day = today - dt.timedelta(days=back)
            if is_business_day(day, schedule.calendar):
                closes = _closes_at_us(schedule, day)
                if closes <= now_us:
                    return Period(f"D{day.isoformat()}", closes)
        return None
    monday = today - dt.timedelta(days=today.weekday())
    for weeks in range(3):
        start = monday - dt.timedelta(weeks=weeks)
        day = _settlement_day(schedule, start)
        closes = _closes_at_us(schedule, day)
        if closes <= now_us:
            year, week, _ = start.isocalendar()
            return Period(f"W{year}-{week:02d}", closes)
    return None


def net(schedule: Schedule, gross_minor: int) -> Netting:
    """The fee (fixed + basis points of the gross, at most the gross), the
    reserve (basis points of what the fee leaves) and the net, floored."""
    gross = max(gross_minor, 0)
    fee = min(gross, schedule.fee_fixed_minor + gross * schedule.fee_bps // 10_000)
    reserve = (gross - fee) * schedule.reserve_bps // 10_000
    return Netting(gross, fee, reserve, gross - fee - reserve)
