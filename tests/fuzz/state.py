"""What a call could change, read from outside the planes: every table of
every SQLite database in the stack's state dir (the money plane's ledger,
holds, idempotency keys, spent tokens and outbox; the policy plane's decision
log, bundles, cases, consent, offers and outbox; the gateway's remembered
answers, outbox, keys, deliveries and trigger state), the AI plane's model
registry, and the last sequence of every JetStream stream.

A database is read in full only when SQLite says another connection committed
to it since the last read (`PRAGMA data_version`), so a refused call that
wrote nothing costs a pragma per database, and a snapshot is exact: any
committed change to any row of any table shows.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# table -> (rows, digest of every row)
TableState = tuple[int, str]
Snapshot = dict[str, Any]

# Rows waiting for a relay, per database file: a stack is settled when none wait.
UNSENT_QUERIES = {
    "money.db": "SELECT count(*) FROM outbox WHERE sent_at_us IS NULL",
    "gateway.db": "SELECT count(*) FROM outbox WHERE sent_at_us IS NULL",
    "policy.db": "SELECT count(*) FROM policy_outbox WHERE published = 0",
}


class SqliteState:
    """One database file, read from a connection of its own (never written)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._version: int | None = None
        self._tables: dict[str, TableState] = {}

    def close(self) -> None:
        self._connection.close()

    def version(self) -> int:
        """Changes whenever another connection commits to the file."""
        row = self._connection.execute("PRAGMA data_version").fetchone()
        return int(row[0])

    def tables(self) -> dict[str, TableState]:
        version = self.version()
        if version != self._version:
            self._tables = self._read_all()
            self._version = version
        return self._tables

    def unsent(self) -> int:
        query = UNSENT_QUERIES.get(self.path.name)
        if query is None:
            return 0
        return int(self._connection.execute(query).fetchone()[0])

    def _read_all(self) -> dict[str, TableState]:
        connection = self._connection
        connection.execute("BEGIN")  # one read snapshot for every table
        try:
            names = [
                str(row[0])
                for row in connection.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
            return {name: self._read_table(name) for name in names}
        finally:
            connection.execute("COMMIT")

    def _read_table(self, name: str) -> TableState:
        digest = hashlib.blake2b(digest_size=16)
        # Rows in a stable order whatever the table's kind: a WITHOUT ROWID
        # table (the reconciliation store's) has no rowid to order by.
        rows = sorted(repr(row) for row in self._connection.execute(f'SELECT * FROM "{name}"'))
        for row in rows:
            digest.update(row.encode())
        return len(rows), digest.hexdigest()


@dataclass
class FileState:
    """A file a plane rewrites as a whole (the AI plane's registry)."""

    path: Path
    _stamp: tuple[int, int] = (0, -1)
    _digest: str = ""

    def version(self) -> tuple[int, int]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return (0, -1)
        return (stat.st_mtime_ns, stat.st_size)

    def digest(self) -> str:
        stamp = self.version()
        if stamp != self._stamp:
            data = self.path.read_bytes() if stamp[1] >= 0 else b""
            self._digest, self._stamp = hashlib.blake2b(data, digest_size=16).hexdigest(), stamp
        return self._digest


# () -> {stream name: last sequence}
StreamReader = Callable[[], dict[str, int]]


@dataclass
class StateProbe:
    databases: list[SqliteState]
    files: list[FileState]
    streams: StreamReader
    # Polls while settling, and how long nothing may change to be settled.
    poll_s: float = 0.004
    unsent_rows_seen: int = field(default=0, init=False)

    @classmethod
    def of_state_dir(cls, state_dir: Path, streams: StreamReader) -> StateProbe:
        databases = [SqliteState(path) for path in sorted(state_dir.glob("*.db"))]
        files = [FileState(path) for path in sorted(state_dir.glob("ai/**/registry.json"))]
        return cls(databases, files, streams)

    def close(self) -> None:
        for database in self.databases:
            database.close()

    def snapshot(self) -> Snapshot:
        """Everything, by name: each database's tables, each file, the streams."""
        state: Snapshot = {db.path.name: db.tables() for db in self.databases}
        for file in self.files:
            state[file.path.name] = file.digest()
        state["jetstream"] = self.streams()
        return state

    def fingerprint(self) -> tuple[Any, ...]:
        """Cheap: changes whenever the snapshot may have."""
        return (
            tuple(db.version() for db in self.databases),
            tuple(file.version() for file in self.files),
            tuple(sorted(self.streams().items())),
        )

    def settle(self, quiet_s: float, max_s: float) -> bool:
        """Waits until nothing changed for quiet_s and no outbox row waits for
        its relay (the planes write some things after they answer: the
        gateway's remembered answers, the relays' publishes and marks).
        False when that did not happen within max_s."""
        deadline = time.monotonic() + max_s
        last = self.fingerprint()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(self.poll_s)
            now = self.fingerprint()
            if now != last:
                last, quiet_since = now, time.monotonic()
                continue
            if time.monotonic() - quiet_since >= quiet_s and not self._unsent():
                return True
        return False

    def _unsent(self) -> int:
        return sum(db.unsent() for db in self.databases)


def differences(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """What changed between two snapshots, one line per table, file or stream."""
    lines: list[str] = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            for part in sorted(set(old) | set(new)):
                if old.get(part) != new.get(part):
                    lines.append(
                        f"{name}:{part} {_short(old.get(part))} -> {_short(new.get(part))}"
                    )
        else:
            lines.append(f"{name} {_short(old)} -> {_short(new)}")
    return lines


def _short(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2:
        return f"{value[0]} rows #{str(value[1])[:8]}"  # (rows, digest)
    return json.dumps(value) if not isinstance(value, str) else value[:12]
