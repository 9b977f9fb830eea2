"""Recognising raw PII (ARCHITECTURE.md rule 4): the one implementation.

`scan(text, phone_region)` finds every card number, IBAN, e-mail address and
phone number inside a text and gives each one's span and canonical form (the
spelling a token is computed from, so every way of writing one value gives one
token). The gateway replaces each span by its token; the AI plane refuses what
`find_pii` still finds (defence in depth behind the gateway).

What counts:
- Card numbers (PANs): 13 to 19 digits that pass Luhn and start like a payment
  card (2-6; 1 only for 15-digit UATP), written with any separators between
  digits (spaces, dashes, dots, slashes, underscores) and in any Unicode digits
  (the text is NFKC-normalized and its non-ASCII decimal digits read as ASCII
  ones first; invisible format characters are dropped). The card-like start
  keeps millisecond, microsecond and nanosecond timestamps (13, 16, 19 digits
  starting with 1) from being taken for cards.
- IBANs: a country code, two check digits and the account, with or without
  spaces, valid under ISO 13616 (mod 97) and the country's format
  (`python-stdnum`).
- E-mail addresses: local@domain.tld, Unicode letters included.
- Phone numbers: what Google's libphonenumber (`phonenumbers`) finds as a valid
  number, given in E.164. Numbers in international form (a +) always, however
  grouped; national forms only when a `phone_region` is given (the gateway's
  `gateway.pii.phone_region`) and grouped as that region groups its numbers
  (or not grouped at all). A match glued to letters or digits by - _ / (an
  order number such as ORD-2026-000123) is not a phone; dates and times are
  blanked before the parser looks. tests/runtime/test_pii.py holds the
  look-alikes (dates, times, timestamps, amounts, ids, versions, addresses).

Cheap first: a text without a digit and without an @ costs one regular
expression search (under a microsecond); the phone parser (tens of
microseconds) only runs on a text holding seven digits close together (and,
without a region, a +), the IBAN validator only on an IBAN country code
followed by two digits and the country's length of characters.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import numdb

from triplane.runtime.errors import InvalidArgument

PAN, EMAIL, PHONE, IBAN = "pan", "email", "phone", "iban"
KINDS = (PAN, IBAN, EMAIL, PHONE)

MIN_PAN_DIGITS, MAX_PAN_DIGITS = 13, 19
MIN_IBAN_CHARS, MAX_IBAN_CHARS = 15, 34

# Anything worth a closer look: a digit or an @.
_HINT = re.compile(r"[0-9@]")
# Digits with up to three separator characters between them (a card number
# written 4111 - 1111 - 1111 - 1111 is one run).
_SEPARATOR_CLASS = r"[ \t.\-_/\u2010-\u2015\u2212]"
_DIGIT_RUN = re.compile(rf"[0-9](?:{_SEPARATOR_CLASS}{{0,3}}[0-9])*")
# The same, only runs of at least a card's shortest length.
_CARD_RUN = re.compile(rf"[0-9](?:{_SEPARATOR_CLASS}{{0,3}}[0-9]){{{MIN_PAN_DIGITS - 1},}}")
_DIGIT_GROUP = re.compile(r"[0-9]+")
_EMAIL = re.compile(
    r"[\w.!#$%&'*+/=?^`{|}~-]{1,64}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}"
)
_IBAN_HINT = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}(?:[ \-]?[A-Za-z0-9]){11,32}")
_PHONE_HINT = re.compile(r"[0-9](?:[ \t().\-/]{0,3}[0-9]){6}")
_NOT_DIGIT = re.compile(r"[^0-9]")
# What any finding in ASCII text without a region needs (a superset, to skip
# the scan): an @, a +, a card's thirteen digits with its separators between
# them, or an IBAN's start at the start of a word.
_MAYBE_PII_WITHOUT_REGION = re.compile(
    r"[@+]|[0-9](?:[ \t._/-]{0,3}[0-9]){12}|(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}"
)
_ANY_DIGIT = re.compile(r"[0-9]")
_GLUE = "-_/"
# A number as written: digits (an optional + or an opening parenthesis
# first) with short separators between them, and its whitespace-separated
# groups. E.164 numbers have at most 15 digits; national ones at least 7.
_NUMBER_RUN = re.compile(r"[+(]?[0-9](?:[ \t().\-/]{0,3}[0-9])*\)?")
_WORD = re.compile(r"\S+")
MIN_PHONE_DIGITS, MAX_PHONE_DIGITS = 7, 15
# A phone is written in at most this many groups (+1 (415) 555 2671 is four),
# and one text gets at most this many parses (each costs tens of
# microseconds; a text of single digits must not cost thousands).
MAX_PHONE_GROUPS = 6
MAX_PHONE_RETRIES = 16
# Dates and times (ISO 8601, 15/01/2026, 15.01.2026, 12:30:45), which are
# never phone numbers: blanked before the phone parser looks.
_DATE_TIME = re.compile(
    r"(?<![0-9])(?:"
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"(?:[T ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?(?:Z|[+-][0-9]{2}:?[0-9]{2})?)?"
    r"|[0-9]{1,2}[/.][0-9]{1,2}[/.][0-9]{2,4}"
    r"|[0-9]{1,2}:[0-9]{2}(?::[0-9]{2}(?:[.,][0-9]+)?)?"
    r")(?![0-9])"
)
# libphonenumber's "unknown region": only numbers in international form.
_NO_REGION = "ZZ"


@dataclass(frozen=True, slots=True)
class Found:
    """One piece of PII in a scanned text."""

    start: int
    end: int
    kind: str
    # The value as a token is computed from it: a card's digits, an IBAN
    # compact and upper-case, an e-mail lower-case, a phone in E.164.
    canonical: str


@dataclass(frozen=True, slots=True)
class Scan:
    # The text the spans index: the input itself, or its normalized form when
    # it held characters outside ASCII.
    text: str
    found: tuple[Found, ...]


def normalize_text(text: str) -> str:
    """NFKC, non-ASCII decimal digits as ASCII ones, format characters (zero
    width joiners and the like) dropped. ASCII text is returned as it is."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    out = []
    for char in text:
        if char.isascii():
            out.append(char)
        elif char.isdecimal():
            out.append(chr(48 + unicodedata.decimal(char)))
        elif unicodedata.category(char) != "Cf":
            out.append(char)
    return "".join(out)


