"""Who reads the ledger, through Starlette's TestClient: finance_operator,
sre and auditor (money:read) see the Ledger page; reviewer and risk_admin are
refused (403 PERMISSION_DENIED, audited) and get no link to it; the page has
no form that posts (nothing moves money from here); a bad point in time is
400 naming as_of. No plane is called."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from .test_auth import audit_rows
from .test_decisions_roles import client, sign_in_as

__all__ = ["client"]


@pytest.mark.parametrize("username", ["fina", "sam", "aldo"])
def test_money_readers_see_the_ledger(client: TestClient, username: str) -> None:
    sign_in_as(client, username)
    page = client.get("/ledger")
    assert page.status_code == 200
    assert '<a href="/ledger" aria-current="page">Ledger</a>' in page.text
    assert '<label for="tenant">Tenant</label>' in page.text
    # Reading only: the one POST form on the page is signing out.
    assert page.text.count('method="post"') == 1 and 'action="/logout"' in page.text


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
