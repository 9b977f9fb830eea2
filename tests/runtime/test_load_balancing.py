"""Client-side load balancing over plane replicas (issue 12 §2), with real
servers: two policy planes on one SQLite database, each on its own loopback
port, and the gateway's own channels (gateway.planes) and the typed client
pointed at both. Each replica counts the calls it served with an interceptor
of its own (the RED metric is one registry per process, so it cannot tell two
replicas of one process apart).

What this proves, and what not: one channel given two addresses
(`ipv4:127.0.0.1:p1,127.0.0.1:p2`, the static form of what a headless
Service's `dns:///` name resolves to) spreads calls over both with
round_robin, keeps to one with pick_first, keeps serving when a replica stops,
and retries UNAVAILABLE on the methods named idempotent only. That a dns:///
name resolving to several addresses does the same is gRPC's resolver feeding
the same balancer; no name here resolves to two loopback addresses (/etc/hosts
gives localhost 127.0.0.1 only), so the dns:/// test below has one address
and proves the scheme and the certificate's name check, not the spread."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.planes import CHANNEL_OPTIONS, IDEMPOTENT_PLANE_METHODS, GrpcPolicy, PlaneChannels
from policy_plane.app import PolicyPlane, build_plane
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, ConfigError, load_config
from triplane.runtime.errors import TriplaneError
from triplane.runtime.retry import RetryPolicy
from triplane.runtime.tls import (
    GATEWAY,
    channel_options,
    channel_options_for,
    files_for,
    open_channel,
)
from triplane_client.client import PolicyAdminClient

from ..policy_plane.conftest import CUSTOMER, START_US, TENANT, put_customer
from ..tls_helpers import dev_certificates, identity_files

CALLS = 40
# The dev certificates name localhost and 127.0.0.1; an address list names
# neither, so the channel is told which name the replicas must carry.
AUTHORITY = "localhost"


class CountCalls(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts the calls one replica served, by method; `refuse` names methods
    it answers UNAVAILABLE (a replica going away) without serving them."""

    def __init__(self) -> None:
        self.served: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.refuse: set[str] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method.rsplit("/", 1)[-1]
        if method in self.refuse:
            self.refused[method] += 1

            async def unavailable(request: Any, context: grpc.aio.ServicerContext) -> None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")

            return grpc.unary_unary_rpc_method_handler(unavailable)
        if not details.method.startswith("/grpc.health."):
            self.served[method] += 1
        return await continuation(details)


def _config(state_dir: Path, **grpc_config: Any) -> Config:
    dev_certificates(state_dir)
    overrides: dict[str, Any] = {
        "runtime": {"state_dir": str(state_dir)},
        "nats": {"url": ""},
    }
    if grpc_config:
        overrides["runtime"]["grpc"] = grpc_config
    return load_config(environ={}, overrides=overrides)


async def _replica(config: Config, counter: CountCalls) -> PolicyPlane:
    plane = build_plane(config, ManualClock(START_US), listen="127.0.0.1:0")
    plane.server.interceptors = [counter]
    await plane.start()
    return plane


class Replicas:
    def __init__(self, planes: list[PolicyPlane], counters: list[CountCalls]) -> None:
        self.planes = planes
        self.counters = counters

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{plane.server.port}" for plane in self.planes)

    def served(self, method: str) -> list[int]:
        return [counter.served[method] for counter in self.counters]


@pytest.fixture
async def replicas(state_dir: Path) -> AsyncIterator[Replicas]:
    """Two policy planes on one SQLite database (one state dir), on two ports."""
    config = _config(state_dir)
    counters = [CountCalls(), CountCalls()]
    planes: list[PolicyPlane] = []
    try:
        for counter in counters:
            planes.append(await _replica(config, counter))
        # Each replica learns the tenant (its directory is its own; the rows
        # are shared: the second creation and profile are replays).
        for plane in planes:
            await plane.engine.create_tenant(TENANT, "Acme")
            await put_customer(plane.engine, TENANT)
        yield Replicas(planes, counters)
    finally:
        for plane in planes:
            await plane.stop()


def _gateway_channels(config: Config, target: str) -> PlaneChannels:
    """The gateway's channels as from_config builds them (runtime.grpc), with
    the policy plane at `target`: an ipv4: list, whose first host the servers'
    certificates are checked against (triplane.runtime.tls.with_list_authority)."""
    options = channel_options_for(config, IDEMPOTENT_PLANE_METHODS, CHANNEL_OPTIONS)
    return PlaneChannels(target, target, target, tls=files_for(config, GATEWAY), options=options)


async def _profiles(policy: GrpcPolicy, calls: int) -> None:
    for _ in range(calls):
        answer = await policy.get_customer_profile(
            policy_pb2.GetCustomerProfileRequest(tenant_id=TENANT, customer_id=CUSTOMER), 5.0
        )
        assert answer.profile.customer_id == CUSTOMER


async def test_gateway_spreads_calls_over_every_replica_and_survives_one_stopping(
    replicas: Replicas, state_dir: Path
) -> None:
    config = _config(state_dir)
    assert config.runtime.grpc.load_balancing == "round_robin"  # the default
    channels = _gateway_channels(config, replicas.target)
    try:
        policy = GrpcPolicy(channels.policy)
        await _profiles(policy, CALLS)
        first, second = replicas.served("GetCustomerProfile")
        assert first + second == CALLS
        assert first > 0 and second > 0, (first, second)

        # One replica goes away: every call is answered by the other.
        await replicas.planes[1].stop()
        await _profiles(policy, CALLS)
        after = replicas.served("GetCustomerProfile")
        assert after[1] == second
        assert after[0] == first + CALLS
    finally:
        await channels.close()


