"""The chaos run (`make chaos`, `triplane chaos`; a short one in `make test`).

A stack of 2 replicas of every plane (triplane_tools.stack) on a private
PostgreSQL (triplane_tools.chaos_engines: one the run may kill), a 3-node
JetStream cluster with R3 streams, and the machine's Redis. A mixed workload
runs through the gateway (authorize, capture, void, refund, decide, outcomes,
ingest) while a fault schedule, one fault at a time, kills -9 one replica of
each plane in turn (gateway and policy included) and restarts it as an
orchestrator would, SIGSTOPs a Triton for a while, restarts a JetStream node
(the leader of the money stream) and kills -9 PostgreSQL and starts it again.

Every call has a deadline; every answer is recorded (code, elapsed, ids). The
client retries with the same idempotency key on UNAVAILABLE and
DEADLINE_EXCEEDED, as a real client does; a call is acknowledged once it
came back OK. After the workload, every call left without an answer is sent
once more with its key (what its caller would do once the outage is over),
and then the stores themselves are checked (triplane_tools.chaos_checks).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import random
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane_client import GatewayClient, TriplaneApiError
from triplane_sim.demo_world import World, seed
from triplane_tools.chaos_engines import PrivatePostgres
from triplane_tools.partner_keys import create_partner_key
from triplane_tools.stack import Stack

log = logging.getLogger("triplane.chaos")

TENANT = "chaos"
DATABASE_PREFIX = "chaos"
# Codes after which a real client sends the same request again, same key.
RETRIED_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# gRPC's fork handlers abort a child forked while other threads are inside
# gRPC (ev_epoll1_linux "Check failed: next_worker->state == KICKED"): a
# plane restarted by this process, whose client is busy, died with SIGABRT
# before it could exec. Off, a fork runs no gRPC code at all; it must be set
# before grpc is imported (`triplane chaos` starts itself over with it).
FORK_SUPPORT_ENV = "GRPC_ENABLE_FORK_SUPPORT"
# What `faults` may name: each plane (a kill -9 of one of its replicas),
# Triton (SIGSTOP), NATS (a node restarted), PostgreSQL (kill -9).
FAULT_KINDS = ("money", "policy", "gateway", "ai", "triton", "nats", "postgres")
# Answers that are never right, whatever the fault.
INTERNAL_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


@dataclass(frozen=True)
class ChaosOptions:
    """What a run does. `schedule`: "full" (every fault, in rounds, until
    the workload ends) or "short" (each fault once)."""

    duration_s: float = 240.0
    schedule: str = "full"
    workers: int = 6
    # Each attempt's deadline, and attempts per call (same key each time).
    deadline_s: float = 5.0
    attempts: int = 6
    retry_backoff_s: float = 0.25
    # An answer later than its deadline by more than this is late (the
    # client's own event loop on two busy cores may run that far behind).
    late_tolerance_s: float = 0.5
    # Before the first fault, and between two faults.
    warmup_s: float = 8.0
    fault_gap_s: float = 6.0
    triton_stop_s: float = 5.0
    # AI plane replicas (each runs its own Triton).
    ai_replicas: int = 2
    customers: int = 40
    merchants: int = 8
    seed: int = 20261206
    # Share of acknowledged calls sent again with the same key right away
    # (its answer must name the same effect: a replay, not a second one).
    replay_share: float = 0.1
    # Which kinds of fault to inject (FAULT_KINDS).
    faults: tuple[str, ...] = FAULT_KINDS
    state_dir: Path | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    # How long the outboxes get to drain before their events are checked.
    settle_timeout_s: float = 60.0
    start_timeout_s: float = 240.0

    def __post_init__(self) -> None:
        if self.schedule not in ("full", "short"):
            raise ValueError("schedule must be 'full' or 'short'")
        if self.attempts < 1 or self.workers < 1 or self.deadline_s <= 0:
            raise ValueError("attempts, workers and deadline_s must be positive")
        if self.ai_replicas not in (1, 2):
            raise ValueError("ai_replicas must be 1 or 2")
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULT_KINDS}")


@dataclass(frozen=True)
class Answer:
    """One attempt of one call, as the client saw it."""

    kind: str
    key: str
    code: str
    elapsed_s: float
    deadline_s: float
    reason: str = ""


@dataclass
class Call:
    """One operation of the workload: its key, its answer once acknowledged."""

    kind: str
    key: str
    send: Callable[[float], Awaitable[Message]]
    response: Message | None = None
    last_code: str = ""
    last_reason: str = ""
    attempts: int = 0
    replay_mismatch: str = ""
    # Acknowledged only in the pass after the workload.
    late_ack: bool = False

    @property
    def acknowledged(self) -> bool:
        return self.response is not None


@dataclass
class FaultRecord:
    name: str
    target: str
    action: str
    at_s: float
    recovered_s: float = 0.0
    ok: bool = True
    detail: str = ""


@dataclass
class Ledger:
    """Everything the workload saw."""

    answers: list[Answer] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    # Seconds each phase of the run took (start, workload, retries, checks).
    phases_s: dict[str, float] = field(default_factory=dict)

    def by_kind(self) -> dict[str, collections.Counter[str]]:
        found: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for call in self.calls:
            found[call.kind]["acknowledged" if call.acknowledged else call.last_code] += 1
        return found


def _usd(minor: int) -> types_pb2.Money:
    return types_pb2.Money(amount_minor=minor, currency="USD")


class Workload:
    """Workers driving the gateway, each call through `_call`."""

    def __init__(
        self, client: GatewayClient, world: World, options: ChaosOptions, ledger: Ledger
    ) -> None:
        self.client = client
        self.world = world
        self.options = options
        self.ledger = ledger

    async def attempt(self, call: Call) -> None:
        """One attempt: answered OK (acknowledged) or not; recorded."""
        deadline_s = self.options.deadline_s
        started = time.monotonic()
        call.attempts += 1
        try:
            response = await call.send(deadline_s)
        except TriplaneApiError as error:
            why = f"{error.reason} {error.field}".strip()
            self._record(call, error.code, time.monotonic() - started, why)
            return
        self._record(call, grpc.StatusCode.OK, time.monotonic() - started, "")
        call.response = response

    def _record(self, call: Call, code: grpc.StatusCode, elapsed_s: float, reason: str) -> None:
        call.last_code = code.name
        call.last_reason = reason
        self.ledger.answers.append(
            Answer(call.kind, call.key, code.name, elapsed_s, self.options.deadline_s, reason)
        )

    async def run_call(self, call: Call, rng: random.Random) -> Message | None:
        """The call until acknowledged or refused for good, or out of attempts."""
        self.ledger.calls.append(call)
        for attempt in range(self.options.attempts):
            await self.attempt(call)
            if call.response is not None:
                break
            if call.last_code not in {code.name for code in RETRIED_CODES}:
                return None
            await asyncio.sleep(self.options.retry_backoff_s * (attempt + 1))
        if call.response is not None and rng.random() < self.options.replay_share:
            await self._replay(call)
        return call.response

    async def _replay(self, call: Call) -> None:
        """The same request again, same key: the same answer (the same effect)."""
        first = call.response
        again = Call(call.kind, call.key, call.send)
        await self.attempt(again)
        if again.response is None or first is None:
            return
        if effect_of(call.kind, again.response) != effect_of(call.kind, first):
            call.replay_mismatch = (
                f"first {effect_of(call.kind, first)} then {effect_of(call.kind, again.response)}"
            )

    # ---- the flows ----

    async def checkout(self, rng: random.Random) -> None:
        world, client = self.world, self.client
        customer = rng.choice(world.customers)
        merchant = rng.choice(world.merchants)
        amount = max(100, int(rng.expovariate(1 / customer.mean_amount_minor)))
        key = uuid.uuid4().hex
        request: dict[str, Any] = dict(
            tenant_id=TENANT,
            account_id=customer.account_id,
            credit_account_id=merchant.merchant_id,
            amount=_usd(amount),
            kind=gw.PAYMENT_KIND_PURCHASE,
            device_id=rng.choice(customer.devices),
            merchant_id=merchant.merchant_id,
            merchant_category=merchant.category,
            channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
            customer=gw.Customer(customer_id=world.customer_id(customer), country="US"),
        )

        def authorize(timeout_s: float) -> Awaitable[Message]:
            return client.authorize_payment(idempotency_key=key, timeout_s=timeout_s, **request)

        answer = await self.run_call(Call("authorize", key, authorize), rng)
        if not isinstance(answer, gw.AuthorizePaymentResponse) or not answer.hold_id:
            return
        hold_id = answer.hold_id
        if rng.random() < 0.3:
            void_key = uuid.uuid4().hex

            def void(timeout_s: float) -> Awaitable[Message]:
                return client.void_payment(
                    tenant_id=TENANT, hold_id=hold_id, idempotency_key=void_key, timeout_s=timeout_s
                )

            await self.run_call(Call("void", void_key, void), rng)
            return
        capture_key = uuid.uuid4().hex

        def capture(timeout_s: float) -> Awaitable[Message]:
            return client.capture_payment(
                tenant_id=TENANT, hold_id=hold_id, idempotency_key=capture_key, timeout_s=timeout_s
            )

        captured = await self.run_call(Call("capture", capture_key, capture), rng)
        if not isinstance(captured, gw.CapturePaymentResponse) or rng.random() >= 0.4:
            return
        entry_id = captured.entry_id
        refund_key = uuid.uuid4().hex
        refund_amount = max(1, captured.captured.amount_minor // 2)

        def refund(timeout_s: float) -> Awaitable[Message]:
            return client.refund_payment(
                tenant_id=TENANT,
                entry_id=entry_id,
                amount=_usd(refund_amount),
                idempotency_key=refund_key,
                timeout_s=timeout_s,
            )

        await self.run_call(Call("refund", refund_key, refund), rng)

    async def offer(self, rng: random.Random) -> None:
        world, client = self.world, self.client
        customer = rng.choice(world.customers)
        key = uuid.uuid4().hex
        surface = rng.choice(("checkout", "app_home", "push"))

        def decide(timeout_s: float) -> Awaitable[Message]:
            return client.decide_next_action(
                tenant_id=TENANT,
                idempotency_key=key,
                timeout_s=timeout_s,
                customer_id=world.customer_id(customer),
                account_id=customer.account_id,
                surface=surface,
                region="US",
            )

        answer = await self.run_call(Call("decide", key, decide), rng)
        if not isinstance(answer, gw.DecideNextActionResponse):
            return
        if answer.action != gw.ACTION_SHOW_OFFER:
            return
        decision_id = answer.decision_id
        outcome_key = uuid.uuid4().hex
        kind = gw.OUTCOME_KIND_CONVERTED if rng.random() < 0.3 else gw.OUTCOME_KIND_IGNORED

        def outcome(timeout_s: float) -> Awaitable[Message]:
            return client.record_outcome(
                tenant_id=TENANT,
                decision_id=decision_id,
                kind=kind,
                idempotency_key=outcome_key,
                timeout_s=timeout_s,
            )

        await self.run_call(Call("outcome", outcome_key, outcome), rng)

    async def ingest(self, rng: random.Random) -> None:
        customer = rng.choice(self.world.customers)
        who = gw.Customer(customer_id=self.world.customer_id(customer))
        event_key = uuid.uuid4().hex
        amount = rng.choice((100_000, 250_000))

        def ingest(timeout_s: float) -> Awaitable[Message]:
            event = gw.BehaviourEvent(
                kind=gw.EVENT_KIND_LOAN_SIMULATED,
                customer=who,
                account_id=customer.account_id,
                amount=_usd(amount),
                idempotency_key=event_key,
            )
            return self.client.ingest_events(tenant_id=TENANT, events=[event], timeout_s=timeout_s)

        await self.run_call(Call("ingest", event_key, ingest), rng)

    async def worker(self, index: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.options.seed * 1000 + index)
        while not stop.is_set():
            pick = rng.random()
            if pick < 0.55:
                await self.checkout(rng)
            elif pick < 0.85:
                await self.offer(rng)
            else:
                await self.ingest(rng)

    async def finish_unanswered(self) -> None:
        """Each call that never came back OK for a retryable reason is sent
        once more with its key, the faults over (its caller would)."""
        rng = random.Random(self.options.seed)
        for call in list(self.ledger.calls):
            if call.acknowledged or call.last_code not in {c.name for c in RETRIED_CODES}:
                continue
            for attempt in range(self.options.attempts):
                await self.attempt(call)
                if call.response is not None:
                    call.late_ack = True
                    break
                if call.last_code not in {c.name for c in RETRIED_CODES}:
                    break
                await asyncio.sleep(
                    self.options.retry_backoff_s * (attempt + 1) + rng.random() / 10
                )


def effect_of(kind: str, response: Message) -> tuple[str, ...]:
    """What an answer says was done (compared between a call and its replay)."""
    if isinstance(response, gw.AuthorizePaymentResponse):
        return (response.decision_id, response.hold_id, str(response.outcome))
    if isinstance(response, gw.CapturePaymentResponse):
        return (response.hold_id, response.entry_id)
    if isinstance(response, gw.VoidPaymentResponse):
        return (response.hold_id, str(response.hold_state))
    if isinstance(response, gw.RefundPaymentResponse):
        return (response.refund_entry_id,)
    if isinstance(response, gw.DecideNextActionResponse):
        return (response.decision_id, response.offer.offer_id)
    if isinstance(response, gw.RecordOutcomeResponse):
        return (response.decision_id, response.offer_id)
    if isinstance(response, gw.IngestEventsResponse):
        return tuple(result.event_id for result in response.results)
    return (kind,)


# ---- the faults ----


def tritonserver_of(pid: int) -> int | None:
    """The tritonserver a plane process started (its child), if any."""
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_path.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        if ppid == pid and comm.startswith("tritonserver"):
            return int(stat_path.parent.name)
    return None


@dataclass(frozen=True)
class Fault:
    name: str
    target: str
    action: str

    @property
    def kind(self) -> str:
        """Which of FAULT_KINDS it is."""
        if self.action == "kill":
            return self.target.split("[")[0]
        return {"stop_triton": "triton", "restart_nats": "nats", "kill_postgres": "postgres"}[
            self.action
        ]


def schedule_of(options: ChaosOptions) -> list[Fault]:
    """One round of faults, one at a time, each plane's replicas in turn; the
    short schedule has the first fault of each kind."""
    last_ai = options.ai_replicas - 1
    faults = [
        Fault("kill -9", "money[0]", "kill"),
        Fault("kill -9", "policy[1]", "kill"),
        Fault("kill -9", "gateway[0]", "kill"),
        Fault("kill -9", f"ai[{last_ai}]", "kill"),
        Fault("SIGSTOP", "triton of ai[0]", "stop_triton"),
        Fault("restart", "nats (money stream leader)", "restart_nats"),
        Fault("kill -9", "postgresql", "kill_postgres"),
        Fault("kill -9", "money[1]", "kill"),
        Fault("kill -9", "gateway[1]", "kill"),
        Fault("kill -9", "policy[0]", "kill"),
    ]
    if last_ai:
        faults.append(Fault("kill -9", "ai[0]", "kill"))
    chosen = [fault for fault in faults if fault.kind in options.faults]
    if options.schedule == "short":
        firsts: dict[str, Fault] = {}
        for fault in chosen:
            firsts.setdefault(fault.kind, fault)
        return list(firsts.values())
    return chosen


class FaultInjector:
    def __init__(
        self, stack: Stack, postgres: PrivatePostgres, options: ChaosOptions, ledger: Ledger
    ) -> None:
        self.stack = stack
        self.postgres = postgres
        self.options = options
        self.ledger = ledger

    async def run(self, stop: asyncio.Event) -> None:
        """The schedule, fault after fault, until `stop` (the full schedule
        goes round again; the short one once); then the workload stops."""
        await _sleep_unless(stop, self.options.warmup_s)
        while not stop.is_set():
            for fault in schedule_of(self.options):
                if stop.is_set():
                    return
                await self.inject(fault)
                await _sleep_unless(stop, self.options.fault_gap_s)
            if self.options.schedule == "short":
                return

    async def inject(self, fault: Fault) -> None:
        record = FaultRecord(
            fault.name, fault.target, fault.action, time.monotonic() - self.ledger.started
        )
        self.ledger.faults.append(record)
        started = time.monotonic()
        log.warning("chaos: %s %s", fault.name, fault.target)
        try:
            record.detail = await self._do(fault)
        except Exception as error:  # a fault that did not recover fails the run
            record.ok = False
            record.detail = f"{type(error).__name__}: {error}"
            log.exception("chaos: %s %s did not recover", fault.name, fault.target)
        record.recovered_s = time.monotonic() - started

    async def _do(self, fault: Fault) -> str:
        if fault.action == "kill":
            name, replica = fault.target.rstrip("]").split("[")
            killed = self.stack.kill(name, int(replica), signal.SIGKILL)
            restarted = await self.stack.restart(name, int(replica))
            return f"pid {killed.pid} killed, pid {restarted.pid} serving"
        if fault.action == "stop_triton":
            plane = self.stack.process_of("ai", 0)
            triton = tritonserver_of(plane.pid)
            if triton is None:
                return "no tritonserver (the plane scores in-process): nothing stopped"
            os.kill(triton, signal.SIGSTOP)
            try:
                await asyncio.sleep(self.options.triton_stop_s)
            finally:
                os.kill(triton, signal.SIGCONT)
            return f"pid {triton} stopped {self.options.triton_stop_s:.0f} s"
        if fault.action == "restart_nats":
            return await self._restart_nats()
        if fault.action == "kill_postgres":
            await asyncio.to_thread(self.postgres.kill)
            self.postgres.spawn()
            await asyncio.to_thread(self.postgres.wait_ready)
            return f"pid {self.postgres.pid} serving after crash recovery"
        raise ValueError(f"unknown fault {fault.action}")

    async def _restart_nats(self) -> str:
        cluster = self.stack.jetstream_cluster
        if cluster is None:
            raise RuntimeError("the stack runs no JetStream cluster")
        leader = await money_stream_leader(cluster.urls) or cluster.nodes[-1].name
        node = cluster.node(leader)
        await asyncio.to_thread(node.kill)
        node.spawn()
        deadline = time.monotonic() + self.options.start_timeout_s
        await asyncio.to_thread(node.wait_listening, self.options.start_timeout_s)
        while not await asyncio.to_thread(node.healthy):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats {leader} not current after its restart")
            await asyncio.sleep(0.2)
        return f"{leader} (the money stream's leader) killed and current again"


async def money_stream_leader(urls: list[str]) -> str:
    import nats

    client = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=3)
    try:
        info = await client.jetstream(timeout=5.0).stream_info("TRIPLANE_MONEY")
    except Exception:  # no leader right now: any node will do
        return ""
    finally:
        await client.close()
    return str(info.cluster.leader) if info.cluster and info.cluster.leader else ""


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


# ---- the run ----


def chaos_config(state_dir: Path, options: ChaosOptions) -> Config:
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir), "log_format": "text"},
        "nats": {"url": ""},
        "money": {"listen": f"127.0.0.1:{free_port()}"},
        "policy": {"listen": f"127.0.0.1:{free_port()}"},
        "ai": {
            "listen": f"127.0.0.1:{free_port()}",
            "features": {"redis_url": options.redis_url},
        },
        "gateway": {"listen": f"127.0.0.1:{free_port()}", "holdout_share": 0.0},
        "stack": {"start_timeout_s": options.start_timeout_s},
    }
    return load_config(environ={}, overrides=overrides)


def child_environ() -> dict[str, str]:
    """This process's environment without the stack's own settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}


