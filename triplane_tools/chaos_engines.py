"""The engines a chaos run may kill: a private PostgreSQL started from the
installed binaries (initdb into a temporary directory, `postgres` on a free
loopback port), so that the run may kill it with SIGKILL and start it again
without touching the machine's own server.

The server runs as a child of the calling thread, in a session of its own,
with the parent-death signal (triplane.runtime.lifetime): a run killed
outright leaves no postmaster behind. Under root (PostgreSQL refuses to run
as root) it runs as the `postgres` user, its directory owned by that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from triplane.runtime.lifetime import die_with_parent
from triplane.runtime.net import free_port

# The user the server runs as when this process is root.
SERVER_USER = "postgres"
READY_POLL_S = 0.1


class PostgresUnavailable(RuntimeError):
    """The installed PostgreSQL could not be found, initialised or started."""


def find_binaries() -> Path:
    """The newest installed PostgreSQL's bin directory (initdb, postgres)."""
    override = os.environ.get("TRIPLANE_PG_BIN", "")
    found = [override] if override else []
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_of, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        found.append(str(Path(on_path).parent))
    for directory in found:
        path = Path(directory)
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            return path
    raise PostgresUnavailable(
        "no PostgreSQL binaries (initdb, postgres) in /usr/lib/postgresql/*/bin or on PATH; "
        "install the server package or set TRIPLANE_PG_BIN"
    )


def _version_of(directory: str) -> float:
    try:
        return float(Path(directory).parent.name)
    except ValueError:
        return 0.0


class PrivatePostgres:
    """One PostgreSQL server of the run's own: trust authentication on
    127.0.0.1 only, fsync on (a kill must not lose a committed row)."""

    def __init__(self, start_timeout_s: float = 60.0) -> None:
        self.bin_dir = find_binaries()
        self.port = free_port()
        self.start_timeout_s = start_timeout_s
        self.root = Path(tempfile.mkdtemp(prefix="triplane-chaos-pg-"))
        self.data_dir = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self._user = SERVER_USER if os.geteuid() == 0 else None
        if self._user is not None:
            try:
                pwd.getpwnam(self._user)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root, and PostgreSQL refuses root: no {self._user!r} user "
                    "to run it as"
                ) from None

    @property
    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _chown(self) -> None:
        """The directory to the server's user, once, before initdb: what is
        in it after that (the data directory, the socket) is the server's
        own. Never walked again: files come and go in it while it runs."""
        if self._user is None:
            return
        entry = pwd.getpwnam(self._user)
        os.chown(self.root, entry.pw_uid, entry.pw_gid)

    def initialise(self) -> None:
        self._chown()
        result = subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            user=self._user,
            check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )

    def spawn(self) -> None:
        """Starts the server (crash recovery first, after a kill). Call it
        from a thread that lives as long as the server (it dies with it)."""
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [
                    str(self.bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "max_connections=300",
                    "-c",
                    "fsync=on",
                    "-c",
                    "synchronous_commit=on",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self._user,
                preexec_fn=die_with_parent(),
            )

    def wait_ready(self) -> None:
        """Blocks until the server accepts a connection (recovery done)."""
        deadline = time.monotonic() + self.start_timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            process = self._process
            if process is None or process.poll() is not None:
                raise PostgresUnavailable(f"postgres exited; see {self.log_path}")
            try:
                with psycopg.connect(self.admin_dsn, connect_timeout=2) as connection:
                    connection.execute("SELECT 1")
                return
            except psycopg.Error as error:
                last_error = str(error)
            time.sleep(READY_POLL_S)
        raise PostgresUnavailable(
            f"postgres did not accept connections in {self.start_timeout_s}s ({last_error}); "
            f"see {self.log_path}"
        )

    def kill(self) -> None:
        """kill -9 of the postmaster and every backend: what a crashed
        machine does to it. Each backend runs in a session of its own
        (PostgreSQL calls setsid in every child), so the postmaster's group
        is not enough: the postmaster is frozen first (it forks no more),
        then its children and it are killed, and the kill waits until none
        is left (a survivor keeps the shared memory, and the next start
        would refuse it)."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGSTOP)
        doomed = [*_children_of(process.pid), process.pid]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        self._process = None
        self.kills += 1
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in doomed):
            time.sleep(READY_POLL_S)

    def stop(self) -> None:
        """A fast shutdown (SIGINT), then SIGKILL; removes the directory."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._process = None
        shutil.rmtree(self.root, ignore_errors=True)


def _children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(stat_path.parent.name))
    return found


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, already dead, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
