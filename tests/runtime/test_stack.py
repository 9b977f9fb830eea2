"""The local stack supervisor, for real: embedded nats-server, the money plane
as a child process answering its gRPC health check, shutdowns that leave
nothing running, children that die with a supervisor killed with SIGKILL, and
a busy port refused with the process holding it named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpc_health.v1 import health_pb2

from triplane.money.v1 import money_pb2, money_pb2_grpc
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port, port_open
from triplane_tools.ports import command_line
from triplane_tools.stack import EFFECTIVE_CONFIG_FILE, Stack, StackError, check_health

SERVING = int(health_pb2.HealthCheckResponse.SERVING)
MONEY_ONLY = [{"name": "money", "module": "money_plane"}]
# The longest the tests wait for processes to go or ports to free up after a
# stop or a kill: a bound on waiting for the behaviour, not a timing assertion.
GONE_WITHIN_S = 30.0
# A process that listens on a free port, prints it, and sleeps: a port held
# by something that is not a stack. The marker word names it in messages.
HOLD_PORT = """
import socket, sys, time  # port-holder-for-the-test
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
sock.listen()
print(sock.getsockname()[1], flush=True)
time.sleep(600)
"""


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


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = GONE_WITHIN_S) -> None:
    """Polls until `condition` holds; fails naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not {what} after {timeout_s} s")
        time.sleep(0.1)


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
        # The stack made the dev CA and the certificates, and the plane
        # speaks mutual TLS only: a plaintext health check gets no answer.
        assert (state_dir / "tls" / "ca.crt").is_file()
        assert (state_dir / "tls" / "money_plane.key").stat().st_mode & 0o777 == 0o600
        assert await check_health(address, tls=stack.tls_files()) == SERVING
        assert await check_health(address) != SERVING
        assert stack.nats_url.startswith("nats://127.0.0.1:")
        assert port_open(*_host_port(stack.nats_url.removeprefix("nats://")))
        assert (state_dir / "keys" / "policy_ed25519.pub").is_file()
        # The decision log is signed with a key of its own.
        log_key = state_dir / "keys" / "decision_log_ed25519.key"
        assert log_key.read_text() != (state_dir / "keys" / "policy_ed25519.key").read_text()
        effective = (state_dir / EFFECTIVE_CONFIG_FILE).read_text()
        assert stack.nats_url in effective
        async with stack.channel("money") as channel:
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


