"""PromoteModel and RollbackModel record who approved the move and why
(issue 15): on the version, in the registry (any replica on its store reads
it), served in ModelVersion.approvals; empty is allowed (the admin CLI); an
overlong actor or reason is refused naming the field and changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ai_plane import codec
from ai_plane.app import AiPlane
from ai_plane.registry import ModelState, Registry
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.db import Database
from triplane.runtime.status import parse_rpc_error


@pytest.fixture(params=["file", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if request.param == "file":
        yield "file", ""
    elif request.param == "sqlite":
        yield "sqlite", str(tmp_path / "registry.db")
    else:
        yield "postgres", request.getfixturevalue("pg_dsn")


def _open(root: Path, backend: tuple[str, str], clock: ManualClock) -> Registry:
    kind, where = backend
    if kind == "file":
        return Registry(root, clock)
    return Registry(root, clock, kind, Database(kind, where, readers=1))


def test_promotions_and_a_rollback_record_who_and_why(
    tmp_path: Path, backend: tuple[str, str]
) -> None:
    clock = ManualClock(5_000_000)
    registry = _open(tmp_path / "r", backend, clock)
    try:
        versions = [
            registry.register("m", text, {"generator_seed": 1}, {}, ["f"], {})[0].version
            for text in ("one", "two")
        ]
        for version in versions:
            registry.transition("m", version, ModelState.APPROVED, "ana", f"v{version} checked")
            clock.advance(1.0)
            registry.transition("m", version, ModelState.LIVE)  # the CLI: no one named
        clock.advance(1.0)
        registry.rollback("m", "bo", "v2 scores drift")
    finally:
        registry.close()
    reopened = _open(tmp_path / "r", backend, clock)  # a restart, or another replica
    try:
        first = codec.model_version_pb(reopened.get("m", versions[0]))
        assert [(a.state, a.rollback, a.actor, a.reason) for a in first.approvals] == [
            (pb.MODEL_STATE_APPROVED, False, "ana", "v1 checked"),
            (pb.MODEL_STATE_LIVE, False, "", ""),
            (pb.MODEL_STATE_LIVE, True, "bo", "v2 scores drift"),
        ]
        assert [a.at.ToMicroseconds() for a in first.approvals] == [5_000_000, 6_000_000, 8_000_000]
        second = reopened.get("m", versions[1])
        assert [(a.state, a.actor) for a in second.approvals] == [
            (ModelState.APPROVED, "ana"),
            (ModelState.LIVE, ""),
        ]
    finally:
        reopened.close()


async def test_an_overlong_approval_is_refused_naming_the_field(
    running_plane: AiPlane, registry_stub: ai_pb2_grpc.ModelRegistryServiceStub
) -> None:
    live = await registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="payment_risk"))
    for request, field in (
        (
            pb.PromoteModelRequest(
                model="payment_risk",
                version=live.version.version,
                target_state=pb.MODEL_STATE_RETIRED,
                actor="x" * 257,
            ),
            "actor",
        ),
        (
            pb.PromoteModelRequest(
                model="payment_risk",
                version=live.version.version,
                target_state=pb.MODEL_STATE_RETIRED,
                reason="x" * 2049,
            ),
            "reason",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await registry_stub.PromoteModel(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert parse_rpc_error(caught.value) == ("FIELD_TOO_LONG", field)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await registry_stub.RollbackModel(
            pb.RollbackModelRequest(model="payment_risk", reason="x" * 2049)
        )
    assert parse_rpc_error(caught.value) == ("FIELD_TOO_LONG", "reason")
    after = await registry_stub.GetModelVersion(pb.GetModelVersionRequest(model="payment_risk"))
    assert after.version == live.version  # nothing moved
