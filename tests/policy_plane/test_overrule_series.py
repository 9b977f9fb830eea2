"""The human-overrule rate over time (CaseService.GetOverruleSeries): a
tenant's resolved cases per bucket, with and without a model suggestion, and
those resolved against it; counted from case_resolutions (written with the
resolution, backfilled for cases resolved before it existed), on SQLite and
PostgreSQL, and served over gRPC with bad windows refused naming the field."""

from __future__ import annotations

import grpc
import pytest

from policy_plane.app import PolicyPlane
from policy_plane.engine import PolicyEngine
from triplane.common.v1 import types_pb2
from triplane.policy.v1 import policy_pb2 as pb
from triplane.runtime import codec as wire
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.status import parse_rpc_error

from .conftest import OTHER_TENANT, START_US, TENANT, Stubs, payment_input
from .test_case_approvals import payout_input

DAY_US = 86_400_000_000
HOUR_S = 3600


async def resolved(engine: PolicyEngine, key: str, score: float | None, resolution: str) -> None:
    """A purchase scored `score` (decline suggested from 0.7), or a payout
    without a score (no suggestion), sent to review and resolved so."""
    inp = payment_input(key, score=score) if score is not None else payout_input(key)
    decision, _ = await engine.evaluate(inp)
    assert decision.record.verdict.outcome == "review", decision.record.verdict.reason_codes
    case_id = decision.record.case_id
    await engine.claim_case(TENANT, case_id, "ana")
    await engine.resolve_case(TENANT, case_id, "ana", resolution, "checked")


def counts(engine: PolicyEngine, start_us: int, end_us: int) -> list[tuple[int, int, int]]:
    series = engine.cases.overrule_series(TENANT, start_us, end_us, 0)
    return [(b.resolved, b.with_suggestion, b.overruled) for b in series.buckets]


async def test_series_counts_resolutions_per_day_and_the_backfill_finds_older_ones(
    any_engine: PolicyEngine, clock: ManualClock
) -> None:
    engine = any_engine
    await resolved(engine, "o-1", 0.75, "approve")  # against decline: overruled
    clock.advance(HOUR_S)
    await resolved(engine, "o-2", 0.8, "decline")  # as suggested
    await resolved(engine, "o-3", None, "approve")  # no suggestion: not counted in the rate
    clock.advance(2 * 86_400)
    await resolved(engine, "o-4", 0.85, "approve")  # overruled, two days later

    assert counts(engine, START_US, START_US + 3 * DAY_US) == [(3, 2, 1), (0, 0, 0), (1, 1, 1)]
    series = engine.cases.overrule_series(TENANT, START_US, START_US + 3 * DAY_US, 0)
    total = series.total
    assert (total.resolved, total.with_suggestion, total.overruled) == (4, 3, 2)
    stats = engine.cases.overrule_stats(TENANT)
    assert (stats.resolved_with_suggestion, stats.overruled) == (3, 2)
    # The window's end is exclusive (the last resolution was at now); the
    # last bucket may be partial; hourly buckets split the first day.
    assert counts(engine, START_US, clock.now_us()) == [(3, 2, 1), (0, 0, 0), (0, 0, 0)]
    hourly = engine.cases.overrule_series(TENANT, START_US, START_US + 2 * HOUR_S * 10**6, HOUR_S)
    assert [(b.resolved, b.overruled) for b in hourly.buckets] == [(1, 1), (2, 0)]
    # Another tenant's window is empty.
    other = engine.cases.overrule_series(OTHER_TENANT, START_US, START_US + DAY_US, 0)
    assert [b.resolved for b in other.buckets] == [0]

    # Cases resolved before case_resolutions existed: the backfill indexes
    # them once, from the cases' bodies, and records that it is done.
    with engine.store.db.tx() as tx:
        tx.execute("DELETE FROM case_resolutions")
        tx.execute("DELETE FROM case_resolutions_backfill")
    assert counts(engine, START_US, START_US + 3 * DAY_US) == [(0, 0, 0)] * 3
    assert engine.cases.backfill_resolutions() == 4
    assert counts(engine, START_US, START_US + 3 * DAY_US) == [(3, 2, 1), (0, 0, 0), (1, 1, 1)]
    assert engine.cases.backfill_resolutions() == 0


