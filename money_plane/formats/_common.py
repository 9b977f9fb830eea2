"""Shared pieces of the bank formats: refusals, currencies and amounts.

Refusals are the runtime's `InvalidArgument` (code, machine-readable reason,
the field at fault), never a new error type. Messages never echo an account
number, IBAN or name: they travel to logs.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from triplane.runtime.errors import InvalidArgument

CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")

# ISO 4217 minor-unit exponents that are not 2 (everything else has 2).
_EXPONENTS: dict[str, int] = {
    **dict.fromkeys(
        [
            "BIF",
            "CLP",
            "DJF",
            "GNF",
            "ISK",
            "JPY",
            "KMF",
            "KRW",
            "PYG",
            "RWF",
            "UGX",
            "UYI",
            "VND",
            "VUV",
            "XAF",
            "XOF",
            "XPF",
        ],
        0,
    ),
    **dict.fromkeys(["BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"], 3),
    "CLF": 4,
    "UYW": 4,
}


def refuse(reason: str, message: str, field: str, **metadata: str) -> InvalidArgument:
    """The refusal of a value or of a file: `field` is a request field, an
    element path or `line N`."""
    return InvalidArgument(reason, message, field, metadata)


def check_currency(value: str, field: str) -> str:
    if not CURRENCY_PATTERN.fullmatch(value or ""):
        raise refuse("CURRENCY_INVALID", f"{field} must be an ISO 4217 code", field)
    return value


def exponent(currency: str) -> int:
    """The currency's minor-unit exponent (ISO 4217)."""
    return _EXPONENTS.get(currency, 2)


_AMOUNT = re.compile(r"[0-9]+([.,][0-9]*)?")


def to_minor(text: str, currency: str, field: str) -> int:
    """A decimal amount as written in a file ("1234.50", "1234,5") to minor
    units of `currency`; refused when it is not a plain non-negative number or
    carries more precision than the currency has."""
    raw = (text or "").strip()
    if not _AMOUNT.fullmatch(raw):
        raise refuse("AMOUNT_INVALID", f"{field} is not a non-negative decimal amount", field)
    try:
        value = Decimal(raw.replace(",", "."))
    except InvalidOperation as exc:  # pragma: no cover - the pattern keeps it out
        raise refuse("AMOUNT_INVALID", f"{field} is not a decimal amount", field) from exc
    scaled = value.scaleb(exponent(currency))
    if scaled != scaled.to_integral_value():
        raise refuse(
            "AMOUNT_PRECISION_INVALID",
            f"{field} has more decimals than {currency} has minor units",
            field,
        )
    return int(scaled)


def from_minor(amount_minor: int, currency: str, separator: str = ".") -> str:
    """Minor units to the decimal text files carry ("1234.50"; "1234" for 0-exponent)."""
    if amount_minor < 0:
        raise ValueError("amounts in files are unsigned; the sign travels separately")
    exp = exponent(currency)
    if exp == 0:
        return str(amount_minor)
    whole, frac = divmod(amount_minor, 10**exp)
    return f"{whole}{separator}{frac:0{exp}d}"


def require(value: str, field: str) -> str:
    if not value:
        raise refuse("FIELD_REQUIRED", f"{field} is required", field)
    return value


def check_length(value: str, field: str, max_len: int) -> str:
    if len(value) > max_len:
        raise refuse("FIELD_TOO_LONG", f"{field} is longer than {max_len} characters", field)
    return value
