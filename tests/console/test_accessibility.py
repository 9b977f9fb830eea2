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
from playwright.async_api import Browser

from console.auth import ROLE_PERMISSIONS, hash_password
from console.pages import discover

from .conftest import (
    PASSWORD,
    TENANT,
    ConsoleUnderTest,
    accessibility_problems,
    browser_page,
    shot,
    signed_in,
)

# The auditor reads every page it may; the others are the roles with actions.
ROLES = ("auditor", "reviewer", "risk_admin", "finance_operator", "sre")

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


@pytest.mark.parametrize("role", ROLES)
async def test_every_page_is_accessible(
    browser: Browser, console: ConsoleUnderTest, role: str
) -> None:
    decision = await console.review_case(f"a11y-{role}")
    username = _user(console, role)
    async with (
        browser_page(browser, console.url) as with_js,
        browser_page(browser, console.url, java_script_enabled=False) as without_js,
    ):
        await signed_in(with_js, username)
        await signed_in(without_js, username)
        assert "/login" not in with_js.url and "/login" not in without_js.url
        failures: dict[str, Any] = {}
        paths = _paths(role, decision)
        assert paths, f"{role} reads no page"
        for path in paths:
            problems = await accessibility_problems(with_js, path)
            rows = await with_js.evaluate(ROWS)
            await without_js.goto(path)
            plain_rows = await without_js.evaluate(ROWS)
            if plain_rows != rows:
                problems["rows without JavaScript"] = {"with": rows, "without": plain_rows}
            if problems:
                failures[path] = problems
        await shot(with_js, f"{role}-last-page")
        assert not failures, failures