_LUHN_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def luhn_valid(digits: str) -> bool:
    kept = sum(map(int, digits[-1::-2]))
    doubled = sum(map(_LUHN_DOUBLED.__getitem__, map(int, digits[-2::-2])))
    return (kept + doubled) % 10 == 0


def digits_of(value: str) -> str:
    return _NOT_DIGIT.sub("", normalize_text(value))


# A card's first digit -> its possible lengths, longest first.
_CARD_LENGTHS = {
    first: tuple(range(MAX_PAN_DIGITS, MIN_PAN_DIGITS - 1, -1)) for first in "23456"
} | {"1": (15,)}


def is_card_number(digits: str) -> bool:
    """13-19 digits, Luhn-valid, starting like a payment card."""
    if not MIN_PAN_DIGITS <= len(digits) <= MAX_PAN_DIGITS:
        return False
    first = digits[0]
    if first not in "23456" and not (first == "1" and len(digits) == 15):
        return False
    return luhn_valid(digits)


def looks_like_pan(value: str) -> bool:
    """A value given as a card number: only digits and separators, 12-19
    digits, Luhn-valid (a named card field is checked, not guessed at)."""
    text = normalize_text(value).strip()
    if not text or _DIGIT_RUN.fullmatch(text) is None:
        return False
    digits = _NOT_DIGIT.sub("", text)
    return 12 <= len(digits) <= MAX_PAN_DIGITS and luhn_valid(digits)


# ---------------------------------------------------------------- finders


def _glued_to_a_letter(text: str, start: int, end: int) -> bool:
    """The digits touch a letter on either side: part of a word such as a hex
    id (5c6940174981481a8dd4...: 0.12% of random UUIDs hold a Luhn-valid
    run of a card's length), never a card number as people write one. A card
    set off by a separator (cust-4111..., acct_4111...) is still found."""
    return (start > 0 and text[start - 1].isalpha()) or (end < len(text) and text[end].isalpha())


# A UUID in its canonical form (8-4-4-4-12 hex digits) is an identifier: its
# first three groups can be sixteen Luhn-valid digits (31668161-1529-4293-...).
_UUID = re.compile(
    r"(?<![0-9A-Za-z])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}(?![0-9A-Za-z])"
)


def _cards(text: str) -> list[Found]:
    found: list[Found] = []
    uuids = [m.span() for m in _UUID.finditer(text)] if "-" in text else []
    for run in _CARD_RUN.finditer(text):
        if any(start <= run.start() < end for start, end in uuids):
            continue
        groups = [(g.start() + run.start(), g.group()) for g in _DIGIT_GROUP.finditer(run.group())]
        found.extend(_cards_in_groups(groups, text))
    return found


