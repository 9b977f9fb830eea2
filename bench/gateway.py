"""`make bench ONLY=gateway`: the gateway's two product flows through its
public gRPC API, every plane in its own process (money, policy, AI with a real
Triton, the gateway), against the Python gRPC ceiling measured in the same run
(a trivial grpc.aio echo server, also in its own process).

Throughput: closed loop, CONCURRENCY callers for RUN_S seconds. Latency: open
loop at half the measured maximum rate (requests start on a fixed schedule, so
queueing shows), nearest-rank percentiles. A failed call is counted
(`<flow>_errors`), never retried, and left out of the latencies.

What limits the rate: the CPU each process spends per request during the
closed loop (`<flow>_cpu_ms_per_request_<process>`, from /proc: each plane's
process and its descendants, so Triton counts with the AI plane; `client` is
this process, the load generator). Their sum against the machine's cores bounds
the throughput whatever the concurrency. The echo server's call is measured the
same way (`grpc_echo_cpu_ms_per_call`, server and client), so when both are
CPU-bound on the same cores, echo CPU / flow CPU is the most a flow's rate can
be as a share of the echo rate: the table prints it as the flow's ceiling.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from bench.common import merge_results, percentile, print_table, tree_cpu_s
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane.runtime.tls import open_channel
from triplane_sim.demo_world import World, seed
from triplane_tools.partner_keys import create_partner_key
from triplane_tools.stack import Stack

TENANT = "bench"
CONCURRENCY = 32
RUN_S = float(os.environ.get("TRIPLANE_BENCH_GATEWAY_RUN_S", "10"))
LATENCY_S = float(os.environ.get("TRIPLANE_BENCH_GATEWAY_LATENCY_S", "8"))
CUSTOMERS, MERCHANTS = 400, 40
ECHO_METHOD = "/bench.Echo/Echo"
RPC_TIMEOUT_S = 2.0

ECHO_SERVER = """
import asyncio, sys, grpc
async def main():
    async def echo(request, context):
        return request
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(sys.argv[1])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""

Call = Callable[[int], Awaitable[Any]]


class Errors:
    """Failed calls by status, so a run with errors says so instead of dying."""

    def __init__(self) -> None:
        self.by_code: dict[str, int] = {}

    def wrap(self, call: Call) -> Call:
        async def counted(index: int) -> Any:
            try:
                return await call(index)
            except grpc.aio.AioRpcError as error:
                name = error.code().name
                self.by_code[name] = self.by_code.get(name, 0) + 1
                return None

        return counted

    @property
    def total(self) -> int:
        return sum(self.by_code.values())


async def closed_loop(call: Call, run_s: float, concurrency: int) -> float:
    """Requests per second with `concurrency` callers back to back."""
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
    return done / (time.monotonic() - started)


async def open_loop(call: Call, rate_per_s: float, run_s: float) -> list[float]:
    """Latencies (ms) of requests started at `rate_per_s` on a fixed schedule."""
    latencies: list[float] = []
    interval_s = 1.0 / rate_per_s
    count = int(run_s * rate_per_s)
    started = time.monotonic()

    async def one(index: int) -> None:
        begin = time.monotonic()
        if await call(1_000_000 + index) is not None:
            latencies.append((time.monotonic() - begin) * 1000.0)

    tasks = []
    for index in range(count):
        delay = started + index * interval_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    return latencies


async def bench_echo() -> dict[str, float]:
    """The echo ceiling, and the CPU one bare call costs its server and its
    client (this process): the unit every flow's CPU is compared with."""
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, address])  # noqa: ASYNC220
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.wait_for(channel.channel_ready(), 10)
            echo = channel.unary_unary(ECHO_METHOD)
            payload = b"x" * 64

            async def call(_: int) -> Any:
                return await echo(payload, timeout=RPC_TIMEOUT_S)

            await closed_loop(call, 1.0, CONCURRENCY)
            server_before, client_before = tree_cpu_s(process.pid), time.process_time()
            started = time.monotonic()
            rate = await closed_loop(call, RUN_S, CONCURRENCY)
            calls = max(1.0, rate * (time.monotonic() - started))
            return {
                "grpc_echo_per_s": rate,
                "grpc_echo_cpu_ms_per_call_server": (tree_cpu_s(process.pid) - server_before)
                * 1000.0
                / calls,
                "grpc_echo_cpu_ms_per_call_client": (time.process_time() - client_before)
                * 1000.0
                / calls,
            }
    finally:
        process.terminate()
        process.wait(10)


# `authorization: Bearer <the tenant's API key>`, sent with every call.
Metadata = tuple[tuple[str, str], ...]