async def test_a_busy_port_is_refused_before_anything_starts(state_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = stack_config(state_dir, money={"listen": f"127.0.0.1:{port}"})
        stack = Stack(config, environ=clean_env())
        with pytest.raises(StackError) as refused:
            await stack.start()
    message = str(refused.value)
    assert f"127.0.0.1:{port} is already in use, held by pid {os.getpid()} (" in message
    assert "money.listen" in message and "TRIPLANE__MONEY__LISTEN" in message
    # Refused before anything started: no plane, no nats-server.
    assert stack.processes == []
    assert stack.nats_url == ""
    assert not (state_dir / "nats").exists()


def test_triplane_up_refuses_a_busy_port_naming_the_process(state_dir: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_PORT], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        port = int(holder.stdout.readline())
        env = clean_env(
            TRIPLANE_STATE_DIR=str(state_dir),
            TRIPLANE__MONEY__LISTEN=f"127.0.0.1:{port}",
            TRIPLANE__STACK__PLANES="[{name: money, module: money_plane}]",
        )
        up = subprocess.run(
            [sys.executable, "-m", "triplane_tools.cli", "up"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=env,
            text=True,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    assert up.returncode == 1, up.stdout + up.stderr
    assert f"127.0.0.1:{port} is already in use, held by pid {holder.pid}" in up.stderr
    assert "port-holder-for-the-test" in up.stderr  # its command line
    assert "triplane stack is up" not in up.stdout
    assert not (state_dir / "nats").exists()


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
    with pytest.raises(StackError, match="did not report SERVING"):
        await stack.start()
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


def start_triplane_up(env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """`triplane up` in a child process, read up to its description of the
    stack (the lines after the banner, through the last plane's line)."""
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
    last_plane = yaml.safe_load(env["TRIPLANE__STACK__PLANES"])[-1]["name"]
    up_seen = False
    try:
        for line in up.stdout:
            output.append(line)
            up_seen = up_seen or line.startswith("triplane stack is up")
            if up_seen and line.startswith(f"{last_plane} "):
                break
        else:
            pytest.fail("`triplane up` ended before the stack was up:\n" + "".join(output))
    except BaseException:
        up.kill()
        up.wait()
        raise
    return up, output


def nats_port_of(output: list[str]) -> int:
    line = next(line for line in output if line.startswith("nats ") and "nats://" in line)
    return _host_port(line.split("nats://", 1)[1].strip())[1]


def test_triplane_up_stops_everything_on_sigterm(state_dir: Path) -> None:
    money_port = free_port()
    env = clean_env(
        TRIPLANE_STATE_DIR=str(state_dir),
        TRIPLANE__MONEY__LISTEN=f"127.0.0.1:{money_port}",
        TRIPLANE__STACK__PLANES="[{name: money, module: money_plane}]",
    )
    up, output = start_triplane_up(env)
    assert up.stdout is not None
    try:
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


def _kill_supervisor_and_check_children_go(
    up: subprocess.Popen[str], ports: list[int], expected: list[str]
) -> None:
    """SIGKILL to `triplane up` (it stops nothing itself); then every process
    below it must go and every port must be free."""
    children = descendants(up.pid)
    lines = {pid: command_line(pid) for pid in children}
    for word in expected:
        assert any(word in line for line in lines.values()), (word, lines)
    for port in ports:
        assert port_open("127.0.0.1", port), port
    up.kill()
    up.wait()
    wait_until(
        lambda: not [pid for pid in children if alive(pid)],
        f"gone: {[lines[pid] for pid in children if alive(pid)]}",
    )
    wait_until(
        lambda: not [port for port in ports if port_open("127.0.0.1", port)],
        f"free: {[port for port in ports if port_open('127.0.0.1', port)]}",
    )


def test_triplane_up_killed_with_sigkill_takes_every_child_with_it(state_dir: Path) -> None:
    money_port, policy_port = free_port(), free_port()
    env = clean_env(
        TRIPLANE_STATE_DIR=str(state_dir),
        TRIPLANE__MONEY__LISTEN=f"127.0.0.1:{money_port}",
        TRIPLANE__POLICY__LISTEN=f"127.0.0.1:{policy_port}",
        TRIPLANE__STACK__PLANES=(
            "[{name: money, module: money_plane}, {name: policy, module: policy_plane}]"
        ),
    )
    up, output = start_triplane_up(env)
    try:
        ports = [money_port, policy_port, nats_port_of(output)]
        expected = ["-m money_plane", "-m policy_plane", "nats-server"]
        _kill_supervisor_and_check_children_go(up, ports, expected)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


@pytest.mark.postgres
def test_money_workers_die_with_a_killed_supervisor(state_dir: Path, pg_dsn: str) -> None:
    """The processes a plane starts itself (here the money plane's second
    server process) die with it when the supervisor above both is killed."""
    money_port = free_port()
    env = clean_env(
        TRIPLANE_STATE_DIR=str(state_dir),
        TRIPLANE_MONEY_DSN=pg_dsn,
        TRIPLANE__MONEY__SERVER_PROCESSES="2",
        TRIPLANE__MONEY__LISTEN=f"127.0.0.1:{money_port}",
        TRIPLANE__STACK__PLANES="[{name: money, module: money_plane}]",
    )
    up, _ = start_triplane_up(env)
    try:
        money_pid = next(
            pid for pid in descendants(up.pid) if "-m money_plane" in command_line(pid)
        )
        workers = descendants(money_pid)
        assert any("--multiprocessing-fork" in command_line(pid) for pid in workers), [
            command_line(pid) for pid in workers
        ]
        _kill_supervisor_and_check_children_go(up, [money_port], ["-m money_plane"])
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
