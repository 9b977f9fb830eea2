"""From `authorization: Bearer <credential>` to a verified `Principal`.

Cheap on the hot path: a credential verified once is remembered (bounded LRU,
`gateway.auth.cache_max_entries`) for `gateway.auth.cache_ttl_s`, so a
request pays one dictionary lookup and one clock read. A key seen for the
first time costs its checksum, one HMAC-SHA256 and one read of its row (on
the event loop when the store is a local SQLite file: microseconds; in a
worker thread on PostgreSQL). After the TTL only the row is read again (the
key was already proven), which is how a revocation made on another replica
reaches this one: a revoked key stops everywhere within cache_ttl_s, and at
once on the replica that revoked it. Expiry and the end of a rotation's
overlap are checked on every request, cached or not."""

from __future__ import annotations

import asyncio
import hmac
from collections import OrderedDict
from dataclasses import dataclass

from gateway.auth import apikey
from gateway.auth.jwt import JwtVerifier, looks_like_jwt
from gateway.auth.principal import KIND_ADMIN, KIND_API_KEY, Principal
from gateway.auth.scopes import KEYS_ADMIN
from gateway.auth.store import ApiKeyRecord, ApiKeyStore
from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayAuthConfig
from triplane.runtime.errors import Unauthenticated

CREDENTIAL_MISSING = "CREDENTIAL_MISSING"
CREDENTIAL_INVALID = "CREDENTIAL_INVALID"
CREDENTIAL_ENVIRONMENT_MISMATCH = "CREDENTIAL_ENVIRONMENT_MISMATCH"
JWT_NOT_ACCEPTED = "JWT_NOT_ACCEPTED"
_US = 1_000_000

_MESSAGES = {
    "CREDENTIAL_REVOKED": "the API key was revoked",
    "CREDENTIAL_EXPIRED": "the API key has expired",
    "CREDENTIAL_ROTATED": "the API key was rotated and its overlap has ended: use the new key",
    "TOKEN_EXPIRED": "the token has expired",
}


def missing() -> Unauthenticated:
    return Unauthenticated(
        CREDENTIAL_MISSING,
        "no credential: send `authorization: Bearer <API key or token>`",
    )


def bearer(authorization: str) -> str:
    """The credential of an `authorization` header value ("Bearer <token>")."""
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated(
            apikey.CREDENTIAL_MALFORMED, "authorization must be `Bearer <API key or token>`"
        )
    return token


@dataclass(slots=True)
class _Verified:
    principal: Principal
    checked_at_us: int
    # Why the credential stops at principal.valid_until_us.
    ends_with: str
    # API keys: the row to read again after the TTL; JWTs: "".
    key_id: str


class Authenticator:
    def __init__(
        self,
        config: GatewayAuthConfig,
        store: ApiKeyStore,
        pepper: bytes,
        clock: Clock,
        admin_key: str | None = None,
        jwt: JwtVerifier | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._pepper = pepper
        self._clock = clock
        self._jwt = jwt
        self._admin_hash = apikey.keyed_hash(pepper, admin_key) if admin_key else ""
        self._ttl_us = int(config.cache_ttl_s * _US)
        self._cache: OrderedDict[str, _Verified] = OrderedDict()
        self._reads_are_local = store.db.reads_are_local

    def __len__(self) -> int:
        return len(self._cache)

    async def authenticate(self, authorization: str) -> Principal:
        token = bearer(authorization)
        now_us = self._clock.now_us()
        entry = self._cache.get(token)
        if entry is not None and now_us - entry.checked_at_us < self._ttl_us:
            self._cache.move_to_end(token)
        else:
            entry = await (self._recheck(entry, now_us) if entry else self._verify(token, now_us))
            self._remember(token, entry)
        until_us = entry.principal.valid_until_us
        if until_us and now_us >= until_us:
            raise Unauthenticated(entry.ends_with, _MESSAGES.get(entry.ends_with, "expired"))
        return entry.principal

    def forget(self, key_id: str) -> None:
        """Drops a revoked or rotated key from this replica's cache now."""
        for token in [t for t, e in self._cache.items() if e.key_id == key_id]:
            del self._cache[token]

    def _remember(self, token: str, entry: _Verified) -> None:
        self._cache[token] = entry
        self._cache.move_to_end(token)
        while len(self._cache) > self._config.cache_max_entries:
            self._cache.popitem(last=False)

    async def _verify(self, token: str, now_us: int) -> _Verified:
        if apikey.looks_like_key(token):
            return await self._verify_key(token, now_us)
        if looks_like_jwt(token):
            if self._jwt is None:
                raise Unauthenticated(
                    JWT_NOT_ACCEPTED, "this gateway takes API keys only (no gateway.auth.jwt.jwks)"
                )
            principal = await self._jwt.verify(token)
            return _Verified(principal, now_us, "TOKEN_EXPIRED", "")
        raise Unauthenticated(
            apikey.CREDENTIAL_MALFORMED, "the credential is neither an API key nor a JWT"
        )

    async def _read(self, key_id: str) -> ApiKeyRecord | None:
        if self._reads_are_local:
            return self._store.get(key_id)
        return await asyncio.to_thread(self._store.get, key_id)

    async def _verify_key(self, token: str, now_us: int) -> _Verified:
        parsed = apikey.parse(token)
        if parsed.environment != self._config.environment:
            raise Unauthenticated(
                CREDENTIAL_ENVIRONMENT_MISMATCH,
                f"a {parsed.environment} key on a {self._config.environment} gateway",
            )
        digest = apikey.keyed_hash(self._pepper, token)
        if self._admin_hash and hmac.compare_digest(digest, self._admin_hash):
            admin = Principal(KIND_ADMIN, "admin:bootstrap-key", "", frozenset({KEYS_ADMIN}))
            return _Verified(admin, now_us, "", "")
        record = await self._read(parsed.key_id)
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise Unauthenticated(CREDENTIAL_INVALID, "the API key is not known")
        return self._verified_key(record, now_us)

    @staticmethod
    def _verified_key(record: ApiKeyRecord, now_us: int) -> _Verified:
        """The key's principal; a revoked key's ends when it was revoked, so
        the refusal is remembered like an answer (no row read per retry)."""
        until_us, ends_with = record.valid_until_us, "CREDENTIAL_EXPIRED"
        if record.retires_at_us and until_us == record.retires_at_us:
            ends_with = "CREDENTIAL_ROTATED"
        if record.revoked_at_us:
            until_us, ends_with = record.revoked_at_us, "CREDENTIAL_REVOKED"
        principal = Principal(
            KIND_API_KEY, record.key_id, record.tenant_id, frozenset(record.scopes), until_us
        )
        return _Verified(principal, now_us, ends_with, record.key_id)

    async def _recheck(self, entry: _Verified, now_us: int) -> _Verified:
        """A remembered credential past its TTL: a key's row is read again
        (revoked? rotated?); a JWT was checked in full and only expires."""
        if not entry.key_id:
            entry.checked_at_us = now_us
            return entry
        record = await self._read(entry.key_id)
        if record is None:
            raise Unauthenticated(CREDENTIAL_INVALID, "the API key is not known")
        return self._verified_key(record, now_us)
