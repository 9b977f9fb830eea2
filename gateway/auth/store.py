"""The API keys, in the gateway's database (`gateway.store`: SQLite embedded,
PostgreSQL when configured) through the runtime's one storage layer.

A row holds what a key is allowed and when it stops, and of the key itself
only its keyed hash (`apikey.keyed_hash`). Nothing is ever deleted: a revoked
or rotated key stays listed with when and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass

from triplane.runtime.db import Database, Row, is_unique_violation

DDL = """
CREATE TABLE IF NOT EXISTS gw_api_keys (
  key_id TEXT PRIMARY KEY,
  tenant_id TEXT NOT NULL,
  environment TEXT NOT NULL,
  key_hash TEXT NOT NULL,
  scopes TEXT NOT NULL,
  display_name TEXT NOT NULL,
  created_at_us BIGINT NOT NULL,
  expires_at_us BIGINT NOT NULL,
  revoked_at_us BIGINT NOT NULL,
  retires_at_us BIGINT NOT NULL,
  rotated_from TEXT NOT NULL,
  rotated_to TEXT NOT NULL,
  idempotency_key TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS gw_api_keys_idempotency
  ON gw_api_keys (tenant_id, idempotency_key);
CREATE INDEX IF NOT EXISTS gw_api_keys_by_tenant ON gw_api_keys (tenant_id, created_at_us, key_id)
"""

_COLUMNS = (
    "key_id, tenant_id, environment, key_hash, scopes, display_name, created_at_us, "
    "expires_at_us, revoked_at_us, retires_at_us, rotated_from, rotated_to, idempotency_key"
)

CREDENTIAL_REVOKED = "CREDENTIAL_REVOKED"
CREDENTIAL_EXPIRED = "CREDENTIAL_EXPIRED"
CREDENTIAL_ROTATED = "CREDENTIAL_ROTATED"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    environment: str
    key_hash: str
    scopes: tuple[str, ...]
    display_name: str
    created_at_us: int
    # 0: never.
    expires_at_us: int
    # 0: not revoked.
    revoked_at_us: int
    # The end of a rotation's overlap; 0: not rotated.
    retires_at_us: int
    rotated_from: str
    rotated_to: str
    idempotency_key: str

    @property
    def valid_until_us(self) -> int:
        """When the key stops by itself (expiry or end of overlap); 0: never."""
        ends = [t for t in (self.expires_at_us, self.retires_at_us) if t]
        return min(ends) if ends else 0

    def stopped(self, now_us: int) -> str:
        """Why the key no longer works at `now_us`, or "" when it does."""
        if self.revoked_at_us:
            return CREDENTIAL_REVOKED
        if self.retires_at_us and now_us >= self.retires_at_us:
            return CREDENTIAL_ROTATED
        if self.expires_at_us and now_us >= self.expires_at_us:
            return CREDENTIAL_EXPIRED
        return ""

    def row(self) -> tuple[object, ...]:
        return (
            self.key_id,
            self.tenant_id,
            self.environment,
            self.key_hash,
            " ".join(self.scopes),
            self.display_name,
            self.created_at_us,
            self.expires_at_us,
            self.revoked_at_us,
            self.retires_at_us,
            self.rotated_from,
            self.rotated_to,
            self.idempotency_key,
        )


def _record(row: Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        key_id=row[0],
        tenant_id=row[1],
        environment=row[2],
        key_hash=row[3],
        scopes=tuple(row[4].split()),
        display_name=row[5],
        created_at_us=int(row[6]),
        expires_at_us=int(row[7]),
        revoked_at_us=int(row[8]),
        retires_at_us=int(row[9]),
        rotated_from=row[10],
        rotated_to=row[11],
        idempotency_key=row[12],
    )


class KeyIdTaken(Exception):
    """A new key's id is already used (a 71-bit collision: make another)."""


class IdempotencyKeyTaken(Exception):
    """Another request made a key under the same idempotency key first."""


class ApiKeyStore:
    """Synchronous, as the storage layer is: the admin calls run it in a
    worker thread; the hot path reads one row by key id, on the event loop
    when the database is a local SQLite file."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(DDL)

    def get(self, key_id: str) -> ApiKeyRecord | None:
        row = self.db.read_one(f"SELECT {_COLUMNS} FROM gw_api_keys WHERE key_id = ?", (key_id,))
        return _record(row) if row is not None else None

    def by_idempotency_key(self, tenant_id: str, idempotency_key: str) -> ApiKeyRecord | None:
        row = self.db.read_one(
            f"SELECT {_COLUMNS} FROM gw_api_keys WHERE tenant_id = ? AND idempotency_key = ?",
            (tenant_id, idempotency_key),
        )
        return _record(row) if row is not None else None

    def count_live(self, tenant_id: str) -> int:
        row = self.db.read_one(
            "SELECT COUNT(*) FROM gw_api_keys WHERE tenant_id = ? AND revoked_at_us = 0",
            (tenant_id,),
        )
        return int(row[0]) if row is not None else 0

    def insert(self, record: ApiKeyRecord) -> None:
        try:
            with self.db.tx() as tx:
                tx.execute(
                    f"INSERT INTO gw_api_keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    record.row(),
                )
        except Exception as exc:
            raise self._taken(exc, record) from exc

    def _taken(self, exc: Exception, record: ApiKeyRecord) -> Exception:
        if not is_unique_violation(exc):
            return exc
        if self.get(record.key_id) is not None:
            return KeyIdTaken(record.key_id)
        return IdempotencyKeyTaken(record.idempotency_key)

    def rotate(self, old_key_id: str, new: ApiKeyRecord, retires_at_us: int) -> bool:
        """Inserts `new` and marks `old_key_id` as replaced by it, retiring at
        `retires_at_us`, in one transaction; False (nothing written) when the
        old key was rotated or revoked meanwhile."""
        try:
            with self.db.tx() as tx:
                changed = tx.execute(
                    "UPDATE gw_api_keys SET rotated_to = ?, retires_at_us = ? "
                    "WHERE key_id = ? AND rotated_to = '' AND revoked_at_us = 0",
                    (new.key_id, retires_at_us, old_key_id),
                )
                if changed != 1:
                    return False
                tx.execute(
                    f"INSERT INTO gw_api_keys ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    new.row(),
                )
        except Exception as exc:
            raise self._taken(exc, new) from exc
        return True

    def revoke(self, key_id: str, now_us: int) -> ApiKeyRecord | None:
        """Revokes the key (once: a revoked key keeps its first time)."""
        with self.db.tx() as tx:
            tx.execute(
                "UPDATE gw_api_keys SET revoked_at_us = ? WHERE key_id = ? AND revoked_at_us = 0",
                (now_us, key_id),
            )
            row = tx.one(f"SELECT {_COLUMNS} FROM gw_api_keys WHERE key_id = ?", (key_id,))
        return _record(row) if row is not None else None

    def page(
        self,
        tenant_id: str,
        after: tuple[int, str] | None,
        limit: int,
        include_revoked: bool,
    ) -> list[ApiKeyRecord]:
        """Up to `limit` keys of the tenant after `after` (created_at_us,
        key_id), oldest first."""
        where = ["tenant_id = ?"]
        params: list[object] = [tenant_id]
        if after is not None:
            where.append("(created_at_us > ? OR (created_at_us = ? AND key_id > ?))")
            params += [after[0], after[0], after[1]]
        if not include_revoked:
            where.append("revoked_at_us = 0")
        with self.db.read() as tx:
            rows = tx.all(
                f"SELECT {_COLUMNS} FROM gw_api_keys WHERE {' AND '.join(where)} "
                "ORDER BY created_at_us, key_id LIMIT ?",
                (*params, limit),
            )
        return [_record(r) for r in rows]