def _cards_in_groups(groups: list[tuple[int, str]], text: str) -> list[Found]:
    """Card numbers made of whole consecutive groups (a card written with an
    expiry or another number after it is still found), the longest first; a
    span glued to a letter is no card, and a shorter one is tried."""
    found: list[Found] = []
    joined = "".join(digits for _, digits in groups)
    # offsets[i]: where group i starts in `joined`; offsets[-1]: its length.
    offsets = [0]
    for _, digits in groups:
        offsets.append(offsets[-1] + len(digits))
    # Where each group ends in `joined` -> the group after it.
    ends = {offset: group for group, offset in enumerate(offsets)}
    index = 0
    while index < len(groups):
        taken = -1
        lengths = _CARD_LENGTHS.get(groups[index][1][0], ())
        start = offsets[index]
        # Only the spans of a card's lengths that end at a group's end are
        # tried (a run of single digits would otherwise be a long walk).
        for length in lengths:
            end_group = ends.get(start + length, -1)
            if end_group > index:
                candidate = joined[start : start + length]
                end = groups[end_group - 1][0] + len(groups[end_group - 1][1])
                if is_card_number(candidate) and not _glued_to_a_letter(
                    text, groups[index][0], end
                ):
                    found.append(Found(groups[index][0], end, PAN, candidate))
                    taken = end_group - 1
                    break
        index = taken + 1 if taken >= 0 else index + 1
    return found


def _mod97_valid(compact: str) -> bool:
    rearranged = compact[4:] + compact[:4]
    try:
        number = "".join(str(int(char, 36)) for char in rearranged)
    except ValueError:
        return False
    return int(number) % 97 == 1


def _iban_lengths() -> dict[str, int]:
    """Country code -> IBAN length, from python-stdnum's IBAN registry."""
    registry = numdb.get("iban")
    lengths: dict[str, int] = {}
    for first in string.ascii_uppercase:
        for second in string.ascii_uppercase:
            country = first + second
            bban = registry.info(country + "00")[0][1].get("bban", "")
            if bban:
                lengths[country] = 4 + sum(int(n) for n in re.findall(r"([0-9]+)!", bban))
    return lengths


_IBAN_LENGTHS = _iban_lengths()


def _ibans(text: str) -> list[Found]:
    found: list[Found] = []
    position = 0
    while (hint := _IBAN_HINT.search(text, position)) is not None:
        # Each country's IBANs have one length: the hint (which may run on
        # into the words, or the IBAN, after it) is cut to it, then checked;
        # the search goes on right after what was taken.
        position = hint.start() + 1
        length = _IBAN_LENGTHS.get(hint.group()[:2].upper(), 0)
        chars = [(hint.start() + i, c) for i, c in enumerate(hint.group()) if c.isalnum()]
        if not length or len(chars) < length:
            continue
        compact = "".join(c for _, c in chars[:length]).upper()
        if _mod97_valid(compact) and stdnum_iban.is_valid(compact):
            end = chars[length - 1][0] + 1
            found.append(Found(hint.start(), end, IBAN, compact))
            position = end
    return found


def _emails(text: str) -> list[Found]:
    return [Found(m.start(), m.end(), EMAIL, m.group().casefold()) for m in _EMAIL.finditer(text)]


def _glued(text: str, start: int, end: int) -> bool:
    """True when the match continues a longer identifier (ORD-2026-000123)."""
    before = text[start - 1] if start > 0 else ""
    if before.isalnum() or (before in _GLUE and before and start > 1 and text[start - 2].isalnum()):
        return True
    after = text[end] if end < len(text) else ""
    return after.isalnum() or (
        after in _GLUE and bool(after) and end + 1 < len(text) and text[end + 1].isalnum()
    )


def _grouped_as_phone(raw: str, region: str | None) -> bool:
    """A number in national form counts only when grouped as the region
    groups phone numbers (or not grouped at all): 415-555-2671 is a phone,
    the reference 2026-000123 is not. One in international form counts
    however it is grouped (a + is written on purpose)."""
    strict = phonenumbers.PhoneNumberMatcher(
        raw, region or _NO_REGION, leniency=phonenumbers.Leniency.STRICT_GROUPING
    )
    return strict.has_next()


def _phone_at(text: str, start: int, end: int, region: str | None) -> Found | None:
    """The phone number written exactly at text[start:end], if it is one."""
    candidate = text[start:end]
    try:
        number = phonenumbers.parse(candidate, region or _NO_REGION)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    international = candidate.lstrip("(").startswith("+")
    if not international and not _grouped_as_phone(candidate, region):
        return None
    if _glued(text, start, end):
        return None
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return Found(start, end, PHONE, e164)


