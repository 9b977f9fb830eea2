"""`make bench ONLY=gateway`: the gateway's two product flows through its
public gRPC API, every plane in its own process (money, policy, AI with a real
Triton, the gateway), against the Python gRPC ceiling measured in the same run
(a trivial grpc.aio echo server, also in its own process).

Three stacks run side by side, seeded alike (one tokenization key, so each
customer's token, holdout and experiment arm are the same in all three):

- `on`, the stack as shipped: mutual TLS between the planes (runtime.tls), TLS
  from the partner to the gateway, an API key on every call (gateway.auth,
  with its rate limiter checked on every call, its limit set out of reach);
- `off`: `runtime.tls: off` and `gateway.auth.enabled: false` (plaintext
  everywhere, no credential asked, the request's tenant_id believed, no rate
  limiter: it belongs to the credential). The supported switches, for
  debugging and for this baseline only;
- `control`: a second `off`. Control / off is what the machine's noise alone
  makes of a ratio; read on / off against it.

Each flow is measured on the three in turns (short windows, the order
rotating each round), so all see the same spells of a busy, shared machine,
and the windows of each stack are pooled. Unsuffixed figures
(`authorize_per_s`, `authorize_latency_ms_p99`, ...) are the shipped stack's;
`<flow>_noauth_*` the baseline's, `<flow>_control_*` the control's;
`<flow>_auth_*_ratio` are on / off and `<flow>_control_*_ratio` control / off:

- `<flow>_auth_cpu_overhead_ratio`: CPU per request of the stack's processes
  (gateway, money, policy, AI with its Triton, NATS; each process and its
  descendants, from /proc), on / off; `_low`/`_high`: the least and most of
  one round's two windows. The load generator (`client`, this process) is
  reported apart and left out: it is the partner's CPU;
- `<flow>_auth_p99_ratio` (and `_p50_`): open loop at one rate for all
  stacks, half the shipped stack's measured maximum, so all carry the same
  traffic and the ratio is what auth and TLS add to a caller's wait.

What TLS itself costs a call is measured apart, on the echo server, in turns
with the plaintext echo: `grpc_echo_mtls_cpu_ms_per_call_*` (mutual TLS) and
`grpc_echo_mtls_peer_*` (also reading the peer's certificate from the call,
as every plane's permission check does).

Throughput: closed loop, CONCURRENCY callers for RUN_S seconds per stack.
Latency: open loop (requests start on a fixed schedule, so queueing shows)
for LATENCY_S seconds per stack, nearest-rank percentiles. A failed call is
counted (`<flow>_errors`), never retried, and left out of the latencies.

What is measured must be the money path: the authorization outcomes of every
answered call are counted (`authorize_allow_share`, `_review_`, `_hold_`,
`_deny_`, and the commonest reasons printed), and so is the share of
decisions that show an offer (`decide_offer_share`). A run whose payments are
mostly denied measures the deny path; the table says so.

Scale-out (issue 12): after those three stacks are down, two more start,
both as shipped (TLS, API keys) and both on the shared engines: every plane
on PostgreSQL (the local server, databases `tpl_bench_<mode>_<id>_<plane>`,
dropped afterwards) and the AI plane's features and pending ranks on a Redis
of the stack's own: `replicas1`, one process of every plane (`triplane up`
with its planes moved to the engines), and `replicas2`, two of every plane
(`triplane up --replicas 2`: two gateways, two money, two policy and two AI
planes, each AI plane with its own Triton; the partner's channel and the
gateways spread calls over them with round_robin). They take turns as the
three above do, and open loop runs at half of `replicas1`'s maximum for
both. Figures `<flow>_replicas1_*` and `<flow>_replicas2_*` (CPU per request
by process: every replica of a plane under the plane's name, `redis` the
stack's Redis, `postgres` the server backends serving the stack's databases
(pg_stat_activity); p50/p99; rate; errors), and
`<flow>_replicas2_cpu_ratio`: stack CPU per request, two replicas / one
(target <= 1.10), `_low`/`_high` its spread over rounds. Two cores cannot
show scale-out throughput (a second replica adds processes, not cores): the
rate is CPU-bound in both, and the table says how many cores each stack and
its load generator kept busy.

What limits the rate: the CPU each process spends per request during the
closed loop (`<flow>_cpu_ms_per_request_<process>`; `client` is the load
generator). Their sum against the machine's cores bounds the throughput
whatever the concurrency. The echo server's call is measured the same way
(`grpc_echo_cpu_ms_per_call`, server and client), so when both are CPU-bound
on the same cores, echo CPU / flow CPU is the most a flow's rate can be as a
share of the echo rate: the table prints it as the flow's ceiling.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.common import merge_results, percentile, print_table, proc_stats, tree_cpu_s
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port, port_open
from triplane.runtime.secret_files import dev_secret_path, random_key_b64
from triplane.runtime.tls import GATEWAY, MONEY_PLANE, channel_options, files_for, open_channel
from triplane_sim.demo_world import World, seed
from triplane_tools import replicas as fleet
from triplane_tools.certs import ensure_dev_certificates
from triplane_tools.partner_keys import create_partner_key
from triplane_tools.stack import Stack

TENANT = "bench"
CONCURRENCY = 32
# Per stack and flow: seconds of closed loop and of open loop, each cut into
# ROUNDS windows that alternate between the stacks.
RUN_S = float(os.environ.get("TRIPLANE_BENCH_GATEWAY_RUN_S", "12"))
LATENCY_S = float(os.environ.get("TRIPLANE_BENCH_GATEWAY_LATENCY_S", "12"))
ROUNDS = max(1, int(os.environ.get("TRIPLANE_BENCH_GATEWAY_ROUNDS", "6")))
# The open loop's windows are shorter (no ramp to wait for): a p99 is made by
# a few slow calls, and a spell of the machine's other work must fall on both
# stacks alike.
LATENCY_ROUNDS = max(1, int(os.environ.get("TRIPLANE_BENCH_GATEWAY_LATENCY_ROUNDS", "24")))
WARMUP_S = 3.0
# After each window, before the next stack's: the work a window leaves
# behind (outbox relays, the AI plane's feature pipeline, group commits) is
# done by then, counted with its own stack's CPU and not in the way of the
# next stack's calls.
SETTLE_S = 0.25
CUSTOMERS, MERCHANTS = 400, 40
ECHO_METHOD = "/bench.Echo/Echo"
RPC_TIMEOUT_S = 2.0
FLOWS = ("authorize", "decide")
# The shipped stack, the baseline without TLS and partner auth, and a second
# baseline alike in every way: what tells the machine's noise from a cost.
ON, OFF, CONTROL = "on", "off", "control"
MODES = (ON, OFF, CONTROL)
# What the ratios are held to (issue 11): at most 10% more.
RATIO_TARGET = 1.10
# The processes of a stack besides the planes, counted in its CPU.
NATS = "nats"
CLIENT = "client"
# Scale-out (issue 12): the shipped stack (TLS, API keys) on the shared
# engines, one process of every plane (`replicas1`) and two (`replicas2`),
# measured in turns with each other after the three stacks above are down.
# Each has a Redis of its own (so its CPU is the stack's) and its databases
# on the local PostgreSQL (its backends' CPU, from pg_stat_activity, is the
# stack's too).
REPLICAS1, REPLICAS2 = "replicas1", "replicas2"
REPLICA_MODES = (REPLICAS1, REPLICAS2)
REPLICA_COUNTS = {REPLICAS1: 1, REPLICAS2: 2}
REDIS = "redis"
POSTGRES = "postgres"
# Seconds each scale-out stack is watched with no call (in two windows).
IDLE_S = 6.0
PG_ADMIN_DSN = os.environ.get("TRIPLANE_BENCH_PG_ADMIN_DSN", fleet.DEFAULT_PG_ADMIN_DSN)

# argv: address, then "plain", or "mtls" / "mtls_peer" and the server's
# certificate, key and CA files (mutual TLS; mtls_peer also reads the peer's
# certificate from the call's auth context, as every plane's permission check
# does on every call).
ECHO_SERVER = """
import asyncio, sys, grpc
async def main():
    address, mode = sys.argv[1], sys.argv[2]
    peer = mode == "mtls_peer"
    async def echo(request, context):
        if peer:
            context.auth_context().get("x509_pem_cert")
        return request
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    if mode == "plain":
        server.add_insecure_port(address)
    else:
        cert, key, ca = (open(path, "rb").read() for path in sys.argv[3:6])
        server.add_secure_port(address, grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True))
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""
ECHO_VARIANTS = ("plain", "mtls", "mtls_peer")

