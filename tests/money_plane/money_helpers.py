"""Helpers for the money plane tests: a ledger on a real backend, token and
command builders, and an independent reader of the store's tables.

The reader (`DbProbe`) queries the database with its own connection and plain
SQL, so invariants are recomputed from the raw postings, holds and counters
rather than trusted from the ledger's own `check_balanced`.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from money_plane.app import build_store
from money_plane.domain import (
    SELF_CONTAINED,
    AccountSpec,
    Command,
    Constraint,
    Entry,
    Hold,
    HoldState,
    Kind,
    Leg,
    LegKind,
    Outcome,
    Side,
    credit_account_of,
    movement_of,
)
from money_plane.ledger import Ledger
from money_plane.store import records as msgpack_records
from money_plane.store.base import LedgerStore
from tests.tls_helpers import dev_certificates
from triplane.runtime.clock import Clock, ManualClock
from triplane.runtime.config import Config, load_config, with_overrides
from triplane.runtime.tokens import (
    AUDIENCE,
    DecisionClaims,
    Movement,
    TokenSigner,
    TokenVerifier,
    generate_private_key,
    public_key_to_b64,
)

BACKENDS = ("sqlite", "postgres")
TOKEN_TTL_S = 24 * 3600
NO_CONSTRAINT = int(Constraint.NONE)
DEBITS_LIMITED = int(Constraint.DEBITS_MUST_NOT_EXCEED_CREDITS)
CREDITS_LIMITED = int(Constraint.CREDITS_MUST_NOT_EXCEED_DEBITS)


# The standard book of a tenant: a funding source without constraint, two
# customers that may not go below zero (one with an overdraft), a merchant,
# fee, tax and reserve accounts, a credit-limited loan account, and a JPY pair.
STANDARD_ACCOUNTS: list[tuple[str, str, int, int]] = [
    ("bank", "USD", NO_CONSTRAINT, 0),
    ("alice", "USD", DEBITS_LIMITED, 0),
    ("bob", "USD", DEBITS_LIMITED, 500),
    ("merchant", "USD", DEBITS_LIMITED, 0),
    ("fee", "USD", NO_CONSTRAINT, 0),
    ("tax", "USD", NO_CONSTRAINT, 0),
    ("reserve", "USD", DEBITS_LIMITED, 0),
    ("loan", "USD", CREDITS_LIMITED, 0),
    ("jbank", "JPY", NO_CONSTRAINT, 0),
    ("jcust", "JPY", DEBITS_LIMITED, 0),
]


def unique_tenant(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:16]}"


def ledger_config(state_dir: Path, signer: TokenSigner, **money: Any) -> Config:
    """Defaults, no environment, the test key trusted, a generous budget (the
    shared 2-core machine is slow; deadlines are not what these tests test),
    and the dev CA and certificates under the state dir (mutual TLS is on)."""
    dev_certificates(state_dir)
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir), "log_format": "text"},
        "keys": {"policy_public_keys": [public_key_to_b64(signer.public_key)]},
        "money": {"budget_ms": 120_000, **money},
    }
    return load_config(environ={}, overrides=overrides)


def make_store(backend: str, where: Path | str, config: Config) -> LedgerStore:
    """The store the plane itself would build (`money_plane.app.build_store`)
    for this backend and place, every setting of `config` honoured."""
    store: dict[str, Any] = {"backend": backend}
    if backend == "sqlite":
        store["sqlite_path"] = str(Path(where).resolve())
    else:
        store["postgres_dsn"] = str(where)
    return build_store(with_overrides(config, {"money": {"store": store}}))


def make_ledger(
    backend: str, where: Path | str, config: Config, signer: TokenSigner, clock: Clock
) -> Ledger:
    store = make_store(backend, where, config)
    verifier = TokenVerifier([signer.public_key], config.money.tokens.clock_skew_s)
    return Ledger(store, verifier, clock, config.money, single_writer=backend == "sqlite")


@dataclass
class BackendPlace:
    """Where a backend keeps its data: a SQLite file or a PostgreSQL DSN."""

    backend: str
    where: Path | str
    state_dir: Path


# ---- the raw reader ----


PROBE_STATEMENT_TIMEOUT_MS = 60_000


class DbProbe:
    """Plain SQL against the ledger's tables, on a connection of its own."""

    def __init__(self, backend: str, where: Path | str) -> None:
        self.backend = backend
        self.where = where
        self._conn: Any = None

    def _connection(self) -> Any:
        if self._conn is None:
            if self.backend == "sqlite":
                self._conn = sqlite3.connect(str(self.where), isolation_level=None)
                self._conn.execute("PRAGMA busy_timeout=10000")
            else:
                # A read that waits this long is stuck behind a lock: fail with
                # what every session of the database is doing (one such wait
                # hung a full run until pytest-timeout, with nothing to show).
                self._conn = psycopg.connect(
                    str(self.where),
                    autocommit=True,
                    options=f"-c statement_timeout={PROBE_STATEMENT_TIMEOUT_MS}",
                )
        return self._conn

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        if self.backend == "sqlite":
            sql = sql.replace("%s", "?")
        try:
            cur = self._connection().execute(sql, tuple(params))
        except psycopg.errors.QueryCanceled as error:
            sessions = self._sessions()
            raise AssertionError(f"probe read stuck: {error}; sessions: {sessions}") from None
        return [tuple(r) for r in cur.fetchall()]

    def _sessions(self) -> list[tuple[Any, ...]]:
        with psycopg.connect(str(self.where), autocommit=True) as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    "SELECT pid, state, wait_event_type, wait_event, xact_start, "
                    "left(query, 200) FROM pg_stat_activity WHERE datname = current_database()"
                ).fetchall()
            ]

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.rows(sql, params)[0][0]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ---- what the tests count ----

    def counters(self, tenant_id: str) -> dict[str, tuple[int, int, int, int]]:
        """Every account of the tenant: (debits_posted, credits_posted,
        debits_pending, credits_pending)."""
        return {
            r[0]: (int(r[1]), int(r[2]), int(r[3]), int(r[4]))
            for r in self.rows(
                "SELECT account_id, debits_posted, credits_posted, debits_pending, "
                "credits_pending FROM accounts WHERE tenant_id = %s ORDER BY account_id",
                (tenant_id,),
            )
        }

    def accounts(self, tenant_id: str) -> dict[str, tuple[str, int, int]]:
        """account_id -> (currency, constraint, overdraft_limit_minor)."""
        return {
            r[0]: (r[1], int(r[2]), int(r[3]))
            for r in self.rows(
                "SELECT account_id, currency, constraint_kind, overdraft_limit_minor "
                "FROM accounts WHERE tenant_id = %s",
                (tenant_id,),
            )
        }

    def postings(self, tenant_id: str) -> list[tuple[str, int, int, str]]:
        """(account_id, side, amount_minor, currency) of every posting of the
        tenant. Selected by exact key prefix, not LIKE, so no wildcard leaks."""
        prefix = f"{tenant_id}/"
        return [
            (r[0][len(prefix) :], int(r[1]), int(r[2]), r[3])
            for r in self.rows(
                "SELECT account_key, side, amount_minor, currency FROM postings "
                "WHERE substr(account_key, 1, %s) = %s",
                (len(prefix), prefix),
            )
        ]

    def open_holds(self, tenant_id: str) -> list[Hold]:
        return [
            msgpack_records.decode(bytes(r[0]), Hold)
            for r in self.rows(
                "SELECT body FROM holds WHERE tenant_id = %s AND state = %s",
                (tenant_id, int(HoldState.PENDING)),
            )
        ]

    def reserves(self, tenant_id: str) -> dict[str, tuple[int, bool]]:
        """reserve_id -> (release_at_us, released) of every reserve of the tenant."""
        return {
            r[0].split("/", 1)[1]: (int(r[1]), bool(r[2]))
            for r in self.rows(
                "SELECT reserve_key, release_at_us, released FROM reserves WHERE tenant_id = %s",
                (tenant_id,),
            )
        }

    def entries_by_key(self, tenant_id: str) -> dict[str, int]:
        return {
            r[0]: int(r[1])
            for r in self.rows(
                "SELECT idempotency_key, COUNT(*) FROM entries WHERE tenant_id = %s "
                "GROUP BY idempotency_key",
                (tenant_id,),
            )
        }

    def entry_count(self, tenant_id: str) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM entries WHERE tenant_id = %s", (tenant_id,)))

    def hold_count(self, tenant_id: str) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM holds WHERE tenant_id = %s", (tenant_id,)))

    def outbox_count(self) -> int:
        return int(self.scalar("SELECT COUNT(*) FROM outbox"))

    def hold(self, tenant_id: str, hold_id: str) -> Hold | None:
        rows = self.rows("SELECT body FROM holds WHERE hold_key = %s", (f"{tenant_id}/{hold_id}",))
        return msgpack_records.decode(bytes(rows[0][0]), Hold) if rows else None

    def entry(self, tenant_id: str, entry_id: str) -> Entry | None:
        rows = self.rows(
            "SELECT body FROM entries WHERE entry_key = %s", (f"{tenant_id}/{entry_id}",)
        )
        return msgpack_records.decode(bytes(rows[0][0]), Entry) if rows else None

    def used_tokens(self, tenant_id: str) -> dict[str, str]:
        """Spent decision token ids of the tenant -> the transfer fingerprint."""
        prefix = f"{tenant_id}/"
        return {
            r[0][len(prefix) :]: r[1]
            for r in self.rows(
                "SELECT token_key, fingerprint FROM decision_tokens "
                "WHERE substr(token_key, 1, %s) = %s",
                (len(prefix), prefix),
            )
        }

    def idempotency_count(self, tenant_id: str) -> int:
        prefix = f"{tenant_id}/"
        return int(
            self.scalar(
                "SELECT COUNT(*) FROM idempotency WHERE substr(scope_key, 1, %s) = %s",
                (len(prefix), prefix),
            )
        )

    def invariant_problems(self, tenant_id: str) -> list[str]:
        """Recomputes the ledger's invariants from the raw tables."""
        problems: list[str] = []
        counters = self.counters(tenant_id)
        specs = self.accounts(tenant_id)
        per_currency: dict[str, list[int]] = {}
        per_account: dict[str, list[int]] = {a: [0, 0] for a in counters}
        for account_id, side, amount, currency in self.postings(tenant_id):
            if amount <= 0:
                problems.append(f"posting of {amount} on {account_id}")
            if specs[account_id][0] != currency:
                problems.append(f"posting in {currency} on a {specs[account_id][0]} account")
            per_currency.setdefault(currency, [0, 0])[0 if side == Side.DEBIT else 1] += amount
            per_account[account_id][0 if side == Side.DEBIT else 1] += amount
        for currency, (debits, credits) in per_currency.items():
            if debits != credits:
                problems.append(f"{currency}: postings debit {debits} != credit {credits}")
        pending: dict[str, list[int]] = {a: [0, 0] for a in counters}
        for hold in self.open_holds(tenant_id):
            pending[hold.debit_account_id][0] += hold.amount_minor
            pending[hold.credit_account_id][1] += hold.amount_minor
        for account_id, (dp, cp, dpe, cpe) in counters.items():
            if [dp, cp] != per_account[account_id]:
                problems.append(f"{account_id}: posted {dp, cp} != {per_account[account_id]}")
            if [dpe, cpe] != pending[account_id]:
                problems.append(f"{account_id}: pending {dpe, cpe} != holds {pending[account_id]}")
            _, constraint, overdraft = specs[account_id]
            if constraint == DEBITS_LIMITED and dp + dpe > cp + overdraft:
                problems.append(f"{account_id}: below its limit")
            if constraint == CREDITS_LIMITED and cp + cpe > dp:
                problems.append(f"{account_id}: credits above debits")
        return problems


