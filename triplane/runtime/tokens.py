"""Policy decision tokens: signed claims that allow exactly one money movement.

The policy plane signs, the money plane verifies (ARCHITECTURE.md rule 1). A
token is a JWS in compact serialization (RFC 7515) with the fully specified
algorithm `Ed25519` (RFC 9864: EdDSA over Ed25519), header `typ`
"triplane-decision+jwt" (explicit typing, RFC 8725 section 3.11, so no other
JWT, an OAuth2 access token say, can pass for one) and `kid`, the signing key's
id. The payload is a JWT claims set: the registered `iss`, `aud` (the money
plane), `jti` (unique: the money plane accepts a token id for one transfer
only), `iat` (the policy plane's own clock, never the caller's) and `exp`;
then the movement (tenant, kind, debit and credit accounts, amount, currency,
a digest of the split legs, the idempotency key, the hold captured or entry
refunded) and the decision (id, outcome, bundle version).

joserfc writes and reads the format. Verification runs libsodium (PyNaCl)
through a joserfc algorithm of our own: measured on the development machine,
joserfc's OpenSSL Ed25519 verified a token in about 126 us and this one in
about 75 us, the hand-rolled v1 format it replaces in about 62 us; the ledger
verifies one token per transfer at thousands of transfers a second.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwa import JWSAlgModel
from joserfc.jwk import OKPKey
from joserfc.jws import JWSRegistry
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from triplane.runtime.errors import PermissionDenied

log = logging.getLogger("triplane.tokens")

ALGORITHM = "Ed25519"
TOKEN_TYPE = "triplane-decision+jwt"
ISSUER = "triplane.policy"
AUDIENCE = "triplane.money"
# A token is a few hundred bytes; anything far longer is not one of ours.
MAX_TOKEN_LENGTH = 2048
_MAX_HEADER_BYTES = 256
_MAX_PAYLOAD_BYTES = 1536


# ---------------------------------------------------------------- keys

# Keys are raw 32-byte Ed25519 keys (RFC 8032), base64 in files and config, so
# they interoperate with any Ed25519 implementation.


def key_id_of(public_key: VerifyKey) -> str:
    return hashlib.sha256(bytes(public_key)).hexdigest()[:16]


def public_key_from_b64(text: str) -> VerifyKey:
    return VerifyKey(base64.b64decode(text.strip(), validate=True))


def public_key_to_b64(key: VerifyKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def private_key_from_b64(text: str) -> SigningKey:
    return SigningKey(base64.b64decode(text.strip(), validate=True))


def private_key_to_b64(key: SigningKey) -> str:
    return base64.b64encode(bytes(key)).decode()


def generate_private_key() -> SigningKey:
    return SigningKey.generate()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ---------------------------------------------------------------- the movement


class SplitTerms(NamedTuple):
    """One split leg as a token binds it (both planes build these from their
    own messages; `kind` is "fixed" or "basis_points")."""

    account_id: str
    kind: str
    amount_minor: int
    basis_points: int
    label: str
    release_at_us: int
    release_account_id: str


_canonical = msgspec.json.Encoder(order="sorted")


def splits_digest(legs: Iterable[SplitTerms]) -> str:
    """A digest of the split legs, "" when there are none. Each leg's parts
    are computed from the amount alone (the residue goes to the remainder), so
    their order changes nothing the ledger does: the digest sorts them."""
    canonical = sorted(tuple(leg) for leg in legs)
    if not canonical:
        return ""
    return _b64url(hashlib.sha256(_canonical.encode(canonical)).digest())


class Movement(msgspec.Struct, frozen=True, kw_only=True):
    """What the money plane will do: every term a token must name."""

    tenant_id: str
    # The ledger operation: authorize, transfer, payout, capture or refund.
    kind: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    splits_digest: str = ""
    idempotency_key: str
    # capture: the hold captured; refund: the entry refunded.
    hold_id: str = ""
    entry_id: str = ""


# The terms compared, in the order a mismatch is reported.
MOVEMENT_TERMS: tuple[str, ...] = Movement.__struct_fields__
MOVEMENT_KINDS = frozenset({"authorize", "transfer", "payout", "capture", "refund"})


class DecisionClaims(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    rename={
        "issuer": "iss",
        "audience": "aud",
        "token_id": "jti",
        "issued_at_s": "iat",
        "expires_at_s": "exp",
    },
):
    """The claims set of a decision token."""

    issuer: str = ISSUER
    audience: str = AUDIENCE
    token_id: str
    issued_at_s: int
    expires_at_s: int
    tenant_id: str
    kind: str
    # The policy's payment kind (purchase, payout, transfer, invoice, refund).
    payment_kind: str = ""
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    splits_digest: str = ""
    idempotency_key: str
    hold_id: str = ""
    entry_id: str = ""
    decision_id: str
    outcome: str = "allow"
    policy_version: str = ""

    def movement(self) -> Movement:
        return Movement(**{name: getattr(self, name) for name in MOVEMENT_TERMS})


_claims_encoder = msgspec.json.Encoder()
_claims_decoder = msgspec.json.Decoder(DecisionClaims)


# ---------------------------------------------------------------- signing


def _okp_private(key: SigningKey, key_id: str) -> OKPKey:
    return OKPKey.import_key(
        {
            "kty": "OKP",
            "crv": "Ed25519",
            "d": _b64url(bytes(key)),
            "x": _b64url(bytes(key.verify_key)),
        },
        parameters={"kid": key_id, "alg": ALGORITHM, "use": "sig"},
    )


def _okp_public(key: VerifyKey, key_id: str) -> OKPKey:
    return OKPKey.import_key(
        {"kty": "OKP", "crv": "Ed25519", "x": _b64url(bytes(key))},
        parameters={"kid": key_id, "alg": ALGORITHM, "use": "sig"},
    )


class TokenSigner:
    """The policy plane's side: signs claims with its token key."""

    def __init__(self, private_key: SigningKey) -> None:
        self.public_key = private_key.verify_key
        self.key_id = key_id_of(self.public_key)
        self._okp = _okp_private(private_key, self.key_id)
        self._header = {"alg": ALGORITHM, "typ": TOKEN_TYPE, "kid": self.key_id}

    def sign(self, claims: DecisionClaims) -> str:
        return jws.serialize_compact(
            dict(self._header), _claims_encoder.encode(claims), self._okp, algorithms=[ALGORITHM]
        )

    def issue(
        self,
        movement: Movement,
        *,
        decision_id: str,
        issued_at_s: int,
        ttl_s: int,
        payment_kind: str = "",
        policy_version: str = "",
    ) -> tuple[str, DecisionClaims]:
        """A token allowing `movement`, valid ttl_s from issued_at_s (the
        issuer's clock), with a fresh token id."""
        claims = DecisionClaims(
            token_id=uuid.uuid4().hex,
            issued_at_s=issued_at_s,
            expires_at_s=issued_at_s + ttl_s,
            payment_kind=payment_kind,
            decision_id=decision_id,
            policy_version=policy_version,
            **msgspec.structs.asdict(movement),
        )
        return self.sign(claims), claims


