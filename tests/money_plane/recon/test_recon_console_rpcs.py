"""The read RPCs the console's Reconciliation page calls: GetBreak (a break
with its statement line and expected payment) and ListStatements (newest
import first, paged, a foreign page token refused naming the field), on
real SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from money_helpers import Kit
from recon_samples import camt054, expected, line

from money_plane.recon.reconciler import Reconciler
from money_plane.recon.service import ReconciliationServicer
from triplane.money.v1 import recon_pb2
from triplane.runtime.errors import InvalidArgument, NotFound


def servicer_for(recon: Reconciler) -> ReconciliationServicer:
    async def recon_for(tenant_id: str) -> Reconciler:
        return recon

    return ReconciliationServicer(recon_for)


async def test_get_break_carries_its_line_and_expected_payment(kit: Kit, recon: Reconciler) -> None:
    servicer = servicer_for(recon)
    await recon.create_expected_payments(kit.tenant, [expected("e1", 1000, e2e="E-1")])
    # Matched by reference, amount outside the bounds: a break naming both.
    result = await recon.import_statement(
        kit.tenant, "bank", camt054(line(1500, e2e="E-1"), line(77, e2e="NOBODY")), actor="ana"
    )
    by_class = {b.break_class.value: b for b in result.breaks}
    mismatch = by_class["amount_mismatch"]
    got = await servicer.GetBreak(
        recon_pb2.GetBreakRequest(tenant_id=kit.tenant, break_id=mismatch.break_id),
        None,  # type: ignore[arg-type]
    )
    assert got.recon_break.break_id == mismatch.break_id
    assert got.recon_break.owner and got.recon_break.sla_tier
    assert got.line.amount.amount_minor == 1500 and got.line.end_to_end_id == "E-1"
    assert got.expected_payment.expected_id == "e1"
    stray = by_class["unmatched_bank"]
    alone = await servicer.GetBreak(
        recon_pb2.GetBreakRequest(tenant_id=kit.tenant, break_id=stray.break_id),
        None,  # type: ignore[arg-type]
    )
    assert alone.HasField("line") and not alone.HasField("expected_payment")
    with pytest.raises(NotFound) as missing:
        await servicer.GetBreak(
            recon_pb2.GetBreakRequest(tenant_id=kit.tenant, break_id="brk_nope"),
            None,  # type: ignore[arg-type]
        )
    assert missing.value.reason == "BREAK_NOT_FOUND" and missing.value.field == "break_id"


async def test_list_statements_newest_first_paged(kit: Kit, recon: Reconciler) -> None:
    servicer = servicer_for(recon)
    made = []
    for n in range(3):
        kit.clock.advance(1.0)
        imported = await recon.import_statement(
            kit.tenant, "bank", camt054(line(100 + n, e2e=f"S-{n}")), actor=f"op{n}"
        )
        made.append(imported.statements[0].statement_id)
    first = await servicer.ListStatements(
        recon_pb2.ListStatementsRequest(tenant_id=kit.tenant, page_size=2),
        None,  # type: ignore[arg-type]
    )
    assert [s.statement_id for s in first.statements] == [made[2], made[1]]
    assert [s.imported_by for s in first.statements] == ["op2", "op1"]
    assert first.next_page_token
    rest = await servicer.ListStatements(
        recon_pb2.ListStatementsRequest(
            tenant_id=kit.tenant, page_size=2, page_token=first.next_page_token
        ),
        None,  # type: ignore[arg-type]
    )
    assert [s.statement_id for s in rest.statements] == [made[0]]
    assert not rest.next_page_token
    for bad in ("garbage", "0:x", "12:", "-5:stm"):
        with pytest.raises(InvalidArgument) as refused:
            await servicer.ListStatements(
                recon_pb2.ListStatementsRequest(tenant_id=kit.tenant, page_token=bad),
                None,  # type: ignore[arg-type]
            )
        assert refused.value.reason == "PAGE_TOKEN_INVALID"
        assert refused.value.field == "page_token"


async def test_list_breaks_oldest_first_across_pages(kit: Kit, recon: Reconciler) -> None:
    servicer = servicer_for(recon)
    raised = []
    for n in range(5):
        kit.clock.advance(60.0)
        imported = await recon.import_statement(
            kit.tenant, "bank", camt054(line(10 + n, e2e=f"OLD-{n}")), actor="ops"
        )
        raised.extend(b.break_id for b in imported.breaks)
    seen: list[str] = []
    token = ""
    while True:
        page = await servicer.ListBreaks(
            recon_pb2.ListBreaksRequest(
                tenant_id=kit.tenant, state="open", page_size=2, page_token=token, order="oldest"
            ),
            None,  # type: ignore[arg-type]
        )
        seen.extend(b.break_id for b in page.breaks)
        token = page.next_page_token
        if not token:
            break
    # Detection order, whatever the ids' order.
    assert seen == raised
    for field, request in (
        ("order", recon_pb2.ListBreaksRequest(tenant_id=kit.tenant, order="newest")),
        (
            "page_token",
            recon_pb2.ListBreaksRequest(tenant_id=kit.tenant, order="oldest", page_token="brk_x"),
        ),
        ("state", recon_pb2.ListBreaksRequest(tenant_id=kit.tenant, order="oldest", state="x")),
    ):
        with pytest.raises(InvalidArgument) as refused:
            await servicer.ListBreaks(request, None)  # type: ignore[arg-type]
        assert refused.value.field == field


async def test_describe_resolution_is_the_transfer_resolve_break_posts(
    kit: Kit, recon: Reconciler
) -> None:
    servicer = servicer_for(recon)
    imported = await recon.import_statement(kit.tenant, "bank", camt054(line(640, e2e="W-1")))
    [stray] = imported.breaks
    described = await servicer.DescribeResolution(
        recon_pb2.DescribeResolutionRequest(
            tenant_id=kit.tenant, break_id=stray.break_id, resolution="write_off"
        ),
        None,  # type: ignore[arg-type]
    )
    command = await recon.resolution_command(kit.tenant, stray.break_id, "write_off")
    assert (described.debit_account_id, described.credit_account_id) == (
        command.debit_account_id,
        command.credit_account_id,
    )
    assert described.credit_account_id == recon.config.write_off_account_id
    assert (described.amount.amount_minor, described.amount.currency) == (640, "USD")
    assert described.idempotency_key == f"recon-writeoff-{stray.break_id}"
    assert not described.reverses_entry_id
    for request, reason, field in (
        (
            recon_pb2.DescribeResolutionRequest(
                tenant_id=kit.tenant, break_id=stray.break_id, resolution="accepted"
            ),
            "RESOLUTION_INVALID",
            "resolution",
        ),
        (
            recon_pb2.DescribeResolutionRequest(
                tenant_id=kit.tenant, break_id=stray.break_id, resolution="reversal"
            ),
            "FIELD_REQUIRED",
            "entry_id",
        ),
    ):
        with pytest.raises(InvalidArgument) as refused:
            await servicer.DescribeResolution(request, None)  # type: ignore[arg-type]
        assert (refused.value.reason, refused.value.field) == (reason, field)
    with pytest.raises(NotFound) as missing:
        await servicer.DescribeResolution(
            recon_pb2.DescribeResolutionRequest(
                tenant_id=kit.tenant, break_id="brk_nope", resolution="write_off"
            ),
            None,  # type: ignore[arg-type]
        )
    assert missing.value.reason == "BREAK_NOT_FOUND"
    # Describing posts nothing: the break is still open.
    assert (await recon.get_break(kit.tenant, stray.break_id)).state.value == "open"
