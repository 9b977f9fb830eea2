"""The ledger store: one algorithm for every SQL backend.

`commit_jobs` is the group commit. In one database transaction it loads and
locks every row a group of jobs needs, always in the same order (holds, then
reserves, then entries, then accounts, each sorted by key), so concurrent
writers never deadlock; the engine decides every command in memory; the
changes, the idempotency records and the outbox events are written before the
one commit. A hot account is therefore locked once per group, not once per
transfer.

The ledger's invariants (money_plane/invariants.py) are asserted here, where
it writes: every entry, hold and account a commit writes is checked before
the first statement, and every entry and hold read back is checked as it is
decoded.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from money_plane import invariants
from money_plane.domain import (
    AccountSpec,
    AccountState,
    Entry,
    Hold,
    HoldState,
    IdempotencyRecord,
    Kind,
    Outcome,
    Reserve,
    Side,
    Tenant,
    account_key,
    scoped_key,
)
from money_plane.engine import Changes, Engine, EventSpec, Job, View
from money_plane.store import migration
from money_plane.store import records as msgpack_records
from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.errors import AlreadyExists, NotFound
from triplane.runtime.retry import RetryPolicy

log = logging.getLogger("triplane.money.store")
T = TypeVar("T")

EventEncoder = Callable[[EventSpec, int], OutgoingEvent]
AccountEventEncoder = Callable[[AccountState, int], OutgoingEvent]


class StoreConflict(Exception):
    """A transaction lost a race with another writer; retrying it is safe."""


@dataclass(frozen=True, slots=True)
class PostingRow:
    sequence: int
    account_id: str
    entry_id: str
    side: int
    amount_minor: int
    currency: str
    posted_at_us: int


@dataclass(frozen=True, slots=True)
class CurrencyTotals:
    currency: str
    debits_minor: int
    credits_minor: int
    pending_debits_minor: int
    pending_credits_minor: int


@dataclass(frozen=True, slots=True)
class BalanceCheck:
    balanced: bool
    totals: list[CurrencyTotals]
    accounts_checked: int
    postings_checked: int
    problems: list[str]


@dataclass(slots=True)
class GroupWrites:
    """The rows one group commit writes, as statement parameters."""

    # Every row's key is (tenant_id, scoped key), in that order, wherever it
    # appears (first for inserts, last for updates).
    accounts: list[tuple[int, int, int, int, int, int, str, str]] = field(default_factory=list)
    new_entries: list[tuple[str, str, str, int, bytes]] = field(default_factory=list)
    updated_entries: list[tuple[bytes, str, str]] = field(default_factory=list)
    postings: list[tuple[str, str, int, str, int, int, str, int]] = field(default_factory=list)
    new_holds: list[tuple[str, str, int, int, bytes]] = field(default_factory=list)
    changed_holds: list[tuple[int, bytes, str, str]] = field(default_factory=list)
    new_reserves: list[tuple[str, str, int, int, bytes]] = field(default_factory=list)
    deferred_reserves: list[tuple[int, bytes, str, str]] = field(default_factory=list)
    released_reserves: list[tuple[bytes, str, str]] = field(default_factory=list)
    idempotency: list[tuple[str, str, int, bytes]] = field(default_factory=list)
    used_tokens: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    outbox: list[tuple[str, str, str, bytes, int, int, int]] = field(default_factory=list)


# Every table is led by tenant_id: a tenant_id column, and every primary key
# (the only unique constraints) and per-tenant index starts with it, so a
# distributed PostgreSQL (Citus, distributed by tenant_id) can host the schema
# unchanged and route each tenant's statements to one node. The scoped keys
# ("<tenant>/<id>") stay as the second key column; every statement that looks
# a row up names tenant_id too. No sequences: a posting's number is its
# account's (accounts.posting_seq, on the row a commit locks and writes
# anyway), and the outbox is ordered by (order_us, order_pos), a per-account
# hybrid clock (accounts.event_order_us) and the event's place in its commit.
# The cross-tenant scans (hold expiry, reserve release, token purge, the
# relay's unsent events) use indexes not led by tenant_id; on Citus they fan
# out to every node.
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS tenants (
        tenant_id TEXT PRIMARY KEY, display_name TEXT NOT NULL, created_at_us BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS accounts (
        tenant_id TEXT NOT NULL, account_key TEXT NOT NULL, account_id TEXT NOT NULL,
        currency TEXT NOT NULL, kind INTEGER NOT NULL, constraint_kind INTEGER NOT NULL,
        overdraft_limit_minor BIGINT NOT NULL, metadata TEXT NOT NULL,
        created_at_us BIGINT NOT NULL,
        debits_posted BIGINT NOT NULL DEFAULT 0, credits_posted BIGINT NOT NULL DEFAULT 0,
        debits_pending BIGINT NOT NULL DEFAULT 0, credits_pending BIGINT NOT NULL DEFAULT 0,
        posting_seq BIGINT NOT NULL DEFAULT 0, event_order_us BIGINT NOT NULL DEFAULT 0,
        CHECK (debits_posted >= 0 AND credits_posted >= 0
               AND debits_pending >= 0 AND credits_pending >= 0),
        PRIMARY KEY (tenant_id, account_key))""",
    """CREATE TABLE IF NOT EXISTS entries (
        tenant_id TEXT NOT NULL, entry_key TEXT NOT NULL, idempotency_key TEXT NOT NULL,
        posted_at_us BIGINT NOT NULL, body {blob} NOT NULL,
        PRIMARY KEY (tenant_id, entry_key))""",
    "CREATE INDEX IF NOT EXISTS entries_by_idempotency_key ON entries (tenant_id, idempotency_key)",
    # seq: the posting's number in its account's history (1, 2, ...), the
    # history page cursor.
    """CREATE TABLE IF NOT EXISTS postings (
        tenant_id TEXT NOT NULL, account_key TEXT NOT NULL, seq BIGINT NOT NULL,
        entry_id TEXT NOT NULL, side SMALLINT NOT NULL, amount_minor BIGINT NOT NULL,
        currency TEXT NOT NULL, posted_at_us BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, account_key, seq))""",
    "CREATE INDEX IF NOT EXISTS postings_by_time "
    "ON postings (tenant_id, account_key, posted_at_us)",
    """CREATE TABLE IF NOT EXISTS holds (
        tenant_id TEXT NOT NULL, hold_key TEXT NOT NULL, state SMALLINT NOT NULL,
        expires_at_us BIGINT NOT NULL, body {blob} NOT NULL,
        PRIMARY KEY (tenant_id, hold_key))""",
    "CREATE INDEX IF NOT EXISTS holds_pending ON holds (expires_at_us) WHERE state = 1",
    """CREATE TABLE IF NOT EXISTS reserves (
        tenant_id TEXT NOT NULL, reserve_key TEXT NOT NULL, release_at_us BIGINT NOT NULL,
        released SMALLINT NOT NULL, body {blob} NOT NULL,
        PRIMARY KEY (tenant_id, reserve_key))""",
    "CREATE INDEX IF NOT EXISTS reserves_due ON reserves (release_at_us) WHERE released = 0",
    """CREATE TABLE IF NOT EXISTS idempotency (
        tenant_id TEXT NOT NULL, scope_key TEXT NOT NULL, created_at_us BIGINT NOT NULL,
        body {blob} NOT NULL, PRIMARY KEY (tenant_id, scope_key))""",
    # Decision token ids spent (tenant/jti), each with the fingerprint of the
    # transfer it was spent on; kept until money.tokens.used_retention_s past
    # the token's expiry. The primary key is what stops two replicas spending
    # one token at once: the second commit conflicts, retries, and sees it.
    """CREATE TABLE IF NOT EXISTS decision_tokens (
        tenant_id TEXT NOT NULL, token_key TEXT NOT NULL, fingerprint TEXT NOT NULL,
        expires_at_us BIGINT NOT NULL, used_at_us BIGINT NOT NULL,
        PRIMARY KEY (tenant_id, token_key))""",
    "CREATE INDEX IF NOT EXISTS decision_tokens_by_expiry ON decision_tokens (expires_at_us)",
    # Relayed in (order_us, order_pos, event_id) order: see _collect_writes.
    """CREATE TABLE IF NOT EXISTS outbox (
        tenant_id TEXT NOT NULL, event_id TEXT NOT NULL, subject TEXT NOT NULL,
        data {blob} NOT NULL, created_at_us BIGINT NOT NULL,
        order_us BIGINT NOT NULL, order_pos BIGINT NOT NULL, sent_at_us BIGINT,
        PRIMARY KEY (tenant_id, event_id))""",
    "CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (order_us, order_pos, event_id) "
    "WHERE sent_at_us IS NULL",
    # Payouts (money_plane/payouts), added to version 2 as new tables (created
    # on start, nothing to copy). A beneficiary's body holds its account
    # number and holder's name sealed, never in clear.
    """CREATE TABLE IF NOT EXISTS beneficiaries (
        tenant_id TEXT NOT NULL, beneficiary_key TEXT NOT NULL, merchant_id TEXT NOT NULL,
        created_at_us BIGINT NOT NULL, body {blob} NOT NULL,
        PRIMARY KEY (tenant_id, beneficiary_key))""",
    # payout_key is "<tenant>/<payout id>", the id derived from the
    # idempotency key: the primary key is what makes a payout once.
    """CREATE TABLE IF NOT EXISTS payouts (
        tenant_id TEXT NOT NULL, payout_key TEXT NOT NULL, beneficiary_id TEXT NOT NULL,
        debit_account_id TEXT NOT NULL, state SMALLINT NOT NULL, amount_minor BIGINT NOT NULL,
        created_at_us BIGINT NOT NULL, updated_at_us BIGINT NOT NULL, body {blob} NOT NULL,
        PRIMARY KEY (tenant_id, payout_key))""",
    "CREATE INDEX IF NOT EXISTS payouts_by_account "
    "ON payouts (tenant_id, debit_account_id, created_at_us)",
    "CREATE INDEX IF NOT EXISTS payouts_by_beneficiary ON payouts (tenant_id, beneficiary_id)",
    # Settlement (money_plane/payouts/settlement.py): a merchant's schedule,
    # keyed by its accrual account, and each settled period: the primary key
    # (tenant_id, "<tenant>/<account>/<period>") is the claim that makes a
    # period settle once, taken in the transaction that posts its entry.
    """CREATE TABLE IF NOT EXISTS settlement_schedules (
        tenant_id TEXT NOT NULL, schedule_key TEXT NOT NULL, updated_at_us BIGINT NOT NULL,
        body {blob} NOT NULL, PRIMARY KEY (tenant_id, schedule_key))""",
    """CREATE TABLE IF NOT EXISTS settlements (
        tenant_id TEXT NOT NULL, settlement_key TEXT NOT NULL, period TEXT NOT NULL,
        state TEXT NOT NULL, settled_at_us BIGINT NOT NULL, body {blob} NOT NULL,
        PRIMARY KEY (tenant_id, settlement_key))""",
]

