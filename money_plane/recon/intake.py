"""Statement intake: the bank's statements read and reconciled as they come.

Runs where the sweepers run (money_plane/app.py, beside the rail worker), one
replica at a time per unit (leases in the ledger's database: rails/store.py's
`rail_state` rows, like the rail worker's units):

- notifications: the bank's `statements` feed (a camt.054 per booking, as it
  happens) read after the stored cursor; each document imported through
  `Reconciler.import_parsed` into the ledger's bank account of its currency
  (payouts.bank_account_prefix:<CUR>, the account a payout's expected
  payment names). The cursor moves only past what was imported, so a crash
  or an unavailable database reads the rest again (an import of the same
  document again adds nothing).
- end of day: the camt.053 of each business day the bank has closed, once
  (a cursor of the last day done), balances checked (opening + booked lines
  = closing, else a balance_mismatch break) and expected payments left
  without a booking by the closing day raised as unmatched_ledger. A day is
  closed once the plane's clock has left it, or once the bank's own day is
  later (its clock where it tells it, GET /v1/clock, or a booking on a later
  day): a bank whose clock runs ahead, like the sandbox bank's manual one.

The bank's account is the platform's; each booking belongs to the tenant of
the payout its end-to-end id (or ACH trace number) names (`rail_refs`, where
the rails store what they sent). A document is imported per tenant with that
tenant's lines: a statement shared with another tenant loses its balances in
the tenant's part (one tenant's lines cannot add up to the account's
balance). A line no payout of this ledger names is not this ledger's (another
shard's, or another sender's): counted, not imported. The ledger's balance of
its bank account is not compared with the bank's: the account at the bank
holds the platform's own funding too.

Detection latency (a document's arrival here to its breaks' events) goes to
triplane_money_recon_detection_seconds (money_plane/metrics.py).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterable
from typing import TypeVar

from money_plane import metrics as m
from money_plane.formats.statement import Statement, StatementFile
from money_plane.formats.statement import StatementLine as FormatLine
from money_plane.payouts.service import Payouts
from money_plane.rails import store as rows
from money_plane.rails.adapters import HttpRail
from money_plane.recon.model import ImportResult
from money_plane.recon.reconciler import Reconciler, read_statement_file
from money_plane.store.base import LedgerStore
from triplane.runtime.clock import Clock
from triplane.runtime.config import RailsConfig, ReconConfig
from triplane.runtime.errors import InvalidArgument, NotFound, TriplaneError
from triplane.runtime.tasks import every

log = logging.getLogger("triplane.money.recon.intake")
T = TypeVar("T")

NOTIFICATIONS = "statements/notifications"
END_OF_DAY = "statements/eod"
ACTOR = "statement-intake"


class BankStatements(HttpRail):
    """The bank's statements over its HTTP API (the rails' client and error
    mapping: 5xx or unreachable is UNAVAILABLE, 4xx INVALID_ARGUMENT)."""

    name = "statements"

    async def messages(self, after: int) -> list[tuple[int, str, bytes]]:
        """(sequence, kind, document) of the feed after `after`."""
        body = await self._call("GET", f"/v1/outbox/statements?after={after}")
        return [
            (int(msg["seq"]), str(msg["kind"]), base64.b64decode(msg["body"]))
            for msg in json.loads(body)["messages"]
        ]

    async def day_statement(self, kind: str, day: dt.date) -> bytes:
        return await self._call("GET", f"/v1/statements/{kind}?date={day.isoformat()}")

    async def today(self) -> dt.date | None:
        """The bank's own day, where it says (the sandbox bank's GET
        /v1/clock); None from a bank that does not."""
        try:
            body = await self._call("GET", "/v1/clock")
            return dt.datetime.fromisoformat(str(json.loads(body)["now"])).date()
        except (InvalidArgument, ValueError, KeyError, TypeError):
            return None


@dataclasses.dataclass
class Imported:
    """What one document gave, over its tenants' parts."""

    lines_new: int = 0
    matched: int = 0
    breaks: int = 0
    unattributed: int = 0
    latest_booking: dt.date | None = None