def authorize_call(stub: Any, world: World, rng: random.Random, metadata: Metadata = ()) -> Call:
    async def call(index: int) -> Any:
        customer = world.customers[index % len(world.customers)]
        merchant = world.merchants[index % len(world.merchants)]
        return await stub.AuthorizePayment(
            gw.AuthorizePaymentRequest(
                tenant_id=TENANT,
                idempotency_key=uuid.uuid4().hex,
                account_id=customer.account_id,
                credit_account_id=merchant.merchant_id,
                amount=types_pb2.Money(amount_minor=500 + index % 2000, currency="USD"),
                kind=gw.PAYMENT_KIND_PURCHASE,
                device_id=customer.devices[0],
                merchant_id=merchant.merchant_id,
                merchant_category=merchant.category,
                channel=gw.PAYMENT_CHANNEL_ECOMMERCE,
                customer=gw.Customer(
                    customer_id=world.customer_id(customer), kyc_tier=2, account_age_days=365
                ),
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
                idempotency_key=uuid.uuid4().hex,
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


async def bench_flows(state_dir: Path) -> dict[str, float]:
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir), "log_level": "WARNING"},
            "money": {"listen": f"127.0.0.1:{free_port()}"},
            "policy": {"listen": f"127.0.0.1:{free_port()}"},
            "ai": {"listen": f"127.0.0.1:{free_port()}"},
            "gateway": {
                "listen": f"127.0.0.1:{free_port()}",
                # Checked on every call as in production, never reached: the
                # benchmark measures the gateway, not the partner's limit.
                "rate_limit": {"rate_per_s": 1_000_000, "burst": 1_000_000},
            },
            "stack": {"start_timeout_s": 150.0},
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}
    async with Stack(config, environ=env) as stack:
        world = await seed(
            stack.addresses["money"],
            stack.addresses["policy"],
            TENANT,
            CUSTOMERS,
            MERCHANTS,
            tls=stack.tls_files(),
        )
        api_key = await create_partner_key(
            config, stack.addresses["gateway"], TENANT, state_dir=stack.state_dir
        )
        metadata = (("authorization", f"Bearer {api_key}"),)
        # As a partner: TLS to the gateway (the dev CA), no client certificate.
        async with open_channel(stack.addresses["gateway"], stack.partner_tls()) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            results: dict[str, float] = {}
            for name, flow in (
                ("authorize", authorize_call(stub, world, random.Random(1), metadata)),
                ("decide", decide_call(stub, world, metadata)),
            ):
                errors = Errors()
                call = errors.wrap(flow)
                await closed_loop(call, 1.0, CONCURRENCY)  # warm-up
                cpu_before = {p.name: tree_cpu_s(p.pid) for p in stack.processes}
                client_before = time.process_time()
                started = time.monotonic()
                rate = await closed_loop(call, RUN_S, CONCURRENCY)
                requests = max(1.0, rate * (time.monotonic() - started))
                spent = {"client": time.process_time() - client_before}
                for process in stack.processes:
                    spent[process.name] = tree_cpu_s(process.pid) - cpu_before[process.name]
                for process_name, spent_s in spent.items():
                    key = f"{name}_cpu_ms_per_request_{process_name}"
                    results[key] = spent_s * 1000.0 / requests
                total_ms = sum(spent.values()) * 1000.0 / requests
                results[f"{name}_cpu_ms_per_request_total"] = total_ms
                latencies = await open_loop(call, rate / 2, LATENCY_S)
                results[f"{name}_per_s"] = rate
                results[f"{name}_latency_ms_p50"] = percentile(latencies, 50)
                results[f"{name}_latency_ms_p99"] = percentile(latencies, 99)
                results[f"{name}_errors"] = float(errors.total)
                if errors.total:
                    print(f"{name}: {errors.total} failed calls {errors.by_code}", flush=True)
            return results


def main() -> None:
    echo = asyncio.run(bench_echo())
    echo_per_s = echo["grpc_echo_per_s"]
    echo_cpu_ms = (
        echo["grpc_echo_cpu_ms_per_call_server"] + echo["grpc_echo_cpu_ms_per_call_client"]
    )
    with tempfile.TemporaryDirectory(prefix="triplane-bench-gw-") as tmp:
        flows = asyncio.run(bench_flows(Path(tmp)))
    figures: dict[str, float] = {**echo, **flows}
    merge_results(figures)
    print_table(
        "gateway",
        [
            ("grpc_echo_per_s", echo_per_s, "the Python gRPC ceiling, same run"),
            (
                "authorize_per_s",
                flows["authorize_per_s"],
                f">= 0.25 x echo = {0.25 * echo_per_s:,.0f}",
            ),
            ("authorize_latency_ms_p50", flows["authorize_latency_ms_p50"], "at half max rate"),
            ("authorize_latency_ms_p99", flows["authorize_latency_ms_p99"], "<= 15 ms"),
            ("decide_per_s", flows["decide_per_s"], f">= 0.3 x echo = {0.3 * echo_per_s:,.0f}"),
            ("decide_latency_ms_p50", flows["decide_latency_ms_p50"], "at half max rate"),
            ("decide_latency_ms_p99", flows["decide_latency_ms_p99"], "<= 10 ms"),
            *(
                (key, value, "CPU per request (closed loop)")
                for key, value in flows.items()
                if "_cpu_ms_per_request_" in key and not key.endswith("_total")
            ),
            (
                "grpc_echo_cpu_ms_per_call",
                echo_cpu_ms,
                f"server {echo['grpc_echo_cpu_ms_per_call_server']:.2f} + client "
                f"{echo['grpc_echo_cpu_ms_per_call_client']:.2f}: one bare call",
            ),
            *(
                (
                    f"{flow}_cpu_ms_per_request_total",
                    flows[f"{flow}_cpu_ms_per_request_total"],
                    f"every process; CPU-bound ceiling {echo_cpu_ms / total:.2f}x echo"
                    if (total := flows[f"{flow}_cpu_ms_per_request_total"])
                    else "",
                )
                for flow in ("authorize", "decide")
            ),
            ("authorize_errors", flows["authorize_errors"], "failed calls"),
            ("decide_errors", flows["decide_errors"], "failed calls"),
        ],
    )


if __name__ == "__main__":
    main()
