"""Remembered answers of the gateway's mutating RPCs (ARCHITECTURE.md rule 6).

A record is keyed by (tenant, RPC, idempotency key) and holds a keyed hash of
each of the request's flattened fields (so a reuse with another payload is
refused naming the first field that differs, and no card number, name, e-mail
or phone rests here: gateway/pii.py) and the serialized answer. Records live in memory (bounded,
oldest dropped first) and in the runtime's storage layer
(`triplane.runtime.db`: SQLite embedded, PostgreSQL at scale, the same SQL),
written in batches by one background task (group commit), so remembering costs
the hot path no disk wait. A lookup that misses memory reads by primary key:
on SQLite on the event loop (WAL readers never wait for the writer, and the
read costs microseconds, less than handing it to a thread), on PostgreSQL in a
worker thread (a network round trip must not stall the loop). The planes keep
their own keys for good and the gateway derives theirs from the caller's, so a
record lost in a crash only means the flow runs again and every plane returns
what it already did: no money moves twice, no decision is made twice.

Events that belong to an answer (an exposure, an outcome, a bandit reward) go
into the outbox table of the same database, committed in the same transaction
as the answers queued with them; the shared outbox relay
(triplane/runtime/outbox.py) publishes them to JetStream with their event ids,
so NATS being down delays them and loses none. A crash inside one flush
interval loses an answer and its events together, and the retry that follows
recreates both under the same stable ids.

A flow also journals its intermediate input (the policy request with its
context snapshot, less the names the retry carries again) under the step
"input", so a retry sends the policy plane the exact request it already
decided instead of a fresh snapshot it would refuse.

Replicas (ARCHITECTURE.md rule 9). On PostgreSQL every gateway replica shares
the store, and a key is answered once whichever replica gets it, including two
racing on it: the task that first gets a key claims it, in this process (one
flow per key at a time; another task with the key waits for its answer) and,
on PostgreSQL, in the database (a `remembered_claims` row per key, taken with
INSERT ... ON CONFLICT, so exactly one replica wins; the other polls until the
answer is committed, which deletes the claim in the same transaction). A claim
whose task ends without an answer (an error, a cancelled call) is given up; a
replica that died holding one loses it when its lease (`claim_lease_s`)
lapses, and the flow then runs again under the same derived keys, which every
plane answers as it did. Each relay claims the outbox rows it is about to
publish (FOR UPDATE SKIP LOCKED, then a lease), so two replicas' relays never
publish the same event. On SQLite (one replica by construction) claims stay in
process and cost the request no write.

A store written before fields were hashed is brought in line once, when it
first opens with a `rehash`: each record's fields are replaced by their
hashes and the journals (which held names) are dropped; a retry whose journal
is gone finds its decision in the policy plane by its key instead.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import hashlib
import itertools
import json
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import Message

from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayIdempotencyConfig
from triplane.runtime.db import Database, Row
from triplane.runtime.errors import AlreadyExists, ResourceExhausted, Unavailable
from triplane.runtime.tasks import cancel_and_wait

log = logging.getLogger("gateway.idempotency")

# Reader connections the store needs at once: the event loop's lookups and the
# outbox relay's reads (one at a time each), plus one so neither ever waits.
READ_CONNECTIONS = 3

# {blob} and {serial_key} are the backend's spellings (Database.blob_type,
# Database.serial_key); on SQLite this is the schema the store always had, so
# an existing state directory opens as it is.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS remembered (
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  fields TEXT NOT NULL,
  body {blob} NOT NULL,
  stored_at_us BIGINT NOT NULL,
  PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS remembered_age ON remembered (stored_at_us);
CREATE TABLE IF NOT EXISTS outbox (
  seq {serial_key},
  event_id TEXT NOT NULL UNIQUE,
  subject TEXT NOT NULL,
  payload {blob} NOT NULL,
  created_at_us BIGINT NOT NULL,
  sent_at_us BIGINT
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (seq) WHERE sent_at_us IS NULL;
CREATE TABLE IF NOT EXISTS store_migrations (
  name TEXT PRIMARY KEY,
  applied_at_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS remembered_claims (
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  token TEXT NOT NULL,
  fields TEXT NOT NULL,
  expires_at_us BIGINT NOT NULL,
  PRIMARY KEY (scope, key)
)
"""
# Which relay holds an unsent outbox row, and until when (added to stores
# made before replicas shared them).
_OUTBOX_CLAIM_COLUMNS = (
    ("claimed_by", "TEXT NOT NULL DEFAULT ''"),
    ("claimed_until_us", "BIGINT NOT NULL DEFAULT 0"),
)
# What the remembered fields are once hashed (gateway.pii.Tokenizer.digest).
HASHED_PREFIX = "h:"
MIGRATION_HASHED_FIELDS = "hashed_fields"
JOURNAL_SUFFIX = ".input"
MIGRATION_PAGE_ROWS = 1000
# tenant, fields -> the same fields hashed.
Rehash = Callable[[str, Mapping[str, str]], dict[str, str]]
_SELECT_REMEMBERED = "SELECT fields, body FROM remembered WHERE scope = ? AND key = ?"
_UPSERT_REMEMBERED = (
    "INSERT INTO remembered (scope, key, fields, body, stored_at_us) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
    "fields = excluded.fields, body = excluded.body, stored_at_us = excluded.stored_at_us"
)
# A key's claim: inserted, or taken over once the holder's lease lapsed.
_CLAIM = (
    "INSERT INTO remembered_claims (scope, key, token, fields, expires_at_us) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
    "token = excluded.token, fields = excluded.fields, expires_at_us = excluded.expires_at_us "
    "WHERE remembered_claims.expires_at_us <= ?"
)
_RELEASE = "DELETE FROM remembered_claims WHERE scope = ? AND key = ? AND token = ?"
# A retried flow re-adds its events under the same ids: kept once.
_INSERT_EVENT = (
    "INSERT INTO outbox (event_id, subject, payload, created_at_us) "
    "VALUES (?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
)


