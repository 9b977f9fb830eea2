"""Off-policy evaluation through a real AI plane: EstimatePolicyValue and
`triplane ai ope` read the learner's exposure log (LearnerReward envelopes on
TRIPLANE_AI, its own NATS server per test), and PromoteModel's gate refuses a
candidate the log shows worse, unless forced.

The log is written here as the learner writes it (ai_plane/README.md,
"Exposure log"): rankings of three catalog offers chosen uniformly (logged
probability 1/3), rewarded 1 when the offer shown was the most valuable of
the three. Two candidate versions of offer_propensity are trained on data
where the value decides: `good` predicts the most valuable offer best (its
true value on this log is 1), `bad` was trained on the opposite labels (its
true value is 0)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import lightgbm as lgb
import numpy as np
import pytest
from ai_helpers import ai_config, bootstrapped
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ai_plane import cli, learner, ope_log
from ai_plane.app import AiPlane, registry_dir
from ai_plane.features import (
    PROPENSITY_CONTEXT,
    PROPENSITY_FEATURES,
    OfferEntry,
    offer_vector,
    propensity_context,
)
from ai_plane.registry import ModelRecord, Registry
from ai_plane.triton import TritonProcess
from triplane.ai.v1 import ai_pb2 as pb
from triplane.ai.v1 import ai_pb2_grpc
from triplane.runtime import bus
from triplane.runtime import codec as wire
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for
from triplane_sim import synth
from triplane_tools.natsd import EmbeddedNats

MODEL = "offer_propensity"
TENANT = "acme-ope"
ARMS = ("cashback_grocery", "savings_roundup", "credit_line_increase", "loyalty_boost")


@asynccontextmanager
async def plane(
    tmp_path: Path, triton: TritonProcess, ope: dict[str, object] | None = None
) -> AsyncIterator[tuple[AiPlane, ai_pb2_grpc.ModelRegistryServiceStub, object]]:
    """A plane on its own NATS (so the log holds only what the test writes),
    its registry stub and a JetStream context."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        config = bootstrapped(
            ai_config(
                tmp_path / "ai",
                {"ope": {"min_rounds": 50, **(ope or {})}},
                nats_url=server.url,
            )
        )
        running = AiPlane(config, listen="127.0.0.1:0", shared_triton=triton)
        await running.start()
        nc = await bus.connect(config.nats, "test-ope")
        try:
            await bus.ensure_streams(nc.jetstream(), config.nats, ["TRIPLANE_AI"])
            assert running.server is not None
            address = f"127.0.0.1:{running.server.port}"
            async with channel_for(config, address) as channel:
                yield running, ai_pb2_grpc.ModelRegistryServiceStub(channel), nc.jetstream()
        finally:
            await nc.close()
            await running.stop()
    finally:
        server.stop()


def _candidate(config: Config, flipped: bool, seed: int) -> tuple[ModelRecord, lgb.Booster]:
    """A draft offer_propensity version whose prediction rises (or, flipped,
    falls) with the offer's value, registered as TrainModel would."""
    rng = np.random.default_rng(seed)
    rows = rng.random((4000, len(PROPENSITY_FEATURES)))
    rows[:, 0] = rng.uniform(np.log1p(100), np.log1p(100_000), size=len(rows))
    labels = (rng.random(len(rows)) < 1 / (1 + np.exp(-1.5 * (rows[:, 0] - 8.0)))).astype(int)
    booster = lgb.train(
        {"objective": "binary", "verbose": -1, "seed": seed, "num_leaves": 4},
        lgb.Dataset(
            rows, 1 - labels if flipped else labels, feature_name=list(PROPENSITY_FEATURES)
        ),
        num_boost_round=40,
    )
    registry = Registry(registry_dir(config), SystemClock())
    live = registry.live(MODEL)
    assert live is not None
    record, created = registry.register(
        MODEL,
        booster.model_to_string(),
        dict(live.lineage),
        {"roc_auc": 1.0, "pr_auc": 1.0, "positive_rate": 0.5},
        list(PROPENSITY_FEATURES),
        live.baselines,
    )
    assert created
    return record, booster


