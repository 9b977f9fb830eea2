"""The wire vocabulary every plane speaks the same way: times, money, page
sizes and page tokens.

Each plane's `codec.py` translates its own messages; what they share is here,
so a time, an amount or a page is read, checked and refused by one rule with
one reason wherever it arrives. Protobuf messages only: no grpc import (the
errors raised are the domain's, mapped to statuses by the server).

- Times are integers of microseconds since the Unix epoch. 0 is "unset": the
  zero `Timestamp` (an absent field reads the same) is 0, and 0 is written as
  the zero `Timestamp`. A `Timestamp` outside 0001-01-01..9999-12-31 UTC, or
  with nanos outside 0..999999999, is INVALID_ARGUMENT INVALID_TIMESTAMP
  naming the field. Sub-microsecond nanos are dropped.
- Money is an int64 of minor units and an ISO 4217 code known to
  `triplane.runtime.currencies`: an unknown code is UNKNOWN_CURRENCY, an
  amount that is not positive AMOUNT_NOT_POSITIVE, one above the bound
  AMOUNT_TOO_LARGE (OUT_OF_RANGE), each naming the field.
- Page sizes: 0 asks for the list's default, a negative size is
  INVALID_ARGUMENT PAGE_SIZE_INVALID, and a size above the list's maximum is
  served as that maximum (AIP-158: a page may hold fewer than asked).
- Page tokens have one format, versioned and opaque to callers: base64url
  (unpadded) of a small JSON object `{"v": 1, "k": <list kind>, "p":
  [<position>...]}`. A list accepts only tokens of its own kind and position
  shape, so a token of another list, a garbled one or one longer than any we
  issue is INVALID_ARGUMENT PAGE_TOKEN_INVALID naming `page_token`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import msgspec
from google.protobuf import timestamp_pb2

from triplane.common.v1 import types_pb2
from triplane.runtime import currencies
from triplane.runtime.errors import InvalidArgument, OutOfRange

# ---------------------------------------------------------------- times

_MICROS_PER_SECOND = 1_000_000
_NANOS_PER_MICRO = 1_000
# google.protobuf.Timestamp's own range: 0001-01-01T00:00:00Z..9999-12-31T23:59:59Z.
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
INVALID_TIMESTAMP = "INVALID_TIMESTAMP"


def _seconds_nanos(us: int) -> tuple[int, int]:
    seconds, micros = divmod(us, _MICROS_PER_SECOND)
    # Our own times are always in range: one outside it is a bug, stopped here
    # rather than written where every reader would choke on it.
    if not MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS:
        raise ValueError(f"{us} us is outside google.protobuf.Timestamp's range")
    return seconds, micros * _NANOS_PER_MICRO


def timestamp(us: int) -> timestamp_pb2.Timestamp:
    """Microseconds since the epoch as a Timestamp; 0 (unset) is the zero
    Timestamp."""
    seconds, nanos = _seconds_nanos(us)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def fill_timestamp(stamp: timestamp_pb2.Timestamp, us: int) -> None:
    """Writes `us` into a Timestamp field in place (`message.sent_at`), as
    `timestamp` would build it, without building and copying a message."""
    stamp.seconds, stamp.nanos = _seconds_nanos(us)


def micros(stamp: timestamp_pb2.Timestamp, field: str) -> int:
    """Microseconds since the epoch of a Timestamp a caller sent; 0 when it is
    unset (absent or zero). Out of range: INVALID_TIMESTAMP naming `field`."""
    seconds, nanos = stamp.seconds, stamp.nanos
    if not (
        MIN_TIMESTAMP_SECONDS <= seconds <= MAX_TIMESTAMP_SECONDS and 0 <= nanos < 1_000_000_000
    ):
        raise InvalidArgument(
            INVALID_TIMESTAMP,
            f"{field} is not a valid time (0001-01-01..9999-12-31 UTC, nanos 0..999999999)",
            field,
        )
    return seconds * _MICROS_PER_SECOND + nanos // _NANOS_PER_MICRO


# ---------------------------------------------------------------- money

UNKNOWN_CURRENCY = "UNKNOWN_CURRENCY"
AMOUNT_NOT_POSITIVE = "AMOUNT_NOT_POSITIVE"
AMOUNT_TOO_LARGE = "AMOUNT_TOO_LARGE"


def money(amount_minor: int, currency: str) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=amount_minor, currency=currency)


def check_currency(currency: str, field: str) -> None:
    """A currency is required and must be an ISO 4217 code we know."""
    if not currency:
        raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field)
    if not currencies.is_known(currency):
        # Cut: the code is the caller's text, echoed into logs and statuses.
        raise InvalidArgument(UNKNOWN_CURRENCY, f"{currency[:8]!r} is not ISO 4217", field)


def check_amount(amount_minor: int, field: str, max_minor: int = currencies.INT64_MAX) -> None:
    """An amount is a positive count of minor units, at most `max_minor`
    (int64 unless a plane bounds it lower)."""
    if amount_minor <= 0:
        raise InvalidArgument(AMOUNT_NOT_POSITIVE, f"{field} must be > 0", field)
    if amount_minor > max_minor:
        raise OutOfRange(AMOUNT_TOO_LARGE, f"{field} is above {max_minor}", field)


def amount(
    message: types_pb2.Money,
    field: str,
    *,
    required: bool = True,
    max_minor: int = currencies.INT64_MAX,
) -> tuple[int, str]:
    """(amount_minor, currency) of a Money a caller sent, checked: the
    currency first (`<field>.currency`), then the amount
    (`<field>.amount_minor`). An unset Money (no currency, zero amount) is
    FIELD_REQUIRED naming `field` when required, else (0, "")."""
    amount_minor, currency = message.amount_minor, message.currency
    if not currency and amount_minor == 0:
        if required:
            raise InvalidArgument("FIELD_REQUIRED", f"{field} is required", field)
        return 0, ""
    check_currency(currency, f"{field}.currency")
    check_amount(amount_minor, f"{field}.amount_minor", max_minor)
    return amount_minor, currency


# ---------------------------------------------------------------- page sizes

PAGE_SIZE_INVALID = "PAGE_SIZE_INVALID"


def page_size(requested: int, default: int, maximum: int, field: str = "page_size") -> int:
    """The size of the page to serve: `default` for 0, at most `maximum`
    (a larger request is served as the maximum, not refused); negative is
    PAGE_SIZE_INVALID naming `field`."""
    if requested < 0:
        raise InvalidArgument(PAGE_SIZE_INVALID, f"{field} must be >= 0", field)
    return min(requested or default, maximum)


# ---------------------------------------------------------------- page tokens

PAGE_TOKEN_VERSION = 1
PAGE_TOKEN_INVALID = "PAGE_TOKEN_INVALID"
# Part of the format rather than a config key: every position we issue is a
# few ids and integers, each bounded by its plane's id limits, far below this;
# a longer token is not ours and is refused before it is decoded.
MAX_PAGE_TOKEN_CHARS = 1024

Position = tuple[int | str, ...]


class _PageToken(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    k: str
    p: list[int | str]


_token_encoder = msgspec.json.Encoder()
_token_decoder = msgspec.json.Decoder(_PageToken)


def encode_page_token(kind: str, position: Sequence[int | str]) -> str:
    """The token that resumes list `kind` after `position` (its sort key)."""
    body = _token_encoder.encode(_PageToken(v=PAGE_TOKEN_VERSION, k=kind, p=list(position)))
    token = base64.urlsafe_b64encode(body).rstrip(b"=").decode()
    assert len(token) <= MAX_PAGE_TOKEN_CHARS, f"a {kind} page token of {len(token)} chars"
    return token


def decode_page_token(
    token: str, kind: str, shape: Sequence[type[int] | type[str]], field: str = "page_token"
) -> Position | None:
    """The position a token of list `kind` resumes after, each element of the
    type `shape` names; None for "" (the first page). Anything else (another
    list's token, another version, a garbled or overlong one) is
    PAGE_TOKEN_INVALID naming `field`."""
    if not token:
        return None
    refused = InvalidArgument(PAGE_TOKEN_INVALID, f"{field} is not one this list issued", field)
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise refused
    try:
        padded = token + "=" * (-len(token) % 4)
        body = base64.b64decode(padded, altchars=b"-_", validate=True)
        decoded = _token_decoder.decode(body)
    except (binascii.Error, ValueError, msgspec.DecodeError) as exc:
        raise refused from exc
    if decoded.v != PAGE_TOKEN_VERSION or decoded.k != kind or len(decoded.p) != len(shape):
        raise refused
    # bool is an int to Python but never a position; JSON true/false decode as
    # neither int nor str here, so only the exact types pass.
    for value, expected in zip(decoded.p, shape, strict=True):
        if type(value) is not expected:
            raise refused
    return tuple(decoded.p)


def decode_page_offset(token: str, kind: str, field: str = "page_token") -> int:
    """For a list paged by position (`encode_page_token(kind, (offset,))`):
    0 for the first page, else the offset its token names; a negative one
    was never issued and is PAGE_TOKEN_INVALID."""
    position = decode_page_token(token, kind, (int,), field)
    if position is None:
        return 0
    offset = int(position[0])
    if offset < 0:
        raise InvalidArgument(PAGE_TOKEN_INVALID, f"{field} is not one this list issued", field)
    return offset
