"""The policy plane's Prometheus endpoint (policy.metrics_listen), scraped
over HTTP from a real plane after real calls: RED per RPC with the codes
callers saw, decisions by outcome and the decision log's lag."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from policy_plane.app import PolicyPlane, build_plane
from tests.metrics_scrape import scrape, value
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.clock import ManualClock
from triplane.runtime.net import free_port
from triplane.runtime.tls import channel_for

from .conftest import OTHER_TENANT, TENANT, Stubs, make_config, put_customer
from .test_grpc import request

SERVICE = "triplane.policy.v1.PolicyService"


@pytest.fixture
async def served(state_dir: Path, clock: ManualClock) -> AsyncIterator[PolicyPlane]:
    """A real policy plane (no NATS) serving metrics on a free port."""
    config = make_config(state_dir, metrics_listen=f"127.0.0.1:{free_port()}")
    plane = build_plane(config, clock, listen="127.0.0.1:0")
    await plane.start()
    try:
        await plane.engine.create_tenant(TENANT, "Acme")
        await plane.engine.create_tenant(OTHER_TENANT, "Globex")
        await put_customer(plane.engine, TENANT)
        yield plane
    finally:
        await plane.stop()


async def test_metrics_endpoint_counts_calls_decisions_and_log_lag(served: PolicyPlane) -> None:
    listen = served.config.policy.metrics_listen
    before = await scrape(listen)
    async with channel_for(served.config, f"127.0.0.1:{served.server.port}") as channel:
        stubs = Stubs(channel)
        allowed = await stubs.policy.Evaluate(request("metrics-1"))
        replayed = await stubs.policy.Evaluate(request("metrics-1"))
        assert replayed.replayed and replayed.decision == allowed.decision
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.policy.Evaluate(request("metrics-2", amount_minor=-5))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stubs.policy.Evaluate(request("metrics-3", tenant_id="nobody"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    after = await scrape(listen)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def rpcs(code: str) -> float:
        labels = {"plane": "policy_plane", "method": f"{SERVICE}/Evaluate", "code": code}
        return moved("triplane_rpc_requests_total", **labels)

    assert (rpcs("OK"), rpcs("INVALID_ARGUMENT"), rpcs("NOT_FOUND")) == (2, 1, 1)
    duration = {"plane": "policy_plane", "method": f"{SERVICE}/Evaluate"}
    assert moved("triplane_rpc_duration_seconds_count", **duration) == 4
    assert allowed.decision.outcome == pb.OUTCOME_ALLOW
    # The replay is no new decision.
    assert moved("triplane_policy_decisions_total", outcome="allow") == 1
    # Both Evaluates that reached the log waited for it (the replay too).
    assert moved("triplane_policy_decision_log_append_seconds_count") == 2
    assert value(after, "triplane_policy_decision_log_waiting_records") == 0
