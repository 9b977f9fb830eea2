"""The Decisions page in a real browser (Debian's chromium, Playwright)
against the money and policy planes with the gateway in front: a payment
made through the gateway by a customer the platform has no profile for is
found by its decision id and then by its customer's name token, and its
page shows the rule that fired (kyc_profile_unknown), the bundle and no
name in clear for a reviewer; an auditor replays it under its own bundle and
gets the same outcome, audited; a reviewer has no replay form; a payment the
AI plane scored shows each feature's contribution to its score as bars (the
AI plane's Explain, drawn on the server) beside a table of the figures."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, expect

from .conftest import browser_page, shot, signed_in
from .gateway_mesh import TENANT, UNKNOWN_CUSTOMER, Mesh, gateway_mesh

pytestmark = [pytest.mark.nats]


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> AsyncIterator[Mesh]:
    mesh_dir = tmp_path_factory.mktemp("decisions-mesh")
    async with gateway_mesh(mesh_dir, nats_url, with_ai=True) as made:
        yield made


@pytest.fixture
async def page(browser: Browser, mesh: Mesh) -> AsyncIterator[Page]:
    async with browser_page(browser, mesh.url) as opened:
        yield opened


async def test_a_gateway_decision_is_found_by_id_and_by_customer_token(
    mesh: Mesh, page: Page
) -> None:
    made = await mesh.authorize(UNKNOWN_CUSTOMER, "Jane Unprofiled", 4_200)
    assert made.decision_id
    assert "KYC_PROFILE_UNKNOWN" in [r.code for r in made.reasons], made
    # Another payment, of a known customer: the searches below must not list it.
    other = await mesh.authorize("c1", "Known Person", 1_000)

    await signed_in(page, "rita")
    await page.goto("/decisions")
    await page.get_by_label("Tenant").fill(TENANT)
    await page.get_by_label("Decision id").fill(made.decision_id)
    await page.get_by_role("button", name="Search").click()
    row = page.locator(f'tr[data-decision-id="{made.decision_id}"]')
    await expect(row).to_contain_text("42.00 USD")
    await expect(page.locator("tr[data-decision-id]")).to_have_count(1)
    await shot(page, "by-id")
    await row.get_by_role("link").click()
    rules = page.get_by_test_id("fired-rules")
    await expect(rules).to_contain_text("kyc_profile_unknown")
    await expect(rules).to_contain_text("KYC_PROFILE_UNKNOWN")
    await expect(page.get_by_test_id("decision-bundle")).to_have_text(made.policy_version)
    logged = await page.get_by_test_id("decision-input").inner_text()
    assert "Jane Unprofiled" not in logged and "ptok_name_" in logged
    # A reviewer reads; replaying is not theirs.
    await expect(page.get_by_role("button", name="Replay")).to_have_count(0)
    await shot(page, "detail")

    # The customer's token, as the reviewer sees it, finds the decision.
    token = (await page.locator("dd small.muted").first.inner_text()).strip()
    assert token.startswith("ptok_name_")
    await page.goto("/decisions")
    await page.get_by_label("Tenant").fill(TENANT)
    await page.get_by_label("Customer (id or name token)").fill(token)
    await page.get_by_role("button", name="Search").click()
    await expect(page.locator(f'tr[data-decision-id="{made.decision_id}"]')).to_have_count(1)
    await expect(page.locator(f'tr[data-decision-id="{other.decision_id}"]')).to_have_count(0)
    await shot(page, "by-token")


async def test_an_auditor_replays_a_decision(mesh: Mesh, page: Page) -> None:
    made = await mesh.authorize(UNKNOWN_CUSTOMER, "Jane Unprofiled", 4_300)
    await signed_in(page, "aldo")
    await page.goto(f"/decisions/{TENANT}/{made.decision_id}")
    await page.get_by_role("button", name="Replay").click()
    result = page.get_by_test_id("replay-result")
    await expect(result).to_contain_text(f"Under {made.policy_version}")
    await expect(result).to_contain_text("(same as logged)")
    await shot(page, "replayed")
    replays = [
        e for e in mesh.store.audit_entries(50, action="decision.replay") if e.actor == "aldo"
    ]
    assert replays and replays[0].outcome == "ok"
    assert replays[0].after["changed"] is False
    assert replays[0].before["bundle_version"] == made.policy_version


async def test_a_scored_decision_shows_its_attributions(mesh: Mesh, page: Page) -> None:
    made = await mesh.authorize("c1", "Known Person", 2_600)
    assert made.model_score_ref.source not in ("", "none"), made.model_score_ref
    assert made.model_score_ref.score_id
    await signed_in(page, "rosa")
    await page.goto(f"/decisions/{TENANT}/{made.decision_id}")
    attributions = page.get_by_test_id("attributions")
    await expect(attributions.locator("tbody tr").first).to_be_visible()
    rows = await attributions.locator("tbody tr").count()
    assert 1 <= rows <= 8
    # The bars are drawn on the server: one rect a feature, inside the SVG
    # that names what it shows.
    chart = page.locator("svg.chart", has=page.locator("title", has_text="Feature contributions"))
    await expect(chart.locator("rect")).to_have_count(rows)
    await expect(page.get_by_text(f"{made.model_score_ref.model} version")).to_be_visible()
    await shot(page, "attributions")
