"""The console against a running stack, and one browser for the session.

`console_stack`: a Stack running the policy plane (with its embedded NATS),
with the tenant made and a customer profile in it; the console runs in this
process (uvicorn in a thread) against that stack, as its own mTLS identity,
with a ManualClock the tests move (session expiry without sleeping).
`browser`: Debian's chromium (/usr/bin/chromium), driven by Playwright; never
a downloaded browser. Screenshots of every page visited go under
$TRIPLANE_TEST_ARTIFACTS/console (default .pytest-artifacts/console).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from google.protobuf.timestamp_pb2 import Timestamp
from playwright.async_api import Browser, Page, async_playwright
from starlette.testclient import TestClient

from console.app import create_app
from console.auth import hash_password
from console.store import ConsoleStore
from tests.conftest import _loud_skip
from triplane.common.v1 import types_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.policy.v1 import policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane_tools.stack import Stack

CHROMIUM = Path(os.environ.get("TRIPLANE_CHROMIUM", "/usr/bin/chromium"))
TENANT = "acme"
CUSTOMER = "cust-1"
PASSWORD = "a long console password"
USERS = {
    "rita": ["reviewer"],
    "aldo": ["auditor"],
    "rosa": ["risk_admin"],
}
# Bounds on waiting for a thing to happen (not timing assertions).
START_WITHIN_S = 30.0


def artifacts_dir() -> Path:
    root = Path(os.environ.get("TRIPLANE_TEST_ARTIFACTS", ".pytest-artifacts"))
    path = root / "console"
    path.mkdir(parents=True, exist_ok=True)
    return path


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}


@dataclass
class ConsoleUnderTest:
    stack: Stack
    config: Config
    url: str
    clock: ManualClock
    store: ConsoleStore

    async def review_case(self, key: str, amount_minor: int = 2_500) -> pb.Decision:
        """A payment the default bundle sends to review: a case is opened."""
        async with self.stack.channel("policy") as channel:
            answer = await policy_pb2_grpc.PolicyServiceStub(channel).Evaluate(
                evaluate_request(key, amount_minor), timeout=10
            )
        decision: pb.Decision = answer.decision
        assert decision.outcome == pb.OUTCOME_REVIEW and decision.case_id, decision
        return decision

    async def get_case(self, case_id: str) -> pb.Case:
        """The case as the policy plane has it (admin identity, over gRPC)."""
        async with self.stack.channel("policy") as channel:
            answer = await policy_pb2_grpc.CaseServiceStub(channel).GetCase(
                pb.GetCaseRequest(tenant_id=TENANT, case_id=case_id), timeout=10
            )
        case: pb.Case = answer.case
        return case


def evaluate_request(key: str, amount_minor: int) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(
        tenant_id=TENANT,
        idempotency_key=key,
        payment=pb.Payment(
            account_id="acct-1",
            credit_account_id="merchant-1",
            kind=pb.PAYMENT_KIND_PURCHASE,
            amount=types_pb2.Money(amount_minor=amount_minor, currency="USD"),
            merchant_id="m-1",
            merchant_category="5411",
            customer=pb.Party(name="Jane Example", country="US"),
            counterparty=pb.Party(name="Corner Shop", country="US"),
            customer_id=CUSTOMER,
        ),
        snapshot=pb.ContextSnapshot(
            kyc=pb.KycInfo(tier=2, country="US"),
            # Above the default bundle's score_review (0.70): REVIEW.
            model_score=types_pb2.ModelScoreRef(
                model="payment_risk", version="3", source="triton", score=0.8
            ),
            account_age_days=400,
        ),
    )


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own
        pass


@dataclass
class RunningConsole:
    url: str
    clock: ManualClock
    store: ConsoleStore


@contextlib.asynccontextmanager
async def serve_console(
    config: Config, users: dict[str, list[str]], name: str = "console"
) -> AsyncIterator[RunningConsole]:
    """The console for `config` served by uvicorn in a thread of this process
    (on config.console.listen), with a ManualClock and `users` (each with
    PASSWORD and its roles) in its store; stopped on leaving."""
    clock = ManualClock(time.time_ns() // 1000)
    store = ConsoleStore.from_config(config)
    for username, roles in users.items():
        store.add_user(username, hash_password(PASSWORD), roles, clock.now_us())
    host, port = config.console.listen.rsplit(":", 1)
    server = _Server(
        uvicorn.Config(
            create_app(config, clock=clock, store=store),
            host=host,
            port=int(port),
            log_config=None,
            lifespan="on",
        )
    )
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_WITHIN_S
    while not server.started:
        assert thread.is_alive(), "the console exited while starting"
        assert time.monotonic() < deadline, "the console did not start"
        await asyncio.sleep(0.05)
    try:
        yield RunningConsole(f"http://{host}:{port}", clock, store)
    finally:
        server.should_exit = True
        thread.join(START_WITHIN_S)


@pytest.fixture(scope="session")
async def console(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ConsoleUnderTest]:
    state_dir = tmp_path_factory.mktemp("console-state")
    console_port = free_port()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "policy": {"listen": f"127.0.0.1:{free_port()}"},
            "console": {
                "listen": f"127.0.0.1:{console_port}",
                "session_idle_s": 900.0,
                "session_absolute_s": 28800.0,
            },
        },
    )
    async with Stack(config, planes=["policy"], environ=clean_env()) as stack:
        async with stack.channel("policy") as channel:
            await policy_pb2_grpc.PolicyServiceStub(channel).CreateTenant(
                pb.CreateTenantRequest(tenant_id=TENANT, display_name="Acme"), timeout=10
            )
            opened = Timestamp()
            opened.FromSeconds(int(time.time()) - 400 * 86400)
            await policy_pb2_grpc.CustomerProfileServiceStub(channel).PutCustomerProfile(
                pb.PutCustomerProfileRequest(
                    profile=pb.CustomerProfile(
                        tenant_id=TENANT,
                        customer_id=CUSTOMER,
                        kyc_tier=2,
                        country="US",
                        account_opened_at=opened,
                    ),
                    change_id="kyc-1",
                    actor="ops:test",
                ),
                timeout=10,
            )
        async with serve_console(config, USERS) as running:
            yield ConsoleUnderTest(stack, config, running.url, running.clock, running.store)


@contextlib.contextmanager
def console_client(
    config: Config,
    users: Mapping[str, Sequence[str]],
    password: str = PASSWORD,
    clock: ManualClock | None = None,
) -> Iterator[TestClient]:
    """The console for `config` behind Starlette's TestClient (redirects not
    followed), with `users` (each with `password` and its roles) in its store."""
    clock = clock or ManualClock()
    store = ConsoleStore.from_config(config)
    password_hash = hash_password(password)  # once: argon2 is slow on purpose
    for username, roles in users.items():
        store.add_user(username, password_hash, list(roles), clock.now_us())
    app = create_app(config, clock=clock, store=store)
    with TestClient(app, base_url="http://testserver", follow_redirects=False) as client:
        yield client


def login_token(client: TestClient) -> str:
    """The sign-in form's CSRF token (the form's cookie is kept by the client)."""
    page = client.get("/login")
    assert page.status_code == 200
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found
    return found.group(1)


def sign_in_as(client: TestClient, username: str, password: str = PASSWORD) -> None:
    """Signs `username` in, as a fresh browser would (no cookies before)."""
    client.cookies.clear()
    token = login_token(client)
    answer = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token, "next": "/"},
    )
    assert answer.status_code == 303, answer.text


@contextlib.asynccontextmanager
async def browser_page(browser: Browser, url: str, **options: Any) -> AsyncIterator[Page]:
    """A page in a fresh browser context (no cookies) on the console at `url`."""
    context = await browser.new_context(base_url=url, **options)
    try:
        yield await context.new_page()
    finally:
        await context.close()


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


async def accessibility_problems(page: Page, path: str) -> dict[str, Any]:
    """What is wrong with the page at `path` (nothing: {}): a visible form
    control without a <label> or aria-label, not one <h1> or not one <main>,
    a button the Tab key never reaches (tests/console/test_accessibility.py)."""
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


def chromium() -> str:
    """Debian's chromium: missing, the browser tests fail under CI=true (.ci/run
    installs it) and are skipped loudly elsewhere, as the server suites are."""
    if not CHROMIUM.is_file():
        _loud_skip("console browser tests", f"{CHROMIUM} is missing (apt-get install -y chromium)")
    return str(CHROMIUM)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    executable = chromium()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def page(browser: Browser, console: ConsoleUnderTest) -> AsyncIterator[Page]:
    """A fresh browser context (no cookies) a test."""
    async with browser_page(browser, console.url) as opened:
        yield opened


_SHOTS: dict[str, int] = {}


async def shot(page: Page, name: str) -> Path:
    """A full-page screenshot under the artifacts dir, numbered per test."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "test").split("::")[-1].split(" ")[0]
    test = re.sub(r"[^A-Za-z0-9_.-]", "_", current)
    _SHOTS[test] = _SHOTS.get(test, 0) + 1
    path = artifacts_dir() / f"{test}-{_SHOTS[test]:02d}-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def signed_in(page: Page, username: str, password: str = PASSWORD) -> None:
    await page.goto("/login")
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await shot(page, "login")
    await page.get_by_role("button", name="Sign in").click()
    await page.wait_for_load_state()


@pytest.fixture
def artifacts() -> Iterator[Path]:
    yield artifacts_dir()
