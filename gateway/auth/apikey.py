"""The partner API key: its format, its checksum and its stored hash.

    tpk_<environment>_<key id: 12>_<secret: 32><checksum: 6>

is `tpk_` + environment (`live`/`test`) + `_` + key id (12 base62
characters, public: it names the key in lists and logs) + `_` + secret (32
base62 characters, about 190 bits) + checksum (6 base62 characters: CRC32 of
everything before it, as GitHub's tokens). The prefix and the checksum let a
secret scanner find a leaked key and tell a real one from a look-alike
without asking us (`KEY_PATTERN` is the regex to register with one); the
checksum also lets the gateway refuse a mistyped key without a database read.

The gateway never stores a key: only HMAC-SHA256 of it under a pepper kept
out of the database (a file or a Kubernetes Secret), so a copy of the database
alone cannot make or check keys."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib
from dataclasses import dataclass

from triplane.runtime.errors import Unauthenticated

PREFIX = "tpk"
ENVIRONMENTS = ("live", "test")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_ID_CHARS = 12
SECRET_CHARS = 32
CHECKSUM_CHARS = 6
# What secret scanners look for (GitHub secret scanning custom patterns,
# gitleaks, trufflehog): the whole key, nothing around it.
KEY_PATTERN = re.compile(
    rf"{PREFIX}_(?:live|test)_[0-9A-Za-z]{{{KEY_ID_CHARS}}}_"
    rf"[0-9A-Za-z]{{{SECRET_CHARS + CHECKSUM_CHARS}}}"
)
KEY_ID_PATTERN = re.compile(f"[0-9A-Za-z]{{{KEY_ID_CHARS}}}")
KEY_CHARS = len(PREFIX) + 1 + 4 + 1 + KEY_ID_CHARS + 1 + SECRET_CHARS + CHECKSUM_CHARS

CREDENTIAL_MALFORMED = "CREDENTIAL_MALFORMED"
CREDENTIAL_CHECKSUM_INVALID = "CREDENTIAL_CHECKSUM_INVALID"


def base62(number: int, width: int) -> str:
    """`number` in base62, left-padded with '0' to `width` characters."""
    digits = []
    while number:
        number, digit = divmod(number, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    """CRC32 of `body`, in 6 base62 characters (62^6 > 2^32)."""
    return base62(zlib.crc32(body.encode()), CHECKSUM_CHARS)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(BASE62) for _ in range(length))


def new_key_id() -> str:
    return _random_base62(KEY_ID_CHARS)


def make_key(environment: str, key_id: str) -> str:
    """A new key for `key_id`: fresh secret, checksum appended."""
    assert environment in ENVIRONMENTS, environment
    assert KEY_ID_PATTERN.fullmatch(key_id), key_id
    body = f"{PREFIX}_{environment}_{key_id}_{_random_base62(SECRET_CHARS)}"
    return body + checksum(body)


def redacted(environment: str, key_id: str) -> str:
    """What may be shown of a key: everything but its secret."""
    return f"{PREFIX}_{environment}_{key_id}_"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    environment: str
    key_id: str


def looks_like_key(token: str) -> bool:
    """A bearer token in our key format (else it may be a JWT)."""
    return token.startswith(f"{PREFIX}_")


def parse(token: str) -> ParsedKey:
    """The environment and key id of a well-formed key whose checksum holds;
    UNAUTHENTICATED otherwise (before any lookup)."""
    if len(token) != KEY_CHARS or KEY_PATTERN.fullmatch(token) is None:
        raise Unauthenticated(CREDENTIAL_MALFORMED, "the API key is not a Triplane key")
    body, check = token[:-CHECKSUM_CHARS], token[-CHECKSUM_CHARS:]
    if not hmac.compare_digest(checksum(body), check):
        raise Unauthenticated(
            CREDENTIAL_CHECKSUM_INVALID, "the API key's checksum does not match: mistyped or cut"
        )
    _, environment, key_id, _ = token.split("_", 3)
    return ParsedKey(environment, key_id)


def keyed_hash(pepper: bytes, token: str) -> str:
    """What is stored of a key: HMAC-SHA256 under the pepper, hex."""
    return hmac.new(pepper, token.encode(), hashlib.sha256).hexdigest()