ACCOUNT_COLUMNS = (
    "tenant_id, account_id, currency, kind, constraint_kind, overdraft_limit_minor, metadata, "
    "created_at_us, debits_posted, credits_posted, debits_pending, credits_pending, "
    "posting_seq, event_order_us"
)


POSTING_COLUMNS = (
    "tenant_id, account_key, seq, entry_id, side, amount_minor, currency, posted_at_us"
)
OUTBOX_COLUMNS = "tenant_id, event_id, subject, data, created_at_us, order_us, order_pos"


# Account metadata is stored as a JSON object of strings (json.dumps, sorted).
_decode_metadata = msgspec.json.Decoder(dict[str, str]).decode


def _account_from_row(row: Sequence[Any]) -> AccountState:
    return AccountState(
        tenant_id=row[0],
        account_id=row[1],
        currency=row[2],
        kind=row[3],
        constraint=row[4],
        overdraft_limit_minor=row[5],
        metadata=_decode_metadata(row[6]),
        created_at_us=row[7],
        debits_posted=row[8],
        credits_posted=row[9],
        debits_pending=row[10],
        credits_pending=row[11],
        posting_seq=row[12],
        event_order_us=row[13],
    )


class LedgerStore:
    """Base class; subclasses supply connections and dialect details."""

    placeholder = "%s"
    blob_type = "BYTEA"
    dialect = "postgres"
    lock_suffix = ""
    # The engine a group commit runs (a test may put a faulty one in its place
    # to show that the invariants stop what it writes).
    engine_type: type[Engine] = Engine

    def __init__(
        self,
        encode_event: EventEncoder,
        encode_account_event: AccountEventEncoder,
        default_hold_timeout_s: int,
        conflict_retry: RetryPolicy,
    ) -> None:
        self._encode_event = encode_event
        self._encode_account_event = encode_account_event
        self._default_hold_timeout_s = default_hold_timeout_s
        # How long a refused reserve release waits before it is tried again.
        self.reserve_retry_s = 3600
        if conflict_retry.until_cancelled:
            raise ValueError("money.store.conflict_retry.maximum_attempts must be >= 1")
        # Built once: tenacity keeps each thread's attempt state apart, and a
        # fresh Retrying per commit would cost more than the retry ever does.
        self._conflict_retrying = conflict_retry.retrying(
            StoreConflict, "ledger transaction (lost a race with another writer)", log, logging.INFO
        )
        self._local = threading.local()
        # event_id -> tenant_id of the events `unsent` returned last.
        self._unsent_lock = threading.Lock()
        self._unsent_tenants: dict[str, str] = {}

    # ---- dialect hooks ----

    def _connect(self) -> Any:
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _group_transaction(self) -> AbstractContextManager[Any]:
        """The transaction of a group commit (a backend may batch its round trips)."""
        return self._transaction()

    def _insert_many(self, cur: Any, table: str, columns: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            marks = ", ".join([self.placeholder] * len(rows[0]))
            cur.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)

    def _update_accounts(
        self, cur: Any, rows: list[tuple[int, int, int, int, int, int, str, str]]
    ) -> None:
        p = self.placeholder
        cur.executemany(
            f"UPDATE accounts SET debits_posted = {p}, credits_posted = {p}, "
            f"debits_pending = {p}, credits_pending = {p}, posting_seq = {p}, "
            f"event_order_us = {p} WHERE tenant_id = {p} AND account_key = {p}",
            rows,
        )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # ---- plumbing ----

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    def _sql(self, text: str) -> str:
        return text.replace("%s", self.placeholder)

    def _marks(self, count: int) -> str:
        return ", ".join([self.placeholder] * count)

    def _keys_where(self, column: str, keys: Sequence[str]) -> tuple[str, list[str]]:
        """The condition selecting rows by scoped keys ("<tenant>/<id>"), with
        its parameters: tenant_id (the key's prefix) and the key, so the
        lookup uses the primary key (tenant_id, key) and a distributed
        engine routes it by tenant. The key names its tenant, so the two
        lists select exactly the keys' rows."""
        tenants = sorted({key.partition("/")[0] for key in keys})
        return (
            f"tenant_id IN ({self._marks(len(tenants))}) "
            f"AND {column} IN ({self._marks(len(keys))})",
            [*tenants, *keys],
        )

    def create_schema(self) -> None:
        """Creates the schema, or migrates one an earlier version created
        (money_plane/store/migration.py), in one transaction."""
        schema = [statement.format(blob=self.blob_type) for statement in SCHEMA]
        with self._transaction() as cur:
            self._lock_schema(cur)
            found = migration.migrate(cur, self.dialect, schema)
            for statement in schema:
                cur.execute(statement)
        if found is not None and found != migration.CURRENT_VERSION:
            log.warning(
                "ledger schema migrated from version %d to %d", found, migration.CURRENT_VERSION
            )

    def _lock_schema(self, cur: Any) -> None:
        """Keeps concurrent start-ups from migrating at once (SQLite's
        BEGIN IMMEDIATE already does)."""

    # ---- work beside the ledger's own (payouts) ----

    def run_transaction(self, work: Callable[[Any], T]) -> T:
        """Runs `work(cursor)` in one transaction of this store, again when
        it loses a race (StoreConflict), per money.store.conflict_retry."""

        def attempt() -> T:
            with self._transaction() as cur:
                return work(cur)

        return self._retry_conflicts(attempt)

    def commit_jobs_in(self, cur: Any, jobs: list[Job], now_us: int) -> list[list[Outcome]]:
        """The group commit's work inside a transaction the caller holds, so
        rows of its own (a payout's state) commit with the ledger's."""
        return self._commit_in_transaction(cur, jobs, now_us)

    def write_outbox(
        self, cur: Any, tenant_id: str, events: list[OutgoingEvent], now_us: int
    ) -> None:
        self._write_outbox(cur, tenant_id, events, now_us)

    def sql(self, text: str) -> str:
        """`text` with `?` placeholders in this backend's style."""
        return self._sql(text)

    # ---- tenants and accounts ----

    def _retry_conflicts(self, work: Callable[[], T]) -> T:
        """Runs `work` (one transaction) again while it loses a race
        (StoreConflict: a unique violation, SQLSTATE 40001, a deadlock), per
        money.store.conflict_retry; the last conflict is raised."""
        for attempt in self._conflict_retrying:
            with attempt:
                return work()
        raise AssertionError("unreachable: the retrying re-raises the last conflict")

    def create_tenant(
        self,
        tenant_id: str,
        display_name: str,
        now_us: int,
        registration: OutgoingEvent | None = None,
    ) -> Tenant:
        """Creates the tenant (or finds it, with the same display name) and
        writes `registration` (the tenant registry's message) to the outbox in
        the same transaction: every successful call registers, so calling it
        again registers a tenant made before the registry existed."""
        return self._retry_conflicts(
            lambda: self._create_tenant(tenant_id, display_name, now_us, registration)
        )

    def _create_tenant(
        self,
        tenant_id: str,
        display_name: str,
        now_us: int,
        registration: OutgoingEvent | None,
    ) -> Tenant:
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO tenants (tenant_id, display_name, created_at_us) "
                    "VALUES (%s, %s, %s) "
                    "ON CONFLICT (tenant_id) DO NOTHING"
                ),
                (tenant_id, display_name, now_us),
            )
            cur.execute(
                self._sql("SELECT display_name, created_at_us FROM tenants WHERE tenant_id = %s"),
                (tenant_id,),
            )
            name, created_at_us = cur.fetchone()
            if registration is not None and name == display_name:
                self._write_outbox(cur, tenant_id, [registration], now_us)
        if name != display_name:
            raise AlreadyExists(
                "TENANT_EXISTS", "tenant exists with another display_name", "display_name"
            )
        return Tenant(tenant_id=tenant_id, display_name=name, created_at_us=created_at_us)

    def tenant_exists(self, tenant_id: str) -> bool:
        with self._transaction() as cur:
            cur.execute(self._sql("SELECT 1 FROM tenants WHERE tenant_id = %s"), (tenant_id,))
            return cur.fetchone() is not None

    def create_accounts(
        self, tenant_id: str, specs: list[AccountSpec], now_us: int
    ) -> list[AccountState]:
        """Opens the accounts (an existing one must match its spec). Two
        replicas opening one account at once: the loser's unique violation is
        retried, and then finds the winner's account."""
        return self._retry_conflicts(lambda: self._create_accounts(tenant_id, specs, now_us))

    def _create_accounts(
        self, tenant_id: str, specs: list[AccountSpec], now_us: int
    ) -> list[AccountState]:
        keys = [account_key(tenant_id, s.account_id) for s in specs]
        with self._transaction() as cur:
            cur.execute(self._sql("SELECT 1 FROM tenants WHERE tenant_id = %s"), (tenant_id,))
            if cur.fetchone() is None:
                raise NotFound("TENANT_NOT_FOUND", f"no tenant {tenant_id!r}", "tenant_id")
            existing = self._load_accounts(cur, sorted(set(keys)), lock=True)
            created: dict[str, AccountState] = {}
            result: list[AccountState] = []
            for index, (key, spec) in enumerate(zip(keys, specs, strict=True)):
                found = existing.get(key) or created.get(key)
                if found is not None:
                    _same_account(found, spec, f"accounts[{index}]")
                    result.append(found)
                    continue
                account = AccountState(
                    tenant_id=tenant_id,
                    account_id=spec.account_id,
                    currency=spec.currency,
                    kind=spec.kind,
                    constraint=spec.constraint,
                    overdraft_limit_minor=spec.overdraft_limit_minor,
                    metadata=dict(spec.metadata),
                    created_at_us=now_us,
                )
                created[key] = account
                result.append(account)
            for account in created.values():
                account.event_order_us = now_us
            self._insert_many(
                cur,
                "accounts",
                f"account_key, {ACCOUNT_COLUMNS}",
                [
                    (
                        a.key,
                        a.tenant_id,
                        a.account_id,
                        a.currency,
                        a.kind,
                        a.constraint,
                        a.overdraft_limit_minor,
                        json.dumps(a.metadata, sort_keys=True),
                        a.created_at_us,
                        0,
                        0,
                        0,
                        0,
                        0,
                        now_us,
                    )
                    for a in created.values()
                ],
            )
            self._write_outbox(
                cur,
                tenant_id,
                [self._encode_account_event(a, now_us) for a in created.values()],
                now_us,
            )
        return result

    def get_account(self, tenant_id: str, account_id: str) -> AccountState | None:
        with self._transaction() as cur:
            return self._load_accounts(cur, [account_key(tenant_id, account_id)]).get(
                account_key(tenant_id, account_id)
            )

    def list_tenants(self, after_tenant_id: str, limit: int) -> list[Tenant]:
        """Tenants after `after_tenant_id`, in id order (the primary key's)."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT tenant_id, display_name, created_at_us FROM tenants "
                    "WHERE tenant_id > %s ORDER BY tenant_id LIMIT %s"
                ),
                (after_tenant_id, limit),
            )
            return [Tenant(r[0], r[1], r[2]) for r in cur.fetchall()]

    def list_accounts(
        self, tenant_id: str, after_account_key: str, limit: int
    ) -> list[AccountState]:
        """A tenant's accounts after `after_account_key`, in key order (the
        primary key's: a page reads an index range)."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    f"SELECT {ACCOUNT_COLUMNS} FROM accounts "
                    "WHERE tenant_id = %s AND account_key > %s ORDER BY account_key LIMIT %s"
                ),
                (tenant_id, after_account_key, limit),
            )
            return [_account_from_row(r) for r in cur.fetchall()]

    def _load_accounts(
        self, cur: Any, keys: list[str], lock: bool = False
    ) -> dict[str, AccountState]:
        if not keys:
            return {}
        suffix = self.lock_suffix if lock else ""
        where, params = self._keys_where("account_key", keys)
        cur.execute(
            f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE {where} ORDER BY account_key{suffix}",
            params,
        )
        return {account_key(r[0], r[1]): _account_from_row(r) for r in cur.fetchall()}

    def _load_idempotency_and_accounts(
        self, cur: Any, scopes: list[str], account_keys: list[str], token_keys: list[str]
    ) -> tuple[dict[str, IdempotencyRecord], dict[str, AccountState], dict[str, str]]:
        """Idempotency records and spent tokens (unlocked) and accounts
        (locked, in key order)."""
        records = self._load_bodies(
            cur, "idempotency", "scope_key", scopes, IdempotencyRecord, lock=False
        )
        used = self._load_used_tokens(cur, token_keys)
        return records, self._load_accounts(cur, account_keys, lock=True), used

    def _load_used_tokens(self, cur: Any, keys: list[str]) -> dict[str, str]:
        if not keys:
            return {}
        where, params = self._keys_where("token_key", keys)
        cur.execute(f"SELECT token_key, fingerprint FROM decision_tokens WHERE {where}", params)
        return {row[0]: row[1] for row in cur.fetchall()}

    def _load_bodies(
        self, cur: Any, table: str, key_column: str, keys: list[str], cls: type[T], lock: bool
    ) -> dict[str, T]:
        if not keys:
            return {}
        suffix = self.lock_suffix if lock else ""
        where, params = self._keys_where(key_column, keys)
        cur.execute(
            f"SELECT {key_column}, body FROM {table} WHERE {where} ORDER BY {key_column}{suffix}",
            params,
        )
        return {row[0]: msgpack_records.decode(bytes(row[1]), cls) for row in cur.fetchall()}

    # ---- the group commit ----

    def commit_jobs(self, jobs: list[Job], now_us: int) -> list[list[Outcome]]:
        """Applies jobs in one transaction; a transaction that lost a race is
        tried again per money.store.conflict_retry, then its last conflict is
        raised."""

        def attempt() -> list[list[Outcome]]:
            with self._group_transaction() as cur:
                return self._commit_in_transaction(cur, jobs, now_us)

        return self._retry_conflicts(attempt)

    def _commit_in_transaction(self, cur: Any, jobs: list[Job], now_us: int) -> list[list[Outcome]]:
        commands = [c for job in jobs for c in job.commands]
        view = View()
        loaded_holds: dict[str, Hold] = {}
        scopes = sorted(
            {
                scoped_key(c.tenant_id, c.idempotency_key)
                for c in commands
                if c.kind not in (Kind.EXPIRE_HOLD, Kind.RESERVE_RELEASE)
            }
        )
        hold_keys = sorted({scoped_key(c.tenant_id, c.hold_id) for c in commands if c.hold_id})
        reserve_keys = sorted(
            {scoped_key(c.tenant_id, c.reserve_id) for c in commands if c.reserve_id}
        )
        refund_keys = {
            scoped_key(c.tenant_id, c.entry_id) for c in commands if c.kind == Kind.REFUND
        }
        token_keys = sorted(
            {scoped_key(c.tenant_id, c.claims.token_id) for c in commands if c.claims is not None}
        )
        if not hold_keys and not reserve_keys and not refund_keys:
            # Plain transfers: every account is known from the commands alone,
            # so the idempotency records, the spent tokens and the accounts
            # load together.
            view.idempotency, view.accounts, view.used_tokens = self._load_idempotency_and_accounts(
                cur, scopes, sorted(_account_keys(commands, view)), token_keys
            )
        else:
            view.idempotency = self._load_bodies(
                cur, "idempotency", "scope_key", scopes, IdempotencyRecord, lock=False
            )
            view.used_tokens = self._load_used_tokens(cur, token_keys)
            view.holds = self._load_bodies(cur, "holds", "hold_key", hold_keys, Hold, lock=True)
            # As loaded: what each hold a commit writes is checked against.
            loaded_holds = dict(view.holds)
            for hold in loaded_holds.values():
                invariants.check_hold(hold, "on read")
            # Reserves are read before entries to learn which entries they
            # come from; the lock order (holds, reserves, entries, accounts) is
            # the same for every transaction, so there is still no deadlock cycle.
            view.reserves = self._load_bodies(
                cur, "reserves", "reserve_key", reserve_keys, Reserve, lock=True
            )
            entry_keys = sorted(
                refund_keys | {scoped_key(r.tenant_id, r.entry_id) for r in view.reserves.values()}
            )
            view.entries = self._load_bodies(
                cur, "entries", "entry_key", entry_keys, Entry, lock=True
            )
            for entry in view.entries.values():
                invariants.check_entry(entry, "on read")
            view.accounts = self._load_accounts(
                cur, sorted(_account_keys(commands, view)), lock=True
            )
        engine = self.engine_type(view, now_us, self._default_hold_timeout_s, self.reserve_retry_s)
        outcomes = [engine.run_job(job) for job in jobs]
        self._write_changes(cur, engine.changes, view, now_us, loaded_holds)
        return outcomes

    def _write_changes(
        self, cur: Any, changes: Changes, view: View, now_us: int, loaded_holds: dict[str, Hold]
    ) -> None:
        # Collected (and asserted) in full before the first statement: a
        # violation leaves nothing written.
        self._apply_writes(cur, self._collect_writes(changes, view, now_us, loaded_holds))

    def _collect_writes(
        self, changes: Changes, view: View, now_us: int, loaded_holds: dict[str, Hold]
    ) -> GroupWrites:
        """Every row a group commit writes, per table and statement, each
        checked against the ledger's invariants.

        No global sequence numbers anything. A posting takes the next number
        of its account (`posting_seq`). The group's events take the order key
        (commit_us, their place in the group), where commit_us is now, or one
        past the order key of the last commit that changed any account this
        one changes, whichever is later: a hybrid clock per account. Commits
        that change one account hold its row lock in turn, so each one's
        events sort after the last one's, whatever the replicas' clocks say;
        the relay publishes in that order."""
        writes = GroupWrites()
        accounts = view.accounts
        encode = msgpack_records.encode
        check_entry = invariants.check_entry
        entries = view.entries
        new_keys: set[str] = set()
        new_entry_ids: set[str] = set()
        new_entries = writes.new_entries
        postings = writes.postings
        touched = changes.touched_accounts
        for e in changes.new_entries:
            tenant_id = e.tenant_id
            key = f"{tenant_id}/{e.entry_id}"
            new_keys.add(key)
            new_entry_ids.add(e.entry_id)
            written = entries[key]
            check_entry(written, "before writing")
            new_entries.append((tenant_id, key, e.idempotency_key, e.posted_at_us, encode(written)))
            for posting in e.postings:
                posting_key = f"{tenant_id}/{posting.account_id}"
                assert posting_key in touched, f"a posting on {posting_key}, not written"
                account = accounts[posting_key]
                account.posting_seq += 1
                postings.append(
                    (
                        tenant_id,
                        posting_key,
                        account.posting_seq,
                        e.entry_id,
                        posting.side,
                        posting.amount_minor,
                        posting.currency,
                        e.posted_at_us,
                    )
                )
        commit_us = now_us
        for key in touched:
            commit_us = max(commit_us, accounts[key].event_order_us + 1)
        check_account = invariants.check_account
        for key in sorted(touched):
            account = accounts[key]
            check_account(account, "before writing")
            account.event_order_us = commit_us
            writes.accounts.append(
                (*account.counters(), account.posting_seq, commit_us, account.tenant_id, key)
            )
        for key, e in changes.updated_entries.items():
            if key not in new_keys:
                check_entry(e, "before writing")
                writes.updated_entries.append((encode(e), e.tenant_id, key))
        if changes.holds:
            invariants.check_hold_changes(
                loaded_holds, changes.holds, changes.new_holds, new_entry_ids
            )
        writes.new_holds = [
            (h.tenant_id, key, h.state, h.expires_at_us, encode(h))
            for key, h in changes.holds.items()
            if key in changes.new_holds
        ]
        writes.changed_holds = [
            (h.state, encode(h), h.tenant_id, key)
            for key, h in changes.holds.items()
            if key not in changes.new_holds
        ]
        writes.new_reserves = [
            (r.tenant_id, scoped_key(r.tenant_id, r.reserve_id), r.release_at_us, 0, encode(r))
            for r in changes.new_reserves
        ]
        writes.deferred_reserves = [
            (r.release_at_us, encode(r), r.tenant_id, key)
            for key, r in changes.deferred_reserves.items()
        ]
        writes.released_reserves = [
            (encode(r), r.tenant_id, key) for key, r in changes.released_reserves.items()
        ]
        writes.idempotency = [
            (r.scope_key.partition("/")[0], r.scope_key, r.created_at_us, encode(r))
            for r in changes.new_idempotency
        ]
        writes.used_tokens = [
            (
                t.token_key.partition("/")[0],
                t.token_key,
                t.fingerprint,
                t.expires_at_us,
                t.used_at_us,
            )
            for t in changes.new_used_tokens
        ]
        encode_event = self._encode_event
        writes.outbox = []
        for position, spec in enumerate(changes.events):
            event = encode_event(spec, now_us)
            writes.outbox.append(
                (
                    spec.tenant_id,
                    event.event_id,
                    event.subject,
                    event.data,
                    now_us,
                    commit_us,
                    position,
                )
            )
        return writes

    def _apply_writes(self, cur: Any, writes: GroupWrites) -> None:
        """One statement per table (and kind of change) with rows."""
        self._update_accounts(cur, writes.accounts)
        self._insert_many(
            cur,
            "entries",
            "tenant_id, entry_key, idempotency_key, posted_at_us, body",
            writes.new_entries,
        )
        self._insert_many(cur, "postings", POSTING_COLUMNS, writes.postings)
        self._apply_rare_writes(cur, writes)
        self._insert_many(
            cur, "idempotency", "tenant_id, scope_key, created_at_us, body", writes.idempotency
        )
        self._insert_many(
            cur,
            "decision_tokens",
            "tenant_id, token_key, fingerprint, expires_at_us, used_at_us",
            writes.used_tokens,
        )
        self._insert_many(cur, "outbox", OUTBOX_COLUMNS, writes.outbox)

    def _apply_rare_writes(self, cur: Any, writes: GroupWrites) -> None:
        """Changes to existing entries, holds and reserves (not plain transfers)."""
        p = self.placeholder
        if writes.updated_entries:
            cur.executemany(
                f"UPDATE entries SET body = {p} WHERE tenant_id = {p} AND entry_key = {p}",
                writes.updated_entries,
            )
        self._insert_many(
            cur, "holds", "tenant_id, hold_key, state, expires_at_us, body", writes.new_holds
        )
        if writes.changed_holds:
            cur.executemany(
                f"UPDATE holds SET state = {p}, body = {p} "
                f"WHERE tenant_id = {p} AND hold_key = {p}",
                writes.changed_holds,
            )
        self._insert_many(
            cur,
            "reserves",
            "tenant_id, reserve_key, release_at_us, released, body",
            writes.new_reserves,
        )
        if writes.deferred_reserves:
            cur.executemany(
                f"UPDATE reserves SET release_at_us = {p}, body = {p} "
                f"WHERE tenant_id = {p} AND reserve_key = {p}",
                writes.deferred_reserves,
            )
        if writes.released_reserves:
            cur.executemany(
                f"UPDATE reserves SET released = 1, body = {p} "
                f"WHERE tenant_id = {p} AND reserve_key = {p}",
                writes.released_reserves,
            )

    def _write_outbox(
        self, cur: Any, tenant_id: str, events: list[OutgoingEvent], now_us: int
    ) -> None:
        """Events of a transaction that locks no account (a tenant's
        registration, accounts just opened): ordered by now_us."""
        self._insert_many(
            cur,
            "outbox",
            OUTBOX_COLUMNS,
            [
                (tenant_id, e.event_id, e.subject, e.data, now_us, now_us, position)
                for position, e in enumerate(events)
            ],
        )

    # ---- reads ----

    def get_hold(self, tenant_id: str, hold_id: str) -> Hold | None:
        key = scoped_key(tenant_id, hold_id)
        with self._transaction() as cur:
            hold = self._load_bodies(cur, "holds", "hold_key", [key], Hold, lock=False).get(key)
        if hold is not None:
            invariants.check_hold(hold, "on read")
        return hold

    def get_entry(self, tenant_id: str, entry_id: str) -> Entry | None:
        key = scoped_key(tenant_id, entry_id)
        with self._transaction() as cur:
            entry = self._load_bodies(cur, "entries", "entry_key", [key], Entry, lock=False).get(
                key
            )
        if entry is not None:
            invariants.check_entry(entry, "on read")
        return entry

    def get_entry_by_idempotency_key(self, tenant_id: str, key: str) -> Entry | None:
        with self._transaction() as cur:
            cur.execute(
                self._sql("SELECT body FROM entries WHERE tenant_id = %s AND idempotency_key = %s"),
                (tenant_id, key),
            )
            row = cur.fetchone()
        if not row:
            return None
        entry = msgpack_records.decode(bytes(row[0]), Entry)
        invariants.check_entry(entry, "on read")
        return entry

    def list_postings(
        self, tenant_id: str, account_id: str, after_seq: int, limit: int
    ) -> list[PostingRow]:
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT seq, entry_id, side, amount_minor, currency, posted_at_us "
                    "FROM postings "
                    "WHERE tenant_id = %s AND account_key = %s AND seq > %s ORDER BY seq LIMIT %s"
                ),
                (tenant_id, account_key(tenant_id, account_id), after_seq, limit),
            )
            return [
                PostingRow(
                    sequence=r[0],
                    account_id=account_id,
                    entry_id=r[1],
                    side=r[2],
                    amount_minor=r[3],
                    currency=r[4],
                    posted_at_us=r[5],
                )
                for r in cur.fetchall()
            ]

    def posted_as_of(self, tenant_id: str, account_id: str, as_of_us: int) -> tuple[int, int]:
        """(debits, credits) posted at or before as_of_us."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT side, COALESCE(SUM(amount_minor), 0) FROM postings "
                    "WHERE tenant_id = %s AND account_key = %s AND posted_at_us <= %s "
                    "GROUP BY side"
                ),
                (tenant_id, account_key(tenant_id, account_id), as_of_us),
            )
            sums = {int(r[0]): int(r[1]) for r in cur.fetchall()}
        return sums.get(Side.DEBIT, 0), sums.get(Side.CREDIT, 0)

    def check_balanced(self, tenant_id: str) -> BalanceCheck:
        """Checks, from the outside, the invariants the engine keeps."""
        with self._transaction() as cur:
            # Summed per account in SQL (each sum equals a counter, so it fits
            # in int64) and per currency here: a currency's total volume may
            # exceed int64, which SQLite's SUM refuses.
            cur.execute(
                self._sql(
                    "SELECT account_key, currency, side, COALESCE(SUM(amount_minor), 0), COUNT(*) "
                    "FROM postings WHERE tenant_id = %s GROUP BY account_key, currency, side"
                ),
                (tenant_id,),
            )
            sums: dict[str, list[int]] = {}
            by_account: dict[str, list[int]] = {}
            postings_checked = 0
            for key, currency, side, total, count in cur.fetchall():
                column = 0 if side == Side.DEBIT else 1
                sums.setdefault(currency, [0, 0, 0, 0])[column] += int(total)
                by_account.setdefault(key, [0, 0])[column] += int(total)
                postings_checked += int(count)
            accounts = self._load_all_accounts(cur, tenant_id)
            cur.execute(
                self._sql("SELECT body FROM holds WHERE tenant_id = %s AND state = %s"),
                (tenant_id, int(HoldState.PENDING)),
            )
            holds = [msgpack_records.decode(bytes(r[0]), Hold) for r in cur.fetchall()]
        pending: dict[str, list[int]] = {}
        for hold in holds:
            pending.setdefault(account_key(tenant_id, hold.debit_account_id), [0, 0])[0] += (
                hold.amount_minor
            )
            pending.setdefault(account_key(tenant_id, hold.credit_account_id), [0, 0])[1] += (
                hold.amount_minor
            )
        problems: list[str] = []
        for account in accounts:
            posted = by_account.get(account.key, [0, 0])
            if [account.debits_posted, account.credits_posted] != posted:
                problems.append(f"{account.account_id}: posted counters differ from postings")
            held = pending.get(account.key, [0, 0])
            if [account.debits_pending, account.credits_pending] != held:
                problems.append(f"{account.account_id}: pending counters differ from open holds")
            if account.violation():
                problems.append(f"{account.account_id}: {account.violation()}")
            totals = sums.setdefault(account.currency, [0, 0, 0, 0])
            totals[2] += account.debits_pending
            totals[3] += account.credits_pending
        result = [CurrencyTotals(c, v[0], v[1], v[2], v[3]) for c, v in sorted(sums.items())]
        for t in result:
            if t.debits_minor != t.credits_minor:
                problems.append(
                    f"{t.currency}: debits {t.debits_minor} != credits {t.credits_minor}"
                )
            if t.pending_debits_minor != t.pending_credits_minor:
                problems.append(f"{t.currency}: pending debits != pending credits")
        return BalanceCheck(not problems, result, len(accounts), postings_checked, problems)

    def _load_all_accounts(self, cur: Any, tenant_id: str) -> list[AccountState]:
        cur.execute(
            self._sql(
                f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = %s ORDER BY account_key"
            ),
            (tenant_id,),
        )
        return [_account_from_row(r) for r in cur.fetchall()]

    # ---- jobs' work lists ----

    def due_holds(self, now_us: int, limit: int) -> list[tuple[str, str]]:
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT hold_key FROM holds WHERE state = 1 AND expires_at_us <= %s "
                    "ORDER BY expires_at_us LIMIT %s"
                ),
                (now_us, limit),
            )
            return [_split_key(r[0]) for r in cur.fetchall()]

    def due_reserves(self, now_us: int, limit: int) -> list[tuple[str, str]]:
        # A total order: when a reserve account cannot pay every release due
        # at once, which ones it pays must not depend on the backend's order
        # of equal keys (releases deferred by one sweep share a release time).
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT reserve_key FROM reserves WHERE released = 0 AND release_at_us <= %s "
                    "ORDER BY release_at_us, reserve_key LIMIT %s"
                ),
                (now_us, limit),
            )
            return [_split_key(r[0]) for r in cur.fetchall()]

    # ---- outbox ----

    # The outbox, as the runtime's OutboxRelay reads it (triplane/runtime/outbox.py).

    # Events are published in (order_us, order_pos, event_id) order, which no
    # global sequence gives: what a consumer may rely on is that the events of
    # one commit keep their order, and that the events of commits changing
    # one account (hence one entry or hold: each changes its accounts) come
    # in commit order. Across accounts there is no order (there was none to
    # rely on with a sequence either: numbers were taken before commit).
    # JetStream drops a re-published event by its id (Nats-Msg-Id).

    def unsent(self, limit: int) -> list[OutgoingEvent]:
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT tenant_id, event_id, subject, data FROM outbox "
                    "WHERE sent_at_us IS NULL ORDER BY order_us, order_pos, event_id LIMIT %s"
                ),
                (limit,),
            )
            rows = cur.fetchall()
        self._remember_tenants(rows)
        return [OutgoingEvent(r[1], r[2], bytes(r[3])) for r in rows]

    def _remember_tenants(self, rows: Sequence[Sequence[Any]]) -> None:
        """The tenants of the events `unsent` returned last: `mark_sent` is
        given event ids only, and the outbox's key is (tenant_id, event_id)."""
        with self._unsent_lock:
            self._unsent_tenants = {r[1]: r[0] for r in rows}

    def _tenants_of_events(self, event_ids: Sequence[str]) -> list[str] | None:
        """The tenants of these events, as `unsent` read them; None if any is
        unknown (then mark_sent looks the events up by id alone)."""
        with self._unsent_lock:
            known = self._unsent_tenants
            tenants = {known.get(e) for e in event_ids}
        if None in tenants:
            return None
        return sorted(t for t in tenants if t is not None)

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        if not event_ids:
            return
        tenants = self._tenants_of_events(event_ids)
        where = f"event_id IN ({self._marks(len(event_ids))})"
        params: list[Any] = [now_us]
        if tenants is not None:
            where = f"tenant_id IN ({self._marks(len(tenants))}) AND {where}"
            params.extend(tenants)
        with self._transaction() as cur:
            cur.execute(
                f"UPDATE outbox SET sent_at_us = {self.placeholder} WHERE {where}",
                [*params, *event_ids],
            )

    def delete_sent_before(self, before_us: int) -> int:
        with self._transaction() as cur:
            cur.execute(
                self._sql("DELETE FROM outbox WHERE sent_at_us IS NOT NULL AND sent_at_us < %s"),
                (before_us,),
            )
            return int(cur.rowcount or 0)

    def purge_used_tokens(self, expired_before_us: int, limit: int) -> int:
        """Forgets up to `limit` spent token ids whose tokens expired before
        `expired_before_us` (a token that old is refused as expired anyway)."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "DELETE FROM decision_tokens WHERE (tenant_id, token_key) IN "
                    "(SELECT tenant_id, token_key FROM decision_tokens "
                    "WHERE expires_at_us < %s LIMIT %s)"
                ),
                (expired_before_us, limit),
            )
            return int(cur.rowcount or 0)

    def outbox_pending_count(self) -> int:
        with self._transaction() as cur:
            cur.execute("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL")
            return int(cur.fetchone()[0])


def _account_keys(commands: Sequence[Any], view: View) -> set[str]:
    keys: set[str] = set()
    for c in commands:
        for account_id in (c.debit_account_id, c.credit_account_id):
            if account_id:
                keys.add(account_key(c.tenant_id, account_id))
        for leg in c.splits:
            keys.add(account_key(c.tenant_id, leg.account_id))
            if leg.release_account_id:
                keys.add(account_key(c.tenant_id, leg.release_account_id))
    for hold in view.holds.values():
        keys.add(account_key(hold.tenant_id, hold.debit_account_id))
        keys.add(account_key(hold.tenant_id, hold.credit_account_id))
    for entry in view.entries.values():
        for posting in entry.postings:
            keys.add(account_key(entry.tenant_id, posting.account_id))
    for reserve in view.reserves.values():
        keys.add(account_key(reserve.tenant_id, reserve.account_id))
        keys.add(account_key(reserve.tenant_id, reserve.release_account_id))
    return keys


def _same_account(found: AccountState, spec: AccountSpec, field: str) -> None:
    pairs = [
        ("currency", found.currency, spec.currency),
        ("kind", found.kind, spec.kind),
        ("constraint", found.constraint, spec.constraint),
        ("overdraft_limit_minor", found.overdraft_limit_minor, spec.overdraft_limit_minor),
        ("metadata", found.metadata, spec.metadata),
    ]
    for name, old, new in pairs:
        if old != new:
            raise AlreadyExists(
                "ACCOUNT_EXISTS",
                f"account {found.account_id!r} exists with another {name}",
                f"{field}.{name}",
            )


def _split_key(scoped: str) -> tuple[str, str]:
    tenant_id, _, key = scoped.partition("/")
    return tenant_id, key
