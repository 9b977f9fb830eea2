"""Ledger benchmark (`make bench ONLY=ledger`, or `python -m bench.ledger`).

What runs, all in one go (about 2-3 minutes):

* pgbench's built-in tpcb-like script on the same PostgreSQL, in a throw-away
  database, with the same client count as the ledger load (scale = clients, as
  pgbench's documentation advises, so its branch rows are not one hot row).
* The money plane as a separate process (`python -m money_plane`) on a fresh
  PostgreSQL database, its outbox relay publishing to NATS as in production
  (the local nats-server at 127.0.0.1:4222 when one listens, otherwise an
  embedded one). One tenant, 10,000 accounts: a funding account, 7,999
  customers (funded, debits must not exceed credits) and 2,000 merchants.
  This process drives it through gRPC with `CLIENTS` concurrent callers:
  (a) unary CreateTransfer between random pairs, (b) CreateTransfers with
  batches of 100, (c) unary with half of all transfers crediting one merchant.
* The same unary workload against a second plane process on the embedded
  SQLite store.

Every phase runs a short warm-up, whose rate sizes the pool of requests for the
timed part; every decision token is signed before the clock starts (signing is
the policy plane's cost, not the ledger's). A phase ends after its duration or
when its pool runs dry, whichever comes first; the rate is over the time it
actually ran. At the end the ledger must balance and hold exactly one entry
per successful transfer, or this exits non-zero.

Knobs (environment): TRIPLANE_BENCH_CLIENTS (32), TRIPLANE_BENCH_SECONDS (15,
per timed phase), TRIPLANE_BENCH_WARMUP_SECONDS (3), TRIPLANE_BENCH_PG (libpq
conninfo of the server, "host=127.0.0.1 port=5432 user=postgres"),
TRIPLANE_BENCH_PYSPY (a path: record a py-spy profile of the PostgreSQL plane
during the timed unary phase). Any TRIPLANE__MONEY__... override in the
environment reaches the plane processes (e.g. group-commit knobs).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg

from bench.common import TICK_S, merge_results, percentile, print_table, proc_stats
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port, port_open
from triplane.runtime.tls import ADMIN, CA_CERT_FILE, TlsFiles, open_channel, tls_dir
from triplane.runtime.tokens import Movement, TokenSigner, load_signer
from triplane_tools.certs import ensure_dev_certificates
from triplane_tools.natsd import EmbeddedNats

CLIENTS = int(os.environ.get("TRIPLANE_BENCH_CLIENTS", "32"))
DURATION_S = float(os.environ.get("TRIPLANE_BENCH_SECONDS", "15"))
WARMUP_S = float(os.environ.get("TRIPLANE_BENCH_WARMUP_SECONDS", "3"))
PG_CONNINFO = os.environ.get("TRIPLANE_BENCH_PG", "host=127.0.0.1 port=5432 user=postgres")
PYSPY_OUTPUT = os.environ.get("TRIPLANE_BENCH_PYSPY", "")
# Client connections the callers are spread over (see LedgerClient): one per
# caller, as pgbench has; with 8 the kernel's per-connection spread once put 6
# on one serving process and 2 on the other.
LOAD_CONNECTIONS = int(os.environ.get("TRIPLANE_BENCH_CONNECTIONS", "32"))

ACCOUNTS = 10_000
CUSTOMERS = 7_999
MERCHANTS = ACCOUNTS - CUSTOMERS - 1
BATCH_SIZE = 100
ACCOUNT_CHUNK = 1_000
FUNDING_MINOR = 1_000_000_000_000
CURRENCY = "USD"
BANK = "bank"
HOT_MERCHANT = "m00000"
CALL_TIMEOUT_S = 30.0
# Sizing of a timed pool: the warm-up rate times the duration, with headroom.
POOL_HEADROOM = 1.5
MAX_POOL_TRANSFERS = 600_000
WARMUP_POOL_TRANSFERS = 30_000
# Outcomes a caller cannot know: the transfer may or may not have committed.
UNKNOWN_CODES = {
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}

CUSTOMER_IDS = [f"c{i:05d}" for i in range(CUSTOMERS)]
MERCHANT_IDS = [f"m{i:05d}" for i in range(MERCHANTS)]
PAYEE_IDS = CUSTOMER_IDS + MERCHANT_IDS


def log(message: str) -> None:
    print(f"[ledger bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes


def bench_admin_files(state_dir: Path) -> TlsFiles:
    directory = tls_dir(state_dir)
    return TlsFiles(
        directory / CA_CERT_FILE, directory / f"{ADMIN}.crt", directory / f"{ADMIN}.key"
    )


class PlaneProcess:
    """`python -m money_plane` in its own session, its log in a file."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = log_path
        self._env = {**env, "TRIPLANE__MONEY__LISTEN": f"127.0.0.1:{self.port}"}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "money_plane"],
                env=self._env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_ready(self, timeout_s: float = 30.0) -> grpc.aio.Channel:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            if port_open("127.0.0.1", self.port):
                channel = open_channel(
                    f"127.0.0.1:{self.port}",
                    self.admin_files,
                    options=[
                        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                        ("grpc.max_send_message_length", 64 * 1024 * 1024),
                    ],
                )
                await asyncio.wait_for(channel.channel_ready(), timeout=10)
                return channel
            await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} did not listen in {timeout_s}s:\n{self.log_tail()}")

    @property
    def admin_files(self) -> TlsFiles:
        """The admin identity's dev certificate of the plane's state dir: the
        benchmark calls as the admin tools do, over mutual TLS."""
        return bench_admin_files(Path(self._env["TRIPLANE_STATE_DIR"]))

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log(f"{self.name} ignored SIGTERM for 15 s; killing pid {process.pid}")
            process.kill()
            process.wait(timeout=10)


