"""The runtime's Database (the policy plane's and the gateway's stores) after
PostgreSQL itself restarts: a private server (triplane_tools.chaos_engines,
started from the installed binaries so that the test may kill it) is killed
with SIGKILL and started again.

Before the fix, the writer's and readers' connections stayed dead: every
later transaction failed with psycopg's OperationalError, which the planes
answered INTERNAL, until the plane itself restarted (found by the chaos run).
Now the call that meets the dead connection is UNAVAILABLE
(DATABASE_UNAVAILABLE, retryable) and the next one reconnects."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from triplane.runtime.db import Database, DatabaseUnavailable
from triplane.runtime.errors import Code
from triplane_tools.chaos_engines import PostgresUnavailable, PrivatePostgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture
def server() -> Iterator[PrivatePostgres]:
    try:
        postgres = PrivatePostgres(start_timeout_s=60)
        postgres.initialise()
    except PostgresUnavailable as error:
        from tests.conftest import _loud_skip

        _loud_skip("PostgreSQL restart test", f"no private server: {error}")
        raise
    postgres.spawn()
    try:
        postgres.wait_ready()
        yield postgres
    finally:
        postgres.stop()


def _restart(server: PrivatePostgres) -> None:
    server.kill()
    server.spawn()
    server.wait_ready()


def test_writer_and_readers_reconnect_after_postgres_restarts(server: PrivatePostgres) -> None:
    db = Database("postgres", server.admin_dsn, readers=1)
    try:
        db.migrate("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
        with db.tx() as tx:
            tx.execute("INSERT INTO kv VALUES (?, ?)", ("a", "1"))
        assert db.read_one("SELECT v FROM kv WHERE k = ?", ("a",)) == ("1",)

        _restart(server)

        # The first use of each dead connection: retryable, never INTERNAL.
        with pytest.raises(DatabaseUnavailable) as lost, db.tx() as tx:
            tx.execute("INSERT INTO kv VALUES (?, ?)", ("b", "2"))
        assert lost.value.code == Code.UNAVAILABLE
        assert lost.value.reason == "DATABASE_UNAVAILABLE"
        with pytest.raises(DatabaseUnavailable):
            db.read_one("SELECT v FROM kv WHERE k = ?", ("a",))

        # Then both reconnect, and what was committed before is there.
        with db.tx() as tx:
            tx.execute("INSERT INTO kv VALUES (?, ?)", ("b", "2"))
        assert db.read_one("SELECT v FROM kv WHERE k = ?", ("a",)) == ("1",)
        with db.read() as tx:
            assert tx.all("SELECT k FROM kv ORDER BY k") == [("a",), ("b",)]
    finally:
        db.close()


def test_an_unreachable_server_is_unavailable_until_it_is_back(server: PrivatePostgres) -> None:
    db = Database("postgres", server.admin_dsn, readers=1)
    try:
        db.migrate("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY)")
        server.kill()
        for _ in range(2):  # the dead connection, then a connect that fails
            with pytest.raises(DatabaseUnavailable), db.tx() as tx:
                tx.execute("INSERT INTO kv VALUES (?)", ("a",))
        # A reader never opened before: its first connect fails the same way
        # (the chaos run's INTERNALs while PostgreSQL was starting up).
        with pytest.raises(DatabaseUnavailable):
            db.read_one("SELECT count(*) FROM kv")
        server.spawn()
        server.wait_ready()
        with db.tx() as tx:
            tx.execute("INSERT INTO kv VALUES (?)", ("a",))
        assert db.read_one("SELECT count(*) FROM kv") == (1,)
    finally:
        db.close()


def test_other_database_errors_are_not_turned_into_unavailable(server: PrivatePostgres) -> None:
    import psycopg

    db = Database("postgres", server.admin_dsn, readers=0)
    try:
        with pytest.raises(psycopg.errors.UndefinedTable), db.tx() as tx:
            tx.execute("SELECT * FROM no_such_table")
        with db.tx() as tx:
            assert tx.one("SELECT 1") == (1,)
    finally:
        db.close()