Call = Callable[[int], Awaitable[Any]]


class Tally:
    """Failed calls by status (one message kept per status, so a run with
    errors says why), and the answers' outcomes and reasons."""

    def __init__(self) -> None:
        self.by_code: Counter[str] = Counter()
        self.example: dict[str, str] = {}
        self.outcomes: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()

    def wrap(self, call: Call) -> Call:
        async def counted(index: int) -> Any:
            try:
                response = await call(index)
            except grpc.aio.AioRpcError as error:
                name = error.code().name
                self.by_code[name] += 1
                self.example.setdefault(name, (error.details() or "")[:200])
                return None
            self._count(response)
            return response

        return counted

    def _count(self, response: Any) -> None:
        if isinstance(response, gw.AuthorizePaymentResponse):
            self.outcomes[gw.Outcome.Name(response.outcome).removeprefix("OUTCOME_").lower()] += 1
            for reason in response.reasons:
                self.reasons[reason.code] += 1
        elif isinstance(response, gw.DecideNextActionResponse):
            self.outcomes[gw.Action.Name(response.action).removeprefix("ACTION_").lower()] += 1
            for code in response.reasons:
                self.reasons[code] += 1

    @property
    def errors(self) -> int:
        return sum(self.by_code.values())

    def share(self, outcome: str) -> float:
        answered = sum(self.outcomes.values())
        return self.outcomes[outcome] / answered if answered else 0.0

    def commonest_reasons(self, count: int = 3) -> str:
        answered = sum(self.outcomes.values()) or 1
        return ", ".join(
            f"{code} {seen / answered:.0%}" for code, seen in self.reasons.most_common(count)
        )


async def closed_loop(call: Call, run_s: float, concurrency: int) -> tuple[int, float]:
    """Requests done and seconds taken, `concurrency` callers back to back."""
    done = 0
    stop_at = time.monotonic() + run_s

    async def worker(worker_id: int) -> None:
        nonlocal done
        index = worker_id
        while time.monotonic() < stop_at:
            await call(index)
            index += concurrency
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done, time.monotonic() - started


async def open_loop(
    call: Call, rate_per_s: float, run_s: float, first_index: int = 1_000_000
) -> list[float]:
    """Latencies (ms) of requests started at `rate_per_s` on a fixed schedule."""
    latencies: list[float] = []
    interval_s = 1.0 / rate_per_s
    count = int(run_s * rate_per_s)
    started = time.monotonic()

    async def one(index: int) -> None:
        begin = time.monotonic()
        if await call(first_index + index) is not None:
            latencies.append((time.monotonic() - begin) * 1000.0)

    tasks = []
    for index in range(count):
        delay = started + index * interval_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    return latencies


def rotations(modes: Sequence[str], rounds: int) -> Iterable[str]:
    """The modes in turn, `rounds` times, each round starting one further
    (on, off, control; off, control, on; ...): each comes first, in the
    middle and last as often as the others when rounds is a multiple of
    their number."""
    for round_ in range(rounds):
        shift = round_ % len(modes)
        yield from (*modes[shift:], *modes[:shift])


