"""ActivateBundle and SetShadowBundle record who approved the move and why
(issue 15): the bundle's approvals in GetActiveBundle and ListBundles answers,
kept in the policy store (a restarted or other replica reads them), empty
from a caller that sends neither; an overlong actor or reason is refused
naming the field and moves nothing."""

from __future__ import annotations

import grpc
import pytest

from policy_plane.app import PolicyPlane
from policy_plane.bundle import shipped_default_path
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime.clock import ManualClock
from triplane.runtime.status import parse_rpc_error

from .conftest import Stubs


async def test_slot_moves_carry_the_approver_and_reason(
    plane: PolicyPlane, stubs: Stubs, clock: ManualClock
) -> None:
    default = (await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())).live
    strict_yaml = (
        shipped_default_path().read_text().replace("score_review: 0.70", "score_review: 0.05")
    )
    strict = (
        await stubs.bundles.LoadBundle(pb.LoadBundleRequest(content=strict_yaml, label="strict"))
    ).bundle
    clock.advance(10.0)
    activated = await stubs.bundles.ActivateBundle(
        pb.ActivateBundleRequest(version=strict.version, actor="ana", reason="tighter review")
    )
    [approval] = activated.bundle.approvals
    assert (approval.slot, approval.set, approval.actor, approval.reason) == (
        "live",
        True,
        "ana",
        "tighter review",
    )
    assert approval.at.ToMicroseconds() == clock.now_us()
    # The admin CLI sends neither: allowed, recorded as such.
    await stubs.bundles.ActivateBundle(pb.ActivateBundleRequest(version=default.version))
    await stubs.bundles.SetShadowBundle(
        pb.SetShadowBundleRequest(version=strict.version, actor="bo", reason="compare")
    )
    await stubs.bundles.SetShadowBundle(
        pb.SetShadowBundleRequest(version="", actor="bo", reason="enough")
    )
    listed = {
        b.version: b for b in (await stubs.bundles.ListBundles(pb.ListBundlesRequest())).bundles
    }
    assert [(a.slot, a.set, a.actor, a.reason) for a in listed[strict.version].approvals] == [
        ("live", True, "ana", "tighter review"),
        ("shadow", True, "bo", "compare"),
        ("shadow", False, "bo", "enough"),
    ]
    assert [(a.slot, a.actor) for a in listed[default.version].approvals][-1] == ("live", "")
    # Kept in the store: what a restarted plane or another replica reads.
    again = plane.engine.bundles.info(strict.version)
    assert [a.actor for a in again.approvals] == ["ana", "bo", "bo"]

    before = await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())
    for call, field in (
        (pb.ActivateBundleRequest(version=strict.version, actor="x" * 257), "actor"),
        (pb.ActivateBundleRequest(version=strict.version, reason="x" * 2049), "reason"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stubs.bundles.ActivateBundle(call)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert parse_rpc_error(caught.value) == ("FIELD_TOO_LONG", field)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.bundles.SetShadowBundle(
            pb.SetShadowBundleRequest(version=strict.version, actor="x" * 257)
        )
    assert parse_rpc_error(caught.value) == ("FIELD_TOO_LONG", "actor")
    after = await stubs.bundles.GetActiveBundle(pb.GetActiveBundleRequest())
    assert after == before
    assert len(plane.engine.bundles.info(strict.version).approvals) == 3
