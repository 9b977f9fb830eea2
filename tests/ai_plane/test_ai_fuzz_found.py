"""What the fuzz suite (tests/fuzz) found in the AI plane, pinned through the
real gRPC server with a real Triton behind it."""

from __future__ import annotations

import grpc
import pytest
from ai_helpers import payment

from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.status import parse_rpc_error


async def test_score_refuses_the_offer_propensity_model(
    scoring: ai_pb2_grpc.ScoringServiceStub,
) -> None:
    """The propensity model ranks offers; fed a payment's risk vector it
    failed inside the scorer and Score answered INTERNAL."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.Score(pb.ScoreRequest(payment=payment(), model="offer_propensity"), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert parse_rpc_error(caught.value) == ("MODEL_NOT_FOR_SCORE", "model")


async def test_an_error_quoting_a_huge_value_still_reaches_the_caller(
    registry_stub: ai_pb2_grpc.ModelRegistryServiceStub,
) -> None:
    """A 4,097-character model name used to come back quoted in full in the
    status, over the client's trailer limit: the caller saw RESOURCE_EXHAUSTED
    and could not read the reason. The status is bounded; the reason arrives."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.RollbackModel(pb.RollbackModelRequest(model=" " * 4097), timeout=5)
    assert caught.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    reason, _ = parse_rpc_error(caught.value)
    assert reason
