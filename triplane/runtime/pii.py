"""Recognising raw PII (ARCHITECTURE.md rule 4): the one implementation.

Two questions, two functions:
- `classify(value)`: is this whole value a card number (PAN, Luhn-checked),
  an e-mail address or a phone number? The gateway asks it of free-form
  attributes to decide what to tokenize.
- `find_pii(value)`: does this value contain one anywhere? The AI plane asks it
  of every input as defence in depth behind the gateway, and refuses.

Phone numbers are recognised conservatively (an international prefix, or the
grouped 3-3-4 form, when searching) so that tokens and numeric identifiers
are not mistaken for them.
"""

from __future__ import annotations

import re

from triplane.runtime.errors import InvalidArgument

# Whole-value forms.
_EMAIL_VALUE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[A-Za-z]{2,}$")
_PHONE_VALUE = re.compile(r"^\+?\(?[0-9][0-9 ()./-]{6,20}[0-9]$")
_PAN_VALUE = re.compile(r"^[0-9 -]{12,23}$")
# Forms found inside longer text.
_CARD_IN_TEXT = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_EMAIL_IN_TEXT = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE_IN_TEXT = re.compile(
    r"(?:(?<![\w])(?:\+|00)\d[\d ().-]{6,18}\d)"
    r"|(?:(?<!\d)\(?\d{3}\)?[ .-]\d{3}[ .-]\d{4}(?!\d))"
)
_NOT_DIGIT = re.compile(r"[^0-9]")

PAN, EMAIL, PHONE = "pan", "email", "phone"


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def digits_of(value: str) -> str:
    return _NOT_DIGIT.sub("", value)


def looks_like_pan(value: str) -> bool:
    if not _PAN_VALUE.match(value):
        return False
    digits = digits_of(value)
    return 12 <= len(digits) <= 19 and luhn_valid(digits)


def classify(value: str) -> str:
    """PAN, EMAIL, PHONE, or "" when the whole value is none of them."""
    text = value.strip()
    if looks_like_pan(text):
        return PAN
    if _EMAIL_VALUE.match(text):
        return EMAIL
    if _PHONE_VALUE.match(text) and 7 <= len(digits_of(text)) <= 15:
        return PHONE
    return ""


def find_pii(value: str) -> str:
    """PAN, EMAIL, PHONE, or "" when nothing in the value looks like PII."""
    for match in _CARD_IN_TEXT.finditer(value):
        digits = digits_of(match.group())
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return PAN
    if _EMAIL_IN_TEXT.search(value):
        return EMAIL
    if _PHONE_IN_TEXT.search(value):
        return PHONE
    return ""


_SPOKEN = {PAN: "card number", EMAIL: "e-mail address", PHONE: "phone number"}


def refuse_pii(fields: dict[str, str]) -> None:
    """INVALID_ARGUMENT (reason RAW_PII_REFUSED) naming the first field that
    carries PII. The value itself is never echoed back."""
    for name, value in fields.items():
        kind = find_pii(value)
        if kind:
            raise InvalidArgument(
                "RAW_PII_REFUSED",
                f"{name} looks like a raw {_SPOKEN[kind]}; send a token instead",
                name,
                {"pii_kind": kind},
            )
