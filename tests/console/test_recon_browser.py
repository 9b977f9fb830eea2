"""The Reconciliation page in a real browser (Debian's chromium, Playwright)
against a running money plane (its real gRPC server, mutual TLS, the
console's own identity): a finance operator imports a camt.054 (written by
the money plane's formats writers) with a booking no expected payment
covers, finds the break it raised, and matches it by hand to the payment
recorded afterwards; the money plane's ListBreaks then has it resolved by
that operator. A reviewer can neither see nor resolve a break; an auditor
sees it and no form."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from playwright.async_api import Browser, FilePayload, Page, expect

from console.store import ConsoleStore
from money_plane.app import MoneyPlane
from money_plane.formats.camt import write_camt054
from money_plane.formats.statement import (
    Account,
    EntryStatus,
    References,
    Sign,
    Statement,
    StatementKind,
    StatementLine,
    TransactionDetail,
)
from tests.tls_helpers import channel_as, dev_certificates
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2, money_pb2_grpc, recon_pb2, recon_pb2_grpc
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port

from .conftest import accessibility_problems, browser_page, serve_console, shot, signed_in

TENANT = "recon-acme"
IBAN = "DE89370400440532013000"
DAY = dt.date(2026, 12, 4)
USERS = {"fina": ["finance_operator"], "rita": ["reviewer"], "aldo": ["auditor"]}


@dataclass
class ReconConsole:
    config: Config
    money_address: str
    url: str
    store: ConsoleStore

    def channel(self) -> grpc.aio.Channel:
        """The money plane as the admin identity (not the console's)."""
        return channel_as(self.config.state_path, self.money_address)

    async def breaks(self, state: str = "") -> list[recon_pb2.ReconBreak]:
        async with self.channel() as channel:
            answer = await recon_pb2_grpc.ReconciliationServiceStub(channel).ListBreaks(
                recon_pb2.ListBreaksRequest(tenant_id=TENANT, state=state), timeout=10
            )
        return list(answer.breaks)


def stray_booking(amount_minor: int, e2e: str) -> bytes:
    """A camt.054 with one credit booking that nothing expects."""
    booking = StatementLine(
        amount_minor=amount_minor,
        currency="USD",
        sign=Sign.CREDIT,
        status=EntryStatus.BOOKED,
        booking_date=DAY,
        value_date=DAY,
        account_servicer_ref=f"BK-{e2e}",
        bank_transaction_code="PMNT/RCDT/ESCT",
        details=(
            TransactionDetail(
                references=References(end_to_end_id=e2e),
                amount_minor=amount_minor,
                currency="USD",
                sign=Sign.CREDIT,
            ),
        ),
    )
    notification = Statement(
        kind=StatementKind.NOTIFICATION,
        statement_id=f"NTFCTN-{e2e}",
        account=Account(iban=IBAN, currency="USD"),
        lines=(booking,),
        balances=(),
        created_at=dt.datetime.combine(DAY, dt.time(12), dt.UTC),
    )
    return write_camt054(
        [notification],
        message_id=f"MSG-{e2e}",
        created_at=dt.datetime.combine(DAY, dt.time(12), dt.UTC),
    )


async def _open_tenant(config: Config, address: str) -> None:
    async with channel_as(config.state_path, address) as channel:
        ledger = money_pb2_grpc.LedgerServiceStub(channel)
        await ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=TENANT), timeout=10)
        await ledger.CreateAccounts(
            money_pb2.CreateAccountsRequest(
                tenant_id=TENANT,
                accounts=[
                    money_pb2.NewAccount(
                        account_id="bank",
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_ASSET,
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    ),
                    # money.recon.write_off_account_id: what a write-off posts against.
                    money_pb2.NewAccount(
                        account_id="recon-write-off",
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_EXPENSE,
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    ),
                ],
            ),
            timeout=10,
        )


@pytest.fixture(scope="module")
async def recon_console(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ReconConsole]:
    state_dir = tmp_path_factory.mktemp("recon-console")
    dev_certificates(state_dir)
    money_address = f"127.0.0.1:{free_port()}"
    console_port = free_port()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "log_format": "text"},
            "money": {"listen": money_address},
            "console": {
                "listen": f"127.0.0.1:{console_port}",
                "plane_addresses": {"money": money_address},
            },
        },
    )
    plane = MoneyPlane(config, listen=money_address)
    await plane.start(sweepers=False, relay=False, metrics=False)
    try:
        await _open_tenant(plane.config, money_address)
        async with serve_console(config, USERS, "recon-console") as running:
            yield ReconConsole(config, money_address, running.url, running.store)
    finally:
        await plane.stop()


