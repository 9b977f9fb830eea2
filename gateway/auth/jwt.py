"""OAuth2 client-credentials JWTs from a platform's own identity provider.

A platform that already runs an identity provider (Auth0, Okta, Keycloak,
Entra ID, ...) gives its services a client-credentials token instead of one
of our API keys. The gateway checks it with joserfc (no hand-written JOSE):
the signature (EdDSA/Ed25519 or ES256 only, against the provider's JWKS),
`iss` and `aud` equal to the configured values, `exp` required and in the
future, `nbf` and `iat` not in the future (both within `leeway_s`). The tenant
and the scopes come from configured claims.

The JWKS (a file or an https:// URL) is read at start, again every
`jwks_refresh_s`, and on a token naming a kid it does not hold (the provider
rotated its keys), at most every `jwks_min_refresh_s` so a stream of
made-up kids cannot make us hammer the provider."""

from __future__ import annotations

import asyncio
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import aiohttp
from joserfc import jws
from joserfc import jwt as jose_jwt
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
    SecurityWarning,
)
from joserfc.jwk import KeySet

from gateway.auth.principal import KIND_JWT, Principal
from gateway.auth.scopes import ALL_SCOPES
from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayJwtConfig
from triplane.runtime.errors import Unauthenticated
from triplane.runtime.ids import is_tenant_id

log = logging.getLogger("gateway.auth.jwt")


TOKEN_MALFORMED = "TOKEN_MALFORMED"
TOKEN_ALGORITHM_REFUSED = "TOKEN_ALGORITHM_REFUSED"
TOKEN_KEY_UNKNOWN = "TOKEN_KEY_UNKNOWN"
TOKEN_SIGNATURE_INVALID = "TOKEN_SIGNATURE_INVALID"
TOKEN_EXPIRED = "TOKEN_EXPIRED"
TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
TOKEN_ISSUER_INVALID = "TOKEN_ISSUER_INVALID"
TOKEN_AUDIENCE_INVALID = "TOKEN_AUDIENCE_INVALID"
TOKEN_CLAIM_MISSING = "TOKEN_CLAIM_MISSING"
TOKEN_CLAIM_INVALID = "TOKEN_CLAIM_INVALID"
TOKEN_TENANT_INVALID = "TOKEN_TENANT_INVALID"
JWKS_UNAVAILABLE = "JWKS_UNAVAILABLE"

_US = 1_000_000


def looks_like_jwt(token: str) -> bool:
    """A compact JWS: three base64url parts, the header a JSON object."""
    return token.count(".") == 2 and token.startswith("eyJ")


class JwksSource:
    """The provider's key set, from a file or an https:// URL."""

    def __init__(self, location: str, timeout_s: float) -> None:
        self.location = location
        self._timeout_s = timeout_s

    async def fetch(self) -> KeySet:
        if self.location.startswith(("https://", "http://")):
            timeout = aiohttp.ClientTimeout(total=self._timeout_s)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.location) as response,
            ):
                response.raise_for_status()
                data: Any = await response.json(content_type=None)
        else:
            text = await asyncio.to_thread(Path(self.location).read_text)
            data = json.loads(text)
        return KeySet.import_key_set(data)


