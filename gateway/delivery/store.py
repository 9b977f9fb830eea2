"""The persistent delivery queue: one table, the same SQL on SQLite and
PostgreSQL (through the shared `Database` layer).

A delivery is `pending` until its `next_attempt_at_us`, then a worker claims it
(`sending`, with a lease: `next_attempt_at_us` moves to the lease's end and the
attempt is counted). A worker that dies mid-send leaves it `sending`; when the
lease runs out it is due again and another worker re-sends it with the same
id. An attempt ends `delivered` (2xx), back to `pending` with a backoff, or
`dead` (the dead-letter queue) after the last allowed attempt.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gateway.delivery.model import DeliveryRecord
from triplane.runtime.db import Database, Row

DDL = """
CREATE TABLE IF NOT EXISTS gw_deliveries (
  delivery_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  dedupe_key TEXT NOT NULL,
  channel TEXT NOT NULL,
  endpoint TEXT NOT NULL,
  event_type TEXT NOT NULL,
  body TEXT NOT NULL,
  body_sha256 TEXT NOT NULL,
  status TEXT NOT NULL,
  attempts BIGINT NOT NULL,
  next_attempt_at_us BIGINT NOT NULL,
  created_at_us BIGINT NOT NULL,
  send_at_us BIGINT NOT NULL,
  delivered_at_us BIGINT NOT NULL DEFAULT 0,
  dead_at_us BIGINT NOT NULL DEFAULT 0,
  last_status_code BIGINT NOT NULL DEFAULT 0,
  last_error TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS gw_deliveries_dedupe ON gw_deliveries (tenant_id, dedupe_key);
CREATE INDEX IF NOT EXISTS gw_deliveries_due ON gw_deliveries (status, next_attempt_at_us);
CREATE INDEX IF NOT EXISTS gw_deliveries_dead
  ON gw_deliveries (tenant_id, status, dead_at_us, delivery_id);
CREATE INDEX IF NOT EXISTS gw_deliveries_by_tenant
  ON gw_deliveries (tenant_id, created_at_us, delivery_id)
"""

_COLUMNS = (
    "delivery_id, tenant_id, dedupe_key, channel, endpoint, event_type, body, status, attempts, "
    "next_attempt_at_us, created_at_us, send_at_us, delivered_at_us, dead_at_us, "
    "last_status_code, last_error"
)
_IN_QUEUE = "status IN ('pending', 'sending')"
# The latest failures read to find each endpoint's last one.
_FAILURES_SCANNED = 1000


@dataclass
class EndpointSummary:
    """One endpoint of a tenant as the queue knows it."""

    channel: str
    endpoint: str
    counts: dict[str, int] = field(default_factory=dict)
    last_created_at_us: int = 0
    last_status_code: int = 0
    last_error: str = ""


def body_sha256(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _record(row: Row) -> DeliveryRecord:
    return DeliveryRecord(
        delivery_id=row[0],
        tenant_id=row[1],
        dedupe_key=row[2],
        channel=row[3],
        endpoint=row[4],
        event_type=row[5],
        body=row[6],
        status=row[7],
        attempts=int(row[8]),
        next_attempt_at_us=int(row[9]),
        created_at_us=int(row[10]),
        send_at_us=int(row[11]),
        delivered_at_us=int(row[12]),
        dead_at_us=int(row[13]),
        last_status_code=int(row[14]),
        last_error=row[15],
    )


class DeliveryStore:
    """Synchronous; the service calls it from a worker thread."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(DDL)

    def insert(self, record: DeliveryRecord) -> tuple[DeliveryRecord, str]:
        """Adds `record` unless its id exists: (stored record, existing body hash or "")."""
        with self.db.tx() as tx:
            inserted = tx.execute(
                f"INSERT INTO gw_deliveries ({_COLUMNS}, body_sha256) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (
                    record.delivery_id,
                    record.tenant_id,
                    record.dedupe_key,
                    record.channel,
                    record.endpoint,
                    record.event_type,
                    record.body,
                    record.status,
                    record.attempts,
                    record.next_attempt_at_us,
                    record.created_at_us,
                    record.send_at_us,
                    0,
                    0,
                    0,
                    "",
                    body_sha256(record.body),
                ),
            )
            if inserted == 1:
                return record, ""
            row = tx.one(
                f"SELECT {_COLUMNS}, body_sha256 FROM gw_deliveries WHERE delivery_id = ?",
                (record.delivery_id,),
            )
        assert row is not None, "a conflicting delivery vanished"
        return _record(row), str(row[16])

    def in_queue(self) -> int:
        with self.db.tx() as tx:
            row = tx.one(f"SELECT COUNT(*) FROM gw_deliveries WHERE {_IN_QUEUE}")
        return int(row[0]) if row else 0

    def claim_due(self, now_us: int, lease_us: int, limit: int) -> list[DeliveryRecord]:
        """Claims up to `limit` due deliveries (pending, or sending with a lapsed
        lease) and counts the attempt each is about to get."""
        lock = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgres" else ""
        with self.db.tx() as tx:
            rows = tx.all(
                f"SELECT {_COLUMNS} FROM gw_deliveries WHERE {_IN_QUEUE} "
                "AND next_attempt_at_us <= ? ORDER BY next_attempt_at_us, delivery_id "
                f"LIMIT ?{lock}",
                (now_us, limit),
            )
            claimed: list[DeliveryRecord] = []
            for row in rows:
                record = _record(row)
                tx.execute(
                    "UPDATE gw_deliveries SET status = 'sending', attempts = attempts + 1, "
                    "next_attempt_at_us = ? WHERE delivery_id = ?",
                    (now_us + lease_us, record.delivery_id),
                )
                claimed.append(
                    msgspec.structs.replace(record, status="sending", attempts=record.attempts + 1)
                )
        return claimed

    def mark_delivered(self, delivery_id: str, now_us: int, status_code: int) -> bool:
        with self.db.tx() as tx:
            changed = tx.execute(
                "UPDATE gw_deliveries SET status = 'delivered', delivered_at_us = ?, "
                f"last_status_code = ?, last_error = '' WHERE delivery_id = ? AND {_IN_QUEUE}",
                (now_us, status_code, delivery_id),
            )
        return changed == 1

    def mark_failed(
        self,
        delivery_id: str,
        attempt: int,
        status_code: int,
        error: str,
        next_attempt_at_us: int,
        dead_at_us: int,
    ) -> bool:
        """Records a failed attempt: back to pending, or dead when `dead_at_us`.
        Only the worker holding the current attempt may do so."""
        status = "dead" if dead_at_us else "pending"
        with self.db.tx() as tx:
            changed = tx.execute(
                "UPDATE gw_deliveries SET status = ?, next_attempt_at_us = ?, dead_at_us = ?, "
                "last_status_code = ?, last_error = ? "
                "WHERE delivery_id = ? AND status = 'sending' AND attempts = ?",
                (
                    status,
                    next_attempt_at_us,
                    dead_at_us,
                    status_code,
                    error[:500],
                    delivery_id,
                    attempt,
                ),
            )
        return changed == 1

    def get(self, tenant_id: str, delivery_id: str) -> DeliveryRecord | None:
        with self.db.tx() as tx:
            row = tx.one(
                f"SELECT {_COLUMNS} FROM gw_deliveries WHERE tenant_id = ? AND delivery_id = ?",
                (tenant_id, delivery_id),
            )
        return _record(row) if row else None

    def dead_letters(
        self, tenant_id: str, after_dead_at_us: int, after_id: str, limit: int
    ) -> list[DeliveryRecord]:
        with self.db.tx() as tx:
            rows = tx.all(
                f"SELECT {_COLUMNS} FROM gw_deliveries WHERE tenant_id = ? AND status = 'dead' "
                "AND (dead_at_us > ? OR (dead_at_us = ? AND delivery_id > ?)) "
                "ORDER BY dead_at_us, delivery_id LIMIT ?",
                (tenant_id, after_dead_at_us, after_dead_at_us, after_id, limit),
            )
        return [_record(r) for r in rows]

    def deliveries(
        self,
        tenant_id: str,
        status: str,
        endpoint: str,
        before_us: int,
        before_id: str,
        limit: int,
    ) -> list[DeliveryRecord]:
        """The tenant's deliveries created before (`before_us`, `before_id`),
        newest first; `before_us` -1 starts at the newest."""
        where = ["tenant_id = ?"]
        params: list[Any] = [tenant_id]
        if status:
            where.append("status = ?")
            params.append(status)
        if endpoint:
            where.append("endpoint = ?")
            params.append(endpoint)
        if before_us >= 0:
            where.append("(created_at_us < ? OR (created_at_us = ? AND delivery_id < ?))")
            params += [before_us, before_us, before_id]
        with self.db.tx() as tx:
            rows = tx.all(
                f"SELECT {_COLUMNS} FROM gw_deliveries WHERE {' AND '.join(where)} "
                "ORDER BY created_at_us DESC, delivery_id DESC LIMIT ?",
                (*params, limit),
            )
        return [_record(r) for r in rows]

    def endpoints(self, tenant_id: str) -> list[EndpointSummary]:
        """One summary per (channel, endpoint) the tenant's deliveries went
        to: counts by status, the newest delivery, the latest failure."""
        with self.db.tx() as tx:
            counted = tx.all(
                "SELECT channel, endpoint, status, COUNT(*), MAX(created_at_us) "
                "FROM gw_deliveries WHERE tenant_id = ? GROUP BY channel, endpoint, status",
                (tenant_id,),
            )
            failed = tx.all(
                "SELECT channel, endpoint, last_status_code, last_error FROM gw_deliveries "
                "WHERE tenant_id = ? AND last_error <> '' "
                "ORDER BY created_at_us DESC, delivery_id DESC LIMIT ?",
                (tenant_id, _FAILURES_SCANNED),
            )
        found: dict[tuple[str, str], EndpointSummary] = {}
        for channel, endpoint, status, n, newest in counted:
            key = (str(channel), str(endpoint))
            summary = found.setdefault(key, EndpointSummary(key[0], key[1]))
            summary.counts[str(status)] = int(n)
            summary.last_created_at_us = max(summary.last_created_at_us, int(newest))
        for channel, endpoint, code, error in failed:
            known = found.get((str(channel), str(endpoint)))
            if known is not None and not known.last_error:
                known.last_status_code, known.last_error = int(code), str(error)
        return sorted(found.values(), key=lambda e: (e.channel, e.endpoint))

    def defer(self, delivery_id: str, attempt: int, next_attempt_at_us: int) -> bool:
        """Gives back a claimed delivery that was not sent (its endpoint's
        circuit is open): pending again, and the claim's attempt uncounted."""
        with self.db.tx() as tx:
            changed = tx.execute(
                "UPDATE gw_deliveries SET status = 'pending', attempts = attempts - 1, "
                "next_attempt_at_us = ? "
                "WHERE delivery_id = ? AND status = 'sending' AND attempts = ?",
                (next_attempt_at_us, delivery_id, attempt),
            )
        return changed == 1

    def revive(self, tenant_id: str, delivery_id: str, now_us: int) -> bool:
        """Moves a dead delivery back to the queue with a fresh attempt budget."""
        with self.db.tx() as tx:
            changed = tx.execute(
                "UPDATE gw_deliveries SET status = 'pending', attempts = 0, "
                "next_attempt_at_us = ?, dead_at_us = 0 "
                "WHERE tenant_id = ? AND delivery_id = ? AND status = 'dead'",
                (now_us, tenant_id, delivery_id),
            )
        return changed == 1

    def counts(self, tenant_id: str = "") -> dict[str, int]:
        where, params = ("WHERE tenant_id = ?", (tenant_id,)) if tenant_id else ("", ())
        with self.db.tx() as tx:
            rows = tx.all(
                f"SELECT status, COUNT(*) FROM gw_deliveries {where} GROUP BY status", params
            )
        counts = dict.fromkeys(("pending", "sending", "delivered", "dead"), 0)
        counts.update({str(status): int(n) for status, n in rows})
        return counts
