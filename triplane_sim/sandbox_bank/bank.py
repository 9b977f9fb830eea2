"""The sandbox bank's books: what it received, what it did with it, what it
says about it (status messages, returns, statements) and its own record of
the truth.

Deterministic: each payment's fate is drawn from `random.Random` seeded by
(seed, rail, end-to-end id), and a file's batch booking from (seed, message
id), so the same seed and payments give the same bookings in any arrival
order. Time is the injected clock's: a return "days later" is due when the
clock passes it (`run_due`), however the clock got there.

Uses the money plane's bank formats library (the simulator sits above the
planes in the import-linter layers, so it may): the formats' writers for
camt.052/053/054 (XSD-validated), MT940 and NACHA return files, their readers
for what the rails send. pacs.002 and pacs.004 have no writer there (and no
schema ships for them), so they are built here with the formats' XML builder
and read back by the formats' readers in the tests.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from money_plane.formats import _xml
from money_plane.formats._common import from_minor
from money_plane.formats.beneficiary import AccountType, UsBankAccount
from money_plane.formats.camt import write_camt052, write_camt053, write_camt054
from money_plane.formats.mt940 import write_mt940
from money_plane.formats.nacha import (
    AchEntry,
    ReturnToWrite,
    SecCode,
    read_nacha,
    write_ach_returns,
)
from money_plane.formats.statement import (
    Account,
    Balance,
    Batch,
    EntryStatus,
    References,
    Sign,
    Statement,
    StatementKind,
    StatementLine,
    TransactionDetail,
)
from triplane.runtime.clock import Clock
from triplane.runtime.config import SandboxBankConfig
from triplane.runtime.errors import InvalidArgument

_NS = _xml.ISO_NS_PREFIX
_DAY_US = 86_400_000_000


@dataclass(eq=False)  # one object per payment: compared by identity
class Payment:
    """One payment as the bank received it, and the bank's truth about it."""

    rail: str
    end_to_end_id: str
    amount_minor: int
    currency: str
    account_id: str  # the originator's account at the bank (debited)
    creditor_name: str
    creditor_account: str
    received_at: str
    message_id: str
    instruction_id: str = ""
    trace_number: str = ""
    outcome: str = "accepted"  # accepted | rejected | returned
    reason_code: str = ""
    # batch, duplicate, late, amount_changed, booked_after_reject
    faults: list[str] = field(default_factory=list)
    bookings: list[dict[str, Any]] = field(default_factory=list)
    returned_on: str = ""
    ach_entry: AchEntry | None = None
    # How often it was submitted (a second submission books nothing).
    received: int = 1
    ach_sec: str = ""


@dataclass
class Booking:
    line: StatementLine
    account_id: str
    seq: int


@dataclass
class _Due:
    at_us: int
    kind: str  # book | return | ach_returns
    payments: list[Payment]
    batch_id: str = ""