class JwtVerifier:
    def __init__(self, config: GatewayJwtConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._source = JwksSource(config.jwks, config.jwks_timeout_s)
        self._algorithms = list(config.algorithms)
        self._keys: KeySet | None = None
        self._kids: frozenset[str] = frozenset()
        self._fetched_at_us = 0
        self._lock = asyncio.Lock()
        self._registry = jose_jwt.JWTClaimsRegistry(
            now=self._now_s,
            leeway=config.leeway_s,
            iss={"essential": True, "value": config.issuer},
            aud={"essential": True, "value": config.audience},
            exp={"essential": True},
        )

    def _now_s(self) -> int:
        return self._clock.now_us() // _US

    async def start(self) -> None:
        """Reads the JWKS once; a provider that does not answer now is asked
        again at the first token (the gateway still starts: API keys work)."""
        try:
            await self._refresh()
        except Exception as exc:
            log.warning("JWKS %s not readable at start: %s", self._config.jwks, exc)

    async def _refresh(self) -> None:
        keys = await self._source.fetch()
        self._keys = keys
        self._kids = frozenset(str(key.kid) for key in keys.keys if key.kid)
        self._fetched_at_us = self._clock.now_us()

    async def _key_set(self, kid: str) -> KeySet:
        """The key set holding `kid`, read again when stale or when it lacks
        `kid` (within the minimum refresh interval)."""
        now_us = self._clock.now_us()
        age_s = (now_us - self._fetched_at_us) / _US
        stale = self._keys is None or age_s >= self._config.jwks_refresh_s
        unknown = kid not in self._kids and age_s >= self._config.jwks_min_refresh_s
        if stale or unknown:
            async with self._lock:
                if self._fetched_at_us <= now_us - int(self._config.jwks_min_refresh_s * _US):
                    try:
                        await self._refresh()
                    except Exception as exc:
                        log.warning("JWKS %s not readable: %s", self._config.jwks, exc)
        if self._keys is None:
            raise Unauthenticated(JWKS_UNAVAILABLE, "the identity provider's keys are unavailable")
        if kid not in self._kids:
            raise Unauthenticated(TOKEN_KEY_UNKNOWN, "the token's kid is not in the JWKS")
        return self._keys

    async def verify(self, token: str) -> Principal:
        if len(token) > self._config.max_token_bytes:
            raise Unauthenticated(TOKEN_MALFORMED, "the bearer token is too long")
        try:
            header = jws.extract_compact(token.encode()).headers()
        except (JoseError, ValueError) as exc:
            raise Unauthenticated(TOKEN_MALFORMED, "the bearer token is not a JWT") from exc
        if header.get("alg") not in self._algorithms:
            raise Unauthenticated(
                TOKEN_ALGORITHM_REFUSED, f"alg must be one of {', '.join(self._algorithms)}"
            )
        keys = await self._key_set(str(header.get("kid", "")))
        try:
            with warnings.catch_warnings():
                # RFC 9864 names the algorithm "Ed25519"; most identity
                # providers still write "EdDSA", which joserfc accepts with a
                # warning per token. Only a first sight of a token gets here.
                warnings.simplefilter("ignore", SecurityWarning)
                decoded = jose_jwt.decode(token, keys, algorithms=self._algorithms)
        except (JoseError, ValueError) as exc:
            raise Unauthenticated(
                TOKEN_SIGNATURE_INVALID, "the token's signature is not valid"
            ) from exc
        claims = decoded.claims
        self._validate(claims)
        return self._principal(claims)

    def _validate(self, claims: dict[str, Any]) -> None:
        try:
            self._registry.validate(claims)
        except ExpiredTokenError as exc:
            raise Unauthenticated(TOKEN_EXPIRED, "the token has expired") from exc
        except MissingClaimError as exc:
            raise Unauthenticated(
                TOKEN_CLAIM_MISSING, f"the token lacks {exc.claim}", metadata={"claim": exc.claim}
            ) from exc
        except InvalidClaimError as exc:
            reason = {
                "iss": TOKEN_ISSUER_INVALID,
                "aud": TOKEN_AUDIENCE_INVALID,
                "nbf": TOKEN_NOT_YET_VALID,
                "iat": TOKEN_NOT_YET_VALID,
            }.get(exc.claim, TOKEN_CLAIM_INVALID)
            raise Unauthenticated(
                reason, f"the token's {exc.claim} is not accepted", metadata={"claim": exc.claim}
            ) from exc

    def _principal(self, claims: dict[str, Any]) -> Principal:
        config = self._config
        tenant_id = claims.get(config.tenant_claim)
        if not isinstance(tenant_id, str) or not is_tenant_id(tenant_id):
            raise Unauthenticated(
                TOKEN_TENANT_INVALID,
                f"the token's {config.tenant_claim} claim is not a tenant id",
                metadata={"claim": config.tenant_claim},
            )
        raw = claims.get(config.scope_claim, "")
        named = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        # An identity provider grants scopes of other APIs too: ours are kept.
        scopes = frozenset(s for s in named if isinstance(s, str) and s in ALL_SCOPES)
        subject = claims.get("client_id") or claims.get("azp") or claims.get("sub") or ""
        return Principal(
            kind=KIND_JWT,
            credential_id=f"jwt:{claims['iss']}|{subject}",
            tenant_id=tenant_id,
            scopes=scopes,
            # As the registry reads exp: good until exp + leeway.
            valid_until_us=int((claims["exp"] + config.leeway_s) * _US),
        )
