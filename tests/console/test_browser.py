"""The console in a real browser (Debian's chromium, Playwright) against a
running policy plane: a reviewer claims and resolves a case and the plane has
it; an auditor cannot; a POST without its CSRF token is refused; a wrong
password is refused and audited; a session ends when idle (the console's
clock moved, not slept)."""

from __future__ import annotations

import re

from playwright.async_api import Page, expect

from triplane.policy.v1 import policy_pb2 as pb

from .conftest import PASSWORD, TENANT, ConsoleUnderTest, shot, signed_in


async def test_reviewer_claims_and_resolves_a_case(console: ConsoleUnderTest, page: Page) -> None:
    decision = await console.review_case("browser-resolve", amount_minor=12_345)
    await signed_in(page, "rita")
    await expect(page.get_by_test_id("username")).to_have_text("rita")
    await page.get_by_label("Tenant").fill(TENANT)
    await page.get_by_role("button", name="Show").click()
    row = page.locator(f'tr[data-case-id="{decision.case_id}"]')
    await expect(row).to_contain_text("123.45 USD")
    await shot(page, "queue")
    await row.get_by_role("link").click()
    await expect(page.get_by_test_id("case-status")).to_have_text("open")
    # A reviewer does not hold pii:read: the names are tokens.
    logged = await page.get_by_test_id("decision-input").inner_text()
    assert "Jane Example" not in logged and "ptok_name_" in logged
    await shot(page, "case-open")
    await page.get_by_role("button", name="Claim this case").click()
    await expect(page.get_by_test_id("case-assignee")).to_have_text("rita")
    await shot(page, "case-claimed")
    await page.get_by_label("decline").check()
    await page.get_by_label("Reason").fill("Card testing pattern on this merchant")
    await page.get_by_role("button", name="Resolve").click()
    await expect(page.get_by_test_id("case-status")).to_have_text("resolved")
    await shot(page, "case-resolved")

    case = await console.get_case(decision.case_id)
    assert case.status == pb.CASE_STATUS_RESOLVED
    assert case.resolution == pb.RESOLUTION_DECLINE
    assert case.assignee == "rita"
    assert case.note == "Card testing pattern on this merchant"
    entries = console.store.audit_entries(50, actor="rita")
    resolved = [e for e in entries if e.action == "case.resolve"]
    assert len(resolved) == 1 and resolved[0].outcome == "ok"
    assert resolved[0].before["status"] == "CASE_STATUS_CLAIMED"
    assert resolved[0].after["status"] == "CASE_STATUS_RESOLVED"
    assert resolved[0].after["resolution"] == "RESOLUTION_DECLINE"


async def test_auditor_sees_no_buttons_and_cannot_resolve(
    console: ConsoleUnderTest, page: Page
) -> None:
    decision = await console.review_case("browser-auditor")
    await signed_in(page, "aldo")
    await page.goto(f"/cases/{TENANT}/{decision.case_id}")
    await expect(page.get_by_test_id("case-status")).to_have_text("open")
    await expect(page.get_by_role("button", name="Claim this case")).to_have_count(0)
    await expect(page.get_by_role("button", name="Resolve")).to_have_count(0)
    await shot(page, "auditor-case")
    # Posting anyway (with a valid CSRF token from the page) is refused.
    token = await page.locator("body").get_attribute("hx-headers")
    assert token
    csrf = re.search(r'"X-CSRF-Token": "([^"]+)"', token)
    assert csrf
    answer = await page.request.post(
        f"/cases/{TENANT}/{decision.case_id}/resolve",
        form={"csrf_token": csrf.group(1), "resolution": "approve", "note": "looks fine"},
    )
    assert answer.status == 403
    assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"
    assert (await console.get_case(decision.case_id)).status == pb.CASE_STATUS_OPEN
    # The audit page shows the refusal to an auditor.
    await page.goto("/audit?action=permission.refused")
    await expect(page.locator('tr[data-action="permission.refused"]').first).to_contain_text("aldo")
    await shot(page, "audit")


async def test_post_without_csrf_token_is_refused(console: ConsoleUnderTest, page: Page) -> None:
    decision = await console.review_case("browser-csrf")
    await signed_in(page, "rita")
    answer = await page.request.post(f"/cases/{TENANT}/{decision.case_id}/claim", form={})
    assert answer.status == 403
    assert answer.headers["x-triplane-reason"] == "CSRF_TOKEN_INVALID"
    assert (await console.get_case(decision.case_id)).status == pb.CASE_STATUS_OPEN


