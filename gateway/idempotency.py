"""Remembered answers of the gateway's mutating RPCs (ARCHITECTURE.md rule 6).

A record is keyed by (tenant, RPC, idempotency key) and holds the request's
flattened fields (so a reuse with another payload is refused naming the first
field that differs) and the serialized answer. Records live in memory (bounded,
oldest dropped first) and in SQLite, written in batches by one background task
(group commit), so remembering costs the hot path no disk wait; a lookup that
misses memory reads SQLite on the event loop through its own connection (WAL
readers never wait for the writer, and a primary-key read costs microseconds,
less than handing it to a thread). The planes keep
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
context snapshot) under the step "input", so a retry sends the policy plane the
exact request it already decided instead of a fresh snapshot it would refuse.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from triplane.runtime.bus import OutgoingEvent
from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayIdempotencyConfig
from triplane.runtime.errors import AlreadyExists, ResourceExhausted
from triplane.runtime.tasks import cancel_and_wait

log = logging.getLogger("gateway.idempotency")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS remembered (
  scope TEXT NOT NULL,
  key TEXT NOT NULL,
  fields TEXT NOT NULL,
  body BLOB NOT NULL,
  stored_at_us INTEGER NOT NULL,
  PRIMARY KEY (scope, key)
);
CREATE INDEX IF NOT EXISTS remembered_age ON remembered (stored_at_us);
CREATE TABLE IF NOT EXISTS outbox (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id TEXT NOT NULL UNIQUE,
  subject TEXT NOT NULL,
  payload BLOB NOT NULL,
  created_at_us INTEGER NOT NULL,
  sent_at_us INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (seq) WHERE sent_at_us IS NULL;
"""


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


def derive_key(tenant_id: str, rpc: str, key: str, step: str) -> str:
    """A downstream idempotency key, stable across retries of the caller's key."""
    digest = hashlib.sha256(f"{tenant_id}\x1f{rpc}\x1f{key}\x1f{step}".encode()).hexdigest()
    return f"gw-{step}-{digest[:40]}"


class IdempotencyStore:
    def __init__(self, config: GatewayIdempotencyConfig, path: Path, clock: Clock) -> None:
        self._config = config
        self._path = path
        self._clock = clock
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
        self._db: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._relay_db: sqlite3.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self._path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        cutoff = self._clock.now_us() - self._config.retention_s * 1_000_000
        self._db.execute("DELETE FROM remembered WHERE stored_at_us < ?", (cutoff,))
        self._reader = sqlite3.connect(str(self._path), isolation_level=None)
        self._reader.execute("PRAGMA query_only=ON")
        # The relay's own connection (it calls from a worker thread).
        self._relay_db = sqlite3.connect(
            str(self._path), check_same_thread=False, isolation_level=None
        )
        self._relay_db.execute("PRAGMA synchronous=NORMAL")
        self._task = asyncio.create_task(self._flush_loop(), name="gateway-idempotency-flush")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        await self.flush()
        for name in ("_reader", "_relay_db"):
            connection = getattr(self, name)
            if connection is not None:
                connection.close()
                setattr(self, name, None)
        if self._db is not None:
            self._db.close()
            self._db = None

    async def get(self, scope: str, key: str) -> Remembered | None:
        found = self._memory.get((scope, key)) or self._unflushed.get((scope, key))
        if found is None:
            row = self._read(scope, key)
            if row is None:
                return None
            found = (row[0], bytes(row[1]))
            self._remember_in_memory(scope, key, found)
        return Remembered(json.loads(found[0]), found[1])

    def _read(self, scope: str, key: str) -> tuple[str, bytes] | None:
        assert self._reader is not None, "store not started"
        cursor = self._reader.execute(
            "SELECT fields, body FROM remembered WHERE scope = ? AND key = ?", (scope, key)
        )
        row = cursor.fetchone()
        return None if row is None else (row[0], row[1])

    def put(self, scope: str, key: str, fields: Mapping[str, str], body: bytes) -> None:
        self._check_room()
        entry = (json.dumps(dict(fields)), body)
        self._remember_in_memory(scope, key, entry)
        self._unflushed[(scope, key)] = entry
        self._pending.append((scope, key, entry[0], body, self._clock.now_us()))
        self._wakeup.set()

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
        assert self._relay_db is not None, "store not started"
        rows = self._relay_db.execute(
            "SELECT event_id, subject, payload FROM outbox WHERE sent_at_us IS NULL "
            "ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [OutgoingEvent(row[0], row[1], bytes(row[2])) for row in rows]

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        assert self._relay_db is not None, "store not started"
        with contextlib.closing(self._relay_db.cursor()) as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.executemany(
                "UPDATE outbox SET sent_at_us = ? WHERE event_id = ?",
                [(now_us, event_id) for event_id in event_ids],
            )
            cursor.execute("COMMIT")

    def delete_sent_before(self, before_us: int) -> int:
        assert self._relay_db is not None, "store not started"
        cursor = self._relay_db.execute(
            "DELETE FROM outbox WHERE sent_at_us IS NOT NULL AND sent_at_us < ?", (before_us,)
        )
        return cursor.rowcount

    def unsent_count(self) -> int:
        assert self._reader is not None, "store not started"
        row = self._reader.execute(
            "SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL"
        ).fetchone()
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
            if (not batch and not events) or self._db is None:
                self._pending[:0], self._pending_events[:0] = batch, events
                return
            try:
                await asyncio.to_thread(self._write, batch, events)
            except Exception:
                # Kept for the next flush: nothing is silently forgotten.
                self._pending[:0] = batch
                self._pending_events[:0] = events
                raise
            for scope, key, _, body, _ in batch:
                written = self._unflushed.get((scope, key))
                if written is not None and written[1] is body:
                    del self._unflushed[(scope, key)]

    def _write(
        self,
        batch: list[tuple[str, str, str, bytes, int]],
        events: list[tuple[str, str, bytes, int]],
    ) -> None:
        assert self._db is not None
        with contextlib.closing(self._db.cursor()) as cursor:
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.executemany(
                    "INSERT INTO remembered (scope, key, fields, body, stored_at_us) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
                    "fields = excluded.fields, body = excluded.body, "
                    "stored_at_us = excluded.stored_at_us",
                    batch,
                )
                # A retried flow re-adds its events under the same ids: kept once.
                cursor.executemany(
                    "INSERT INTO outbox (event_id, subject, payload, created_at_us) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
                    events,
                )
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

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
