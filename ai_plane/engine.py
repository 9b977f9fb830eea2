"""The AI plane's domain: Score, Rank, Explain and outcomes, without gRPC.

The servicer (service.py) translates protobuf to these calls; benchmarks and
tests call them directly too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ai_plane.bandit import LinearThompsonBandit
from ai_plane.bandit import arm_features as bandit_features
from ai_plane.drift import DriftPoint, PsiMonitor
from ai_plane.features import (
    FEATURE_SET_VERSION,
    PROPENSITY_FEATURES,
    RISK_FEATURES,
    VELOCITY_FEATURES,
    EntityRef,
    OfferEntry,
    PaymentInput,
    hour_of_day,
    keys_for,
    offer_vector,
    propensity_context,
    risk_vector,
    stored_features,
)
from ai_plane.learner import (
    RewardLearner,
    VwLearner,
    arm_features,
    context_features,
    draw,
    encode_reward,
    policy_name,
    reward_key,
    unit_draw,
    window_outcome_id,
)
from ai_plane.outcomes import (
    BanditLearner,
    Outcome,
    OutcomeSpine,
    PendingRank,
    PendingRanks,
    build_pending,
    outcome_key,
)
from ai_plane.scorer import Scorer, ScoreResult
from ai_plane.store.base import FeatureStore
from ai_plane.training import PROPENSITY_MODEL, RISK_MODEL
from triplane.ai.v1 import ai_pb2
from triplane.runtime import codec as wire
from triplane.runtime.clock import Clock
from triplane.runtime.config import AiConfig
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import InvalidArgument, NotFound
from triplane.runtime.ids import check_tenant_id
from triplane.runtime.pii import refuse_pii

log = logging.getLogger("triplane.ai.engine")

BANDIT_POLICY = "linear_thompson_sampling"
MODELS = (RISK_MODEL, PROPENSITY_MODEL)
# The models Score runs: their input is a payment's risk vector. The
# propensity model ranks offers (Rank); fed a payment it failed inside the
# scorer (INTERNAL, found by the fuzz suite), so it is refused up front.
SCORE_MODELS = (RISK_MODEL,)


@dataclass(frozen=True)
class ScoreQuery:
    tenant_id: str
    account_id: str
    amount_minor: int
    currency: str = ""
    device_id: str = ""
    merchant_id: str = ""
    merchant_category: str = ""
    channel: int = 0
    occurred_at_us: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)
    model: str = ""
    top_k: int = 0
    # The customer's local hour of day (0..23) when known; None: the UTC hour
    # of occurred_at (the models learned local hours).
    local_hour: int | None = None


@dataclass(frozen=True)
class Attribution:
    feature: str
    value: float
    contribution: float


@dataclass(frozen=True)
class ScoreAnswer:
    score_id: str
    tenant_id: str
    model: str
    version: int
    source: str
    score: float
    attributions: list[Attribution]
    features: list[tuple[str, float]]
    feature_set_version: str
    fallback_reason: str


@dataclass(frozen=True)
class Candidate:
    """An eligible offer: its id (for the answer and the bandit's arm) and its
    catalog entry (what the propensity model sees)."""

    offer_id: str
    entry: OfferEntry
    # The business lever inside the learner's objective (0 or 1: none).
    lever: float = 1.0


@dataclass(frozen=True)
class RankQuery:
    tenant_id: str
    account_id: str
    candidates: Sequence[Candidate]
    channel: int = 0
    hour_of_day: int = -1
    occurred_at_us: int = 0
    # The request's numeric context, surface and region (the learner's).
    features: Mapping[str, float] = field(default_factory=dict)
    surface: str = ""
    region: str = ""
    # Not shown by the learner's choice: logged, never rewarded.
    held_out: bool = False


@dataclass(frozen=True)
class OutcomeAnswer:
    applied: bool
    late: bool = False


@dataclass(frozen=True)
class RankedOffer:
    offer_id: str
    propensity: float
    exploration_probability: float


@dataclass(frozen=True)
class RankAnswer:
    rank_id: str
    offers: list[RankedOffer]
    chosen_offer_id: str
    chosen_probability: float
    model: str
    version: int
    source: str
    score: float
    policy: str = BANDIT_POLICY


@dataclass(slots=True)
class _Explained:
    """A remembered score, kept compact (arrays, not lists of objects): the
    cache holds up to explain_cache_entries of them, and the collector's
    pauses grow with every object it must walk."""

    tenant_id: str
    model: str
    version: int
    source: str
    score: float
    fallback_reason: str
    vector: npt.NDArray[np.float64]
    contributions: npt.NDArray[np.float64] | None


def top_attributions(
    names: Sequence[str], values: Sequence[float], contributions: Sequence[float], k: int
) -> list[Attribution]:
    """The k features with the largest absolute contribution (bias excluded)."""
    order = sorted(range(len(names)), key=lambda i: -abs(contributions[i]))[:k]
    return [Attribution(names[i], values[i], contributions[i]) for i in order]


class AiEngine:
    def __init__(
        self,
        config: AiConfig,
        store: FeatureStore,
        scorer: Scorer,
        bandit: LinearThompsonBandit,
        clock: Clock,
        pending: PendingRanks | None = None,
    ) -> None:
        self._config = config
        self._limits = config.limits
        self.store = store
        self.scorer = scorer
        self.bandit = bandit
        # Rank's pending rankings (shared in Redis above one replica), and the
        # posterior with the outcome ids it learned from.
        self.pending = pending if pending is not None else build_pending(config)
        self.learner = BanditLearner(bandit, config.bandit.max_outcome_ids)
        # The contextual learner (ai.learner.engine vw) replaces the bandit
        # for ranking and outcomes; the spine then carries its rewards.
        self.rewards: RewardLearner | None = None
        if config.learner.engine == "vw":
            self.rewards = RewardLearner(
                VwLearner(config.learner),
                config.bandit.max_outcome_ids,
                config.learner.max_rewarded_ranks,
            )
        # Set by the plane when outcomes go through the spine (every replica
        # learns each one); None: this engine applies the outcomes it gets.
        self.spine: OutcomeSpine | None = None
        self._clock = clock
        self._namespace = config.features.namespace
        self._explained: OrderedDict[str, _Explained] = OrderedDict()
        self.drift: dict[str, dict[str, PsiMonitor]] = {}
        self._unwritten: list[DriftPoint] = []

    def set_drift_baselines(
        self, model: str, version: int, baselines: Mapping[str, list[list[float]]]
    ) -> None:
        drift = self._config.drift
        for monitor in self.drift.get(model, {}).values():
            # The old version's points not yet written still go out.
            self._unwritten.extend(monitor.take_pending())
        self.drift[model] = {
            series: PsiMonitor(
                model,
                version,
                series,
                edges,
                expected,
                drift.window_scores,
                drift.update_every_scores,
                int(drift.history_slot_s * 1_000_000),
                self._clock.now_us,
            )
            for series, (edges, expected) in baselines.items()
        }

    def take_drift_points(self) -> list[DriftPoint]:
        """Every monitor's recomputations not yet in the shared history (the
        monitors forget them: write them, or hand them back)."""
        taken, self._unwritten = self._unwritten, []
        for monitors in self.drift.values():
            for monitor in monitors.values():
                taken.extend(monitor.take_pending())
        return taken

    def pending_drift(self, model: str, version: int) -> list[DriftPoint]:
        """This replica's recomputations of a version not yet written (what
        GetModelDrift adds to the stored history), left pending."""
        return [
            DriftPoint(model, version, monitor.series, slot, at_us, value)
            for monitor in self.drift.get(model, {}).values()
            if monitor.version == version
            for slot, (at_us, value) in sorted(monitor.pending.items())
        ]

    def keep_drift_points(self, points: list[DriftPoint]) -> None:
        """Points whose write failed, back to their monitors (a version no
        longer monitored here keeps them aside, its newest
        ai.drift.history_points per series at most, while the store is out)."""
        for point in points:
            monitor = self.drift.get(point.model, {}).get(point.series)
            if monitor is not None and monitor.version == point.version:
                monitor.keep([point])
            else:
                self._unwritten.append(point)
        if self._unwritten:
            newest: dict[tuple[str, int, str], list[DriftPoint]] = {}
            for point in sorted(self._unwritten, key=lambda p: p.slot):
                newest.setdefault((point.model, point.version, point.series), []).append(point)
            keep = self._config.drift.history_points
            self._unwritten = [p for kept in newest.values() for p in kept[-keep:]]

    # ---- validation ----

    def _check_id(self, name: str, value: str, required: bool = True) -> None:
        if required and not value:
            raise InvalidArgument("FIELD_REQUIRED", f"{name} is required", name)
        if len(value) > self._limits.max_id_length:
            raise InvalidArgument(
                "FIELD_TOO_LONG", f"{name} is longer than {self._limits.max_id_length}", name
            )

    def _check_score_query(self, q: ScoreQuery) -> None:
        prefix = "payment"
        check_tenant_id(q.tenant_id, f"{prefix}.tenant_id")
        self._check_id(f"{prefix}.account_id", q.account_id)
        self._check_id(f"{prefix}.device_id", q.device_id, required=False)
        self._check_id(f"{prefix}.merchant_id", q.merchant_id, required=False)
        self._check_id(f"{prefix}.merchant_category", q.merchant_category, required=False)
        if q.amount_minor < 0:
            raise InvalidArgument("AMOUNT_NEGATIVE", "amount must be >= 0", f"{prefix}.amount")
        if q.local_hour is not None and not 0 <= q.local_hour <= 23:
            raise InvalidArgument(
                "LOCAL_HOUR_INVALID", "local_hour is 0..23", f"{prefix}.local_hour"
            )
        fields = {
            f"{prefix}.tenant_id": q.tenant_id,
            f"{prefix}.account_id": q.account_id,
            f"{prefix}.device_id": q.device_id,
            f"{prefix}.merchant_id": q.merchant_id,
        }
        fields.update(self._check_attributes(q.attributes, f"{prefix}.attributes"))
        refuse_pii(fields)
        if q.model and q.model not in MODELS:
            raise InvalidArgument("UNKNOWN_MODEL", f"unknown model {q.model!r}", "model")
        if q.model and q.model not in SCORE_MODELS:
            raise InvalidArgument(
                "MODEL_NOT_FOR_SCORE",
                f"model {q.model!r} does not score payments (Score runs {', '.join(SCORE_MODELS)})",
                "model",
            )
        if q.top_k > self._limits.max_top_k:
            raise InvalidArgument("TOP_K_TOO_LARGE", f"top_k > {self._limits.max_top_k}", "top_k")

    def _check_attributes(self, attributes: Mapping[str, str], where: str) -> dict[str, str]:
        """Bounds free-form attributes; returns them by field name for the PII check."""
        if len(attributes) > self._limits.max_attributes:
            raise InvalidArgument(
                "TOO_MANY_ATTRIBUTES", f"at most {self._limits.max_attributes} attributes", where
            )
        fields: dict[str, str] = {}
        for key, value in attributes.items():
            named = f"{where}[{key}]"
            if (
                len(key) > self._limits.max_id_length
                or len(value) > self._limits.max_attribute_length
            ):
                raise InvalidArgument("FIELD_TOO_LONG", f"{named} is too long", named)
            fields[f"{named}.key"] = key
            fields[named] = value
        return fields

    # ---- features ----

    async def stored_features(self, ref: EntityRef, now_us: int) -> tuple[dict[str, float], str]:
        """The store-backed features; on a slow or failed store, zeros and a
        reason (the score goes on rather than waiting past its budget)."""
        keys = keys_for(ref, self._namespace, now_us)
        try:
            if self.store.name == "in_process":
                records = await self.store.read(keys)
            else:
                timeout_s = self._config.features.read_timeout_ms / 1000.0
                records = await asyncio.wait_for(self.store.read(keys), timeout_s)
        except (TimeoutError, OSError, ConnectionError) as error:
            log.warning("feature read failed: %r", error)
            return stored_features([{}] * len(keys)), "FEATURES_UNAVAILABLE"
        return stored_features(records), ""

    # ---- Score ----

    async def score(self, q: ScoreQuery, deadline: Deadline) -> ScoreAnswer:
        self._check_score_query(q)
        now_us = q.occurred_at_us or self._clock.now_us()
        ref = EntityRef(q.tenant_id, q.account_id, q.device_id, q.merchant_id)
        stored, feature_issue = await self.stored_features(ref, now_us)
        hour = q.local_hour if q.local_hour is not None else hour_of_day(now_us)
        payment = PaymentInput(q.amount_minor, q.merchant_category, q.channel, hour)
        vector = risk_vector(payment, stored)
        model = q.model or RISK_MODEL
        rows = np.asarray([vector], dtype=np.float64)
        result = await self.scorer.score(model, rows, [f"{q.tenant_id}|{q.account_id}"], deadline)
        counters = [(name, stored[name]) for name in VELOCITY_FEATURES]
        answer = self._score_answer(q, model, vector, result, feature_issue, counters)
        self._observe_drift(model, answer.score, vector)
        return answer

    def _score_answer(
        self,
        q: ScoreQuery,
        model: str,
        vector: list[float],
        result: ScoreResult,
        issue: str,
        counters: list[tuple[str, float]],
    ) -> ScoreAnswer:
        names = RISK_FEATURES
        contributions = result.contributions[0].tolist() if result.contributions is not None else []
        k = q.top_k or self._limits.default_top_k
        attributions = top_attributions(names, vector, contributions, k) if contributions else []
        answer = ScoreAnswer(
            score_id=uuid.uuid4().hex,
            tenant_id=q.tenant_id,
            model=model,
            version=result.version,
            source=result.source,
            score=float(result.scores[0]),
            attributions=attributions,
            # The model's inputs, then the counters only the policy reads.
            features=list(zip(names, vector, strict=True)) + counters,
            feature_set_version=FEATURE_SET_VERSION,
            fallback_reason=",".join(r for r in (result.fallback_reason, issue) if r),
        )
        if attributions and log.isEnabledFor(logging.DEBUG):
            log.debug(
                "score attributions",
                extra={"score_id": answer.score_id, "top": [a.feature for a in attributions]},
            )
        self._explained[answer.score_id] = _Explained(
            q.tenant_id,
            model,
            result.version,
            result.source,
            answer.score,
            answer.fallback_reason,
            np.asarray(vector, dtype=np.float64),
            None if result.contributions is None else result.contributions[0],
        )
        while len(self._explained) > self._limits.explain_cache_entries:
            self._explained.popitem(last=False)
        return answer

    def _observe_drift(self, model: str, score: float, vector: list[float]) -> None:
        monitors = self.drift.get(model)
        if not monitors or math.isnan(score):
            return
        for series, monitor in monitors.items():
            if series == "score":
                monitor.observe(score)
            else:
                monitor.observe(vector[RISK_FEATURES.index(series)])

    # ---- Explain ----

    def explain(self, tenant_id: str, score_id: str, top_k: int) -> ScoreAnswer:
        check_tenant_id(tenant_id)
        found = self._explained.get(score_id)
        # Another tenant's score is NOT_FOUND, never its data (rule 8).
        if found is None or found.tenant_id != tenant_id:
            raise NotFound("SCORE_NOT_FOUND", f"no recent score {score_id!r}", "score_id")
        if top_k > self._limits.max_top_k:
            raise InvalidArgument("TOP_K_TOO_LARGE", f"top_k > {self._limits.max_top_k}", "top_k")
        values = found.vector.tolist()
        attributions: list[Attribution] = []
        if found.contributions is not None:
            k = top_k or self._limits.default_top_k
            contributions = found.contributions.tolist()
            attributions = top_attributions(RISK_FEATURES, values, contributions, k)
        return ScoreAnswer(
            score_id=score_id,
            tenant_id=tenant_id,
            model=found.model,
            version=found.version,
            source=found.source,
            score=found.score,
            attributions=attributions,
            features=list(zip(RISK_FEATURES, values, strict=True)),
            feature_set_version=FEATURE_SET_VERSION,
            fallback_reason=found.fallback_reason,
        )

    # ---- Rank ----

    def _check_rank_query(self, q: RankQuery) -> None:
        check_tenant_id(q.tenant_id)
        self._check_id("account_id", q.account_id)
        if not q.candidates:
            raise InvalidArgument("NO_CANDIDATES", "at least one candidate is needed", "candidates")
        if len(q.candidates) > self._limits.max_candidates:
            raise InvalidArgument(
                "TOO_MANY_CANDIDATES", f"at most {self._limits.max_candidates}", "candidates"
            )
        if len({c.offer_id for c in q.candidates}) != len(q.candidates):
            raise InvalidArgument("DUPLICATE_CANDIDATE", "offer ids must differ", "candidates")
        fields = {"tenant_id": q.tenant_id, "account_id": q.account_id}
        for i, candidate in enumerate(q.candidates):
            self._check_id(f"candidates[{i}].offer_id", candidate.offer_id)
            self._check_id(f"candidates[{i}].product", candidate.entry.product, required=False)
            if candidate.entry.value_minor < 0:
                raise InvalidArgument(
                    "AMOUNT_NEGATIVE", "value must be >= 0", f"candidates[{i}].value"
                )
            attributes = candidate.entry.attributes
            fields.update(self._check_attributes(attributes, f"candidates[{i}].attributes"))
            if not math.isfinite(candidate.lever) or candidate.lever < 0:
                raise InvalidArgument(
                    "LEVER_INVALID", "lever must be finite and >= 0", f"candidates[{i}].lever"
                )
        self._check_id("surface", q.surface, required=False)
        self._check_id("region", q.region, required=False)
        fields["surface"] = q.surface
        fields["region"] = q.region
        if len(q.features) > self._limits.max_attributes:
            raise InvalidArgument(
                "TOO_MANY_FEATURES", f"at most {self._limits.max_attributes} features", "features"
            )
        for key, value in q.features.items():
            named = f"features[{key}]"
            if len(key) > self._limits.max_id_length:
                raise InvalidArgument("FIELD_TOO_LONG", f"{named} is too long", named)
            if not math.isfinite(value):
                raise InvalidArgument("FEATURE_NOT_FINITE", f"{named} must be finite", named)
            fields[f"{named}.key"] = key
        refuse_pii(fields)

    async def rank(self, q: RankQuery, deadline: Deadline) -> RankAnswer:
        self._check_rank_query(q)
        now_us = q.occurred_at_us or self._clock.now_us()
        hour = q.hour_of_day if 0 <= q.hour_of_day <= 23 else hour_of_day(now_us)
        stored, _ = await self.stored_features(EntityRef(q.tenant_id, q.account_id), now_us)
        context = propensity_context(q.channel, hour, stored)
        # Each offer by its catalog entry, never its id: a partner's own offer
        # is judged on what it is (see features.OFFER_FEATURES).
        rows = np.asarray(
            [[*offer_vector(c.entry), *context] for c in q.candidates], dtype=np.float64
        )
        assert rows.shape[1] == len(PROPENSITY_FEATURES)
        offer_ids = [c.offer_id for c in q.candidates]
        keys = [f"{q.tenant_id}|{q.account_id}|{o}" for o in offer_ids]
        result = await self.scorer.score(PROPENSITY_MODEL, rows, keys, deadline)
        propensities = [0.0 if math.isnan(p) else p for p in result.scores.tolist()]
        if self.rewards is not None:
            return await self._rank_learner(q, now_us, hour, context, propensities, result)
        arms = [f"{q.tenant_id}|{o}" for o in offer_ids]
        features = [bandit_features(context, p) for p in propensities]
        choice = self.bandit.choose(arms, features)
        rank_id = uuid.uuid4().hex
        await self.pending.put(
            rank_id, PendingRank(q.tenant_id, dict(zip(offer_ids, features, strict=True)))
        )
        probabilities = choice.probabilities.tolist()
        ranked = sorted(
            (
                RankedOffer(o, p, pr)
                for o, p, pr in zip(offer_ids, propensities, probabilities, strict=True)
            ),
            key=lambda r: -r.propensity,
        )
        chosen = offer_ids[choice.chosen_index]
        return RankAnswer(
            rank_id=rank_id,
            offers=ranked,
            chosen_offer_id=chosen,
            chosen_probability=probabilities[choice.chosen_index],
            model=PROPENSITY_MODEL,
            version=result.version,
            source=result.source,
            score=propensities[choice.chosen_index],
        )

    # ---- the contextual learner (ai.learner.engine vw) ----

    def model_key(self, tenant_id: str, surface: str) -> str:
        """Learning is per tenant, and per surface where configured: never
        across tenants (a tenant id holds no '|')."""
        if surface and surface in self._config.learner.surfaces_apart:
            return f"{tenant_id}|{surface}"
        return tenant_id

    def _reward_if_converted(self, value_minor: int, lever: float) -> float:
        learner = self._config.learner
        if learner.objective == "conversion":
            return min(learner.max_reward, lever)
        value = value_minor if value_minor > 0 else learner.default_value_minor
        return min(learner.max_reward, value * lever / learner.value_scale_minor)

    async def _rank_learner(
        self,
        q: RankQuery,
        now_us: int,
        hour: int,
        context: list[float],
        propensities: list[float],
        result: ScoreResult,
    ) -> RankAnswer:
        assert self.rewards is not None
        learner = self._config.learner
        levers = [c.lever if c.lever > 0 else 1.0 for c in q.candidates]
        known = [None if math.isnan(p) else p for p in result.scores.tolist()]
        key = self.model_key(q.tenant_id, q.surface)
        exposure = ai_pb2.LearnerExposure(
            tenant_id=q.tenant_id,
            model_key=key,
            surface=q.surface,
            # The propensity context less channel and hour (categoricals here).
            context=context_features(q.features, q.surface, q.channel, q.region, hour, context[2:]),
            arms=[
                ai_pb2.LearnerArm(
                    offer_id=c.offer_id,
                    features=arm_features(
                        c.offer_id, c.entry.product, c.entry.value_minor, c.entry.attributes, p
                    ),
                    reward_if_converted=self._reward_if_converted(c.entry.value_minor, lever),
                )
                # No score (no live model): no propensity feature, rather
                # than a 0 that says "will not convert".
                for c, p, lever in zip(q.candidates, known, levers, strict=True)
            ],
            policy=policy_name(learner),
            held_out=q.held_out,
        )
        prediction = self.rewards.vw.predict(key, exposure)
        for arm, p, expected in zip(
            exposure.arms, prediction.probabilities, prediction.expected, strict=True
        ):
            arm.probability = p
            arm.expected_reward = expected
        rank_id = uuid.uuid4().hex
        # The arm is drawn from exactly the logged distribution, with a
        # uniform number the rank id fixes.
        chosen = draw(prediction.probabilities, unit_draw(rank_id))
        window_us = learner.reward_window_s * 1_000_000
        exposure.rank_id = rank_id
        exposure.chosen_index = chosen
        exposure.chosen_offer_id = q.candidates[chosen].offer_id
        exposure.chosen_probability = prediction.probabilities[chosen]
        wire.fill_timestamp(exposure.ranked_at, now_us)
        wire.fill_timestamp(exposure.window_closes_at, now_us + window_us)
        pending = PendingRank(q.tenant_id, {}, exposure.SerializeToString(), tuple(levers))
        await self.pending.put(rank_id, pending, 0 if q.held_out else now_us + window_us)
        ranked = sorted(
            (
                RankedOffer(c.offer_id, p, pr)
                for c, p, pr in zip(
                    q.candidates, propensities, prediction.probabilities, strict=True
                )
            ),
            key=lambda r: -r.propensity,
        )
        return RankAnswer(
            rank_id=rank_id,
            offers=ranked,
            chosen_offer_id=exposure.chosen_offer_id,
            chosen_probability=exposure.chosen_probability,
            model=PROPENSITY_MODEL,
            version=result.version,
            source=result.source,
            score=propensities[chosen],
            policy=exposure.policy,
        )

    def _learner_reward(
        self,
        kind: int,
        reward: float,
        value_minor: int | None,
        arm: ai_pb2.LearnerArm,
        lever: float,
    ) -> float:
        learner = self._config.learner
        if kind == ai_pb2.OUTCOME_KIND_CONVERTED:
            if value_minor is None or learner.objective == "conversion":
                return arm.reward_if_converted
            return self._reward_if_converted(value_minor, lever)
        if kind == ai_pb2.OUTCOME_KIND_DISMISSED:
            return learner.dismissed_reward
        if kind in (ai_pb2.OUTCOME_KIND_IGNORED, ai_pb2.OUTCOME_KIND_WINDOW_CLOSED):
            return 0.0
        return reward  # the caller's own reward

    async def _publish_reward(self, reward: ai_pb2.LearnerReward, now_us: int) -> bool:
        """Through the spine (every replica learns it), or here; True when
        this call taught the learner."""
        assert self.rewards is not None
        key = reward_key(reward.tenant_id, reward.outcome_id)
        if self.spine is not None:
            # Applied by this publish (not a duplicate of another replica's,
            # whose answer says so), and learned (not late or a second one).
            fresh = await self.spine.publish(key, reward.tenant_id, encode_reward(reward, now_us))
            return fresh and self.rewards.learned(key)
        return self.rewards.apply(reward)

    async def _report_learner(
        self,
        tenant_id: str,
        rank_id: str,
        offer_id: str,
        reward: float,
        outcome_id: str,
        kind: int,
        value_minor: int | None,
        at_us: int | None = None,
    ) -> OutcomeAnswer:
        assert self.rewards is not None
        if kind == ai_pb2.OUTCOME_KIND_WINDOW_CLOSED:
            raise InvalidArgument(
                "OUTCOME_KIND_INVALID", "WINDOW_CLOSED is the plane's own", "kind"
            )
        if value_minor is not None and value_minor < 0:
            raise InvalidArgument("AMOUNT_NEGATIVE", "value must be >= 0", "value")
        key = reward_key(tenant_id, outcome_id)
        if self.rewards.seen(key):
            return OutcomeAnswer(False, not self.rewards.learned(key))
        pending = await self.pending.get(rank_id)
        if pending is None or pending.tenant_id != tenant_id or not pending.exposure:
            raise NotFound("RANK_NOT_FOUND", f"no recent ranking {rank_id!r}", "rank_id")
        exposure = ai_pb2.LearnerExposure.FromString(pending.exposure)
        index = next((i for i, a in enumerate(exposure.arms) if a.offer_id == offer_id), -1)
        if index < 0:
            raise InvalidArgument("OFFER_NOT_RANKED", f"{offer_id!r} was not ranked", "offer_id")
        if exposure.held_out:
            return OutcomeAnswer(False, False)
        if index != exposure.chosen_index:
            raise InvalidArgument(
                "OFFER_NOT_CHOSEN",
                f"{offer_id!r} was ranked but not chosen ({exposure.chosen_offer_id!r} was)",
                "offer_id",
            )
        now_us = self._clock.now_us()
        happened_us = at_us if at_us else now_us
        late = happened_us > wire.micros(exposure.window_closes_at, "window_closes_at")
        arm = exposure.arms[index]
        lever = pending.levers[index] if index < len(pending.levers) else 1.0
        learned_reward = self._learner_reward(kind, reward, value_minor, arm, lever)
        message = ai_pb2.LearnerReward(
            rank_id=rank_id,
            tenant_id=tenant_id,
            model_key=exposure.model_key,
            offer_id=offer_id,
            arm_index=index,
            kind=kind,  # type: ignore[arg-type]
            reward=learned_reward,
            probability=arm.probability,
            late=late,
            outcome_id=outcome_id,
            exposure=exposure,
        )
        wire.fill_timestamp(message.recorded_at, now_us)
        learned = await self._publish_reward(message, now_us)
        if not late:
            await self.pending.settle(rank_id)
        return OutcomeAnswer(learned, late or not learned)

    async def sweep(self, now_us: int | None = None, limit: int = 1000) -> int:
        """Counts a 0 for every shown ranking whose reward window closed with
        no outcome; returns how many rewards it published. Any replica may
        sweep at any time: each window's reward has one id, so JetStream and
        the learner count it once, and a ranking an outcome reached first
        stays with that outcome."""
        if self.rewards is None:
            return 0
        now = self._clock.now_us() if now_us is None else now_us
        published = 0
        for rank_id in await self.pending.due(now, limit):
            pending = await self.pending.get(rank_id)
            if pending is None or not pending.exposure:
                await self.pending.settle(rank_id)
                continue
            exposure = ai_pb2.LearnerExposure.FromString(pending.exposure)
            if not self.rewards.rewarded(pending.tenant_id, rank_id):
                index = exposure.chosen_index
                message = ai_pb2.LearnerReward(
                    rank_id=rank_id,
                    tenant_id=pending.tenant_id,
                    model_key=exposure.model_key,
                    offer_id=exposure.chosen_offer_id,
                    arm_index=index,
                    kind=ai_pb2.OUTCOME_KIND_WINDOW_CLOSED,
                    reward=0.0,
                    probability=exposure.arms[index].probability,
                    late=False,
                    outcome_id=window_outcome_id(rank_id),
                    exposure=exposure,
                )
                wire.fill_timestamp(message.recorded_at, now)
                await self._publish_reward(message, now)
                published += 1
            await self.pending.settle(rank_id)
        return published

    # ---- outcomes ----

    async def report_outcome(
        self, tenant_id: str, rank_id: str, offer_id: str, reward: float, outcome_id: str
    ) -> bool:
        """Updates the bandit once per outcome_id; False for a repeat. With
        the spine, every replica's bandit learns it (this one before the
        answer)."""
        answer = await self.outcome(tenant_id, rank_id, offer_id, reward, outcome_id)
        return answer.applied

    async def outcome(
        self,
        tenant_id: str,
        rank_id: str,
        offer_id: str,
        reward: float,
        outcome_id: str,
        kind: int = 0,
        value_minor: int | None = None,
        at_us: int | None = None,
    ) -> OutcomeAnswer:
        """ReportOutcome: the bandit's update, or the contextual learner's
        reward (kind and value decide it; late when the window had closed by
        at_us: when the outcome happened, now unless said)."""
        check_tenant_id(tenant_id)
        self._check_id("outcome_id", outcome_id)
        if not math.isfinite(reward):
            raise InvalidArgument("REWARD_NOT_FINITE", "reward must be a finite number", "reward")
        if self.rewards is not None:
            return await self._report_learner(
                tenant_id, rank_id, offer_id, reward, outcome_id, kind, value_minor, at_us
            )
        return OutcomeAnswer(
            await self._report_bandit(tenant_id, rank_id, offer_id, reward, outcome_id)
        )

    async def _report_bandit(
        self, tenant_id: str, rank_id: str, offer_id: str, reward: float, outcome_id: str
    ) -> bool:
        if self.learner.seen(outcome_key(tenant_id, outcome_id)):
            return False
        pending = await self.pending.get(rank_id)
        if pending is None or pending.tenant_id != tenant_id:
            raise NotFound("RANK_NOT_FOUND", f"no recent ranking {rank_id!r}", "rank_id")
        x = pending.features.get(offer_id)
        if x is None:
            raise InvalidArgument("OFFER_NOT_RANKED", f"{offer_id!r} was not ranked", "offer_id")
        outcome = Outcome(outcome_id, tenant_id, f"{tenant_id}|{offer_id}", x, reward)
        if self.spine is not None:
            return await self.spine.report(outcome)
        return self.learner.apply(outcome)
