"""Assembles partner authentication from config: the key store (in the
gateway's database), the pepper and bootstrap admin key (files), the JWT
verifier (when a JWKS is configured), the rate limiter (in process, or in
Redis) and the interceptor and ApiKeyService that use them."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from gateway.auth import secrets
from gateway.auth.admin import ApiKeyAdmin
from gateway.auth.authenticator import Authenticator
from gateway.auth.interceptor import CredentialInterceptor
from gateway.auth.jwt import JwtVerifier
from gateway.auth.ratelimit import RateLimiter, connect_redis
from gateway.auth.scopes import ALL_SCOPES
from gateway.auth.service import ApiKeyServicer, api_key_services
from gateway.auth.store import ApiKeyStore
from gateway.storage import open_engagement_db
from triplane.runtime.authz import ADMIN_ROLE, CONSOLE_ROLE, peer_identity
from triplane.runtime.clock import Clock
from triplane.runtime.config import Config, ConfigError
from triplane.runtime.db import Database
from triplane.runtime.server import Service

log = logging.getLogger("gateway.auth")


@dataclass
class Auth:
    db: Database
    store: ApiKeyStore
    authenticator: Authenticator
    admin: ApiKeyAdmin
    limiter: RateLimiter | None
    interceptor: CredentialInterceptor
    services: list[Service] = field(default_factory=list)

    async def close(self) -> None:
        if self.limiter is not None:
            with contextlib.suppress(Exception):
                await self.limiter.close()
        self.db.close()


async def open_auth(config: Config, clock: Clock) -> Auth | None:
    """Partner authentication as configured; None (with a WARNING) when
    gateway.auth is off."""
    gateway = config.gateway
    auth = gateway.auth
    if not auth.enabled:
        log.warning(
            "gateway.auth is off: no credential is asked and every request's tenant_id is "
            "believed, so anyone who reaches this port can act for any tenant. For local "
            "debugging and benchmarks only"
        )
        return None
    unknown = set(gateway.rate_limit.per_scope) - ALL_SCOPES
    if unknown:
        raise ConfigError(f"gateway.rate_limit.per_scope names unknown scopes {sorted(unknown)}")
    pepper = secrets.load_pepper(auth, config.state_path)
    admin_key = secrets.load_admin_key(auth, config.state_path)
    jwt = None
    if auth.jwt.jwks:
        jwt = JwtVerifier(auth.jwt, clock)
        await jwt.start()
    db = open_engagement_db(gateway.store, config.state_path)
    store = ApiKeyStore(db)
    authenticator = Authenticator(auth, store, pepper, clock, admin_key, jwt)
    admin = ApiKeyAdmin(
        store, pepper, auth, clock, gateway.limits.max_string_length, authenticator.forget
    )
    limiter = None
    if gateway.rate_limit.enabled:
        redis = connect_redis(gateway.rate_limit) if gateway.rate_limit.redis_url else None
        limiter = RateLimiter(gateway.rate_limit, clock, redis)
    interceptor = CredentialInterceptor(
        authenticator,
        limiter,
        config.runtime.tls.roles.get(ADMIN_ROLE, []),
        peer_identity,
        console_identities=config.runtime.tls.roles.get(CONSOLE_ROLE, []),
    )
    return Auth(
        db,
        store,
        authenticator,
        admin,
        limiter,
        interceptor,
        api_key_services(ApiKeyServicer(admin)),
    )
