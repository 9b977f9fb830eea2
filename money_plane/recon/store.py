"""Reconciliation's tables, in the ledger's own database and transactions.

Five tables beside the ledger's (statements, statement_lines,
expected_payments, matches, breaks), led by tenant_id like every other one
(each primary key and index starts with it; nothing is numbered by a
sequence), created by `create_schema` with CREATE ... IF NOT EXISTS on start.
They are additive to ledger schema version 2 (money_plane/store/migration.py):
a version-2 database gains them on its next start, and the v1 -> v2
migration never touches them, so no version bump is needed.

`ReconStore` borrows the ledger store's connections and transactions
(`LedgerStore._transaction`): an import's lines, matches, breaks, expected
payments' new states and break events (in the ledger's outbox, relayed to
NATS by the ledger's relay) commit together or not at all.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from money_plane.domain import Side, account_key
from money_plane.recon.model import (
    Break,
    BreakClass,
    BreakState,
    Direction,
    ExpectedPayment,
    ExpectedState,
    Line,
    Match,
    Rule,
    StatementRecord,
)
from money_plane.store.base import LedgerStore
from triplane.runtime.bus import OutgoingEvent

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS statements (
        tenant_id TEXT NOT NULL, statement_id TEXT NOT NULL, file_sha256 TEXT NOT NULL,
        file_fingerprint TEXT NOT NULL, kind TEXT NOT NULL, message_name TEXT NOT NULL,
        bank_statement_id TEXT NOT NULL, bank_account TEXT NOT NULL,
        ledger_account_id TEXT NOT NULL, currency TEXT NOT NULL, line_count BIGINT NOT NULL,
        new_line_count BIGINT NOT NULL, opening_minor BIGINT, closing_minor BIGINT,
        closing_date TEXT NOT NULL, balances_agree SMALLINT, ledger_closing_minor BIGINT,
        imported_at_us BIGINT NOT NULL, imported_by TEXT NOT NULL,
        PRIMARY KEY (tenant_id, statement_id))""",
    "CREATE INDEX IF NOT EXISTS statements_by_sha ON statements (tenant_id, file_sha256)",
    "CREATE INDEX IF NOT EXISTS statements_by_fingerprint "
    "ON statements (tenant_id, file_fingerprint)",
    # One row per booking, keyed by its content fingerprint (the same booking
    # in an intraday report and the end-of-day statement is one line).
    """CREATE TABLE IF NOT EXISTS statement_lines (
        tenant_id TEXT NOT NULL, fingerprint TEXT NOT NULL, statement_id TEXT NOT NULL,
        ledger_account_id TEXT NOT NULL, position BIGINT NOT NULL, amount_minor BIGINT NOT NULL,
        currency TEXT NOT NULL, direction TEXT NOT NULL, booking_date TEXT NOT NULL,
        value_date TEXT NOT NULL, status TEXT NOT NULL, end_to_end_id TEXT NOT NULL,
        instruction_id TEXT NOT NULL, bank_reference TEXT NOT NULL,
        remittance_reference TEXT NOT NULL, batch_id TEXT NOT NULL, return_reason TEXT NOT NULL,
        match_id TEXT NOT NULL, details TEXT NOT NULL,
        PRIMARY KEY (tenant_id, fingerprint))""",
    "CREATE INDEX IF NOT EXISTS statement_lines_by_statement "
    "ON statement_lines (tenant_id, statement_id, position)",
    """CREATE TABLE IF NOT EXISTS expected_payments (
        tenant_id TEXT NOT NULL, expected_id TEXT NOT NULL, ledger_account_id TEXT NOT NULL,
        direction TEXT NOT NULL, currency TEXT NOT NULL, amount_minor BIGINT NOT NULL,
        amount_min_minor BIGINT NOT NULL, amount_max_minor BIGINT NOT NULL,
        date_from TEXT NOT NULL, date_to TEXT NOT NULL, end_to_end_id TEXT NOT NULL,
        instruction_id TEXT NOT NULL, bank_reference TEXT NOT NULL,
        remittance_reference TEXT NOT NULL, batch_id TEXT NOT NULL,
        ledger_entry_id TEXT NOT NULL, description TEXT NOT NULL, state TEXT NOT NULL,
        created_at_us BIGINT NOT NULL, match_id TEXT NOT NULL,
        PRIMARY KEY (tenant_id, expected_id))""",
    "CREATE INDEX IF NOT EXISTS expected_by_e2e ON expected_payments (tenant_id, end_to_end_id) "
    "WHERE end_to_end_id <> ''",
    "CREATE INDEX IF NOT EXISTS expected_by_instr "
    "ON expected_payments (tenant_id, instruction_id) WHERE instruction_id <> ''",
    "CREATE INDEX IF NOT EXISTS expected_by_bank_ref "
    "ON expected_payments (tenant_id, bank_reference) WHERE bank_reference <> ''",
    "CREATE INDEX IF NOT EXISTS expected_by_remittance "
    "ON expected_payments (tenant_id, remittance_reference) WHERE remittance_reference <> ''",
    "CREATE INDEX IF NOT EXISTS expected_by_batch ON expected_payments (tenant_id, batch_id) "
    "WHERE batch_id <> ''",
    # The sweep's question: is a bank account's posting some expected payment's?
    "CREATE INDEX IF NOT EXISTS expected_by_entry "
    "ON expected_payments (tenant_id, ledger_entry_id) WHERE ledger_entry_id <> ''",
    "CREATE INDEX IF NOT EXISTS expected_open_by_amount "
    "ON expected_payments (tenant_id, ledger_account_id, amount_minor) WHERE state = 'open'",
    "CREATE INDEX IF NOT EXISTS expected_open_by_date "
    "ON expected_payments (tenant_id, ledger_account_id, date_to) WHERE state = 'open'",
    """CREATE TABLE IF NOT EXISTS matches (
        tenant_id TEXT NOT NULL, match_id TEXT NOT NULL, rule TEXT NOT NULL,
        confidence {float} NOT NULL, line_fingerprints TEXT NOT NULL,
        expected_ids TEXT NOT NULL, entry_id TEXT NOT NULL, actor TEXT NOT NULL,
        created_at_us BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, match_id))""",
    "CREATE INDEX IF NOT EXISTS matches_by_entry ON matches (tenant_id, entry_id) "
    "WHERE entry_id <> ''",
    # break_id is derived from the break's cause, so one cause (a line, an
    # expected payment, a statement's balance) raises one break, whatever
    # re-imports or sweeps happen.
    """CREATE TABLE IF NOT EXISTS breaks (
        tenant_id TEXT NOT NULL, break_id TEXT NOT NULL, break_class TEXT NOT NULL,
        state TEXT NOT NULL, amount_minor BIGINT NOT NULL, currency TEXT NOT NULL,
        direction TEXT NOT NULL, ledger_account_id TEXT NOT NULL,
        detected_at_us BIGINT NOT NULL, owner TEXT NOT NULL, reason TEXT NOT NULL,
        line_fingerprint TEXT NOT NULL, expected_id TEXT NOT NULL, statement_id TEXT NOT NULL,
        resolution TEXT NOT NULL, resolved_by TEXT NOT NULL, resolved_at_us BIGINT NOT NULL,
        resolution_entry_id TEXT NOT NULL, note TEXT NOT NULL, cause TEXT NOT NULL,
        PRIMARY KEY (tenant_id, break_id))""",
    "CREATE INDEX IF NOT EXISTS breaks_by_state ON breaks (tenant_id, state, detected_at_us)",
]

