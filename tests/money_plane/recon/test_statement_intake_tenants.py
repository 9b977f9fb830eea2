"""The statement intake's import of one bank document (the platform's account
at the bank, shared by tenants): each booking into the tenant whose payout
its end-to-end id names (rail_refs), a statement split between tenants
without the account's balances, one tenant's statement whole with them
(checked), a booking no payout names left out; importing it again adds
nothing; a document it cannot read is refused naming where. Real SQLite and
PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from money_helpers import NO_CONSTRAINT, BackendPlace, Kit, unique_tenant
from recon_samples import camt053, line, statement

from money_plane.formats.statement import Sign
from money_plane.payouts.codec import encode_payout_event
from money_plane.payouts.service import Payouts, load_cipher
from money_plane.rails import store as rows
from money_plane.recon.intake import StatementIntake
from money_plane.recon.model import BreakClass
from money_plane.recon.reconciler import Reconciler
from triplane.runtime.config import RailsConfig, ReconConfig
from triplane.runtime.errors import InvalidArgument

BANK = "payouts_bank:USD"


@pytest.fixture
async def tenants(kit: Kit) -> tuple[str, str]:
    other = unique_tenant()
    await kit.ledger.create_tenant(other, "Other tenant")
    for tenant in (kit.tenant, other):
        await kit.open((BANK, "USD", NO_CONSTRAINT, 0), tenant=tenant)
    return kit.tenant, other


@pytest.fixture
async def intake(kit: Kit, backend_place: BackendPlace) -> StatementIntake:
    recon = Reconciler(kit.ledger, ReconConfig(check_ledger_balance=False), kit.clock)
    await recon.start()
    config = kit.ledger.config.payouts
    payouts = Payouts(
        kit.ledger, load_cipher(config, Path(backend_place.state_dir)), config, encode_payout_event
    )
    # No bank is called: the test hands the intake its documents.
    made = StatementIntake(recon, payouts, RailsConfig(bank_url="http://127.0.0.1:9"), kit.clock)
    await made.start()
    return made


async def _sent(kit: Kit, tenant: str, e2e: str, amount: int) -> None:
    """What a rail stores when it sends a payout: its reference's tenant."""
    ref = rows.Ref(tenant, f"po-{e2e}", e2e, amount)
    now = kit.clock.now_us()
    await kit.ledger.run_on_writer(
        lambda: rows.remember(kit.ledger.store, e2e, "instant", ref, now)
    )


def _lines(kit: Kit, tenant: str) -> list[tuple[str, int]]:
    return [
        (str(e2e), int(amount))
        for e2e, amount in kit.probe.rows(
            "SELECT end_to_end_id, amount_minor FROM statement_lines WHERE tenant_id = %s "
            "ORDER BY amount_minor",
            (tenant,),
        )
    ]


def _breaks(kit: Kit, tenant: str) -> list[tuple[str, int]]:
    return [
        (str(cls), int(amount))
        for cls, amount in kit.probe.rows(
            "SELECT break_class, amount_minor FROM breaks WHERE tenant_id = %s "
            "ORDER BY amount_minor",
            (tenant,),
        )
    ]


@pytest.mark.parametrize("backend_place", ["sqlite", "postgres"], indirect=True)
async def test_a_shared_statement_is_split_by_tenant(
    kit: Kit, tenants: tuple[str, str], intake: StatementIntake
) -> None:
    first, second = tenants
    await _sent(kit, first, "E2E-A", 1_000)
    await _sent(kit, second, "E2E-B", 2_000)
    shared = statement(
        [
            line(1_000, e2e="E2E-A", sign=Sign.DEBIT),
            line(2_000, e2e="E2E-B", sign=Sign.DEBIT),
            line(500, e2e="NOT-OURS", sign=Sign.DEBIT),
        ],
        opening=100_000,
    )
    data = camt053(shared)
    imported = await intake.import_document(data)
    assert (imported.lines_new, imported.unattributed) == (2, 1)
    assert _lines(kit, first) == [("E2E-A", 1_000)]
    assert _lines(kit, second) == [("E2E-B", 2_000)]
    # Each tenant's part has no balances (its lines do not add up to the
    # account's): no balance_mismatch; its booking nothing expected is a break.
    assert _breaks(kit, first) == [(BreakClass.UNMATCHED_BANK.value, 1_000)]
    assert _breaks(kit, second) == [(BreakClass.UNMATCHED_BANK.value, 2_000)]
    closing = kit.probe.scalar(
        "SELECT COUNT(*) FROM statements WHERE tenant_id = %s AND closing_minor IS NULL", (first,)
    )
    assert int(closing) == 1

    again = await intake.import_document(data)
    assert (again.lines_new, again.breaks) == (0, 0)
    assert len(_lines(kit, first)) == len(_lines(kit, second)) == 1


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_one_tenants_statement_keeps_its_balances_and_they_are_checked(
    kit: Kit, tenants: tuple[str, str], intake: StatementIntake
) -> None:
    first, _ = tenants
    await _sent(kit, first, "E2E-C", 3_000)
    # Opening 10,000, a debit of 3,000: the closing should be 7,000.
    wrong = statement([line(3_000, e2e="E2E-C", sign=Sign.DEBIT)], opening=10_000, closing=8_000)
    imported = await intake.import_document(camt053(wrong))
    assert imported.unattributed == 0
    classes = {cls for cls, _ in _breaks(kit, first)}
    assert BreakClass.BALANCE_MISMATCH.value in classes
    assert (first, 1_000) in {
        (tenant, int(amount))
        for tenant, amount in kit.probe.rows(
            "SELECT tenant_id, amount_minor FROM breaks WHERE break_class = %s",
            (BreakClass.BALANCE_MISMATCH.value,),
        )
    }


@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_an_unreadable_document_is_refused_naming_where(
    kit: Kit, tenants: tuple[str, str], intake: StatementIntake
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await intake.import_document(b"<Document><BkToCstmrStmt>")
    assert refused.value.reason
    assert refused.value.field
    assert int(kit.probe.scalar("SELECT COUNT(*) FROM statements")) == 0
