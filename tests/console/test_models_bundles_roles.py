"""Roles and bad input on the Models and Bundles pages, through Starlette's
TestClient: each refusal comes before any plane is called (the planes' channels
point nowhere here), names its reason and field, and the refused role is
audited. And the SVG charts escape what they draw."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from console.charts import Interval, Series, interval_chart, line_chart
from console.pages.bundles import diff_lines
from console.store import ConsoleStore
from triplane.runtime.config import Config

from .conftest import console_client, sign_in_as
from .test_auth import make_config

USERS = {"sam": ["sre"], "rosa": ["risk_admin"], "rita": ["reviewer"], "aldo": ["auditor"]}


@pytest.fixture
def config(tmp_path: object) -> Config:
    return make_config(tmp_path)  # type: ignore[arg-type]


@pytest.fixture
def client(config: Config) -> Iterator[TestClient]:
    with console_client(config, USERS) as test_client:
        yield test_client


def signed_in(client: TestClient, username: str) -> str:
    """Signs `username` in (a fresh browser); returns the session's CSRF token."""
    sign_in_as(client, username)
    page = client.get("/login", follow_redirects=True)
    found = re.search(r'"X-CSRF-Token": "([^"]+)"', page.text)
    assert found, page.text
    return found.group(1)


def audited(client: TestClient, action: str) -> list[tuple[str, str, str]]:
    store: ConsoleStore = client.app.state.console.store  # type: ignore[attr-defined]
    return [(e.actor, e.target, e.outcome) for e in store.audit_entries(100, action=action)]


def test_a_reviewer_may_not_activate_or_shadow_a_bundle(client: TestClient) -> None:
    csrf = signed_in(client, "rita")
    for path in ("/bundles/activate", "/bundles/shadow"):
        answer = client.post(path, data={"csrf_token": csrf, "version": "x@1", "reason": "r"})
        assert answer.status_code == 403
        assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    assert audited(client, "permission.refused") == [
        ("rita", "/bundles/shadow", "denied"),
        ("rita", "/bundles/activate", "denied"),
    ]
    assert audited(client, "bundle.activate") == []


def test_only_an_sre_promotes_or_rolls_back_a_model(client: TestClient) -> None:
    for name in ("rosa", "aldo"):
        csrf = signed_in(client, name)
        for path in ("/models/payment_risk/rollback", "/models/payment_risk/2/promote"):
            answer = client.post(
                path, data={"csrf_token": csrf, "target": "live", "reason": "because"}
            )
            assert answer.status_code == 403, (name, path)
            assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    # Nor does anyone without models:read see the page.
    signed_in(client, "rita")
    assert client.get("/models").status_code == 403
    signed_in(client, "sam")
    assert client.get("/bundles").status_code == 403
    assert client.get("/bundles/diff?from=a&to=b").status_code == 403


@pytest.mark.parametrize(
    ("path", "form", "reason", "field"),
    [
        ("/models/payment_risk/rollback", {}, "REASON_REQUIRED", "reason"),
        ("/models/payment_risk/rollback", {"reason": "x" * 2001}, "REASON_TOO_LONG", "reason"),
        (
            "/models/payment_risk/2/promote",
            {"target": "draft", "reason": "r"},
            "TARGET_STATE_INVALID",
            "target",
        ),
        (
            "/models/payment_risk/0/promote",
            {"target": "live", "reason": "r"},
            "VERSION_INVALID",
            "version",
        ),
        (
            "/models/payment_risk/v2/promote",
            {"target": "live", "reason": "r"},
            "VERSION_INVALID",
            "version",
        ),
        (
            f"/models/{'m' * 129}/rollback",
            {"reason": "r"},
            "MODEL_INVALID",
            "model",
        ),
    ],
)
def test_bad_model_actions_name_the_field(
    client: TestClient, path: str, form: dict[str, str], reason: str, field: str
) -> None:
    csrf = signed_in(client, "sam")
    answer = client.post(path, data={"csrf_token": csrf, **form})
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == reason
    assert answer.headers["x-triplane-field"] == field
    assert audited(client, "model.promote") == audited(client, "model.rollback") == []


@pytest.mark.parametrize(
    ("path", "form", "reason", "field"),
    [
        ("/bundles/activate", {"reason": "r"}, "FIELD_REQUIRED", "version"),
        ("/bundles/activate", {"version": "x@1"}, "REASON_REQUIRED", "reason"),
        ("/bundles/shadow", {"version": "x@1", "reason": " "}, "REASON_REQUIRED", "reason"),
        ("/bundles/activate", {"version": "v" * 257, "reason": "r"}, "FIELD_TOO_LONG", "version"),
    ],
)
def test_bad_bundle_actions_name_the_field(
    client: TestClient, path: str, form: dict[str, str], reason: str, field: str
) -> None:
    csrf = signed_in(client, "rosa")
    answer = client.post(path, data={"csrf_token": csrf, **form})
    assert answer.status_code == 400
    assert answer.headers["x-triplane-reason"] == reason
    assert answer.headers["x-triplane-field"] == field
    assert audited(client, "bundle.activate") == audited(client, "bundle.shadow") == []


def test_a_diff_needs_both_versions(client: TestClient) -> None:
    signed_in(client, "rita")
    answer = client.get("/bundles/diff?to=x@1")
    assert answer.status_code == 400
    assert answer.headers["x-triplane-field"] == "from"


def test_the_diff_lines_are_classified() -> None:
    text = "--- a@1\n+++ b@2\n@@ -1,2 +1,2 @@\n keep\n-old\n+new\n"
    assert diff_lines(text) == [
        ("header", "--- a@1"),
        ("header", "+++ b@2"),
        ("hunk", "@@ -1,2 +1,2 @@"),
        ("context", " keep"),
        ("removed", "-old"),
        ("added", "+new"),
    ]


def test_charts_escape_what_they_draw_and_say_when_empty() -> None:
    svg = str(line_chart("<t>", [Series("<script>x</script>", [(1.0, 0.5), (2.0, 0.7)])]))
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert svg.count("<circle") == 2 and "<title>&lt;t&gt;</title>" in svg
    assert "No data" in str(line_chart("empty", []))
    rows = [Interval("up", 0.02, 0.01, 0.03), Interval("flat", 0.0, -0.01, 0.01)]
    drawn = str(interval_chart("lift", rows))
    # Significant (interval above zero) in green, the one spanning zero in grey.
    assert re.search(r'data-label="up".*?stroke="#1a7f37"', drawn)
    assert re.search(r'data-label="flat".*?stroke="#57606a"', drawn)
