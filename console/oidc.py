"""Sign-in through an identity provider: OpenID Connect, authorization code
flow with PKCE (S256), when `console.oidc.issuer` is set.

- `/oidc/login?next=...` reads the provider's discovery document (once), and
  redirects to its authorization endpoint with a fresh `state`, `nonce` and
  PKCE challenge (authlib's OAuth 2 client makes the URL). The state, nonce,
  verifier and target travel in a short-lived cookie (HttpOnly, SameSite=Lax,
  HMAC-signed with the console's session key), so any replica can finish.
- `/oidc/callback` checks the state and the cookie's age (the console's
  Clock), exchanges the code with the verifier and the client secret
  (authlib), and verifies the ID token with joserfc against the provider's
  JWKS: signature, `iss`, `aud` (the client id), `exp`/`iat` at the
  console's clock, `nonce`. The user's roles are the values of
  `console.oidc.role_claim` mapped through `role_map`; a user with none is
  refused (audited), as is every failure above.

The client secret is read from `client_secret_file` at start, never config.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import warnings
from typing import TYPE_CHECKING, Any

import httpx
from authlib.deprecate import AuthlibDeprecationWarning
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

with warnings.catch_warnings():
    # authlib 1.9 warns, on import, that its httpx client will move to
    # httpx2; it works on httpx (which Starlette's test client needs too),
    # and the warning reached every console log and the demo's output.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

from console.auth import check_roles
from triplane.runtime.config import ConsoleOidcConfig
from triplane.runtime.secret_files import read_secret

if TYPE_CHECKING:
    from console.app import Console

log = logging.getLogger("triplane.console.oidc")

STATE_COOKIE = "console_oidc"
STATE_MAX_AGE_S = 600
HTTP_TIMEOUT_S = 10.0
# ID token signatures the console accepts (never "none", never HMAC).
ID_TOKEN_ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA", "Ed25519"]


class OidcError(Exception):
    """Sign-in through the provider failed; `reason` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Oidc:
    def __init__(self, config: ConsoleOidcConfig, public_url: str) -> None:
        self.config = config
        self.public_url = public_url.rstrip("/")
        self.redirect_uri = f"{self.public_url}/oidc/callback"
        self.client_secret = read_secret(config.client_secret_file)
        # Checked at start: a role_map naming a role the console lacks is a typo.
        self.role_map = {group: check_roles(roles) for group, roles in config.role_map.items()}
        self._metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT_S)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/oidc/login", self.login, methods=["GET"]),
            Route("/oidc/callback", self.callback, methods=["GET"]),
        ]

    async def close(self) -> None:
        await self._http.aclose()

    # ---- the provider ----

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            answer = await self._http.get(url)
            answer.raise_for_status()
            metadata: dict[str, Any] = answer.json()
            if metadata.get("issuer") != self.config.issuer:
                raise OidcError("OIDC_ISSUER_MISMATCH", "the provider names another issuer")
            self._metadata = metadata
        return self._metadata

    async def keys(self, refresh: bool = False) -> KeySet:
        if self._keys is None or refresh:
            answer = await self._http.get((await self.metadata())["jwks_uri"])
            answer.raise_for_status()
            self._keys = KeySet.import_key_set(answer.json())
        return self._keys

    def _client(self) -> AsyncOAuth2Client:
        return AsyncOAuth2Client(
            client_id=self.config.client_id,
            client_secret=self.client_secret,
            scope=self.config.scopes,
            redirect_uri=self.redirect_uri,
            code_challenge_method="S256",
            timeout=HTTP_TIMEOUT_S,
        )

    # ---- the state cookie ----

    @staticmethod
    def _sign(key: bytes, payload: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(payload, sort_keys=True).encode()).decode()
        mac = hmac.new(key, b"oidc:" + body.encode(), hashlib.sha256).hexdigest()
        return f"{body}.{mac}"

    @staticmethod
    def _unsign(key: bytes, value: str) -> dict[str, Any]:
        body, _, mac = value.rpartition(".")
        expected = hmac.new(key, b"oidc:" + body.encode(), hashlib.sha256).hexdigest()
        if not body or not hmac.compare_digest(mac, expected):
            raise OidcError("OIDC_STATE_INVALID", "the sign-in state is missing or altered")
        payload: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body))
        return payload

    # ---- routes ----

    async def login(self, request: Request) -> Response:
        from console.app import console_of, error_page, safe_next

        console = console_of(request)
        try:
            metadata = await self.metadata()
        except (httpx.HTTPError, OidcError, ValueError) as error:
            log.warning("oidc: provider unavailable: %s", error)
            return error_page(
                request, None, 503, "OIDC_PROVIDER_UNAVAILABLE", "The identity provider is down."
            )
        state = secrets.token_urlsafe(32)
        nonce = secrets.token_urlsafe(32)
        verifier = secrets.token_urlsafe(64)
        async with self._client() as client:
            url, _ = client.create_authorization_url(
                metadata["authorization_endpoint"],
                state=state,
                nonce=nonce,
                code_verifier=verifier,
            )
        cookie = self._sign(
            console.session_key,
            {
                "state": state,
                "nonce": nonce,
                "verifier": verifier,
                "next": safe_next(request.query_params.get("next", "/")),
                "at_us": console.clock.now_us(),
            },
        )
        response = RedirectResponse(url, 302)
        response.set_cookie(
            STATE_COOKIE,
            cookie,
            max_age=STATE_MAX_AGE_S,
            httponly=True,
            samesite="lax",
            secure=console.secure_cookies,
            path="/oidc/",
        )
        return response

    async def callback(self, request: Request) -> Response:
        from console import audit
        from console.app import console_of, error_page, start_session

        console = console_of(request)
        try:
            username, roles, target = await self._finish(console, request)
        except OidcError as error:
            await audit.record(
                request, None, "login", "oidc", "denied", actor="", after={"reason": error.reason}
            )
            response = error_page(request, None, 403, error.reason, str(error))
            response.delete_cookie(STATE_COOKIE, path="/oidc/")
            return response
        response = await start_session(request, username, roles, target)
        response.delete_cookie(STATE_COOKIE, path="/oidc/")
        return response

    async def _finish(self, console: Console, request: Request) -> tuple[str, tuple[str, ...], str]:
        params = request.query_params
        if params.get("error"):
            raise OidcError("OIDC_PROVIDER_REFUSED", f"the provider said: {params['error']}")
        saved = self._unsign(console.session_key, request.cookies.get(STATE_COOKIE, ""))
        if not hmac.compare_digest(str(saved.get("state", "")), params.get("state", "")):
            raise OidcError("OIDC_STATE_INVALID", "the sign-in state does not match")
        if console.clock.now_us() - int(saved["at_us"]) > STATE_MAX_AGE_S * 1_000_000:
            raise OidcError("OIDC_STATE_EXPIRED", "the sign-in took too long; start again")
        code = params.get("code", "")
        if not code:
            raise OidcError("OIDC_CODE_MISSING", "the provider sent no code")
        try:
            metadata = await self.metadata()
            async with self._client() as client:
                token = await client.fetch_token(
                    metadata["token_endpoint"],
                    code=code,
                    code_verifier=saved["verifier"],
                    grant_type="authorization_code",
                )
        except Exception as error:  # httpx's, or authlib's carrying the provider's reason
            message = f"code exchange failed: {error}"
            raise OidcError("OIDC_TOKEN_EXCHANGE_FAILED", message) from None
        claims = await self._verified_claims(console, str(token.get("id_token", "")), saved)
        username = str(claims.get(self.config.username_claim) or claims.get("sub") or "")
        if not username:
            raise OidcError("OIDC_NO_USERNAME", "the ID token names nobody")
        groups = claims.get(self.config.role_claim, [])
        if isinstance(groups, str):
            groups = [groups]
        roles: list[str] = []
        for group in groups if isinstance(groups, list) else []:
            roles.extend(self.role_map.get(str(group), ()))
        if not roles:
            raise OidcError("OIDC_NO_ROLE", f"{username} holds no console role")
        return username, tuple(dict.fromkeys(roles)), str(saved.get("next", "/"))

    async def _verified_claims(
        self, console: Console, id_token: str, saved: dict[str, Any]
    ) -> dict[str, Any]:
        if not id_token:
            raise OidcError("OIDC_ID_TOKEN_MISSING", "the provider sent no ID token")
        try:
            try:
                decoded = jwt.decode(id_token, await self.keys(), algorithms=ID_TOKEN_ALGORITHMS)
            except JoseError:
                # A key rotated at the provider: read its keys once more.
                decoded = jwt.decode(
                    id_token, await self.keys(refresh=True), algorithms=ID_TOKEN_ALGORITHMS
                )
            registry = jwt.JWTClaimsRegistry(
                now=lambda: console.clock.now_us() // 1_000_000,
                leeway=60,
                iss={"essential": True, "value": self.config.issuer},
                aud={"essential": True, "value": self.config.client_id},
                exp={"essential": True},
                nonce={"essential": True, "value": saved["nonce"]},
                sub={"essential": True},
            )
            registry.validate(decoded.claims)
        except (JoseError, ValueError, httpx.HTTPError) as error:
            message = f"the ID token is not valid: {error}"
            raise OidcError("OIDC_ID_TOKEN_INVALID", message) from None
        claims: dict[str, Any] = dict(decoded.claims)
        return claims
