"""OAuth2 client-credentials JWTs: tokens minted here with local keys, checked
against a JWKS file and a JWKS served over HTTP, by the gateway's verifier
(joserfc) with an injected clock."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from joserfc import jwk
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning

from gateway.auth.jwt import JwtVerifier
from gateway.auth.scopes import EVENTS_WRITE, PAYMENTS_WRITE
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import ConfigError, GatewayJwtConfig, load_config
from triplane.runtime.errors import Unauthenticated

ISSUER = "https://idp.example.com/"
AUDIENCE = "https://api.triplane.example/"
NOW_S = 1_790_000_000


def _config(jwks: str, **changes: Any) -> GatewayJwtConfig:
    jwt = {"jwks": jwks, "issuer": ISSUER, "audience": AUDIENCE, **changes}
    return load_config(environ={}, overrides={"gateway": {"auth": {"jwt": jwt}}}).gateway.auth.jwt


class Provider:
    """An identity provider's keys: Ed25519 and P-256, published as a JWKS."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {
            "ed-1": jwk.OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}),
            "ec-1": jwk.ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.as_dict(private=False) for key in self.keys.values()]}

    def add(self, kid: str) -> None:
        self.keys[kid] = jwk.OKPKey.generate_key("Ed25519", parameters={"kid": kid})

    def token(self, kid: str = "ed-1", alg: str = "EdDSA", **claims: Any) -> str:
        body = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "client-42",
            "client_id": "client-42",
            "tenant_id": "acme",
            "scope": f"{PAYMENTS_WRITE} {EVENTS_WRITE} openid other:api",
            "iat": NOW_S - 10,
            "exp": NOW_S + 300,
            **claims,
        }
        body = {k: v for k, v in body.items() if v is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SecurityWarning)  # "EdDSA" is the older name
            return jose_jwt.encode({"alg": alg, "kid": kid}, body, self.keys[kid], algorithms=[alg])


@pytest.fixture
def provider() -> Provider:
    return Provider()


@pytest.fixture
def jwks_file(provider: Provider, tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(provider.jwks()))
    return path


async def _verifier(config: GatewayJwtConfig, clock: ManualClock) -> JwtVerifier:
    verifier = JwtVerifier(config, clock)
    await verifier.start()
    return verifier


async def _refused(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as refused:
        await verifier.verify(token)
    return refused.value.reason


async def test_a_good_token_gives_its_tenant_and_our_scopes(
    provider: Provider, jwks_file: Path
) -> None:
    verifier = await _verifier(_config(str(jwks_file)), ManualClock(NOW_S * 1_000_000))
    for kid, alg in (("ed-1", "EdDSA"), ("ed-1", "Ed25519"), ("ec-1", "ES256")):
        principal = await verifier.verify(provider.token(kid, alg))
        assert principal.tenant_id == "acme"
        assert principal.scopes == {PAYMENTS_WRITE, EVENTS_WRITE}  # openid, other:api dropped
        assert principal.credential_id == f"jwt:{ISSUER}|client-42"
        assert principal.valid_until_us == (NOW_S + 300 + 30) * 1_000_000
    listed = await verifier.verify(provider.token(scope=[PAYMENTS_WRITE]))
    assert listed.scopes == {PAYMENTS_WRITE}


async def test_bad_tokens_are_refused_with_their_reason(
    provider: Provider, jwks_file: Path
) -> None:
    clock = ManualClock(NOW_S * 1_000_000)
    verifier = await _verifier(_config(str(jwks_file)), clock)
    stranger = Provider()
    cases = {
        "TOKEN_EXPIRED": provider.token(exp=NOW_S - 31),
        "TOKEN_AUDIENCE_INVALID": provider.token(aud="https://someone-else.example/"),
        "TOKEN_ISSUER_INVALID": provider.token(iss="https://evil.example/"),
        "TOKEN_NOT_YET_VALID": provider.token(nbf=NOW_S + 120),
        "TOKEN_CLAIM_MISSING": provider.token(exp=None),
        "TOKEN_TENANT_INVALID": provider.token(tenant_id="Not.A.Tenant"),
        # Signed by another provider's key under a kid ours has.
        "TOKEN_SIGNATURE_INVALID": stranger.token(),
        "TOKEN_MALFORMED": "eyJhbGciOi.not.ajwt",
    }
    for reason, token in cases.items():
        assert await _refused(verifier, token) == reason, reason
    stranger.add("ed-9")
    assert await _refused(verifier, stranger.token("ed-9")) == "TOKEN_KEY_UNKNOWN"
    # A symmetric algorithm is refused before any key is looked at.
    hs = jose_jwt.encode(
        {"alg": "HS256", "kid": "ed-1"}, {"iss": ISSUER}, jwk.OctKey.generate_key(256)
    )
    assert await _refused(verifier, hs) == "TOKEN_ALGORITHM_REFUSED"
    # Within the leeway an expired token still passes; past it, not.
    clock.advance(300 + 29)
    assert (await verifier.verify(provider.token())).tenant_id == "acme"


async def test_a_rotated_provider_key_is_fetched_on_its_first_token(
    provider: Provider, jwks_file: Path
) -> None:
    clock = ManualClock(NOW_S * 1_000_000)
    verifier = await _verifier(_config(str(jwks_file), jwks_min_refresh_s=30), clock)
    provider.add("ed-2")
    await asyncio.to_thread(jwks_file.write_text, json.dumps(provider.jwks()))
    # Read at start less than jwks_min_refresh_s ago: not read again yet.
    assert await _refused(verifier, provider.token("ed-2")) == "TOKEN_KEY_UNKNOWN"
    clock.advance(30)
    assert (await verifier.verify(provider.token("ed-2"))).tenant_id == "acme"


@pytest.fixture
async def jwks_server(provider: Provider) -> AsyncIterator[tuple[str, list[int]]]:
    hits: list[int] = []

    async def serve(request: web.Request) -> web.Response:
        hits.append(1)
        return web.json_response(provider.jwks())

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/.well-known/jwks.json", hits
    await runner.cleanup()


async def test_a_jwks_url_is_read_at_start_cached_and_refreshed(
    provider: Provider, jwks_server: tuple[str, list[int]]
) -> None:
    url, hits = jwks_server
    clock = ManualClock(NOW_S * 1_000_000)
    verifier = await _verifier(_config(url, jwks_refresh_s=300), clock)
    for _ in range(3):
        assert (await verifier.verify(provider.token())).tenant_id == "acme"
    assert len(hits) == 1
    clock.advance(300)
    await verifier.verify(provider.token(iat=NOW_S + 290, exp=NOW_S + 900))
    assert len(hits) == 2


def test_a_jwks_needs_an_issuer_and_an_audience(jwks_file: Path) -> None:
    with pytest.raises(ConfigError, match="issuer and audience"):
        _config(str(jwks_file), issuer="")
    with pytest.raises(ConfigError, match="asymmetric"):
        _config(str(jwks_file), algorithms=["HS256"])