# ---------------------------------------------------------------- trusted keys


class PublicKeySet:
    """The public keys a verifier trusts, by key id: given inline and read
    from files (one base64 key per line; `#` comments) or directories of such
    files (a mounted Kubernetes Secret: each key one file). Files are read
    again when they change, checked at most every `reload_interval_s`, so a
    key added for a rotation (or removed after it) takes effect without a
    restart. A file that cannot be read at start fails start-up; one that
    breaks later keeps the keys it last held, and says so in the log."""

    def __init__(
        self,
        inline: Sequence[str] = (),
        paths: Sequence[Path] = (),
        reload_interval_s: float = 10.0,
        now_s: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inline = {key_id_of(k): k for k in (public_key_from_b64(t) for t in inline)}
        self._paths = list(paths)
        self._reload_interval_s = reload_interval_s
        self._now_s = now_s
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._from_files: dict[Path, dict[str, VerifyKey]] = {}
        self._keys: dict[str, VerifyKey] = dict(self._inline)
        self._next_check_s = 0.0
        self._reload(strict=True)
        if not self._keys:
            raise ValueError("a public key set needs at least one key")

    @classmethod
    def of(cls, keys: Iterable[VerifyKey]) -> PublicKeySet:
        return cls([public_key_to_b64(k) for k in keys])

    def get(self, key_id: str) -> VerifyKey | None:
        if self._paths and self._now_s() >= self._next_check_s:
            self._reload(strict=False)
        return self._keys.get(key_id)

    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def _files(self) -> list[Path]:
        files: list[Path] = []
        for path in self._paths:
            if path.is_dir():
                files += sorted(
                    p for p in path.iterdir() if not p.name.startswith(".") and p.is_file()
                )
            else:
                files.append(path)
        return files

    def _reload(self, strict: bool) -> None:
        self._next_check_s = self._now_s() + self._reload_interval_s
        try:
            files = self._files()
        except OSError as exc:
            if strict:
                raise
            log.error("public keys: cannot list %s (%s); keeping the keys held", self._paths, exc)
            return
        changed = set(self._from_files) != set(files)
        for path in files:
            try:
                stat = path.stat()
                stamp = (stat.st_mtime_ns, stat.st_size)
                if self._stamps.get(path) == stamp:
                    continue
                keys = [public_key_from_b64(line) for line in _key_lines(path.read_text())]
            except (OSError, ValueError) as exc:
                if strict:
                    raise ValueError(f"public keys in {path}: {exc}") from exc
                log.error("public keys in %s unreadable (%s); keeping the keys held", path, exc)
                continue
            self._stamps[path] = stamp
            self._from_files[path] = {key_id_of(k): k for k in keys}
            changed = True
        for gone in set(self._from_files) - set(files):
            del self._from_files[gone]
            self._stamps.pop(gone, None)
        if changed:
            merged = dict(self._inline)
            for from_file in self._from_files.values():
                merged.update(from_file)
            if merged != self._keys and self._keys:
                log.info("trusted public keys now: %s", ", ".join(sorted(merged)))
            self._keys = merged


def _key_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


# ---------------------------------------------------------------- verifying


class _SodiumEd25519(JWSAlgModel):
    """joserfc's `Ed25519` algorithm (RFC 9864) verified by libsodium, about
    twice as fast as OpenSSL's here; it only verifies (signing stays with
    joserfc's own)."""

    name = ALGORITHM
    description = "EdDSA using the Ed25519 parameter set, verified by libsodium"
    key_type = "OKP"

    def __init__(self, keys: dict[str, VerifyKey]) -> None:
        self._keys = keys

    def sign(self, msg: bytes, key: Any) -> bytes:
        raise NotImplementedError("decision tokens are signed by TokenSigner")

    def verify(self, msg: bytes, sig: bytes, key: Any) -> bool:
        sodium = self._keys.get(str(key.kid))
        if sodium is None:
            return False
        try:
            sodium.verify(msg, sig)
        except (BadSignatureError, ValueError):
            return False
        return True


class _TokenRegistry(JWSRegistry):
    """Only `Ed25519`, only our header parameters, our sizes."""

    max_header_length = _MAX_HEADER_BYTES
    max_payload_length = _MAX_PAYLOAD_BYTES
    max_signature_length = 128

    def __init__(self, keys: dict[str, VerifyKey]) -> None:
        super().__init__(algorithms=[ALGORITHM])
        self.algorithms = {ALGORITHM: _SodiumEd25519(keys)}


def _deny(reason: str, message: str, field: str) -> PermissionDenied:
    return PermissionDenied(reason, message, field)


@dataclass(frozen=True, slots=True)
class _Trusted:
    okp: OKPKey
    sodium: VerifyKey


class TokenVerifier:
    """The money plane's side: reads, verifies and checks decision tokens
    against the policy plane's public keys."""

    def __init__(
        self, public_keys: PublicKeySet | Sequence[VerifyKey], clock_skew_s: int = 5
    ) -> None:
        if not isinstance(public_keys, PublicKeySet):
            if not public_keys:
                raise ValueError("a token verifier needs at least one public key")
            public_keys = PublicKeySet.of(public_keys)
        self.keys = public_keys
        self._skew_s = clock_skew_s
        self._sodium: dict[str, VerifyKey] = {}
        self._okp: dict[str, OKPKey] = {}
        self._registry = _TokenRegistry(self._sodium)

    def _key(self, key_id: str) -> OKPKey | None:
        sodium = self.keys.get(key_id)
        if sodium is None:
            # Removed from the trusted set (a finished rotation): forget it.
            self._sodium.pop(key_id, None)
            self._okp.pop(key_id, None)
            return None
        if self._sodium.get(key_id) != sodium:
            self._sodium[key_id] = sodium
            self._okp[key_id] = _okp_public(sodium, key_id)
        return self._okp[key_id]

    def decode(self, token: str, field: str) -> DecisionClaims:
        """The claims of a well-formed token signed by a trusted key, for the
        money plane, with outcome allow; raises PermissionDenied otherwise."""
        if not token:
            raise _deny("DECISION_TOKEN_MISSING", "a policy decision token is required", field)
        if len(token) > MAX_TOKEN_LENGTH:
            raise _deny("DECISION_TOKEN_MALFORMED", "decision token is too long", field)
        try:
            compact = jws.extract_compact(token.encode(), registry=self._registry)
        except (JoseError, ValueError, TypeError) as exc:
            raise _deny(
                "DECISION_TOKEN_MALFORMED", f"decision token unreadable: {exc}", field
            ) from exc
        header = compact.headers()
        if header.get("alg") != ALGORITHM or header.get("typ") != TOKEN_TYPE:
            raise _deny(
                "DECISION_TOKEN_MALFORMED",
                f"not a decision token (alg {ALGORITHM}, typ {TOKEN_TYPE} expected)",
                field,
            )
        key = self._key(str(header.get("kid", "")))
        if key is None:
            raise _deny(
                "DECISION_TOKEN_UNKNOWN_KEY", "decision token signed by an unknown key", field
            )
        try:
            valid = jws.validate_compact(compact, key, registry=self._registry)
        except (JoseError, ValueError) as exc:
            raise _deny(
                "DECISION_TOKEN_MALFORMED", f"decision token refused: {exc}", field
            ) from exc
        if not valid:
            raise _deny("DECISION_TOKEN_BAD_SIGNATURE", "decision token signature invalid", field)
        try:
            claims = _claims_decoder.decode(compact.payload)
        except msgspec.DecodeError as exc:
            raise _deny("DECISION_TOKEN_MALFORMED", f"decision token claims: {exc}", field) from exc
        if claims.audience != AUDIENCE or claims.issuer != ISSUER:
            raise _deny(
                "DECISION_TOKEN_WRONG_AUDIENCE",
                f"decision token is for {claims.audience!r} from {claims.issuer!r}, "
                f"not {AUDIENCE!r} from {ISSUER!r}",
                f"{field}.aud",
            )
        if claims.outcome != "allow":
            raise _deny("DECISION_NOT_ALLOW", f"decision outcome is {claims.outcome!r}", field)
        return claims

    def check_time(self, claims: DecisionClaims, now_us: int, field: str) -> None:
        """Expired (past exp plus the allowed skew), or issued in the future
        beyond it: refused."""
        skew_us = self._skew_s * 1_000_000
        if claims.expires_at_s * 1_000_000 + skew_us < now_us:
            raise _deny("DECISION_TOKEN_EXPIRED", "decision token has expired", field)
        if claims.issued_at_s * 1_000_000 - skew_us > now_us:
            raise _deny(
                "DECISION_TOKEN_NOT_YET_VALID", "decision token is issued in the future", field
            )

    @staticmethod
    def check_movement(claims: DecisionClaims, movement: Movement, field: str) -> None:
        """Every term of the movement must be the token's: the first that
        differs is named (`<field>.credit_account_id`)."""
        for name in MOVEMENT_TERMS:
            if getattr(claims, name) != getattr(movement, name):
                raise _deny(
                    "DECISION_TOKEN_MISMATCH",
                    f"decision token is for another {name}",
                    f"{field}.{name}",
                )

    def verify(self, token: str, *, field: str, movement: Movement, now_us: int) -> DecisionClaims:
        claims = self.decode(token, field)
        self.check_movement(claims, movement, field)
        self.check_time(claims, now_us, field)
        return claims


# ---------------------------------------------------------------- dev keys

# The embedded stack's keys under state_dir/keys: the token key and, apart
# from it, the decision log's (a leaked token key cannot forge the log).
DEV_PRIVATE_KEY_FILE = "policy_ed25519.key"
DEV_PUBLIC_KEY_FILE = "policy_ed25519.pub"
DEV_LOG_PRIVATE_KEY_FILE = "decision_log_ed25519.key"
DEV_LOG_PUBLIC_KEY_FILE = "decision_log_ed25519.pub"


def _ensure_pair(keys_dir: Path, private_name: str, public_name: str) -> tuple[Path, Path]:
    keys_dir.mkdir(parents=True, exist_ok=True)
    private_path = keys_dir / private_name
    public_path = keys_dir / public_name
    if not private_path.exists():
        tmp = keys_dir / f".{private_name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(private_key_to_b64(generate_private_key()) + "\n")
        os.chmod(tmp, 0o600)
        try:
            # link, not replace: of two processes racing, the first key stays.
            os.link(tmp, private_path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = private_key_from_b64(private_path.read_text())
    public_text = public_key_to_b64(key.verify_key) + "\n"
    if not public_path.exists() or public_path.read_text() != public_text:
        public_path.write_text(public_text)
    return private_path, public_path


def ensure_dev_keypair(state_dir: Path) -> tuple[Path, Path]:
    """The embedded stack's decision-token key pair under state_dir/keys."""
    return _ensure_pair(state_dir / "keys", DEV_PRIVATE_KEY_FILE, DEV_PUBLIC_KEY_FILE)


def ensure_dev_log_keypair(state_dir: Path) -> tuple[Path, Path]:
    """The embedded stack's decision-log key pair under state_dir/keys."""
    return _ensure_pair(state_dir / "keys", DEV_LOG_PRIVATE_KEY_FILE, DEV_LOG_PUBLIC_KEY_FILE)


def load_public_keys(configured: list[str], state_dir: Path) -> list[VerifyKey]:
    """The configured token keys, or the dev key of the embedded stack."""
    if configured:
        return [public_key_from_b64(k) for k in configured]
    _, public_path = ensure_dev_keypair(state_dir)
    return [public_key_from_b64(public_path.read_text())]


def token_key_set(
    inline: Sequence[str], paths: Sequence[str], state_dir: Path, reload_interval_s: float
) -> PublicKeySet:
    """The token keys a money plane trusts: those configured (inline and
    files), or else the embedded stack's dev key (its file, so a dev rotation
    is picked up too)."""
    files = [Path(p) for p in paths]
    if not inline and not files:
        files = [ensure_dev_keypair(state_dir)[1]]
    return PublicKeySet(inline, files, reload_interval_s)


def load_signer(private_key_path: str, state_dir: Path) -> TokenSigner:
    if private_key_path:
        return TokenSigner(private_key_from_b64(Path(private_key_path).read_text()))
    private_path, _ = ensure_dev_keypair(state_dir)
    return TokenSigner(private_key_from_b64(private_path.read_text()))