async def test_pick_first_keeps_to_one_replica(replicas: Replicas, state_dir: Path) -> None:
    config = _config(state_dir, load_balancing="pick_first")
    channels = _gateway_channels(config, replicas.target)
    try:
        await _profiles(GrpcPolicy(channels.policy), CALLS)
        assert sorted(replicas.served("GetCustomerProfile")) == [0, CALLS]
    finally:
        await channels.close()


async def test_unavailable_is_retried_on_another_replica_only_where_idempotent(
    replicas: Replicas, state_dir: Path
) -> None:
    """Replica 0 answers UNAVAILABLE to everything it is sent: a call named
    idempotent (GetCustomerProfile) is retried and answered by replica 1 each
    time through the gateway's channel; one not named (ListCases, on a
    channel with the same options) is not retried."""
    config = _config(state_dir)
    for method in ("GetCustomerProfile", "ListCases"):
        replicas.counters[0].refuse.add(method)
    channels = _gateway_channels(config, replicas.target)
    try:
        # A few calls: gRPC throttles retries once about five failures more
        # than a tenth of the successes have been seen on a channel
        # (retryThrottling), so a replica that refuses everything for long is
        # not sent every call twice.
        calls = 4
        await _profiles(GrpcPolicy(channels.policy), calls)
        assert replicas.served("GetCustomerProfile") == [0, calls]
        assert replicas.counters[0].refused["GetCustomerProfile"] > 0
    finally:
        await channels.close()

    # The same options as the admin tools (the gateway may not list cases):
    # ListCases is not named, so what replica 0 refuses stays refused.
    options = channel_options_for(
        config, IDEMPOTENT_PLANE_METHODS, [("grpc.default_authority", AUTHORITY)]
    )
    async with open_channel(replicas.target, identity_files(state_dir), options) as channel:
        cases = policy_pb2_grpc.CaseServiceStub(channel)
        failed = 0
        for _ in range(CALLS):
            try:
                await cases.ListCases(policy_pb2.ListCasesRequest(tenant_id=TENANT), timeout=5.0)
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                failed += 1
    # Every call replica 0 got failed: none was tried again elsewhere.
    assert failed == replicas.counters[0].refused["ListCases"] > 0
    assert replicas.served("ListCases") == [0, CALLS - failed]


async def test_retries_are_bounded_by_maximum_attempts(replicas: Replicas, state_dir: Path) -> None:
    """Both replicas refuse: a call is tried maximum_attempts times, then the
    gateway sees the plane unavailable."""
    config = _config(
        state_dir,
        retry={"initial_interval_s": 0.01, "maximum_interval_s": 0.02, "maximum_attempts": 2},
    )
    for counter in replicas.counters:
        counter.refuse.add("GetCustomerProfile")
    channels = _gateway_channels(config, replicas.target)
    try:
        with pytest.raises(TriplaneError) as raised:
            await _profiles(GrpcPolicy(channels.policy), 1)
        assert raised.value.reason == "POLICY_UNAVAILABLE"
        refused = sum(c.refused["GetCustomerProfile"] for c in replicas.counters)
        assert refused == 2
    finally:
        await channels.close()


async def test_typed_client_spreads_calls_over_every_replica(
    replicas: Replicas, state_dir: Path
) -> None:
    client = PolicyAdminClient(replicas.target, tls=identity_files(state_dir), authority=AUTHORITY)
    try:
        for _ in range(CALLS):
            await client.list_cases(TENANT)
    finally:
        await client.close()
    first, second = replicas.served("ListCases")
    assert first + second == CALLS
    assert first > 0 and second > 0, (first, second)


async def test_dns_target_verifies_the_server_name(replicas: Replicas, state_dir: Path) -> None:
    """A dns:/// target is checked against its host name (the dev
    certificates name localhost); a name the certificate does not carry is
    refused at the handshake."""
    port = replicas.planes[0].server.port
    tls = identity_files(state_dir)
    request = policy_pb2.ListCasesRequest(tenant_id=TENANT)
    async with open_channel(f"dns:///localhost:{port}", tls, channel_options()) as channel:
        await policy_pb2_grpc.CaseServiceStub(channel).ListCases(request, timeout=5.0)
    options = channel_options(authority="not-the-plane.example")
    async with open_channel(f"dns:///localhost:{port}", tls, options) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await policy_pb2_grpc.CaseServiceStub(channel).ListCases(request, timeout=5.0)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


def test_service_config_names_only_the_idempotent_methods() -> None:
    retry = RetryPolicy(initial_interval_s=0.05, maximum_interval_s=1.0, maximum_attempts=3)
    options = dict(
        channel_options(
            retry=retry, retry_methods=[("triplane.money.v1.LedgerService", "GetEntry")]
        )
    )
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "triplane.money.v1.LedgerService", "method": "GetEntry"}]
    assert method["retryPolicy"] == {
        "maxAttempts": 3,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    assert options["grpc.service_config_disable_resolution"] == 1
    # No methods, or a single attempt: no retry policy at all.
    assert "methodConfig" not in json.loads(
        dict(channel_options(retry=retry))["grpc.service_config"]
    )


def test_config_refuses_an_unknown_policy_and_too_many_attempts(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="load_balancing"):
        _config(state_dir, load_balancing="random")
    with pytest.raises(ConfigError, match="maximum_attempts"):
        _config(
            state_dir,
            retry={"initial_interval_s": 0.05, "maximum_interval_s": 1.0, "maximum_attempts": 6},
        )