# ---- building requests ----


@dataclass
class Kit:
    """A ledger with a tenant, a clock, a signer and request builders."""

    ledger: Ledger
    clock: ManualClock
    signer: TokenSigner
    backend: str
    where: Path | str
    tenant: str
    probe: DbProbe = field(init=False)

    def __post_init__(self) -> None:
        self.probe = DbProbe(self.backend, self.where)

    def movement(self, cmd: Command) -> Movement:
        """What the command will do, as its token must name it: a capture's
        accounts from its hold, a refund's from the entry it refunds (read
        from the tables; an unknown one leaves them empty)."""
        if cmd.kind in SELF_CONTAINED:
            return movement_of(
                cmd,
                debit_account_id=cmd.debit_account_id,
                credit_account_id=cmd.credit_account_id,
                amount_minor=cmd.amount_minor,
                currency=cmd.currency,
            )
        if cmd.kind == Kind.CAPTURE:
            hold = self.probe.hold(cmd.tenant_id, cmd.hold_id)
            return movement_of(
                cmd,
                debit_account_id=hold.debit_account_id if hold else "",
                credit_account_id=hold.credit_account_id if hold else "",
                amount_minor=cmd.amount_minor or (hold.amount_minor if hold else 0),
                currency=hold.currency if hold else cmd.currency,
            )
        entry = self.probe.entry(cmd.tenant_id, cmd.entry_id)
        remaining = entry.amount_minor - entry.refunded_minor if entry else 0
        return movement_of(
            cmd,
            debit_account_id=credit_account_of(entry) if entry else "",
            credit_account_id=entry.postings[0].account_id if entry else "",
            amount_minor=cmd.amount_minor or remaining,
            currency=entry.currency if entry else cmd.currency,
        )

    def token_for(
        self,
        cmd: Command,
        *,
        ttl_s: int = TOKEN_TTL_S,
        issued_ago_s: int = 0,
        outcome: str = "allow",
        audience: str = AUDIENCE,
        signer: TokenSigner | None = None,
        token_id: str | None = None,
        **terms: Any,
    ) -> str:
        """A token for the command, with any movement term replaced by `terms`
        (a token for something else), issued `issued_ago_s` ago (negative: in
        the future) and valid `ttl_s` from then."""
        movement = msgspec.structs.replace(self.movement(cmd), **terms)
        return sign_movement(
            signer or self.signer,
            movement,
            issued_at_s=self.clock.now_us() // 1_000_000 - issued_ago_s,
            ttl_s=ttl_s,
            outcome=outcome,
            audience=audience,
            token_id=token_id,
        )

    def with_token(self, cmd: Command, **token_options: Any) -> Command:
        """The command carrying a token (see token_for) of its own."""
        return msgspec.structs.replace(cmd, decision_token=self.token_for(cmd, **token_options))

    def move(
        self,
        key: str,
        debit: str,
        credit: str,
        amount_minor: int,
        currency: str = "USD",
        *,
        kind: Kind = Kind.TRANSFER,
        splits: Iterable[Leg] = (),
        token: str | None = None,
        tenant: str | None = None,
        hold_timeout_s: int = 0,
        description: str = "",
        metadata: dict[str, str] | None = None,
    ) -> Command:
        """A TRANSFER (or PAYOUT / AUTHORIZE) with a valid token unless given."""
        command = Command(
            tenant_id=tenant or self.tenant,
            idempotency_key=key,
            kind=kind,
            debit_account_id=debit,
            credit_account_id=credit,
            amount_minor=amount_minor,
            currency=currency,
            splits=list(splits),
            decision_token=token or "",
            hold_timeout_s=hold_timeout_s,
            description=description,
            metadata=metadata or {},
        )
        return command if token is not None else self.with_token(command)

    def authorize(
        self,
        key: str,
        debit: str,
        credit: str,
        amount_minor: int,
        currency: str = "USD",
        hold_timeout_s: int = 0,
    ) -> Command:
        return self.move(
            key,
            debit,
            credit,
            amount_minor,
            currency,
            kind=Kind.AUTHORIZE,
            hold_timeout_s=hold_timeout_s,
        )

    def capture(
        self,
        key: str,
        hold_id: str,
        amount_minor: int = 0,
        currency: str = "",
        splits: Iterable[Leg] = (),
        token: str | None = None,
    ) -> Command:
        """A CAPTURE; with splits, a valid token unless given."""
        command = Command(
            tenant_id=self.tenant,
            idempotency_key=key,
            kind=Kind.CAPTURE,
            hold_id=hold_id,
            amount_minor=amount_minor,
            currency=currency or ("USD" if amount_minor else ""),
            splits=list(splits),
            decision_token=token or "",
        )
        return self.with_token(command) if token is None and command.splits else command

    def void(self, key: str, hold_id: str) -> Command:
        return Command(tenant_id=self.tenant, idempotency_key=key, kind=Kind.VOID, hold_id=hold_id)

    def refund(
        self,
        key: str,
        entry_id: str,
        amount_minor: int = 0,
        currency: str = "",
        token: str | None = None,
    ) -> Command:
        """A REFUND with a valid token unless given."""
        command = Command(
            tenant_id=self.tenant,
            idempotency_key=key,
            kind=Kind.REFUND,
            entry_id=entry_id,
            amount_minor=amount_minor,
            currency=currency or ("USD" if amount_minor else ""),
            decision_token=token or "",
        )
        return command if token is not None else self.with_token(command)

    async def submit(self, *commands: Command, atomic: bool = False) -> list[Outcome]:
        return await self.ledger.submit(self.tenant, list(commands), atomic=atomic)

    async def one(self, command: Command) -> Outcome:
        [outcome] = await self.ledger.submit(command.tenant_id, [command])
        return outcome

    async def ok(self, command: Command) -> Outcome:
        outcome = await self.one(command)
        assert outcome.error is None, outcome.error
        return outcome

    async def open(self, *accounts: tuple[str, str, int, int], tenant: str | None = None) -> None:
        """Opens accounts given as (account_id, currency, constraint, overdraft)."""
        await self.ledger.create_accounts(
            tenant or self.tenant,
            [
                spec(account_id, currency, constraint, overdraft)
                for account_id, currency, constraint, overdraft in accounts
            ],
        )

    async def fund(
        self, account_id: str, amount_minor: int, currency: str = "USD", source: str = "bank"
    ) -> Outcome:
        return await self.ok(
            self.move(f"fund-{uuid.uuid4().hex[:12]}", source, account_id, amount_minor, currency)
        )

    async def balance(self, account_id: str) -> tuple[int, int, int]:
        """(posted, pending debits, available) as the ledger reports them."""
        account = await self.ledger.get_account(self.tenant, account_id)
        return account.posted, account.debits_pending, account.available

    def snapshot(self) -> dict[str, tuple[int, int, int, int]]:
        return self.probe.counters(self.tenant)

    async def assert_balanced(self) -> None:
        check = await self.ledger.check_balanced(self.tenant)
        assert check.balanced, check.problems
        assert self.probe.invariant_problems(self.tenant) == []


