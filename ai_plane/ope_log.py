"""Off-policy evaluation on the learner's exposure log: reading it, turning
it into the estimators' arrays (ai_plane/ope.py), and the promotion gate.

The log (ai_plane/README.md, "Exposure log"): on TRIPLANE_AI, subject
`triplane.ai.<tenant>.learner.reward`, each message an EventEnvelope whose
payload is a LearnerReward carrying the LearnerExposure it rewards (context,
eligible arms with their logging probabilities and the learner's expected
reward, the chosen arm). The rule a reader applies: per rank_id, the first
reward in stream order with late false is the ranking's reward; later ones
and late ones are measurement only. Held-out rankings get no reward, so they
are not in the log.

The candidate policy of a model version (offer_propensity): among each
logged ranking's eligible arms, the one with the highest expected value
under that version, its predicted conversion probability x the arm's
reward_if_converted (ties shared). Its inputs are rebuilt from the log: the
arm's catalog entry (product, value, attributes) and the context's stored
features, channel and hour (features.PROPENSITY_CONTEXT), as the learner
names them (ai_plane/learner.py). DR's reward
model is the logging learner's own expected_reward of each arm.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import lightgbm as lgb
import numpy as np
from google.protobuf.message import DecodeError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ai_plane import ope
from ai_plane.features import (
    FEATURE_SET_VERSION,
    PROPENSITY_FEATURES,
    OfferEntry,
    offer_vector,
)
from ai_plane.learner import STORED_CENTER, STORED_SCALE
from ai_plane.registry import ModelRecord, Registry
from triplane.ai.v1 import ai_pb2 as pb
from triplane.common.v1 import envelope_pb2
from triplane.runtime.config import AiOpeConfig
from triplane.runtime.errors import FailedPrecondition, InvalidArgument
from triplane.runtime.ids import check_tenant_id

log = logging.getLogger("triplane.ai.ope")

AI_STREAM = "TRIPLANE_AI"
REWARD_KIND = "learner.reward"
# The model whose versions rank offers: the only one the gate applies to.
RANKING_MODEL = "offer_propensity"


def reward_filter(tenant_id: str = "") -> str:
    if tenant_id:
        check_tenant_id(tenant_id, "tenant_id")
    return f"triplane.ai.{tenant_id or '*'}.{REWARD_KIND}"


@dataclass(frozen=True)
class LoggedRound:
    """One ranking and its counted reward."""

    tenant_id: str
    rank_id: str
    ranked_at_us: int
    context: dict[str, float]
    arm_ids: tuple[str, ...]
    arm_features: tuple[dict[str, float], ...]
    probabilities: tuple[float, ...]
    expected_rewards: tuple[float, ...]
    rewards_if_converted: tuple[float, ...]
    chosen: int
    chosen_probability: float
    reward: float


def _features(items: Iterable[pb.LearnerFeature]) -> dict[str, float]:
    return {f.name: f.value for f in items}


def _micros(ts: object) -> int:
    seconds = int(getattr(ts, "seconds", 0))
    nanos = int(getattr(ts, "nanos", 0))
    return seconds * 1_000_000 + nanos // 1000


def counted_rounds(
    rewards: Iterable[pb.LearnerReward], since_us: int = 0, until_us: int = 2**62
) -> tuple[list[LoggedRound], int]:
    """The rounds the rule counts (first non-late reward per ranking, in
    stream order), ranked within [since_us, until_us); and how many
    LearnerRewards were left out (late, repeated, outside the window, or an
    exposure the estimators cannot use)."""
    seen: set[tuple[str, str]] = set()
    rounds: list[LoggedRound] = []
    skipped = 0
    for reward in rewards:
        exposure = reward.exposure
        key = (reward.tenant_id, reward.rank_id)
        if reward.late or key in seen:
            skipped += 1
            continue
        seen.add(key)
        ranked_at = _micros(exposure.ranked_at)
        arms = list(exposure.arms)
        # The exposure's chosen arm; LearnerReward.arm_index names the same.
        chosen = exposure.chosen_index if exposure.chosen_index or arms else reward.arm_index
        probability = exposure.chosen_probability or (
            arms[chosen].probability if 0 <= chosen < len(arms) else 0.0
        )
        usable = (
            exposure.rank_id
            and arms
            and 0 <= chosen < len(arms)
            and 0.0 < probability <= 1.0
            and math.isfinite(reward.reward)
            and not exposure.held_out
        )
        if not usable or not since_us <= ranked_at < until_us:
            skipped += 1
            continue
        rounds.append(
            LoggedRound(
                tenant_id=reward.tenant_id or exposure.tenant_id,
                rank_id=reward.rank_id,
                ranked_at_us=ranked_at,
                context=_features(exposure.context),
                arm_ids=tuple(a.offer_id for a in arms),
                arm_features=tuple(_features(a.features) for a in arms),
                probabilities=tuple(a.probability for a in arms),
                expected_rewards=tuple(a.expected_reward for a in arms),
                rewards_if_converted=tuple(a.reward_if_converted for a in arms),
                chosen=chosen,
                chosen_probability=probability,
                reward=float(reward.reward),
            )
        )
    return rounds, skipped


async def read_rewards(
    js: JetStreamContext,
    tenant_id: str,
    since_us: int,
    max_messages: int,
    fetch_timeout_s: float = 1.0,
) -> list[pb.LearnerReward]:
    """The LearnerRewards of one tenant (or every tenant: "") recorded from
    since_us on, in stream order, with an ephemeral consumer (at most
    max_messages)."""
    subject = reward_filter(tenant_id)
    try:
        info = await js.stream_info(AI_STREAM)
    except Exception:
        return []
    if info.state.messages == 0:
        return []
    config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0)
    if since_us > 0:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = dt.datetime.fromtimestamp(since_us / 1e6, tz=dt.UTC)
    else:
        config.deliver_policy = DeliverPolicy.ALL
    sub = await js.pull_subscribe(subject, stream=AI_STREAM, config=config)
    found: list[pb.LearnerReward] = []
    try:
        while len(found) < max_messages:
            pending = int((await sub.consumer_info()).num_pending or 0)
            if pending == 0:
                break
            try:
                messages = await sub.fetch(
                    min(256, pending, max_messages - len(found)), timeout=fetch_timeout_s
                )
            except TimeoutError:
                continue
            for message in messages:
                try:
                    envelope = envelope_pb2.EventEnvelope.FromString(message.data)
                    found.append(pb.LearnerReward.FromString(envelope.payload))
                except DecodeError:
                    log.warning("undecodable learner reward on %s", message.subject)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


# ---------------------------------------------------------------- the candidate


class CandidateInputsMissing(Exception):
    """The log lacks what the candidate model reads (named in the message)."""


def _arm_entry(features: Mapping[str, float]) -> OfferEntry:
    """The catalog entry of a logged arm, from its features as the learner
    names them (ai_plane/learner.py arm_features): `product=<name>`,
    `attr_<key>=<value>`, `value_log` (log1p of the value in minor units)."""
    product = ""
    attributes: dict[str, str] = {}
    value_minor = -1
    for name, value in features.items():
        if name.startswith("product=") and value:
            product = name.removeprefix("product=")
        elif name.startswith("attr_") and "=" in name and value:
            key, _, text = name.removeprefix("attr_").partition("=")
            attributes[key] = text
        elif name == "value_log":
            value_minor = round(math.expm1(value))
    if not product or value_minor < 0:
        raise CandidateInputsMissing("an arm without product=<name> or value_log")
    return OfferEntry(product, value_minor, attributes)


def _context_vector(context: Mapping[str, float]) -> list[float]:
    """features.PROPENSITY_CONTEXT from the learner's context
    (learner.context_features): `channel=<n>`, `hour=<n>`, and the stored
    features standardized as `s_<i>` (undone here)."""
    channel = hour = math.nan
    for name in context:
        if name.startswith("channel="):
            channel = float(name.removeprefix("channel="))
        elif name.startswith("hour="):
            hour = float(name.removeprefix("hour="))
    stored = [context.get(f"s_{i}") for i in range(len(STORED_CENTER))]
    if math.isnan(channel) or math.isnan(hour) or any(v is None for v in stored):
        raise CandidateInputsMissing("context without channel=, hour= or s_0..s_6")
    return [
        channel,
        hour,
        *(
            float(z) * STORED_SCALE[i] + STORED_CENTER[i]
            for i, z in enumerate(stored)
            if z is not None
        ),
    ]


def propensity_rows(logged: LoggedRound) -> ope.FloatArray:
    """The propensity model's input rows (features.PROPENSITY_FEATURES
    order) of every arm of a logged ranking."""
    context = _context_vector(logged.context)
    return np.asarray(
        [[*offer_vector(_arm_entry(arm)), *context] for arm in logged.arm_features],
        dtype=np.float64,
    )


Predict = Callable[[ope.FloatArray], ope.FloatArray]


def logged_bandit(rounds: Sequence[LoggedRound], predict: Predict) -> ope.LoggedBandit:
    """The estimators' arrays: the candidate (greedy on predicted probability
    x reward_if_converted among each round's eligible arms), the logging
    probabilities and rewards, and the learner's expected rewards as DR's
    reward model. Arms are padded to the widest round (probability 0)."""
    width = max(len(r.arm_ids) for r in rounds)
    n = len(rounds)
    scores = np.full((n, width), -np.inf)
    eligible = np.zeros((n, width), dtype=bool)
    estimated = np.zeros((n, width))
    for i, logged in enumerate(rounds):
        k = len(logged.arm_ids)
        probability = predict(propensity_rows(logged))
        scores[i, :k] = probability * np.asarray(logged.rewards_if_converted)
        eligible[i, :k] = True
        estimated[i, :k] = logged.expected_rewards
    scores = np.where(eligible, scores, 0.0)
    return ope.LoggedBandit.of(
        np.asarray([r.chosen for r in rounds], dtype=np.int64),
        [r.reward for r in rounds],
        [r.chosen_probability for r in rounds],
        ope.greedy_distribution(scores, eligible),
        estimated,
    )


@dataclass(frozen=True)
class Evaluation:
    """What EstimatePolicyValue answers (before protobuf)."""

    logged_rounds: int
    skipped_rounds: int
    logged: ope.Estimate | None
    estimates: dict[str, ope.Estimate]
    unavailable_reason: str = ""
    detail: str = ""


def evaluate(
    rewards: Iterable[pb.LearnerReward],
    predict: Predict,
    since_us: int,
    until_us: int,
    min_rounds: int,
    confidence: float,
) -> Evaluation:
    rounds, skipped = counted_rounds(rewards, since_us, until_us)
    if not rounds:
        return Evaluation(0, skipped, None, {}, "OPE_NO_LOGGED_DATA", "no counted reward in window")
    if len(rounds) < min_rounds:
        return Evaluation(
            len(rounds),
            skipped,
            ope.on_policy([r.reward for r in rounds], confidence),
            {},
            "OPE_TOO_FEW_ROUNDS",
            f"{len(rounds)} rounds, ai.ope.min_rounds is {min_rounds}",
        )
    logged = ope.on_policy([r.reward for r in rounds], confidence)
    try:
        data = logged_bandit(rounds, predict)
    except CandidateInputsMissing as missing:
        return Evaluation(
            len(rounds), skipped, logged, {}, "OPE_CANDIDATE_INPUTS_MISSING", str(missing)
        )
    except ope.OpeInputError as error:
        return Evaluation(len(rounds), skipped, logged, {}, error.reason, error.message)
    return Evaluation(len(rounds), skipped, logged, ope.estimate_all(data, confidence))


async def evaluate_async(
    js: JetStreamContext | None,
    tenant_id: str,
    predict: Predict,
    since_us: int,
    until_us: int,
    min_rounds: int,
    confidence: float,
    max_messages: int,
) -> Evaluation:
    if js is None:
        return Evaluation(0, 0, None, {}, "OPE_LOG_UNAVAILABLE", "the plane has no NATS (nats.url)")
    rewards = await read_rewards(js, tenant_id, since_us, max_messages)
    return await asyncio.to_thread(
        evaluate, rewards, predict, since_us, until_us, min_rounds, confidence
    )


# ---------------------------------------------------------------- the RPC and the gate


def _estimate_pb(found: ope.Estimate) -> pb.PolicyValueEstimate:
    return pb.PolicyValueEstimate(
        estimator=found.estimator,
        value=found.value,
        lower=found.lower,
        upper=found.upper,
        stderr=found.stderr if math.isfinite(found.stderr) else 0.0,
        rounds=found.rounds,
        effective_rounds=found.effective_rounds,
    )


JetStreamSource = Callable[[], Awaitable[JetStreamContext | None]]


class OpeEvaluator:
    """EstimatePolicyValue and PromoteModel's gate (ai.ope)."""

    def __init__(
        self,
        config: AiOpeConfig,
        registry: Registry,
        jetstream: JetStreamSource,
        now_us: Callable[[], int],
    ) -> None:
        self.config = config
        self._registry = registry
        self._jetstream = jetstream
        self._now_us = now_us

    def _predict(self, record: ModelRecord) -> Predict:
        if tuple(record.feature_names) != PROPENSITY_FEATURES:
            raise FailedPrecondition(
                "OPE_MODEL_FEATURES_CHANGED",
                f"{record.model} v{record.version} reads other features than this plane "
                f"logs ({FEATURE_SET_VERSION}): it cannot be evaluated on this log",
                "version",
            )
        booster = lgb.Booster(model_str=self._registry.artifact_text(record.model, record.version))

        def predict(rows: ope.FloatArray) -> ope.FloatArray:
            return np.asarray(booster.predict(rows), dtype=np.float64)

        return predict

    async def estimate(
        self,
        model: str,
        version: int,
        tenant_id: str = "",
        since_us: int = 0,
        until_us: int = 0,
    ) -> pb.EstimatePolicyValueResponse:
        if model != RANKING_MODEL:
            raise InvalidArgument(
                "OPE_MODEL_NOT_RANKING",
                f"only {RANKING_MODEL} ranks offers; {model!r} has no logged policy",
                "model",
            )
        if tenant_id:
            check_tenant_id(tenant_id, "tenant_id")
        await asyncio.to_thread(self._registry.reload)
        record = self._registry.get(model, version)
        until_us = until_us or self._now_us()
        since_us = since_us or until_us - self.config.window_s * 1_000_000
        if since_us >= until_us:
            raise InvalidArgument("OPE_WINDOW_EMPTY", "since must be before until", "since")
        try:
            predict = self._predict(record)
        except FailedPrecondition as changed:
            found = Evaluation(0, 0, None, {}, changed.reason, changed.message)
        else:
            found = await evaluate_async(
                await self._jetstream(),
                tenant_id,
                predict,
                since_us,
                until_us,
                self.config.min_rounds,
                self.config.confidence,
                self.config.max_rounds,
            )
        if found.unavailable_reason:
            log.info(
                "off-policy estimate of %s v%d not computed: %s (%s)",
                model,
                record.version,
                found.unavailable_reason,
                found.detail,
            )
        return pb.EstimatePolicyValueResponse(
            model=model,
            version=record.version,
            logged_rounds=found.logged_rounds,
            skipped_rounds=found.skipped_rounds,
            logged=_estimate_pb(found.logged) if found.logged is not None else None,
            estimates=[_estimate_pb(e) for e in found.estimates.values()],
            estimator=self.config.estimator,
            confidence=self.config.confidence,
            interval="clt",
            unavailable_reason=found.unavailable_reason,
        )

    async def gate(self, model: str, version: int, force: bool) -> pb.OpeGate:
        """The verdict on promoting `version` of `model` to live; raises
        FailedPrecondition when it refuses (and force is off)."""
        margin = self.config.margin
        if not self.config.gate:
            return pb.OpeGate(outcome="DISABLED", margin=margin)
        if model != RANKING_MODEL:
            return pb.OpeGate(outcome="NOT_APPLICABLE", margin=margin)
        answer = await self.estimate(model, version)
        if answer.unavailable_reason:
            if self.config.on_unavailable == "refuse" and not force:
                raise FailedPrecondition(
                    answer.unavailable_reason,
                    f"the off-policy gate could not estimate {model} v{version} "
                    f"({answer.unavailable_reason}) and ai.ope.on_unavailable is refuse; "
                    "promote with force to override",
                    "version",
                    {"gate": "UNAVAILABLE", "logged_rounds": str(answer.logged_rounds)},
                )
            outcome = "FORCED" if self.config.on_unavailable == "refuse" else "SKIPPED"
            log.warning(
                "promotion of %s v%d not gated: %s", model, version, answer.unavailable_reason
            )
            return pb.OpeGate(outcome=outcome, estimate=answer, margin=margin)
        chosen = next(e for e in answer.estimates if e.estimator == answer.estimator)
        # logged x (1 - margin) for a positive value; for a negative one (explicit
        # negatives configured below 0) the margin still lowers the floor.
        floor = answer.logged.value - margin * abs(answer.logged.value)
        if chosen.lower >= floor:
            return pb.OpeGate(outcome="PASSED", estimate=answer, margin=margin)
        if force:
            log.warning(
                "promotion of %s v%d forced past the off-policy gate: %s lower bound %.4f "
                "below %.4f",
                model,
                version,
                chosen.estimator,
                chosen.lower,
                floor,
            )
            return pb.OpeGate(outcome="FORCED", estimate=answer, margin=margin)
        raise FailedPrecondition(
            "OPE_CANDIDATE_BELOW_LOGGED",
            f"{model} v{version}: the {chosen.estimator.upper()} estimate's lower bound "
            f"{chosen.lower:.4f} ({answer.confidence:.0%}) is below the logging policy's "
            f"value {answer.logged.value:.4f} less margin {margin:g} ({floor:.4f}) on "
            f"{answer.logged_rounds} logged rounds; promote with force to override",
            "version",
            {
                "estimator": chosen.estimator,
                "candidate_value": f"{chosen.value:.6g}",
                "candidate_lower": f"{chosen.lower:.6g}",
                "logged_value": f"{answer.logged.value:.6g}",
                "floor": f"{floor:.6g}",
                "margin": f"{margin:g}",
                "logged_rounds": str(answer.logged_rounds),
            },
        )
