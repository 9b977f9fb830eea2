"""The one-command local stack: embedded NATS, the dev key pair, the dev CA and
certificates, and every plane as a child process, each one waited on until its
gRPC health check says SERVING.

`make up` runs it in the foreground (`triplane up`); the demo and the end-to-end
tests use it from Python:

    async with Stack(config) as stack:
        channel = stack.channel("money")  # mutual TLS as the admin identity

With runtime.tls on (the default) and no files of its own configured, the
stack creates the dev CA and one certificate per identity under
<state_dir>/tls/ before it starts anything (triplane_tools.certs), and checks
health over mutual TLS as the admin identity.

Children get the stack's effective config as a YAML file (TRIPLANE_CONFIG), plus
NATS_URL and TRIPLANE_STATE_DIR, so a config built in Python (other ports, another
state dir) reaches them exactly. Each child runs in its own session: Ctrl-C in the
terminal reaches only the supervisor, which then stops the planes in reverse
start order (SIGTERM, stack.stop_timeout_s, then SIGKILL of the whole group).

A supervisor that dies without stopping them (SIGKILL, a crash) takes its
children with it: each one gets the parent-death signal (Linux; see
triplane.runtime.lifetime), and so do the processes a plane starts itself
(tritonserver, the money plane's workers). The signal is tied to the thread
that spawned the child, so start a Stack from a thread that outlives it (the
main thread, or the event loop's thread: the stack spawns from the thread its
event loop runs in and only waits in worker threads).

Before starting anything, every port the selected planes listen on is checked;
a busy one is refused with the process holding it named (pid and command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import aiohttp
import grpc
import msgspec
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.auth.secrets import ensure_dev_files as ensure_dev_auth_files
from triplane.runtime import tokens
from triplane.runtime.config import Config, StackPlaneConfig
from triplane.runtime.lifetime import SUPERVISOR_PID_ENV, die_with_parent
from triplane.runtime.net import dial_address, free_port, host_port, port_open
from triplane.runtime.tls import ADMIN, TlsFiles, files_for, open_channel
from triplane_tools import replicas as fleet
from triplane_tools.certs import ensure_dev_certificates
from triplane_tools.models import ensure_bootstrap_models
from triplane_tools.natsd import EmbeddedNats, NatsCluster
from triplane_tools.ports import describe_holders, listening_inodes

log = logging.getLogger("triplane.stack")

EFFECTIVE_CONFIG_FILE = "stack-config.yaml"
HEALTH_CHECK_TIMEOUT_S = 1.0
LOG_TAIL_LINES = 20
# The dev stack's gateway ports: public (gateway.listen's shipped default)
# and the certificate port the stack gives it when none is configured.
DEV_GATEWAY_PORT = 50051
DEV_GATEWAY_ADMIN_PORT = 50052
# After a plane exits, how long processes it left in its group get to go.
GROUP_REAP_TIMEOUT_S = 2.0


class StackError(Exception):
    """The stack could not start (or a plane died); the message says which and why."""


# The source checkout this package runs from, when it does (an editable
# install only maps the packages that existed when it was installed; a plane
# written since is still found there).
def _source_root() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


SOURCE_ROOT = _source_root()


def plane_available(module: str) -> bool:
    """True when `python -m module` can run: the package exists and has a
    __main__.py. Looked up without importing the package, so a plane that is
    half-written cannot break the supervisor."""
    if SOURCE_ROOT is not None and (SOURCE_ROOT / module / "__main__.py").is_file():
        return True
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "__main__.py").is_file() for p in spec.submodule_search_locations)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class PlaneProcess:
    """One running plane."""

    name: str
    module: str
    address: str
    log_path: Path
    process: subprocess.Popen[bytes]
    # Which of the plane's replicas (0 when it runs one).
    replica: int = 0
    # What it was started with, so that it can be started again (restart).
    env: dict[str, str] = field(default_factory=dict, repr=False)
    # Times it was started again after it exited (restart).
    restarts: int = 0

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None


async def check_health(
    address: str, timeout_s: float = HEALTH_CHECK_TIMEOUT_S, tls: TlsFiles | None = None
) -> int:
    """The overall health status of the server at `address` (a
    HealthCheckResponse.ServingStatus), over mutual TLS with `tls`; UNKNOWN
    when it cannot be reached."""
    async with open_channel(address, tls, who="health check") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return int(health_pb2.HealthCheckResponse.UNKNOWN)
        return int(response.status)


async def check_http_health(address: str, timeout_s: float = HEALTH_CHECK_TIMEOUT_S) -> bool:
    """Whether a plane with `health: http` (the sandbox bank) answers 200 on
    GET /healthz at `address`."""
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"http://{address}/healthz") as resp,
        ):
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@dataclass
class Stack:
    """Supervisor of a local stack. `planes` limits which configured planes run
    (by name); by default every configured plane that has a __main__.py."""

    config: Config
    planes: list[str] | None = None
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    # Processes of every plane (`triplane up --replicas N`). Above 1 the
    # planes keep their state on PostgreSQL and Redis (triplane_tools.replicas)
    # and the gateway balances over every replica of each plane.
    replicas: int = 1
    # A plane run with another count than `replicas` (e.g. {"ai": 1}).
    replicas_of: dict[str, int] = field(default_factory=dict)
    # Where the planes' databases are created when no DSN is configured.
    postgres_admin_dsn: str = fleet.DEFAULT_PG_ADMIN_DSN
    database_prefix: str = fleet.DEFAULT_DATABASE_PREFIX
    # A 3-node JetStream cluster with R3 streams instead of one nats-server.
    nats_cluster: bool = False
    # Also start the stack.planes entries marked optional (the sandbox bank;
    # `triplane up` does) when `planes` names none; one named always starts.
    optional: bool = False
    state_dir: Path = field(init=False)
    nats_url: str = field(init=False, default="")
    processes: list[PlaneProcess] = field(init=False, default_factory=list)
    skipped: list[str] = field(init=False, default_factory=list)
    _nats: EmbeddedNats | None = field(init=False, default=None)
    _nats_cluster: NatsCluster | None = field(init=False, default=None)
    _replica_configs: dict[tuple[str, int], dict[str, Any]] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        self.state_dir = self.config.state_path.resolve()
        stack = self.config.stack
        if stack.stop_timeout_s <= self.config.runtime.shutdown_grace_s:
            raise StackError(
                "stack.stop_timeout_s must exceed runtime.shutdown_grace_s, "
                "or a graceful drain is cut short"
            )
        known = {plane.name for plane in stack.planes}
        for name in self.planes or []:
            if name not in known:
                raise StackError(f"plane {name!r} is not in stack.planes ({sorted(known)})")
        if self.replicas < 1 or any(n < 1 for n in self.replicas_of.values()):
            raise StackError("replicas must be at least 1")
        for name in self.replicas_of:
            if name not in known:
                raise StackError(f"replicas_of: {name!r} is not in stack.planes")

    def replica_count(self, plane: str) -> int:
        if any(p.name == plane and p.health == "http" for p in self.config.stack.planes):
            return 1  # a simulator (the sandbox bank) keeps its books in memory
        return self.replicas_of.get(plane, self.replicas)

    @property
    def replicated(self) -> bool:
        names = [plane.name for plane in self.config.stack.planes]
        return any(self.replica_count(name) > 1 for name in names)

    # ---- public surface ----

    @property
    def addresses(self) -> dict[str, str]:
        """Dial address of every running plane, by name (its first replica)."""
        return {p.name: p.address for p in self.processes if p.replica == 0}

    @property
    def replica_addresses(self) -> dict[str, list[str]]:
        """Dial address of every running replica of each plane, in replica order."""
        found: dict[str, list[str]] = {}
        for process in self.processes:
            found.setdefault(process.name, []).append(process.address)
        return found

    @property
    def gateway_targets(self) -> dict[str, str]:
        """What the gateway replicas dial each plane at (replicated stacks)."""
        for (plane, _), data in self._replica_configs.items():
            if plane == "gateway":
                targets: dict[str, str] = data["gateway"]["plane_addresses"]
                return {name: target for name, target in targets.items() if target}
        return {}

    def tls_files(self, identity: str = ADMIN) -> TlsFiles | None:
        """The TLS files of `identity` in this stack (None: runtime.tls off)."""
        return files_for(self._resolved_config(), identity)

    def partner_tls(self) -> TlsFiles | None:
        """What a partner dials the gateway with: the CA that signed its
        certificate, and no certificate of its own (it uses an API key)."""
        files = self.tls_files()
        return TlsFiles(ca_path=files.ca_path) if files is not None else None

    def channel(self, plane: str, identity: str = ADMIN, replica: int = 0) -> grpc.aio.Channel:
        """A channel to a running plane (one replica of it) as `identity` (the
        admin tools' by default)."""
        address = self.replica_addresses[plane][replica]
        return open_channel(address, self.tls_files(identity), who=identity)

    @property
    def logs_dir(self) -> Path:
        path = Path(self.config.stack.logs_dir)
        return path if path.is_absolute() else self.state_dir / path

    @property
    def nats_log_path(self) -> Path | None:
        return self._nats.log_path if self._nats is not None else None

    @property
    def jetstream_cluster(self) -> NatsCluster | None:
        """The 3-node cluster the stack runs (nats_cluster), for fault injection."""
        return self._nats_cluster

    async def __aenter__(self) -> Stack:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Starts NATS (unless configured), the keys, then each plane in order,
        waiting for each to serve. On any failure everything started is stopped."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stops the planes in reverse start order, then the embedded NATS."""
        for plane in reversed(self.processes):
            await asyncio.to_thread(self._stop_plane, plane)
        if self._nats is not None:
            await asyncio.to_thread(self._nats.stop)
        if self._nats_cluster is not None:
            await asyncio.to_thread(self._nats_cluster.stop)

    def process_of(self, plane: str, replica: int = 0) -> PlaneProcess:
        """The running (or exited) process of one replica of a plane."""
        for process in self.processes:
            if process.name == plane and process.replica == replica:
                return process
        raise StackError(f"no replica {replica} of plane {plane!r} in this stack")

    def kill(self, plane: str, replica: int = 0, sig: int = signal.SIGKILL) -> PlaneProcess:
        """Sends `sig` to one replica's process (fault injection: SIGKILL is
        `kill -9`; SIGSTOP freezes it, SIGCONT resumes it). What a killed
        plane started itself (its tritonserver, its workers) goes with it:
        the parent-death signal. The stack does not start it again by itself:
        `restart` does, as an orchestrator would; until then wait_for_exit
        reports it, so `triplane up` still stops when a plane dies."""
        process = self.process_of(plane, replica)
        if process.running():
            process.process.send_signal(sig)
            if sig == signal.SIGKILL:
                process.process.wait()
        return process

    async def restart(self, plane: str, replica: int = 0) -> PlaneProcess:
        """Starts a replica that exited again, with the config, environment
        and port it had, and waits until it serves (stack.start_timeout_s).
        Its log is appended to. Refused while the replica still runs.

        A process whose own gRPC calls are in flight meanwhile must run with
        GRPC_ENABLE_FORK_SUPPORT=false, set before grpc is imported: gRPC's
        fork handlers otherwise abort the forked child before it execs
        (triplane_tools.chaos.FORK_SUPPORT_ENV)."""
        old = self.process_of(plane, replica)
        if old.running():
            raise StackError(f"{plane}[{replica}] is still running (pid {old.pid})")
        await asyncio.to_thread(_reap_group, old.pid)
        planes = {p.name: p for p in self.config.stack.planes}
        # Spawned from this (the event loop's) thread: it dies with it.
        process = self._spawn(planes[plane], old.env, replica, append_log=True)
        process.restarts = old.restarts + 1
        self.processes[self.processes.index(old)] = process
        deadline = time.monotonic() + self.config.stack.start_timeout_s
        await self._wait_serving(process, deadline)
        log.info("%s[%d] restarted on %s (pid %d)", plane, replica, process.address, process.pid)
        return process

    async def wait_for_exit(self) -> PlaneProcess:
        """Returns the first plane that exits (for the foreground supervisor)."""
        while True:
            for plane in self.processes:
                if not plane.running():
                    return plane
            await asyncio.sleep(0.5)

    # ---- start ----

    async def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        keys = self.config.keys
        # The dev key pairs: decision tokens, and apart from them the
        # decision log's (created once, kept after).
        if not (keys.policy_public_keys or keys.policy_public_key_paths):
            tokens.ensure_dev_keypair(self.state_dir)
        if not keys.decision_log_private_key_path:
            tokens.ensure_dev_log_keypair(self.state_dir)
        tls = self.config.runtime.tls
        if tls.enabled and not (tls.ca_path or tls.cert_path):
            ensure_dev_certificates(self.state_dir, tls)
        auth = self.config.gateway.auth
        if auth.enabled and not (auth.pepper_file or auth.admin_key_file):
            # The API keys' pepper and the bootstrap admin key (which the demo
            # and `triplane keys` use to make the tenants' keys).
            ensure_dev_auth_files(self.state_dir, auth.environment)
        planes = self._selected_planes()
        self.config = self._with_gateway_admin_port(planes)
        self._refuse_busy_ports(planes)
        if self.replicated:
            # PostgreSQL and Redis checked (refused with a message when
            # missing), the databases created, the planes pointed at them.
            self.config = await asyncio.to_thread(
                fleet.shared_engines_config,
                self.config,
                admin_dsn=self.postgres_admin_dsn,
                prefix=self.database_prefix,
                ai_replicas=self.replica_count("ai"),
            )
        if self.nats_cluster:
            self.config = fleet.with_stream_replicas(self.config, 3)
        self.nats_url = self.config.nats.url
        if not self.nats_url and self.nats_cluster:
            self._nats_cluster = NatsCluster(self.state_dir / "nats-cluster")
            self._nats_cluster.spawn()
            await asyncio.to_thread(
                self._nats_cluster.wait_ready, self.config.stack.start_timeout_s
            )
            # One URL: the runtime's connect takes one (nats-py learns the
            # other nodes from the server and fails over to them).
            self.nats_url = self._nats_cluster.urls[0]
        elif not self.nats_url:
            self._nats = EmbeddedNats(self.state_dir / "nats")
            # Spawned from this thread (the server dies with the thread that
            # spawned it); only the wait runs in a worker thread.
            self._nats.spawn()
            self.nats_url = await asyncio.to_thread(
                self._nats.wait_listening, self.config.stack.start_timeout_s
            )
        env = self._child_env(self._write_effective_config())
        if self.replicated:
            base = msgspec.to_builtins(self._resolved_config())
            base["nats"]["url"] = self.nats_url
            counts = {plane.name: self.replica_count(plane.name) for plane in planes}
            self._replica_configs = fleet.replica_configs(base, counts)
        for plane in planes:
            if plane.module == "ai_plane" and self.config.ai.models.bootstrap_train:
                # The AI plane trains nothing itself: its models are made live
                # first, from the synthetic world (seconds; nothing downloaded).
                await asyncio.to_thread(ensure_bootstrap_models, self._resolved_config())
            count = self.replica_count(plane.name) if self.replicated else 1
            # The first replica alone, then the others together: the first
            # creates the plane's schema (two processes migrating one empty
            # database at once collide on CREATE TABLE IF NOT EXISTS).
            for batch in ([0], list(range(1, count))):
                started = []
                for replica in batch:
                    if self.replicated:
                        config_path = self._write_replica_config(plane.name, replica)
                        process = self._spawn(plane, self._child_env(config_path), replica)
                    else:
                        process = self._spawn(plane, env)
                    self.processes.append(process)
                    started.append(process)
                deadline = time.monotonic() + self.config.stack.start_timeout_s
                for process in started:
                    await self._wait_serving(process, deadline)
                    log.info(
                        "%s[%d] serving on %s (pid %d)",
                        plane.name,
                        process.replica,
                        process.address,
                        process.pid,
                    )

    def _with_gateway_admin_port(self, planes: list[StackPlaneConfig]) -> Config:
        """The config with a gateway certificate port when the stack runs the
        gateway with TLS and none is configured: the console's Deliveries
        page reaches the gateway only there (console/planes.py dials
        gateway.admin_listen). On the shipped dev ports it is 50052, beside
        the public 50051 (as in Kubernetes, where the overlays set their
        own); a gateway moved elsewhere gets a free port on its host."""
        gateway = self.config.gateway
        if (
            gateway.admin_listen
            or not self.config.runtime.tls.enabled
            or "gateway" not in {plane.name for plane in planes}
        ):
            return self.config
        host, port = host_port(gateway.listen)
        admin_port = DEV_GATEWAY_ADMIN_PORT if port == DEV_GATEWAY_PORT else free_port()
        admin = f"{host}:{admin_port}"
        return msgspec.structs.replace(
            self.config, gateway=msgspec.structs.replace(gateway, admin_listen=admin)
        )

    def _resolved_config(self) -> Config:
        """The config with the state dir the children get (absolute)."""
        runtime = msgspec.structs.replace(self.config.runtime, state_dir=str(self.state_dir))
        return msgspec.structs.replace(self.config, runtime=runtime)

    def _selected_planes(self) -> list[StackPlaneConfig]:
        selected: list[StackPlaneConfig] = []
        for plane in self.config.stack.planes:
            if self.planes is not None and plane.name not in self.planes:
                continue
            if self.planes is None and plane.optional and not self.optional:
                continue
            if not plane_available(plane.module):
                if self.planes is not None:
                    raise StackError(f"plane {plane.name!r}: no module {plane.module}.__main__")
                self.skipped.append(plane.name)
                continue
            selected.append(plane)
        if not selected:
            raise StackError("no plane to start")
        return selected

    def _listen_of(self, plane: StackPlaneConfig) -> str:
        section = getattr(self.config, plane.name, None)
        listen = getattr(section, "listen", None)
        if not isinstance(listen, str):
            raise StackError(f"plane {plane.name!r}: config has no '{plane.name}.listen'")
        return listen

    def _ports_of(self, plane: StackPlaneConfig) -> list[tuple[str, str]]:
        """(config key, listen address) of every port the plane will bind: its
        gRPC address and, when configured, its metrics endpoint and admin port."""
        ports = [(f"{plane.name}.listen", self._listen_of(plane))]
        section = getattr(self.config, plane.name, None)
        for key in ("metrics_listen", "admin_listen"):
            extra = getattr(section, key, "")
            if isinstance(extra, str) and extra:
                ports.append((f"{plane.name}.{key}", extra))
        return ports

    def _refuse_busy_ports(self, planes: list[StackPlaneConfig]) -> None:
        """Refuses to start anything while a port a plane needs is held."""
        for plane in planes:
            for key, listen in self._ports_of(plane):
                _refuse_busy(plane.name, key, listen)

    def _write_effective_config(self) -> Path:
        data = msgspec.to_builtins(self.config)
        data["runtime"]["state_dir"] = str(self.state_dir)
        data["nats"]["url"] = self.nats_url
        path = self.state_dir / EFFECTIVE_CONFIG_FILE
        # It may carry database DSNs with passwords: readable by its owner only.
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(
            "# Written by the stack supervisor: the config every plane of this stack runs with.\n"
            + yaml.safe_dump(data, sort_keys=False)
        )
        return path

    def _write_replica_config(self, plane: str, replica: int) -> Path:
        """The config of one replica: the stack's, with its own ports (and
        decision-log writer), the gateway's plane addresses naming every
        replica."""
        path = self.state_dir / f"stack-config-{plane}-{replica}.yaml"
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(
            f"# Written by the stack supervisor: the config of {plane} replica {replica}.\n"
            + yaml.safe_dump(self._replica_configs[(plane, replica)], sort_keys=False)
        )
        return path

    def _child_env(self, config_path: Path) -> dict[str, str]:
        env = dict(self.environ)
        env.update(
            TRIPLANE_CONFIG=str(config_path),
            TRIPLANE_STATE_DIR=str(self.state_dir),
            NATS_URL=self.nats_url,
            PYTHONUNBUFFERED="1",
        )
        # A plane seeing it dies with whatever started it (runtime.server.run).
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        if SOURCE_ROOT is not None:
            paths = [str(SOURCE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
            env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def _spawn(
        self,
        plane: StackPlaneConfig,
        env: dict[str, str],
        replica: int = 0,
        append_log: bool = False,
    ) -> PlaneProcess:
        listen = self._listen_of(plane)
        log_path = self.logs_dir / f"{plane.name}.log"
        if self._replica_configs:
            listen = self._replica_configs[(plane.name, replica)][plane.name]["listen"]
            log_path = self.logs_dir / f"{plane.name}-{replica}.log"
        _refuse_busy(plane.name, f"{plane.name}.listen", listen)
        address = dial_address(listen)
        log_file: IO[bytes]
        with log_path.open("ab" if append_log else "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", plane.module],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        return PlaneProcess(plane.name, plane.module, address, log_path, process, replica, env)

    async def _wait_serving(self, plane: PlaneProcess, deadline: float) -> None:
        serving = int(health_pb2.HealthCheckResponse.SERVING)
        while True:
            if not plane.running():
                raise StackError(
                    f"plane {plane.name!r} exited with code {plane.process.returncode} "
                    f"while starting; last lines of {plane.log_path}:\n{_tail(plane.log_path)}"
                )
            if any(p.name == plane.name and p.health == "http" for p in self.config.stack.planes):
                if await check_http_health(plane.address):
                    return
            elif await check_health(plane.address, tls=self.tls_files()) == serving:
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"plane {plane.name!r} did not report SERVING on {plane.address} within "
                    f"stack.start_timeout_s={self.config.stack.start_timeout_s}; "
                    f"see {plane.log_path}"
                )
            await asyncio.sleep(self.config.stack.health_poll_interval_s)

    # ---- stop ----

    def _stop_plane(self, plane: PlaneProcess) -> None:
        process = plane.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.config.stack.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s did not stop within %ss: SIGKILL",
                    plane.name,
                    self.config.stack.stop_timeout_s,
                )
                _signal_group(plane.pid, signal.SIGKILL)
                process.wait()
        _reap_group(plane.pid)


def _refuse_busy(plane: str, key: str, listen: str) -> None:
    """StackError naming the process that holds a port the plane needs."""
    bind_host, port = host_port(listen)
    address = dial_address(listen)
    if port == 0:  # the system picks a free port when it binds
        return
    if not port_open(*host_port(address)) and not listening_inodes(bind_host, port):
        return
    env_name = "TRIPLANE__" + "__".join(part.upper() for part in key.split("."))
    raise StackError(
        f"plane {plane!r}: {address} is already in use, {describe_holders(bind_host, port)} "
        f"(another stack running?); stop it, or set {key} (e.g. {env_name}=127.0.0.1:<port>)"
    )


def _signal_group(pgid: int, sig: int) -> bool:
    """Signals a process group (0: only checks it); False when it has no member left."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _reap_group(pgid: int) -> None:
    """Processes a plane started (a model server, say) and left behind when it
    exited are stopped too: SIGTERM, then SIGKILL."""
    if not _signal_group(pgid, signal.SIGTERM):
        return
    deadline = time.monotonic() + GROUP_REAP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _signal_group(pgid, 0):
            return
        time.sleep(0.05)
    _signal_group(pgid, signal.SIGKILL)


def describe(stack: Stack) -> str:
    """A few lines saying what runs where and where the logs are."""
    lines = [f"state dir   {stack.state_dir}", f"nats        {stack.nats_url}"]
    if stack.nats_log_path is not None:
        lines.append(f"nats log    {stack.nats_log_path}")
    if stack._nats_cluster is not None:
        for node in stack._nats_cluster.nodes:
            lines.append(f"nats {node.name:<6} {node.url}  log {node.log_path}")
        lines.append("nats        JetStream cluster of 3, R3 streams, sync_interval: always")
    for plane in stack.processes:
        name = f"{plane.name}[{plane.replica}]" if stack.replicated else plane.name
        lines.append(f"{name:<11} {plane.address}  pid {plane.pid}  log {plane.log_path}")
    for plane_name, target in stack.gateway_targets.items():
        lines.append(f"gateway -> {plane_name:<6} {target} (round_robin)")
    if stack.config.gateway.admin_listen and "gateway" in stack.addresses:
        lines.append(f"gateway adm {stack.config.gateway.admin_listen}  (certificates only)")
    if "console" in stack.addresses:
        lines.append(
            f"console     http://{stack.addresses['console']}/  "
            "(accounts: triplane console add-user NAME --role reviewer)"
        )
    if stack.skipped:
        lines.append(f"not started (no __main__.py yet): {', '.join(stack.skipped)}")
    return "\n".join(lines)


async def _first(*awaitables: Awaitable[Any]) -> set[asyncio.Future[Any]]:
    """Waits until the first of several tasks finishes; returns the done ones."""
    tasks: set[asyncio.Future[Any]] = {asyncio.ensure_future(a) for a in awaitables}
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    return done


async def run_foreground(
    config: Config,
    planes: list[str] | None = None,
    replicas: int = 1,
    postgres_admin_dsn: str = fleet.DEFAULT_PG_ADMIN_DSN,
    nats_cluster: bool = False,
) -> int:
    """`triplane up`: the stack until SIGINT/SIGTERM (0) or until a plane dies (1)."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_requested.set)
    stack = Stack(
        config,
        planes=planes,
        replicas=replicas,
        postgres_admin_dsn=postgres_admin_dsn,
        nats_cluster=nats_cluster,
        optional=True,
    )
    stop_wait = asyncio.create_task(stop_requested.wait())
    start = asyncio.create_task(stack.start())
    if start not in await _first(start, stop_wait):
        # Stopped while starting: start() stops what it started when cancelled.
        start.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        return 0
    start.result()
    print(f"triplane stack is up (Ctrl-C to stop)\n{describe(stack)}", flush=True)
    exited = asyncio.create_task(stack.wait_for_exit())
    code = 0
    if exited in await _first(exited, stop_wait):
        plane = exited.result()
        print(
            f"plane {plane.name!r} exited with code {plane.process.returncode}; "
            f"last lines of {plane.log_path}:\n{_tail(plane.log_path)}",
            file=sys.stderr,
            flush=True,
        )
        code = 1
    exited.cancel()
    stop_wait.cancel()
    print("stopping the stack ...", flush=True)
    await stack.stop()
    print(f"stopped; logs are in {stack.logs_dir}", flush=True)
    return code