def sign_movement(
    signer: TokenSigner,
    movement: Movement,
    *,
    issued_at_s: int,
    ttl_s: int = TOKEN_TTL_S,
    outcome: str = "allow",
    audience: str = AUDIENCE,
    token_id: str | None = None,
) -> str:
    """A decision token for `movement` as the policy plane would sign it
    (decision id `dec-<idempotency key>`), any claim of it settable."""
    return signer.sign(
        DecisionClaims(
            token_id=token_id or uuid.uuid4().hex,
            issued_at_s=issued_at_s,
            expires_at_s=issued_at_s + ttl_s,
            audience=audience,
            decision_id=f"dec-{movement.idempotency_key}",
            outcome=outcome,
            **msgspec.structs.asdict(movement),
        )
    )


def sign_token(
    signer: TokenSigner,
    tenant_id: str,
    key: str,
    debit_account_id: str,
    credit_account_id: str,
    amount_minor: int,
    currency: str = "USD",
    *,
    kind: str = "transfer",
    issued_at_s: int | None = None,
    ttl_s: int = TOKEN_TTL_S,
) -> str:
    """A token for a plain movement (no splits), issued now by default."""
    return sign_movement(
        signer,
        Movement(
            tenant_id=tenant_id,
            kind=kind,
            debit_account_id=debit_account_id,
            credit_account_id=credit_account_id,
            amount_minor=amount_minor,
            currency=currency,
            idempotency_key=key,
        ),
        issued_at_s=int(time.time()) if issued_at_s is None else issued_at_s,
        ttl_s=ttl_s,
    )