_LINE_COLUMNS = (
    "tenant_id, fingerprint, statement_id, ledger_account_id, position, amount_minor, currency, "
    "direction, booking_date, value_date, status, end_to_end_id, instruction_id, "
    "bank_reference, remittance_reference, batch_id, return_reason, match_id, details"
)
_EXPECTED_COLUMNS = (
    "tenant_id, expected_id, ledger_account_id, direction, currency, amount_minor, "
    "amount_min_minor, amount_max_minor, date_from, date_to, end_to_end_id, instruction_id, "
    "bank_reference, remittance_reference, batch_id, ledger_entry_id, description, state, "
    "created_at_us, match_id"
)
_BREAK_COLUMNS = (
    "tenant_id, break_id, break_class, state, amount_minor, currency, direction, "
    "ledger_account_id, detected_at_us, owner, reason, line_fingerprint, expected_id, "
    "statement_id, resolution, resolved_by, resolved_at_us, resolution_entry_id, note, cause"
)
_STATEMENT_COLUMNS = (
    "tenant_id, statement_id, file_sha256, file_fingerprint, kind, message_name, "
    "bank_statement_id, bank_account, ledger_account_id, currency, line_count, "
    "new_line_count, opening_minor, closing_minor, closing_date, balances_agree, "
    "ledger_closing_minor, imported_at_us, imported_by"
)
# Columns an expected payment is found by, per reference kind.
REFERENCE_COLUMNS = {
    "e2e": "end_to_end_id",
    "instr": "instruction_id",
    "bank": "bank_reference",
    "remit": "remittance_reference",
    "batch": "batch_id",
}
_CHUNK = 500
_encode_json = msgspec.json.Encoder().encode
_first = operator.itemgetter(0)
_match_id = operator.attrgetter("match_id")
_second = operator.itemgetter(1)  # the key after tenant_id, in a row of each table


def _json(value: Any) -> str:
    return _encode_json(value).decode()


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


# Enum members by their stored value: a dict lookup per row instead of the
# enum's constructor (read back by the thousand per import).
_DIRECTIONS = {d.value: d for d in Direction}
_EXPECTED_STATES = {s.value: s for s in ExpectedState}


