"""AI plane fixtures: small training sizes, one shared tritonserver and one
running plane per test session (starting Triton costs seconds on 2 cores).
Every plane starts on a state dir bootstrapped as the dev supervisor does it
(`bootstrapped`, i.e. triplane_tools.models.ensure_bootstrap_models)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from ai_helpers import ai_config, bootstrapped, start_triton

from ai_plane.app import AiPlane
from ai_plane.triton import TritonProcess
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.tls import channel_for


@pytest.fixture(scope="session")
def shared_triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    root = tmp_path_factory.mktemp("triton")
    process = start_triton(root, ai_config(root))
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
async def running_plane(
    shared_triton: TritonProcess, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AiPlane]:
    state = tmp_path_factory.mktemp("ai_state")
    plane = AiPlane(
        bootstrapped(ai_config(state)), listen="127.0.0.1:0", shared_triton=shared_triton
    )
    await plane.start()
    try:
        yield plane
    finally:
        await plane.stop()


@pytest.fixture(scope="session")
async def channel(running_plane: AiPlane) -> AsyncIterator[grpc.aio.Channel]:
    assert running_plane.server is not None
    address = f"127.0.0.1:{running_plane.server.port}"
    async with channel_for(running_plane.config, address) as ch:
        yield ch


@pytest.fixture(scope="session")
def scoring(channel: grpc.aio.Channel) -> ai_pb2_grpc.ScoringServiceStub:
    return ai_pb2_grpc.ScoringServiceStub(channel)


@pytest.fixture(scope="session")
def registry_stub(channel: grpc.aio.Channel) -> ai_pb2_grpc.ModelRegistryServiceStub:
    return ai_pb2_grpc.ModelRegistryServiceStub(channel)