def _best(booster: lgb.Booster, logged: pb.LearnerExposure) -> list[int]:
    """The arms a candidate rates best in a logged ranking (ties: several)."""
    rounds, _ = ope_log.counted_rounds([pb.LearnerReward(rank_id="x", exposure=logged)])
    scores = np.asarray(booster.predict(ope_log.propensity_rows(rounds[0])), dtype=np.float64)
    return [int(i) for i in np.flatnonzero(scores == scores.max())]


def _exposure_log(
    rounds: int, seed: int, good: lgb.Booster, bad: lgb.Booster
) -> list[pb.LearnerReward]:
    """The learner's log: three offers of distinct value per ranking, one
    chosen uniformly, reward 1 when it was the one `good` rates best. Only
    rankings where `good` and `bad` each rate one arm best, not the same,
    are kept: good's true value on the log is 1, bad's 0."""
    rng = np.random.default_rng(seed)
    now_us = SystemClock().now_us()
    log: list[pb.LearnerReward] = []
    i = 0
    while len(log) < rounds:
        i += 1
        offers = rng.choice(len(ARMS), size=3, replace=False)
        values = rng.choice(np.arange(500, 90_000, 500), size=3, replace=False)
        # Written as the learner writes them (ai_plane/learner.py).
        arms = [
            pb.LearnerArm(
                offer_id=ARMS[offer],
                features=learner.arm_features(
                    ARMS[offer],
                    synth.CATALOG[ARMS[offer]].product,
                    int(value),
                    dict(synth.CATALOG[ARMS[offer]].attributes),
                    0.2,
                ),
                probability=1 / 3,
                expected_reward=0.3,
                reward_if_converted=1.0,
            )
            for offer, value in zip(offers, values, strict=True)
        ]
        context = learner.context_features(
            {"cart": float(rng.random())},
            "checkout",
            pb.CHANNEL_IN_APP,
            "US",
            int(rng.integers(24)),
            [float(v) for v in rng.random(len(PROPENSITY_CONTEXT) - 2)],
        )
        chosen = int(rng.integers(3))
        rank_id = f"r{seed}-{i}"
        exposure = pb.LearnerExposure(
            rank_id=rank_id,
            tenant_id=TENANT,
            model_key=TENANT,
            surface="checkout",
            context=context,
            arms=arms,
            chosen_index=chosen,
            chosen_offer_id=arms[chosen].offer_id,
            chosen_probability=1 / 3,
            policy="test_uniform",
            ranked_at=wire.timestamp(now_us - 60_000_000),
        )
        best, worst = _best(good, exposure), _best(bad, exposure)
        if len(best) != 1 or len(worst) != 1 or best == worst:
            continue
        log.append(
            pb.LearnerReward(
                rank_id=rank_id,
                tenant_id=TENANT,
                model_key=TENANT,
                offer_id=arms[chosen].offer_id,
                arm_index=chosen,
                kind=pb.OUTCOME_KIND_CONVERTED,
                reward=1.0 if chosen == best[0] else 0.0,
                probability=1 / 3,
                outcome_id=f"o{seed}-{i}",
                exposure=exposure,
            )
        )
    return log


async def _publish(js: object, log: list[pb.LearnerReward]) -> None:
    events = [
        bus.OutgoingEvent(
            f"{TENANT}|{reward.outcome_id}",
            f"triplane.ai.{TENANT}.learner.reward",
            bus.make_envelope(
                event_type="ai.learner.reward",
                tenant_id=TENANT,
                payload=reward,
                occurred_at_us=SystemClock().now_us(),
                event_id=f"{TENANT}|{reward.outcome_id}",
            ).SerializeToString(),
        )
        for reward in log
    ]
    acknowledged = await bus.publish_batch(js, events, timeout_s=30)  # type: ignore[arg-type]
    assert all(acknowledged)