def _phones(text: str, region: str | None) -> list[Found]:
    """Phone numbers among the number runs of `text`: each run's groups
    (whitespace-separated) are tried as a number, the longest span of
    consecutive groups first, so "+1 415 555 2671 3 times" still holds one.
    At most MAX_PHONE_RETRIES parses a text (the parser is the costly step)."""
    found: list[Found] = []
    budget = MAX_PHONE_RETRIES
    for run in _NUMBER_RUN.finditer(text):
        raw = run.group()
        if len(_NOT_DIGIT.sub("", raw)) < MIN_PHONE_DIGITS:
            continue
        if region is None and "+" not in raw:
            continue  # without a region only international numbers count
        groups = [(run.start() + g.start(), run.start() + g.end()) for g in _WORD.finditer(raw)]
        # counts[i]: digits in the groups before group i.
        counts = [0]
        for start, end in groups:
            counts.append(counts[-1] + sum(c.isdigit() for c in text[start:end]))
        index = 0
        while index < len(groups):
            last_limit = min(len(groups), index + MAX_PHONE_GROUPS) - 1
            taken = -1
            for last in range(last_limit, index - 1, -1):
                start, end = groups[index][0], groups[last][1]
                digits = counts[last + 1] - counts[index]
                if not MIN_PHONE_DIGITS <= digits <= MAX_PHONE_DIGITS:
                    continue
                if budget <= 0:
                    return found
                budget -= 1
                item = _phone_at(text, start, end, region)
                if item is not None:
                    found.append(item)
                    taken = last
                    break
            index = taken + 1 if taken >= 0 else index + 1
    return found


def _overlaps(found: list[Found], item: Found) -> bool:
    return any(item.start < f.end and f.start < item.end for f in found)


def _blanked(text: str, spans: list[Found]) -> str:
    """The text with dates, times and the spans already found replaced by
    spaces (same length, so positions hold): the phone parser, the costly
    step, is not run on what is already known not to be a phone."""
    masked = _DATE_TIME.sub(lambda m: " " * len(m.group()), text)
    if not spans:
        return masked
    parts, position = [], 0
    for item in sorted(spans, key=lambda f: f.start):
        parts.append(masked[position : item.start])
        parts.append(" " * (item.end - item.start))
        position = item.end
    parts.append(masked[position:])
    return "".join(parts)


def scan(text: str, phone_region: str | None = None) -> Scan:
    """Every piece of PII in `text`, in order, none overlapping. Phones in
    national form are found only with a `phone_region` (ISO 3166 alpha-2)."""
    if _HINT.search(text) is None and text.isascii():
        return Scan(text, ())
    text = normalize_text(text)
    if _HINT.search(text) is None:
        return Scan(text, ())
    found: list[Found] = []
    has_digit = _ANY_DIGIT.search(text) is not None
    if has_digit:
        found.extend(_cards(text))
        for item in _ibans(text):
            if not _overlaps(found, item):
                found.append(item)
    if "@" in text:
        for item in _emails(text):
            if not _overlaps(found, item):
                found.append(item)
    # Without a region only numbers in international form count: no + sign,
    # no phone (the parser is the costly step; an identifier rarely has one).
    if has_digit and (phone_region or "+" in text) and _PHONE_HINT.search(text) is not None:
        blanked = _blanked(text, found)
        if _PHONE_HINT.search(blanked) is not None:
            found.extend(_phones(blanked, phone_region))
    found.sort(key=lambda f: f.start)
    return Scan(text, tuple(found))


def find_pii(value: str) -> str:
    """PAN, IBAN, EMAIL, PHONE (international form), or "" when nothing in
    the value is PII. The rule for identifiers: what the gateway refuses in an
    identifier, and no more, so the planes never refuse what it forwards."""
    if value.isascii() and _MAYBE_PII_WITHOUT_REGION.search(value) is None:
        return ""  # the common identifier: one regular expression, no scan
    found = scan(value).found
    return found[0].kind if found else ""


SPOKEN = {
    PAN: "card number",
    EMAIL: "e-mail address",
    PHONE: "phone number",
    IBAN: "IBAN",
}


def refuse_pii(fields: dict[str, str]) -> None:
    """INVALID_ARGUMENT (reason RAW_PII_REFUSED) naming the first field that
    carries PII. The value itself is never echoed back."""
    for name, value in fields.items():
        kind = find_pii(value)
        if kind:
            raise InvalidArgument(
                "RAW_PII_REFUSED",
                f"{name} looks like a raw {SPOKEN[kind]}; send a token instead",
                name,
                {"pii_kind": kind},
            )