async def bench_echo(state_dir: Path) -> dict[str, float]:
    """The echo ceiling, and the CPU one bare call costs its server and its
    client (this process): the unit every flow's CPU is compared with. The
    same over mutual TLS, and with the peer's identity read per call: what
    TLS alone costs one hop, measured in turns with the plaintext call."""
    config = load_config(environ={}, overrides={"runtime": {"state_dir": str(state_dir)}})
    ensure_dev_certificates(state_dir, config.runtime.tls)
    server_files = files_for(config, MONEY_PLANE)
    client_files = files_for(config, GATEWAY)
    if server_files is None or client_files is None:
        raise RuntimeError("runtime.tls is on by default: the echo's certificates are missing")
    server_paths = [
        str(server_files.cert_path),
        str(server_files.key_path),
        str(server_files.ca_path),
    ]
    processes: dict[str, subprocess.Popen[bytes]] = {}
    channels: dict[str, grpc.aio.Channel] = {}
    try:
        for variant in ECHO_VARIANTS:
            address = f"127.0.0.1:{free_port()}"
            args = [sys.executable, "-c", ECHO_SERVER, address, variant]
            if variant != "plain":
                args += server_paths
            processes[variant] = subprocess.Popen(args)  # noqa: ASYNC220
            channels[variant] = open_channel(
                address, None if variant == "plain" else client_files, who="echo"
            )
        payload = b"x" * 64
        calls: dict[str, Call] = {}
        for variant, channel in channels.items():
            await asyncio.wait_for(channel.channel_ready(), 10)
            echo = channel.unary_unary(ECHO_METHOD)

            async def call(_: int, echo: Any = echo) -> Any:
                return await echo(payload, timeout=RPC_TIMEOUT_S)

            calls[variant] = call
            await closed_loop(call, 1.0, CONCURRENCY)
        totals = {variant: Window() for variant in ECHO_VARIANTS}
        for variant in rotations(ECHO_VARIANTS, ROUNDS):
            pid = processes[variant].pid
            server_before, client_before = tree_cpu_s(pid), time.process_time()
            done, elapsed_s = await closed_loop(calls[variant], RUN_S / ROUNDS, CONCURRENCY)
            spent = {"server": tree_cpu_s(pid) - server_before}
            totals[variant].add(
                done, elapsed_s, {**spent, CLIENT: time.process_time() - client_before}
            )
        results: dict[str, float] = {}
        for variant, window in totals.items():
            name = "grpc_echo" if variant == "plain" else f"grpc_echo_{variant}"
            results[f"{name}_per_s"] = window.requests / window.elapsed_s
            results[f"{name}_cpu_ms_per_call_server"] = window.cpu_ms_per_request("server")
            results[f"{name}_cpu_ms_per_call_client"] = window.cpu_ms_per_request(CLIENT)
        return results
    finally:
        for channel in channels.values():
            await channel.close()
        for process in processes.values():
            process.terminate()
            process.wait(10)


# A uuid4's hex in letters a-p. The hex itself now and then holds a run of 13
# or more digits that passes for a card number (Luhn, a card prefix: 0.12% of
# uuid4().hex keys, 0.16% of str(uuid4())), which the gateway refuses as
# INVALID_ARGUMENT PII_IN_IDENTIFIER; they would be counted as failed calls.
_HEX_TO_LETTERS = str.maketrans("0123456789abcdef", "abcdefghijklmnop")


def idempotency_key() -> str:
    return uuid.uuid4().hex.translate(_HEX_TO_LETTERS)


# `authorization: Bearer <the tenant's API key>`, sent with every call.
Metadata = tuple[tuple[str, str], ...]


def authorize_call(stub: Any, world: World, metadata: Metadata = ()) -> Call:
    async def call(index: int) -> Any:
        customer = world.customers[index % len(world.customers)]
        merchant = world.merchants[index % len(world.merchants)]
        return await stub.AuthorizePayment(
            gw.AuthorizePaymentRequest(
                tenant_id=TENANT,
                idempotency_key=idempotency_key(),
                account_id=customer.account_id,
                credit_account_id=merchant.merchant_id,
                amount=types_pb2.Money(amount_minor=500 + index % 2000, currency="USD"),
                kind=gw.PAYMENT_KIND_PURCHASE,
                device_id=customer.devices[0],
                merchant_id=merchant.merchant_id,
                merchant_category=merchant.category,
                channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
                # The policy plane reads KYC facts from the customer's profile
                # (seeded), not from what a caller declares.
                customer=gw.Customer(customer_id=world.customer_id(customer)),
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=metadata,
        )

    return call


def decide_call(stub: Any, world: World, metadata: Metadata = ()) -> Call:
    async def call(index: int) -> Any:
        customer = world.customers[index % len(world.customers)]
        return await stub.DecideNextAction(
            gw.DecideNextActionRequest(
                tenant_id=TENANT,
                idempotency_key=idempotency_key(),
                customer_id=world.customer_id(customer),
                account_id=customer.account_id,
                surface="checkout",
                region="US",
                kyc_tier=2,
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=metadata,
        )

    return call


def stack_config(
    state_dir: Path,
    mode: str,
    tokenization_key: Path,
    extra: dict[str, dict[str, Any]] | None = None,
) -> Config:
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir), "log_level": "WARNING"},
        "money": {"listen": f"127.0.0.1:{free_port()}"},
        "ai": {"listen": f"127.0.0.1:{free_port()}"},
        "gateway": {
            "listen": f"127.0.0.1:{free_port()}",
            # One key for both stacks: a customer's token, and so the
            # holdout and experiment arm hashed from it, is the same in
            # both, and so is the work each decision does.
            "pii": {"tokenization_key_path": str(tokenization_key)},
            # Checked on every call as in production, never reached: the
            # benchmark measures the gateway, not the partner's limit.
            "rate_limit": {"rate_per_s": 1_000_000, "burst": 1_000_000},
        },
        # The same: a synthetic customer gets dozens of decisions a minute
        # here, and past the shipped caps (3 contacts a day) nearly every
        # decision would be NOTHING_ELIGIBLE, which skips ranking and the
        # contact record: decide would not measure the decision path.
        "policy": {
            "listen": f"127.0.0.1:{free_port()}",
            "consent": {
                "max_contacts_per_day": 1_000_000,
                "max_contacts_per_channel_per_day": 1_000_000,
            },
        },
        "stack": {"start_timeout_s": 150.0},
    }
    if mode not in (ON, *REPLICA_MODES):
        overrides["runtime"]["tls"] = {"enabled": False}
        overrides["gateway"]["auth"] = {"enabled": False}
    for section, values in (extra or {}).items():
        overrides.setdefault(section, {}).update(values)
    return load_config(environ={}, overrides=overrides)