def expected_from_row(row: Sequence[Any]) -> ExpectedPayment:
    return ExpectedPayment(
        tenant_id=row[0],
        expected_id=row[1],
        ledger_account_id=row[2],
        direction=_DIRECTIONS[row[3]],
        currency=row[4],
        amount_minor=int(row[5]),
        amount_min_minor=int(row[6]),
        amount_max_minor=int(row[7]),
        date_from=row[8],
        date_to=row[9],
        end_to_end_id=row[10],
        instruction_id=row[11],
        bank_reference=row[12],
        remittance_reference=row[13],
        batch_id=row[14],
        ledger_entry_id=row[15],
        description=row[16],
        state=_EXPECTED_STATES[row[17]],
        created_at_us=int(row[18]),
    )


def expected_row(e: ExpectedPayment) -> tuple[Any, ...]:
    return (
        e.tenant_id,
        e.expected_id,
        e.ledger_account_id,
        e.direction.value,
        e.currency,
        e.amount_minor,
        e.amount_min_minor,
        e.amount_max_minor,
        e.date_from,
        e.date_to,
        e.end_to_end_id,
        e.instruction_id,
        e.bank_reference,
        e.remittance_reference,
        e.batch_id,
        e.ledger_entry_id,
        e.description,
        e.state.value,
        e.created_at_us,
        "",
    )


def break_from_row(row: Sequence[Any]) -> Break:
    return Break(
        tenant_id=row[0],
        break_id=row[1],
        break_class=BreakClass(row[2]),
        state=BreakState(row[3]),
        amount_minor=int(row[4]),
        currency=row[5],
        direction=Direction(row[6]),
        ledger_account_id=row[7],
        detected_at_us=int(row[8]),
        owner=row[9],
        reason=row[10],
        line_fingerprint=row[11],
        expected_id=row[12],
        statement_id=row[13],
        resolution=row[14],
        resolved_by=row[15],
        resolved_at_us=int(row[16]),
        resolution_entry_id=row[17],
        note=row[18],
        cause=row[19],
    )


def _break_row(b: Break) -> tuple[Any, ...]:
    return (
        b.tenant_id,
        b.break_id,
        b.break_class.value,
        b.state.value,
        b.amount_minor,
        b.currency,
        b.direction.value,
        b.ledger_account_id,
        b.detected_at_us,
        b.owner,
        b.reason,
        b.line_fingerprint,
        b.expected_id,
        b.statement_id,
        b.resolution,
        b.resolved_by,
        b.resolved_at_us,
        b.resolution_entry_id,
        b.note,
        b.cause,
    )


def _line_row(line: Line, match_id: str) -> tuple[Any, ...]:
    return (
        line.tenant_id,
        line.fingerprint,
        line.statement_id,
        line.ledger_account_id,
        line.position,
        line.amount_minor,
        line.currency,
        line.direction.value,
        line.booking_date,
        line.value_date,
        line.status,
        line.end_to_end_id,
        line.instruction_id,
        line.bank_reference,
        line.remittance_reference,
        line.batch_id,
        line.return_reason,
        match_id,
        _json(
            {
                "details": line.details,
                "batch_count": line.batch_count,
                "reversal": line.reversal,
                "source_path": line.source_path,
            }
        ),
    )


def statement_from_row(row: Sequence[Any]) -> StatementRecord:
    return StatementRecord(
        tenant_id=row[0],
        statement_id=row[1],
        file_sha256=row[2],
        file_fingerprint=row[3],
        kind=row[4],
        message_name=row[5],
        bank_statement_id=row[6],
        bank_account=row[7],
        ledger_account_id=row[8],
        currency=row[9],
        line_count=int(row[10]),
        new_line_count=int(row[11]),
        opening_minor=None if row[12] is None else int(row[12]),
        closing_minor=None if row[13] is None else int(row[13]),
        closing_date=row[14],
        balances_agree=None if row[15] is None else bool(row[15]),
        ledger_closing_minor=None if row[16] is None else int(row[16]),
        imported_at_us=int(row[17]),
        imported_by=row[18],
    )


def _statement_row(s: StatementRecord) -> tuple[Any, ...]:
    return (
        s.tenant_id,
        s.statement_id,
        s.file_sha256,
        s.file_fingerprint,
        s.kind,
        s.message_name,
        s.bank_statement_id,
        s.bank_account,
        s.ledger_account_id,
        s.currency,
        s.line_count,
        s.new_line_count,
        s.opening_minor,
        s.closing_minor,
        s.closing_date,
        None if s.balances_agree is None else int(s.balances_agree),
        s.ledger_closing_minor,
        s.imported_at_us,
        s.imported_by,
    )


