"""The tenant-sharded ledger: each tenant's book lives in one of several
PostgreSQL databases (money.store.shards), so every transfer stays a
single-database transaction (tenants are walls: no command spans two).

`ShardDirectory` keeps the assignment tenant -> shard in the table
`tenant_shards` of the first (directory) shard, where every replica reads it.
A tenant is assigned once, by CreateTenant, to the shard with the fewest
tenants (ties: the first in config order), under an advisory lock so two
replicas assigning at once agree; an assignment is never moved implicitly
(moving a tenant is a migration of its rows, not a config change).

`ShardedLedger` routes every operation by tenant to its shard's `Ledger`:
each shard has its own store, group commit, sweepers and (in app.py) outbox
relay; it answers the methods the servicer calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import psycopg

from money_plane.domain import AccountSpec, AccountState, Command, Entry, Hold, Outcome, Tenant
from money_plane.ledger import Ledger
from money_plane.store.base import BalanceCheck, PostingRow
from triplane.runtime.clock import Clock
from triplane.runtime.config import MoneyConfig
from triplane.runtime.errors import NotFound

# Serializes assignments across replicas (held until the assigning transaction commits).
_ASSIGN_LOCK = 7406172

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS tenant_shards (tenant_id TEXT PRIMARY KEY, "
    "shard TEXT NOT NULL, assigned_at_us BIGINT NOT NULL)"
)


class ShardDirectory:
    """tenant -> shard name, in `tenant_shards` of the directory database."""

    def __init__(self, dsn: str, shard_names: Sequence[str]) -> None:
        if not shard_names:
            raise ValueError("a shard directory needs at least one shard")
        self._dsn = dsn
        self._names = list(shard_names)
        # Assignments never move, so a cached one is never stale.
        self._cache: dict[str, str] = {}
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[Any] | None = None

    def _connection(self) -> psycopg.Connection[Any]:
        # A connection lost with the server (broken) is replaced, like the stores'.
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self._dsn, autocommit=False)
        return self._conn

    def create_schema(self) -> None:
        with self._lock, self._connection().transaction() as tx:
            tx.connection.execute("SELECT pg_advisory_xact_lock(%s)", (_ASSIGN_LOCK,))
            tx.connection.execute(_SCHEMA)

    def shard_of(self, tenant_id: str) -> str | None:
        """The tenant's shard, or None if it was never assigned."""
        cached = self._cache.get(tenant_id)
        if cached is not None:
            return cached
        with self._lock, self._connection().transaction() as tx:
            row = tx.connection.execute(
                "SELECT shard FROM tenant_shards WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
        if row is None:
            return None
        return self._remember(tenant_id, row[0])

    def assign(self, tenant_id: str, now_us: int) -> str:
        """The tenant's shard: the one it has, or else the least-loaded."""
        known = self.shard_of(tenant_id)
        if known is not None:
            return known
        with self._lock, self._connection().transaction() as tx:
            conn = tx.connection
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ASSIGN_LOCK,))
            row = conn.execute(
                "SELECT shard FROM tenant_shards WHERE tenant_id = %s", (tenant_id,)
            ).fetchone()
            if row is None:
                counts = dict(
                    conn.execute(
                        "SELECT shard, COUNT(*) FROM tenant_shards GROUP BY shard"
                    ).fetchall()
                )
                shard = min(
                    self._names, key=lambda name: (counts.get(name, 0), self._names.index(name))
                )
                conn.execute(
                    "INSERT INTO tenant_shards (tenant_id, shard, assigned_at_us) "
                    "VALUES (%s, %s, %s)",
                    (tenant_id, shard, now_us),
                )
            else:
                shard = row[0]
        return self._remember(tenant_id, shard)

    def _remember(self, tenant_id: str, shard: str) -> str:
        if shard not in self._names:
            # Never re-assigned silently: its data is in that database.
            raise RuntimeError(
                f"tenant {tenant_id!r} is assigned to shard {shard!r}, which "
                "money.store.shards no longer lists"
            )
        self._cache[tenant_id] = shard
        return shard

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class ShardedLedger:
    """The ledger's API over one `Ledger` per shard, routed by tenant."""

    def __init__(self, directory: ShardDirectory, ledgers: dict[str, Ledger], clock: Clock) -> None:
        self.directory = directory
        self.ledgers = ledgers
        self.config: MoneyConfig = next(iter(ledgers.values())).config
        self._clock = clock

    async def start(self, sweepers: bool = True) -> None:
        await asyncio.to_thread(self.directory.create_schema)
        for ledger in self.ledgers.values():
            await ledger.start(sweepers=sweepers)

    async def stop(self) -> None:
        for ledger in self.ledgers.values():
            await ledger.stop()
        await asyncio.to_thread(self.directory.close)

    async def _ledger(self, tenant_id: str) -> Ledger:
        shard = await asyncio.to_thread(self.directory.shard_of, tenant_id)
        if shard is None:
            raise NotFound("TENANT_NOT_FOUND", f"no tenant {tenant_id!r}", "tenant_id")
        return self.ledgers[shard]

    async def ledger_of(self, tenant_id: str) -> Ledger:
        """The ledger of the tenant's shard (NOT_FOUND for an unknown tenant)."""
        return await self._ledger(tenant_id)

    async def shard_of(self, tenant_id: str) -> str | None:
        return await asyncio.to_thread(self.directory.shard_of, tenant_id)

    async def create_tenant(self, tenant_id: str, display_name: str) -> Tenant:
        # Assigned first: if the shard's CreateTenant then fails, a retry
        # goes to the same shard.
        shard = await asyncio.to_thread(self.directory.assign, tenant_id, self._clock.now_us())
        return await self.ledgers[shard].create_tenant(tenant_id, display_name)

    async def create_accounts(self, tenant_id: str, specs: list[AccountSpec]) -> list[AccountState]:
        return await (await self._ledger(tenant_id)).create_accounts(tenant_id, specs)

    async def get_account(self, tenant_id: str, account_id: str) -> AccountState:
        return await (await self._ledger(tenant_id)).get_account(tenant_id, account_id)

    async def submit(
        self, tenant_id: str, commands: list[Command], **options: Any
    ) -> list[Outcome]:
        return await (await self._ledger(tenant_id)).submit(tenant_id, commands, **options)

    async def balance_as_of(self, tenant_id: str, account_id: str, as_of_us: int) -> AccountState:
        ledger = await self._ledger(tenant_id)
        return await ledger.balance_as_of(tenant_id, account_id, as_of_us)

    async def list_postings(
        self, tenant_id: str, account_id: str, page_size: int, after_seq: int
    ) -> list[PostingRow]:
        ledger = await self._ledger(tenant_id)
        return await ledger.list_postings(tenant_id, account_id, page_size, after_seq)

    async def list_tenants(self, limit: int, after_tenant_id: str) -> list[Tenant]:
        """`limit` tenants after `after_tenant_id` over every shard: each
        shard's next `limit` in id order, merged, the first `limit` kept (a
        tenant lives on one shard, so none is listed twice)."""
        pages = await asyncio.gather(
            *(ledger.list_tenants(limit, after_tenant_id) for ledger in self.ledgers.values())
        )
        merged = sorted((t for page in pages for t in page), key=lambda t: t.tenant_id)
        return merged[:limit]

    async def list_accounts(
        self, tenant_id: str, limit: int, after_account_id: str
    ) -> list[AccountState]:
        ledger = await self._ledger(tenant_id)
        return await ledger.list_accounts(tenant_id, limit, after_account_id)

    async def get_entry(self, tenant_id: str, entry_id: str, idempotency_key: str) -> Entry:
        ledger = await self._ledger(tenant_id)
        return await ledger.get_entry(tenant_id, entry_id, idempotency_key)

    async def get_hold(self, tenant_id: str, hold_id: str) -> Hold:
        return await (await self._ledger(tenant_id)).get_hold(tenant_id, hold_id)

    async def check_balanced(self, tenant_id: str) -> BalanceCheck:
        return await (await self._ledger(tenant_id)).check_balanced(tenant_id)