class StatementIntake:
    """The bank's statements read and reconciled for one ledger (see the
    module doc); `run` is its loop, `pull` and `close_days` its two units."""

    def __init__(
        self,
        recon: Reconciler,
        payouts: Payouts,
        rails: RailsConfig,
        clock: Clock,
        bank: BankStatements | None = None,
    ) -> None:
        self.recon = recon
        self.payouts = payouts
        self.ledger = recon.ledger
        self.store = recon.ledger.store
        self.config: ReconConfig = recon.config
        self.rails = rails
        self.clock = clock
        self.bank = bank or BankStatements(rails, clock=clock)
        self.owner = uuid.uuid4().hex
        # The latest day the bank has shown, by its clock or a booking (its
        # days before are closed).
        self._bank_day: dt.date | None = None
        self._down = False

    async def start(self) -> None:
        await self._db(lambda: rows.create_schema(self.store))

    async def aclose(self) -> None:
        await self.bank.aclose()

    async def _db(self, fn: Callable[[], T]) -> T:
        return await self.ledger.run_on_writer(fn)

    def _lease_until(self) -> int:
        return self.clock.now_us() + int(self.rails.worker.lease_s * 1_000_000)

    # ---- the loop ----

    async def run(self) -> None:
        await every(self.config.intake_interval_s, self.run_once, "statement intake")

    async def run_once(self) -> int:
        """Reads new notifications, then closed days' statements; how many
        documents were imported."""
        try:
            done = await self.pull() + await self.close_days()
        except TriplaneError as error:
            if not self._down:  # once per outage, not every pass
                log.warning("statement intake waits: %s: %s", error.reason, error.message)
            self._down = True
            return 0
        self._down = False
        return done

    # ---- notifications ----

    async def pull(self) -> int:
        """Imports the feed's documents after the stored cursor; moves the
        cursor past each one imported (or refused as unreadable: it would
        never import); how many were read."""
        now_us = self.clock.now_us()
        cursor = await self._db(
            functools.partial(
                rows.take_lease, self.store, NOTIFICATIONS, self.owner, now_us, self._lease_until()
            )
        )
        if cursor is None:
            return 0  # another replica holds it
        moved = cursor
        read = 0
        try:
            for seq, kind, data in await self.bank.messages(cursor):
                if kind == "camt.054":
                    await self._import_logged(data, f"notification {seq}")
                    read += 1
                moved = seq
        finally:
            await self._db(
                functools.partial(rows.end_lease, self.store, NOTIFICATIONS, self.owner, moved)
            )
        return read

    # ---- end of day ----

    def _saw_day(self, day: dt.date | None) -> None:
        if day is not None and (self._bank_day is None or day > self._bank_day):
            self._bank_day = day

    def closed_through(self) -> dt.date:
        """The last day the bank has closed: yesterday by the plane's clock,
        or the day before the latest the bank has shown (its clock, where it
        tells it, or its latest booking)."""
        today = dt.datetime.fromtimestamp(self.clock.now_us() / 1_000_000, dt.UTC).date()
        closed = today - dt.timedelta(days=1)
        if self._bank_day is not None:
            closed = max(closed, self._bank_day - dt.timedelta(days=1))
        return closed

    async def close_days(self) -> int:
        """Imports the end-of-day camt.053 of each closed day not done yet
        (on first start, intake_days_back days back); how many days."""
        self._saw_day(await self.bank.today())
        now_us = self.clock.now_us()
        last = await self._db(
            functools.partial(
                rows.take_lease, self.store, END_OF_DAY, self.owner, now_us, self._lease_until()
            )
        )
        if last is None:
            return 0
        closed = self.closed_through()
        if last:
            day = dt.date.fromordinal(last) + dt.timedelta(days=1)
        else:
            day = closed - dt.timedelta(days=max(1, self.config.intake_days_back) - 1)
        done = last
        days = 0
        try:
            while day <= closed:
                data = await self.bank.day_statement("camt.053", day)
                await self._import_logged(data, f"camt.053 of {day}")
                done = day.toordinal()
                days += 1
                day += dt.timedelta(days=1)
        finally:
            await self._db(
                functools.partial(rows.end_lease, self.store, END_OF_DAY, self.owner, done)
            )
        return days

    # ---- one document ----

    async def _import_logged(self, data: bytes, what: str) -> Imported | None:
        """import_document; a document that can never import (unreadable,
        or naming an account the tenant lacks) is logged and skipped, any
        other error (the database unavailable) stops the pass."""
        try:
            return await self.import_document(data)
        except (InvalidArgument, NotFound) as error:
            m.STATEMENT_DOCUMENTS.labels("refused").inc()
            log.warning(
                "%s not imported (%s: %s, field %s): skipped",
                what,
                error.reason,
                error.message,
                error.field,
            )
            return None

    async def import_document(self, data: bytes) -> Imported:
        arrived_us = self.clock.now_us()
        parsed = await asyncio.to_thread(read_statement_file, data, self.config.max_file_bytes)
        parts, unattributed = await self._parts(parsed)
        out = Imported(unattributed=unattributed)
        for booking in (line.booking_date for line in parsed.lines):
            if booking is not None and (out.latest_booking is None or booking > out.latest_booking):
                out.latest_booking = booking
        for (tenant_id, currency), part in parts.items():
            result: ImportResult = await self.recon.import_parsed(
                tenant_id,
                self.payouts.bank_account(currency),
                part,
                actor=ACTOR,
                arrived_at_us=arrived_us,
                check_ledger_balance=False,
            )
            out.lines_new += result.lines_new
            out.matched += sum(len(match.line_fingerprints) for match in result.matches)
            out.breaks += len(result.breaks)
            for b in result.breaks:
                m.RECON_DETECTION_SECONDS.observe(max(0.0, (b.detected_at_us - arrived_us) / 1e6))
        self._saw_day(out.latest_booking)
        if unattributed:
            m.STATEMENT_LINES_UNATTRIBUTED.inc(unattributed)
            log.info("%d statement lines name no payout of this ledger: not imported", unattributed)
        m.STATEMENT_DOCUMENTS.labels("imported").inc()
        return out

    async def _parts(
        self, parsed: StatementFile
    ) -> tuple[dict[tuple[str, str], StatementFile], int]:
        """The document per (tenant, currency): each statement with the
        lines of the tenant's payouts; how many lines name none (or several
        tenants' payouts: a batch booking this ledger cannot split)."""
        refs = sorted({ref for line in parsed.lines for ref in _references(line)})
        tenants = await self._db(functools.partial(_tenants_of, self.store, refs))
        picked: dict[tuple[str, str], list[tuple[int, list[FormatLine]]]] = {}
        unattributed = 0
        for index, statement in enumerate(parsed.statements):
            by_tenant: dict[str, list[FormatLine]] = {}
            for line in statement.lines:
                owners = {tenants[ref] for ref in _references(line) if ref in tenants}
                if len(owners) != 1:
                    unattributed += 1
                    continue
                by_tenant.setdefault(owners.pop(), []).append(line)
            currency = statement.account.currency
            for tenant_id, lines in by_tenant.items():
                picked.setdefault((tenant_id, currency), []).append((index, lines))
        parts: dict[tuple[str, str], StatementFile] = {}
        for (tenant_id, currency), chosen in picked.items():
            whole = len(chosen) == len(parsed.statements) and all(
                len(lines) == len(parsed.statements[index].lines) for index, lines in chosen
            )
            if whole:
                parts[(tenant_id, currency)] = parsed
                continue
            statements = tuple(_part_of(parsed.statements[index], lines) for index, lines in chosen)
            parts[(tenant_id, currency)] = dataclasses.replace(
                parsed,
                statements=statements,
                file_sha256=_derived(parsed.file_sha256, tenant_id, currency),
                fingerprint=_derived(parsed.fingerprint, tenant_id, currency),
            )
        return parts, unattributed


def _references(line: FormatLine) -> Iterable[str]:
    for detail in line.details:
        if detail.references.end_to_end_id:
            yield detail.references.end_to_end_id


def _part_of(statement: Statement, lines: list[FormatLine]) -> Statement:
    """The statement with these of its lines; without its balances unless
    they are all of them (a part's lines do not add up to the account's)."""
    if len(lines) == len(statement.lines):
        return statement
    return dataclasses.replace(statement, lines=tuple(lines), balances=())


def _derived(digest: str, tenant_id: str, currency: str) -> str:
    return hashlib.sha256(f"{digest}\x1f{tenant_id}\x1f{currency}".encode()).hexdigest()


def _tenants_of(store: LedgerStore, references: list[str]) -> dict[str, str]:
    """The tenant of each reference a rail stored (rail_refs), those known."""
    found: dict[str, str] = {}
    for reference in references:
        ref = rows.recall(store, reference)
        if ref is not None:
            found[reference] = ref.tenant_id
    return found
