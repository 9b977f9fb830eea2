"""Who may use the Reconciliation and Deliveries pages, through Starlette's
TestClient: the guard decides before any plane is called (none runs here),
so what is checked is the role table and the form checks that come before
a call. The flows themselves run against real planes in
test_recon_browser.py and test_deliveries_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from console.auth import permissions_of
from console.pages.recon import imported_path
from triplane.runtime.config import load_config

from .conftest import console_client, sign_in_as

USERS = {
    "rita": ["reviewer"],
    "fina": ["finance_operator"],
    "sam": ["sre"],
    "aud": ["auditor"],
    "ria": ["risk_admin"],
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    config = load_config(environ={}, overrides={"runtime": {"state_dir": str(tmp_path)}})
    assert not config.gateway.admin_listen  # the shipped default: no certificate port
    with console_client(config, USERS) as test_client:
        yield test_client


def sign_in(client: TestClient, username: str) -> str:
    """Signs in; the session's CSRF token."""
    sign_in_as(client, username)
    home = client.get("/", follow_redirects=True)
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', home.text)
    assert csrf, home.text
    return csrf.group(1)


@pytest.mark.parametrize("username", sorted(USERS))
def test_who_sees_the_pages(client: TestClient, username: str) -> None:
    held = permissions_of(tuple(USERS[username]))
    # Reading breaks is money:read (finance_operator, auditor; sre too where
    # the ledger page gives it that); the delivery queue sre's and auditor's.
    recon = 200 if "money:read" in held else 403
    deliveries = 200 if username in ("sam", "aud") else 403
    if username in ("fina", "aud"):
        assert recon == 200
    if username in ("rita", "ria"):
        assert recon == 403
    sign_in(client, username)
    # No tenant named: the pages render their forms without calling a plane.
    assert client.get("/recon").status_code == recon
    assert client.get("/recon/statements").status_code == recon
    assert client.get("/deliveries").status_code == deliveries
    nav = client.get("/", follow_redirects=True).text
    assert ('href="/recon"' in nav) == (recon == 200)
    assert ('href="/deliveries"' in nav) == (deliveries == 200)


@pytest.mark.parametrize("username", ["rita", "sam", "aud", "ria"])
def test_only_finance_operators_resolve_and_import(client: TestClient, username: str) -> None:
    csrf = sign_in(client, username)
    resolve = client.post(
        "/recon/acme/breaks/brk_1/resolve",
        data={"csrf_token": csrf, "resolution": "accepted", "note": "fine"},
    )
    assert resolve.status_code == 403
    assert resolve.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    imported = client.post(
        "/recon/statements/import",
        data={"csrf_token": csrf, "tenant": "acme", "ledger_account_id": "bank"},
        files={"statement": ("s.xml", b"<Document/>", "application/xml")},
    )
    assert imported.status_code == 403


@pytest.mark.parametrize("username", ["rita", "fina", "aud", "ria"])
def test_only_sre_redelivers(client: TestClient, username: str) -> None:
    csrf = sign_in(client, username)
    answer = client.post("/deliveries/acme/msg_1/redeliver", data={"csrf_token": csrf})
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"


def test_forms_are_checked_before_any_call(client: TestClient) -> None:
    csrf = sign_in(client, "fina")
    no_csrf = client.post(
        "/recon/acme/breaks/brk_1/resolve", data={"resolution": "accepted", "note": "x"}
    )
    assert no_csrf.status_code == 403
    assert no_csrf.headers["x-triplane-reason"] == "CSRF_TOKEN_INVALID"
    cases = {
        "resolution": ({"resolution": "shrug", "note": "x"}, "RESOLUTION_INVALID"),
        "note": ({"resolution": "accepted", "note": "  "}, "NOTE_REQUIRED"),
        "entry_id": ({"resolution": "reversal", "note": "x"}, "FIELD_REQUIRED"),
    }
    for field, (form, reason) in cases.items():
        answer = client.post("/recon/acme/breaks/brk_1/resolve", data={"csrf_token": csrf, **form})
        assert answer.status_code == 400, field
        assert answer.headers["x-triplane-reason"] == reason
        assert answer.headers["x-triplane-field"] == field
    no_file = client.post(
        "/recon/statements/import",
        data={"csrf_token": csrf, "tenant": "acme", "ledger_account_id": "bank"},
    )
    assert no_file.status_code == 400 and no_file.headers["x-triplane-field"] == "statement"
    for query, field in (
        ("state=closed", "state"),
        ("break_class=odd", "break_class"),
        ("tier=P9", "tier"),
        ("min_age_h=-1", "min_age_h"),
        ("min_age_h=nan", "min_age_h"),
    ):
        answer = client.get(f"/recon?tenant=acme&{query}")
        assert answer.status_code == 400, query
        assert answer.headers["x-triplane-field"] == field
    audit = client.app.state.console.store.audit_entries(100)  # type: ignore[attr-defined]
    assert not [e for e in audit if e.action == "break.resolve"], "refused before any call"


def test_deliveries_say_when_the_gateway_port_is_unknown(client: TestClient) -> None:
    csrf = sign_in(client, "sam")
    page = client.get("/deliveries?tenant=acme")
    assert page.status_code == 503
    assert page.headers["x-triplane-reason"] == "GATEWAY_ADDRESS_UNSET"
    bad = client.get("/deliveries?tenant=acme&status=lost")
    assert bad.status_code == 400 and bad.headers["x-triplane-field"] == "status"
    answer = client.post("/deliveries/acme/msg_1/redeliver", data={"csrf_token": csrf})
    assert answer.status_code == 503


def test_an_import_lands_on_its_statement_or_on_the_list() -> None:
    """import_statement's redirect_to(after): one statement read, its page;
    several (or none new), the tenant's statements."""
    assert imported_path("a b", ["stm_1"]) == "/recon/a%20b/statements/stm_1"
    assert imported_path("a b", ["stm_1", "stm_2"]) == "/recon/statements?tenant=a+b"
    assert imported_path("acme", []) == "/recon/statements?tenant=acme"