def _draw(seed: int, *parts: str) -> random.Random:
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class Bank:
    def __init__(self, config: SandboxBankConfig, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.payments: dict[tuple[str, str], Payment] = {}
        self.accounts: dict[str, str] = {}  # account id -> currency
        self.bookings: list[Booking] = []
        self.outbox: dict[str, list[dict[str, Any]]] = {}
        self.due: list[_Due] = []
        self._seq = 0
        self._ref = 0

    # ---- time ----

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.now_us() / 1_000_000, tz=dt.UTC)

    def today(self) -> dt.date:
        return self.now().date()

    def run_due(self) -> None:
        now_us = self.clock.now_us()
        ready = sorted((d for d in self.due if d.at_us <= now_us), key=lambda d: d.at_us)
        self.due = [d for d in self.due if d.at_us > now_us]
        for d in ready:
            if d.kind == "book":
                self._book(d.payments, d.batch_id)
            elif d.kind == "return":
                self._return(d.payments)
            elif d.kind == "ach_reject":
                self._emit("ach", "nacha_returns", self._ach_return_file(d.payments))

    # ---- ids ----

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _next_ref(self) -> str:
        self._ref += 1
        return f"SBX{self.today():%y%m%d}{self._ref:07d}"

    def _emit(self, rail: str, kind: str, body: bytes | Callable[[], bytes]) -> None:
        """Queues a message for `rail`; a callable body is written when first
        read (a camt.054 per booking costs a schema validation: a bench
        booking 100,000 lines reads statements, not notifications)."""
        self.outbox.setdefault(rail, []).append(
            {"seq": self._next_seq(), "kind": kind, "body": body}
        )

    def feed(self, rail: str, after: int) -> list[dict[str, Any]]:
        self.run_due()
        out = []
        for m in self.outbox.get(rail, []):
            if m["seq"] <= after:
                continue
            if callable(m["body"]):
                m["body"] = m["body"]()
            if isinstance(m["body"], bytes):
                m["body"] = base64.b64encode(m["body"]).decode()
            out.append(m)
        return out

    # ---- fate ----

    def _fate(self, p: Payment) -> None:
        f = self.config.faults
        rng = _draw(self.config.seed, p.rail, p.end_to_end_id)
        u = rng.random()
        if u < f.reject_rate:
            p.outcome = "rejected"
            codes = self.config.ach_reject_codes if p.rail == "ach" else self.config.reject_reasons
            p.reason_code = rng.choice(codes)
            # The bank books it anyway, after its reject (a bank's error the
            # originator must catch: its ledger gave the money back).
            if rng.random() < f.booked_after_reject_rate:
                p.faults.append("booked_after_reject")
            return
        if u < f.reject_rate + f.return_rate:
            p.outcome = "returned"
            codes = self.config.ach_return_codes if p.rail == "ach" else self.config.return_reasons
            p.reason_code = rng.choice(codes)
        if rng.random() < f.duplicate_rate:
            p.faults.append("duplicate")
        if rng.random() < f.late_rate:
            p.faults.append("late")
        if rng.random() < f.amount_change_rate:
            p.faults.append("amount_changed")

    def _receive(self, p: Payment, fresh: list[Payment]) -> Payment:
        """The payment as first received (a second submission of the same
        end-to-end id is the first: nothing is booked again); a new one is
        appended to `fresh`."""
        key = (p.rail, p.end_to_end_id)
        if key in self.payments:
            self.payments[key].received += 1
            return self.payments[key]
        self._fate(p)
        self.payments[key] = p
        self.accounts.setdefault(p.account_id, p.currency)
        fresh.append(p)
        return p

    def _schedule(self, payments: list[Payment], batch_id: str = "") -> None:
        """Books the accepted ones now (late ones later); schedules returns."""
        now_us = self.clock.now_us()
        on_time = [p for p in payments if p.outcome != "rejected" and "late" not in p.faults]
        late = [p for p in payments if p.outcome != "rejected" and "late" in p.faults]
        if on_time:
            self._book(on_time, batch_id)
        for p in late:
            self.due.append(_Due(now_us + self.config.late_by_days * _DAY_US, "book", [p]))
        for p in payments:
            if p.outcome == "rejected" and "booked_after_reject" in p.faults:
                # After the reject has gone out (ACH's comes the next day).
                days = self.config.late_by_days + (1 if p.rail == "ach" else 0)
                self.due.append(_Due(now_us + days * _DAY_US, "book", [p]))
        for p in payments:
            if p.outcome == "returned":
                delay = self.config.return_after_days + (
                    self.config.late_by_days if "late" in p.faults else 0
                )
                self.due.append(_Due(now_us + delay * _DAY_US, "return", [p]))

    # ---- booking ----

    def _detail(self, p: Payment, sign: Sign, amount: int, reason: str = "") -> TransactionDetail:
        return TransactionDetail(
            references=References(
                end_to_end_id=p.end_to_end_id,
                instruction_id=p.instruction_id,
                message_id=p.message_id,
            ),
            amount_minor=amount,
            currency=p.currency,
            sign=sign,
            counterparty_name=p.creditor_name[:70],
            return_reason=reason,
        )

    def _booked_amount(self, p: Payment) -> int:
        if "amount_changed" in p.faults:
            return max(1, p.amount_minor + self.config.amount_change_minor)
        return p.amount_minor

    def _add_line(self, account_id: str, line: StatementLine, rails: set[str]) -> None:
        self.bookings.append(Booking(line, account_id, len(self.bookings) + 1))
        currency = self.accounts[account_id]
        note = Statement(
            kind=StatementKind.NOTIFICATION,
            statement_id=f"N{line.account_servicer_ref}",
            account=Account(other_id=account_id, currency=currency, servicer_bic=self.config.bic),
            lines=(line,),
            created_at=self.now(),
        )
        written: list[bytes] = []

        def doc() -> bytes:
            if not written:
                written.append(
                    write_camt054(
                        [note],
                        message_id=f"C54{line.account_servicer_ref}",
                        created_at=note.created_at or self.now(),
                    )
                )
            return written[0]

        # ACH and SEPA learn of settlement from the booking; instant and card
        # payouts from their status message.
        for rail in sorted(rails & {"ach", "sepa"}):
            self._emit(rail, "camt.054", doc)
        self._emit("statements", "camt.054", doc)

    def _book(self, payments: list[Payment], batch_id: str = "") -> None:
        today = self.today()
        by_account: dict[str, list[Payment]] = {}
        for p in payments:
            by_account.setdefault(p.account_id, []).append(p)
        for account_id, group in by_account.items():
            rails = {p.rail for p in group}
            if batch_id and len(group) > 1:
                ref = self._next_ref()
                total = sum(self._booked_amount(p) for p in group)
                line = StatementLine(
                    amount_minor=total,
                    currency=group[0].currency,
                    sign=Sign.DEBIT,
                    status=EntryStatus.BOOKED,
                    booking_date=today,
                    value_date=today,
                    account_servicer_ref=ref,
                    entry_ref=ref,
                    bank_transaction_code="PMNT/ICDT/ESCT",
                    batch=Batch(
                        number_of_transactions=len(group),
                        total_minor=total,
                        currency=group[0].currency,
                        sign=Sign.DEBIT,
                        message_id=group[0].message_id,
                        payment_info_id=batch_id,
                    ),
                    details=tuple(
                        self._detail(p, Sign.DEBIT, self._booked_amount(p)) for p in group
                    ),
                )
                self._add_line(account_id, line, rails)
                for p in group:
                    if "batch" not in p.faults:
                        p.faults.append("batch")
                    p.bookings.append(self._truth(line, p, batch=ref))
                continue
            for p in group:
                copies = 2 if "duplicate" in p.faults else 1
                for _ in range(copies):
                    ref = self._next_ref()
                    amount = self._booked_amount(p)
                    line = StatementLine(
                        amount_minor=amount,
                        currency=p.currency,
                        sign=Sign.DEBIT,
                        status=EntryStatus.BOOKED,
                        booking_date=today,
                        value_date=today,
                        account_servicer_ref=ref,
                        entry_ref=ref,
                        bank_transaction_code="PMNT/ICDT/ESCT",
                        details=(self._detail(p, Sign.DEBIT, amount),),
                    )
                    self._add_line(account_id, line, {p.rail})
                    p.bookings.append(self._truth(line, p))

    def _truth(self, line: StatementLine, p: Payment, batch: str = "") -> dict[str, Any]:
        return {
            "account_servicer_ref": line.account_servicer_ref,
            "booking_date": line.booking_date.isoformat() if line.booking_date else "",
            "amount_minor": self._booked_amount(p),
            "sign": line.sign.value,
            "batch_ref": batch,
        }

    def _return(self, payments: list[Payment]) -> None:
        today = self.today()
        for p in payments:
            ref = self._next_ref()
            line = StatementLine(
                amount_minor=p.amount_minor,
                currency=p.currency,
                sign=Sign.CREDIT,
                status=EntryStatus.BOOKED,
                booking_date=today,
                value_date=today,
                account_servicer_ref=ref,
                entry_ref=ref,
                bank_transaction_code="PMNT/ICDT/RRTN",
                details=(self._detail(p, Sign.CREDIT, p.amount_minor, p.reason_code),),
            )
            self._add_line(p.account_id, line, set())
            p.returned_on = today.isoformat()
            p.bookings.append(self._truth(line, p) | {"amount_minor": p.amount_minor})
            if p.rail == "ach":
                self._emit("ach", "nacha_returns", self._ach_return_file([p]))
            elif p.rail == "card":
                status = {
                    "id": f"CR{ref}",
                    "reference": p.end_to_end_id,
                    "status": "returned",
                    "reason_code": p.reason_code,
                }
                self._emit("card", "card_status", json.dumps(status).encode())
            else:
                self._emit(p.rail, "pacs.004", self._pacs004(p, ref))

    # ---- instant: pacs.008 in, pacs.002 back ----

    def receive_pacs008(self, data: bytes) -> bytes:
        root = _xml.parse_xml(data, max_bytes=self.config.max_body_bytes)
        _xml.validate(root, "pacs.008.001.08")
        top = _xml.required(root, "FIToFICstmrCdtTrf")
        msg_id = _xml.required_text(top, "GrpHdr", "MsgId")
        received: list[Payment] = []
        fresh: list[Payment] = []
        for tx in _xml.children(top, "CdtTrfTxInf"):
            amount_el = _xml.required(tx, "IntrBkSttlmAmt")
            currency = amount_el.get("Ccy", "")
            received.append(
                self._receive(
                    Payment(
                        rail="instant",
                        end_to_end_id=_xml.required_text(tx, "PmtId", "EndToEndId"),
                        instruction_id=_xml.text(tx, "PmtId", "InstrId"),
                        amount_minor=_minor(amount_el.text or "0", currency),
                        currency=currency,
                        account_id=_xml.text(tx, "DbtrAcct", "Id", "Othr", "Id")
                        or _xml.text(tx, "DbtrAcct", "Id", "IBAN"),
                        creditor_name=_xml.text(tx, "Cdtr", "Nm"),
                        creditor_account=_xml.text(tx, "CdtrAcct", "Id", "Othr", "Id"),
                        received_at=self.now().isoformat(),
                        message_id=msg_id,
                    ),
                    fresh,
                )
            )
        self._schedule(fresh)
        report = self._pacs002(msg_id, "pacs.008.001.08", received, settled="ACSC")
        self._emit("instant", "pacs.002", report)
        return report

    # ---- SEPA: pain.001 in ----

    def receive_pain001(self, data: bytes) -> dict[str, Any]:
        root = _xml.parse_xml(data, max_bytes=self.config.max_body_bytes)
        _xml.validate(root, "pain.001.001.09")
        top = _xml.required(root, "CstmrCdtTrfInitn")
        msg_id = _xml.required_text(top, "GrpHdr", "MsgId")
        received: list[Payment] = []
        fresh: list[Payment] = []
        for pmt in _xml.children(top, "PmtInf"):
            debtor_iban = _xml.required_text(pmt, "DbtrAcct", "Id", "IBAN")
            for tx in _xml.children(pmt, "CdtTrfTxInf"):
                amount_el = _xml.required(tx, "Amt", "InstdAmt")
                currency = amount_el.get("Ccy", "")
                received.append(
                    self._receive(
                        Payment(
                            rail="sepa",
                            end_to_end_id=_xml.required_text(tx, "PmtId", "EndToEndId"),
                            instruction_id=_xml.text(tx, "PmtId", "InstrId"),
                            amount_minor=_minor(amount_el.text or "0", currency),
                            currency=currency,
                            account_id=debtor_iban,
                            creditor_name=_xml.text(tx, "Cdtr", "Nm"),
                            creditor_account=_xml.text(tx, "CdtrAcct", "Id", "IBAN"),
                            received_at=self.now().isoformat(),
                            message_id=msg_id,
                        ),
                        fresh,
                    )
                )
        self._file(fresh, msg_id)
        rejected = [p for p in fresh if p.outcome == "rejected"]
        if rejected:
            self._emit("sepa", "pacs.002", self._pacs002(msg_id, "pain.001.001.09", rejected))
        return {"message_id": msg_id, "received": len(received)}

    def _file(self, received: list[Payment], file_id: str) -> None:
        # Only a rejected payment booked after its reject is booked of these.
        self._schedule([p for p in received if p.outcome == "rejected"])
        fresh = [p for p in received if p.outcome != "rejected"]
        batched = _draw(self.config.seed, "batch", file_id).random() < self.config.faults.batch_rate
        if batched:
            ok = [p for p in fresh if "late" not in p.faults and "duplicate" not in p.faults]
            rest = [p for p in fresh if p not in ok]
            if len(ok) > 1:
                self._schedule(ok, batch_id=file_id[:35])
                self._schedule(rest)
                return
        self._schedule(fresh)

    # ---- ACH: NACHA files in, return files back ----

    def receive_nacha(self, data: bytes) -> dict[str, Any]:
        ach = read_nacha(data, max_bytes=self.config.max_body_bytes)
        received: list[Payment] = []
        fresh: list[Payment] = []
        file_id = hashlib.sha256(data).hexdigest()[:16].upper()
        for batch in ach.batches:
            for e in batch.entries:
                info = next((a.payment_info for a in e.addenda if a.type_code == "05"), "")
                e2e = info.removeprefix("E2E ").strip() or e.trace_number
                entry = AchEntry(
                    account=UsBankAccount(
                        routing_number=e.rdfi_routing,
                        account_number=e.account_number,
                        account_type=AccountType.SAVINGS
                        if e.transaction_code[0] == "3"
                        else AccountType.CHECKING,
                    ),
                    amount_minor=e.amount_minor,
                    name=e.name,
                    identification=e.identification,
                )
                p = self._receive(
                    Payment(
                        rail="ach",
                        end_to_end_id=e2e,
                        amount_minor=e.amount_minor,
                        currency="USD",
                        account_id=f"ACH{batch.company_id}",
                        creditor_name=e.name,
                        creditor_account=e.account_number[-4:],
                        received_at=self.now().isoformat(),
                        message_id=file_id,
                        trace_number=e.trace_number,
                        ach_entry=entry,
                        ach_sec=batch.sec_code,
                    ),
                    fresh,
                )
                received.append(p)
        self._file(fresh, file_id)
        rejected = [p for p in fresh if p.outcome == "rejected"]
        if rejected:
            # An RDFI's return of an entry it could not post comes back next
            # day, with nothing booked.
            self.due.append(_Due(self.clock.now_us() + _DAY_US, "ach_reject", rejected))
        return {"file_id": file_id, "entries": len(received)}

    def _ach_return_file(self, payments: list[Payment]) -> bytes:
        returns = [
            ReturnToWrite(
                original=p.ach_entry, original_trace=p.trace_number, reason_code=p.reason_code
            )
            for p in payments
            if p.ach_entry is not None
        ]
        return write_ach_returns(
            returns,
            rdfi_routing=self.config.routing_number,
            odfi_routing=payments[0].trace_number[:8] + _check_digit(payments[0].trace_number[:8]),
            original_sec_code=SecCode(payments[0].ach_sec or "CCD"),
            company_name="SANDBOX BANK",
            company_id="9999999999",
            created_at=self.now(),
            first_trace_sequence=self._ref + 1,
        )

    # ---- card / wallet ----

    def receive_card(self, body: dict[str, Any]) -> dict[str, Any]:
        for name in ("reference", "token", "amount_minor", "currency", "kind"):
            if name not in body or body[name] in ("", None):
                raise InvalidArgument("FIELD_REQUIRED", f"{name} is required", name)
        if not isinstance(body["amount_minor"], int) or body["amount_minor"] <= 0:
            raise InvalidArgument("AMOUNT_INVALID", "amount_minor must be positive", "amount_minor")
        fresh: list[Payment] = []
        p = self._receive(
            Payment(
                rail="card",
                end_to_end_id=str(body["reference"]),
                amount_minor=body["amount_minor"],
                currency=str(body["currency"]),
                account_id=f"CARD{body['currency']}",
                creditor_name=str(body["kind"]),
                creditor_account=str(body["token"])[-4:],
                received_at=self.now().isoformat(),
                message_id=str(body["reference"]),
            ),
            fresh,
        )
        self._schedule(fresh)
        status = {
            "id": f"CP{hashlib.sha256(p.end_to_end_id.encode()).hexdigest()[:12].upper()}",
            "reference": p.end_to_end_id,
            "status": "failed" if p.outcome == "rejected" else "settled",
            "reason_code": p.reason_code if p.outcome == "rejected" else "",
        }
        if fresh:
            self._emit("card", "card_status", json.dumps(status).encode())
        return status

    # ---- status messages ----

    def _pacs002(
        self, original_id: str, original_name: str, payments: list[Payment], settled: str = "ACCP"
    ) -> bytes:
        b = _xml.Builder(f"{_NS}pacs.002.001.10")
        root = b.root()
        top = b.add(root, "FIToFIPmtStsRpt")
        hdr = b.add(top, "GrpHdr")
        b.add(hdr, "MsgId", f"S{hashlib.sha256(original_id.encode()).hexdigest()[:20].upper()}")
        b.add(hdr, "CreDtTm", self.now().isoformat(timespec="seconds"))
        grp = b.add(top, "OrgnlGrpInfAndSts")
        b.add(grp, "OrgnlMsgId", original_id)
        b.add(grp, "OrgnlMsgNmId", original_name)
        for p in payments:
            tx = b.add(top, "TxInfAndSts")
            b.add(tx, "StsId", f"{p.end_to_end_id}-S")
            b.opt(tx, "OrgnlInstrId", p.instruction_id)
            b.add(tx, "OrgnlEndToEndId", p.end_to_end_id)
            b.add(tx, "TxSts", "RJCT" if p.outcome == "rejected" else settled)
            if p.outcome == "rejected":
                info = b.add(tx, "StsRsnInf")
                b.add(b.add(info, "Rsn"), "Cd", p.reason_code)
        return _xml.serialize(root)

    def _pacs004(self, p: Payment, ref: str) -> bytes:
        b = _xml.Builder(f"{_NS}pacs.004.001.09")
        root = b.root()
        top = b.add(root, "PmtRtr")
        hdr = b.add(top, "GrpHdr")
        b.add(hdr, "MsgId", f"R{ref}")
        b.add(hdr, "CreDtTm", self.now().isoformat(timespec="seconds"))
        b.add(hdr, "NbOfTxs", "1")
        b.add(b.add(hdr, "SttlmInf"), "SttlmMtd", "CLRG")
        grp = b.add(top, "OrgnlGrpInf")
        b.add(grp, "OrgnlMsgId", p.message_id)
        b.add(grp, "OrgnlMsgNmId", "pacs.008.001.08" if p.rail == "instant" else "pain.001.001.09")
        tx = b.add(top, "TxInf")
        b.add(tx, "RtrId", ref)
        b.opt(tx, "OrgnlInstrId", p.instruction_id)
        b.add(tx, "OrgnlEndToEndId", p.end_to_end_id)
        b.add(tx, "RtrdIntrBkSttlmAmt", from_minor(p.amount_minor, p.currency), Ccy=p.currency)
        b.add(tx, "IntrBkSttlmDt", self.today().isoformat())
        b.add(b.add(b.add(tx, "RtrRsnInf"), "Rsn"), "Cd", p.reason_code)
        return _xml.serialize(root)

    # ---- statements ----

    def _balance_before(self, account_id: str, day: dt.date) -> int:
        return self.config.opening_balance_minor + sum(
            b.line.signed_minor
            for b in self.bookings
            if b.account_id == account_id and b.line.booking_date and b.line.booking_date < day
        )

    def _statements(self, day: dt.date, kind: StatementKind, intraday: bool) -> list[Statement]:
        out: list[Statement] = []
        for account_id, currency in sorted(self.accounts.items()):
            lines = tuple(
                b.line
                for b in self.bookings
                if b.account_id == account_id and b.line.booking_date == day
            )
            opening = self._balance_before(account_id, day)
            closing = opening + sum(line.signed_minor for line in lines)

            def bal(code: str, amount: int, currency: str = currency) -> Balance:
                return Balance(
                    code, abs(amount), currency, Sign.CREDIT if amount >= 0 else Sign.DEBIT, day
                )

            balances = (
                (bal("OPBD", opening), bal("ITBD", closing))
                if intraday
                else (bal("OPBD", opening), bal("CLBD", closing))
            )
            out.append(
                Statement(
                    kind=kind,
                    statement_id=f"S{day:%y%m%d}{len(out) + 1:03d}",
                    account=Account(
                        other_id=account_id, currency=currency, servicer_bic=self.config.bic
                    ),
                    lines=lines,
                    balances=balances,
                    electronic_sequence=(day - dt.date(2000, 1, 1)).days,
                    created_at=self.now(),
                )
            )
        return out

    def statement(self, kind: str, day: dt.date) -> bytes:
        """camt.053 (end of day), camt.052 (intraday, so far), or mt940."""
        self.run_due()
        created = self.now()
        if kind == "camt.053":
            stmts = self._statements(day, StatementKind.STATEMENT, intraday=False)
            return write_camt053(stmts, message_id=f"E{day:%Y%m%d}", created_at=created)
        if kind == "camt.052":
            stmts = self._statements(day, StatementKind.REPORT, intraday=True)
            msg = f"I{created:%Y%m%d%H%M%S}"
            return write_camt052(stmts, message_id=msg, created_at=created)
        if kind == "mt940":
            stmts = self._statements(day, StatementKind.MT940, intraday=False)
            flat = [
                Statement(
                    kind=s.kind,
                    statement_id=s.statement_id,
                    account=s.account,
                    balances=s.balances,
                    electronic_sequence=s.electronic_sequence,
                    lines=tuple(_mt940_line(line) for line in s.lines),
                )
                for s in stmts
            ]
            return write_mt940(flat)
        raise InvalidArgument("STATEMENT_KIND_UNKNOWN", "camt.052, camt.053 or mt940", "kind")

    def truth(self) -> list[dict[str, Any]]:
        """What the bank did, per payment (for reconciliation tests and the bench)."""
        self.run_due()
        return [
            {
                "rail": p.rail,
                "end_to_end_id": p.end_to_end_id,
                "amount_minor": p.amount_minor,
                "currency": p.currency,
                "account_id": p.account_id,
                "received_at": p.received_at,
                "received": p.received,
                "message_id": p.message_id,
                "trace_number": p.trace_number,
                "outcome": p.outcome,
                "reason_code": p.reason_code,
                "faults": sorted(p.faults),
                "bookings": p.bookings,
                "returned_on": p.returned_on,
            }
            for p in self.payments.values()
        ]


def _mt940_line(line: StatementLine) -> StatementLine:
    """MT940 carries one transaction per line: a batch keeps its total and
    payment information id, without its details; bank references fit 16."""
    from dataclasses import replace

    ref = line.account_servicer_ref[-16:]
    if len(line.details) > 1:
        return replace(line, details=(), account_servicer_ref=ref)
    return replace(line, account_servicer_ref=ref)


def _minor(text: str, currency: str) -> int:
    from money_plane.formats._common import to_minor

    return to_minor(text, currency, "amount")


def _check_digit(routing8: str) -> str:
    weights = (3, 7, 1, 3, 7, 1, 3, 7)
    total = sum(int(d) * w for d, w in zip(routing8, weights, strict=True))
    return str((10 - total % 10) % 10)