def nats_pid(stack: Stack) -> int | None:
    """The stack's own nats-server: the child of this process serving its
    state directory's JetStream store."""
    store = str(stack.state_dir / "nats")
    for pid, stat in proc_stats().items():
        if stat.ppid != os.getpid():
            continue
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if store.encode() in args:
            return pid
    return None


@dataclass
class Window:
    """What one stack spent on one flow, over its measured windows (pooled),
    and each window's stack CPU per request (for the spread of the ratio)."""

    requests: int = 0
    elapsed_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    stack_ms_per_request: list[float] = field(default_factory=list)

    def add(self, requests: int, elapsed_s: float, cpu_s: dict[str, float]) -> None:
        self.requests += requests
        self.elapsed_s += elapsed_s
        for name, spent in cpu_s.items():
            self.cpu_s[name] = self.cpu_s.get(name, 0.0) + spent
        stack_s = sum(spent for name, spent in cpu_s.items() if name != CLIENT)
        self.stack_ms_per_request.append(stack_s * 1000.0 / max(1, requests))

    def cpu_ms_per_request(self, name: str) -> float:
        return self.cpu_s.get(name, 0.0) * 1000.0 / max(1, self.requests)

    def stack_cpu_ms_per_request(self) -> float:
        """Every process of the stack, the load generator left out."""
        spent = sum(s for name, s in self.cpu_s.items() if name != CLIENT)
        return spent * 1000.0 / max(1, self.requests)