async def test_wrong_password_is_refused_and_audited(console: ConsoleUnderTest, page: Page) -> None:
    await signed_in(page, "rita", password="not " + PASSWORD)
    await expect(page.locator("#login-error")).to_have_text("Wrong username or password.")
    await shot(page, "wrong-password")
    await page.goto("/cases")
    await expect(page).to_have_url(re.compile(r"/login\?next="))
    denied = [e for e in console.store.audit_entries(50, action="login") if e.outcome == "denied"]
    assert denied and denied[0].actor == "rita"
    assert denied[0].after == {"reason": "BAD_CREDENTIALS"}


async def test_idle_session_expires(console: ConsoleUnderTest, page: Page) -> None:
    await signed_in(page, "rosa")
    await page.goto("/cases")
    await expect(page.get_by_test_id("username")).to_have_text("rosa")
    console.clock.advance(console.config.console.session_idle_s + 1)
    await page.goto("/cases")
    await expect(page).to_have_url(re.compile(r"/login\?next="))
    await shot(page, "expired")


async def test_risk_admin_sees_names_in_clear(console: ConsoleUnderTest, page: Page) -> None:
    decision = await console.review_case("browser-pii")
    await signed_in(page, "rosa")
    await page.goto(f"/cases/{TENANT}/{decision.case_id}")
    await expect(page.get_by_test_id("decision-input")).to_contain_text("Jane Example")
    await shot(page, "pii-clear")


async def test_queue_filters_by_amount_outcome_and_age(
    console: ConsoleUnderTest, page: Page
) -> None:
    small = await console.review_case("browser-filter-small", amount_minor=11)
    large = await console.review_case("browser-filter-large", amount_minor=77_777)
    await signed_in(page, "rita")
    await page.goto(f"/cases?tenant={TENANT}&min_amount=100")
    await expect(page.locator(f'tr[data-case-id="{large.case_id}"]')).to_have_count(1)
    await expect(page.locator(f'tr[data-case-id="{small.case_id}"]')).to_have_count(0)
    await shot(page, "filter-amount")
    await page.goto(f"/cases?tenant={TENANT}&max_amount=0.5&outcome=review")
    await expect(page.locator(f'tr[data-case-id="{small.case_id}"]')).to_have_count(1)
    await expect(page.locator(f'tr[data-case-id="{large.case_id}"]')).to_have_count(0)
    await page.goto(f"/cases?tenant={TENANT}&outcome=hold")
    await expect(page.locator(f'tr[data-case-id="{small.case_id}"]')).to_have_count(0)
    # Opened just now: not older than an hour, until the console's clock says so.
    await page.goto(f"/cases?tenant={TENANT}&min_age_h=1")
    await expect(page.locator(f'tr[data-case-id="{small.case_id}"]')).to_have_count(0)
    console.clock.advance(2 * 3600)
    await signed_in(page, "rita")  # two idle hours ended the session
    await page.goto(f"/cases?tenant={TENANT}&min_age_h=1")
    await expect(page.locator(f'tr[data-case-id="{small.case_id}"]')).to_have_count(1)
    # A filter that is not a number: 400, the field named, on the page.
    await page.goto(f"/cases?tenant={TENANT}&min_age_h=soon")
    await expect(page.get_by_test_id("reason")).to_have_text("FILTER_INVALID")
    await expect(page.get_by_test_id("field")).to_have_text("min_age_h")


async def test_every_control_is_labelled_and_a_case_is_claimed_by_keyboard(
    console: ConsoleUnderTest, page: Page
) -> None:
    decision = await console.review_case("browser-keyboard")
    unlabelled = """() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.type !== 'hidden' && e.labels.length === 0).map(e => e.name)"""
    await page.goto("/login")
    assert await page.evaluate(unlabelled) == []
    await signed_in(page, "rita")
    await page.goto(f"/cases?tenant={TENANT}")
    assert await page.evaluate(unlabelled) == []
    await page.goto(f"/cases/{TENANT}/{decision.case_id}")
    # Keyboard only: tab to the claim button (a bounded number of stops).
    for _ in range(40):
        await page.keyboard.press("Tab")
        focused = await page.evaluate("() => document.activeElement.textContent.trim()")
        if focused == "Claim this case":
            break
    else:
        raise AssertionError("the claim button is not reachable by Tab")
    outline = await page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # the focus is visible
    await shot(page, "keyboard-focus")
    await page.keyboard.press("Enter")
    await expect(page.get_by_test_id("case-assignee")).to_have_text("rita")
    assert await page.evaluate(unlabelled) == []  # the resolve form too
    assert (await console.get_case(decision.case_id)).status == pb.CASE_STATUS_CLAIMED
