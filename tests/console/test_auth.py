"""The console's sign-in, roles, CSRF and session expiry, through Starlette's
TestClient (no plane is called: the guard refuses before any handler runs)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from console.app import create_app, sweep_sessions
from console.auth import SESSION_COOKIE, UnknownRole, check_roles, hash_password
from console.store import ConsoleStore
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config

from .conftest import console_client, login_token

PASSWORD = "correct horse battery staple"


def make_config(state_dir: Path, **console: object) -> Config:
    return load_config(
        environ={}, overrides={"runtime": {"state_dir": str(state_dir)}, "console": console}
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, session_idle_s=600.0, session_absolute_s=3600.0)


@pytest.fixture
def client(config: Config, clock: ManualClock) -> Iterator[TestClient]:
    users = {"rita": ["reviewer"], "aud": ["auditor"], "ria": ["risk_admin"]}
    with console_client(config, users, PASSWORD, clock) as test_client:
        yield test_client


def sign_in(client: TestClient, username: str, password: str = PASSWORD) -> int:
    token = login_token(client)
    answer = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token, "next": "/cases"},
    )
    return int(answer.status_code)


def session_csrf(client: TestClient) -> str:
    page = client.get("/cases")
    found = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def audit_rows(client: TestClient, action: str) -> list[tuple[str, str]]:
    store: ConsoleStore = client.app.state.console.store  # type: ignore[attr-defined]
    return [(e.actor, e.outcome) for e in store.audit_entries(100, action=action)]


def test_sign_in_sets_a_hardened_cookie_and_a_fresh_session(client: TestClient) -> None:
    token = login_token(client)
    answer = client.post(
        "/login",
        data={"username": "rita", "password": PASSWORD, "csrf_token": token},
        cookies={SESSION_COOKIE: "planted-by-an-attacker"},
    )
    assert answer.status_code == 303
    header = answer.headers["set-cookie"]
    assert header.startswith(f"{SESSION_COOKIE}=") and "planted" not in header
    page = client.get("/cases")
    assert page.status_code == 200
    assert 'data-testid="username">rita<' in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"
    assert audit_rows(client, "login") == [("rita", "ok")]


def test_cookie_flags(config: Config, clock: ManualClock, tmp_path: Path) -> None:
    store = ConsoleStore.from_config(config)
    store.add_user("rita", hash_password(PASSWORD), ["reviewer"], clock.now_us())
    tls_config = make_config(tmp_path, public_url="https://console.example")
    app = create_app(tls_config, clock=clock, store=store)
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as https:
        token = login_token(https)
        answer = https.post(
            "/login", data={"username": "rita", "password": PASSWORD, "csrf_token": token}
        )
        assert answer.status_code == 303
        header = answer.headers["set-cookie"].lower()
        assert "httponly" in header and "samesite=lax" in header and "secure" in header


def test_wrong_password_is_refused_and_audited(client: TestClient) -> None:
    assert sign_in(client, "rita", "wrong") == 401
    assert sign_in(client, "nobody", "wrong") == 401
    assert client.get("/cases").status_code == 303  # still signed out: to the sign-in page
    assert audit_rows(client, "login") == [("nobody", "denied"), ("rita", "denied")]


def test_login_without_its_csrf_token_is_refused(client: TestClient) -> None:
    client.get("/login")
    answer = client.post("/login", data={"username": "rita", "password": PASSWORD})
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "CSRF_TOKEN_INVALID"
    assert client.cookies.get(SESSION_COOKIE) is None
    # Audited, but not as a refused password: forged posts cannot throttle a name.
    assert audit_rows(client, "csrf.refused") == [("rita", "denied")]
    assert audit_rows(client, "login") == []


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(client: TestClient) -> None:
    assert sign_in(client, "rita") == 303
    answer = client.post("/cases/acme/case-1/claim", data={})
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "CSRF_TOKEN_INVALID"
    wrong = client.post("/cases/acme/case-1/claim", data={"csrf_token": "forged"})
    assert wrong.status_code == 403
    assert audit_rows(client, "csrf.refused") == [("rita", "denied"), ("rita", "denied")]
    assert audit_rows(client, "case.claim") == []


def test_a_role_without_the_permission_is_refused(client: TestClient) -> None:
    assert sign_in(client, "aud") == 303
    token = session_csrf(client)
    answer = client.post(
        "/cases/acme/case-1/resolve",
        data={"csrf_token": token, "resolution": "approve", "note": "fine"},
    )
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    assert audit_rows(client, "permission.refused") == [("aud", "denied")]
    assert client.get("/audit").status_code == 200  # auditors read the log


def test_reviewer_cannot_read_the_audit_log(client: TestClient) -> None:
    assert sign_in(client, "rita") == 303
    assert client.get("/audit").status_code == 403


def test_session_ends_after_idle_time(client: TestClient, clock: ManualClock) -> None:
    assert sign_in(client, "rita") == 303
    clock.advance(590)
    assert client.get("/cases").status_code == 200  # a request restarts the idle clock
    clock.advance(590)
    assert client.get("/cases").status_code == 200
    clock.advance(601)
    expired = client.get("/cases")
    assert expired.status_code == 303 and expired.headers["location"].startswith("/login")
    post = client.post("/cases/acme/c/claim", data={"csrf_token": "x"})
    assert post.status_code == 401


def test_session_ends_at_its_absolute_limit(client: TestClient, clock: ManualClock) -> None:
    assert sign_in(client, "rita") == 303
    for _ in range(6):
        clock.advance(590)
        assert client.get("/cases").status_code == 200
    clock.advance(300)  # 3840 s after sign-in, never idle for 600
    assert client.get("/cases").status_code == 303


def test_sign_out_ends_the_session(client: TestClient) -> None:
    assert sign_in(client, "rita") == 303
    old = client.cookies.get(SESSION_COOKIE)
    token = session_csrf(client)
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    client.cookies.set(SESSION_COOKIE, old or "")
    assert client.get("/cases").status_code == 303


def test_next_never_leaves_the_console(client: TestClient) -> None:
    token = login_token(client)
    answer = client.post(
        "/login",
        data={
            "username": "rita",
            "password": PASSWORD,
            "csrf_token": token,
            "next": "//evil.example/x",
        },
    )
    assert answer.headers["location"] == "/"


def test_bad_filter_names_the_field(client: TestClient) -> None:
    assert sign_in(client, "rita") == 303
    answer = client.get("/cases?tenant=acme&min_amount=lots")
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == "FILTER_INVALID"
    assert answer.headers["x-triplane-field"] == "min_amount"


def test_roles_are_checked() -> None:
    assert check_roles(["reviewer", "auditor"]) == ("reviewer", "auditor")
    with pytest.raises(UnknownRole):
        check_roles(["root"])
    with pytest.raises(UnknownRole):
        check_roles([])


def test_health(client: TestClient) -> None:
    assert client.get("/healthz").text == "ok"
    assert client.get("/static/htmx.min.js").status_code == 200


async def test_the_sweep_deletes_expired_sessions_only(config: Config, clock: ManualClock) -> None:
    store = ConsoleStore.from_config(config)
    app = create_app(config, clock=clock, store=store)
    console = app.state.console
    store.create_session("old", "rita", ("reviewer",), clock.now_us())
    clock.advance(3000)
    store.create_session("idle", "rita", ("reviewer",), clock.now_us())
    store.create_session("live", "rita", ("reviewer",), clock.now_us())
    clock.advance(601)
    store.touch_session("live", clock.now_us())
    # "old": past the absolute limit (3601 s); "idle": 601 s without a request.
    assert await sweep_sessions(console) == 2
    assert store.session("old") is None and store.session("idle") is None
    assert store.session("live") is not None
    store.close()


def test_repeated_wrong_passwords_throttle_the_name(client: TestClient, clock: ManualClock) -> None:
    for _ in range(5):
        assert sign_in(client, "rita", "guess") == 401
    # The right password no longer helps, for this name only, within the window.
    assert sign_in(client, "rita") == 429
    assert sign_in(client, "aud") == 303
    clock.advance(901)
    assert sign_in(client, "rita") == 303
    reasons = [e.after.get("reason") for e in client.app.state.console.store.audit_entries(20)]  # type: ignore[attr-defined]
    assert "LOGIN_THROTTLED" in reasons


def test_reflected_next_is_escaped(client: TestClient) -> None:
    page = client.get("/login", params={"next": '/x"><script>alert(1)</script>'})
    assert "<script>alert(1)" not in page.text
    assert "&lt;script&gt;" in page.text or "&#34;&gt;&lt;script" in page.text


def test_htmx_asks_for_the_table_alone(client: TestClient) -> None:
    assert sign_in(client, "rita") == 303
    full = client.get("/cases")
    partial = client.get("/cases", headers={"HX-Request": "true"})
    assert "<html" in full.text and "<html" not in partial.text
    assert "Name a tenant" in partial.text


def test_vendored_htmx_is_the_recorded_file() -> None:
    static = Path(__file__).resolve().parents[2] / "console" / "static"
    recorded = re.search(r"sha256: ([0-9a-f]{64})", (static / "htmx.README.md").read_text())
    assert recorded
    digest = hashlib.sha256((static / "htmx.min.js").read_bytes()).hexdigest()
    assert digest == recorded.group(1)
    assert "Zero-Clause BSD" in (static / "htmx.LICENSE").read_text()
