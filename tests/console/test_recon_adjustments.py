"""Write-offs from the Reconciliation page decided by the policy plane, in a
real browser (Debian's chromium) against running money and policy planes
(their gRPC servers, mutual TLS, the console's own identity): no token is
pasted anywhere. A finance operator writes off a small stray credit and the
money plane's ListBreaks has it resolved with the ledger entry posted under
the break's key; a large one waits for a second approver: the requester
cannot approve its case, a reviewer approves it on the Cases page, and the
resolution is then applied once with the approval's token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace

import grpc
import pytest
from playwright.async_api import Browser, Page, expect

from console.pages.recon import _adjustment_request
from console.planes import Planes as ConsolePlanes
from console.store import ConsoleStore
from money_plane.app import MoneyPlane
from policy_plane.app import PolicyPlane, build_plane
from tests.tls_helpers import channel_as, dev_certificates
from triplane.money.v1 import money_pb2, money_pb2_grpc, recon_pb2, recon_pb2_grpc
from triplane.policy.v1 import policy_pb2
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port

from .conftest import serve_console, shot, signed_in
from .test_recon_browser import TENANT, _csrf, _open_tenant, stray_booking

# vera is a finance operator who also reviews; rita reviews.
USERS = {
    "fina": ["finance_operator"],
    "vera": ["finance_operator", "reviewer"],
    "rita": ["reviewer"],
}
# The default bundle's params.adjustment_review_minor: above it, four eyes.
REVIEW_ABOVE_MINOR = 100_000


@dataclass
class Planes:
    config: Config
    money_address: str
    policy: PolicyPlane
    url: str
    store: ConsoleStore

    def channel(self) -> grpc.aio.Channel:
        return channel_as(self.config.state_path, self.money_address)

    async def break_(self, break_id: str) -> recon_pb2.ReconBreak:
        async with self.channel() as channel:
            answer = await recon_pb2_grpc.ReconciliationServiceStub(channel).ListBreaks(
                recon_pb2.ListBreaksRequest(tenant_id=TENANT), timeout=10
            )
        [found] = [b for b in answer.breaks if b.break_id == break_id]
        result: recon_pb2.ReconBreak = found
        return result

    async def entry(self, entry_id: str) -> money_pb2.Entry:
        async with self.channel() as channel:
            answer = await money_pb2_grpc.LedgerServiceStub(channel).GetEntry(
                money_pb2.GetEntryRequest(tenant_id=TENANT, entry_id=entry_id), timeout=10
            )
        entry: money_pb2.Entry = answer.entry
        return entry

    async def stray(self, amount_minor: int, e2e: str) -> recon_pb2.ReconBreak:
        async with self.channel() as channel:
            imported = await recon_pb2_grpc.ReconciliationServiceStub(channel).ImportStatement(
                recon_pb2.ImportStatementRequest(
                    tenant_id=TENANT,
                    ledger_account_id="bank",
                    content=stray_booking(amount_minor, e2e),
                    actor="ops-tool",
                ),
                timeout=10,
            )
        [raised] = imported.breaks
        result: recon_pb2.ReconBreak = raised
        return result


@pytest.fixture(scope="module")
async def planes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Planes]:
    state_dir = tmp_path_factory.mktemp("recon-adjustments")
    dev_certificates(state_dir)
    money_address = f"127.0.0.1:{free_port()}"
    policy_address = f"127.0.0.1:{free_port()}"
    console_port = free_port()
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "log_format": "text"},
            "money": {"listen": money_address},
            "policy": {"listen": policy_address},
            "console": {
                "listen": f"127.0.0.1:{console_port}",
                "plane_addresses": {"money": money_address, "policy": policy_address},
            },
        },
    )
    money = MoneyPlane(config, listen=money_address)
    await money.start(sweepers=False, relay=False, metrics=False)
    policy = build_plane(config, listen=policy_address)
    await policy.start()
    try:
        await _open_tenant(money.config, money_address)
        await policy.engine.create_tenant(TENANT, "Recon Acme")
        async with serve_console(config, USERS, "recon-adjust-console") as running:
            yield Planes(config, money_address, policy, running.url, running.store)
    finally:
        await policy.stop()
        await money.stop()


async def _page(browser: Browser, planes: Planes, username: str) -> Page:
    context = await browser.new_context(base_url=planes.url)
    page = await context.new_page()
    await signed_in(page, username)
    return page


async def _write_off(page: Page, break_id: str, reason: str) -> None:
    await page.goto(f"/recon/{TENANT}/breaks/{break_id}")
    await expect(page.get_by_label("Decision token")).to_have_count(0)
    await page.get_by_role("radio", name="write off").check()
    await page.get_by_label("Reason").fill(reason)
    await page.get_by_role("button", name="Resolve").click()
    await page.wait_for_load_state()


async def test_a_small_write_off_is_posted_with_no_token_pasted(
    planes: Planes, browser: Browser
) -> None:
    raised = await planes.stray(250, "ADJ-SMALL")
    page = await _page(browser, planes, "fina")
    try:
        await _write_off(page, raised.break_id, "Bank fee credit below the threshold")
        await expect(page.get_by_test_id("break-resolution")).to_have_text("write off")
        await shot(page, "written-off")
    finally:
        await page.context.close()
    resolved = await planes.break_(raised.break_id)
    assert (resolved.state, resolved.resolution, resolved.resolved_by) == (
        "resolved",
        "write_off",
        "fina",
    )
    entry = await planes.entry(resolved.resolution_entry_id)
    assert entry.amount.amount_minor == 250
    assert entry.idempotency_key == f"recon-writeoff-{raised.break_id}"
    # The decision is the policy plane's, logged with who asked and why.
    audited = [
        e
        for e in planes.store.audit_entries(50, actor="fina")
        if e.target.endswith(raised.break_id)
    ]
    decided = [e for e in audited if e.action == "break.adjustment.decide"]
    assert [e.outcome for e in decided] == ["allow"]
    record = (
        await planes.policy.engine.get_decision(TENANT, decided[0].after["decision_id"])
    ).record
    assert record.input.adjustment is not None
    assert record.input.adjustment.requested_by == "fina"
    assert record.input.adjustment.break_id == raised.break_id
    assert [e.outcome for e in audited if e.action == "break.resolve"] == ["ok"]


async def test_a_large_write_off_waits_for_a_second_approver(
    planes: Planes, browser: Browser
) -> None:
    amount = REVIEW_ABOVE_MINOR + 50_000
    raised = await planes.stray(amount, "ADJ-LARGE")
    vera = await _page(browser, planes, "vera")
    rita = await _page(browser, planes, "rita")
    try:
        await _write_off(vera, raised.break_id, "Duplicate bank credit, refunded by the bank")
        await expect(vera.get_by_test_id("awaiting")).to_have_text("Waiting for a second approver")
        await shot(vera, "awaiting")
        case_path = await vera.get_by_test_id("case-link").get_attribute("href")
        assert case_path
        case_id = case_path.rsplit("/", 1)[1]
        # Applying before the approval posts nothing.
        await vera.get_by_role("button", name="Apply the approved write off").click()
        await expect(vera.locator("body")).to_contain_text("CASE_NOT_APPROVED")
        assert (await planes.break_(raised.break_id)).state == "open"

        # The requester, a reviewer too, cannot take its own case: it stays open.
        await vera.goto(case_path)
        await expect(vera.get_by_test_id("decision-input")).to_contain_text(raised.break_id)
        await vera.get_by_role("button", name="Claim this case").click()
        await expect(vera.locator("body")).to_contain_text("CASE_REVIEWER_IS_REQUESTER")
        await shot(vera, "own-case-refused")
        assert planes.policy.engine.cases.get(TENANT, case_id).status == "open"

        # A second operator approves it on the Cases page.
        await rita.goto(case_path)
        await rita.get_by_role("button", name="Claim this case").click()
        await rita.get_by_role("radio", name="approve").check()
        await rita.get_by_label("Reason").fill("Statement and the bank's letter checked")
        await rita.get_by_role("button", name="Resolve").click()
        await expect(rita.get_by_test_id("case-resolution")).to_have_text("approve")
        await shot(rita, "approved")

        # The requester applies it with the approval's token.
        await vera.goto(f"/recon/{TENANT}/breaks/{raised.break_id}?case={case_id}")
        await vera.get_by_role("button", name="Apply", exact=True).click()
        await expect(vera.get_by_test_id("break-resolution")).to_have_text("write off")
        await shot(vera, "applied")
        resolved = await planes.break_(raised.break_id)
        # Applying again posts nothing more: the break keeps its one entry.
        again = await vera.request.post(
            f"/recon/{TENANT}/breaks/{raised.break_id}/apply",
            form={"csrf_token": await _csrf(vera), "case_id": case_id},
        )
        assert again.ok
    finally:
        await vera.context.close()
        await rita.context.close()
    assert (resolved.resolution, resolved.resolved_by) == ("write_off", "vera")
    assert (await planes.break_(raised.break_id)).resolution_entry_id == (
        resolved.resolution_entry_id
    )
    entry = await planes.entry(resolved.resolution_entry_id)
    assert entry.amount.amount_minor == amount
    assert entry.idempotency_key == f"recon-writeoff-{raised.break_id}"
    case = planes.policy.engine.cases.get(TENANT, case_id)
    approval = (await planes.policy.engine.get_decision(TENANT, case.approval_decision_id)).record
    assert approval.review is not None and approval.review.reviewer == "rita"
    steps = [
        (e.action, e.outcome)
        for e in reversed(planes.store.audit_entries(100, actor="vera"))
        if e.target.endswith(raised.break_id)
    ]
    assert steps == [
        ("break.adjustment.decide", "review"),
        ("break.resolve", "refused"),
        ("break.resolve", "ok"),
        ("break.resolve", "ok"),
    ]


async def test_the_console_asks_about_the_transfer_the_money_plane_posts(planes: Planes) -> None:
    """The console holds no copy of the plane's write-off account: configured
    with another one than the money plane's, it still asks the policy plane
    about the transfer ResolveBreak posts (DescribeResolution), so the token
    it gets is accepted; a token for the console's own idea is refused."""
    raised = await planes.stray(300, "ADJ-ELSEWHERE")
    console_config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(planes.config.runtime.state_dir), "log_format": "text"},
            "money": {"recon": {"write_off_account_id": "console-stale-write-off"}},
            "console": {
                "plane_addresses": {
                    "money": planes.money_address,
                    "policy": planes.config.console.plane_addresses.policy,
                }
            },
        },
    )
    assert console_config.money.recon.write_off_account_id != (
        planes.config.money.recon.write_off_account_id
    )
    console_planes = ConsolePlanes(console_config)
    console = SimpleNamespace(config=console_config, planes=console_planes)
    wanted = recon_pb2.ResolveBreakRequest(resolution="write_off", note="Bank fee credit")
    asked = await _adjustment_request(console, TENANT, raised, wanted, "fina")
    # A stray credit: the bank account debited, the plane's write-off credited.
    assert (asked.debit_account_id, asked.credit_account_id) == ("bank", "recon-write-off")
    assert asked.amount.amount_minor == 300 and asked.amount.currency == "USD"
    assert asked.ledger_idempotency_key == f"recon-writeoff-{raised.break_id}"

    # What the console's old copy asked: a token for another transfer.
    stale = policy_pb2.DecideAdjustmentRequest()
    stale.CopyFrom(asked)
    stale.idempotency_key = f"{asked.idempotency_key}-stale"
    stale.credit_account_id = "console-stale-write-off"
    policy = console_planes.policy()
    stale_token = (await policy.DecideAdjustment(stale, timeout=10)).decision.decision_token
    assert stale_token
    recon = console_planes.recon()
    with pytest.raises(grpc.aio.AioRpcError):
        await recon.ResolveBreak(
            recon_pb2.ResolveBreakRequest(
                tenant_id=TENANT,
                break_id=raised.break_id,
                resolution="write_off",
                actor="fina",
                decision_token=stale_token,
            ),
            timeout=10,
        )
    assert (await planes.break_(raised.break_id)).state == "open"

    decided = (await policy.DecideAdjustment(asked, timeout=10)).decision
    assert decided.outcome == policy_pb2.OUTCOME_ALLOW
    resolved = (
        await recon.ResolveBreak(
            recon_pb2.ResolveBreakRequest(
                tenant_id=TENANT,
                break_id=raised.break_id,
                resolution="write_off",
                actor="fina",
                decision_token=decided.decision_token,
            ),
            timeout=10,
        )
    ).recon_break
    entry = await planes.entry(resolved.resolution_entry_id)
    assert {p.account_id for p in entry.postings} == {"bank", "recon-write-off"}

    # A reversal of that entry (for another break) is described the other way round.
    other = await planes.stray(777, "ADJ-REVERSE")
    reversal = await recon.DescribeResolution(
        recon_pb2.DescribeResolutionRequest(
            tenant_id=TENANT,
            break_id=other.break_id,
            resolution="reversal",
            entry_id=resolved.resolution_entry_id,
        ),
        timeout=10,
    )
    assert (reversal.debit_account_id, reversal.credit_account_id) == ("recon-write-off", "bank")
    assert reversal.reverses_entry_id == resolved.resolution_entry_id
    assert reversal.idempotency_key == f"recon-reversal-{other.break_id}"