@dataclass
class Arm:
    """One running stack, seeded, and a partner's channel to its gateway
    (round_robin over every gateway replica where it runs several)."""

    mode: str
    stack: Stack
    world: World
    stub: Any
    metadata: Metadata
    # The processes counted in the stack's CPU, by name (every replica of a
    # plane under the plane's name), each with its descendants (the AI
    # plane's Triton).
    pids: dict[str, list[int]]
    # Set on the shared engines: the prefix of the stack's PostgreSQL
    # databases, whose server backends are counted as POSTGRES.
    database_prefix: str = ""

    def call(self, flow: str) -> Call:
        if flow == "authorize":
            return authorize_call(self.stub, self.world, self.metadata)
        return decide_call(self.stub, self.world, self.metadata)

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far, by name; each PostgreSQL backend apart
        (`postgres:<pid>`), since backends come and go (cpu_delta)."""
        backends = postgres_backends(self.database_prefix) if self.database_prefix else []
        stats = proc_stats()
        spent = {
            name: sum(tree_cpu_s(pid, stats) for pid in pids) for name, pids in self.pids.items()
        }
        if self.database_prefix:
            spent[POSTGRES] = 0.0
        for pid in backends:
            if pid in stats:
                spent[f"{POSTGRES}:{pid}"] = stats[pid].cpu_s
        spent[CLIENT] = time.process_time()
        return spent


def postgres_backends(prefix: str) -> list[int]:
    """The server processes serving the stack's databases (`<prefix>_<plane>`)."""
    pattern = prefix.replace("_", "\\_") + "\\_%"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname LIKE %s", (pattern,)
        ).fetchall()
    return [int(row[0]) for row in rows]


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU spent between two Arm.cpu_s snapshots, by name. A backend seen
    only after started during the window (all its CPU counts); one seen only
    before ended during it (what it spent since is lost: the planes' pools
    keep their connections, so none should)."""
    spent: dict[str, float] = {}
    for key, value in after.items():
        name = key.split(":", 1)[0]
        spent[name] = spent.get(name, 0.0) + value - before.get(key, 0.0)
    return spent


def bench_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}


async def open_arm(
    exits: contextlib.AsyncExitStack, state_dir: Path, mode: str, tokenization_key: Path
) -> Arm:
    config = stack_config(state_dir, mode, tokenization_key)
    stack = await exits.enter_async_context(Stack(config, environ=bench_environ()))
    return await seeded_arm(exits, mode, stack)


async def seeded_arm(
    exits: contextlib.AsyncExitStack,
    mode: str,
    stack: Stack,
    extra_pids: dict[str, list[int]] | None = None,
    database_prefix: str = "",
) -> Arm:
    config = stack.config
    world = await seed(
        stack.addresses["money"],
        stack.addresses["policy"],
        TENANT,
        CUSTOMERS,
        MERCHANTS,
        tls=stack.tls_files(),
    )
    metadata: Metadata = ()
    if config.gateway.auth.enabled:
        api_key = await create_partner_key(
            config, stack.addresses["gateway"], TENANT, state_dir=stack.state_dir
        )
        metadata = (("authorization", f"Bearer {api_key}"),)
    # As a partner: TLS to the gateway (the dev CA), no client certificate;
    # plaintext with runtime.tls off. Over several gateway replicas, each
    # call to the next (round_robin over the address list).
    gateways = stack.replica_addresses["gateway"]
    if len(gateways) == 1:
        channel = open_channel(gateways[0], stack.partner_tls())
    else:
        target = "ipv4:" + ",".join(gateways)
        options = channel_options(load_balancing="round_robin")
        channel = open_channel(target, stack.partner_tls(), options)
    channel = await exits.enter_async_context(channel)
    pids: dict[str, list[int]] = {}
    for process in stack.processes:
        pids.setdefault(process.name, []).append(process.pid)
    found = nats_pid(stack)
    if found is not None:
        pids[NATS] = [found]
    pids.update(extra_pids or {})
    return Arm(
        mode,
        stack,
        world,
        gateway_pb2_grpc.GatewayServiceStub(channel),
        metadata,
        pids,
        database_prefix,
    )


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A Redis of the stack's own (no persistence), so its CPU is counted
    with the stack's: the machine's shared Redis serves others too."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the scale-out stacks need redis-server on PATH (a Redis of their own)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "no", "--dir", str(directory)]
    with (directory / "redis.log").open("wb") as log_file:
        process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 10
    while not port_open("127.0.0.1", port):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start; see {directory / 'redis.log'}")
        time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


async def open_replicated_arm(
    exits: contextlib.AsyncExitStack, root: Path, mode: str, tokenization_key: Path
) -> Arm:
    """The shipped stack on PostgreSQL and Redis with REPLICA_COUNTS[mode]
    processes of every plane (`triplane up --replicas N`); its Redis and
    databases go with it."""
    state_dir = root / mode
    redis, redis_url = start_redis(state_dir / "redis")
    exits.callback(stop_process, redis)
    prefix = f"tpl_bench_{mode}_{uuid.uuid4().hex[:8]}"
    # Registered before the stack: run after it stopped.
    exits.callback(fleet.drop_databases, PG_ADMIN_DSN, prefix)
    config = stack_config(
        state_dir,
        mode,
        tokenization_key,
        {"ai": {"features": {"redis_url": redis_url}}, "stack": {"start_timeout_s": 300.0}},
    )
    replicas = REPLICA_COUNTS[mode]
    if replicas == 1:
        # The stack moves its planes to the shared engines only when it runs
        # more than one replica; the one-replica figure is taken on the same
        # engines, so the comparison is of replicas alone.
        config = await asyncio.to_thread(
            fleet.shared_engines_config,
            config,
            admin_dsn=PG_ADMIN_DSN,
            prefix=prefix,
            ai_replicas=1,
        )
    stack = Stack(
        config,
        environ=bench_environ(),
        replicas=replicas,
        postgres_admin_dsn=PG_ADMIN_DSN,
        database_prefix=prefix,
    )
    await exits.enter_async_context(stack)
    return await seeded_arm(exits, mode, stack, {REDIS: [redis.pid]}, prefix)


@dataclass
class Measured:
    """One flow on several stacks in turns."""

    windows: dict[str, Window]
    tallies: dict[str, Tally]
    rates: dict[str, float]
    latencies: dict[str, list[float]]
    latency_rate: float


async def measure(flow: str, arms: dict[str, Arm], modes: Sequence[str]) -> Measured:
    """Closed loop on each stack in turns, then open loop at half the first
    mode's closed-loop rate, the same for all."""
    for mode in modes:  # warm-up, not counted
        await closed_loop(Tally().wrap(arms[mode].call(flow)), WARMUP_S, CONCURRENCY)
    tallies = {mode: Tally() for mode in modes}
    calls = {mode: tallies[mode].wrap(arms[mode].call(flow)) for mode in modes}
    windows = {mode: Window() for mode in modes}
    for mode in rotations(modes, ROUNDS):
        arm = arms[mode]
        before = arm.cpu_s()
        done, elapsed_s = await closed_loop(calls[mode], RUN_S / ROUNDS, CONCURRENCY)
        await asyncio.sleep(SETTLE_S)
        windows[mode].add(done, elapsed_s, cpu_delta(before, arm.cpu_s()))
    rates = {mode: windows[mode].requests / windows[mode].elapsed_s for mode in modes}
    # Every stack carries the same traffic: half the first one's maximum.
    latency_rate = rates[modes[0]] / 2
    latencies: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_, mode in enumerate(rotations(modes, LATENCY_ROUNDS)):
        latencies[mode] += await open_loop(
            calls[mode], latency_rate, LATENCY_S / LATENCY_ROUNDS, 1_000_000 * (1 + round_)
        )
        await asyncio.sleep(SETTLE_S)
    return Measured(windows, tallies, rates, latencies, latency_rate)


def mode_figures(flow: str, prefix: str, measured: Measured, mode: str) -> dict[str, float]:
    """One stack's figures of one flow, under `prefix`."""
    window, tally = measured.windows[mode], measured.tallies[mode]
    latencies = measured.latencies[mode]
    results: dict[str, float] = {}
    for name in window.cpu_s:
        results[f"{prefix}_cpu_ms_per_request_{name}"] = window.cpu_ms_per_request(name)
    results[f"{prefix}_cpu_ms_per_request_stack"] = window.stack_cpu_ms_per_request()
    results[f"{prefix}_cpu_ms_per_request_total"] = sum(
        window.cpu_ms_per_request(name) for name in window.cpu_s
    )
    results[f"{prefix}_per_s"] = measured.rates[mode]
    results[f"{prefix}_latency_ms_p50"] = percentile(latencies, 50)
    results[f"{prefix}_latency_ms_p99"] = percentile(latencies, 99)
    results[f"{prefix}_latency_samples"] = float(len(latencies))
    results[f"{prefix}_errors"] = float(tally.errors)
    for outcome in ("allow", "review", "hold", "deny") if flow == "authorize" else ():
        results[f"{prefix}_{outcome}_share"] = tally.share(outcome)
    if flow == "decide":
        results[f"{prefix}_offer_share"] = tally.share("show_offer")
    if tally.errors:
        print(
            f"{flow} ({mode}): {tally.errors} failed calls {dict(tally.by_code)}; "
            f"e.g. {tally.example}",
            flush=True,
        )
    print(
        f"{flow} ({mode}): outcomes {dict(tally.outcomes)}; "
        f"commonest reasons: {tally.commonest_reasons()}",
        flush=True,
    )
    return results