def admin_execute(statement: str) -> None:
    with psycopg.connect(PG_CONNINFO, dbname="postgres", autocommit=True) as conn:
        conn.execute(statement)


def create_database(name: str) -> None:
    admin_execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    try:
        admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error as exc:
        log(f"could not drop database {name}: {exc}")


def conninfo_args() -> list[str]:
    """pgbench options for the server in PG_CONNINFO."""
    parsed = psycopg.conninfo.conninfo_to_dict(PG_CONNINFO)
    args: list[str] = []
    for key, flag in (("host", "-h"), ("port", "-p"), ("user", "-U")):
        if key in parsed and parsed[key] is not None:
            args += [flag, str(parsed[key])]
    return args


def find_pgbench() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin/pgbench"), reverse=True):
        return str(candidate)
    raise FileNotFoundError("pgbench not found (it ships with PostgreSQL)")


@dataclass
class PgbenchResult:
    tps: float
    scale: int
    latency_ms: float
    transactions: int
    cpu: str = ""


def run_pgbench(database: str, clients: int, duration_s: float) -> PgbenchResult:
    pgbench = find_pgbench()
    scale = max(1, clients)
    started = time.monotonic()
    subprocess.run(
        [pgbench, *conninfo_args(), "-i", "-q", "-s", str(scale), "-I", "dtGvp", database],
        check=True,
        capture_output=True,
        timeout=300,
    )
    log(f"pgbench -i -s {scale} took {time.monotonic() - started:.1f} s")
    threads = min(2, clients)
    run_s = max(1, round(duration_s))
    process = subprocess.Popen(
        [
            pgbench,
            *conninfo_args(),
            "-b",
            "tpcb-like",
            "-c",
            str(clients),
            "-j",
            str(threads),
            "-T",
            str(run_s),
            database,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Sampled inside the run: pgbench's backends take their CPU time with
        # them when they disconnect.
        time.sleep(min(1.0, run_s / 4))
        cpu_before = cpu_sample(process.pid)
        time.sleep(max(0.5, run_s - 2 * min(1.0, run_s / 4)))
        cpu_after = cpu_sample(process.pid)
        stdout, stderr = process.communicate(timeout=run_s + 120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode:
        raise RuntimeError(f"pgbench failed ({process.returncode}):\n{stdout}\n{stderr}")
    cpu = ""
    if cpu_before is not None and cpu_after is not None:
        wall = cpu_after.at - cpu_before.at
        total = cpu_after.machine_total_s - cpu_before.machine_total_s
        cpu = (
            f"cores used: pgbench {(cpu_after.plane_s - cpu_before.plane_s) / wall:.2f}, "
            f"postgres {(cpu_after.postgres_s - cpu_before.postgres_s) / wall:.2f}; "
            f"machine {(cpu_after.machine_busy_s - cpu_before.machine_busy_s) / total:.0%} busy"
        )
    tps = re.search(r"^tps = ([0-9.]+)", stdout, re.MULTILINE)
    if tps is None:
        raise RuntimeError(f"no 'tps = ' line in pgbench output:\n{stdout}\n{stderr}")
    latency = re.search(r"^latency average = ([0-9.]+) ms", stdout, re.MULTILINE)
    processed = re.search(r"actually processed: (\d+)", stdout)
    return PgbenchResult(
        tps=float(tps.group(1)),
        scale=scale,
        latency_ms=float(latency.group(1)) if latency else math.nan,
        transactions=int(processed.group(1)) if processed else 0,
        cpu=cpu,
    )


# ---------------------------------------------------------------- workload


class Workload:
    """Builds pre-signed transfer requests: unique keys, random pairs."""

    def __init__(self, tenant_id: str, signer: TokenSigner, seed: int) -> None:
        self.tenant_id = tenant_id
        self._signer = signer
        self._rng = random.Random(seed)
        self._serial = 0
        self._issued_at_s = int(time.time())

    def transfer(self, debit: str, credit: str, amount: int, prefix: str) -> pb.Transfer:
        self._serial += 1
        key = f"{prefix}-{self._serial:09d}"
        token, _ = self._signer.issue(
            Movement(
                tenant_id=self.tenant_id,
                kind="transfer",
                debit_account_id=debit,
                credit_account_id=credit,
                amount_minor=amount,
                currency=CURRENCY,
                idempotency_key=key,
            ),
            decision_id=f"dec-{key}",
            issued_at_s=self._issued_at_s,
            ttl_s=3600,
        )
        return pb.Transfer(
            idempotency_key=key,
            kind=pb.TRANSFER_KIND_TRANSFER,
            debit_account_id=debit,
            credit_account_id=credit,
            amount=types_pb2.Money(amount_minor=amount, currency=CURRENCY),
            decision_token=token,
        )

    def random_transfer(self, hot: bool) -> pb.Transfer:
        rng = self._rng
        debit = rng.choice(CUSTOMER_IDS)
        if hot and rng.random() < 0.5:
            credit = HOT_MERCHANT
        else:
            credit = rng.choice(PAYEE_IDS)
            while credit == debit:
                credit = rng.choice(PAYEE_IDS)
        return self.transfer(debit, credit, rng.randint(1, 10_000), "h" if hot else "u")

    def unary_pool(self, count: int, hot: bool = False) -> list[pb.CreateTransferRequest]:
        return [
            pb.CreateTransferRequest(tenant_id=self.tenant_id, transfer=self.random_transfer(hot))
            for _ in range(count)
        ]

    def batch_pool(self, transfers: int) -> list[pb.CreateTransfersRequest]:
        return [
            pb.CreateTransfersRequest(
                tenant_id=self.tenant_id,
                transfers=[self.random_transfer(False) for _ in range(BATCH_SIZE)],
            )
            for _ in range(max(1, math.ceil(transfers / BATCH_SIZE)))
        ]


# ---------------------------------------------------------------- CPU accounting
# Two shared cores: who burnt the CPU during a phase says what limits it.


@dataclass
class CpuSample:
    at: float
    client_s: float
    plane_s: float
    postgres_s: float
    machine_busy_s: float
    machine_total_s: float
    # CPU seconds of each plane process (the primary first): SO_REUSEPORT
    # balances connections, so one serving process may carry more of them.
    plane_by_pid: dict[int, float] = field(default_factory=dict)


def cpu_sample(plane_pid: int) -> CpuSample | None:
    """CPU seconds so far: this process, the plane (with its serving worker
    processes), PostgreSQL, the machine."""
    try:
        stats = proc_stats()
        plane_s = stats[plane_pid].cpu_s
        by_pid = {plane_pid: plane_s}
        postgres_s = 0.0
        for pid, stat in stats.items():
            if stat.comm == "postgres":
                postgres_s += stat.cpu_s
            elif stat.ppid == plane_pid:
                plane_s += stat.cpu_s
                by_pid[pid] = stat.cpu_s
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = ticks[3] + ticks[4]
        return CpuSample(
            time.perf_counter(),
            time.process_time(),
            plane_s,
            postgres_s,
            (sum(ticks) - idle) * TICK_S,
            sum(ticks) * TICK_S,
            by_pid,
        )
    except (OSError, ValueError, IndexError, KeyError):
        return None


def cpu_usage(before: CpuSample | None, after: CpuSample | None) -> str:
    if before is None or after is None or after.at <= before.at:
        return ""
    wall = after.at - before.at
    total = after.machine_total_s - before.machine_total_s
    busy = (after.machine_busy_s - before.machine_busy_s) / total if total > 0 else math.nan
    # Backends that disconnect mid-phase take their CPU time with them.
    postgres = max(0.0, after.postgres_s - before.postgres_s)
    # Per process, the busy ones (not multiprocessing's resource tracker).
    shares = [
        (after.plane_by_pid[pid] - used) / wall
        for pid, used in before.plane_by_pid.items()
        if pid in after.plane_by_pid
    ]
    split = " + ".join(f"{share:.2f}" for share in shares if share >= 0.02)
    return (
        f"cores used: load generator {(after.client_s - before.client_s) / wall:.2f}, "
        f"plane {(after.plane_s - before.plane_s) / wall:.2f} ({split}), "
        f"postgres {postgres / wall:.2f}; "
        f"machine {busy:.0%} busy ({os.cpu_count()} cores)"
    )


@dataclass
class PhaseResult:
    name: str
    ok: int = 0
    failed: int = 0
    calls: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    unknown_keys: list[str] = field(default_factory=list)
    exhausted: bool = False
    cpu: str = ""
    window_us: tuple[int, int] = (0, 0)
    groups: tuple[int, int] = (0, 0)

    @property
    def group_note(self) -> str:
        entries, groups = self.groups
        if not groups:
            return ""
        return f"{entries:,} entries in {groups:,} commit groups ({entries / groups:.1f} per group)"

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


async def drive(
    name: str,
    requests: Sequence[Any],
    call: Callable[[Any], Awaitable[Any]],
    count_ok: Callable[[Any, Any, PhaseResult], None],
    keys_of: Callable[[Any], list[str]],
    clients: int,
    duration_s: float,
    plane_pid: int,
) -> PhaseResult:
    """`clients` callers take requests from one pool until the time is up."""
    result = PhaseResult(name)
    cpu_before = cpu_sample(plane_pid)
    wall_start_us = time.time_ns() // 1000
    source: Iterator[Any] = iter(requests)
    started = time.perf_counter()
    end = started + duration_s

    async def caller() -> None:
        while time.perf_counter() < end:
            request = next(source, None)
            if request is None:
                result.exhausted = True
                return
            sent = time.perf_counter()
            try:
                response = await call(request)
            except grpc.aio.AioRpcError as err:
                code = err.code()
                result.errors[code.name] += 1
                result.calls += 1
                if code in UNKNOWN_CODES:
                    result.unknown_keys.extend(keys_of(request))
                else:
                    result.failed += len(keys_of(request))
                continue
            result.latencies_ms.append((time.perf_counter() - sent) * 1000.0)
            result.calls += 1
            count_ok(request, response, result)

    await asyncio.gather(*(caller() for _ in range(clients)))
    result.elapsed_s = time.perf_counter() - started
    result.cpu = cpu_usage(cpu_before, cpu_sample(plane_pid))
    result.window_us = (wall_start_us, time.time_ns() // 1000)
    return result


class LedgerClient:
    def __init__(
        self,
        channel: grpc.aio.Channel,
        tenant_id: str,
        plane_pid: int,
        port: int,
        tls: TlsFiles | None,
    ) -> None:
        self.stub = money_pb2_grpc.LedgerServiceStub(channel)
        # Callers spread over several connections, as many clients would: a
        # plane serving one port from several processes (SO_REUSEPORT)
        # balances connections, not calls. Distinct subchannel pools make
        # each channel its own TCP connection.
        self._channels = [
            open_channel(f"127.0.0.1:{port}", tls, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(LOAD_CONNECTIONS)
        ]
        self._stubs = [money_pb2_grpc.LedgerServiceStub(c) for c in self._channels]
        self._next = 0
        self.tenant_id = tenant_id
        self.plane_pid = plane_pid

    def pick(self) -> money_pb2_grpc.LedgerServiceStub:
        self._next = (self._next + 1) % len(self._stubs)
        return self._stubs[self._next]

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def setup(self, workload: Workload) -> int:
        """Tenant, 10,000 accounts, every customer funded; returns entries made."""
        stub = self.stub
        await stub.CreateTenant(
            pb.CreateTenantRequest(tenant_id=self.tenant_id, display_name="ledger bench"),
            timeout=CALL_TIMEOUT_S,
        )
        specs = [
            pb.NewAccount(
                account_id=BANK,
                currency=CURRENCY,
                kind=pb.ACCOUNT_KIND_ASSET,
                constraint=pb.BALANCE_CONSTRAINT_NONE,
            )
        ]
        specs += [
            pb.NewAccount(
                account_id=account_id,
                currency=CURRENCY,
                kind=pb.ACCOUNT_KIND_LIABILITY,
                constraint=pb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
            )
            for account_id in PAYEE_IDS
        ]
        assert len(specs) == ACCOUNTS
        for start in range(0, len(specs), ACCOUNT_CHUNK):
            await stub.CreateAccounts(
                pb.CreateAccountsRequest(
                    tenant_id=self.tenant_id, accounts=specs[start : start + ACCOUNT_CHUNK]
                ),
                timeout=CALL_TIMEOUT_S,
            )
        funding = [
            workload.transfer(BANK, customer, FUNDING_MINOR, "fund") for customer in CUSTOMER_IDS
        ]
        funded = 0
        for start in range(0, len(funding), ACCOUNT_CHUNK):
            response = await stub.CreateTransfers(
                pb.CreateTransfersRequest(
                    tenant_id=self.tenant_id, transfers=funding[start : start + ACCOUNT_CHUNK]
                ),
                timeout=CALL_TIMEOUT_S,
            )
            for item in response.results:
                if item.HasField("error"):
                    raise RuntimeError(f"funding transfer refused: {item.error}")
                funded += 1
        return funded

    async def unary(
        self, requests: Sequence[pb.CreateTransferRequest], duration_s: float, name: str
    ) -> PhaseResult:
        def count_ok(_: Any, __: Any, result: PhaseResult) -> None:
            result.ok += 1

        return await drive(
            name,
            requests,
            lambda r: self.pick().CreateTransfer(r, timeout=CALL_TIMEOUT_S),
            count_ok,
            lambda r: [r.transfer.idempotency_key],
            CLIENTS,
            duration_s,
            self.plane_pid,
        )

    async def batched(
        self, requests: Sequence[pb.CreateTransfersRequest], duration_s: float, name: str
    ) -> PhaseResult:
        def count_ok(_: Any, response: Any, result: PhaseResult) -> None:
            for item in response.results:
                if item.HasField("error"):
                    result.failed += 1
                    result.errors[item.error.reason or "ITEM_ERROR"] += 1
                else:
                    result.ok += 1

        return await drive(
            name,
            requests,
            lambda r: self.pick().CreateTransfers(r, timeout=CALL_TIMEOUT_S),
            count_ok,
            lambda r: [t.idempotency_key for t in r.transfers],
            CLIENTS,
            duration_s,
            self.plane_pid,
        )

    async def resolve_unknown(self, keys: list[str]) -> int:
        """How many transfers with an unknown outcome did commit."""
        found = 0
        for key in keys:
            try:
                await self.stub.GetEntry(
                    pb.GetEntryRequest(tenant_id=self.tenant_id, idempotency_key=key),
                    timeout=CALL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            else:
                found += 1
        return found

    async def check_balanced(self) -> pb.CheckBalancedResponse:
        response: pb.CheckBalancedResponse = await self.stub.CheckBalanced(
            pb.CheckBalancedRequest(tenant_id=self.tenant_id), timeout=120
        )
        return response


def pool_size(rate: float, unit: int) -> int:
    wanted = math.ceil(rate * DURATION_S * POOL_HEADROOM) + CLIENTS * unit * 4
    return min(MAX_POOL_TRANSFERS, max(wanted, CLIENTS * unit * 20))


def signed(what: str, build: Callable[[], list[Any]]) -> list[Any]:
    started = time.perf_counter()
    pool = build()
    log(f"signed {what} in {time.perf_counter() - started:.1f} s (not timed)")
    return pool


def describe(result: PhaseResult) -> str:
    errors = ", ".join(f"{k}={v}" for k, v in sorted(result.errors.items())) or "none"
    tail = " (pool ran dry: rate is over the time it ran)" if result.exhausted else ""
    return (
        f"{result.name}: {result.ok:,} ok, {result.failed:,} refused, "
        f"{len(result.unknown_keys):,} unknown in {result.elapsed_s:.1f} s "
        f"= {result.rate:,.0f}/s; p50 {result.p(50):.2f} ms, p99 {result.p(99):.2f} ms; "
        f"errors: {errors}{tail}\n    {result.cpu}"
    )


async def unary_phase(
    client: LedgerClient,
    workload: Workload,
    name: str,
    hot: bool,
    during: Callable[[], Awaitable[None]] | None = None,
) -> list[PhaseResult]:
    warm_pool = signed(
        f"{name} warm-up pool", lambda: workload.unary_pool(WARMUP_POOL_TRANSFERS, hot)
    )
    warm = await client.unary(warm_pool, WARMUP_S, f"{name} warm-up")
    log(describe(warm))
    pool = signed(f"{name} pool", lambda: workload.unary_pool(pool_size(warm.rate, 1), hot))
    timed_task = asyncio.create_task(client.unary(pool, DURATION_S, name))
    if during is not None:
        await during()
    timed = await timed_task
    log(describe(timed))
    return [warm, timed]


async def batch_phase(client: LedgerClient, workload: Workload) -> list[PhaseResult]:
    warm_pool = signed("batch warm-up pool", lambda: workload.batch_pool(WARMUP_POOL_TRANSFERS))
    warm = await client.batched(warm_pool, WARMUP_S, "pg batch warm-up")
    log(describe(warm))
    pool = signed("batch pool", lambda: workload.batch_pool(pool_size(warm.rate, BATCH_SIZE)))
    timed = await client.batched(pool, DURATION_S, "pg batch")
    log(describe(timed))
    return [warm, timed]


async def pyspy_record(pid: int) -> None:
    """py-spy record of the plane for most of the timed phase (optional).

    Runs while the timed phase, already scheduled, drives the plane.
    """
    pyspy = Path(sys.executable).parent / "py-spy"
    if not PYSPY_OUTPUT:
        return
    if not pyspy.exists():
        log("TRIPLANE_BENCH_PYSPY set but py-spy is not installed in the venv; skipping")
        return
    seconds = max(1, int(DURATION_S) - 2)
    fmt = "speedscope" if PYSPY_OUTPUT.endswith(".json") else "flamegraph"
    if PYSPY_OUTPUT.endswith(".txt"):
        fmt = "raw"
    process = await asyncio.create_subprocess_exec(
        str(pyspy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        "100",
        # Only the thread holding the GIL: the plane is one Python process, so
        # GIL time is the budget every request spends from.
        "--gil",
        "--nonblocking",
        "--threads",
        "--format",
        fmt,
        "-o",
        PYSPY_OUTPUT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    if process.returncode:
        log(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    else:
        log(f"py-spy profile written to {PYSPY_OUTPUT}")


@dataclass
class Verification:
    backend: str
    balanced: bool
    expected_entries: int
    entries: int
    postings: int
    outbox_unsent: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify(
    backend: str,
    client: LedgerClient,
    results: list[PhaseResult],
    funded: int,
    probe: StoreProbe,
) -> Verification:
    """Balanced, and exactly one entry per successful transfer."""
    unknown = [key for result in results for key in result.unknown_keys]
    committed_unknown = await client.resolve_unknown(unknown)
    expected = funded + sum(r.ok for r in results) + committed_unknown
    check = await client.check_balanced()
    entries, unsent = probe.entries_and_unsent()
    drain_until = time.monotonic() + 5.0
    while unsent and time.monotonic() < drain_until:  # the relay catching up
        await asyncio.sleep(0.25)
        entries, unsent = probe.entries_and_unsent()
    for result in results:
        result.groups = probe.commit_groups(result.window_us)
    verification = Verification(
        backend, check.balanced, expected, entries, int(check.postings_checked), unsent
    )
    if not check.balanced:
        verification.problems.append(f"{backend}: CheckBalanced says the ledger is NOT balanced")
    if entries != expected:
        verification.problems.append(
            f"{backend}: {entries} entries in the store but {expected} successful transfers "
            f"({funded} funding + {sum(r.ok for r in results)} acknowledged + "
            f"{committed_unknown} of {len(unknown)} with unknown outcome found)"
        )
    if check.postings_checked != 2 * expected:
        verification.problems.append(
            f"{backend}: {check.postings_checked} postings, expected {2 * expected}"
        )
    log(
        f"verify {backend}: balanced={check.balanced} entries={entries} expected={expected} "
        f"postings={check.postings_checked} outbox_unsent={unsent}"
    )
    return verification


class StoreProbe:
    """Reads the plane's store directly, for the checks and diagnostics."""

    def __init__(self, tenant_id: str, pg_dsn: str = "", sqlite_path: Path | None = None) -> None:
        self.tenant_id = tenant_id
        self.pg_dsn = pg_dsn
        self.sqlite_path = sqlite_path

    def _one(self, sql: str, params: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.pg_dsn:
            with psycopg.connect(self.pg_dsn, autocommit=True) as conn:
                row = conn.execute(sql.replace("?", "%s"), params).fetchone()
        else:
            uri = f"file:{self.sqlite_path}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True)) as lite:
                row = lite.execute(sql, params).fetchone()
        assert row is not None
        return tuple(row)

    def entries_and_unsent(self) -> tuple[int, int]:
        (entries,) = self._one(
            "SELECT count(*) FROM entries WHERE tenant_id = ?", (self.tenant_id,)
        )
        (unsent,) = self._one("SELECT count(*) FROM outbox WHERE sent_at_us IS NULL", ())
        return int(entries), int(unsent)

    def commit_groups(self, window_us: tuple[int, int]) -> tuple[int, int]:
        """(entries, commit groups) in a window: a group commit stamps all of
        its entries with one posted_at_us."""
        entries, groups = self._one(
            "SELECT count(*), count(DISTINCT posted_at_us) FROM entries "
            "WHERE tenant_id = ? AND posted_at_us >= ? AND posted_at_us <= ?",
            (self.tenant_id, *window_us),
        )
        return int(entries), int(groups)


async def purge_events(nats_url: str, tenant_id: str) -> None:
    """Drops the bench tenant's events from a shared JetStream (they are junk)."""
    import nats

    try:
        nc = await nats.connect(nats_url, connect_timeout=2)
    except Exception as exc:
        log(f"could not purge bench events: {exc}")
        return
    try:
        js = nc.jetstream()
        await js.purge_stream("TRIPLANE_MONEY", subject=f"triplane.money.{tenant_id}.>")
    except Exception as exc:
        log(f"could not purge bench events: {exc}")
    finally:
        await nc.close()


# ---------------------------------------------------------------- the run


@dataclass
class Figures:
    pgbench: PgbenchResult | None = None
    pg_unary: PhaseResult | None = None
    pg_batch: PhaseResult | None = None
    pg_hot: PhaseResult | None = None
    sqlite_unary: PhaseResult | None = None
    verifications: list[Verification] = field(default_factory=list)


async def run_plane_phases(
    plane: PlaneProcess,
    tenant_id: str,
    workload: Workload,
    figures: Figures,
    backend: str,
    probe: StoreProbe,
) -> None:
    plane.start()
    channel = await plane.wait_ready()
    client: LedgerClient | None = None
    try:
        client = LedgerClient(channel, tenant_id, plane.pid, plane.port, plane.admin_files)
        started = time.perf_counter()
        funded = await client.setup(workload)
        log(
            f"{backend}: tenant, {ACCOUNTS:,} accounts and {funded:,} funding transfers "
            f"in {time.perf_counter() - started:.1f} s"
        )
        phases: list[PhaseResult] = []
        if backend == "postgres":

            async def profile() -> None:
                await pyspy_record(plane.pid)

            phases += await unary_phase(client, workload, "pg unary", False, profile)
            figures.pg_unary = phases[-1]
            phases += await batch_phase(client, workload)
            figures.pg_batch = phases[-1]
            phases += await unary_phase(client, workload, "pg hot", True)
            figures.pg_hot = phases[-1]
        else:
            phases += await unary_phase(client, workload, "sqlite unary", False)
            figures.sqlite_unary = phases[-1]
        figures.verifications.append(await verify(backend, client, phases, funded, probe))
    finally:
        if client is not None:
            await client.close()
        await channel.close()
        plane.stop()


async def run() -> Figures:
    suffix = secrets.token_hex(4)
    tenant_id = f"bench_{suffix}"
    ledger_db = f"triplane_bench_{suffix}"
    pgbench_db = f"triplane_pgbench_{suffix}"
    state_dir = Path(tempfile.mkdtemp(prefix="triplane-ledger-bench-"))
    figures = Figures()
    nats: EmbeddedNats | None = None
    nats_url = ""
    planes: list[PlaneProcess] = []
    created: list[str] = []
    try:
        if port_open("127.0.0.1", 4222):
            nats_url = "nats://127.0.0.1:4222"
        else:
            nats = EmbeddedNats(state_dir / "nats")
            nats_url = nats.start()
        log(f"clients={CLIENTS} duration={DURATION_S:g}s warm-up={WARMUP_S:g}s nats={nats_url}")

        create_database(pgbench_db)
        created.append(pgbench_db)
        log(f"pgbench tpcb-like, {CLIENTS} clients, {DURATION_S:g} s ...")
        figures.pgbench = await asyncio.to_thread(run_pgbench, pgbench_db, CLIENTS, DURATION_S)
        log(
            f"pgbench: {figures.pgbench.tps:,.0f} tps, {figures.pgbench.latency_ms:.2f} ms avg; "
            f"{figures.pgbench.cpu}"
        )
        drop_database(pgbench_db)
        created.remove(pgbench_db)

        signer = load_signer("", state_dir)  # the dev key pair the planes trust
        # The dev CA and certificates the planes serve mutual TLS with.
        ensure_dev_certificates(state_dir, load_config(environ={}).runtime.tls)
        base_env = {k: v for k, v in os.environ.items() if k != "TRIPLANE_MONEY_DSN"}
        base_env.update(
            {
                "TRIPLANE_STATE_DIR": str(state_dir),
                "NATS_URL": nats_url,
                "TRIPLANE__RUNTIME__LOG_LEVEL": os.environ.get(
                    "TRIPLANE__RUNTIME__LOG_LEVEL", "WARNING"
                ),
            }
        )

        create_database(ledger_db)
        created.append(ledger_db)
        dsn = psycopg.conninfo.make_conninfo(PG_CONNINFO, dbname=ledger_db)
        pg_plane = PlaneProcess(
            "money_plane (postgres)",
            {
                **base_env,
                "TRIPLANE_MONEY_DSN": dsn,
                # One serving process per core, as deployed (SO_REUSEPORT).
                "TRIPLANE__MONEY__SERVER_PROCESSES": os.environ.get(
                    "TRIPLANE__MONEY__SERVER_PROCESSES", str(os.cpu_count() or 1)
                ),
            },
            state_dir / "plane-postgres.log",
        )
        planes.append(pg_plane)
        await run_plane_phases(
            pg_plane,
            tenant_id,
            Workload(tenant_id, signer, seed=1),
            figures,
            "postgres",
            StoreProbe(tenant_id, pg_dsn=dsn),
        )

        sqlite_plane = PlaneProcess(
            "money_plane (sqlite)",
            {**base_env, "TRIPLANE__MONEY__STORE__BACKEND": "sqlite"},
            state_dir / "plane-sqlite.log",
        )
        planes.append(sqlite_plane)
        await run_plane_phases(
            sqlite_plane,
            tenant_id,
            Workload(tenant_id, signer, seed=2),
            figures,
            "sqlite",
            StoreProbe(tenant_id, sqlite_path=state_dir / "money.db"),
        )
    finally:
        if nats_url and nats is None:
            await purge_events(nats_url, tenant_id)
        for plane in planes:
            plane.stop()
        for name in created:
            drop_database(name)
        if nats is not None:
            nats.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    return figures


def report(figures: Figures) -> bool:
    assert figures.pgbench and figures.pg_unary and figures.pg_batch and figures.pg_hot
    assert figures.sqlite_unary
    tps = figures.pgbench.tps
    unary, batch, hot, lite = (
        figures.pg_unary,
        figures.pg_batch,
        figures.pg_hot,
        figures.sqlite_unary,
    )
    unary_ratio = unary.rate / tps if tps else math.nan
    batch_ratio = batch.rate / tps if tps else math.nan
    hot_ratio = hot.rate / unary.rate if unary.rate else math.nan
    p99 = unary.p(99)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    rows: list[tuple[str, object, str]] = [
        (
            "pgbench_tpcb_tps",
            tps,
            f"reference: tpcb-like, scale {figures.pgbench.scale}, {CLIENTS} clients, "
            f"avg {figures.pgbench.latency_ms:.2f} ms",
        ),
        (
            "ledger_pg_unary_transfers_per_s",
            unary.rate,
            f"target >= 1.0x pgbench = {tps:,.0f}  {verdict(unary_ratio >= 1.0)}",
        ),
        ("ledger_pg_unary_latency_ms_p50", unary.p(50), ""),
        (
            "ledger_pg_unary_latency_ms_p99",
            p99,
            f"target <= 20 ms  {verdict(p99 <= 20.0)}",
        ),
        (
            "ledger_pg_batch_transfers_per_s",
            batch.rate,
            f"target >= 5x pgbench = {5 * tps:,.0f}  {verdict(batch_ratio >= 5.0)}",
        ),
        (
            "ledger_pg_hot_transfers_per_s",
            hot.rate,
            f"target >= 0.5x unary = {0.5 * unary.rate:,.0f}  {verdict(hot_ratio >= 0.5)}; "
            f"p99 {hot.p(99):.2f} ms",
        ),
        (
            "ledger_sqlite_unary_transfers_per_s",
            lite.rate,
            f"embedded store; p50 {lite.p(50):.2f} ms, p99 {lite.p(99):.2f} ms",
        ),
        ("ledger_unary_vs_pgbench_ratio", unary_ratio, "target >= 1.0"),
        ("ledger_batch_vs_pgbench_ratio", batch_ratio, "target >= 5.0"),
        ("ledger_hot_vs_unary_ratio", hot_ratio, "target >= 0.5"),
        (
            "ledger_bench_clients",
            CLIENTS,
            f"concurrent gRPC callers = pgbench -c; {DURATION_S:g} s",
        ),
    ]
    print_table("ledger (money plane over gRPC) vs pgbench tpcb-like", rows)
    print(f"pgbench: {figures.pgbench.cpu}")
    for phase in (unary, batch, hot, lite):
        print(f"{phase.name}: {phase.cpu}; {phase.group_note}")
    for verification in figures.verifications:
        print(
            f"verified {verification.backend}: balanced={verification.balanced}, "
            f"entries={verification.entries:,} (expected {verification.expected_entries:,}), "
            f"postings={verification.postings:,}, outbox unsent at the end="
            f"{verification.outbox_unsent:,}"
        )
    merge_results(
        {
            "pgbench_tpcb_tps": round(tps, 1),
            "ledger_pg_unary_transfers_per_s": round(unary.rate, 1),
            "ledger_pg_unary_latency_ms_p50": round(unary.p(50), 3),
            "ledger_pg_unary_latency_ms_p99": round(p99, 3),
            "ledger_pg_batch_transfers_per_s": round(batch.rate, 1),
            "ledger_pg_hot_transfers_per_s": round(hot.rate, 1),
            "ledger_pg_hot_latency_ms_p99": round(hot.p(99), 3),
            "ledger_sqlite_unary_transfers_per_s": round(lite.rate, 1),
            "ledger_sqlite_unary_latency_ms_p99": round(lite.p(99), 3),
            "ledger_unary_vs_pgbench_ratio": round(unary_ratio, 3),
            "ledger_batch_vs_pgbench_ratio": round(batch_ratio, 3),
            "ledger_hot_vs_unary_ratio": round(hot_ratio, 3),
            "ledger_bench_clients": CLIENTS,
        }
    )
    problems = [p for v in figures.verifications for p in v.problems]
    for problem in problems:
        print(f"!!! LEDGER CORRECTNESS FAILURE: {problem}", file=sys.stderr)
    return not problems


def _terminate(signum: int, _: Any) -> None:
    # Unwinds through every finally: the planes, pgbench and databases go too.
    raise SystemExit(128 + signum)


def main() -> None:
    started = time.monotonic()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        figures = asyncio.run(run())
    finally:
        signal.signal(signal.SIGTERM, previous)
    ok = report(figures)
    log(f"ledger suite took {time.monotonic() - started:.0f} s")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