@pytest.mark.parametrize(
    ("start_us", "end_us", "bucket_s", "reason", "field"),
    [
        (0, START_US, 0, "FIELD_REQUIRED", "start_time"),
        (START_US, 0, 0, "FIELD_REQUIRED", "end_time"),
        (START_US, START_US, 0, "WINDOW_INVALID", "end_time"),
        (START_US, START_US + DAY_US, 59, "BUCKET_INVALID", "bucket_seconds"),
        (START_US, START_US + 1001 * DAY_US, 0, "TOO_MANY_BUCKETS", "bucket_seconds"),
    ],
)
async def test_bad_windows_are_refused_naming_the_field(
    engine: PolicyEngine, start_us: int, end_us: int, bucket_s: int, reason: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        engine.cases.overrule_series(TENANT, start_us, end_us, bucket_s)
    assert (caught.value.reason, caught.value.field) == (reason, field)


async def expect_error(call: object, reason: str, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert parse_rpc_error(caught.value) == (reason, field)


def evaluate_request(key: str, score: float) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(
        tenant_id=TENANT,
        idempotency_key=key,
        payment=pb.Payment(
            account_id="acct-1",
            credit_account_id="merchant-1",
            kind=pb.PAYMENT_KIND_PURCHASE,
            amount=types_pb2.Money(amount_minor=2_500, currency="USD"),
            merchant_id="m-1",
            merchant_category="5411",
            customer=pb.Party(name="Jane Example", country="US"),
            counterparty=pb.Party(name="Corner Shop", country="US"),
            customer_id="cust-1",
        ),
        snapshot=pb.ContextSnapshot(
            kyc=pb.KycInfo(tier=2, country="US"),
            model_score=types_pb2.ModelScoreRef(
                model="payment_risk", version="3", source="triton", score=score
            ),
            account_age_days=400,
        ),
    )


async def test_get_overrule_series_over_grpc(
    plane: PolicyPlane, stubs: Stubs, clock: ManualClock
) -> None:
    for key, resolution in [("g-1", pb.RESOLUTION_APPROVE), ("g-2", pb.RESOLUTION_DECLINE)]:
        decision = (await stubs.policy.Evaluate(evaluate_request(key, 0.8))).decision
        assert decision.outcome == pb.OUTCOME_REVIEW and decision.case_id
        await stubs.cases.ClaimCase(
            pb.ClaimCaseRequest(tenant_id=TENANT, case_id=decision.case_id, reviewer="ana")
        )
        await stubs.cases.ResolveCase(
            pb.ResolveCaseRequest(
                tenant_id=TENANT,
                case_id=decision.case_id,
                reviewer="ana",
                resolution=resolution,
                note="checked",
            )
        )
        clock.advance(86_400)
    answer = await stubs.cases.GetOverruleSeries(
        pb.GetOverruleSeriesRequest(
            tenant_id=TENANT,
            start_time=wire.timestamp(START_US),
            end_time=wire.timestamp(START_US + 2 * DAY_US),
        )
    )
    assert [
        (wire.micros(b.start, "start"), b.resolved, b.with_suggestion, b.overruled, b.overrule_rate)
        for b in answer.buckets
    ] == [(START_US, 1, 1, 1, 1.0), (START_US + DAY_US, 1, 1, 0, 0.0)]
    total = answer.total
    assert (total.resolved, total.with_suggestion, total.overruled) == (2, 2, 1)
    assert total.overrule_rate == 0.5

    await expect_error(
        stubs.cases.GetOverruleSeries(
            pb.GetOverruleSeriesRequest(
                tenant_id=TENANT,
                start_time=wire.timestamp(START_US + DAY_US),
                end_time=wire.timestamp(START_US),
            )
        ),
        "WINDOW_INVALID",
        "end_time",
    )
    await expect_error(
        stubs.cases.GetOverruleSeries(
            pb.GetOverruleSeriesRequest(
                tenant_id=TENANT,
                start_time=wire.timestamp(START_US),
                end_time=wire.timestamp(START_US + DAY_US),
                bucket_seconds=10,
            )
        ),
        "BUCKET_INVALID",
        "bucket_seconds",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stubs.cases.GetOverruleSeries(
            pb.GetOverruleSeriesRequest(
                tenant_id="nobody",
                start_time=wire.timestamp(START_US),
                end_time=wire.timestamp(START_US + DAY_US),
            )
        )
    assert parse_rpc_error(caught.value)[1] == "tenant_id"
