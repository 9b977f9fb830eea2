"""Persistent state of the policy plane: tenants, bundles, the decision log,
labels, review cases with their outbox, consent, contacts and offers.

Every method is one short transaction. The decision log's hashes and
signatures are computed by `decision_log.py`; this module only stores rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.db import Database, Row, Tx, is_unique_violation

SCHEMA_DDL = """
CREATE TABLE IF NOT EXISTS policy_tenants (
  tenant_id TEXT PRIMARY KEY,
  display_name TEXT NOT NULL,
  created_at_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_bundles (
  version TEXT PRIMARY KEY,
  label TEXT NOT NULL,
  content_hash TEXT NOT NULL,
  source_json TEXT NOT NULL,
  rule_count BIGINT NOT NULL,
  sanctions_entry_count BIGINT NOT NULL,
  loaded_at_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_bundle_state (
  slot TEXT PRIMARY KEY,
  version TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_bundle_slot_history (
  id {serial_key},
  slot TEXT NOT NULL,
  version TEXT NOT NULL,
  is_set BIGINT NOT NULL,
  actor TEXT NOT NULL,
  reason TEXT NOT NULL,
  at_us BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS policy_bundle_slot_history_version
  ON policy_bundle_slot_history (version, id);
CREATE TABLE IF NOT EXISTS decision_log (
  chain_id TEXT NOT NULL,
  seq BIGINT NOT NULL,
  decision_id TEXT NOT NULL,
  tenant_id TEXT NOT NULL,
  account_id TEXT NOT NULL,
  idempotency_key TEXT NOT NULL,
  request_hash TEXT NOT NULL,
  recorded_at_us BIGINT NOT NULL,
  bundle_version TEXT NOT NULL,
  outcome TEXT NOT NULL,
  body TEXT NOT NULL,
  prev_hash TEXT NOT NULL,
  record_hash TEXT NOT NULL,
  key_id TEXT NOT NULL,
  signature TEXT NOT NULL,
  PRIMARY KEY (chain_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS decision_log_idem ON decision_log (tenant_id, idempotency_key);
CREATE UNIQUE INDEX IF NOT EXISTS decision_log_id ON decision_log (decision_id);
CREATE INDEX IF NOT EXISTS decision_log_tenant_time ON decision_log (tenant_id, recorded_at_us);
-- The decision search's index (ListDecisions): one row a logged decision,
-- written in the transaction that logs it and purged with it, so a search by
-- account, customer or time reads an index range, never the tenant's log.
CREATE TABLE IF NOT EXISTS decision_search (
  decision_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  recorded_at_us BIGINT NOT NULL,
  account_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  customer_token TEXT NOT NULL,
  chain_id TEXT NOT NULL,
  seq BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS decision_search_time
  ON decision_search (tenant_id, recorded_at_us, decision_id);
CREATE INDEX IF NOT EXISTS decision_search_account
  ON decision_search (tenant_id, account_id, recorded_at_us, decision_id);
CREATE INDEX IF NOT EXISTS decision_search_customer
  ON decision_search (tenant_id, customer_id, recorded_at_us, decision_id);
CREATE INDEX IF NOT EXISTS decision_search_token
  ON decision_search (tenant_id, customer_token, recorded_at_us, decision_id);
CREATE INDEX IF NOT EXISTS decision_search_chain ON decision_search (chain_id, seq);
-- One row once every decision logged before decision_search existed has
-- been indexed (DecisionLog.backfill_search): later starts skip the pass.
CREATE TABLE IF NOT EXISTS decision_search_backfill (
  id INTEGER PRIMARY KEY,
  decisions BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS decision_log_marks (
  chain_id TEXT NOT NULL,
  kind TEXT NOT NULL,
  seq BIGINT NOT NULL,
  record_hash TEXT NOT NULL,
  signature TEXT NOT NULL,
  PRIMARY KEY (chain_id, kind)
);
CREATE TABLE IF NOT EXISTS decision_labels (
  decision_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  label TEXT NOT NULL,
  labelled_at_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS review_cases (
  case_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  decision_id TEXT NOT NULL,
  status TEXT NOT NULL,
  body TEXT NOT NULL,
  opened_at_us BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS review_cases_tenant ON review_cases (tenant_id, status, case_id);
-- The human-overrule rate over time (CaseService.GetOverruleSeries): one row
-- a resolved case, written in the transaction that resolves it, so a window
-- of a tenant's resolutions is an index range, never its cases' bodies.
-- suggestion is the model's ('' when it had none); overruled is 1 when the
-- resolution differs from it.
CREATE TABLE IF NOT EXISTS case_resolutions (
  case_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  resolved_at_us BIGINT NOT NULL,
  suggestion TEXT NOT NULL,
  resolution TEXT NOT NULL,
  overruled BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS case_resolutions_time
  ON case_resolutions (tenant_id, resolved_at_us);
-- One row once every case resolved before case_resolutions existed has been
-- indexed (CaseDesk.backfill_resolutions): later starts skip the pass.
CREATE TABLE IF NOT EXISTS case_resolutions_backfill (
  id INTEGER PRIMARY KEY,
  cases BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS policy_outbox (
  event_id TEXT PRIMARY KEY,
  subject TEXT NOT NULL,
  data_hex TEXT NOT NULL,
  created_at_us BIGINT NOT NULL,
  published BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS contact_profiles (
  tenant_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  body TEXT NOT NULL,
  PRIMARY KEY (tenant_id, customer_id)
);
CREATE TABLE IF NOT EXISTS consents (
  tenant_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  channel TEXT NOT NULL,
  topic TEXT NOT NULL,
  body TEXT NOT NULL,
  PRIMARY KEY (tenant_id, customer_id, channel, topic)
);
CREATE TABLE IF NOT EXISTS contacts (
  tenant_id TEXT NOT NULL,
  contact_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  body TEXT NOT NULL,
  contacted_at_us BIGINT NOT NULL,
  PRIMARY KEY (tenant_id, contact_id)
);
CREATE INDEX IF NOT EXISTS contacts_time ON contacts (contacted_at_us);
CREATE INDEX IF NOT EXISTS contacts_customer
  ON contacts (tenant_id, customer_id, contacted_at_us);
CREATE TABLE IF NOT EXISTS offers (
  tenant_id TEXT NOT NULL,
  offer_id TEXT NOT NULL,
  body TEXT NOT NULL,
  PRIMARY KEY (tenant_id, offer_id)
);
CREATE TABLE IF NOT EXISTS offer_catalogs (
  tenant_id TEXT PRIMARY KEY,
  version BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS customer_profiles (
  tenant_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  verified_at_us BIGINT NOT NULL,
  body TEXT NOT NULL,
  PRIMARY KEY (tenant_id, customer_id)
);
CREATE TABLE IF NOT EXISTS customer_profile_changes (
  tenant_id TEXT NOT NULL,
  change_id TEXT NOT NULL,
  customer_id TEXT NOT NULL,
  recorded_at_us BIGINT NOT NULL,
  body TEXT NOT NULL,
  PRIMARY KEY (tenant_id, change_id)
);
CREATE INDEX IF NOT EXISTS customer_profile_changes_customer
  ON customer_profile_changes (tenant_id, customer_id, recorded_at_us)
"""


@dataclass(frozen=True, slots=True)
class LogRow:
    chain_id: str
    seq: int
    decision_id: str
    tenant_id: str
    account_id: str
    idempotency_key: str
    request_hash: str
    recorded_at_us: int
    bundle_version: str
    outcome: str
    body: str
    prev_hash: str
    record_hash: str
    key_id: str
    signature: str

    def values(self) -> tuple[Any, ...]:
        return (
            self.chain_id,
            self.seq,
            self.decision_id,
            self.tenant_id,
            self.account_id,
            self.idempotency_key,
            self.request_hash,
            self.recorded_at_us,
            self.bundle_version,
            self.outcome,
            self.body,
            self.prev_hash,
            self.record_hash,
            self.key_id,
            self.signature,
        )


_KEYS_PER_QUERY = 500
LOG_COLUMNS = (
    "chain_id, seq, decision_id, tenant_id, account_id, idempotency_key, request_hash, "
    "recorded_at_us, bundle_version, outcome, body, prev_hash, record_hash, key_id, signature"
)


@dataclass(frozen=True, slots=True)
class SearchRow:
    """What ListDecisions finds a logged decision by (decision_search)."""

    decision_id: str
    tenant_id: str
    recorded_at_us: int
    account_id: str
    customer_id: str
    # The token of the customer's name (pii.DecisionSealer.token); never the name.
    customer_token: str
    chain_id: str
    seq: int


@dataclass(frozen=True, slots=True)
class DecisionQuery:
    """A ListDecisions search: every set filter must match. `customer` is
    matched against the customer id or, when `by_token`, the name token."""

    tenant_id: str
    account_id: str = ""
    customer: str = ""
    by_token: bool = False
    start_us: int = 0
    end_us: int = 0


@dataclass(frozen=True, slots=True)
class ChainMark:
    """A signed position in a chain: `head` (last record) or `anchor` (last purged)."""

    seq: int
    record_hash: str
    signature: str


@dataclass(frozen=True, slots=True)
class CaseRow:
    case_id: str
    tenant_id: str
    decision_id: str
    status: str
    body: str
    opened_at_us: int


@dataclass(frozen=True, slots=True)
class ResolutionRow:
    """A resolved case as the overrule series counts it."""

    case_id: str
    tenant_id: str
    resolved_at_us: int
    suggestion: str
    resolution: str
    overruled: bool


@dataclass(frozen=True, slots=True)
class OverruleCount:
    """A bucket's resolutions: all, those with a model suggestion, and of
    those the ones resolved against it."""

    bucket: int
    resolved: int
    with_suggestion: int
    overruled: int


@dataclass(frozen=True, slots=True)
class OutboxRow:
    event_id: str
    subject: str
    data: bytes
    created_at_us: int = 0


def _log_row(row: Row) -> LogRow:
    return LogRow(*row)


class PolicyStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        # SELECT ... FOR UPDATE where rows can be locked (PostgreSQL); a
        # SQLite write transaction already excludes every other writer.
        self._row_locks = db.dialect == "postgres"
        db.migrate(SCHEMA_DDL.replace("{serial_key}", db.serial_key))

    # ------------------------------------------------------------ tenants
    def create_tenant(self, tenant_id: str, display_name: str, now_us: int) -> tuple[str, int]:
        """(display_name, created_at_us) of the tenant, created if new."""
        with self.db.tx() as tx:
            row = tx.one(
                "SELECT display_name, created_at_us FROM policy_tenants WHERE tenant_id = ?",
                (tenant_id,),
            )
            if row is not None:
                return str(row[0]), int(row[1])
            tx.execute(
                "INSERT INTO policy_tenants (tenant_id, display_name, created_at_us) "
                "VALUES (?, ?, ?)",
                (tenant_id, display_name, now_us),
            )
            return display_name, now_us

    def tenant_exists(self, tenant_id: str) -> bool:
        row = self.db.read_one("SELECT 1 FROM policy_tenants WHERE tenant_id = ?", (tenant_id,))
        return row is not None

    def tenant_ids(self) -> list[str]:
        with self.db.tx() as tx:
            return [str(r[0]) for r in tx.all("SELECT tenant_id FROM policy_tenants")]

    # ------------------------------------------------------------ bundles
    def put_bundle(
        self,
        version: str,
        label: str,
        content_hash: str,
        source_json: str,
        rule_count: int,
        entry_count: int,
        now_us: int,
    ) -> int:
        """Stores a bundle once; returns its (first) loaded_at_us."""
        with self.db.tx() as tx:
            row = tx.one("SELECT loaded_at_us FROM policy_bundles WHERE version = ?", (version,))
            if row is not None:
                return int(row[0])
            tx.execute(
                "INSERT INTO policy_bundles (version, label, content_hash, source_json, "
                "rule_count, sanctions_entry_count, loaded_at_us) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (version, label, content_hash, source_json, rule_count, entry_count, now_us),
            )
            return now_us

    def get_bundle(self, version: str) -> Row | None:
        with self.db.tx() as tx:
            return tx.one(
                "SELECT version, label, content_hash, source_json, rule_count, "
                "sanctions_entry_count, loaded_at_us FROM policy_bundles WHERE version = ?",
                (version,),
            )

    def list_bundles(self, limit: int, offset: int) -> list[Row]:
        with self.db.tx() as tx:
            return tx.all(
                "SELECT version, label, content_hash, source_json, rule_count, "
                "sanctions_entry_count, loaded_at_us FROM policy_bundles "
                "ORDER BY loaded_at_us DESC, version LIMIT ? OFFSET ?",
                (limit, offset),
            )

    def set_slot(
        self, slot: str, version: str, actor: str = "", reason: str = "", at_us: int = 0
    ) -> None:
        """Puts `version` in the slot (empty: clears it) and records the move
        in the slot history (who approved it, why, when) in the same
        transaction; a clear is recorded against the bundle it took out."""
        with self.db.tx() as tx:
            previous = tx.one("SELECT version FROM policy_bundle_state WHERE slot = ?", (slot,))
            tx.execute("DELETE FROM policy_bundle_state WHERE slot = ?", (slot,))
            if version:
                tx.execute(
                    "INSERT INTO policy_bundle_state (slot, version) VALUES (?, ?)", (slot, version)
                )
            moved = version or (str(previous[0]) if previous else "")
            if moved:
                tx.execute(
                    "INSERT INTO policy_bundle_slot_history (slot, version, is_set, actor, "
                    "reason, at_us) VALUES (?, ?, ?, ?, ?, ?)",
                    (slot, moved, 1 if version else 0, actor, reason, at_us),
                )

    def slot_history(self, versions: list[str]) -> dict[str, list[Row]]:
        """Each bundle's slot moves, oldest first: (slot, is_set, actor,
        reason, at_us) rows per version."""
        history: dict[str, list[Row]] = {}
        if not versions:
            return history
        marks = ", ".join("?" * len(versions))
        with self.db.tx() as tx:
            rows = tx.all(
                "SELECT version, slot, is_set, actor, reason, at_us FROM "
                f"policy_bundle_slot_history WHERE version IN ({marks}) ORDER BY id",
                tuple(versions),
            )
        for row in rows:
            history.setdefault(str(row[0]), []).append(row[1:])
        return history

    def get_slot(self, slot: str) -> str:
        with self.db.tx() as tx:
            row = tx.one("SELECT version FROM policy_bundle_state WHERE slot = ?", (slot,))
            return str(row[0]) if row else ""

    # ------------------------------------------------------------ decision log
    def chain_mark(self, chain_id: str, kind: str) -> ChainMark | None:
        with self.db.tx() as tx:
            return _mark(tx, chain_id, kind)

    def lock_head(self, tx: Tx, chain_id: str) -> ChainMark | None:
        """The chain's head as committed, its row locked for the rest of `tx`
        (PostgreSQL; SQLite's write transaction holds the whole database), so
        two writers of one chain take turns. A chain with no head yet has no
        row to lock: two first appends race, and the loser's insert of
        sequence 1 is a unique violation that the writer retries."""
        return _mark(tx, chain_id, "head", lock=self._row_locks)

    def chain_ids(self, with_rows: bool) -> list[str]:
        """The chains in the store: those with a mark, and with `with_rows`
        also those holding records (a chain whose marks were removed still
        has to be verified; a full scan, which verification pays anyway)."""
        sql = "SELECT chain_id FROM decision_log_marks"
        if with_rows:
            sql += " UNION SELECT chain_id FROM decision_log"
        with self.db.read() as tx:
            return sorted({str(r[0]) for r in tx.all(sql)})

    def find_many_by_idempotency(
        self, tx: Tx, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], LogRow]:
        """The logged rows of (tenant, idempotency key) pairs, in a few queries
        (one per tenant and 500 keys) rather than one per decision."""
        by_tenant: dict[str, list[str]] = {}
        for tenant_id, key in keys:
            by_tenant.setdefault(tenant_id, []).append(key)
        found: dict[tuple[str, str], LogRow] = {}
        for tenant_id, tenant_keys in by_tenant.items():
            unique = sorted(set(tenant_keys))
            for start in range(0, len(unique), _KEYS_PER_QUERY):
                chunk = unique[start : start + _KEYS_PER_QUERY]
                marks = ", ".join("?" for _ in chunk)
                rows = tx.all(
                    f"SELECT {LOG_COLUMNS} FROM decision_log "
                    f"WHERE tenant_id = ? AND idempotency_key IN ({marks})",
                    [tenant_id, *chunk],
                )
                for raw in rows:
                    row = _log_row(raw)
                    found[(row.tenant_id, row.idempotency_key)] = row
        return found

    def insert_log_rows(
        self,
        tx: Tx,
        rows: Sequence[LogRow],
        head: ChainMark,
        cases: Sequence[CaseRow],
        search: Sequence[SearchRow] = (),
    ) -> None:
        marks = ", ".join("?" for _ in range(15))
        tx.execute_many(
            f"INSERT INTO decision_log ({LOG_COLUMNS}) VALUES ({marks})",
            [row.values() for row in rows],
        )
        tx.execute_many(
            "INSERT INTO decision_search (decision_id, tenant_id, recorded_at_us, account_id, "
            "customer_id, customer_token, chain_id, seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    s.decision_id,
                    s.tenant_id,
                    s.recorded_at_us,
                    s.account_id,
                    s.customer_id,
                    s.customer_token,
                    s.chain_id,
                    s.seq,
                )
                for s in search
            ],
        )
        tx.execute_many(
            "INSERT INTO review_cases (case_id, tenant_id, decision_id, status, body, "
            "opened_at_us) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (c.case_id, c.tenant_id, c.decision_id, c.status, c.body, c.opened_at_us)
                for c in cases
            ],
        )
        _put_mark(tx, rows[0].chain_id, "head", head)

    def get_decision(self, decision_id: str) -> LogRow | None:
        with self.db.read() as tx:
            row = tx.one(
                f"SELECT {LOG_COLUMNS} FROM decision_log WHERE decision_id = ?", (decision_id,)
            )
            return _log_row(row) if row else None

    def get_decision_by_key(self, tenant_id: str, idempotency_key: str) -> LogRow | None:
        with self.db.read() as tx:
            row = tx.one(
                f"SELECT {LOG_COLUMNS} FROM decision_log "
                "WHERE tenant_id = ? AND idempotency_key = ?",
                (tenant_id, idempotency_key),
            )
            return _log_row(row) if row else None

    def chain_page(self, chain_id: str, after_seq: int, limit: int) -> list[LogRow]:
        with self.db.read() as tx:
            rows = tx.all(
                f"SELECT {LOG_COLUMNS} FROM decision_log WHERE chain_id = ? AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (chain_id, after_seq, limit),
            )
        return [_log_row(r) for r in rows]

    def window_page(
        self,
        tenant_id: str,
        account_id: str,
        start_us: int,
        end_us: int,
        after: tuple[int, str],
        limit: int,
    ) -> list[LogRow]:
        """Decisions of a tenant in [start_us, end_us), ordered by time then id."""
        sql = (
            f"SELECT {LOG_COLUMNS} FROM decision_log WHERE tenant_id = ? "
            "AND recorded_at_us >= ? AND recorded_at_us < ? "
            "AND (recorded_at_us > ? OR (recorded_at_us = ? AND decision_id > ?))"
        )
        params: list[Any] = [tenant_id, start_us, end_us, after[0], after[0], after[1]]
        if account_id:
            sql += " AND account_id = ?"
            params.append(account_id)
        sql += " ORDER BY recorded_at_us, decision_id LIMIT ?"
        params.append(limit)
        with self.db.read() as tx:
            return [_log_row(r) for r in tx.all(sql, params)]

    def search_backfilled(self) -> bool:
        with self.db.read() as tx:
            return tx.one("SELECT 1 FROM decision_search_backfill WHERE id = 1") is not None

    def unindexed_page(self, after: tuple[str, int], limit: int) -> list[LogRow]:
        """Logged decisions decision_search lacks, in log order after `after`
        (chain, seq): the primary key's order, each checked against the
        search index's primary key, so the pass reads the log once."""
        with self.db.read() as tx:
            rows = tx.all(
                f"SELECT {', '.join('l.' + c.strip() for c in LOG_COLUMNS.split(','))} "
                "FROM decision_log l WHERE (l.chain_id > ? OR (l.chain_id = ? AND l.seq > ?)) "
                "AND NOT EXISTS (SELECT 1 FROM decision_search s "
                "WHERE s.decision_id = l.decision_id) ORDER BY l.chain_id, l.seq LIMIT ?",
                (after[0], after[0], after[1], limit),
            )
        return [_log_row(r) for r in rows]

    def index_decisions(self, search: Sequence[SearchRow]) -> None:
        """Search rows for decisions already logged; one another replica
        indexed meanwhile is left as it is."""
        with self.db.tx() as tx:
            tx.execute_many(
                "INSERT INTO decision_search (decision_id, tenant_id, recorded_at_us, "
                "account_id, customer_id, customer_token, chain_id, seq) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (decision_id) DO NOTHING",
                [
                    (
                        s.decision_id,
                        s.tenant_id,
                        s.recorded_at_us,
                        s.account_id,
                        s.customer_id,
                        s.customer_token,
                        s.chain_id,
                        s.seq,
                    )
                    for s in search
                ],
            )

    def mark_search_backfilled(self, decisions: int) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "INSERT INTO decision_search_backfill (id, decisions) VALUES (1, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (decisions,),
            )

    def search_page(
        self, query: DecisionQuery, before: tuple[int, str] | None, limit: int
    ) -> list[LogRow]:
        """Logged decisions matching `query`, newest first (by log time, then
        id descending), after the position `before`. Each filter narrows one
        index of decision_search (account, customer id, name token or time),
        read in its order: a page costs its size, not the tenant's log."""
        sql = (
            f"SELECT {', '.join('l.' + c.strip() for c in LOG_COLUMNS.split(','))} "
            "FROM decision_search s JOIN decision_log l ON l.decision_id = s.decision_id "
            "WHERE s.tenant_id = ?"
        )
        params: list[Any] = [query.tenant_id]
        if query.account_id:
            sql += " AND s.account_id = ?"
            params.append(query.account_id)
        if query.customer:
            sql += " AND s.customer_token = ?" if query.by_token else " AND s.customer_id = ?"
            params.append(query.customer)
        if query.start_us:
            sql += " AND s.recorded_at_us >= ?"
            params.append(query.start_us)
        if query.end_us:
            sql += " AND s.recorded_at_us < ?"
            params.append(query.end_us)
        if before is not None:
            sql += " AND (s.recorded_at_us < ? OR (s.recorded_at_us = ? AND s.decision_id < ?))"
            params.extend([before[0], before[0], before[1]])
        sql += " ORDER BY s.recorded_at_us DESC, s.decision_id DESC LIMIT ?"
        params.append(limit)
        with self.db.read() as tx:
            return [_log_row(r) for r in tx.all(sql, params)]

    def window_versions(
        self, tenant_id: str, account_id: str, start_us: int, end_us: int
    ) -> list[str]:
        """The bundle versions the decisions of a window were made under."""
        sql = (
            "SELECT DISTINCT bundle_version FROM decision_log WHERE tenant_id = ? "
            "AND recorded_at_us >= ? AND recorded_at_us < ?"
        )
        params: list[Any] = [tenant_id, start_us, end_us]
        if account_id:
            sql += " AND account_id = ?"
            params.append(account_id)
        with self.db.read() as tx:
            return sorted(str(r[0]) for r in tx.all(sql, params))

    def purge_until(self, chain_id: str, last_seq: int, anchor: ChainMark) -> int:
        """Deletes the chain up to `last_seq` and moves its anchor there; an
        anchor another replica's sweep already moved as far stays put."""
        with self.db.tx() as tx:
            current = _mark(tx, chain_id, "anchor", lock=self._row_locks)
            if current is not None and current.seq >= last_seq:
                return 0
            count = tx.execute(
                "DELETE FROM decision_log WHERE chain_id = ? AND seq <= ?", (chain_id, last_seq)
            )
            tx.execute(
                "DELETE FROM decision_search WHERE chain_id = ? AND seq <= ?", (chain_id, last_seq)
            )
            _put_mark(tx, chain_id, "anchor", anchor)
            return count

    def count_decisions(self, tenant_id: str) -> int:
        with self.db.read() as tx:
            row = tx.one("SELECT COUNT(*) FROM decision_log WHERE tenant_id = ?", (tenant_id,))
            return int(row[0]) if row else 0

    # ------------------------------------------------------------ labels
    def put_label(self, tenant_id: str, decision_id: str, label: str, now_us: int) -> None:
        with self.db.tx() as tx:
            tx.execute("DELETE FROM decision_labels WHERE decision_id = ?", (decision_id,))
            tx.execute(
                "INSERT INTO decision_labels (decision_id, tenant_id, label, labelled_at_us) "
                "VALUES (?, ?, ?, ?)",
                (decision_id, tenant_id, label, now_us),
            )

    def labels_for(self, decision_ids: Sequence[str]) -> dict[str, str]:
        if not decision_ids:
            return {}
        marks = ", ".join("?" for _ in decision_ids)
        with self.db.read() as tx:
            rows = tx.all(
                f"SELECT decision_id, label FROM decision_labels WHERE decision_id IN ({marks})",
                decision_ids,
            )
        return {str(r[0]): str(r[1]) for r in rows}

    # ------------------------------------------------------------ cases
    def get_case(self, case_id: str) -> CaseRow | None:
        with self.db.read() as tx:
            row = tx.one(
                "SELECT case_id, tenant_id, decision_id, status, body, opened_at_us "
                "FROM review_cases WHERE case_id = ?",
                (case_id,),
            )
            return CaseRow(*row) if row else None

    def list_cases(
        self, tenant_id: str, status: str, after_case_id: str, limit: int
    ) -> list[CaseRow]:
        sql = (
            "SELECT case_id, tenant_id, decision_id, status, body, opened_at_us "
            "FROM review_cases WHERE tenant_id = ? AND case_id > ?"
        )
        params: list[Any] = [tenant_id, after_case_id]
        if status:
            sql += " AND status = ?"
            params.append(status)
        sql += " ORDER BY case_id LIMIT ?"
        params.append(limit)
        with self.db.read() as tx:
            return [CaseRow(*r) for r in tx.all(sql, params)]

    def update_case(
        self,
        case: CaseRow,
        expected_status: str,
        event: OutboxRow | None,
        resolution: ResolutionRow | None = None,
    ) -> bool:
        """Compare-and-set on status; with the case's event and (resolving
        it) its row of case_resolutions in the same transaction."""
        with self.db.tx() as tx:
            changed = tx.execute(
                "UPDATE review_cases SET status = ?, body = ? WHERE case_id = ? AND status = ?",
                (case.status, case.body, case.case_id, expected_status),
            )
            if changed != 1:
                return False
            if resolution is not None:
                _insert_resolutions(tx, [resolution])
            if event is not None:
                tx.execute(
                    "INSERT INTO policy_outbox (event_id, subject, data_hex, created_at_us, "
                    "published) VALUES (?, ?, ?, ?, 0)",
                    (event.event_id, event.subject, event.data.hex(), event.created_at_us),
                )
            return True

    def overrule_counts(
        self, tenant_id: str, start_us: int, end_us: int, bucket_us: int
    ) -> list[OverruleCount]:
        """A tenant's resolutions in [start_us, end_us) counted per bucket of
        bucket_us from start_us (bucket 0 first); buckets without one are
        absent. One range of case_resolutions_time."""
        with self.db.read() as tx:
            rows = tx.all(
                "SELECT (resolved_at_us - CAST(? AS BIGINT)) / CAST(? AS BIGINT) AS bucket, "
                "COUNT(*), SUM(CASE WHEN suggestion <> '' THEN 1 ELSE 0 END), SUM(overruled) "
                "FROM case_resolutions WHERE tenant_id = ? AND resolved_at_us >= ? "
                "AND resolved_at_us < ? GROUP BY 1 ORDER BY 1",
                (start_us, bucket_us, tenant_id, start_us, end_us),
            )
        return [OverruleCount(int(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def overrule_totals(self, tenant_id: str) -> tuple[int, int]:
        """A tenant's resolutions with a model suggestion, and of those the
        ones overruled, over all time."""
        with self.db.read() as tx:
            row = tx.one(
                "SELECT COUNT(*), SUM(overruled) FROM case_resolutions "
                "WHERE tenant_id = ? AND suggestion <> ''",
                (tenant_id,),
            )
        return (int(row[0]), int(row[1] or 0)) if row else (0, 0)

    def resolutions_backfilled(self) -> bool:
        with self.db.read() as tx:
            return tx.one("SELECT 1 FROM case_resolutions_backfill WHERE id = 1") is not None

    def unindexed_resolved_cases(self, after_case_id: str, limit: int) -> list[CaseRow]:
        """Resolved cases case_resolutions lacks, by id after after_case_id."""
        with self.db.read() as tx:
            rows = tx.all(
                "SELECT c.case_id, c.tenant_id, c.decision_id, c.status, c.body, c.opened_at_us "
                "FROM review_cases c WHERE c.case_id > ? AND c.status = 'resolved' "
                "AND NOT EXISTS (SELECT 1 FROM case_resolutions r WHERE r.case_id = c.case_id) "
                "ORDER BY c.case_id LIMIT ?",
                (after_case_id, limit),
            )
        return [CaseRow(*r) for r in rows]

    def index_resolutions(self, rows: Sequence[ResolutionRow]) -> None:
        """Rows for cases already resolved; one another replica indexed
        meanwhile is left as it is."""
        with self.db.tx() as tx:
            _insert_resolutions(tx, rows)

    def mark_resolutions_backfilled(self, cases: int) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "INSERT INTO case_resolutions_backfill (id, cases) VALUES (1, ?) "
                "ON CONFLICT (id) DO NOTHING",
                (cases,),
            )

    # ------------------------------------------------------------ outbox
    # Read by the runtime's OutboxRelay (triplane/runtime/outbox.py).
    def unsent(self, limit: int) -> list[OutgoingEvent]:
        with self.db.tx() as tx:
            rows = tx.all(
                "SELECT event_id, subject, data_hex FROM policy_outbox WHERE published = 0 "
                "ORDER BY created_at_us, event_id LIMIT ?",
                (limit,),
            )
        return [OutgoingEvent(str(r[0]), str(r[1]), bytes.fromhex(str(r[2]))) for r in rows]

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        with self.db.tx() as tx:
            for event_id in event_ids:
                tx.execute("UPDATE policy_outbox SET published = 1 WHERE event_id = ?", (event_id,))

    def delete_sent_before(self, before_us: int) -> int:
        """Published events created before `before_us` (JetStream keeps them)."""
        with self.db.tx() as tx:
            before = tx.all(
                "SELECT COUNT(*) FROM policy_outbox WHERE published = 1 AND created_at_us < ?",
                (before_us,),
            )
            tx.execute(
                "DELETE FROM policy_outbox WHERE published = 1 AND created_at_us < ?", (before_us,)
            )
        return int(before[0][0])

    # ------------------------------------------------------------ consent
    def put_profile(self, tenant_id: str, customer_id: str, body: str) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "DELETE FROM contact_profiles WHERE tenant_id = ? AND customer_id = ?",
                (tenant_id, customer_id),
            )
            tx.execute(
                "INSERT INTO contact_profiles (tenant_id, customer_id, body) VALUES (?, ?, ?)",
                (tenant_id, customer_id, body),
            )

    def put_consent(
        self, tenant_id: str, customer_id: str, channel: str, topic: str, body: str
    ) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "DELETE FROM consents WHERE tenant_id = ? AND customer_id = ? AND channel = ? "
                "AND topic = ?",
                (tenant_id, customer_id, channel, topic),
            )
            tx.execute(
                "INSERT INTO consents (tenant_id, customer_id, channel, topic, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (tenant_id, customer_id, channel, topic, body),
            )

    def contact_state(
        self, tenant_id: str, customer_id: str, max_contacts: int
    ) -> tuple[str | None, list[str], list[str]]:
        """A customer's contact profile, consents and newest `max_contacts`
        contacts (oldest first), in one statement: one round trip."""
        with self.db.read() as tx:
            rows = tx.all(
                "SELECT 'p', body, 0 FROM contact_profiles WHERE tenant_id = ? AND customer_id = ? "
                "UNION ALL SELECT 'c', body, 0 FROM consents "
                "WHERE tenant_id = ? AND customer_id = ? "
                "UNION ALL SELECT 'k', body, contacted_at_us FROM (SELECT body, contacted_at_us "
                "FROM contacts WHERE tenant_id = ? AND customer_id = ? "
                "ORDER BY contacted_at_us DESC, contact_id DESC LIMIT ?) newest",
                (tenant_id, customer_id) * 3 + (max_contacts,),
            )
        profile = next((str(r[1]) for r in rows if r[0] == "p"), None)
        consents = [str(r[1]) for r in rows if r[0] == "c"]
        contacts = sorted((int(r[2]), str(r[1])) for r in rows if r[0] == "k")
        return profile, consents, [body for _, body in contacts]

    def all_profiles(self) -> list[Row]:
        with self.db.tx() as tx:
            return tx.all("SELECT tenant_id, customer_id, body FROM contact_profiles")

    def all_consents(self) -> list[Row]:
        with self.db.tx() as tx:
            return tx.all("SELECT tenant_id, customer_id, body FROM consents")

    def insert_contact(
        self, tenant_id: str, contact_id: str, customer_id: str, body: str, at_us: int
    ) -> str | None:
        """None when inserted; the stored body when the contact id exists."""
        with self.db.tx() as tx:
            row = tx.one(
                "SELECT body FROM contacts WHERE tenant_id = ? AND contact_id = ?",
                (tenant_id, contact_id),
            )
            if row is not None:
                return str(row[0])
            tx.execute(
                "INSERT INTO contacts (tenant_id, contact_id, customer_id, body, contacted_at_us) "
                "VALUES (?, ?, ?, ?, ?)",
                (tenant_id, contact_id, customer_id, body, at_us),
            )
            return None

    def contacts_since(self, since_us: int) -> list[Row]:
        with self.db.tx() as tx:
            return tx.all(
                "SELECT tenant_id, customer_id, body FROM contacts WHERE contacted_at_us >= ? "
                "ORDER BY contacted_at_us",
                (since_us,),
            )

    # ------------------------------------------------------------ offers
    def put_offer(
        self, tenant_id: str, offer_id: str, change: Callable[[str | None], str | None]
    ) -> str | None:
        """Writes `change(stored body or None)` over the offer, the stored row
        locked meanwhile (so writers of one offer take turns), and moves the
        tenant's catalog version on in the same transaction; `change` answers
        None to leave the offer as it is. Returns the body in force."""
        lock = " FOR UPDATE" if self._row_locks else ""
        for attempt in (1, 2):
            try:
                with self.db.tx() as tx:
                    row = tx.one(
                        f"SELECT body FROM offers WHERE tenant_id = ? AND offer_id = ?{lock}",
                        (tenant_id, offer_id),
                    )
                    current = str(row[0]) if row else None
                    body = change(current)
                    if body is None:
                        return current
                    if current is None:
                        tx.execute(
                            "INSERT INTO offers (tenant_id, offer_id, body) VALUES (?, ?, ?)",
                            (tenant_id, offer_id, body),
                        )
                    else:
                        tx.execute(
                            "UPDATE offers SET body = ? WHERE tenant_id = ? AND offer_id = ?",
                            (body, tenant_id, offer_id),
                        )
                    tx.execute(
                        "INSERT INTO offer_catalogs (tenant_id, version) VALUES (?, 1) "
                        "ON CONFLICT (tenant_id) DO UPDATE "
                        "SET version = offer_catalogs.version + 1",
                        (tenant_id,),
                    )
                    return body
            except Exception as exc:
                # Two writers' first insert of one offer: the loser, once
                # more, finds the row and takes its turn on it.
                if attempt == 2 or not is_unique_violation(exc):
                    raise
        raise AssertionError("unreachable")

    def offer_catalog_version(self, tenant_id: str) -> int:
        """Moves on with every offer stored for the tenant (0: never)."""
        row = self.db.read_one(
            "SELECT version FROM offer_catalogs WHERE tenant_id = ?", (tenant_id,)
        )
        return int(row[0]) if row else 0

    def tenant_offers(self, tenant_id: str) -> list[str]:
        with self.db.read() as tx:
            rows = tx.all("SELECT body FROM offers WHERE tenant_id = ?", (tenant_id,))
        return [str(r[0]) for r in rows]

    def all_offers(self) -> list[Row]:
        with self.db.tx() as tx:
            return tx.all("SELECT tenant_id, offer_id, body FROM offers")

    # ------------------------------------------------------------ customer profiles
    def get_customer_profile(self, tenant_id: str, customer_id: str) -> str | None:
        row = self.db.read_one(
            "SELECT body FROM customer_profiles WHERE tenant_id = ? AND customer_id = ?",
            (tenant_id, customer_id),
        )
        return str(row[0]) if row is not None else None

    def put_customer_profile(
        self,
        tenant_id: str,
        customer_id: str,
        change_id: str,
        verified_at_us: int,
        profile_body: str,
        change_body: Callable[[bool], str],
        now_us: int,
    ) -> tuple[str, str, bool]:
        """Records a change (applied unless the profile in force was verified
        later) in one transaction: (the change as recorded, the profile in
        force, replayed). A change id seen before answers its recorded change."""
        with self.db.tx() as tx:
            seen = tx.one(
                "SELECT body FROM customer_profile_changes WHERE tenant_id = ? AND change_id = ?",
                (tenant_id, change_id),
            )
            current = tx.one(
                "SELECT verified_at_us, body FROM customer_profiles "
                "WHERE tenant_id = ? AND customer_id = ?",
                (tenant_id, customer_id),
            )
            if seen is not None:
                return str(seen[0]), str(current[1]) if current else profile_body, True
            applied = current is None or verified_at_us >= int(current[0])
            recorded = change_body(applied)
            tx.execute(
                "INSERT INTO customer_profile_changes "
                "(tenant_id, change_id, customer_id, recorded_at_us, body) VALUES (?, ?, ?, ?, ?)",
                (tenant_id, change_id, customer_id, now_us, recorded),
            )
            if not applied:
                assert current is not None
                return recorded, str(current[1]), False
            tx.execute(
                "DELETE FROM customer_profiles WHERE tenant_id = ? AND customer_id = ?",
                (tenant_id, customer_id),
            )
            tx.execute(
                "INSERT INTO customer_profiles (tenant_id, customer_id, verified_at_us, body) "
                "VALUES (?, ?, ?, ?)",
                (tenant_id, customer_id, verified_at_us, profile_body),
            )
            return recorded, profile_body, False

    def customer_profile_changes(self, tenant_id: str, customer_id: str, limit: int) -> list[str]:
        with self.db.read() as tx:
            rows = tx.all(
                "SELECT body FROM customer_profile_changes WHERE tenant_id = ? AND customer_id = ? "
                "ORDER BY recorded_at_us DESC, change_id DESC LIMIT ?",
                (tenant_id, customer_id, limit),
            )
        return [str(r[0]) for r in rows]


def _insert_resolutions(tx: Tx, rows: Sequence[ResolutionRow]) -> None:
    tx.execute_many(
        "INSERT INTO case_resolutions (case_id, tenant_id, resolved_at_us, suggestion, "
        "resolution, overruled) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (case_id) DO NOTHING",
        [
            (r.case_id, r.tenant_id, r.resolved_at_us, r.suggestion, r.resolution, int(r.overruled))
            for r in rows
        ],
    )


def _mark(tx: Tx, chain_id: str, kind: str, lock: bool = False) -> ChainMark | None:
    suffix = " FOR UPDATE" if lock else ""
    row = tx.one(
        "SELECT seq, record_hash, signature FROM decision_log_marks "
        f"WHERE chain_id = ? AND kind = ?{suffix}",
        (chain_id, kind),
    )
    return ChainMark(int(row[0]), str(row[1]), str(row[2])) if row else None


def _put_mark(tx: Tx, chain_id: str, kind: str, mark: ChainMark) -> None:
    # Updated in place (not deleted and inserted): a writer waiting on the
    # row's lock then reads the new mark rather than finding no row.
    updated = tx.execute(
        "UPDATE decision_log_marks SET seq = ?, record_hash = ?, signature = ? "
        "WHERE chain_id = ? AND kind = ?",
        (mark.seq, mark.record_hash, mark.signature, chain_id, kind),
    )
    if updated:
        return
    tx.execute(
        "INSERT INTO decision_log_marks (chain_id, kind, seq, record_hash, signature) "
        "VALUES (?, ?, ?, ?, ?)",
        (chain_id, kind, mark.seq, mark.record_hash, mark.signature),
    )


def open_store(
    backend: str, sqlite_path: str, postgres_dsn: str, read_connections: int = 2
) -> PolicyStore:
    target = sqlite_path if backend == "sqlite" else postgres_dsn
    return PolicyStore(Database(backend, target, read_connections))
