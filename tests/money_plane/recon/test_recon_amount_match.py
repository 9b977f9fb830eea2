"""Matching by amount and date alone (no reference), on real SQLite and
PostgreSQL: which open expected payment a line takes when several are near
its amount. Pins the choice the matcher makes from the candidates' terms
(read without the whole payment; only the chosen one is read whole)."""

from __future__ import annotations

from money_helpers import Kit
from recon_samples import camt053, expected, line, statement

from money_plane.recon.model import Direction, Rule
from money_plane.recon.reconciler import Reconciler


async def test_amount_and_date_choose_the_nearest_free_candidate_in_its_window(
    kit: Kit, recon: Reconciler
) -> None:
    await recon.create_expected_payments(
        kit.tenant,
        [
            # Taken by its reference earlier in the same import.
            expected("taken", 7000, e2e="E2E-T"),
            # The right amount, the wrong way.
            expected("debit", 7000, direction=Direction.DEBIT),
            # The right amount, its window far from the booking day.
            expected("far", 7000, date_from="2026-11-20", date_to="2026-11-21"),
            # The right amount, two days after the booking day: inside
            # date_window_days, outside its own window.
            expected("soon", 7000, date_from="2026-12-06", date_to="2026-12-06"),
            # 20 off, bounds around it, its window on the booking day.
            expected("inside", 7020, low=6900, high=7100),
            expected("exact", 8000),
        ],
    )
    result = await recon.import_statement(
        kit.tenant,
        "bank",
        camt053(
            statement(
                [
                    line(7000, e2e="E2E-T"),
                    line(7000),
                    line(7000),
                    line(7000),
                    line(8000),
                ]
            )
        ),
    )
    by_amount = [
        (m.expected_ids, m.confidence) for m in result.matches if m.rule is Rule.AMOUNT_DATE
    ]
    # In the statement's order: the window first, then the amount's distance;
    # each payment once; an exact amount in the window is the surer match.
    assert by_amount == [(("inside",), 0.5), (("soon",), 0.5), (("exact",), 0.7)]
    [(_, taken)] = [
        (m.expected_ids, m.rule) for m in result.matches if m.expected_ids == ("taken",)
    ]
    assert taken is Rule.END_TO_END
    # The third 7000 finds nothing free: a bank line nothing explains; and
    # the statement closes after "far"'s window and grace: never booked.
    assert {(b.break_class.value, b.expected_id) for b in result.breaks} == {
        ("unmatched_bank", ""),
        ("unmatched_ledger", "far"),
    }


async def test_a_line_and_a_payment_with_different_end_to_end_ids_never_match_by_amount(
    kit: Kit, recon: Reconciler
) -> None:
    """The bench's 50,000-line world drew a stray booking (an end-to-end id
    nobody expected) of the very amount of an open payment in its window:
    matched by amount, the payment's own line then counted as its duplicate.
    Two end-to-end ids that differ are two payments; a line without one may
    still match by amount and date."""
    await recon.create_expected_payments(
        kit.tenant,
        [expected("mine", 1_806_203, e2e="E2E-MINE"), expected("plain", 4_400, e2e="E2E-P")],
    )
    stray = await recon.import_statement(
        kit.tenant, "bank", camt053(statement([line(1_806_203, e2e="E2E-STRAY")]))
    )
    assert stray.matches == []
    assert [(b.break_class.value, b.expected_id) for b in stray.breaks] == [("unmatched_bank", "")]
    own = await recon.import_statement(
        kit.tenant,
        "bank",
        camt053(statement([line(1_806_203, e2e="E2E-MINE"), line(4_400)], opening=1_806_203)),
    )
    assert own.breaks == []
    assert sorted((m.rule, m.expected_ids) for m in own.matches) == [
        (Rule.AMOUNT_DATE, ("plain",)),
        (Rule.END_TO_END, ("mine",)),
    ]
