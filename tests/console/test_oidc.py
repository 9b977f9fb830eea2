"""Sign-in through an identity provider (OIDC code flow with PKCE), against a
small provider served over HTTP by this test (discovery, JWKS, authorize,
token; it checks the PKCE verifier and the client's secret, and signs ES256
ID tokens). The console under test is the real app (Starlette's TestClient)
making real HTTP calls to it."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
import uvicorn
from joserfc import jwt
from joserfc.jwk import ECKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from console.app import create_app
from console.auth import LOGIN_COOKIE, csrf_token
from console.oidc import STATE_COOKIE
from console.store import ConsoleStore
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port

CLIENT_ID = "triplane-console"
CLIENT_SECRET = "s3cret-of-the-console-client"
START_WITHIN_S = 30.0


@dataclass
class Provider:
    """The identity provider's state: who signs in next, issued codes."""

    url: str
    key: ECKey = field(default_factory=lambda: ECKey.generate_key("P-256", auto_kid=True))
    user: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    wrong_nonce: bool = False
    refused_verifiers: int = 0

    def app(self) -> Starlette:
        async def discovery(request: Request) -> Response:
            return JSONResponse(
                {
                    "issuer": self.url,
                    "authorization_endpoint": f"{self.url}/authorize",
                    "token_endpoint": f"{self.url}/token",
                    "jwks_uri": f"{self.url}/jwks",
                }
            )

        async def jwks(request: Request) -> Response:
            return JSONResponse({"keys": [self.key.as_dict(private=False)]})

        async def authorize(request: Request) -> Response:
            q = request.query_params
            assert q["client_id"] == CLIENT_ID and q["response_type"] == "code"
            assert q["code_challenge_method"] == "S256" and q["code_challenge"]
            code = secrets.token_urlsafe(16)
            self.codes[code] = {
                "challenge": q["code_challenge"],
                "nonce": q["nonce"],
                "redirect_uri": q["redirect_uri"],
            }
            return RedirectResponse(
                f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}", 302
            )

        async def token(request: Request) -> Response:
            form = await request.form()
            basic = base64.b64decode(request.headers["authorization"].split()[1]).decode()
            if basic != f"{CLIENT_ID}:{CLIENT_SECRET}":
                return JSONResponse({"error": "invalid_client"}, 401)
            issued = self.codes.pop(str(form["code"]), None)
            if issued is None or form["redirect_uri"] != issued["redirect_uri"]:
                return JSONResponse({"error": "invalid_grant"}, 400)
            verifier = str(form["code_verifier"]).encode()
            challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier).digest())
            if challenge.decode().rstrip("=") != issued["challenge"]:
                self.refused_verifiers += 1
                return JSONResponse({"error": "invalid_grant"}, 400)
            now = int(time.time())
            claims = {
                "iss": self.url,
                "aud": CLIENT_ID,
                "iat": now,
                "exp": now + 300,
                "nonce": "not-yours" if self.wrong_nonce else issued["nonce"],
                **self.user,
            }
            id_token = jwt.encode({"alg": "ES256", "kid": self.key.kid}, claims, self.key)
            return JSONResponse(
                {"access_token": "at", "token_type": "Bearer", "id_token": id_token}
            )

        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", discovery),
                Route("/jwks", jwks),
                Route("/authorize", authorize),
                Route("/token", token, methods=["POST"]),
            ]
        )


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:
        pass


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    port = free_port()
    idp = Provider(url=f"http://127.0.0.1:{port}")
    server = _Server(uvicorn.Config(idp.app(), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_WITHIN_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)
    yield idp
    server.should_exit = True
    thread.join(START_WITHIN_S)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(time.time_ns() // 1000)


@pytest.fixture
def console(provider: Provider, tmp_path: Path, clock: ManualClock) -> Iterator[TestClient]:
    secret = tmp_path / "oidc-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(tmp_path)},
            "console": {
                "public_url": "http://testserver",
                "oidc": {
                    "issuer": provider.url,
                    "client_id": CLIENT_ID,
                    "client_secret_file": str(secret),
                    "role_map": {"fraud": ["reviewer"], "audit": ["auditor"]},
                },
            },
        },
    )
    provider.wrong_nonce = False
    app = create_app(config, clock=clock, store=ConsoleStore.from_config(config))
    with TestClient(app, base_url="http://testserver", follow_redirects=False) as client:
        yield client


