"""The tenant-sharded ledger on two real PostgreSQL databases (two databases of
the local server; no distributed engine can be installed here): each tenant's
money lives in its shard's database only, every shard balances on its own,
the assignment is stored in the directory shard and survives a restart, and
both shards' outboxes reach NATS through their own relays."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from money_helpers import (
    NO_CONSTRAINT,
    DbProbe,
    Kit,
    ledger_config,
    new_signer,
    stream_messages,
    unique_tenant,
)

from money_plane.app import MoneyPlane
from money_plane.shards import ShardDirectory
from tests.conftest import create_pg_database, drop_pg_database
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, ConfigError, load_config, with_overrides
from triplane.runtime.errors import NotFound
from triplane.runtime.tokens import TokenSigner

pytestmark = [pytest.mark.postgres, pytest.mark.nats, pytest.mark.slow]

TABLES = (
    "tenants",
    "accounts",
    "entries",
    "postings",
    "holds",
    "reserves",
    "idempotency",
    "decision_tokens",
    "outbox",
)


@pytest.fixture
def two_databases(pg_admin_dsn: str) -> Iterator[tuple[str, str]]:
    first = create_pg_database(pg_admin_dsn, "triplane_shard")
    second = create_pg_database(pg_admin_dsn, "triplane_shard")
    try:
        yield first, second
    finally:
        drop_pg_database(pg_admin_dsn, first)
        drop_pg_database(pg_admin_dsn, second)


def _sharded_config(
    state_dir: Path, signer: TokenSigner, nats_url: str, dsns: tuple[str, str]
) -> Config:
    config = ledger_config(state_dir, signer)
    return with_overrides(
        config,
        {
            "nats": {"url": nats_url},
            "money": {
                "store": {
                    "backend": "postgres",
                    "shards": [
                        {"name": "a", "postgres_dsn": dsns[0]},
                        {"name": "b", "postgres_dsn": dsns[1]},
                    ],
                }
            },
        },
    )


async def _until(what: str, check: object, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _rows_naming(probe: DbProbe, tenant: str) -> dict[str, int]:
    """Rows of every ledger table whose text names the tenant."""
    found = {}
    for table in TABLES:
        count = int(
            probe.scalar(f"SELECT COUNT(*) FROM {table} t WHERE t::text LIKE %s", (f"%{tenant}%",))
        )
        if count:
            found[table] = count
    return found


async def test_two_tenants_on_two_shards(
    two_databases: tuple[str, str], nats_url: str, tmp_path: Path
) -> None:
    signer = new_signer()
    (tmp_path / "state").mkdir()
    config = _sharded_config(tmp_path / "state", signer, nats_url, two_databases)
    clock = ManualClock(int(time.time() * 1_000_000))
    probes = {name: DbProbe("postgres", dsn) for name, dsn in zip("ab", two_databases, strict=True)}
    first, second = unique_tenant("sa"), unique_tenant("sb")
    plane = MoneyPlane(config, clock=clock, listen="127.0.0.1:0")
    await plane.start(sweepers=False)
    try:
        sharded = plane.sharded
        assert sharded is not None and plane.ledger is None
        # The least-loaded shard: the first tenant to a, the second to b.
        await sharded.create_tenant(first, "first")
        await sharded.create_tenant(second, "second")
        assert await sharded.shard_of(first) == "a"
        assert await sharded.shard_of(second) == "b"
        kits = {
            tenant: Kit(sharded, clock, signer, "postgres", two_databases[index], tenant)  # type: ignore[arg-type]
            for index, tenant in enumerate((first, second))
        }
        for tenant, kit in kits.items():
            await kit.open(("bank", "USD", NO_CONSTRAINT, 0), ("cust", "USD", NO_CONSTRAINT, 0))
            for i in range(5):
                await kit.ok(kit.move(f"{tenant}-{i}", "bank", "cust", 10 + i))
            await kit.ok(kit.authorize(f"{tenant}-hold", "cust", "bank", 3))

        # Each tenant's rows are in its shard's database and nowhere else.
        for own, other, tenant in (("a", "b", first), ("b", "a", second)):
            assert probes[own].entry_count(tenant) == 5
            assert probes[own].hold_count(tenant) == 1
            assert probes[own].counters(tenant)["cust"] == (0, 60, 3, 0)
            assert probes[own].invariant_problems(tenant) == []
            assert (await sharded.check_balanced(tenant)).balanced
            assert _rows_naming(probes[other], tenant) == {}
            assert set(_rows_naming(probes[own], tenant)) >= {
                "tenants",
                "accounts",
                "entries",
                "postings",
                "holds",
                "idempotency",
                "outbox",
            }
        # The directory lives in the first shard only.
        assert dict(probes["a"].rows("SELECT tenant_id, shard FROM tenant_shards")) == {
            first: "a",
            second: "b",
        }
        assert not probes["b"].rows(
            "SELECT 1 FROM information_schema.tables WHERE table_name = 'tenant_shards'"
        )
        # A tenant that was never created is not routed anywhere.
        with pytest.raises(NotFound):
            await sharded.get_account(unique_tenant("nobody"), "bank")

        # Both shards' outboxes reach NATS, each event once, through the shards' own relays.
        assert len(plane.relays) == 2
        for probe in probes.values():
            await _until(
                "publication",
                lambda probe=probe: (
                    probe.scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL") == 0
                ),
            )
        for tenant in (first, second):
            # 2 account.opened, 5 entry.posted, 1 hold.authorized.
            messages = await stream_messages(nats_url, f"triplane.money.{tenant}.>", 8)
            assert len(messages) == 8 and len({m for m, _ in messages}) == 8
    finally:
        await plane.stop()

    # A restart reads the assignment back: same shard, same books, new
    # transfers land there too; CreateTenant again does not move it.
    plane = MoneyPlane(config, clock=clock, listen="127.0.0.1:0")
    await plane.start(sweepers=False)
    try:
        sharded = plane.sharded
        assert sharded is not None
        assert await sharded.shard_of(first) == "a"
        assert await sharded.shard_of(second) == "b"
        await sharded.create_tenant(second, "second")
        assert await sharded.shard_of(second) == "b"
        kit = Kit(sharded, clock, signer, "postgres", two_databases[1], second)  # type: ignore[arg-type]
        await kit.ok(kit.move(f"{second}-after", "bank", "cust", 1))
        assert probes["b"].entry_count(second) == 6
        assert _rows_naming(probes["a"], second) == {}
        assert probes["b"].invariant_problems(second) == []
        kit.probe.close()
    finally:
        await plane.stop()
        for probe in probes.values():
            probe.close()


def test_shard_dsns_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    """A shard's DSN is a secret: TRIPLANE_MONEY_DSN_<NAME> or a file, not the config map."""
    secret = tmp_path / "dsn-b"
    secret.write_text("host=127.0.0.1 dbname=shard_b\n")
    shards = [{"name": "a"}, {"name": "b", "postgres_dsn_file": str(secret)}]
    overrides = {"money": {"store": {"backend": "postgres", "shards": shards}}}
    config = load_config(environ={"TRIPLANE_MONEY_DSN_A": "dbname=shard_a"}, overrides=overrides)
    assert [(s.name, s.postgres_dsn) for s in config.money.store.shards] == [
        ("a", "dbname=shard_a"),
        ("b", "host=127.0.0.1 dbname=shard_b"),
    ]
    with pytest.raises(ConfigError, match="TRIPLANE_MONEY_DSN_A"):
        load_config(environ={}, overrides=overrides)
    with pytest.raises(ConfigError, match="backend: postgres"):
        load_config(
            environ={"TRIPLANE_MONEY_DSN_A": "dbname=shard_a"},
            overrides={"money": {"store": {"shards": shards}}},
        )
    assert load_config(environ={}).money.store.shards == []


def test_directory_replaces_a_connection_the_server_dropped(
    two_databases: tuple[str, str], pg_admin_dsn: str
) -> None:
    directory = ShardDirectory(two_databases[0], ["a", "b"])
    try:
        directory.create_schema()
        tenant = unique_tenant("d")
        assert directory.assign(tenant, 1) == "a"
        dbname = two_databases[0].rsplit("dbname=", 1)[1].split()[0]
        with psycopg.connect(pg_admin_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (dbname,),
            )
        with pytest.raises(psycopg.OperationalError):
            directory.shard_of(unique_tenant("unknown"))
        # The next call reconnects; the assignment is still there.
        fresh = ShardDirectory(two_databases[0], ["a", "b"])
        assert fresh.shard_of(tenant) == "a"
        fresh.close()
        assert directory.shard_of(unique_tenant("unknown")) is None
        assert directory.assign(unique_tenant("d"), 2) == "b"
    finally:
        directory.close()