@pytest.fixture
async def page(browser: Browser, recon_console: ReconConsole) -> AsyncIterator[Page]:
    async with browser_page(browser, recon_console.url) as opened:
        yield opened


async def _import(page: Page, content: bytes, name: str) -> None:
    await page.goto(f"/recon/statements?tenant={TENANT}")
    await page.get_by_label("Ledger bank account").fill("bank")
    upload: FilePayload = {"name": name, "mimeType": "application/xml", "buffer": content}
    await page.get_by_label("Statement file").set_input_files(files=[upload])
    await shot(page, "import-form")
    await page.get_by_role("button", name="Import").click()
    await page.wait_for_load_state()


async def _csrf(page: Page) -> str:
    headers = await page.locator("body").get_attribute("hx-headers")
    assert headers
    found = re.search(r'"X-CSRF-Token": "([^"]+)"', headers)
    assert found
    return found.group(1)


async def test_finance_operator_matches_a_stray_booking_by_hand(
    recon_console: ReconConsole, page: Page
) -> None:
    await signed_in(page, "fina")
    await _import(page, stray_booking(4_321, "STRAY-1"), "stray.xml")
    # The statement page: one line, matched to nothing.
    await expect(page.get_by_test_id("statement-lines")).to_have_text("1 (1 new)")
    await expect(page.get_by_test_id("line-match")).to_have_text("unmatched")
    await shot(page, "statement")
    [raised] = [b for b in await recon_console.breaks("open") if b.amount.amount_minor == 4_321]
    assert raised.break_class == "unmatched_bank"

    # The payment turns out to be expected after all: recorded late, under
    # another reference, so the import could not match it.
    async with recon_console.channel() as channel:
        await recon_pb2_grpc.ReconciliationServiceStub(channel).CreateExpectedPayments(
            recon_pb2.CreateExpectedPaymentsRequest(
                tenant_id=TENANT,
                expected_payments=[
                    recon_pb2.ExpectedPayment(
                        expected_id="invoice-77",
                        ledger_account_id="bank",
                        direction="credit",
                        amount=types_pb2.Money(amount_minor=4_321, currency="USD"),
                        date_from="2026-12-01",
                        date_to="2026-12-10",
                        end_to_end_id="INV-77",
                    )
                ],
            ),
            timeout=10,
        )

    await page.get_by_role("link", name="Open breaks").click()
    row = page.locator(f'tr[data-break-id="{raised.break_id}"]')
    await expect(row).to_contain_text("43.21 USD")
    await expect(row).to_contain_text("unmatched bank")
    await shot(page, "breaks")
    await row.get_by_role("link").click()
    await expect(page.get_by_test_id("break-state")).to_have_text("open")
    await expect(page.get_by_test_id("break-owner")).to_have_text(raised.owner)
    await expect(page.get_by_test_id("break-line")).to_contain_text("STRAY-1")
    await shot(page, "break-open")
    await page.get_by_role("radio", name="manual match").check()
    await page.get_by_label("Expected payment (manual match)", exact=True).fill("invoice-77")
    await page.get_by_label("Reason").fill("Invoice 77 paid without its reference")
    await page.get_by_role("button", name="Resolve").click()
    await expect(page.get_by_test_id("break-state")).to_have_text("resolved")
    await expect(page.get_by_test_id("break-resolved-by")).to_have_text("fina")
    await shot(page, "break-resolved")

    # The money plane has it resolved by the operator who signed in.
    [resolved] = [b for b in await recon_console.breaks() if b.break_id == raised.break_id]
    assert resolved.state == "resolved"
    assert resolved.resolution == "manual_match"
    assert resolved.resolved_by == "fina"
    assert resolved.note == "Invoice 77 paid without its reference"
    entries = recon_console.store.audit_entries(50, actor="fina")
    audited = [e for e in entries if e.action == "break.resolve"]
    assert len(audited) == 1 and audited[0].outcome == "ok"
    assert audited[0].before["state"] == "open"
    assert audited[0].after["state"] == "resolved"
    assert audited[0].after["resolved_by"] == "fina"
    imported = [e for e in entries if e.action == "statement.import"]
    assert len(imported) == 1 and imported[0].after["breaks"] == [raised.break_id]
    # Audited through console.actions.audited: the file before, the import after.
    assert imported[0].outcome == "ok"
    assert imported[0].before == {
        "file": "stray.xml",
        "bytes": len(stray_booking(4_321, "STRAY-1")),
    }
    assert imported[0].after["statements"] == [raised.statement_id]
    # The statements list shows the import and who made it.
    await page.goto(f"/recon/statements?tenant={TENANT}")
    await expect(page.locator("tr[data-statement-id]").first).to_contain_text("fina")
    await shot(page, "statements")