async def run_chaos(options: ChaosOptions) -> Any:
    """The whole run; returns the report (triplane_tools.chaos_checks.Report)."""
    from triplane_tools import chaos_checks

    state_dir = options.state_dir or Path(tempfile.mkdtemp(prefix="triplane-chaos-"))
    postgres = PrivatePostgres(start_timeout_s=options.start_timeout_s)
    await asyncio.to_thread(postgres.initialise)
    postgres.spawn()
    stack: Stack | None = None
    try:
        await asyncio.to_thread(postgres.wait_ready)
        stack = Stack(
            chaos_config(state_dir, options),
            environ=child_environ(),
            replicas=2,
            replicas_of={"ai": options.ai_replicas},
            postgres_admin_dsn=postgres.admin_dsn,
            database_prefix=DATABASE_PREFIX,
            nats_cluster=True,
        )
        started = time.monotonic()
        await stack.start()
        stack_s = time.monotonic() - started
        ledger = await _drive(stack, postgres, options)
        ledger.phases_s["stack start"] = stack_s
        started = time.monotonic()
        report = await chaos_checks.check(stack, ledger, options)
        ledger.phases_s["settle and checks"] = time.monotonic() - started
        return report
    finally:
        if stack is not None:
            await stack.stop()
        await asyncio.to_thread(postgres.stop)
        if options.state_dir is None:
            shutil.rmtree(state_dir, ignore_errors=True)


