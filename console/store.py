"""Operators' accounts, their sessions and the audit log, on SQLite (one
console process) or PostgreSQL (replicas share them), through the project's
one database layer (triplane.runtime.db). Calls are synchronous; the app runs
them in a worker thread (`asyncio.to_thread`).

A session is stored by the SHA-256 of its id, never the id itself: a leaked
table signs nobody in."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triplane.runtime.config import Config
from triplane.runtime.db import Database, is_unique_violation

DDL = """
CREATE TABLE IF NOT EXISTS console_users (
    username TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS console_sessions (
    session_hash TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    roles TEXT NOT NULL,
    created_us BIGINT NOT NULL,
    last_seen_us BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS console_audit (
    audit_id {serial},
    at_us BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    before_json TEXT NOT NULL,
    after_json TEXT NOT NULL,
    remote TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS console_audit_actor ON console_audit (actor, at_us)
"""


class UserExists(Exception):
    """add_user of a username that is taken."""


@dataclass(frozen=True)
class User:
    username: str
    password_hash: str
    roles: tuple[str, ...]
    created_us: int


@dataclass(frozen=True)
class StoredSession:
    username: str
    roles: tuple[str, ...]
    created_us: int
    last_seen_us: int


@dataclass(frozen=True)
class AuditEntry:
    audit_id: int
    at_us: int
    actor: str
    action: str
    target: str
    outcome: str
    before: dict[str, Any]
    after: dict[str, Any]
    remote: str


def session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _roles(text: str) -> tuple[str, ...]:
    return tuple(r for r in text.split(",") if r)


class ConsoleStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        db.migrate(DDL.format(serial=db.serial_key))

    @classmethod
    def from_config(cls, config: Config) -> ConsoleStore:
        store = config.console.store
        if store.backend == "postgres":
            return cls(Database("postgres", store.postgres_dsn))
        path = Path(store.sqlite_path)
        if not path.is_absolute():
            path = config.state_path / path
        return cls(Database("sqlite", str(path)))

    def close(self) -> None:
        self.db.close()

    # ---- accounts ----

    def add_user(self, username: str, password_hash: str, roles: list[str], now_us: int) -> None:
        try:
            with self.db.tx() as tx:
                tx.execute(
                    "INSERT INTO console_users (username, password_hash, roles, created_us)"
                    " VALUES (?, ?, ?, ?)",
                    (username, password_hash, ",".join(roles), now_us),
                )
        except Exception as exc:
            if is_unique_violation(exc):
                raise UserExists(username) from None
            raise

    def set_password(self, username: str, password_hash: str) -> bool:
        with self.db.tx() as tx:
            changed = tx.execute(
                "UPDATE console_users SET password_hash = ? WHERE username = ?",
                (password_hash, username),
            )
        return changed > 0

    def user(self, username: str) -> User | None:
        row = self.db.read_one(
            "SELECT username, password_hash, roles, created_us FROM console_users"
            " WHERE username = ?",
            (username,),
        )
        if row is None:
            return None
        return User(row[0], row[1], _roles(row[2]), int(row[3]))

    # ---- sessions ----

    def create_session(
        self, session_id: str, username: str, roles: tuple[str, ...], now_us: int
    ) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "INSERT INTO console_sessions"
                " (session_hash, username, roles, created_us, last_seen_us)"
                " VALUES (?, ?, ?, ?, ?)",
                (session_hash(session_id), username, ",".join(roles), now_us, now_us),
            )

    def session(self, session_id: str) -> StoredSession | None:
        row = self.db.read_one(
            "SELECT username, roles, created_us, last_seen_us FROM console_sessions"
            " WHERE session_hash = ?",
            (session_hash(session_id),),
        )
        if row is None:
            return None
        return StoredSession(row[0], _roles(row[1]), int(row[2]), int(row[3]))

    def touch_session(self, session_id: str, now_us: int) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "UPDATE console_sessions SET last_seen_us = ? WHERE session_hash = ?",
                (now_us, session_hash(session_id)),
            )

    def delete_session(self, session_id: str) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "DELETE FROM console_sessions WHERE session_hash = ?",
                (session_hash(session_id),),
            )

    def delete_sessions_before(self, idle_before_us: int, created_before_us: int) -> int:
        """Removes expired sessions (a sweep; an expired one is refused anyway)."""
        with self.db.tx() as tx:
            return tx.execute(
                "DELETE FROM console_sessions WHERE last_seen_us < ? OR created_us < ?",
                (idle_before_us, created_before_us),
            )

    # ---- audit ----

    def append_audit(
        self,
        at_us: int,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        before: dict[str, Any],
        after: dict[str, Any],
        remote: str,
    ) -> None:
        with self.db.tx() as tx:
            tx.execute(
                "INSERT INTO console_audit"
                " (at_us, actor, action, target, outcome, before_json, after_json, remote)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    at_us,
                    actor,
                    action,
                    target,
                    outcome,
                    json.dumps(before, sort_keys=True),
                    json.dumps(after, sort_keys=True),
                    remote,
                ),
            )

    def failed_logins(self, username: str, since_us: int) -> int:
        """Refused sign-ins of `username` since `since_us` (the audit log's)."""
        row = self.db.read_one(
            "SELECT COUNT(*) FROM console_audit WHERE actor = ? AND at_us >= ?"
            " AND action = 'login' AND outcome = 'denied'",
            (username, since_us),
        )
        return int(row[0]) if row else 0

    def audit_entries(
        self, limit: int, before_id: int = 0, actor: str = "", action: str = ""
    ) -> list[AuditEntry]:
        """Newest first; `before_id` pages back (0: from the newest)."""
        where: list[str] = []
        params: list[Any] = []
        if before_id:
            where.append("audit_id < ?")
            params.append(before_id)
        if actor:
            where.append("actor = ?")
            params.append(actor)
        if action:
            where.append("action = ?")
            params.append(action)
        sql = (
            "SELECT audit_id, at_us, actor, action, target, outcome, before_json,"
            " after_json, remote FROM console_audit"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY audit_id DESC LIMIT ?"
        params.append(limit)
        with self.db.read() as tx:
            rows = tx.all(sql, params)
        return [
            AuditEntry(
                int(r[0]),
                int(r[1]),
                r[2],
                r[3],
                r[4],
                r[5],
                json.loads(r[6]),
                json.loads(r[7]),
                r[8],
            )
            for r in rows
        ]