def spec(
    account_id: str,
    currency: str = "USD",
    constraint: int = NO_CONSTRAINT,
    overdraft_limit_minor: int = 0,
    kind: int = 2,
) -> AccountSpec:
    return AccountSpec(
        account_id=account_id,
        currency=currency,
        kind=kind,
        constraint=constraint,
        overdraft_limit_minor=overdraft_limit_minor,
        metadata={},
    )


def bps_leg(
    account_id: str,
    basis_points: int,
    label: str = "",
    release_at_us: int = 0,
    release_account_id: str = "",
) -> Leg:
    return Leg(
        account_id=account_id,
        kind=int(LegKind.BASIS_POINTS),
        amount_minor=0,
        basis_points=basis_points,
        label=label,
        release_at_us=release_at_us,
        release_account_id=release_account_id,
    )


def fixed_leg(account_id: str, amount_minor: int, label: str = "") -> Leg:
    return Leg(
        account_id=account_id,
        kind=int(LegKind.FIXED),
        amount_minor=amount_minor,
        basis_points=0,
        label=label,
        release_at_us=0,
        release_account_id="",
    )


def new_signer() -> TokenSigner:
    return TokenSigner(generate_private_key())


# ---- JetStream ----


async def stream_messages(
    nats_url: str, subject: str, expected: int, wait_s: float = 20.0
) -> list[tuple[str, str]]:
    """(Nats-Msg-Id, event_type subject) of every message on `subject` in the
    TRIPLANE_MONEY stream, read with an ordered consumer. Reads `expected`
    messages (or until `wait_s` passes), then waits a little for any extra."""
    import nats

    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        sub = await js.subscribe(subject, ordered_consumer=True)
        found: list[tuple[str, str]] = []
        deadline = time.monotonic() + wait_s
        while len(found) < expected and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(0.1, deadline - time.monotonic()))
            except nats.errors.TimeoutError:
                break
            found.append(((msg.headers or {}).get("Nats-Msg-Id", ""), msg.subject))
        while True:  # anything beyond what is expected is a duplicate
            try:
                msg = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                break
            found.append(((msg.headers or {}).get("Nats-Msg-Id", ""), msg.subject))
        await sub.unsubscribe()
        return found
    finally:
        await client.close()