class Tx:
    """The reads and writes of one reconciliation transaction (a cursor of
    the ledger store's): what the matcher looks up, and what it writes."""

    def __init__(self, store: LedgerStore, cur: Any) -> None:
        self.store = store
        self.cur = cur
        self.p = store.placeholder

    def _sql(self, text: str) -> str:
        return text.replace("%s", self.p)

    def _marks(self, n: int) -> str:
        return ", ".join([self.p] * n)

    # ---- statements and lines ----

    def statements_of_file(
        self, tenant_id: str, file_sha256: str, fingerprint: str
    ) -> list[StatementRecord]:
        self.cur.execute(
            self._sql(
                f"SELECT {_STATEMENT_COLUMNS} FROM statements WHERE tenant_id = %s "
                "AND (file_sha256 = %s OR file_fingerprint = %s) ORDER BY statement_id"
            ),
            (tenant_id, file_sha256, fingerprint),
        )
        return [statement_from_row(r) for r in self.cur.fetchall()]

    def get_statement(self, tenant_id: str, statement_id: str) -> StatementRecord | None:
        self.cur.execute(
            self._sql(
                f"SELECT {_STATEMENT_COLUMNS} FROM statements "
                "WHERE tenant_id = %s AND statement_id = %s"
            ),
            (tenant_id, statement_id),
        )
        row = self.cur.fetchone()
        return statement_from_row(row) if row else None

    def statement_lines(
        self, tenant_id: str, statement_id: str, limit: int
    ) -> list[tuple[Any, ...]]:
        self.cur.execute(
            self._sql(
                "SELECT fingerprint, position, amount_minor, currency, direction, booking_date, "
                "value_date, status, end_to_end_id, match_id FROM statement_lines "
                "WHERE tenant_id = %s AND statement_id = %s ORDER BY position LIMIT %s"
            ),
            (tenant_id, statement_id, limit),
        )
        return [tuple(r) for r in self.cur.fetchall()]

    def list_statements(
        self, tenant_id: str, before_us: int, before_id: str, limit: int
    ) -> list[StatementRecord]:
        """Statements imported before (`before_us`, `before_id`), newest
        first; `before_us` 0 starts at the newest."""
        where = "tenant_id = %s"
        params: list[Any] = [tenant_id]
        if before_us:
            where += " AND (imported_at_us < %s OR (imported_at_us = %s AND statement_id < %s))"
            params += [before_us, before_us, before_id]
        self.cur.execute(
            self._sql(
                f"SELECT {_STATEMENT_COLUMNS} FROM statements WHERE {where} "
                "ORDER BY imported_at_us DESC, statement_id DESC LIMIT %s"
            ),
            (*params, limit),
        )
        return [statement_from_row(r) for r in self.cur.fetchall()]

    def line_row(self, tenant_id: str, fingerprint: str) -> tuple[Any, ...] | None:
        """One statement line in `statement_lines`' shape (codec.line)."""
        self.cur.execute(
            self._sql(
                "SELECT fingerprint, position, amount_minor, currency, direction, booking_date, "
                "value_date, status, end_to_end_id, match_id FROM statement_lines "
                "WHERE tenant_id = %s AND fingerprint = %s"
            ),
            (tenant_id, fingerprint),
        )
        row = self.cur.fetchone()
        return tuple(row) if row else None

    def known_lines(self, tenant_id: str, fingerprints: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(fingerprints):
            self.cur.execute(
                self._sql(
                    "SELECT fingerprint FROM statement_lines WHERE tenant_id = %s "
                    f"AND fingerprint IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            found.update(r[0] for r in self.cur.fetchall())
        return found

    def insert_statements(self, records: Sequence[StatementRecord]) -> None:
        self.store._insert_many(
            self.cur, "statements", _STATEMENT_COLUMNS, [_statement_row(s) for s in records]
        )

    def insert_lines(self, lines: Sequence[Line], match_of: dict[str, str]) -> None:
        self.store._insert_many(
            self.cur,
            "statement_lines",
            _LINE_COLUMNS,
            # In key order (the fingerprint): each leaf of the primary key's
            # index is then found warm and filled once, not revisited at random.
            sorted(
                [_line_row(line, match_of.get(line.fingerprint, "")) for line in lines],
                key=_second,
            ),
        )

    def set_line_match(self, tenant_id: str, fingerprint: str, match_id: str) -> None:
        self.cur.execute(
            self._sql(
                "UPDATE statement_lines SET match_id = %s WHERE tenant_id = %s AND fingerprint = %s"
            ),
            (match_id, tenant_id, fingerprint),
        )

    def get_line(self, tenant_id: str, fingerprint: str) -> tuple[Any, ...] | None:
        self.cur.execute(
            self._sql(
                "SELECT amount_minor, currency, direction, booking_date, value_date, match_id, "
                "ledger_account_id FROM statement_lines WHERE tenant_id = %s AND fingerprint = %s"
            ),
            (tenant_id, fingerprint),
        )
        row = self.cur.fetchone()
        return tuple(row) if row else None

    # ---- expected payments ----

    def get_expected(self, tenant_id: str, expected_id: str) -> ExpectedPayment | None:
        self.cur.execute(
            self._sql(
                f"SELECT {_EXPECTED_COLUMNS} FROM expected_payments "
                "WHERE tenant_id = %s AND expected_id = %s"
            ),
            (tenant_id, expected_id),
        )
        row = self.cur.fetchone()
        return expected_from_row(row) if row else None

    def insert_expected(self, rows: Sequence[ExpectedPayment]) -> None:
        self.store._insert_many(
            self.cur, "expected_payments", _EXPECTED_COLUMNS, [expected_row(e) for e in rows]
        )

    def expected_by(
        self, tenant_id: str, kind: str, values: Iterable[str]
    ) -> list[ExpectedPayment]:
        """Expected payments whose reference of `kind` (REFERENCE_COLUMNS) is
        one of `values`, whatever their state."""
        column = REFERENCE_COLUMNS[kind]
        wanted = sorted({v for v in values if v})
        found: list[ExpectedPayment] = []
        for chunk in _chunks(wanted):
            self.cur.execute(
                self._sql(
                    f"SELECT {_EXPECTED_COLUMNS} FROM expected_payments WHERE tenant_id = %s "
                    # "<> ''" lets the planner use the partial index.
                    f"AND {column} <> '' AND {column} IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            found.extend(expected_from_row(r) for r in self.cur.fetchall())
        return found

    def open_expected_near(
        self, tenant_id: str, ledger_account_id: str, low_minor: int, high_minor: int, limit: int
    ) -> list[tuple[str, str, str, int, int, int, str, str, str]]:
        """Open expected payments of the account whose amount is in [low, high],
        nearest the middle first, as the terms matching by amount compares:
        (expected_id, direction, currency, amount, min, max, date_from,
        date_to, end_to_end_id). Most are looked at and passed over, so none
        is read whole (`get_expected` reads the one chosen)."""
        self.cur.execute(
            self._sql(
                "SELECT expected_id, direction, currency, amount_minor, amount_min_minor, "
                "amount_max_minor, date_from, date_to, end_to_end_id "
                "FROM expected_payments WHERE tenant_id = %s "
                "AND ledger_account_id = %s AND state = 'open' "
                "AND amount_minor BETWEEN %s AND %s "
                "ORDER BY ABS(amount_minor - %s), expected_id LIMIT %s"
            ),
            (
                tenant_id,
                ledger_account_id,
                low_minor,
                high_minor,
                (low_minor + high_minor) // 2,
                limit,
            ),
        )
        return [
            (r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), r[6], r[7], r[8])
            for r in self.cur.fetchall()
        ]

    def open_expected_due(
        self, tenant_id: str, ledger_account_id: str, date_to_before: str, limit: int
    ) -> list[ExpectedPayment]:
        """Open expected payments of the account whose window ended before the day."""
        self.cur.execute(
            self._sql(
                f"SELECT {_EXPECTED_COLUMNS} FROM expected_payments WHERE tenant_id = %s "
                "AND ledger_account_id = %s AND state = 'open' AND date_to < %s "
                "ORDER BY date_to, expected_id LIMIT %s"
            ),
            (tenant_id, ledger_account_id, date_to_before, limit),
        )
        return [expected_from_row(r) for r in self.cur.fetchall()]

    def accounts_with_open_expected_before(
        self, date_to_before: str, limit: int
    ) -> list[tuple[str, str]]:
        """(tenant, account) of open expected payments whose window ended
        before the day, every tenant's (the sweep's scan, like hold expiry's;
        on a distributed engine it fans out)."""
        self.cur.execute(
            self._sql(
                "SELECT DISTINCT tenant_id, ledger_account_id FROM expected_payments "
                "WHERE state = 'open' AND date_to < %s ORDER BY tenant_id, ledger_account_id "
                "LIMIT %s"
            ),
            (date_to_before, limit),
        )
        return [(r[0], r[1]) for r in self.cur.fetchall()]

    def set_expected_states(
        self, tenant_id: str, changes: Sequence[tuple[str, ExpectedState, str]]
    ) -> None:
        """(expected_id, state, match_id) for each."""
        if changes:
            self.cur.executemany(
                self._sql(
                    "UPDATE expected_payments SET state = %s, match_id = %s "
                    "WHERE tenant_id = %s AND expected_id = %s"
                ),
                # In key order, like insert_lines.
                [
                    (state.value, match_id, tenant_id, eid)
                    for eid, state, match_id in sorted(changes, key=_first)
                ],
            )

    # ---- matches ----

    def insert_matches(self, matches: Sequence[Match]) -> None:
        self.store._insert_many(
            self.cur,
            "matches",
            "tenant_id, match_id, rule, confidence, line_fingerprints, expected_ids, entry_id, "
            "actor, created_at_us",
            [
                (
                    m.tenant_id,
                    m.match_id,
                    m.rule.value,
                    m.confidence,
                    _json(m.line_fingerprints),
                    _json(m.expected_ids),
                    m.entry_ids[0] if m.entry_ids else "",
                    m.actor,
                    m.created_at_us,
                )
                for m in sorted(matches, key=_match_id)
            ],
        )

    def get_match(self, tenant_id: str, match_id: str) -> Match | None:
        self.cur.execute(
            self._sql(
                "SELECT rule, confidence, line_fingerprints, expected_ids, entry_id, actor, "
                "created_at_us FROM matches WHERE tenant_id = %s AND match_id = %s"
            ),
            (tenant_id, match_id),
        )
        r = self.cur.fetchone()
        if not r:
            return None
        return Match(
            tenant_id=tenant_id,
            match_id=match_id,
            rule=Rule(r[0]),
            confidence=float(r[1]),
            line_fingerprints=tuple(json.loads(r[2])),
            expected_ids=tuple(json.loads(r[3])),
            entry_ids=(r[4],) if r[4] else (),
            actor=r[5],
            created_at_us=int(r[6]),
        )

    def matched_entries(self, tenant_id: str, entry_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(set(entry_ids))):
            self.cur.execute(
                self._sql(
                    "SELECT entry_id FROM matches WHERE tenant_id = %s AND entry_id <> '' "
                    f"AND entry_id IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            found.update(r[0] for r in self.cur.fetchall())
        return found

    # ---- the ledger, read in the same transaction ----

    def entries_by_idempotency_key(self, tenant_id: str, keys: Sequence[str]) -> dict[str, str]:
        """idempotency key -> entry id, for the ledger entries created with those keys."""
        found: dict[str, str] = {}
        for chunk in _chunks(sorted({k for k in keys if k})):
            self.cur.execute(
                self._sql(
                    "SELECT idempotency_key, entry_key FROM entries WHERE tenant_id = %s "
                    f"AND idempotency_key IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            for key, entry_key in self.cur.fetchall():
                found[key] = entry_key.partition("/")[2]
        return found

    def bank_postings(
        self, tenant_id: str, ledger_account_id: str, entry_ids: Sequence[str]
    ) -> dict[str, tuple[int, int, int]]:
        """entry id -> (side, amount, posted_at_us) of its posting on the account."""
        found: dict[str, tuple[int, int, int]] = {}
        key = account_key(tenant_id, ledger_account_id)
        for chunk in _chunks(sorted(set(entry_ids))):
            self.cur.execute(
                self._sql(
                    "SELECT entry_id, side, amount_minor, posted_at_us FROM postings "
                    "WHERE tenant_id = %s AND account_key = %s "
                    f"AND entry_id IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, key, *chunk),
            )
            for entry_id, side, amount, at in self.cur.fetchall():
                found[entry_id] = (int(side), int(amount), int(at))
        return found

    def bank_postings_between(
        self,
        tenant_id: str,
        ledger_account_id: str,
        side: Side,
        amount_low: int,
        amount_high: int,
        from_us: int,
        to_us: int,
        limit: int,
    ) -> list[tuple[str, int, int]]:
        """(entry id, amount, posted_at_us) of the account's postings in the window."""
        self.cur.execute(
            self._sql(
                "SELECT entry_id, amount_minor, posted_at_us FROM postings "
                "WHERE tenant_id = %s AND account_key = %s AND posted_at_us BETWEEN %s AND %s "
                "AND side = %s AND amount_minor BETWEEN %s AND %s "
                "ORDER BY posted_at_us, entry_id LIMIT %s"
            ),
            (
                tenant_id,
                account_key(tenant_id, ledger_account_id),
                from_us,
                to_us,
                int(side),
                amount_low,
                amount_high,
                limit,
            ),
        )
        return [(r[0], int(r[1]), int(r[2])) for r in self.cur.fetchall()]

    def unaccounted_bank_postings(
        self,
        tenant_id: str,
        ledger_account_id: str,
        from_us: int,
        to_us: int,
        skip_key_patterns: Sequence[str],
        limit: int,
    ) -> list[tuple[str, int, int, int]]:
        """(entry id, side, amount, posted_at_us) of the account's postings in
        the window that no match names and no expected payment names as its
        ledger entry, leaving out entries whose idempotency key is LIKE one of
        `skip_key_patterns` (those reconciled another way)."""
        skip = "".join(" AND e.idempotency_key NOT LIKE %s" for _ in skip_key_patterns)
        self.cur.execute(
            self._sql(
                "SELECT p.entry_id, p.side, p.amount_minor, p.posted_at_us FROM postings p "
                "JOIN entries e ON e.tenant_id = p.tenant_id "
                "AND e.entry_key = p.tenant_id || '/' || p.entry_id "
                "WHERE p.tenant_id = %s AND p.account_key = %s "
                f"AND p.posted_at_us BETWEEN %s AND %s{skip} "
                "AND NOT EXISTS (SELECT 1 FROM matches m WHERE m.tenant_id = p.tenant_id "
                "AND m.entry_id <> '' AND m.entry_id = p.entry_id) "
                "AND NOT EXISTS (SELECT 1 FROM expected_payments x "
                "WHERE x.tenant_id = p.tenant_id AND x.ledger_entry_id <> '' "
                "AND x.ledger_entry_id = p.entry_id) "
                "ORDER BY p.posted_at_us, p.entry_id LIMIT %s"
            ),
            (
                tenant_id,
                account_key(tenant_id, ledger_account_id),
                from_us,
                to_us,
                *skip_key_patterns,
                limit,
            ),
        )
        return [(r[0], int(r[1]), int(r[2]), int(r[3])) for r in self.cur.fetchall()]

    def bank_postings_window(
        self, tenant_id: str, ledger_account_id: str, from_us: int, to_us: int, limit: int
    ) -> list[tuple[str, int, int, str]]:
        """(entry id, side, amount, idempotency key) of the account's postings
        posted in [from_us, to_us]."""
        self.cur.execute(
            self._sql(
                "SELECT p.entry_id, p.side, p.amount_minor, e.idempotency_key FROM postings p "
                "JOIN entries e ON e.tenant_id = p.tenant_id "
                "AND e.entry_key = p.tenant_id || '/' || p.entry_id "
                "WHERE p.tenant_id = %s AND p.account_key = %s "
                "AND p.posted_at_us BETWEEN %s AND %s ORDER BY p.posted_at_us, p.entry_id LIMIT %s"
            ),
            (tenant_id, account_key(tenant_id, ledger_account_id), from_us, to_us, limit),
        )
        return [(r[0], int(r[1]), int(r[2]), r[3]) for r in self.cur.fetchall()]

    def matches_of_entries(self, tenant_id: str, entry_ids: Sequence[str]) -> dict[str, list[str]]:
        """entry id -> the match ids naming it."""
        found: dict[str, list[str]] = {}
        for chunk in _chunks(sorted(set(entry_ids))):
            self.cur.execute(
                self._sql(
                    "SELECT entry_id, match_id FROM matches WHERE tenant_id = %s "
                    f"AND entry_id <> '' AND entry_id IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            for entry_id, match_id in self.cur.fetchall():
                found.setdefault(entry_id, []).append(match_id)
        return found

    def expected_matches(
        self, tenant_id: str, entry_ids: Sequence[str], expected_ids: Sequence[str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """The match ids of the expected payments naming these ledger entries
        (entry id -> match id) and of these expected payments (expected id ->
        match id); unmatched ones are left out."""
        by_entry: dict[str, str] = {}
        by_id: dict[str, str] = {}
        for column, keys, out in (
            ("ledger_entry_id", entry_ids, by_entry),
            ("expected_id", expected_ids, by_id),
        ):
            for chunk in _chunks(sorted({k for k in keys if k})):
                self.cur.execute(
                    self._sql(
                        f"SELECT {column}, match_id FROM expected_payments WHERE tenant_id = %s "
                        f"AND {column} IN ({self._marks(len(chunk))}) AND match_id <> ''"
                    ),
                    (tenant_id, *chunk),
                )
                out.update((r[0], r[1]) for r in self.cur.fetchall())
        return by_entry, by_id

    def first_booking_days(self, tenant_id: str, match_ids: Sequence[str]) -> dict[str, str]:
        """match id -> the earliest booking date of its statement lines."""
        lines_of: dict[str, list[str]] = {}
        for chunk in _chunks(sorted(set(match_ids))):
            self.cur.execute(
                self._sql(
                    "SELECT match_id, line_fingerprints FROM matches WHERE tenant_id = %s "
                    f"AND match_id IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            for match_id, fingerprints in self.cur.fetchall():
                lines_of[match_id] = json.loads(fingerprints)
        day_of: dict[str, str] = {}
        wanted = sorted({fp for fps in lines_of.values() for fp in fps})
        for chunk in _chunks(wanted):
            self.cur.execute(
                self._sql(
                    "SELECT fingerprint, booking_date FROM statement_lines WHERE tenant_id = %s "
                    f"AND fingerprint IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            day_of.update((r[0], r[1]) for r in self.cur.fetchall())
        out: dict[str, str] = {}
        for match_id, fps in lines_of.items():
            days = [day_of[fp] for fp in fps if day_of.get(fp)]
            if days:
                out[match_id] = min(days)
        return out

    def resolved_breaks(self, tenant_id: str, break_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(set(break_ids))):
            self.cur.execute(
                self._sql(
                    "SELECT break_id FROM breaks WHERE tenant_id = %s AND state = %s "
                    f"AND break_id IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, BreakState.RESOLVED.value, *chunk),
            )
            found.update(r[0] for r in self.cur.fetchall())
        return found

    def bank_accounts(self, roles: Sequence[str], limit: int) -> list[tuple[str, str]]:
        """(tenant, account) of every tenant's bank accounts: those a
        statement was imported for, and those whose metadata `role` is one of
        `roles` (the payouts' bank accounts are opened as `payouts_bank`)."""
        found: set[tuple[str, str]] = set()
        self.cur.execute(
            self._sql(
                "SELECT DISTINCT tenant_id, ledger_account_id FROM statements "
                "ORDER BY tenant_id, ledger_account_id LIMIT %s"
            ),
            (limit,),
        )
        found.update((r[0], r[1]) for r in self.cur.fetchall())
        if roles:
            self.cur.execute(
                self._sql(
                    "SELECT tenant_id, account_id, metadata FROM accounts "
                    "WHERE metadata LIKE %s ORDER BY tenant_id, account_id LIMIT %s"
                ),
                ("%role%", limit),
            )
            for tenant_id, account_id, metadata in self.cur.fetchall():
                try:
                    role = json.loads(metadata or "{}").get("role", "")
                except (ValueError, AttributeError):
                    continue
                if role in roles:
                    found.add((tenant_id, account_id))
        return sorted(found)[:limit]

    def bank_balance_as_of(self, tenant_id: str, ledger_account_id: str, as_of_us: int) -> int:
        """The account's posted debits - credits at or before as_of_us (the
        bank's view of a bank account the ledger keeps as an asset)."""
        self.cur.execute(
            self._sql(
                "SELECT side, COALESCE(SUM(amount_minor), 0) FROM postings "
                "WHERE tenant_id = %s AND account_key = %s AND posted_at_us <= %s GROUP BY side"
            ),
            (tenant_id, account_key(tenant_id, ledger_account_id), as_of_us),
        )
        sums = {int(r[0]): int(r[1]) for r in self.cur.fetchall()}
        return sums.get(int(Side.DEBIT), 0) - sums.get(int(Side.CREDIT), 0)

    def account_currency(self, tenant_id: str, ledger_account_id: str) -> str | None:
        self.cur.execute(
            self._sql("SELECT currency FROM accounts WHERE tenant_id = %s AND account_key = %s"),
            (tenant_id, account_key(tenant_id, ledger_account_id)),
        )
        row = self.cur.fetchone()
        return str(row[0]) if row else None

    # ---- breaks ----

    def existing_breaks(self, tenant_id: str, break_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(sorted(set(break_ids))):
            self.cur.execute(
                self._sql(
                    "SELECT break_id FROM breaks WHERE tenant_id = %s "
                    f"AND break_id IN ({self._marks(len(chunk))})"
                ),
                (tenant_id, *chunk),
            )
            found.update(r[0] for r in self.cur.fetchall())
        return found

    def insert_breaks(self, breaks: Sequence[Break]) -> None:
        self.store._insert_many(self.cur, "breaks", _BREAK_COLUMNS, [_break_row(b) for b in breaks])

    def get_break(self, tenant_id: str, break_id: str) -> Break | None:
        self.cur.execute(
            self._sql(
                f"SELECT {_BREAK_COLUMNS} FROM breaks WHERE tenant_id = %s AND break_id = %s"
                f"{self.store.lock_suffix}"
            ),
            (tenant_id, break_id),
        )
        row = self.cur.fetchone()
        return break_from_row(row) if row else None

    def list_breaks(
        self,
        tenant_id: str,
        state: str,
        break_class: str,
        after: str,
        limit: int,
        after_detected_us: int | None = None,
    ) -> list[Break]:
        """By break id after `after`; or, with `after_detected_us` (-1: from
        the start), oldest detection first after (`after_detected_us`, `after`)."""
        oldest = after_detected_us is not None
        if oldest:
            where = [
                "tenant_id = %s",
                "(detected_at_us > %s OR (detected_at_us = %s AND break_id > %s))",
            ]
            params: list[Any] = [tenant_id, after_detected_us, after_detected_us, after]
        else:
            where = ["tenant_id = %s", "break_id > %s"]
            params = [tenant_id, after]
        if state:
            where.append("state = %s")
            params.append(state)
        if break_class:
            where.append("break_class = %s")
            params.append(break_class)
        self.cur.execute(
            self._sql(
                f"SELECT {_BREAK_COLUMNS} FROM breaks WHERE {' AND '.join(where)} "
                f"ORDER BY {'detected_at_us, break_id' if oldest else 'break_id'} LIMIT %s"
            ),
            (*params, limit),
        )
        return [break_from_row(r) for r in self.cur.fetchall()]

    def resolve_break(
        self,
        tenant_id: str,
        break_id: str,
        resolution: str,
        actor: str,
        now_us: int,
        entry_id: str,
        note: str,
    ) -> None:
        self.cur.execute(
            self._sql(
                "UPDATE breaks SET state = %s, resolution = %s, resolved_by = %s, "
                "resolved_at_us = %s, resolution_entry_id = %s, note = %s "
                "WHERE tenant_id = %s AND break_id = %s AND state = %s"
            ),
            (
                BreakState.RESOLVED.value,
                resolution,
                actor,
                now_us,
                entry_id,
                note,
                tenant_id,
                break_id,
                BreakState.OPEN.value,
            ),
        )

    def write_events(self, tenant_id: str, events: list[OutgoingEvent], now_us: int) -> None:
        self.store._write_outbox(self.cur, tenant_id, events, now_us)


class ReconStore:
    """Opens reconciliation transactions on the ledger store's connection."""

    def __init__(self, ledger_store: LedgerStore) -> None:
        self.ledger_store = ledger_store

    def create_schema(self) -> None:
        floating = "REAL" if self.ledger_store.dialect == "sqlite" else "DOUBLE PRECISION"
        with self.ledger_store._transaction() as cur:
            self.ledger_store._lock_schema(cur)
            for statement in SCHEMA:
                cur.execute(statement.format(float=floating))

    def run(self, work: Any) -> Any:
        """Runs `work(tx)` in one transaction, again when it loses a race."""

        def attempt() -> Any:
            with self.ledger_store._transaction() as cur:
                return work(Tx(self.ledger_store, cur))

        return self.ledger_store._retry_conflicts(attempt)
