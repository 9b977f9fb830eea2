"""Defence in depth behind the gateway's tokenization (ARCHITECTURE.md rule 4):
refuse anything that looks like a raw card number, e-mail address or phone
number, naming the field, so PII never reaches features, models or logs.

The checks are deliberately conservative about what they call a phone number
(an international prefix, or the grouped 3-3-4 form) so that tokens and
numeric identifiers are not refused; a card number is a 13-19 digit run
(spaces or dashes allowed) that passes the Luhn check.
"""

from __future__ import annotations

import re

from triplane.runtime.errors import InvalidArgument

_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(
    r"(?:(?<![\w])(?:\+|00)\d[\d ().-]{6,18}\d)"
    r"|(?:(?<!\d)\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d))"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if i % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def pii_kind(value: str) -> str:
    """ "card_number", "email", "phone" or "" when nothing looks like PII."""
    for match in _CARD.finditer(value):
        digits = re.sub(r"[ -]", "", match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return "card_number"
    if _EMAIL.search(value):
        return "email"
    if _PHONE.search(value):
        return "phone"
    return ""


def refuse_pii(fields: dict[str, str]) -> None:
    """Raises INVALID_ARGUMENT (reason RAW_PII_REFUSED) naming the first field
    that carries PII. The value itself is never echoed back."""
    for name, value in fields.items():
        kind = pii_kind(value)
        if kind:
            raise InvalidArgument(
                "RAW_PII_REFUSED",
                f"{name} looks like a raw {kind.replace('_', ' ')}; send a token instead",
                name,
                {"pii_kind": kind},
            )
