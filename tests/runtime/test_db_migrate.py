"""Schema migrations on a shared PostgreSQL database: replicas that start
together on an empty database (three pods rolling out) all come up."""

from __future__ import annotations

import threading

import pytest

from triplane.runtime.db import Database

pytestmark = [pytest.mark.postgres]

DDL = (
    ";\n".join(
        f"CREATE TABLE IF NOT EXISTS t{index} (tenant_id TEXT NOT NULL, id TEXT NOT NULL, "
        f"PRIMARY KEY (tenant_id, id))"
        for index in range(12)
    )
    + ";\nCREATE INDEX IF NOT EXISTS t0_id ON t0 (id)"
)


def test_replicas_migrating_an_empty_database_at_once_all_succeed(pg_dsn: str) -> None:
    # Concurrent CREATE TABLE IF NOT EXISTS of one table fails in one of the
    # transactions (UniqueViolation on pg_type): seen with two policy replicas.
    replicas = 6
    databases = [Database("postgres", pg_dsn, readers=0) for _ in range(replicas)]
    errors: list[BaseException] = []
    start = threading.Barrier(replicas)

    def migrate(db: Database) -> None:
        start.wait()
        try:
            db.migrate(DDL)
        except BaseException as error:  # collected, asserted below
            errors.append(error)

    threads = [threading.Thread(target=migrate, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert errors == []
        with databases[0].tx() as tx:
            count = tx.one(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_name LIKE ?",
                ("t%",),
            )
        assert count is not None and int(count[0]) == 12
    finally:
        for db in databases:
            db.close()
