"""NATS for real durability: a 3-node JetStream cluster on loopback
(triplane_tools.natsd.NatsCluster: routes between three nats-servers, each
with its own store dir, `sync_interval: always`) holding the money stream of
the spine as the runtime makes it with nats.stream_replicas: 3.

Under load (many publishes in flight), the node leading the stream is killed
with SIGKILL once half of the messages are acknowledged; publishing goes on,
each message retried with its Nats-Msg-Id until it is acknowledged (what the
outbox does). Afterwards a fresh consumer reads the stream back: every
acknowledged message is there exactly once. Every wait is on an observable
event (an acknowledgement count, the health endpoint, a leader named by the
stream's info); nothing is timed."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
import pytest
import yaml
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.client import JetStreamContext

from triplane.runtime import bus
from triplane.runtime.config import load_config
from triplane.runtime.net import free_port
from triplane_tools.natsd import NatsCluster
from triplane_tools.stack import EFFECTIVE_CONFIG_FILE, Stack

pytestmark = pytest.mark.nats

STREAM = "TRIPLANE_MONEY"
MESSAGES = 1200
LAST_QUARTER = MESSAGES * 3 // 4
IN_FLIGHT = 48
# Guards against a hang, never a measurement: a message that cannot be
# acknowledged after this many tries fails the test with the last error.
MAX_TRIES = 400


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "nats-cluster", size=3)
    nodes.start()
    try:
        yield nodes
    finally:
        nodes.stop()


def _varz(cluster: NatsCluster, index: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{cluster.nodes[index].monitor_port}/varz"
    with urllib.request.urlopen(url, timeout=5) as answer:
        data: dict[str, Any] = json.load(answer)
        return data


async def _connect(urls: list[str]) -> NATS:
    return await nats.connect(
        servers=urls,
        connect_timeout=2,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        allow_reconnect=True,
    )


async def _publish_until_acked(
    js: JetStreamContext, index: int, acked: set[int], counter: list[int]
) -> None:
    last_error: Exception | None = None
    for _ in range(MAX_TRIES):
        try:
            ack = await js.publish(
                f"triplane.money.test.{index % 7}",
                str(index).encode(),
                timeout=2.0,
                headers={"Nats-Msg-Id": f"msg-{index}"},
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as error:
            # No leader yet, the connection moving to another node, a timeout:
            # the same message again, with the same id (deduplicated if the
            # earlier try was in fact stored).
            last_error = error
            await asyncio.sleep(0.05)
            continue
        assert ack.stream == STREAM
        acked.add(index)
        counter[0] += 1
        return
    raise AssertionError(f"message {index} never acknowledged; last error: {last_error!r}")


async def _stream_info_with_leader(js: JetStreamContext) -> StreamInfo:
    """The stream's info once a leader answers it (waits out an election)."""
    last_error: Exception | None = None
    for _ in range(MAX_TRIES):
        try:
            info = await js.stream_info(STREAM)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as error:
            last_error = error
            await asyncio.sleep(0.05)
            continue
        if info.cluster is not None and info.cluster.leader:
            return info
        await asyncio.sleep(0.05)
    raise AssertionError(f"the stream has no leader; last error: {last_error!r}")


async def _consumer_once_created(js: JetStreamContext) -> JetStreamContext.PullSubscription:
    """A fresh pull consumer on the stream, once the cluster can create one:
    right after a node is killed, the metadata leader may still be elected
    (the stream's own leader answering is not enough) and the create times
    out; each try waits out the election like _stream_info_with_leader."""
    last_error: Exception | None = None
    for _ in range(MAX_TRIES):
        try:
            return await js.pull_subscribe(
                "triplane.money.>",
                durable=None,
                stream=STREAM,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT
                ),
            )
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as error:
            last_error = error
            await asyncio.sleep(0.05)
    raise AssertionError(f"no consumer could be created; last error: {last_error!r}")


def _leader(info: StreamInfo) -> str:
    assert info.cluster is not None and info.cluster.leader
    return str(info.cluster.leader)


