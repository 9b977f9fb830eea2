"""Remembered answers of the gateway's mutating RPCs (ARCHITECTURE.md rule 6).

A record is keyed by (tenant, RPC, idempotency key) and holds the request's
flattened fields (so a reuse with another payload is refused naming the first
field that differs) and the serialized answer. Records live in memory (bounded,
oldest dropped first) and in SQLite, written in batches by one background task
(group commit), so remembering costs the hot path no disk wait. The planes keep
their own keys for good and the gateway derives theirs from the caller's, so a
record lost in a crash only means the flow runs again and every plane returns
what it already did: no money moves twice, no decision is made twice.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.message import Message

from triplane.runtime.clock import Clock
from triplane.runtime.config import GatewayIdempotencyConfig
from triplane.runtime.errors import AlreadyExists, ResourceExhausted

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
        self._memory: collections.OrderedDict[tuple[str, str], Remembered] = (
            collections.OrderedDict()
        )
        self._pending: list[tuple[str, str, str, bytes, int]] = []
        self._wakeup = asyncio.Event()
        self._db: sqlite3.Connection | None = None
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
        self._task = asyncio.create_task(self._flush_loop(), name="gateway-idempotency-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        if self._db is not None:
            self._db.close()
            self._db = None

    async def get(self, scope: str, key: str) -> Remembered | None:
        found = self._memory.get((scope, key))
        if found is not None:
            return found
        row = await asyncio.to_thread(self._read, scope, key)
        if row is None:
            return None
        remembered = Remembered(json.loads(row[0]), bytes(row[1]))
        self._remember_in_memory(scope, key, remembered)
        return remembered

    def _read(self, scope: str, key: str) -> tuple[str, bytes] | None:
        assert self._db is not None, "store not started"
        cursor = self._db.execute(
            "SELECT fields, body FROM remembered WHERE scope = ? AND key = ?", (scope, key)
        )
        row = cursor.fetchone()
        return None if row is None else (row[0], row[1])

    def put(self, scope: str, key: str, fields: Mapping[str, str], body: bytes) -> None:
        if len(self._pending) >= self._config.max_pending_writes:
            raise ResourceExhausted(
                "IDEMPOTENCY_QUEUE_FULL",
                "too many answers waiting to be remembered; retry later",
            )
        remembered = Remembered(dict(fields), body)
        self._remember_in_memory(scope, key, remembered)
        self._pending.append(
            (scope, key, json.dumps(remembered.fields), body, self._clock.now_us())
        )
        self._wakeup.set()

    def _remember_in_memory(self, scope: str, key: str, remembered: Remembered) -> None:
        self._memory[(scope, key)] = remembered
        self._memory.move_to_end((scope, key))
        while len(self._memory) > self._config.memory_entries:
            self._memory.popitem(last=False)

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch or self._db is None:
                return
            try:
                await asyncio.to_thread(self._write, batch)
            except Exception:
                # Kept for the next flush: an answer is never silently forgotten.
                self._pending[:0] = batch
                raise

    def _write(self, batch: list[tuple[str, str, str, bytes, int]]) -> None:
        assert self._db is not None
        with contextlib.closing(self._db.cursor()) as cursor:
            cursor.execute("BEGIN")
            cursor.executemany(
                "INSERT INTO remembered (scope, key, fields, body, stored_at_us) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (scope, key) DO UPDATE SET "
                "fields = excluded.fields, body = excluded.body, "
                "stored_at_us = excluded.stored_at_us",
                batch,
            )
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
