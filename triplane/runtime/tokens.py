"""Policy decision tokens: Ed25519-signed claims that authorize one money movement.

The policy plane signs, the money plane verifies (ARCHITECTURE.md rule 1). A
token is `v1.<base64url(claims JSON)>.<base64url(signature)>`; the signature
covers the exact bytes of the claims, so there is no canonicalisation to get
wrong. The money plane checks the signature, that the outcome is `allow`, that
tenant, account, amount, currency and idempotency key are those of the movement,
and that the token has not expired.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import msgspec
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from triplane.runtime.errors import PermissionDenied

TOKEN_VERSION = "v1"
MAX_TOKEN_LENGTH = 2048


class DecisionClaims(msgspec.Struct, frozen=True, kw_only=True):
    decision_id: str
    tenant_id: str
    account_id: str
    amount_minor: int
    currency: str
    idempotency_key: str
    expires_at_s: int
    outcome: str = "allow"
    policy_version: str = ""
    key_id: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DecisionClaims)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# Keys are raw 32-byte Ed25519 keys (RFC 8032), base64 in files and config, so
# they interoperate with any Ed25519 implementation. libsodium (PyNaCl) is used
# because it verifies about twice as fast as OpenSSL on the machines we measured.


def key_id_of(public_key: VerifyKey) -> str:
    return hashlib.sha256(bytes(public_key)).hexdigest()[:16]


def public_key_from_b64(text: str) -> VerifyKey:
    return VerifyKey(base64.b64decode(text.strip()))


def public_key_to_b64(key: VerifyKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def private_key_from_b64(text: str) -> SigningKey:
    return SigningKey(base64.b64decode(text.strip()))


def private_key_to_b64(key: SigningKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def generate_private_key() -> SigningKey:
    return SigningKey.generate()


class TokenSigner:
    def __init__(self, private_key: SigningKey) -> None:
        self._key = private_key
        self.public_key = private_key.verify_key
        self.key_id = key_id_of(self.public_key)

    def sign(self, claims: DecisionClaims) -> str:
        claims = msgspec.structs.replace(claims, key_id=self.key_id)
        body = _encoder.encode(claims)
        signature = self._key.sign(body).signature
        return f"{TOKEN_VERSION}.{_b64e(body)}.{_b64e(signature)}"


def _deny(reason: str, message: str, field: str) -> PermissionDenied:
    return PermissionDenied(reason, message, field)


class TokenVerifier:
    """Verifies decision tokens against the policy plane's public keys."""

    def __init__(self, public_keys: list[VerifyKey], clock_skew_s: int = 5) -> None:
        if not public_keys:
            raise ValueError("a token verifier needs at least one public key")
        self._keys = {key_id_of(k): k for k in public_keys}
        self._skew_s = clock_skew_s

    def decode(self, token: str, field: str) -> DecisionClaims:
        if not token:
            raise _deny("DECISION_TOKEN_MISSING", "a policy decision token is required", field)
        if len(token) > MAX_TOKEN_LENGTH:
            raise _deny("DECISION_TOKEN_MALFORMED", "decision token is too long", field)
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != TOKEN_VERSION:
            raise _deny("DECISION_TOKEN_MALFORMED", "decision token is not a v1 token", field)
        try:
            body, signature = _b64d(parts[1]), _b64d(parts[2])
            claims = _decoder.decode(body)
        except (ValueError, msgspec.DecodeError) as exc:
            raise _deny(
                "DECISION_TOKEN_MALFORMED", f"decision token unreadable: {exc}", field
            ) from exc
        key = self._keys.get(claims.key_id)
        if key is None:
            raise _deny("DECISION_TOKEN_UNKNOWN_KEY", "decision token signed by unknown key", field)
        try:
            key.verify(body, signature)
        except (BadSignatureError, ValueError) as exc:
            raise _deny(
                "DECISION_TOKEN_BAD_SIGNATURE", "decision token signature invalid", field
            ) from exc
        return claims

    def verify(
        self,
        token: str,
        *,
        field: str,
        tenant_id: str,
        account_id: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str,
        now_us: int,
    ) -> DecisionClaims:
        claims = self.decode(token, field)
        if claims.outcome != "allow":
            raise _deny("DECISION_NOT_ALLOW", f"decision outcome is {claims.outcome!r}", field)
        expected = {
            "tenant_id": tenant_id,
            "account_id": account_id,
            "amount_minor": amount_minor,
            "currency": currency,
            "idempotency_key": idempotency_key,
        }
        for name, value in expected.items():
            if getattr(claims, name) != value:
                raise _deny(
                    "DECISION_TOKEN_MISMATCH",
                    f"decision token is for another {name}",
                    f"{field}.{name}",
                )
        if claims.expires_at_s * 1_000_000 + self._skew_s * 1_000_000 < now_us:
            raise _deny("DECISION_TOKEN_EXPIRED", "decision token has expired", field)
        return claims


DEV_PRIVATE_KEY_FILE = "policy_ed25519.key"
DEV_PUBLIC_KEY_FILE = "policy_ed25519.pub"


def ensure_dev_keypair(state_dir: Path) -> tuple[Path, Path]:
    """Creates the embedded stack's dev key pair under state_dir/keys once."""
    keys_dir = state_dir / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    private_path = keys_dir / DEV_PRIVATE_KEY_FILE
    public_path = keys_dir / DEV_PUBLIC_KEY_FILE
    if not private_path.exists():
        key = generate_private_key()
        tmp = private_path.with_suffix(".tmp")
        tmp.write_text(private_key_to_b64(key) + "\n")
        os.chmod(tmp, 0o600)
        tmp.replace(private_path)
        public_path.write_text(public_key_to_b64(key.verify_key) + "\n")
    return private_path, public_path


def load_public_keys(configured: list[str], state_dir: Path) -> list[VerifyKey]:
    """The configured policy keys, or the dev key of the embedded stack."""
    if configured:
        return [public_key_from_b64(k) for k in configured]
    _, public_path = ensure_dev_keypair(state_dir)
    return [public_key_from_b64(public_path.read_text())]


def load_signer(private_key_path: str, state_dir: Path) -> TokenSigner:
    if private_key_path:
        return TokenSigner(private_key_from_b64(Path(private_key_path).read_text()))
    private_path, _ = ensure_dev_keypair(state_dir)
    return TokenSigner(private_key_from_b64(private_path.read_text()))