async def test_r3_stream_keeps_every_acknowledged_message_when_its_leader_is_killed(
    cluster: NatsCluster,
) -> None:
    for index in range(3):
        assert _varz(cluster, index)["jetstream"]["config"]["sync_always"] is True

    config = load_config(environ={})
    nats_config = msgspec.structs.replace(config.nats, stream_replicas=3)
    client = await _connect(cluster.urls)
    try:
        js = client.jetstream(timeout=5.0)
        await bus.ensure_streams(js, nats_config, [STREAM])
        info = await _stream_info_with_leader(js)
        assert info.config.num_replicas == 3
        assert info.cluster is not None and len(info.cluster.replicas or []) == 2

        acked: set[int] = set()
        counter = [0]
        half_acked = asyncio.Event()
        kill_done = asyncio.Event()
        killed: list[str] = []

        async def killer() -> None:
            await half_acked.wait()
            leader = _leader(await _stream_info_with_leader(js))
            node = cluster.node(leader)
            await asyncio.to_thread(node.kill)
            killed.append(leader)
            kill_done.set()

        async def publisher(worker: int) -> None:
            for index in range(worker, MESSAGES, IN_FLIGHT):
                if index >= LAST_QUARTER:
                    # So that the kill lands mid-way whatever the speed: the
                    # last quarter goes out only once the leader is dead
                    # (the second quarter is in flight while it dies).
                    await kill_done.wait()
                await _publish_until_acked(js, index, acked, counter)
                if counter[0] >= MESSAGES // 2:
                    half_acked.set()

        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(publisher(worker) for worker in range(IN_FLIGHT)))
        await kill_task
    finally:
        await client.close()

    # The kill happened while publishing went on, and every message was acked.
    assert len(killed) == 1
    assert acked == set(range(MESSAGES))

    # A fresh connection, through the nodes still running, and a fresh consumer.
    survivors = [node.url for node in cluster.nodes if node.running]
    assert len(survivors) == 2
    reader = await _connect(survivors)
    try:
        js = reader.jetstream(timeout=5.0)
        info = await _stream_info_with_leader(js)
        assert info.cluster is not None and info.cluster.leader != killed[0]
        assert info.state.messages == MESSAGES
        consumer = await _consumer_once_created(js)
        seen: list[int] = []
        while len(seen) < info.state.messages:
            for message in await consumer.fetch(200, timeout=5.0):
                seen.append(int(message.data))
                await message.ack()
    finally:
        await reader.close()

    assert len(seen) == len(set(seen)), "a message is in the stream twice"
    assert set(seen) == acked


async def test_the_stack_runs_its_planes_on_the_cluster_with_r3_streams(tmp_path: Path) -> None:
    """`triplane up --nats-cluster`: the supervisor starts the three nodes,
    the planes get R3 streams, and stopping the stack stops every node."""
    state_dir = tmp_path / "state"
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": ""},
            "money": {"listen": f"127.0.0.1:{free_port()}"},
            "stack": {"planes": [{"name": "money", "module": "money_plane"}]},
        },
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE")}
    environ.pop("NATS_URL", None)
    stack = Stack(config, environ=environ, nats_cluster=True)
    await stack.start()
    try:
        effective = yaml.safe_load((state_dir / EFFECTIVE_CONFIG_FILE).read_text())
        assert effective["nats"]["stream_replicas"] == 3
        cluster = stack._nats_cluster
        assert cluster is not None and all(node.running for node in cluster.nodes)
        assert stack.nats_url in cluster.urls
        client = await _connect(cluster.urls)
        try:
            js = client.jetstream(timeout=5.0)
            await bus.ensure_streams(js, stack.config.nats, [STREAM])
            info = await _stream_info_with_leader(js)
            assert info.config.num_replicas == 3
        finally:
            await client.close()
    finally:
        await stack.stop()
    assert not any(node.running for node in cluster.nodes)
