"""Children that die with their parent (triplane.runtime.lifetime), and naming
the process that holds a port (triplane_tools.ports), on real processes and
sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triplane.runtime.lifetime import ORPHANED_EXIT_CODE, SUPERVISOR_PID_ENV
from triplane_tools import ports

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="parent-death signals and /proc are Linux's"
)

# The longest the tests wait for a process to go: a bound on waiting for the
# behaviour, not a timing assertion.
GONE_WITHIN_S = 30.0

# A parent that starts `sleep` to die with it, prints the sleeper's pid, and
# then waits to be killed.
PARENT = """
import subprocess, sys, time
from triplane.runtime.lifetime import die_with_parent
child = subprocess.Popen(["sleep", "600"], preexec_fn=die_with_parent(), start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""

# A serving process's first step (runtime.server.run does this).
SERVING = """
from triplane.runtime.lifetime import exit_with_supervisor
print("armed" if exit_with_supervisor() else "not asked", flush=True)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while alive(pid):
        if time.monotonic() > deadline:
            pytest.fail(f"pid {pid} still running {GONE_WITHIN_S} s after its parent died")
        time.sleep(0.05)


def test_a_child_in_its_own_session_dies_with_its_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    sleeper = int(parent.stdout.readline())
    try:
        assert alive(sleeper)
        parent.kill()  # SIGKILL: the parent stops nothing itself
        parent.wait()
        wait_gone(sleeper)
    finally:
        if alive(sleeper):
            os.kill(sleeper, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _serving(environ: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SERVING], capture_output=True, text=True, env=environ, timeout=60
    )


def test_a_supervised_process_arms_the_signal_when_its_supervisor_is_its_parent() -> None:
    environ = {**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())}
    done = _serving(environ)
    assert (done.returncode, done.stdout) == (0, "armed\n"), done.stderr


def test_a_supervised_process_whose_supervisor_is_gone_exits_at_once() -> None:
    """The parent it was started by is not its parent any more (it died
    before the signal was armed): it leaves instead of serving as an orphan."""
    impostor = subprocess.Popen(["sleep", "600"])
    try:
        environ = {**os.environ, SUPERVISOR_PID_ENV: str(impostor.pid)}
        done = _serving(environ)
    finally:
        impostor.kill()
        impostor.wait()
    assert done.returncode == ORPHANED_EXIT_CODE, done.stdout + done.stderr
    assert "armed" not in done.stdout
    assert f"parent process {impostor.pid} is gone" in done.stderr


def test_an_unsupervised_process_is_left_alone() -> None:
    environ = {k: v for k, v in os.environ.items() if k != SUPERVISOR_PID_ENV}
    done = _serving(environ)
    assert (done.returncode, done.stdout) == (0, "not asked\n"), done.stderr


@pytest.mark.parametrize(
    ("family", "host", "shown"),
    [(socket.AF_INET, "127.0.0.1", "127.0.0.1"), (socket.AF_INET6, "::1", "[::1]")],
)
def test_the_holder_of_a_port_is_named(family: socket.AddressFamily, host: str, shown: str) -> None:
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        sock.listen()
        port = sock.getsockname()[1]
        holders = ports.port_holders(host, port)
        described = ports.describe_holders(host, port)
    assert [(holder.pid, holder.address) for holder in holders] == [
        (os.getpid(), f"{shown}:{port}")
    ]
    assert holders[0].command_line == ports.command_line(os.getpid())
    assert described.startswith(f"held by pid {os.getpid()} (")
    assert ports.port_holders(host, port) == []  # closed: nobody holds it


def test_a_wildcard_listener_conflicts_with_loopback_and_another_address_does_not() -> None:
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert [h.pid for h in ports.port_holders("127.0.0.1", port)] == [os.getpid()]
        assert [h.pid for h in ports.port_holders("0.0.0.0", port)] == [os.getpid()]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert [h.pid for h in ports.port_holders("0.0.0.0", port)] == [os.getpid()]
        assert ports.port_holders("127.0.0.2", port) == []


def test_a_holder_that_cannot_be_seen_is_said_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listening socket whose process is not visible (another user's) is
    reported as such, not as a free port or a blank name."""
    (tmp_path / "net").mkdir()
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    header += "timeout inode\n"
    listener = "   0: 0100007F:C383 00000000:0000 0A 00000000:00000000 00:00000000 00000000  "
    listener += "  0        0 424242 1 0000000000000000 100 0 0 10 0\n"
    (tmp_path / "net" / "tcp").write_text(header + listener)
    (tmp_path / "net" / "tcp6").write_text(header)
    monkeypatch.setattr(ports, "PROC", tmp_path)
    assert ports.listening_inodes("127.0.0.1", 50051) == {424242: "127.0.0.1:50051"}
    assert ports.port_holders("127.0.0.1", 50051) == []
    assert "cannot inspect" in ports.describe_holders("127.0.0.1", 50051)