def sign_in_through(provider: Provider, client: TestClient, user: dict[str, Any]) -> Response:
    """The browser's walk: console -> provider -> console callback."""
    provider.user = user
    start = client.get("/oidc/login", params={"next": "/cases"})
    assert start.status_code == 302
    at_provider = httpx.get(start.headers["location"], follow_redirects=False)
    assert at_provider.status_code == 302
    back = urlsplit(at_provider.headers["location"])
    assert back.path == "/oidc/callback"
    answer: Response = client.get(f"{back.path}?{back.query}")
    return answer


def audit_of(client: TestClient) -> list[tuple[str, str, dict[str, Any]]]:
    store: ConsoleStore = client.app.state.console.store  # type: ignore[attr-defined]
    return [(e.actor, e.outcome, e.after) for e in store.audit_entries(20, action="login")]


def test_code_flow_with_pkce_signs_in_with_mapped_roles(
    provider: Provider, console: TestClient
) -> None:
    login = console.get("/login")
    assert 'href="/oidc/login' in login.text and 'name="password"' not in login.text
    answer = sign_in_through(
        provider, console, {"sub": "u-1", "preferred_username": "rita", "groups": ["fraud"]}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/cases"
    page = console.get("/cases")
    assert page.status_code == 200
    assert 'data-testid="username">rita<' in page.text and "(reviewer)" in page.text
    assert audit_of(console)[0] == ("rita", "ok", {"roles": ["reviewer"]})


def test_a_user_without_a_mapped_group_is_refused(provider: Provider, console: TestClient) -> None:
    answer = sign_in_through(
        provider, console, {"sub": "u-2", "preferred_username": "eve", "groups": ["sales"]}
    )
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "OIDC_NO_ROLE"
    assert console.get("/cases").status_code == 303  # not signed in
    assert audit_of(console)[0][1:] == ("denied", {"reason": "OIDC_NO_ROLE"})


def test_an_altered_state_is_refused(provider: Provider, console: TestClient) -> None:
    provider.user = {"sub": "u-1", "groups": ["fraud"]}
    start = console.get("/oidc/login")
    at_provider = httpx.get(start.headers["location"], follow_redirects=False)
    back = urlsplit(at_provider.headers["location"])
    query = parse_qs(back.query)
    forged = urlencode({"code": query["code"][0], "state": "another-state"})
    answer = console.get(f"/oidc/callback?{forged}")
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "OIDC_STATE_INVALID"


def test_a_state_cookie_from_another_key_is_refused(
    provider: Provider, console: TestClient
) -> None:
    provider.user = {"sub": "u-1", "groups": ["fraud"]}
    start = console.get("/oidc/login")
    at_provider = httpx.get(start.headers["location"], follow_redirects=False)
    back = urlsplit(at_provider.headers["location"])
    cookie = console.cookies.get(STATE_COOKIE) or ""
    console.cookies.clear()
    answer = console.get(
        f"/oidc/callback?{back.query}", cookies={STATE_COOKIE: cookie[:-4] + "0000"}
    )
    assert answer.headers["x-triplane-reason"] == "OIDC_STATE_INVALID"


def test_a_slow_sign_in_expires(
    provider: Provider, console: TestClient, clock: ManualClock
) -> None:
    provider.user = {"sub": "u-1", "groups": ["fraud"]}
    start = console.get("/oidc/login")
    at_provider = httpx.get(start.headers["location"], follow_redirects=False)
    clock.advance(601)
    back = urlsplit(at_provider.headers["location"])
    answer = console.get(f"/oidc/callback?{back.query}")
    assert answer.headers["x-triplane-reason"] == "OIDC_STATE_EXPIRED"


def test_an_id_token_for_another_nonce_is_refused(provider: Provider, console: TestClient) -> None:
    provider.wrong_nonce = True
    answer = sign_in_through(provider, console, {"sub": "u-1", "groups": ["fraud"]})
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "OIDC_ID_TOKEN_INVALID"
    assert provider.refused_verifiers == 0  # the PKCE verifier the console sent was right


def test_local_passwords_are_off_with_a_provider(console: TestClient) -> None:
    console.get("/login")
    nonce = console.cookies.get(LOGIN_COOKIE) or ""
    key = console.app.state.console.session_key  # type: ignore[attr-defined]
    answer = console.post(
        "/login",
        data={"username": "rita", "password": "x", "csrf_token": csrf_token(key, nonce)},
    )
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == "LOCAL_ACCOUNTS_OFF"
