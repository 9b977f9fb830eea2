"""PII tokenization (ARCHITECTURE.md rule 4).

Names, card numbers, IBANs, e-mail addresses and phone numbers become
deterministic keyed tokens before anything reaches the AI plane, NATS, the
gateway's own store or a log line: HMAC-SHA256 under a per-tenant key derived
from one secret (a file: `gateway.pii.tokenization_key_path`, a Kubernetes
Secret in a cluster; the dev stack's is created under the state dir). The same
value always gives the same token within a tenant, however it is written (a
phone in E.164, a card's digits, an e-mail lower-case), and on every replica
that reads the same key file; across tenants the tokens differ, so no
cross-tenant linkage is possible. No vault is kept: nothing downstream needs a
clear value back (the policy plane receives names for sanctions screening in
clear, inside the trust boundary, and keeps them sealed at rest).

Every string the gateway forwards is scanned (`triplane.runtime.pii.scan`):
what is found inside a free text (an attribute, a flow, a payment method) is
replaced by its token in place, and so are the names the request itself
carries, wherever else in the request they appear. Identifiers are refused
instead (gateway/validate.py: PII_IN_IDENTIFIER). What the gateway remembers
of a request for idempotency is a keyed hash of each field (`digest_fields`),
never the field.

A token is `<prefix><kind>_` and 32 letters drawn from 16 consonants (the
128-bit digest, one letter per hex digit): it holds no digit, no @ and no
vowel, so no token is ever taken for a card number, an IBAN, a phone number,
an e-mail address or a name by the scanners downstream.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import phonenumbers

from triplane.runtime import pii as runtime_pii
from triplane.runtime.config import GatewayPiiConfig
from triplane.runtime.secret_files import decode_key, random_key_b64, read_secret, secret_path

PII_KEY_FILE = "gateway-pii.key"
MIN_KEY_BYTES = 32
TOKEN_HEX_CHARS = 32
NAME = "name"
DIGEST_PREFIX = "h:"

_SPACES = re.compile(r"\s+")
_NAME_PART = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
# Name parts shorter than this are not looked for on their own (initials,
# particles such as "de" or "al"); the full name still is.
MIN_NAME_PART_CHARS = 3
_TOKEN_LETTERS = str.maketrans("0123456789abcdef", "bcdfghjkmnpqrstv")

# Recognising PII is shared with the AI plane: triplane/runtime/pii.py.
luhn_valid = runtime_pii.luhn_valid
looks_like_pan = runtime_pii.looks_like_pan


def load_key(config: GatewayPiiConfig, state_dir: Path) -> bytes:
    """The tokenization key from its file (the dev stack's is created once)."""
    path = secret_path(config.tokenization_key_path, state_dir, PII_KEY_FILE, random_key_b64)
    return decode_key(read_secret(path), f"gateway.pii.tokenization_key_path ({path})")


# Per-tenant tokenization keys kept derived (each is one HMAC to derive again).
MAX_TENANT_KEYS = 10_000


class Tokenizer:
    """Deterministic keyed tokens, one key per tenant."""

    def __init__(self, secret: bytes, prefix: str, phone_region: str = "") -> None:
        assert len(secret) >= MIN_KEY_BYTES, "tokenization secret too short"
        self._secret = secret
        self._prefix = prefix
        self.phone_region = phone_region or None
        self._tenant_keys: dict[str, bytes] = {}

    @classmethod
    def from_config(cls, config: GatewayPiiConfig, state_dir: Path) -> Tokenizer:
        return cls(load_key(config, state_dir), config.token_prefix, config.phone_region)

    def _key(self, tenant_id: str) -> bytes:
        key = self._tenant_keys.get(tenant_id)
        if key is None:
            key = hmac.digest(self._secret, b"tenant:" + tenant_id.encode(), "sha256")
            # Bounded: tenants come from credentials, so this never fills in
            # use; made-up tenant ids (auth off) cost a re-derivation, not memory.
            if len(self._tenant_keys) >= MAX_TENANT_KEYS:
                self._tenant_keys.clear()
            self._tenant_keys[tenant_id] = key
        return key

    def normalize(self, kind: str, value: str) -> str:
        """The canonical form hashed, so every spelling of a value shares a token."""
        text = runtime_pii.normalize_text(value).strip()
        if kind == runtime_pii.PAN:
            return runtime_pii.digits_of(text)
        if kind == runtime_pii.PHONE:
            return self._e164(text)
        if kind == runtime_pii.IBAN:
            return "".join(text.split()).upper()
        if kind == runtime_pii.EMAIL:
            return text.casefold()
        return _SPACES.sub(" ", text).casefold()

    def _e164(self, text: str) -> str:
        try:
            number = phonenumbers.parse(text, self.phone_region)
        except phonenumbers.NumberParseException:
            number = None
        if number is not None and phonenumbers.is_possible_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
        digits = runtime_pii.digits_of(text)
        return f"+{digits}" if text.startswith("+") else digits

    def token(self, tenant_id: str, kind: str, value: str) -> str:
        """`<prefix><kind>_<32 letters>`; an empty value stays empty."""
        if not value:
            return ""
        return self._token(tenant_id, kind, self.normalize(kind, value))

    def _token(self, tenant_id: str, kind: str, canonical: str) -> str:
        message = f"{kind}\x1f{canonical}".encode()
        # hmac.digest: OpenSSL's one-shot HMAC, a fraction of hmac.new's cost.
        digest = hmac.digest(self._key(tenant_id), message, "sha256").hex()
        return f"{self._prefix}{kind}_{digest[:TOKEN_HEX_CHARS].translate(_TOKEN_LETTERS)}"

    def is_token(self, value: str) -> bool:
        return value.startswith(self._prefix)

    # ------------------------------------------------------------ free text

    def scrub_text(self, tenant_id: str, text: str, names: NameSet | None = None) -> str:
        """`text` with every card number, IBAN, e-mail address and phone
        number in it, and every occurrence of `names`, replaced by its token.
        Unchanged (the very string) when there is nothing to replace."""
        found = runtime_pii.scan(text, self.phone_region)
        scanned = found.text
        if found.found:
            parts, position = [], 0
            for item in found.found:
                parts.append(scanned[position : item.start])
                parts.append(self._token(tenant_id, item.kind, item.canonical))
                position = item.end
            parts.append(scanned[position:])
            scanned = "".join(parts)
        pattern = names.pattern_for(scanned) if names is not None else None
        if pattern is not None:
            replaced = pattern.sub(
                lambda m: self._token(tenant_id, NAME, self.normalize(NAME, m.group())), scanned
            )
            if replaced != scanned:
                return replaced
        return scanned if found.found else text

    def scrub(
        self, tenant_id: str, attributes: Mapping[str, str], names: NameSet | None = None
    ) -> dict[str, str]:
        """Attributes with the PII inside each value replaced by its token."""
        return {
            name: self.scrub_text(tenant_id, value, names) for name, value in attributes.items()
        }

    # ------------------------------------------------------------ remembered requests

    def digest(self, tenant_id: str, value: str) -> str:
        """A keyed hash of one field's value: equal values compare equal, and
        the clear value cannot be had back from it (no dictionary attack on a
        card number or a phone without the key)."""
        # Keyed BLAKE2b: a request has a score of fields, each hashed; an
        # HMAC costs four times as much for the same property here.
        mac = hashlib.blake2b(value.encode(), key=self._key(tenant_id), digest_size=16)
        return DIGEST_PREFIX + mac.hexdigest()

    def digest_fields(self, tenant_id: str, fields: Mapping[str, str]) -> dict[str, str]:
        """Flattened request fields (path -> value) as path -> keyed hash."""
        key, blake2b = self._key(tenant_id), hashlib.blake2b
        return {
            path: DIGEST_PREFIX + blake2b(value.encode(), key=key, digest_size=16).hexdigest()
            for path, value in fields.items()
        }


class NameSet:
    """The names a request carries, looked for in its other strings: the full
    names and their parts, as whole words, in any case, however spaced. A
    text holding none of the parts costs a substring test per part; the
    pattern is built only when one is there."""

    def __init__(self, names: Iterable[str]) -> None:
        self._full: list[list[str]] = []
        parts: set[str] = set()
        for name in names:
            found = _NAME_PART.findall(runtime_pii.normalize_text(name))
            if found:
                self._full.append(found)
                # A full name is there only when its first part is.
                parts.add(found[0].casefold())
                parts.update(p.casefold() for p in found if len(p) >= MIN_NAME_PART_CHARS)
        self._parts = sorted(parts)
        self._pattern: re.Pattern[str] | None = None

    def __bool__(self) -> bool:
        return bool(self._full)

    def pattern_for(self, text: str) -> re.Pattern[str] | None:
        if not self._full:
            return None
        folded = text.casefold()
        if not any(part in folded for part in self._parts):
            return None
        if self._pattern is None:
            alternatives = {r"\s+".join(re.escape(p) for p in parts) for parts in self._full}
            alternatives.update(
                re.escape(p) for parts in self._full for p in parts if len(p) >= MIN_NAME_PART_CHARS
            )
            ordered = sorted(alternatives, key=len, reverse=True)
            self._pattern = re.compile(rf"(?<!\w)(?:{'|'.join(ordered)})(?!\w)", re.IGNORECASE)
        return self._pattern