@dataclass(frozen=True, slots=True)
class Remembered:
    fields: Mapping[str, str]
    body: bytes


def flatten(
    message: Message, skip: frozenset[str] = frozenset(), prefix: str = ""
) -> dict[str, str]:
    """Set fields of a message as dotted path -> canonical text (maps by key)."""
    out: dict[str, str] = {}
    for descriptor, value in message.ListFields():
        name = descriptor.name
        if not prefix and name in skip:
            continue
        path = f"{prefix}{name}"
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            for key in sorted(value):
                item = value[key]
                if isinstance(item, Message):
                    out.update(flatten(item, prefix=f"{path}[{key}]."))
                else:
                    out[f"{path}[{key}]"] = repr(item)
        elif descriptor.is_repeated:
            for index, item in enumerate(value):
                if isinstance(item, Message):
                    out.update(flatten(item, prefix=f"{path}[{index}]."))
                else:
                    out[f"{path}[{index}]"] = repr(item)
        elif isinstance(value, Message):
            out.update(flatten(value, prefix=f"{path}."))
        else:
            out[path] = repr(value)
    return out


def first_difference(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    for path in sorted(set(old) | set(new)):
        if old.get(path) != new.get(path):
            # "amount.amount_minor" -> the request field "amount.amount_minor";
            # repeated/map indexes stay, so the caller sees the exact item.
            return path
    return ""


def check_same(remembered: Remembered, fields: Mapping[str, str]) -> None:
    where = first_difference(remembered.fields, fields)
    if where:
        raise AlreadyExists(
            "IDEMPOTENCY_KEY_REUSED",
            f"idempotency key already used for another request ({where} differs)",
            where,
        )


def _legacy_changes(
    rows: Sequence[Sequence[object]], rehash: Rehash
) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(journals to drop, records to rewrite) among remembered rows."""
    dropped: list[tuple[str, str]] = []
    rewritten: list[tuple[str, str, str]] = []
    for scope, key, text in rows:
        scope, key = str(scope), str(key)
        if scope.endswith(JOURNAL_SUFFIX):
            dropped.append((scope, key))
            continue
        fields = json.loads(str(text))
        if all(str(v).startswith(HASHED_PREFIX) for v in fields.values()):
            continue
        tenant_id = scope.partition("\x1f")[0]
        rewritten.append((json.dumps(rehash(tenant_id, fields)), scope, key))
    return dropped, rewritten


class _Claim(enum.Enum):
    TAKEN = "taken"  # this task holds the key: run the flow
    ANSWERED = "answered"  # the answer is committed: the row holds it
    HELD = "held"  # another replica runs the flow: the row holds its fields


@dataclass(eq=False, slots=True)
class _Slot:
    """A key claimed by a task of this process (and, on PostgreSQL, in the
    database under `token`); `done` is set when the task lets go of it."""

    fields: dict[str, str]
    task: asyncio.Task[object] | None
    token: str
    done: asyncio.Event = field(default_factory=asyncio.Event)


def derive_key(tenant_id: str, rpc: str, key: str, step: str) -> str:
    """A downstream idempotency key, stable across retries of the caller's key."""
    digest = hashlib.sha256(f"{tenant_id}\x1f{rpc}\x1f{key}\x1f{step}".encode()).hexdigest()
    return f"gw-{step}-{digest[:40]}"


class IdempotencyStore:
    """Remembered answers and the gateway's outbox on `db`. The store opens
    nothing and closes nothing: whoever opened `db` closes it after `stop()`."""

    def __init__(
        self,
        config: GatewayIdempotencyConfig,
        db: Database,
        clock: Clock,
        rehash: Rehash | None = None,
    ) -> None:
        self._config = config
        self._db = db
        self._clock = clock
        self._rehash = rehash
        # Entries are (fields as JSON, body): strings and bytes only, so the
        # garbage collector never scans the hundreds of thousands it may hold
        # (a map of dicts made full collections pause the loop for 100s of ms).
        self._memory: collections.OrderedDict[tuple[str, str], tuple[str, bytes]] = (
            collections.OrderedDict()
        )
        self._pending: list[tuple[str, str, str, bytes, int]] = []
        self._pending_events: list[tuple[str, str, bytes, int]] = []
        # Written but not yet committed: found by get() even once evicted
        # from the bounded memory map.
        self._unflushed: dict[tuple[str, str], tuple[str, bytes]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        # Keys whose flow a task of this process runs.
        self._slots: dict[tuple[str, str], _Slot] = {}
        # On PostgreSQL every replica shares the store, so keys are claimed
        # in the database and the relay claims its outbox rows.
        self._shared = db.dialect == "postgres"
        self._owner = uuid.uuid4().hex
        self._tokens = itertools.count()
        # Database claims to delete (scope, key, token), with the next flush.
        self._pending_releases: list[tuple[str, str, str]] = []

    async def start(self) -> None:
        """Creates the tables, forgets answers past retention, starts the flusher."""
        cutoff_us = self._clock.now_us() - self._config.retention_s * 1_000_000
        await asyncio.to_thread(self._prepare, cutoff_us)
        self._task = asyncio.create_task(self._flush_loop(), name="gateway-idempotency-flush")

    def _prepare(self, cutoff_us: int) -> None:
        db = self._db
        db.migrate(_SCHEMA.format(blob=db.blob_type, serial_key=db.serial_key))
        self._add_outbox_claim_columns()
        with db.tx() as tx:
            tx.execute("DELETE FROM remembered WHERE stored_at_us < ?", (cutoff_us,))
            tx.execute("DELETE FROM remembered_claims WHERE expires_at_us < ?", (cutoff_us,))
        if self._rehash is not None:
            self._hash_legacy_fields(self._rehash)

    def _add_outbox_claim_columns(self) -> None:
        """The outbox's claim columns, on a store made before they were."""
        db = self._db
        with db.tx() as tx:
            for name, spec in _OUTBOX_CLAIM_COLUMNS:
                if db.dialect == "postgres":
                    # Idempotent, so replicas starting together both may run it.
                    tx.execute(f"ALTER TABLE outbox ADD COLUMN IF NOT EXISTS {name} {spec}")
                elif not tx.one(
                    "SELECT 1 FROM pragma_table_info('outbox') WHERE name = ?", (name,)
                ):
                    tx.execute(f"ALTER TABLE outbox ADD COLUMN {name} {spec}")

    def _hash_legacy_fields(self, rehash: Rehash) -> None:
        """Once per store: fields kept in clear by an earlier release are
        replaced by their hashes, journals (which held names) dropped."""
        db = self._db
        if db.read_one(
            "SELECT name FROM store_migrations WHERE name = ?", (MIGRATION_HASHED_FIELDS,)
        ):
            return
        after: tuple[str, str] = ("", "")
        while True:
            with db.read() as tx:
                rows = tx.all(
                    "SELECT scope, key, fields FROM remembered WHERE (scope, key) > (?, ?) "
                    "ORDER BY scope, key LIMIT ?",
                    (*after, MIGRATION_PAGE_ROWS),
                )
            if not rows:
                break
            after = (str(rows[-1][0]), str(rows[-1][1]))
            dropped, rewritten = _legacy_changes(rows, rehash)
            with db.tx() as tx:
                tx.execute_many("DELETE FROM remembered WHERE scope = ? AND key = ?", dropped)
                tx.execute_many(
                    "UPDATE remembered SET fields = ? WHERE scope = ? AND key = ?", rewritten
                )
        with db.tx() as tx:
            tx.execute(
                "INSERT INTO store_migrations (name, applied_at_us) VALUES (?, ?) "
                "ON CONFLICT (name) DO NOTHING",
                (MIGRATION_HASHED_FIELDS, self._clock.now_us()),
            )

    async def stop(self) -> None:
        """Stops the flusher and commits what is queued."""
        await cancel_and_wait([self._task])
        self._task = None
        await self.flush()

    async def get(self, scope: str, key: str) -> Remembered | None:
        found = self._memory.get((scope, key)) or self._unflushed.get((scope, key))
        if found is None:
            if self._db.reads_are_local:
                row = self._db.read_one(_SELECT_REMEMBERED, (scope, key))
            else:
                row = await asyncio.to_thread(self._db.read_one, _SELECT_REMEMBERED, (scope, key))
                # A put while the read was away is newer than what it read.
                found = self._memory.get((scope, key)) or self._unflushed.get((scope, key))
            if found is None:
                if row is None:
                    return None
                found = (str(row[0]), bytes(row[1]))
                self._remember_in_memory(scope, key, found)
        return Remembered(json.loads(found[0]), found[1])

    def put(self, scope: str, key: str, fields: Mapping[str, str], body: bytes) -> None:
        """Remembers an answer (committed with the next flush). A claim on the
        key is let go: in process now (waiting tasks find the answer in
        memory), in the database in the transaction that commits the answer,
        so another replica never sees the key free before its answer."""
        self._check_room()
        entry = (json.dumps(dict(fields)), body)
        self._remember_in_memory(scope, key, entry)
        self._unflushed[(scope, key)] = entry
        self._pending.append((scope, key, entry[0], body, self._clock.now_us()))
        slot = self._slots.get((scope, key))
        if slot is not None:
            self._let_go(scope, key, slot)
        self._wakeup.set()

    # ---------------------------------------------------------------- claims

    async def claim(self, scope: str, key: str, fields: Mapping[str, str]) -> Remembered | None:
        """The answer remembered for the key, or None once the calling task
        holds the key: it then runs the flow and `put`s the answer. A task
        ending without one gives the key up. Another task or replica holding
        the key is waited for (its answer is the caller's); another replica
        holding it for another payload is ALREADY_EXISTS naming the first
        field that differs."""
        task = asyncio.current_task()
        wanted = dict(fields)
        while True:
            slot = self._slots.get((scope, key))
            if slot is not None:
                if slot.task is not None and slot.task is task:
                    return None  # held already: a retry inside the same task
                # Not refused here on another payload: the holder may itself
                # be waiting for the key, and lose it to this payload.
                await slot.done.wait()
                continue
            if not self._shared:
                found = await self.get(scope, key)
                if found is not None:
                    return found
                if (scope, key) in self._slots:
                    continue  # taken while the read was away
                self._hold(scope, key, wanted, task, "")
                return None
            entry = self._memory.get((scope, key)) or self._unflushed.get((scope, key))
            if entry is not None:
                return Remembered(json.loads(entry[0]), entry[1])
            slot = self._hold(scope, key, wanted, task, f"{self._owner}:{next(self._tokens)}")
            try:
                found = await self._claim_shared(scope, key, slot)
            except BaseException:
                self._let_go(scope, key, slot)
                raise
            if found is not None:
                self._let_go(scope, key, slot, release=False)
            return found

    def _hold(
        self,
        scope: str,
        key: str,
        fields: dict[str, str],
        task: asyncio.Task[object] | None,
        token: str,
    ) -> _Slot:
        slot = _Slot(fields, task, token)
        self._slots[(scope, key)] = slot
        if task is not None:
            task.add_done_callback(functools.partial(self._task_done, scope, key, slot))
        return slot

    def _task_done(self, scope: str, key: str, slot: _Slot, _task: object) -> None:
        """The holder's task ended: a key it still holds had no answer."""
        if self._slots.get((scope, key)) is slot:
            self._let_go(scope, key, slot)

    def _let_go(self, scope: str, key: str, slot: _Slot, release: bool = True) -> None:
        if self._slots.get((scope, key)) is slot:
            del self._slots[(scope, key)]
        slot.done.set()
        if release and slot.token:
            self._pending_releases.append((scope, key, slot.token))
            self._wakeup.set()

    async def _claim_shared(self, scope: str, key: str, slot: _Slot) -> Remembered | None:
        """Claims the key in the database for `slot`, waiting while another
        replica holds it: None once claimed, or the answer once committed."""
        config = self._config
        fields_json = json.dumps(slot.fields)
        while True:
            now_us = self._clock.now_us()
            expires_us = now_us + int(config.claim_lease_s * 1_000_000)
            state, row = await asyncio.to_thread(
                self._try_claim, scope, key, slot.token, fields_json, now_us, expires_us
            )
            if state is _Claim.TAKEN:
                return None
            if state is _Claim.ANSWERED:
                assert row is not None
                entry = (str(row[0]), bytes(row[1]))
                self._remember_in_memory(scope, key, entry)
                return Remembered(json.loads(entry[0]), entry[1])
            if row is not None:
                check_same(Remembered(json.loads(str(row[0])), b""), slot.fields)
                await asyncio.sleep(config.claim_poll_ms / 1000.0)

    def _try_claim(
        self, scope: str, key: str, token: str, fields: str, now_us: int, expires_us: int
    ) -> tuple[_Claim, Row | None]:
        """One attempt, in one transaction. The answer is looked for after the
        claim: a holder commits its answer and deletes its claim together, so
        a claim won just after that finds the answer and gives the key back."""
        with self._db.tx() as tx:
            taken = tx.execute(_CLAIM, (scope, key, token, fields, expires_us, now_us)) == 1
            answer = tx.one(_SELECT_REMEMBERED, (scope, key))
            if answer is not None:
                if taken:
                    tx.execute(_RELEASE, (scope, key, token))
                return _Claim.ANSWERED, answer
            if taken:
                return _Claim.TAKEN, None
            return _Claim.HELD, tx.one(
                "SELECT fields FROM remembered_claims WHERE scope = ? AND key = ?", (scope, key)
            )

    def _check_room(self) -> None:
        if len(self._pending) + len(self._pending_events) >= self._config.max_pending_writes:
            raise ResourceExhausted(
                "IDEMPOTENCY_QUEUE_FULL",
                "too many answers waiting to be remembered; retry later",
            )

    def add_events(self, events: Sequence[OutgoingEvent]) -> None:
        """Queues events for the outbox; they commit with the next flush,
        together with the answers queued before them."""
        self._check_room()
        now_us = self._clock.now_us()
        self._pending_events.extend((e.event_id, e.subject, e.data, now_us) for e in events)
        self._wakeup.set()

    # The OutboxSource of the relay (blocking; called from a worker thread).

    def unsent(self, limit: int) -> list[OutgoingEvent]:
        """The next unsent events. On PostgreSQL they are claimed for this
        store's relay until `outbox_lease_s` from now (rows another relay
        holds are skipped), so replicas' relays publish disjoint events; rows
        this relay already holds come again (a retry after a failed publish)."""
        if not self._shared:
            with self._db.read() as tx:
                rows = tx.all(
                    "SELECT event_id, subject, payload FROM outbox WHERE sent_at_us IS NULL "
                    "ORDER BY seq LIMIT ?",
                    (limit,),
                )
            return [OutgoingEvent(str(row[0]), str(row[1]), bytes(row[2])) for row in rows]
        now_us = self._clock.now_us()
        until_us = now_us + int(self._config.outbox_lease_s * 1_000_000)
        with self._db.tx() as tx:
            rows = tx.all(
                "SELECT seq, event_id, subject, payload FROM outbox WHERE sent_at_us IS NULL "
                "AND (claimed_until_us <= ? OR claimed_by = ?) ORDER BY seq LIMIT ? "
                "FOR UPDATE SKIP LOCKED",
                (now_us, self._owner, limit),
            )
            tx.execute_many(
                "UPDATE outbox SET claimed_by = ?, claimed_until_us = ? WHERE seq = ?",
                [(self._owner, until_us, row[0]) for row in rows],
            )
        return [OutgoingEvent(str(row[1]), str(row[2]), bytes(row[3])) for row in rows]

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        with self._db.tx() as tx:
            tx.execute_many(
                "UPDATE outbox SET sent_at_us = ? WHERE event_id = ?",
                [(now_us, event_id) for event_id in event_ids],
            )

    def delete_sent_before(self, before_us: int) -> int:
        with self._db.tx() as tx:
            return tx.execute(
                "DELETE FROM outbox WHERE sent_at_us IS NOT NULL AND sent_at_us < ?",
                (before_us,),
            )

    def unsent_count(self) -> int:
        row = self._db.read_one("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL")
        assert row is not None, "COUNT(*) always answers one row"
        return int(row[0])

    def _remember_in_memory(self, scope: str, key: str, entry: tuple[str, bytes]) -> None:
        self._memory[(scope, key)] = entry
        self._memory.move_to_end((scope, key))
        while len(self._memory) > self._config.memory_entries:
            self._memory.popitem(last=False)

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            events, self._pending_events = self._pending_events, []
            releases, self._pending_releases = self._pending_releases, []
            if not batch and not events and not releases:
                return
            try:
                await asyncio.to_thread(self._write, batch, events, releases)
            except Exception:
                # Kept for the next flush: nothing is silently forgotten.
                self._pending[:0] = batch
                self._pending_events[:0] = events
                self._pending_releases[:0] = releases
                raise
            for scope, key, _, body, _ in batch:
                written = self._unflushed.get((scope, key))
                if written is not None and written[1] is body:
                    del self._unflushed[(scope, key)]

    def _write(
        self,
        batch: list[tuple[str, str, str, bytes, int]],
        events: list[tuple[str, str, bytes, int]],
        releases: list[tuple[str, str, str]],
    ) -> None:
        """One transaction: the answers and their events commit together, and
        the claims on their keys go with them (after them: a replica that
        finds a key free finds its answer)."""
        with self._db.tx() as tx:
            tx.execute_many(_UPSERT_REMEMBERED, batch)
            tx.execute_many(_INSERT_EVENT, events)
            tx.execute_many(_RELEASE, releases)

    async def commit(self, scope: str, key: str) -> None:
        """On a store other replicas share, commits now (with whatever else is
        queued) what was put under the key, unless that is committed already:
        for an answer another replica may be asked about next, such as a
        decision's exposure. Elsewhere (one replica) nothing: this replica
        finds it in memory. A commit that fails is UNAVAILABLE, so the answer
        is not acknowledged: were it, and this replica died before the
        flusher's retry succeeded, an answered decision would have no
        exposure (found by the chaos run, PostgreSQL down, then the replica
        killed). The answer stays queued, and the caller's retry under its
        key gets it once the store takes it."""
        if not self._shared or (scope, key) not in self._unflushed:
            return
        try:
            await self.flush()
        except Exception as error:
            log.warning("committing %s at once failed; the flusher retries it: %s", key, error)
            raise Unavailable(
                "ANSWER_NOT_COMMITTED",
                f"the answer under idempotency key {key!r} could not be stored yet; "
                "retry with the same key",
            ) from error

    async def _flush_loop(self) -> None:
        interval_s = self._config.flush_interval_ms / 1000.0
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("remembering answers failed; retrying")
            await asyncio.sleep(interval_s)
