"""`python -m money_plane` with money.server_processes = 2 on PostgreSQL: both
processes serve the one port, calls succeed over many connections, and SIGTERM
to the primary stops every process."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.runtime.net import free_port
from triplane_tools.stack import check_health

pytestmark = pytest.mark.postgres


def _listeners(port: int) -> set[int]:
    """Pids of the processes holding a listening socket on `port`."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(fields[9])
    pids: set[int] = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    pids.add(int(fd_dir.parent.name))
        except OSError:
            continue
    return pids


async def test_two_processes_serve_one_port_and_stop_together(pg_dsn: str, tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
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
        assert await check_health(address) == 1  # SERVING
        # Calls over many connections (the kernel spreads connections).
        for index in range(8):
            async with grpc.aio.insecure_channel(
                address, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = money_pb2_grpc.LedgerServiceStub(channel)
                answer = await stub.CreateTenant(
                    money_pb2.CreateTenantRequest(tenant_id=f"serve{index}", display_name="serve"),
                    timeout=10,
                )
                assert answer.tenant.tenant_id == f"serve{index}"
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