async def stream_count(nats_url: str, subject: str) -> int:
    import nats

    client = await nats.connect(nats_url)
    try:
        info = await client.jetstream().stream_info("TRIPLANE_MONEY", subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await client.close()


def transfer_token(
    signer: TokenSigner,
    tenant_id: str,
    transfer: Any,
    *,
    issued_at_s: int | None = None,
    ttl_s: int = TOKEN_TTL_S,
    **terms: Any,
) -> str:
    """A token for a money.v1.Transfer message as the servicer will read it,
    any term replaced by `terms` (a CAPTURE's or REFUND's accounts and amount
    are its hold's or entry's: give them as terms). A message the servicer
    would refuse (an unknown kind, a bad split) still gets a token, for the
    parts it has."""
    from money_plane import codec

    try:
        command = codec.command(tenant_id, transfer)
    except Exception:
        command = codec.command(tenant_id, type(transfer)(idempotency_key=transfer.idempotency_key))
    kind = command.kind if command.kind in MOVEMENT_KINDS_BY_VALUE else int(Kind.TRANSFER)
    movement = movement_of(
        msgspec.structs.replace(command, kind=kind),
        debit_account_id=command.debit_account_id,
        credit_account_id=command.credit_account_id,
        amount_minor=command.amount_minor,
        currency=command.currency,
    )
    return sign_movement(
        signer,
        msgspec.structs.replace(movement, **terms),
        issued_at_s=int(time.time()) if issued_at_s is None else issued_at_s,
        ttl_s=ttl_s,
    )


MOVEMENT_KINDS_BY_VALUE = frozenset(
    int(k) for k in (Kind.TRANSFER, Kind.PAYOUT, Kind.AUTHORIZE, Kind.CAPTURE, Kind.REFUND)
)
