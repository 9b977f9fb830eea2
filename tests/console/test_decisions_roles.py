"""Who reads and replays decisions, through Starlette's TestClient: every
role but finance_operator reads the Decisions page; only risk_admin, sre and
auditor may replay; refusals are 403 PERMISSION_DENIED and audited; a bad
filter is 400 naming its field. No plane is called: each request is refused
or answered before the page would call one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from .conftest import console_client, sign_in_as
from .test_auth import audit_rows, make_config

ROLES = {
    "rita": "reviewer",
    "rosa": "risk_admin",
    "fina": "finance_operator",
    "sam": "sre",
    "aldo": "auditor",
}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    config = make_config(tmp_path, session_idle_s=600.0, session_absolute_s=3600.0)
    users = {name: [role] for name, role in ROLES.items()}
    with console_client(config, users) as test_client:
        yield test_client


@pytest.mark.parametrize("username", ["rita", "rosa", "sam", "aldo"])
def test_readers_see_the_search_and_the_navigation_link(client: TestClient, username: str) -> None:
    sign_in_as(client, username)
    page = client.get("/decisions")
    assert page.status_code == 200
    assert '<a href="/decisions" aria-current="page">Decisions</a>' in page.text
    assert '<label for="customer">' in page.text and "Name a tenant" in page.text


def test_finance_operator_does_not_read_decisions(client: TestClient) -> None:
    sign_in_as(client, "fina")
    page = client.get("/decisions?tenant=acme")
    assert page.status_code == 403
    assert page.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    # No link to it on the pages they read (a ledger page refusing a bad
    # point in time, before it calls the money plane).
    ledger_page = client.get("/ledger/acme/accounts/cust_1?as_of=never")
    assert '<a href="/ledger"' in ledger_page.text
    assert 'href="/decisions"' not in ledger_page.text
    assert ("fina", "denied") in audit_rows(client, "permission.refused")


def test_a_reviewer_reads_but_may_not_replay(client: TestClient) -> None:
    sign_in_as(client, "rita")
    answer = client.get("/decisions/acme/d-1/replay?bundle_version=default@x")
    assert answer.status_code == 403
    assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    assert ("rita", "denied") in audit_rows(client, "permission.refused")


def test_signed_out_reading_goes_to_sign_in(client: TestClient) -> None:
    answer = client.get("/decisions?tenant=acme")
    assert answer.status_code == 303
    assert answer.headers["location"].startswith("/login?next=")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("tenant=acme&start=yesterday", "start"),
        ("tenant=acme&end=2026-13-40T99:00", "end"),
        ("tenant=acme&customer=" + "x" * 200, "customer"),
    ],
)
def test_bad_filters_are_refused_naming_the_field(
    client: TestClient, query: str, field: str
) -> None:
    sign_in_as(client, "aldo")
    answer = client.get(f"/decisions?{query}")
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == "FILTER_INVALID"
    assert answer.headers["x-triplane-field"] == field
