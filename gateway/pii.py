"""PII tokenization (ARCHITECTURE.md rule 4).

Names, card numbers (PANs, Luhn-checked), e-mail addresses and phone numbers
become deterministic keyed tokens before anything reaches the AI plane, NATS or
a log line: HMAC-SHA256 under a per-tenant key derived from one secret. The
same value always gives the same token within a tenant (so features, joins and
identity resolution still work) and different tokens across tenants (so no
cross-tenant linkage is possible). No vault is kept: nothing downstream ever
needs the clear value back (the policy plane receives names for sanctions
screening directly, inside the trust boundary).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path

from triplane.runtime import pii as runtime_pii

PII_KEY_FILE = "gateway-pii.key"
MIN_KEY_BYTES = 32
TOKEN_HEX_CHARS = 32

_SPACES = re.compile(r"\s+")
# Recognising PII is shared with the AI plane: triplane/runtime/pii.py.
luhn_valid = runtime_pii.luhn_valid
looks_like_pan = runtime_pii.looks_like_pan
pii_kind = runtime_pii.classify
_digits = runtime_pii.digits_of


def normalize(kind: str, value: str) -> str:
    """The canonical form hashed, so trivially different spellings share a token."""
    text = value.strip()
    if kind in ("pan", "phone"):
        return _digits(text)
    if kind == "email":
        return text.lower()
    return _SPACES.sub(" ", text).casefold()


def load_secret(configured_b64: str, state_dir: Path) -> bytes:
    """The configured secret, or the dev key under state_dir/keys (created once)."""
    if configured_b64:
        secret = base64.b64decode(configured_b64)
    else:
        path = state_dir / "keys" / PII_KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(base64.b64encode(os.urandom(MIN_KEY_BYTES)).decode())
        secret = base64.b64decode(path.read_text().strip())
    if len(secret) < MIN_KEY_BYTES:
        raise ValueError(f"gateway.pii.tokenization_key_b64 must be >= {MIN_KEY_BYTES} bytes")
    return secret


# Per-tenant tokenization keys kept derived (each is one HMAC to derive again).
MAX_TENANT_KEYS = 10_000


class Tokenizer:
    """Deterministic keyed tokens, one key per tenant."""

    def __init__(self, secret: bytes, prefix: str) -> None:
        assert len(secret) >= MIN_KEY_BYTES, "tokenization secret too short"
        self._secret = secret
        self._prefix = prefix
        self._tenant_keys: dict[str, bytes] = {}

    def _key(self, tenant_id: str) -> bytes:
        key = self._tenant_keys.get(tenant_id)
        if key is None:
            key = hmac.new(self._secret, b"tenant:" + tenant_id.encode(), hashlib.sha256).digest()
            # Bounded: tenants come from credentials, so this never fills in
            # use; made-up tenant ids (auth off) cost a re-derivation, not memory.
            if len(self._tenant_keys) >= MAX_TENANT_KEYS:
                self._tenant_keys.clear()
            self._tenant_keys[tenant_id] = key
        return key

    def token(self, tenant_id: str, kind: str, value: str) -> str:
        """`<prefix><kind>_<hex>`; an empty value stays empty."""
        if not value:
            return ""
        message = f"{kind}\x1f{normalize(kind, value)}".encode()
        digest = hmac.new(self._key(tenant_id), message, hashlib.sha256).hexdigest()
        return f"{self._prefix}{kind}_{digest[:TOKEN_HEX_CHARS]}"

    def scrub(self, tenant_id: str, attributes: Mapping[str, str]) -> dict[str, str]:
        """Attributes with every PII-looking value replaced by its token."""
        out: dict[str, str] = {}
        for name, value in attributes.items():
            kind = pii_kind(value)
            out[name] = self.token(tenant_id, kind, value) if kind else value
        return out

    def is_token(self, value: str) -> bool:
        return value.startswith(self._prefix)
