"""`python -m money_plane` with money.server_processes = 2 on PostgreSQL: both
processes serve the one port, each answers calls (seen from the owner of the
server's end of each connection), the primary's metrics count the calls of
both, and SIGTERM to the primary stops every process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.metrics_scrape import scrape_blocking, value
from tests.tls_helpers import channel_as, dev_certificates, identity_files
from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.runtime.net import free_port
from triplane.runtime.tls import open_channel
from triplane_tools.stack import check_health

pytestmark = pytest.mark.postgres


def _sockets(port: int, state: str) -> set[str]:
    """Inodes of the sockets whose local port is `port`, in a TCP state
    ("0A" listening, "01" established: a server's end of a connection)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == state:
                inodes.add(fields[9])
    return inodes


def _owners(inodes: set[str]) -> dict[str, int]:
    """Socket inode -> pid of the process holding it."""
    owners: dict[str, int] = {}
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    owners[target[8:-1]] = int(fd_dir.parent.name)
        except OSError:
            continue
    return owners


def _listeners(port: int) -> set[int]:
    """Pids of the processes holding a listening socket on `port`."""
    return set(_owners(_sockets(port, "0A")).values())


async def _served_by(state_dir: Path, address: str, port: int, index: int) -> int:
    """Makes one call on a connection of its own; the pid that answered it
    (the owner of the server's end of that connection)."""
    before = _sockets(port, "01")
    async with open_channel(
        address, identity_files(state_dir), options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        answer = await stub.CreateTenant(
            money_pb2.CreateTenantRequest(tenant_id=f"serve{index}", display_name="serve"),
            timeout=10,
        )
        assert answer.tenant.tenant_id == f"serve{index}"
        owners = set(_owners(_sockets(port, "01") - before).values())
    assert len(owners) == 1, owners
    return owners.pop()


def _created_tenants(metrics_port: int) -> float:
    """CreateTenant calls answered OK, as the money plane's /metrics says."""
    samples = scrape_blocking(f"127.0.0.1:{metrics_port}")
    return value(
        samples,
        "triplane_rpc_requests_total",
        plane="money_plane",
        method="triplane.money.v1.LedgerService/CreateTenant",
        code="OK",
    )


async def test_two_processes_serve_one_port_and_stop_together(pg_dsn: str, tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    metrics_port = free_port()
    dev_certificates(tmp_path)  # as the dev stack makes them: mutual TLS is on
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("TRIPLANE") and key != "NATS_URL"
    }
    env.update(
        TRIPLANE_STATE_DIR=str(tmp_path),
        TRIPLANE_MONEY_DSN=pg_dsn,
        TRIPLANE__MONEY__SERVER_PROCESSES="2",
        TRIPLANE__MONEY__LISTEN=address,
        TRIPLANE__MONEY__METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        TRIPLANE__RUNTIME__LOG_LEVEL="WARNING",
    )
    primary = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-m", "money_plane"], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while len(_listeners(port)) < 2:
            assert primary.poll() is None, "the money plane exited"
            assert time.monotonic() < deadline, f"listeners: {_listeners(port)}"
            await asyncio.sleep(0.2)
        pids = _listeners(port)
        assert primary.pid in pids and len(pids) == 2
        assert await check_health(address, tls=identity_files(tmp_path)) == 1  # SERVING
        # Calls over connections of their own until each process has answered
        # one: the kernel spreads connections over the two listeners at random
        # (SO_REUSEPORT), so 64 leave a chance of 2**-63 that one never does.
        served: list[int] = []
        for index in range(64):
            served.append(await _served_by(tmp_path, address, port, index))
            if set(served) == pids:
                break
        assert set(served) == pids, served
        # The primary's endpoint counts every process's calls, the workers' too.
        assert _created_tenants(metrics_port) == len(served)
        # Both wrote to the one database: every tenant is known on any connection.
        async with channel_as(tmp_path, address) as channel:
            stub = money_pb2_grpc.LedgerServiceStub(channel)
            for index in range(len(served)):
                check = await stub.CheckBalanced(
                    money_pb2.CheckBalancedRequest(tenant_id=f"serve{index}"), timeout=10
                )
                assert check.balanced
        primary.send_signal(signal.SIGTERM)
        assert primary.wait(timeout=30) == 0
        deadline = time.monotonic() + 20
        while _listeners(port):
            assert time.monotonic() < deadline, "a worker outlived the primary"
            await asyncio.sleep(0.2)
    finally:
        if primary.poll() is None:
            os.killpg(primary.pid, signal.SIGKILL)
            primary.wait()
