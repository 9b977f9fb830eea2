"""Every page, as the auditor and as each role that has actions, in chromium:
each form control (not hidden) has a <label> or an aria-label, each page has
one <h1> and a <main>, the Tab key reaches every button, and with JavaScript
off the page shows the same table rows.

The pages are the console's PAGE objects (console.pages.discover()) a role
may read, each before a tenant is chosen and with the tenant named, and a
case's and a decision's pages (where a reviewer claims, a risk_admin
replays). The console runs against the policy plane only (tests/console/
conftest.py): a page whose plane is not running is the console's error page,
checked the same way."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import Browser, Page

from console.auth import ROLE_PERMISSIONS, hash_password
from console.pages import discover

from .conftest import PASSWORD, TENANT, ConsoleUnderTest, shot, signed_in

# The auditor reads every page it may; the others are the roles with actions.
ROLES = ("auditor", "reviewer", "risk_admin", "finance_operator", "sre")
# More than the focusable elements of any page: Tab presses before giving up.
MAX_TABS = 400

UNLABELLED = """() => Array.from(
  document.querySelectorAll('input:not([type=hidden]), select, textarea')
).filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
              && !el.getAttribute('aria-labelledby'))
 .map(el => el.outerHTML)"""
MARK_BUTTONS = """() => {
  const found = Array.from(document.querySelectorAll(
    'button, input[type=submit], input[type=button], input[type=reset]'
  )).filter(el => !el.disabled && el.getClientRects().length > 0);
  found.forEach((el, index) => el.setAttribute('data-a11y', String(index)));
  return found.map(el => el.outerHTML);
}"""
FOCUSED = "() => document.activeElement && document.activeElement.getAttribute('data-a11y')"
ROWS = """() => Array.from(document.querySelectorAll('main table tr'))
  .map(row => row.innerText.replace(/\\s+/g, ' ').trim())"""


def _user(console: ConsoleUnderTest, role: str) -> str:
    username = f"a11y-{role}"
    if console.store.user(username) is None:
        console.store.add_user(username, hash_password(PASSWORD), [role], console.clock.now_us())
    return username


def _paths(role: str, decision: Any) -> list[str]:
    """Each page the role reads, before a tenant is chosen (its form) and
    with the tenant; the case's and the decision's pages where it reads them."""
    held = ROLE_PERMISSIONS[role]
    paths = [
        path
        for page in discover()
        if page.permission in held
        for path in (page.path, f"{page.path}?tenant={TENANT}")
    ]
    if "cases:read" in held:
        paths.append(f"/cases/{TENANT}/{decision.case_id}")
    if "decisions:read" in held:
        paths.append(f"/decisions/{TENANT}/{decision.decision_id}")
    return paths


async def _check(page: Page, path: str) -> dict[str, Any]:
    """What is wrong with the page at `path` (empty lists: nothing)."""
    await page.goto(path)
    problems: dict[str, Any] = {}
    unlabelled = await page.evaluate(UNLABELLED)
    if unlabelled:
        problems["unlabelled controls"] = unlabelled
    headings = await page.locator("h1").count()
    if headings != 1:
        problems["h1 count"] = headings
    if await page.locator("main").count() != 1:
        problems["main count"] = await page.locator("main").count()
    buttons = await page.evaluate(MARK_BUTTONS)
    reached: set[str] = set()
    await page.locator("body").focus()
    for _ in range(MAX_TABS):
        if len(reached) == len(buttons):
            break
        await page.keyboard.press("Tab")
        focused = await page.evaluate(FOCUSED)
        if focused is not None:
            reached.add(focused)
    missed = [html for index, html in enumerate(buttons) if str(index) not in reached]
    if missed:
        problems["buttons Tab never reaches"] = missed
    return problems


@pytest.mark.parametrize("role", ROLES)
async def test_every_page_is_accessible(
    browser: Browser, console: ConsoleUnderTest, role: str
) -> None:
    decision = await console.review_case(f"a11y-{role}")
    username = _user(console, role)
    scripted = await browser.new_context(base_url=console.url)
    plain = await browser.new_context(base_url=console.url, java_script_enabled=False)
    try:
        with_js = await scripted.new_page()
        without_js = await plain.new_page()
        await signed_in(with_js, username)
        await signed_in(without_js, username)
        assert "/login" not in with_js.url and "/login" not in without_js.url
        failures: dict[str, Any] = {}
        paths = _paths(role, decision)
        assert paths, f"{role} reads no page"
        for path in paths:
            problems = await _check(with_js, path)
            rows = await with_js.evaluate(ROWS)
            await without_js.goto(path)
            plain_rows = await without_js.evaluate(ROWS)
            if plain_rows != rows:
                problems["rows without JavaScript"] = {"with": rows, "without": plain_rows}
            if problems:
                failures[path] = problems
        await shot(with_js, f"{role}-last-page")
        assert not failures, failures
    finally:
        await scripted.close()
        await plain.close()