def _error_info(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return dict(info.metadata)
    return {}


async def _promote(
    stub: ai_pb2_grpc.ModelRegistryServiceStub,
    version: int,
    force: bool = False,
    approve: bool = True,
) -> pb.PromoteModelResponse:
    if approve:
        await stub.PromoteModel(
            pb.PromoteModelRequest(
                model=MODEL, version=version, target_state=pb.MODEL_STATE_APPROVED
            )
        )
    answer: pb.PromoteModelResponse = await stub.PromoteModel(
        pb.PromoteModelRequest(
            model=MODEL, version=version, target_state=pb.MODEL_STATE_LIVE, force=force
        ),
        timeout=60,
    )
    return answer


async def test_without_logged_data_the_estimate_says_so_and_promotion_is_not_blocked(
    shared_triton: TritonProcess, tmp_path: Path
) -> None:
    async with plane(tmp_path, shared_triton) as (running, stub, _):
        answer = await stub.EstimatePolicyValue(
            pb.EstimatePolicyValueRequest(model=MODEL, tenant_id=TENANT), timeout=30
        )
        assert answer.unavailable_reason == "OPE_NO_LOGGED_DATA"
        assert answer.logged_rounds == 0 and not answer.estimates
        candidate, _ = _candidate(running.config, flipped=False, seed=1)
        promoted = await _promote(stub, candidate.version)
        assert promoted.version.state == pb.MODEL_STATE_LIVE
        assert promoted.gate.outcome == "SKIPPED"
        assert promoted.gate.estimate.unavailable_reason == "OPE_NO_LOGGED_DATA"
        # A model that ranks no offers has no logged policy to compare with.
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EstimatePolicyValue(
                pb.EstimatePolicyValueRequest(model="payment_risk"), timeout=30
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert parse_rpc_error(caught.value)[0] == "OPE_MODEL_NOT_RANKING"


async def test_refusing_on_unavailable_is_a_failed_precondition_unless_forced(
    shared_triton: TritonProcess, tmp_path: Path
) -> None:
    async with plane(tmp_path, shared_triton, {"on_unavailable": "refuse"}) as (running, stub, _):
        candidate, _ = _candidate(running.config, flipped=False, seed=2)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _promote(stub, candidate.version)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert parse_rpc_error(caught.value)[0] == "OPE_NO_LOGGED_DATA"
        forced = await _promote(stub, candidate.version, force=True, approve=False)
        assert (forced.version.state, forced.gate.outcome) == (pb.MODEL_STATE_LIVE, "FORCED")


async def test_the_gate_refuses_a_candidate_the_log_shows_worse_and_passes_a_better_one(
    shared_triton: TritonProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with plane(tmp_path, shared_triton) as (running, stub, js):
        good, good_booster = _candidate(running.config, flipped=False, seed=3)
        bad, bad_booster = _candidate(running.config, flipped=True, seed=4)
        log = _exposure_log(600, 5, good_booster, bad_booster)
        # A repeated outcome and a late one are measurement only: not counted.
        repeat = pb.LearnerReward()
        repeat.CopyFrom(log[0])
        repeat.outcome_id, repeat.reward = "again", 1.0 - log[0].reward
        late = pb.LearnerReward()
        late.CopyFrom(log[1])
        late.outcome_id, late.late = "late", True
        await _publish(js, [*log, repeat, late])
        logged_mean = float(np.mean([r.reward for r in log]))

        better = await stub.EstimatePolicyValue(
            pb.EstimatePolicyValueRequest(model=MODEL, version=good.version, tenant_id=TENANT),
            timeout=60,
        )
        assert better.unavailable_reason == ""
        assert (better.logged_rounds, better.skipped_rounds) == (600, 2)
        assert better.logged.value == pytest.approx(logged_mean)
        estimates = {e.estimator: e for e in better.estimates}
        assert set(estimates) == {"ips", "snips", "dr"}
        for found in estimates.values():
            # The good candidate always shows the most valuable offer: value 1.
            assert found.lower <= 1.0 <= found.upper + 1e-9, found
            assert found.lower > logged_mean
        worse = await stub.EstimatePolicyValue(
            pb.EstimatePolicyValueRequest(model=MODEL, version=bad.version), timeout=60
        )
        assert max(e.upper for e in worse.estimates) < logged_mean

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _promote(stub, bad.version)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert parse_rpc_error(caught.value)[0] == "OPE_CANDIDATE_BELOW_LOGGED"
        info = _error_info(caught.value)
        assert info["estimator"] == "dr" and info["logged_rounds"] == "600"
        assert float(info["candidate_lower"]) < float(info["floor"])
        # Nothing changed: the refused version is still approved, not live.
        listed = await stub.GetModelVersion(
            pb.GetModelVersionRequest(model=MODEL, version=bad.version)
        )
        assert listed.version.state == pb.MODEL_STATE_APPROVED

        forced = await _promote(stub, bad.version, force=True, approve=False)
        assert (forced.version.state, forced.gate.outcome) == (pb.MODEL_STATE_LIVE, "FORCED")
        passed = await _promote(stub, good.version)
        assert (passed.version.state, passed.gate.outcome) == (pb.MODEL_STATE_LIVE, "PASSED")

        # The same estimate through `triplane ai ope`.
        assert running.server is not None
        args = argparse.Namespace(
            model=MODEL,
            version=good.version,
            tenant=TENANT,
            since="",
            until="",
            address=f"127.0.0.1:{running.server.port}",
            direct=False,
        )
        capsys.readouterr()
        assert await asyncio.to_thread(cli._ope, running.config, args) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed["logged_rounds"] == "600" and printed["unavailable_reason"] == ""
        assert {e["estimator"] for e in printed["estimates"]} == {"ips", "snips", "dr"}
        # --direct: no plane asked, the registry and NATS read by the CLI itself.
        args.direct, args.address = True, "127.0.0.1:1"
        assert await asyncio.to_thread(cli._ope, running.config, args) == 0
        direct = json.loads(capsys.readouterr().out)
        assert direct["estimates"] == printed["estimates"]
        assert ope_log.reward_filter(TENANT) == f"triplane.ai.{TENANT}.learner.reward"


def test_the_log_rebuilds_the_propensity_models_inputs_exactly() -> None:
    """A candidate version is evaluated on the inputs it would have seen: the
    catalog entry and stored context the learner logged, as the ranking
    built them (features.offer_vector, features.propensity_context)."""
    entry = synth.CATALOG["cashback_grocery"]
    stored = {name: 1.5 + i for i, name in enumerate(PROPENSITY_CONTEXT[2:])}
    context = learner.context_features(
        {"cart": 2.0}, "checkout", pb.CHANNEL_ECOMMERCE, "US", 14, list(stored.values())
    )
    arm = learner.arm_features(
        "acme_1", entry.product, entry.value_minor, dict(entry.attributes), 0.4
    )
    exposure = pb.LearnerExposure(
        rank_id="r",
        context=context,
        arms=[pb.LearnerArm(offer_id="acme_1", features=arm, probability=1.0)],
        chosen_probability=1.0,
    )
    rounds, _ = ope_log.counted_rounds([pb.LearnerReward(rank_id="r", exposure=exposure)])
    expected = [
        *offer_vector(OfferEntry(entry.product, entry.value_minor, dict(entry.attributes))),
        *propensity_context(pb.CHANNEL_ECOMMERCE, 14, stored),
    ]
    assert ope_log.propensity_rows(rounds[0])[0] == pytest.approx(expected, abs=1e-9)


def test_the_reader_counts_one_reward_per_ranking_inside_the_window() -> None:
    def reward(rank: str, at_s: int, value: float, late: bool = False) -> pb.LearnerReward:
        arm = pb.LearnerArm(offer_id="o", probability=1.0)
        exposure = pb.LearnerExposure(
            rank_id=rank, arms=[arm], chosen_probability=1.0, ranked_at=wire.timestamp(at_s * 10**6)
        )
        return pb.LearnerReward(rank_id=rank, reward=value, late=late, exposure=exposure)

    rounds, skipped = ope_log.counted_rounds(
        [
            reward("a", 100, 1.0),
            reward("a", 100, 0.0),  # a second reward of a ranking: measurement only
            reward("b", 150, 1.0, late=True),  # after the window: measurement only
            reward("b", 150, 0.0),  # the window's 0 is b's reward
            reward("c", 50, 1.0),  # ranked before the window
            reward("d", 200, 1.0),  # ranked at its end (exclusive)
        ],
        since_us=100 * 10**6,
        until_us=200 * 10**6,
    )
    assert [(r.rank_id, r.reward) for r in rounds] == [("a", 1.0), ("b", 0.0)]
    assert skipped == 4
