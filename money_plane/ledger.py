"""The ledger as the servicer sees it: validation, token checks, group commit.

Requests are validated and their decision tokens verified on arrival (cheap,
stateless); then they queue for a committer. Each committer takes everything
queued (up to a bound) and commits it as one database transaction (see
store/base.py), so throughput grows with load instead of collapsing on a hot
account. A request whose deadline passes while it queues is dropped unwritten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from money_plane import invariants
from money_plane import metrics as m
from money_plane.domain import (
    SELF_CONTAINED,
    AccountSpec,
    AccountState,
    Command,
    Entry,
    Hold,
    Kind,
    Outcome,
    Tenant,
    account_key,
    check_account_spec,
    check_command,
    check_id,
    check_tenant_id,
    check_text,
    movement_of,
    needs_token,
)
from money_plane.engine import Job
from money_plane.store.base import BalanceCheck, LedgerStore, PostingRow
from triplane.runtime import codec as wire
from triplane.runtime import tenants
from triplane.runtime.clock import Clock
from triplane.runtime.config import ConfigError, MoneyConfig
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TriplaneError,
    Unavailable,
)
from triplane.runtime.tasks import cancel_and_wait
from triplane.runtime.tokens import TokenVerifier

log = logging.getLogger("triplane.money.ledger")
T = TypeVar("T")


@dataclass
class _Pending:
    job: Job
    deadline: Deadline
    future: asyncio.Future[list[Outcome]] = field(repr=False)


_KIND_LABELS = {kind.value: kind.name.lower() for kind in Kind}


def _count_outcomes(commands: list[Command], outcomes: list[Outcome]) -> None:
    for command, outcome in zip(commands, outcomes, strict=False):
        result = "refused" if outcome.error else "replayed" if outcome.replayed else "committed"
        m.TRANSFERS.labels(_KIND_LABELS.get(command.kind, "unknown"), result).inc()


class Ledger:
    def __init__(
        self,
        store: LedgerStore,
        verifier: TokenVerifier,
        clock: Clock,
        config: MoneyConfig,
        single_writer: bool = False,
    ) -> None:
        if config.tokens.used_retention_s <= config.tokens.clock_skew_s:
            # A spent token id forgotten while its token still verifies could
            # be spent again.
            raise ConfigError("money.tokens.used_retention_s must exceed money.tokens.clock_skew_s")
        self.store = store
        self.config = config
        self._verifier = verifier
        self._clock = clock
        self._workers = 1 if single_writer else config.group_commit.workers
        self._writer = ThreadPoolExecutor(self._workers, thread_name_prefix="ledger-writer")
        self._reader = ThreadPoolExecutor(4, thread_name_prefix="ledger-reader")
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._queued_transfers = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.committed = asyncio.Event()
        self.stats = {"groups": 0, "jobs": 0, "commands": 0}

    @property
    def clock(self) -> Clock:
        return self._clock

    # ---- lifecycle ----

    async def start(self, sweepers: bool = True) -> None:
        await self._write(self.store.create_schema)
        for index in range(self._workers):
            self._tasks.append(asyncio.create_task(self._committer(), name=f"committer-{index}"))
        if sweepers:
            self._tasks.append(asyncio.create_task(self._sweep_holds(), name="hold-expiry"))
            self._tasks.append(asyncio.create_task(self._sweep_reserves(), name="reserves"))
            self._tasks.append(asyncio.create_task(self._sweep_used_tokens(), name="used-tokens"))

    async def stop(self) -> None:
        """Lets queued requests commit, then stops the workers."""
        if self._queue.qsize():
            await asyncio.wait_for(self._queue.join(), timeout=10)
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for executor in (self._writer, self._reader):
            executor.submit(self.store.close)
        for executor in (self._writer, self._reader):
            executor.shutdown(wait=True)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def run_on_writer(self, fn: Callable[[], T]) -> T:
        """Runs blocking store work on the writer's thread and connection. On
        SQLite the outbox relay does, so its marks queue behind group commits
        instead of racing them for the write lock (SQLite's busy handler sleeps
        in steps of milliseconds, which showed up as the plane's p99)."""
        return await self._write(fn)

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, *args)

    # ---- tenants and accounts ----

    async def create_tenant(self, tenant_id: str, display_name: str) -> Tenant:
        check_tenant_id(tenant_id)
        check_text(display_name, "display_name", self.config.limits)
        now_us = self._clock.now_us()
        # Registered on the spine through the outbox, in the tenant's own
        # transaction: the gateway and the AI plane accept events only for
        # registered tenants (triplane.runtime.tenants).
        registration = tenants.registration(tenant_id, display_name, now_us)
        return await self._write(
            self.store.create_tenant, tenant_id, display_name, now_us, registration
        )

    async def create_accounts(self, tenant_id: str, specs: list[AccountSpec]) -> list[AccountState]:
        check_tenant_id(tenant_id)
        limit = self.config.limits.max_accounts_per_request
        if not specs:
            raise InvalidArgument("FIELD_REQUIRED", "at least one account is required", "accounts")
        if len(specs) > limit:
            raise InvalidArgument(
                "BATCH_TOO_LARGE", f"at most {limit} accounts per request", "accounts"
            )
        for index, spec in enumerate(specs):
            check_account_spec(spec, f"accounts[{index}]", self.config.limits)
        return await self._write(self.store.create_accounts, tenant_id, specs, self._clock.now_us())

    async def get_account(self, tenant_id: str, account_id: str) -> AccountState:
        check_tenant_id(tenant_id)
        check_id(account_id, "account_id", self.config.limits)
        account = await self._read(self.store.get_account, tenant_id, account_id)
        if account is None:
            raise NotFound("ACCOUNT_NOT_FOUND", f"no account {account_id!r}", "account_id")
        return account

    # ---- transfers ----

    async def submit(
        self,
        tenant_id: str,
        commands: list[Command],
        *,
        atomic: bool = False,
        deadline: Deadline | None = None,
        field_prefix: str = "transfers",
        indexed: bool = True,
    ) -> list[Outcome]:
        """Validates, verifies tokens, queues for group commit, waits."""
        check_tenant_id(tenant_id)
        limit = self.config.limits.max_transfers_per_request
        if not commands:
            raise InvalidArgument(
                "FIELD_REQUIRED", "at least one transfer is required", field_prefix
            )
        if len(commands) > limit:
            raise InvalidArgument(
                "BATCH_TOO_LARGE", f"at most {limit} transfers per request", field_prefix
            )
        fields = [f"{field_prefix}[{i}]" if indexed else field_prefix for i in range(len(commands))]
        job = self.prepare_job(tenant_id, commands, fields, atomic=atomic)
        return await self._enqueue(
            job, deadline or Deadline.from_remaining(None, self.config.budget_ms / 1000.0)
        )

    def prepare_job(
        self, tenant_id: str, commands: list[Command], fields: list[str], *, atomic: bool = False
    ) -> Job:
        """Validates the commands and verifies their decision tokens: the job
        the group commit runs (or a payout's transaction, beside its row)."""
        for cmd, where in zip(commands, fields, strict=True):
            check_command(cmd, where, self.config.limits, self.config.holds.max_timeout_s)
        job = Job(tenant_id=tenant_id, commands=[], atomic=atomic, fields=fields)
        now_us = self._clock.now_us()
        for index, (cmd, where) in enumerate(zip(commands, fields, strict=True)):
            job.commands.append(self._authorize_command(job, index, cmd, where, now_us))
        return job

    def _authorize_command(
        self, job: Job, index: int, cmd: Command, where: str, now_us: int
    ) -> Command:
        """Verifies the command's decision token: signature, audience, and,
        for a movement whose terms the command carries itself, every term. A
        capture's and a refund's terms are checked by the engine against the
        hold or entry, which it loads; the engine also spends the token id."""
        if not needs_token(cmd) and not (cmd.kind == Kind.CAPTURE and cmd.decision_token):
            return cmd
        field = f"{where}.decision_token"
        verifier = self._verifier
        try:
            claims = verifier.decode(cmd.decision_token, field)
            if cmd.kind in SELF_CONTAINED:
                movement = movement_of(
                    cmd,
                    debit_account_id=cmd.debit_account_id,
                    credit_account_id=cmd.credit_account_id,
                    amount_minor=cmd.amount_minor,
                    currency=cmd.currency,
                )
            else:
                # What the command fixes itself now (tenant, kind, key, hold
                # or entry, splits, an explicit amount), before the engine
                # acts on the hold or entry it names; the rest there.
                movement = movement_of(
                    cmd,
                    debit_account_id=claims.debit_account_id,
                    credit_account_id=claims.credit_account_id,
                    amount_minor=cmd.amount_minor or claims.amount_minor,
                    currency=cmd.currency or claims.currency,
                )
            verifier.check_movement(claims, movement, field)
            verifier.check_time(claims, now_us, field)
        except PermissionDenied as err:
            if err.reason == "DECISION_TOKEN_EXPIRED":
                # A retry of a committed transfer may carry its original, now
                # expired, token: the engine replays it or refuses it.
                return msgspec.structs.replace(cmd, token_expired=True)
            job.preset_errors[index] = err
            return cmd
        return msgspec.structs.replace(cmd, decision_id=claims.decision_id, claims=claims)

    async def _enqueue(self, job: Job, deadline: Deadline) -> list[Outcome]:
        size = len(job.commands)
        if self._queued_transfers + size > self.config.group_commit.max_queue_transfers:
            raise ResourceExhausted(
                "COMMIT_QUEUE_FULL", "the ledger is at capacity; retry with backoff", ""
            )
        future: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
        self._queued_transfers += size
        m.COMMIT_QUEUE_TRANSFERS.inc(size)
        self._queue.put_nowait(_Pending(job, deadline, future))
        return await future

    async def _committer(self) -> None:
        max_transfers = self.config.group_commit.max_batch_transfers
        max_wait_s = self.config.group_commit.max_wait_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            group = [await self._queue.get()]
            size = len(group[0].job.commands)
            until = loop.time() + max_wait_s
            while size < max_transfers:
                if self._queue.empty():
                    if max_wait_s <= 0 or loop.time() >= until:
                        break
                    await asyncio.sleep(0)
                    continue
                pending = self._queue.get_nowait()
                group.append(pending)
                size += len(pending.job.commands)
            try:
                await self._commit_group(group)
            finally:
                self._queued_transfers -= size
                m.COMMIT_QUEUE_TRANSFERS.dec(size)
                for _ in group:
                    self._queue.task_done()

    async def _commit_group(self, group: list[_Pending]) -> None:
        live: list[_Pending] = []
        for pending in group:
            if pending.future.done():
                continue
            if pending.deadline.expired():
                pending.future.set_exception(
                    DeadlineExceeded(
                        "DEADLINE_EXCEEDED", "deadline passed while queued; nothing was written", ""
                    )
                )
                continue
            live.append(pending)
        if not live:
            return
        now_us = self._clock.now_us()
        try:
            results = await self._write(self.store.commit_jobs, [p.job for p in live], now_us)
        except Exception:
            log.warning(
                "group commit of %d jobs failed; committing them one by one",
                len(live),
                exc_info=True,
            )
            await self._commit_one_by_one(live, now_us)
            return
        self._record(live, results)

    async def _commit_one_by_one(self, live: list[_Pending], now_us: int) -> None:
        """One poisoned job must not fail its neighbours."""
        for pending in live:
            try:
                results = await self._write(self.store.commit_jobs, [pending.job], now_us)
            except TriplaneError as err:
                pending.future.set_exception(err)
            except AssertionError as exc:
                # An assert in the engine is a broken invariant, not an outage:
                # INTERNAL and logged as loudly as the ledger's own checks.
                keys = ",".join(c.idempotency_key for c in pending.job.commands)
                pending.future.set_exception(
                    invariants.violation(
                        str(exc) or "an assertion failed",
                        kind="request",
                        record_id=keys[:200],
                        tenant_id=pending.job.tenant_id,
                        when="while committing",
                    )
                )
            except Exception as exc:
                log.error("commit failed", exc_info=True)
                pending.future.set_exception(
                    Unavailable("STORE_UNAVAILABLE", f"ledger store unavailable: {exc}", "")
                )
            else:
                self._record([pending], results)

    def _record(self, live: list[_Pending], results: list[list[Outcome]]) -> None:
        self.stats["groups"] += 1
        transfers = 0
        for pending, outcomes in zip(live, results, strict=True):
            self.stats["jobs"] += 1
            self.stats["commands"] += len(outcomes)
            transfers += len(outcomes)
            _count_outcomes(pending.job.commands, outcomes)
            if not pending.future.done():
                pending.future.set_result(outcomes)
        m.GROUP_COMMIT_TRANSFERS.observe(transfers)
        self.committed.set()

    # ---- sweepers: hold expiry and reserve releases go through the same queue ----

    async def _sweep_holds(self) -> None:
        holds = self.config.holds
        while True:
            await asyncio.sleep(holds.expiry_sweep_interval_s)
            try:
                await self.expire_due_holds()
            except Exception:
                log.exception("hold expiry sweep failed")

    async def expire_due_holds(self) -> int:
        due = await self._read(
            self.store.due_holds, self._clock.now_us(), self.config.holds.expiry_sweep_batch
        )
        await self._run_internal(
            [
                Command(tenant_id=t, idempotency_key="", kind=Kind.EXPIRE_HOLD, hold_id=h)
                for t, h in due
            ]
        )
        return len(due)

    async def _sweep_reserves(self) -> None:
        reserves = self.config.reserves
        while True:
            await asyncio.sleep(reserves.release_sweep_interval_s)
            try:
                await self.release_due_reserves()
            except Exception:
                log.exception("reserve release sweep failed")

    async def release_due_reserves(self) -> int:
        due = await self._read(
            self.store.due_reserves, self._clock.now_us(), self.config.reserves.release_sweep_batch
        )
        outcomes = await self._run_internal(
            [
                Command(tenant_id=t, idempotency_key="", kind=Kind.RESERVE_RELEASE, reserve_id=r)
                for t, r in due
            ]
        )
        for (tenant_id, reserve_id), outcome in zip(due, outcomes, strict=True):
            m.RESERVE_RELEASES.labels("released" if outcome.error is None else "deferred").inc()
            if outcome.error is not None:
                log.error(
                    "reserve release refused (%s): reserve %s of tenant %s is tried again "
                    "in %d s (money.reserves.refused_retry_s)",
                    outcome.error.reason,
                    reserve_id,
                    tenant_id,
                    self.config.reserves.refused_retry_s,
                )
        return sum(1 for o in outcomes if o.entry is not None)

    async def _sweep_used_tokens(self) -> None:
        while True:
            await asyncio.sleep(self.config.tokens.purge_interval_s)
            try:
                await self.purge_used_tokens()
            except Exception:
                log.exception("purging spent decision token ids failed")

    async def purge_used_tokens(self) -> int:
        """Forgets spent token ids past their token's expiry plus
        money.tokens.used_retention_s, a batch at a time."""
        tokens = self.config.tokens
        cutoff_us = self._clock.now_us() - tokens.used_retention_s * 1_000_000
        total = 0
        while True:
            purged = await self._write(self.store.purge_used_tokens, cutoff_us, tokens.purge_batch)
            total += purged
            if purged < tokens.purge_batch:
                return total

    async def _run_internal(self, commands: list[Command]) -> list[Outcome]:
        if not commands:
            return []
        job = Job(tenant_id="", commands=commands)
        return await self._enqueue(job, Deadline(None))

    # ---- reads ----

    async def balance_as_of(self, tenant_id: str, account_id: str, as_of_us: int) -> AccountState:
        account = await self.get_account(tenant_id, account_id)
        debits, credits = await self._read(self.store.posted_as_of, tenant_id, account_id, as_of_us)
        return msgspec.structs.replace(
            account,
            debits_posted=debits,
            credits_posted=credits,
            debits_pending=0,
            credits_pending=0,
        )

    async def list_postings(
        self, tenant_id: str, account_id: str, page_size: int, after_seq: int
    ) -> list[PostingRow]:
        await self.get_account(tenant_id, account_id)
        limits = self.config.limits
        size = wire.page_size(page_size, limits.default_page_size, limits.max_page_size)
        return await self._read(self.store.list_postings, tenant_id, account_id, after_seq, size)

    async def list_tenants(self, limit: int, after_tenant_id: str) -> list[Tenant]:
        """`limit` tenants after `after_tenant_id`, in id order."""
        return await self._read(self.store.list_tenants, after_tenant_id, limit)

    async def list_accounts(
        self, tenant_id: str, limit: int, after_account_id: str
    ) -> list[AccountState]:
        check_tenant_id(tenant_id)
        if not await self._read(self.store.tenant_exists, tenant_id):
            raise NotFound("TENANT_NOT_FOUND", f"no tenant {tenant_id!r}", "tenant_id")
        # `limit`: the service's page size and one more (is there a next page).
        after = account_key(tenant_id, after_account_id) if after_account_id else ""
        return await self._read(self.store.list_accounts, tenant_id, after, limit)

    async def get_entry(self, tenant_id: str, entry_id: str, idempotency_key: str) -> Entry:
        check_tenant_id(tenant_id)
        if bool(entry_id) == bool(idempotency_key):
            raise InvalidArgument(
                "ONE_OF_REQUIRED", "give exactly one of entry_id and idempotency_key", "entry_id"
            )
        if entry_id:
            check_id(entry_id, "entry_id", self.config.limits)
            entry = await self._read(self.store.get_entry, tenant_id, entry_id)
        else:
            check_id(idempotency_key, "idempotency_key", self.config.limits)
            entry = await self._read(
                self.store.get_entry_by_idempotency_key, tenant_id, idempotency_key
            )
        if entry is None:
            raise NotFound(
                "ENTRY_NOT_FOUND", "no such entry", "entry_id" if entry_id else "idempotency_key"
            )
        return entry

    async def get_hold(self, tenant_id: str, hold_id: str) -> Hold:
        check_tenant_id(tenant_id)
        check_id(hold_id, "hold_id", self.config.limits)
        hold = await self._read(self.store.get_hold, tenant_id, hold_id)
        if hold is None:
            raise NotFound("HOLD_NOT_FOUND", f"no hold {hold_id!r}", "hold_id")
        return hold

    async def check_balanced(self, tenant_id: str) -> BalanceCheck:
        check_tenant_id(tenant_id)
        if not await self._read(self.store.tenant_exists, tenant_id):
            raise NotFound("TENANT_NOT_FOUND", f"no tenant {tenant_id!r}", "tenant_id")
        return await self._read(self.store.check_balanced, tenant_id)