def paired_ratios(measured: Measured, top: str, bottom: str) -> list[float]:
    """Stack CPU per request of `top` over `bottom`, round by round (each
    round's two windows are adjacent): how much the machine's noise moves
    the ratio."""
    return [
        a / b
        for a, b in zip(
            measured.windows[top].stack_ms_per_request,
            measured.windows[bottom].stack_ms_per_request,
            strict=True,
        )
        if b > 0
    ]


async def bench_flow(flow: str, arms: dict[str, Arm]) -> dict[str, float]:
    """One flow on every stack in turns; its figures."""
    measured = await measure(flow, arms, MODES)
    results: dict[str, float] = {}
    for mode in MODES:
        prefix = {ON: flow, OFF: f"{flow}_noauth", CONTROL: f"{flow}_control"}[mode]
        results.update(mode_figures(flow, prefix, measured, mode))
    results[f"{flow}_latency_rate_per_s"] = measured.latency_rate
    results[f"{flow}_auth_cpu_overhead_ratio"] = (
        results[f"{flow}_cpu_ms_per_request_stack"]
        / results[f"{flow}_noauth_cpu_ms_per_request_stack"]
    )
    for figure in ("p50", "p99"):
        results[f"{flow}_auth_{figure}_ratio"] = (
            results[f"{flow}_latency_ms_{figure}"] / results[f"{flow}_noauth_latency_ms_{figure}"]
        )
    results[f"{flow}_auth_throughput_ratio"] = measured.rates[ON] / measured.rates[OFF]
    # The control against the baseline: two stacks alike, so any distance
    # from 1 is the machine's noise, the yardstick of the ratios above.
    results[f"{flow}_control_cpu_ratio"] = (
        results[f"{flow}_control_cpu_ms_per_request_stack"]
        / results[f"{flow}_noauth_cpu_ms_per_request_stack"]
    )
    for figure in ("p50", "p99"):
        results[f"{flow}_control_{figure}_ratio"] = (
            results[f"{flow}_control_latency_ms_{figure}"]
            / results[f"{flow}_noauth_latency_ms_{figure}"]
        )
    paired = paired_ratios(measured, ON, OFF)
    if paired:
        results[f"{flow}_auth_cpu_overhead_ratio_low"] = min(paired)
        results[f"{flow}_auth_cpu_overhead_ratio_high"] = max(paired)
    return results


async def bench_replicas_flow(flow: str, arms: dict[str, Arm]) -> dict[str, float]:
    """One flow on one and on two replicas of every plane (shared engines),
    in turns; `<flow>_replicas1_*`, `<flow>_replicas2_*` and their ratios."""
    measured = await measure(flow, arms, REPLICA_MODES)
    results: dict[str, float] = {}
    for mode in REPLICA_MODES:
        results.update(mode_figures(flow, f"{flow}_{mode}", measured, mode))
    results[f"{flow}_replicas_latency_rate_per_s"] = measured.latency_rate
    one, two = f"{flow}_{REPLICAS1}", f"{flow}_{REPLICAS2}"
    results[f"{flow}_replicas2_cpu_ratio"] = (
        results[f"{two}_cpu_ms_per_request_stack"] / results[f"{one}_cpu_ms_per_request_stack"]
    )
    results[f"{flow}_replicas2_throughput_ratio"] = (
        measured.rates[REPLICAS2] / measured.rates[REPLICAS1]
    )
    for figure in ("p50", "p99"):
        results[f"{flow}_replicas2_{figure}_ratio"] = (
            results[f"{two}_latency_ms_{figure}"] / results[f"{one}_latency_ms_{figure}"]
        )
    paired = paired_ratios(measured, REPLICAS2, REPLICAS1)
    if paired:
        results[f"{flow}_replicas2_cpu_ratio_low"] = min(paired)
        results[f"{flow}_replicas2_cpu_ratio_high"] = max(paired)
    return results


async def bench_flows(root: Path) -> dict[str, float]:
    async with contextlib.AsyncExitStack() as exits:
        key = dev_secret_path(root, "gateway-pii.key", random_key_b64)
        arms = {mode: await open_arm(exits, root / mode, mode, key) for mode in MODES}
        results: dict[str, float] = {}
        for flow in FLOWS:
            results.update(await bench_flow(flow, arms))
        return results


async def bench_replicas(root: Path) -> dict[str, float]:
    """The scale-out stacks, after the others are down (one more Triton each
    would crowd the machine's memory and its two cores)."""
    async with contextlib.AsyncExitStack() as exits:
        key = dev_secret_path(root, "gateway-pii.key", random_key_b64)
        arms = {}
        for mode in REPLICA_MODES:
            started = time.monotonic()
            arms[mode] = await open_replicated_arm(exits, root, mode, key)
            counts = {name: len(pids) for name, pids in arms[mode].pids.items()}
            print(f"{mode}: up in {time.monotonic() - started:.0f} s: {counts}", flush=True)
        results: dict[str, float] = {}
        # What each stack burns with no call at all (relays polling their
        # outboxes, sweepers, health checks): a cost per process per second,
        # which a second replica of every plane doubles; per request it is
        # this over the rate.
        await asyncio.sleep(SETTLE_S * 8)
        for mode in rotations(REPLICA_MODES, 2):
            arm = arms[mode]
            before = arm.cpu_s()
            await asyncio.sleep(IDLE_S / 2)
            for name, spent in cpu_delta(before, arm.cpu_s()).items():
                figure = f"{mode}_idle_cpu_ms_per_s_{name}"
                results[figure] = results.get(figure, 0.0) + spent * 1000.0 / IDLE_S
        for mode in REPLICA_MODES:
            results[f"{mode}_idle_cpu_ms_per_s"] = sum(
                value
                for figure, value in results.items()
                if figure.startswith(f"{mode}_idle_cpu_ms_per_s_") and not figure.endswith(CLIENT)
            )
        for flow in FLOWS:
            results.update(await bench_replicas_flow(flow, arms))
        return results


