"""Who reads the ledger, through Starlette's TestClient: finance_operator,
sre and auditor (money:read) pass the Ledger pages' guard and have the link;
reviewer and risk_admin are refused (403 PERMISSION_DENIED, audited) and get
no link to it; no ledger template has a form that posts (nothing moves money
from here); a bad point in time is 400 naming as_of. No plane is called."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

import console

from .conftest import sign_in_as
from .test_auth import audit_rows
from .test_decisions_roles import client

__all__ = ["client"]


@pytest.mark.parametrize("username", ["fina", "sam", "aldo"])
def test_money_readers_pass_the_guard_and_see_the_link(client: TestClient, username: str) -> None:
    sign_in_as(client, username)
    # Past the role check (a bad point in time is the page's own refusal,
    # before it calls the plane), with the Ledger in the navigation.
    answer = client.get("/ledger/acme/accounts/cust_1?as_of=never")
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == "AS_OF_INVALID"
    assert '<a href="/ledger"' in answer.text


def test_no_ledger_page_has_a_form_that_posts() -> None:
    """Reading only: nothing on the ledger pages can move money."""
    templates = Path(console.__file__).parent / "templates" / "ledger"
    pages = sorted(templates.glob("*.html"))
    assert len(pages) == 4
    for page in pages:
        text = page.read_text().lower()
        assert 'method="post"' not in text and "hx-post" not in text, page.name


@pytest.mark.parametrize("username", ["rita", "rosa"])
def test_reviewers_and_risk_admins_do_not_read_the_ledger(
    client: TestClient, username: str
) -> None:
    sign_in_as(client, username)
    for path in ("/ledger?tenant=acme", "/ledger/acme/accounts/cust_1", "/ledger/acme/holds/h1"):
        answer = client.get(path)
        assert answer.status_code == 403, path
        assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    assert 'href="/ledger"' not in client.get("/decisions").text
    assert (username, "denied") in audit_rows(client, "permission.refused")


def test_a_bad_point_in_time_is_refused(client: TestClient) -> None:
    sign_in_as(client, "fina")
    answer = client.get("/ledger/acme/accounts/cust_1?as_of=last+tuesday")
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == "AS_OF_INVALID"
    assert answer.headers["x-triplane-field"] == "as_of"
