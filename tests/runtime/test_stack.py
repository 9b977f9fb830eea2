"""The local stack supervisor, for real: embedded nats-server, the money plane
as a child process answering its gRPC health check, and shutdowns that leave
nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port, port_open
from triplane_tools.stack import EFFECTIVE_CONFIG_FILE, Stack, StackError, check_health

SERVING = int(health_pb2.HealthCheckResponse.SERVING)
MONEY_ONLY = [{"name": "money", "module": "money_plane"}]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without Triplane's own overrides (the tests say what they want)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}
    env.update(extra)
    return env


def stack_config(state_dir: Path, **sections: Any) -> Config:
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir)},
        "money": {"listen": f"127.0.0.1:{free_port()}"},
        "stack": {"planes": MONEY_ONLY, "start_timeout_s": 60.0},
    }
    for name, values in sections.items():
        overrides.setdefault(name, {}).update(values)
    return load_config(environ={}, overrides=overrides)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def alive(pid: int) -> bool:
    """True while a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


async def test_stack_serves_the_money_plane_and_stops_cleanly(state_dir: Path) -> None:
    config = stack_config(state_dir)
    stack = Stack(config, environ=clean_env())
    async with stack:
        address = stack.addresses["money"]
        assert await check_health(address) == SERVING
        assert stack.nats_url.startswith("nats://127.0.0.1:")
        assert port_open(*_host_port(stack.nats_url.removeprefix("nats://")))
        assert (state_dir / "keys" / "policy_ed25519.pub").is_file()
        effective = (state_dir / EFFECTIVE_CONFIG_FILE).read_text()
        assert stack.nats_url in effective
        async with grpc.aio.insecure_channel(address) as channel:
            stub = money_pb2_grpc.LedgerServiceStub(channel)
            await stub.CreateTenant(money_pb2.CreateTenantRequest(tenant_id="acme"), timeout=10)
            balanced = await stub.CheckBalanced(
                money_pb2.CheckBalancedRequest(tenant_id="acme"), timeout=10
            )
            assert balanced.balanced
        plane = stack.processes[0]
        assert plane.running()
    assert plane.process.returncode == 0, plane.log_path.read_text()[-2000:]
    assert not alive(plane.pid)
    assert not port_open(*_host_port(address))
    assert not port_open(*_host_port(stack.nats_url.removeprefix("nats://")))
    assert plane.log_path == state_dir / "logs" / "money.log"
    assert plane.log_path.stat().st_size > 0


async def test_a_busy_port_is_refused_and_nothing_is_left_running(state_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = stack_config(state_dir, money={"listen": f"127.0.0.1:{port}"})
        stack = Stack(config, environ=clean_env())
        with pytest.raises(StackError, match=f"127.0.0.1:{port} is already in use"):
            await stack.start()
    assert stack.processes == []
    assert not port_open(*_host_port(stack.nats_url.removeprefix("nats://")))


@pytest.fixture
def fake_planes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory of plane packages that misbehave, importable here and in children."""
    root = tmp_path / "planes"
    plans = {
        "crashing_plane": "import sys\nprint('boom: cannot start', file=sys.stderr)\nsys.exit(3)\n",
        "stubborn_plane": """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print('ignoring SIGTERM, never serving', flush=True)
            while True:
                time.sleep(1)
        """,
    }
    for name, main in plans.items():
        package = root / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "__main__.py").write_text(textwrap.dedent(main))
    monkeypatch.syspath_prepend(str(root))
    yield root


async def test_a_plane_that_dies_while_starting_is_reported(
    state_dir: Path, fake_planes: Path
) -> None:
    config = stack_config(
        state_dir,
        ai={"listen": f"127.0.0.1:{free_port()}"},
        stack={"planes": [{"name": "ai", "module": "crashing_plane"}]},
    )
    stack = Stack(config, environ=clean_env(PYTHONPATH=str(fake_planes)))
    with pytest.raises(StackError, match=r"(?s)exited with code 3.*boom: cannot start"):
        await stack.start()
    assert not port_open(*_host_port(stack.nats_url.removeprefix("nats://")))


async def test_start_timeout_then_sigkill_when_sigterm_is_ignored(
    state_dir: Path, fake_planes: Path
) -> None:
    config = stack_config(
        state_dir,
        runtime={"shutdown_grace_s": 0.2},
        ai={"listen": f"127.0.0.1:{free_port()}"},
        stack={
            "planes": [{"name": "ai", "module": "stubborn_plane"}],
            "start_timeout_s": 2.0,
            "stop_timeout_s": 1.0,
        },
    )
    stack = Stack(config, environ=clean_env(PYTHONPATH=str(fake_planes)))
    started = time.monotonic()
    with pytest.raises(StackError, match="did not report SERVING"):
        await stack.start()
    assert time.monotonic() - started < 15
    plane = stack.processes[0]
    assert plane.process.returncode == -signal.SIGKILL
    assert not alive(plane.pid)


def test_stop_timeout_must_exceed_the_shutdown_grace(state_dir: Path) -> None:
    config = stack_config(
        state_dir, runtime={"shutdown_grace_s": 5.0}, stack={"stop_timeout_s": 5.0}
    )
    with pytest.raises(StackError, match="stop_timeout_s"):
        Stack(config)


def test_unknown_plane_name_is_refused(state_dir: Path) -> None:
    with pytest.raises(StackError, match="'ledger'"):
        Stack(stack_config(state_dir), planes=["ledger"])


def test_triplane_up_stops_everything_on_sigterm(state_dir: Path) -> None:
    money_port = free_port()
    env = clean_env(
        TRIPLANE_STATE_DIR=str(state_dir),
        TRIPLANE__MONEY__LISTEN=f"127.0.0.1:{money_port}",
        TRIPLANE__STACK__PLANES="[{name: money, module: money_plane}]",
    )
    up = subprocess.Popen(
        [sys.executable, "-m", "triplane_tools.cli", "up"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    assert up.stdout is not None
    output: list[str] = []
    try:
        for line in up.stdout:
            output.append(line)
            if line.startswith("triplane stack is up"):
                break
        else:
            pytest.fail("`triplane up` ended before the stack was up:\n" + "".join(output))
        time.sleep(0.5)  # The description lines follow the banner.
        children = descendants(up.pid)
        assert len(children) >= 2, children  # nats-server and the money plane
        assert port_open("127.0.0.1", money_port)
        up.send_signal(signal.SIGTERM)
        # Not communicate(): with a timeout it bypasses what `for line` buffered.
        rest = up.stdout.read()
        up.wait(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    text = "".join(output) + rest
    assert up.returncode == 0, text
    assert f"log {state_dir / 'logs' / 'money.log'}" in text
    assert "stopped; logs are in" in text
    assert [pid for pid in children if alive(pid)] == []
    assert not port_open("127.0.0.1", money_port)