def ratio_note(flows: dict[str, float], flow: str, what: str) -> str:
    ratio = flows[f"{flow}_auth_{what}_ratio"]
    verdict = "ok" if ratio <= RATIO_TARGET else "MISSED"
    if what == "cpu_overhead":
        on = flows[f"{flow}_cpu_ms_per_request_stack"]
        off = flows[f"{flow}_noauth_cpu_ms_per_request_stack"]
        low = flows.get(f"{flow}_auth_cpu_overhead_ratio_low", math.nan)
        high = flows.get(f"{flow}_auth_cpu_overhead_ratio_high", math.nan)
        control = flows[f"{flow}_control_cpu_ratio"]
        detail = (
            f"stack CPU/request {on:.2f} ms on / {off:.2f} ms off (rounds {low:.2f}-{high:.2f}); "
            f"control {control:.2f}"
        )
    else:
        on = flows[f"{flow}_latency_ms_{what}"]
        off = flows[f"{flow}_noauth_latency_ms_{what}"]
        rate = flows[f"{flow}_latency_rate_per_s"]
        control = flows[f"{flow}_control_{what}_ratio"]
        detail = (
            f"{on:.1f} ms on / {off:.1f} ms off at {rate:,.0f}/s "
            f"({flows[f'{flow}_latency_samples']:.0f} calls each); control {control:.2f}"
        )
    target = f"<= {RATIO_TARGET:.2f} {verdict}: " if what != "p50" else ""
    return target + detail


def share_note(flows: dict[str, float], key: str) -> str:
    off = flows.get(key.replace("_", "_noauth_", 1))
    return f"auth off: {off:.1%}" if off is not None else ""


def echo_row(echo: dict[str, float], variant: str) -> tuple[str, object, str]:
    name = "grpc_echo" if variant == "plain" else f"grpc_echo_{variant}"
    server = echo[f"{name}_cpu_ms_per_call_server"]
    client = echo[f"{name}_cpu_ms_per_call_client"]
    note = f"server {server:.3f} + client {client:.3f}"
    if variant == "plain":
        note += ": one bare call"
    else:
        plain = echo["grpc_echo_cpu_ms_per_call_server"] + echo["grpc_echo_cpu_ms_per_call_client"]
        note += f"; {(server + client - plain) * 1000.0:+.0f} us a call against plaintext"
        if variant == "mtls_peer":
            note += " (and the peer's certificate read)"
    return (f"{name}_cpu_ms_per_call", server + client, note)


def replica_rows(flows: dict[str, float], scale: dict[str, float]) -> list[tuple[str, object, str]]:
    """The scale-out table: 2 replicas beside 1, each with what limits it."""
    cores = os.cpu_count() or 1
    rows: list[tuple[str, object, str]] = []
    for mode in REPLICA_MODES:
        if f"{mode}_idle_cpu_ms_per_s" not in scale:
            continue
        parts = sorted(
            (
                (key.removeprefix(f"{mode}_idle_cpu_ms_per_s_"), value)
                for key, value in scale.items()
                if key.startswith(f"{mode}_idle_cpu_ms_per_s_")
            ),
            key=lambda part: -part[1],
        )
        rows.append(
            (
                f"{mode}_idle_cpu_ms_per_s",
                scale[f"{mode}_idle_cpu_ms_per_s"],
                "no calls: "
                + ", ".join(f"{name} {value:.0f}" for name, value in parts[:4])
                + " (outbox relays polling, sweepers); limited by their poll intervals",
            )
        )
    for flow in FLOWS:
        one, two = f"{flow}_{REPLICAS1}", f"{flow}_{REPLICAS2}"
        ratio = scale[f"{flow}_replicas2_cpu_ratio"]
        low = scale.get(f"{flow}_replicas2_cpu_ratio_low", math.nan)
        high = scale.get(f"{flow}_replicas2_cpu_ratio_high", math.nan)
        verdict = "ok" if ratio <= RATIO_TARGET else "MISSED"
        rows.append(
            (
                f"{flow}_cpu_ms_per_request_total",
                flows[f"{flow}_cpu_ms_per_request_total"],
                "1 replica, embedded SQLite + in-process features (the table above)",
            )
        )
        for key, count in ((one, 1), (two, 2)):
            rate = scale[f"{key}_per_s"]
            busy = scale[f"{key}_cpu_ms_per_request_total"] * rate / 1000.0
            rows.append(
                (
                    f"{key}_cpu_ms_per_request_total",
                    scale[f"{key}_cpu_ms_per_request_total"],
                    f"{count} of every plane, PostgreSQL + Redis, every process and the client",
                )
            )
            rows.append(
                (
                    f"{key}_per_s",
                    rate,
                    f"closed loop, {CONCURRENCY} callers; limited by CPU: {busy:.2f} of "
                    f"{cores} shared cores busy with this stack and its client",
                )
            )
        names = sorted(
            {
                key.removeprefix(f"{two}_cpu_ms_per_request_")
                for key in scale
                if key.startswith(f"{two}_cpu_ms_per_request_")
            }
            - {"stack", "total"}
        )
        for name in names:
            mine = scale[f"{two}_cpu_ms_per_request_{name}"]
            theirs = scale.get(f"{one}_cpu_ms_per_request_{name}", math.nan)
            rows.append(
                (
                    f"{two}_cpu_ms_per_request_{name}",
                    mine,
                    f"1 replica {theirs:.2f}"
                    + (f" ({mine / theirs - 1:+.0%})" if theirs else "")
                    + (" (load generator)" if name == CLIENT else ""),
                )
            )
        # The idle cost's share of each request at the closed loop's rates.
        idle_ms = {
            mode: scale.get(f"{mode}_idle_cpu_ms_per_s", math.nan) / scale[f"{flow}_{mode}_per_s"]
            for mode in REPLICA_MODES
        }
        rows.append(
            (
                f"{flow}_replicas2_cpu_ratio",
                ratio,
                f"<= {RATIO_TARGET:.2f} {verdict}: stack CPU/request "
                f"{scale[f'{two}_cpu_ms_per_request_stack']:.2f} ms 2 replicas / "
                f"{scale[f'{one}_cpu_ms_per_request_stack']:.2f} ms 1 (rounds "
                f"{low:.2f}-{high:.2f}); of which idle polling at this rate "
                f"{idle_ms[REPLICAS2]:.2f} / {idle_ms[REPLICAS1]:.2f} ms; limited by the "
                "per-process fixed costs, halved batches per replica and the shared cores",
            )
        )
        rate = scale[f"{flow}_replicas_latency_rate_per_s"]
        samples = scale[f"{two}_latency_samples"]
        for figure in ("p50", "p99"):
            rows.append(
                (
                    f"{two}_latency_ms_{figure}",
                    scale[f"{two}_latency_ms_{figure}"],
                    f"1 replica {scale[f'{one}_latency_ms_{figure}']:.1f} ms; open loop at "
                    f"{rate:,.0f}/s (half the 1-replica maximum, {samples:.0f} calls)"
                    + (
                        "; limited by queueing for the shared cores"
                        if figure == "p99"
                        else "; the hops' CPU"
                    ),
                )
            )
        rows.append(
            (
                f"{two}_errors",
                scale[f"{two}_errors"],
                f"failed calls; 1 replica {scale[f'{one}_errors']:.0f}",
            )
        )
        if flow == "authorize":
            rows.append(
                (
                    f"{two}_allow_share",
                    scale[f"{two}_allow_share"],
                    f"1 replica {scale[f'{one}_allow_share']:.1%}",
                )
            )
    return rows


