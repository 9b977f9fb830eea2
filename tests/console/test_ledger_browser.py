"""The Ledger page in a real browser (Debian's chromium, Playwright) against
the money plane, with payments made through the gateway: a finance operator
picks the tenant from the money plane's tenants, finds the customer's account
among the tenant's, sees its balance (posted,
pending, available) as the money plane reports it, pages through its
postings (three a page) until every capture's posting has been seen once,
opens a posting's entry (the capture) and a hold (captured), and reads the posted balance as of a
moment before the first capture (zero)."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, Page, expect

from triplane.runtime.currencies import format_minor

from .conftest import accessibility_problems, browser_page, shot, signed_in
from .gateway_mesh import KNOWN_CUSTOMER, PAGE_SIZE, TENANT, Mesh, gateway_mesh

pytestmark = [pytest.mark.nats]
CAPTURES = 4


@pytest.fixture(scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, nats_url: str) -> AsyncIterator[Mesh]:
    async with gateway_mesh(tmp_path_factory.mktemp("ledger-mesh"), nats_url) as made:
        yield made


@pytest.fixture
async def page(browser: Browser, mesh: Mesh) -> AsyncIterator[Page]:
    async with browser_page(browser, mesh.url) as opened:
        yield opened


async def test_balance_and_postings_page_by_page(mesh: Mesh, page: Page) -> None:
    before_any = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    holds = []
    for index in range(CAPTURES):
        made = await mesh.authorize(KNOWN_CUSTOMER, "Known Person", 1_000 + index, "cust_2")
        assert made.hold_id, made
        await mesh.capture(made.hold_id)
        holds.append(made.hold_id)
    # One more, left pending: the balance shows it as pending.
    pending = await mesh.authorize(KNOWN_CUSTOMER, "Known Person", 500, "cust_2")
    assert pending.hold_id
    balance = await mesh.balance("cust_2")

    await signed_in(page, "fina")
    await page.goto("/ledger")
    await page.locator(f'tr[data-tenant-id="{TENANT}"]').get_by_role("link").click()
    await shot(page, "tenants")
    await expect(page.locator('tr[data-account-id="cust_2"]')).to_have_count(1)
    await shot(page, "accounts")
    await page.locator('tr[data-account-id="cust_2"]').get_by_role("link").click()
    await expect(page.get_by_test_id("balance-posted")).to_have_text(
        format_minor(balance.posted_minor, "USD")
    )
    await expect(page.get_by_test_id("balance-pending")).to_have_text(
        format_minor(balance.debits_pending_minor, "USD")
    )
    await expect(page.get_by_test_id("balance-available")).to_have_text(
        format_minor(balance.available_minor, "USD")
    )
    assert balance.debits_pending_minor == 500
    await shot(page, "account")

    seen: list[int] = []
    pages = 0
    while True:
        pages += 1
        rows = page.locator("tr[data-posting]")
        seen += [int(n) for n in await rows.evaluate_all("rs => rs.map(r => r.dataset.posting)")]
        following = page.get_by_role("link", name="Next postings")
        if await following.count() == 0:
            break
        await following.click()
        await shot(page, f"postings-{pages + 1}")
    assert seen == list(range(1, CAPTURES + 1))
    assert pages == -(-CAPTURES // PAGE_SIZE)

    # A posting's entry: the capture, found by its id from the history.
    await page.goto(f"/ledger/{TENANT}/accounts/cust_2")
    await page.locator('tr[data-posting="1"]').get_by_role("link").click()
    await expect(page.get_by_test_id("entry-kind")).to_have_text("capture")
    await shot(page, "entry")

    await page.goto(f"/ledger/{TENANT}/holds/{holds[0]}")
    await expect(page.get_by_test_id("hold-state")).to_have_text("captured")
    await shot(page, "hold")

    await page.goto(f"/ledger/{TENANT}/accounts/cust_2")
    await page.get_by_label("As of (UTC)").fill(before_any.strftime("%Y-%m-%dT%H:%M:%S"))
    await page.get_by_role("button", name="Show").click()
    await expect(page.get_by_test_id("balance-as-of")).to_contain_text(format_minor(0, "USD"))
    await shot(page, "as-of")
    for path in (
        "/ledger",
        f"/ledger?tenant={TENANT}",
        f"/ledger/{TENANT}/accounts/cust_2",
        f"/ledger/{TENANT}/holds/{holds[0]}",
    ):
        assert not await accessibility_problems(page, path), path