async def test_reviewer_cannot_resolve_and_auditor_sees_no_form(
    recon_console: ReconConsole, browser: Browser
) -> None:
    async with channel_as(recon_console.config.state_path, recon_console.money_address) as ch:
        imported = await recon_pb2_grpc.ReconciliationServiceStub(ch).ImportStatement(
            recon_pb2.ImportStatementRequest(
                tenant_id=TENANT,
                ledger_account_id="bank",
                content=stray_booking(999, "STRAY-2"),
                actor="ops-tool",
            ),
            timeout=10,
        )
    [raised] = imported.breaks
    path = f"/recon/{TENANT}/breaks/{raised.break_id}"

    async with browser_page(browser, recon_console.url) as page:
        await signed_in(page, "rita")
        await expect(page.get_by_role("link", name="Reconciliation")).to_have_count(0)
        seen = await page.goto(path)
        assert seen is not None and seen.status == 403
        await shot(page, "reviewer-refused")
        answer = await page.request.post(
            f"{path}/resolve",
            form={"csrf_token": await _csrf(page), "resolution": "accepted", "note": "fine"},
        )
        assert answer.status == 403
        assert answer.headers["x-triplane-reason"] == "PERMISSION_DENIED"

    async with browser_page(browser, recon_console.url) as page:
        await signed_in(page, "aldo")
        await page.goto(path)
        await expect(page.get_by_test_id("break-state")).to_have_text("open")
        await expect(page.get_by_role("button", name="Resolve")).to_have_count(0)
        await page.goto(f"/recon/statements?tenant={TENANT}")
        await expect(page.get_by_role("button", name="Import")).to_have_count(0)
        await shot(page, "auditor-statements")

    [still] = [b for b in await recon_console.breaks() if b.break_id == raised.break_id]
    assert still.state == "open" and not still.resolved_by
    refused = recon_console.store.audit_entries(50, actor="rita")
    assert any(e.action == "permission.refused" and e.outcome == "denied" for e in refused)


async def test_a_resolution_without_a_reason_changes_nothing(
    recon_console: ReconConsole, page: Page
) -> None:
    async with recon_console.channel() as ch:
        imported = await recon_pb2_grpc.ReconciliationServiceStub(ch).ImportStatement(
            recon_pb2.ImportStatementRequest(
                tenant_id=TENANT,
                ledger_account_id="bank",
                content=stray_booking(1_500, "STRAY-3"),
                actor="ops-tool",
            ),
            timeout=10,
        )
    [raised] = imported.breaks
    path = f"/recon/{TENANT}/breaks/{raised.break_id}"
    await signed_in(page, "fina")
    await page.goto(path)
    token = await _csrf(page)
    no_note = await page.request.post(
        f"{path}/resolve", form={"csrf_token": token, "resolution": "accepted", "note": " "}
    )
    assert no_note.status == 400
    assert no_note.headers["x-triplane-reason"] == "NOTE_REQUIRED"
    assert no_note.headers["x-triplane-field"] == "note"
    bad_filter = await page.request.get(f"/recon?tenant={TENANT}&break_class=nonsense")
    assert bad_filter.status == 400
    assert bad_filter.headers["x-triplane-field"] == "break_class"
    [still] = [b for b in await recon_console.breaks() if b.break_id == raised.break_id]
    assert still.state == "open" and not still.resolved_by


@pytest.mark.parametrize("username", ["fina", "aldo"])
async def test_the_recon_pages_are_accessible(
    recon_console: ReconConsole, page: Page, username: str
) -> None:
    """A label on every control, one <h1> and one <main>, every button
    reached by Tab: with the forms (finance operator) and without (auditor)."""
    async with recon_console.channel() as ch:
        imported = await recon_pb2_grpc.ReconciliationServiceStub(ch).ImportStatement(
            recon_pb2.ImportStatementRequest(
                tenant_id=TENANT,
                ledger_account_id="bank",
                content=stray_booking(1_234, f"A11Y-{username}"),
                actor="ops-tool",
            ),
            timeout=10,
        )
    [raised] = imported.breaks
    [statement] = imported.statements
    await signed_in(page, username)
    failures: dict[str, Any] = {}
    for path in (
        f"/recon?tenant={TENANT}",
        f"/recon/{TENANT}/breaks/{raised.break_id}",
        f"/recon/statements?tenant={TENANT}",
        f"/recon/{TENANT}/statements/{statement.statement_id}",
    ):
        problems = await accessibility_problems(page, path)
        if problems:
            failures[path] = problems
    await shot(page, "accessible")
    assert failures == {}