async def _drive(stack: Stack, postgres: PrivatePostgres, options: ChaosOptions) -> Ledger:
    gateways = stack.replica_addresses["gateway"]
    api_key = await create_partner_key(
        stack.config, gateways[0], TENANT, display_name="chaos", state_dir=stack.state_dir
    )
    client = GatewayClient(
        "ipv4:" + ",".join(gateways),
        timeout_s=options.deadline_s,
        api_key=api_key,
        tls=stack.partner_tls(),
    )
    started = time.monotonic()
    world = await seed(
        stack.addresses["money"],
        stack.addresses["policy"],
        TENANT,
        options.customers,
        options.merchants,
        options.seed,
        tls=stack.tls_files(),
    )
    seeded_s = time.monotonic() - started
    ledger = Ledger()
    ledger.phases_s["seed"] = seeded_s
    workload = Workload(client, world, options, ledger)
    injector = FaultInjector(stack, postgres, options, ledger)
    stop = asyncio.Event()
    try:
        faults = asyncio.create_task(injector.run(stop))
        workers = [asyncio.create_task(workload.worker(i, stop)) for i in range(options.workers)]
        await _sleep_unless(stop, options.duration_s)
        if options.schedule == "short":
            # The short run lasts as long as its one round of faults.
            await faults
        stop.set()
        await asyncio.gather(faults, *workers)
        ledger.phases_s["workload under faults"] = time.monotonic() - ledger.started
        started = time.monotonic()
        await workload.finish_unanswered()
        ledger.phases_s["unanswered calls sent again"] = time.monotonic() - started
    finally:
        await client.close()
    return ledger