def main() -> None:
    scale: dict[str, float] = {}
    scale_failed = ""
    with tempfile.TemporaryDirectory(prefix="triplane-bench-gw-") as tmp:
        echo = asyncio.run(bench_echo(Path(tmp) / "echo"))
        flows = asyncio.run(bench_flows(Path(tmp)))
        try:
            scale = asyncio.run(bench_replicas(Path(tmp) / "replicas"))
        except Exception as error:
            # The figures above still count; the run fails at the end.
            traceback.print_exc()
            scale_failed = f"{type(error).__name__}: {error}"[:300]
    echo_per_s = echo["grpc_echo_per_s"]
    echo_cpu_ms = (
        echo["grpc_echo_cpu_ms_per_call_server"] + echo["grpc_echo_cpu_ms_per_call_client"]
    )
    figures: dict[str, float] = {**echo, **flows, **scale}
    merge_results(figures)
    processes = sorted(
        {
            key.removeprefix("authorize_cpu_ms_per_request_")
            for key in flows
            if key.startswith("authorize_cpu_ms_per_request_")
        }
        - {"stack", "total"}
    )
    allow = flows["authorize_allow_share"]
    print_table(
        "gateway",
        [
            ("grpc_echo_per_s", echo_per_s, "the Python gRPC ceiling, same run"),
            (
                "authorize_per_s",
                flows["authorize_per_s"],
                f">= 0.25 x echo = {0.25 * echo_per_s:,.0f}; "
                f"auth off {flows['authorize_noauth_per_s']:,.0f}",
            ),
            ("authorize_latency_ms_p50", flows["authorize_latency_ms_p50"], "at half max rate"),
            ("authorize_latency_ms_p99", flows["authorize_latency_ms_p99"], "<= 15 ms"),
            (
                "decide_per_s",
                flows["decide_per_s"],
                f">= 0.3 x echo = {0.3 * echo_per_s:,.0f}; "
                f"auth off {flows['decide_noauth_per_s']:,.0f}",
            ),
            ("decide_latency_ms_p50", flows["decide_latency_ms_p50"], "at half max rate"),
            ("decide_latency_ms_p99", flows["decide_latency_ms_p99"], "<= 10 ms"),
            *(
                (
                    f"authorize_{outcome}_share",
                    flows[f"authorize_{outcome}_share"],
                    share_note(flows, f"authorize_{outcome}_share"),
                )
                for outcome in ("allow", "review", "hold", "deny")
            ),
            (
                "decide_offer_share",
                flows["decide_offer_share"],
                share_note(flows, "decide_offer_share"),
            ),
            *(
                (
                    f"{flow}_cpu_ms_per_request_{name}",
                    flows[f"{flow}_cpu_ms_per_request_{name}"],
                    f"closed loop; auth off "
                    f"{flows.get(f'{flow}_noauth_cpu_ms_per_request_{name}', 0.0):.2f}",
                )
                for flow in FLOWS
                for name in processes
            ),
            *(echo_row(echo, variant) for variant in ECHO_VARIANTS),
            *(
                (
                    f"{flow}_cpu_ms_per_request_total",
                    flows[f"{flow}_cpu_ms_per_request_total"],
                    f"every process; CPU-bound ceiling {echo_cpu_ms / total:.2f}x echo"
                    if (total := flows[f"{flow}_cpu_ms_per_request_total"])
                    else "",
                )
                for flow in FLOWS
            ),
            *(
                (f"{flow}_auth_{what}_ratio", flows[f"{flow}_auth_{what}_ratio"], note)
                for flow in FLOWS
                for what in ("cpu_overhead", "p99", "p50")
                if (note := ratio_note(flows, flow, what))
            ),
            *(
                (
                    f"{flow}_errors",
                    flows[f"{flow}_errors"],
                    f"failed calls; auth off {flows[f'{flow}_noauth_errors']:.0f}",
                )
                for flow in FLOWS
            ),
        ],
    )
    if scale:
        print_table(
            "gateway scale-out: 2 replicas of every plane beside 1, on PostgreSQL + Redis",
            replica_rows(flows, scale),
        )
    if allow < 0.5:
        print(
            f"\nNOTE: only {allow:.0%} of the authorizations were allowed: the authorize "
            "figures measure mostly the refusal path, not the money path."
        )
    if scale_failed:
        print(f"\nscale-out phase FAILED: {scale_failed}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
