"""Reconciliation records to and from the protobuf contract (recon.proto)."""

from __future__ import annotations

from typing import Any

from money_plane.domain import Command
from money_plane.recon.model import (
    Break,
    BreakState,
    Direction,
    ExpectedPayment,
    ImportResult,
    Match,
    StatementRecord,
)
from triplane.money.v1 import recon_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.bus import OutgoingEvent, make_envelope, subject_for
from triplane.runtime.errors import InvalidArgument

BREAK_EVENT = "money.recon.break"


def expected_payment(message: pb.ExpectedPayment, where: str) -> ExpectedPayment:
    try:
        direction = Direction(message.direction)
    except ValueError as exc:
        raise InvalidArgument(
            "DIRECTION_INVALID", "direction is credit or debit", f"{where}.direction"
        ) from exc
    wire.check_currency(message.amount.currency, f"{where}.amount.currency")
    return ExpectedPayment(
        tenant_id="",
        expected_id=message.expected_id,
        ledger_account_id=message.ledger_account_id,
        direction=direction,
        currency=message.amount.currency,
        amount_minor=message.amount.amount_minor,
        amount_min_minor=message.amount_min_minor,
        amount_max_minor=message.amount_max_minor,
        date_from=message.date_from,
        date_to=message.date_to,
        end_to_end_id=message.end_to_end_id,
        instruction_id=message.instruction_id,
        bank_reference=message.bank_reference,
        remittance_reference=message.remittance_reference,
        batch_id=message.batch_id,
        ledger_entry_id=message.ledger_entry_id,
        description=message.description,
    )


def expected_message(e: ExpectedPayment) -> pb.ExpectedPayment:
    return pb.ExpectedPayment(
        expected_id=e.expected_id,
        ledger_account_id=e.ledger_account_id,
        direction=e.direction.value,
        amount=wire.money(e.amount_minor, e.currency),
        amount_min_minor=e.amount_min_minor,
        amount_max_minor=e.amount_max_minor,
        date_from=e.date_from,
        date_to=e.date_to,
        end_to_end_id=e.end_to_end_id,
        instruction_id=e.instruction_id,
        bank_reference=e.bank_reference,
        remittance_reference=e.remittance_reference,
        batch_id=e.batch_id,
        ledger_entry_id=e.ledger_entry_id,
        description=e.description,
        state=e.state.value,
    )


def statement(s: StatementRecord) -> pb.ReconStatement:
    return pb.ReconStatement(
        statement_id=s.statement_id,
        kind=s.kind,
        message_name=s.message_name,
        bank_statement_id=s.bank_statement_id,
        bank_account_last4=s.bank_account,
        ledger_account_id=s.ledger_account_id,
        currency=s.currency,
        line_count=s.line_count,
        new_line_count=s.new_line_count,
        has_balances=s.closing_minor is not None,
        opening_minor=s.opening_minor or 0,
        closing_minor=s.closing_minor or 0,
        closing_date=s.closing_date,
        balances_agree=bool(s.balances_agree),
        ledger_checked=s.ledger_closing_minor is not None,
        ledger_closing_minor=s.ledger_closing_minor or 0,
        imported_at=wire.timestamp(s.imported_at_us),
        file_sha256=s.file_sha256,
        imported_by=s.imported_by,
    )


def line(row: tuple[Any, ...]) -> pb.ReconStatementLine:
    fp, position, amount, currency, direction, booking, value, status, e2e, match_id = row
    return pb.ReconStatementLine(
        fingerprint=fp,
        position=int(position),
        amount=wire.money(int(amount), currency),
        direction=direction,
        booking_date=booking,
        value_date=value,
        status=status,
        end_to_end_id=e2e,
        match_id=match_id,
    )


def match(m: Match) -> pb.ReconMatch:
    return pb.ReconMatch(
        match_id=m.match_id,
        rule=m.rule.value,
        confidence=m.confidence,
        line_fingerprints=list(m.line_fingerprints),
        expected_ids=list(m.expected_ids),
        entry_ids=list(m.entry_ids),
        actor=m.actor,
    )


def recon_break(
    b: Break, sla_tier: str = "", overdue: bool = False, age_s: float = 0
) -> pb.ReconBreak:
    message = pb.ReconBreak(
        break_id=b.break_id,
        break_class=b.break_class.value,
        state=b.state.value,
        amount=wire.money(b.amount_minor, b.currency),
        direction=b.direction.value,
        ledger_account_id=b.ledger_account_id,
        detected_at=wire.timestamp(b.detected_at_us),
        owner=b.owner,
        reason=b.reason,
        line_fingerprint=b.line_fingerprint,
        expected_id=b.expected_id,
        statement_id=b.statement_id,
        sla_tier=sla_tier,
        overdue=overdue,
        age_seconds=int(age_s),
        resolution=b.resolution,
        resolved_by=b.resolved_by,
        resolution_entry_id=b.resolution_entry_id,
        note=b.note,
    )
    if b.state is BreakState.RESOLVED:
        message.resolved_at.CopyFrom(wire.timestamp(b.resolved_at_us))
    return message


def import_response(result: ImportResult) -> pb.ImportStatementResponse:
    return pb.ImportStatementResponse(
        statements=[statement(s) for s in result.statements],
        duplicate_file=result.duplicate_file,
        lines_read=result.lines_read,
        lines_new=result.lines_new,
        matches=[match(m) for m in result.matches],
        breaks=[recon_break(b) for b in result.breaks],
    )


def encode_break_event(b: Break, arrived_at_us: int) -> OutgoingEvent:
    """The outbox row of a new break (money.recon.break on the money stream)."""
    envelope = make_envelope(
        event_type=BREAK_EVENT,
        tenant_id=b.tenant_id,
        payload=pb.ReconBreakDetectedEvent(
            recon_break=recon_break(b), arrived_at=wire.timestamp(arrived_at_us)
        ),
        occurred_at_us=b.detected_at_us,
        account_id=b.ledger_account_id,
        idempotency_key=b.break_id,
        amount=wire.money(b.amount_minor, b.currency),
    )
    return OutgoingEvent(
        event_id=envelope.event_id,
        subject=subject_for(BREAK_EVENT, b.tenant_id),
        data=envelope.SerializeToString(),
    )


def resolution_transfer(command: Command) -> pb.DescribeResolutionResponse:
    """The transfer a write-off or reversal posts (Reconciler.resolution_command)."""
    return pb.DescribeResolutionResponse(
        debit_account_id=command.debit_account_id,
        credit_account_id=command.credit_account_id,
        amount=wire.money(command.amount_minor, command.currency),
        idempotency_key=command.idempotency_key,
        description=command.description,
        reverses_entry_id=command.metadata.get("reverses", ""),
    )
