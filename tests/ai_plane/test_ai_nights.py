"""A customer paying at night is not declined for the hour alone: the same
ordinary payment, scored by the real bootstrapped model at each of the 24
local hours, stays below the default bundle's fraud thresholds and the
default bundle allows it."""

from __future__ import annotations

import grpc
import pytest
from ai_helpers import payment

from ai_plane.app import AiPlane
from policy_plane.bundle import SHIPPED_LISTS_DIR, BundleSource, shipped_default_path
from policy_plane.bundles_registry import bundle_limits
from policy_plane.evaluation import CompiledBundle, compile_source
from policy_plane.model import (
    EvaluationInput,
    Party,
    PaymentInput,
    ScoreInput,
    SnapshotInput,
)
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime.status import parse_rpc_error

# A shop payment of 25.00 by a customer the plane knows nothing about yet (as
# in the gateway's end-to-end flows): the case that was denied at 01:55 UTC.
AMOUNT_MINOR = 2_500


@pytest.fixture(scope="module")
def default_bundle(running_plane: AiPlane) -> CompiledBundle:
    source = BundleSource(yaml_text=shipped_default_path().read_text())
    return compile_source(source, bundle_limits(running_plane.config.policy), SHIPPED_LISTS_DIR)


def _evaluation(response: pb.ScoreResponse, hour: int) -> EvaluationInput:
    """The policy input the gateway builds from this score."""
    ref = response.score_ref
    return EvaluationInput(
        tenant_id="t-night",
        idempotency_key=f"night-{hour:02d}",
        payment=PaymentInput(
            account_id="acct_night",
            kind="purchase",
            amount_minor=AMOUNT_MINOR,
            currency="USD",
            merchant_id="mer_1",
            merchant_category="5411",
            device_id="dev_1",
            customer=Party(name="tok_name_1", country="US"),
            counterparty=Party(name="Corner Shop", country="US"),
        ),
        snapshot=SnapshotInput(
            kyc_tier=2,
            kyc_country="US",
            score=ScoreInput(
                model=ref.model,
                version=ref.version,
                source=ref.source,
                score=ref.score,
                score_id=ref.score_id,
            ),
            account_age_days=400,
            features={f.name: f.value for f in response.features},
        ),
    )


async def test_an_ordinary_payment_is_allowed_at_every_local_hour(
    scoring: ai_pb2_grpc.ScoringServiceStub, default_bundle: CompiledBundle
) -> None:
    thresholds = default_bundle.spec.parameters
    for hour in range(24):
        request = pb.ScoreRequest(
            payment=payment(
                tenant_id="t-night",
                account_id="acct_night",
                amount_minor=AMOUNT_MINOR,
                merchant_category="5411",
                local_hour=hour,
            )
        )
        response = await scoring.Score(request, timeout=5)
        features = {f.name: f.value for f in response.features}
        # The customer's own hour is what the model read (not the UTC one).
        assert features["hour_of_day"] == hour
        assert response.score_ref.source in ("triton", "in_process"), response.fallback_reason
        assert response.score_ref.score < thresholds["score_step_up"], hour
        verdict = default_bundle.evaluate(_evaluation(response, hour))
        assert verdict.outcome == "allow", (hour, verdict.reason_codes)
        assert not [c for c in verdict.reason_codes if c.startswith("FRAUD_")], hour


async def test_a_local_hour_out_of_range_is_refused_naming_it(
    scoring: ai_pb2_grpc.ScoringServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.Score(pb.ScoreRequest(payment=payment(local_hour=24)), timeout=5)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert parse_rpc_error(caught.value) == ("LOCAL_HOUR_INVALID", "payment.local_hour")
