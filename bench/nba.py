"""`make bench ONLY=nba`: next best action through the public gateway API
against Vowpal Wabbit on the same stream, and the calibration of off-policy
evaluation (ai_plane/ope.py).

Part 1, the learner as a partner meets it (a stack: money, policy, AI with
its Triton, the gateway, NATS; TLS and an API key as shipped; and, unless
TRIPLANE_BENCH_NBA_BASELINE=0, a second stack alike but for
gateway.arbitration.policy: arbitration, the path before the learner, called
in turns with the first on the same stream):

* A tenant registers its own catalog through the policy plane's admin API
  (PutOffer): OFFERS offers, ids no simulator knows, each a theme (travel,
  grocery, fuel, savings) and a tier (basic, plus, premium) in its
  attributes, all of one value (so the objective, probability x value, is
  the conversion probability for every learner alike).
* A seeded stream of ROUNDS decisions: each a customer (of CUSTOMERS) and a
  context of FEATURES numbers sent in DecideNextActionRequest.features. The
  ground truth, hidden from every learner: P(convert | x, offer) =
  sigmoid(BASE + SLOPE x[theme] + TIER_STEP tier + b_offer), so the best
  offer is the theme of the largest context number, at the highest tier.
* Each shown offer's outcome is drawn from that truth with common random
  numbers (round t converts when u_t < p(x_t, offer): two learners choosing
  alike are rewarded alike) and reported with RecordOutcome: CONVERTED (with
  the offer's value), else DISMISSED or IGNORED. LATE_SHARE of the outcomes
  arrive late: DELAY_MIN..DELAY_MAX decisions after theirs (within the reward
  window: late to the learner, not past the window).
* Vowpal Wabbit `--cb_explore_adf` (squarecb, and epsilon 0.05), with the
  same context and the offers' catalog attributes (`-q ca`), learns on the
  same stream with the same delays, in this process.
* Baselines from the truth: random (the mean over offers), the best constant
  offer, and the oracle.

Figures: `nba_api_reward_mean` (Triplane's progressive reward: the mean
realized reward of the shown offers; a decision that showed nothing counts
0), `vw_api_stream_reward_mean` (VW's best setting), their ratio
`nba_api_vs_vw_ratio` (target >= 1.0), each setting's own mean, the
baselines, `nba_shown_share`, and `decide_latency_ms_p99` of the same run's
DecideNextAction calls (sequential, one caller), against the arbitration
stack's in the same turns (`decide_latency_p99_vs_arbitration_ratio`, target
<= 1.10; `nba_arbitration_reward_mean` is what that path earned on the
stream). `_expected` variants are the
mean truth probability of the offers chosen: the same comparison without the
outcome draws' noise.

Part 2, OPE calibration (pure numpy, no stack): OPE_SEEDS logs of
OPE_ROUNDS rounds each, chosen by a known randomized logging policy; the
value of a second known policy (mostly greedy on the truth) is estimated by
IPS, SNIPS and DR (reward model: ridge regression per action, cross-fitted
on two halves), with 95% CLT intervals. The truth is that policy's exact
on-policy value (expectation over 10^6 contexts). `ope_coverage_<estimator>`
is the share of seeds whose interval covers it (target >= 0.95; with
OPE_SEEDS seeds a perfectly calibrated 95% interval still reads 0.95 +- 0.025);
`ope_interval_coverage` is DR's, the estimator the promotion gate reads. IPS's
CLT interval runs a little short (0.92 at 3,000 rounds, 0.94 at 10,000 here):
its per-round terms are the rewards times importance weights up to 24, a
skewed distribution the normal approximation covers only as n grows; SNIPS
and DR, whose terms are bounded by the reward range, are at or above 0.95.

Knobs (environment): TRIPLANE_BENCH_NBA_ROUNDS (3000),
TRIPLANE_BENCH_NBA_OPE_SEEDS (300), TRIPLANE_BENCH_NBA_OPE_ROUNDS (10000),
TRIPLANE_BENCH_NBA_PHASES
(comma-separated subset of: api, ope).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ai_plane import ope
from bench.common import merge_results, percentile, print_table

FloatArray = npt.NDArray[np.float64]

ROUNDS = int(os.environ.get("TRIPLANE_BENCH_NBA_ROUNDS", "3000"))
OPE_SEEDS = int(os.environ.get("TRIPLANE_BENCH_NBA_OPE_SEEDS", "300"))
PHASES = set(os.environ.get("TRIPLANE_BENCH_NBA_PHASES", "api,ope").split(","))
# A second stack decided by arbitration, called in turns with the learner's.
BASELINE = os.environ.get("TRIPLANE_BENCH_NBA_BASELINE", "1") != "0"
TENANT = "nba-bench"
# Enough that one customer rarely comes back within an offer's 1 s cooldown
# (which would take the offer shown last out of the eligible set).
CUSTOMERS = 1000
FEATURES = ("cart_z", "tenure_z", "engagement_z", "savings_z")
THEMES = ("travel", "grocery", "fuel", "savings")
THEME_PRODUCT = {
    "travel": "cashback",
    "grocery": "cashback",
    "fuel": "bnpl",
    "savings": "savings",
}
TIERS = ("basic", "plus", "premium")
OFFERS = len(THEMES) * len(TIERS)
OFFER_VALUE_MINOR = 1000
BASE, SLOPE, TIER_STEP = -1.6, 1.5, 0.25
LATE_SHARE, DELAY_MIN, DELAY_MAX = 0.2, 20, 200
DISMISS_SHARE = 0.7
SEED = 20261206
RPC_TIMEOUT_S = 5.0
VW_SETTINGS = {
    "squarecb": "--cb_explore_adf --squarecb -q ca --quiet",
    "epsilon_0.05": "--cb_explore_adf --epsilon 0.05 -q ca --quiet",
}


# ---------------------------------------------------------------- the world


@dataclass(frozen=True)
class Offer:
    offer_id: str
    theme: int
    tier: int
    bias: float

    @property
    def attributes(self) -> dict[str, str]:
        return {"theme": THEMES[self.theme], "tier": TIERS[self.tier]}

    @property
    def product(self) -> str:
        return THEME_PRODUCT[THEMES[self.theme]]


@dataclass(frozen=True)
class Stream:
    offers: list[Offer]
    contexts: FloatArray  # (rounds, FEATURES)
    customers: npt.NDArray[np.int64]  # (rounds,)
    uniforms: FloatArray  # (rounds,): common random numbers of the outcomes
    delays: npt.NDArray[np.int64]  # (rounds,): 0 or DELAY_MIN..DELAY_MAX
    dismissed: npt.NDArray[np.bool_]  # (rounds,): a non-conversion reported DISMISSED

    def truth(self, t: int) -> FloatArray:
        """P(convert | x_t, offer) for every offer, in catalog order."""
        x = self.contexts[t]
        logits = np.array(
            [BASE + SLOPE * x[o.theme] + TIER_STEP * o.tier + o.bias for o in self.offers]
        )
        p: FloatArray = 1.0 / (1.0 + np.exp(-logits))
        return p

    def converts(self, t: int, offer_index: int) -> bool:
        return bool(self.uniforms[t] < self.truth(t)[offer_index])


def make_stream(rounds: int, seed: int = SEED) -> Stream:
    rng = np.random.default_rng(seed)
    # Ids no simulator knows: a partner's own catalog.
    tag = f"{seed % 9973:04d}"
    offers = [
        Offer(
            f"acme{tag}_{THEMES[theme]}_{TIERS[tier]}",
            theme,
            tier,
            float(rng.normal(scale=0.15)),
        )
        for theme in range(len(THEMES))
        for tier in range(len(TIERS))
    ]
    late = rng.random(rounds) < LATE_SHARE
    delays = np.where(late, rng.integers(DELAY_MIN, DELAY_MAX + 1, size=rounds), 0)
    return Stream(
        offers,
        rng.normal(size=(rounds, len(FEATURES))),
        rng.integers(0, CUSTOMERS, size=rounds),
        rng.random(rounds),
        delays.astype(np.int64),
        rng.random(rounds) < DISMISS_SHARE,
    )


@dataclass
class Baselines:
    random_mean: float
    best_constant_mean: float
    best_constant_offer: str
    oracle_mean: float


def baselines(stream: Stream) -> Baselines:
    p = np.array([stream.truth(t) for t in range(len(stream.contexts))])
    per_offer = p.mean(axis=0)
    best = int(per_offer.argmax())
    return Baselines(
        float(per_offer.mean()),
        float(per_offer[best]),
        stream.offers[best].offer_id,
        float(p.max(axis=1).mean()),
    )


@dataclass
class Run:
    """One learner's progressive reward on the stream."""

    name: str
    rewards: list[float] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    shown: int = 0

    def add(self, stream: Stream, t: int, offer_index: int | None) -> float:
        if offer_index is None:
            self.rewards.append(0.0)
            self.expected.append(0.0)
            return 0.0
        self.shown += 1
        reward = 1.0 if stream.converts(t, offer_index) else 0.0
        self.rewards.append(reward)
        self.expected.append(float(stream.truth(t)[offer_index]))
        return reward

    @property
    def mean(self) -> float:
        return float(np.mean(self.rewards)) if self.rewards else math.nan

    @property
    def expected_mean(self) -> float:
        return float(np.mean(self.expected)) if self.expected else math.nan

    def half_means(self) -> tuple[float, float]:
        half = len(self.expected) // 2
        return float(np.mean(self.expected[:half])), float(np.mean(self.expected[half:]))


# ---------------------------------------------------------------- Vowpal Wabbit


def _vw_example(stream: Stream, t: int, label: tuple[int, float, float] | None) -> list[str]:
    x = stream.contexts[t]
    shared = "shared |c " + " ".join(f"{n}:{v:.6f}" for n, v in zip(FEATURES, x, strict=True))
    lines = [shared]
    for i, offer in enumerate(stream.offers):
        prefix = ""
        if label is not None and label[0] == i:
            prefix = f"0:{label[1]:.1f}:{label[2]:.6f} "
        lines.append(
            f"{prefix}|a offer={offer.offer_id} product={offer.product} "
            f"theme={THEMES[offer.theme]} tier={TIERS[offer.tier]}"
        )
    return lines


def run_vw(stream: Stream, arguments: str, name: str, seed: int) -> Run:
    from vowpalwabbit import Workspace

    workspace = Workspace(f"{arguments} --random_seed {seed}")
    rng = np.random.default_rng(seed)
    run = Run(name)
    # Due round -> (round, chosen, cost, probability) of the outcomes arriving then.
    pending: dict[int, list[tuple[int, int, float, float]]] = {}
    for t in range(len(stream.contexts)):
        for index, chosen, cost, probability in pending.pop(t, []):
            workspace.learn(_vw_example(stream, index, (chosen, cost, probability)))
        pmf = np.asarray(workspace.predict(_vw_example(stream, t, None)), dtype=np.float64)
        pmf = pmf / pmf.sum()
        chosen = int(rng.choice(len(pmf), p=pmf))
        reward = run.add(stream, t, chosen)
        due = t + 1 + int(stream.delays[t])
        # Learned as the product would: when the outcome arrives.
        pending.setdefault(due, []).append((t, chosen, -reward, float(pmf[chosen])))
    workspace.finish()
    return run


# ---------------------------------------------------------------- the product, through the API


@dataclass
class ApiArm:
    """One stack through its public gateway API, and what it earned."""

    policy: str
    stub: Any
    metadata: tuple[tuple[str, str], ...]
    ai_address: str
    tls: Any
    run: Run
    latencies: list[float] = field(default_factory=list)
    # Due round -> (decision id, round) of the outcomes arriving then.
    pending: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    notes: dict[str, Any] = field(
        default_factory=lambda: {"reasons": {}, "errors": 0, "record_errors": 0, "excluded": 0}
    )


def _key_file(state_dir: Path, key: str) -> Path:
    """The stack's tokenization key (a file, as the planes read it)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "tokenization.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


async def open_api_arm(
    exits: contextlib.AsyncExitStack, stream: Stream, state_dir: Path, policy: str
) -> ApiArm:
    """A stack as shipped (TLS, API keys; the gateway bench's config: caps
    out of reach), gateway.arbitration.policy `policy`, no global holdout
    (a holdout shows nothing and would count 0 here), the tenant's catalog
    and customers registered through the admin API."""
    from bench.gateway import stack_config
    from triplane.common.v1 import types_pb2
    from triplane.gateway.v1 import gateway_pb2_grpc
    from triplane.money.v1 import money_pb2
    from triplane.policy.v1 import policy_pb2
    from triplane.runtime.config import with_overrides
    from triplane.runtime.secret_files import random_key_b64
    from triplane.runtime.tls import open_channel
    from triplane_client import LedgerAdminClient, PolicyAdminClient
    from triplane_sim.demo_world import daytime_zone, kyc_profile, product_enum
    from triplane_tools.partner_keys import create_partner_key
    from triplane_tools.stack import Stack

    key_path = _key_file(state_dir, random_key_b64())
    config = with_overrides(
        stack_config(state_dir, "on", key_path),
        {"gateway": {"holdout_share": 0.0, "arbitration": {"policy": policy}}},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}
    stack = await exits.enter_async_context(Stack(config, environ=env))
    tls = stack.tls_files()
    ledger = LedgerAdminClient(stack.addresses["money"], timeout_s=30, tls=tls)
    admin = PolicyAdminClient(stack.addresses["policy"], timeout_s=30, tls=tls)
    account_ids = [f"nbacust{i:04d}" for i in range(CUSTOMERS)]
    try:
        await ledger.create_tenant(TENANT, "nba bench")
        for start in range(0, len(account_ids), 500):
            await ledger.create_accounts(
                TENANT,
                [
                    money_pb2.NewAccount(
                        account_id=account_id,
                        currency="USD",
                        kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                        constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                    )
                    for account_id in account_ids[start : start + 500]
                ],
            )
        await admin.create_tenant(TENANT, "nba bench")
        # The partner's own catalog, as a tenant registers it.
        for offer in stream.offers:
            await admin.put_offer(
                policy_pb2.Offer(
                    tenant_id=TENANT,
                    offer_id=offer.offer_id,
                    product=product_enum(offer.product),
                    title=offer.offer_id.replace("_", " "),
                    value=types_pb2.Money(amount_minor=OFFER_VALUE_MINOR, currency="USD"),
                    attributes=offer.attributes,
                    topic=policy_pb2.TOPIC_MARKETING,
                    channels=[policy_pb2.CHANNEL_IN_APP],
                    cooldown_s=1,
                )
            )
        zone = daytime_zone()
        now_us = int(time.time() * 1_000_000)

        async def customer(index: int, account_id: str) -> None:
            customer_id = f"c_{account_id}"
            profile = kyc_profile(TENANT, customer_id, index, now_us)
            profile.kyc_tier = 3
            await admin.put_customer_profile(
                profile, change_id=f"kyc-{customer_id}", actor="nba-bench"
            )
            await admin.put_contact_profile(
                policy_pb2.ContactProfile(tenant_id=TENANT, customer_id=customer_id, time_zone=zone)
            )
            await admin.set_consent(
                TENANT,
                customer_id,
                policy_pb2.Consent(
                    channel=policy_pb2.CHANNEL_IN_APP,
                    topic=policy_pb2.TOPIC_MARKETING,
                    status=policy_pb2.CONSENT_STATUS_GRANTED,
                    lawful_basis=policy_pb2.LAWFUL_BASIS_CONSENT,
                ),
            )

        for start in range(0, len(account_ids), 16):
            await asyncio.gather(
                *(
                    customer(start + i, account_id)
                    for i, account_id in enumerate(account_ids[start : start + 16])
                )
            )
    finally:
        await ledger.close()
        await admin.close()
    api_key = await create_partner_key(
        config, stack.addresses["gateway"], TENANT, state_dir=stack.state_dir
    )
    channel = await exits.enter_async_context(
        open_channel(stack.addresses["gateway"], stack.partner_tls())
    )
    return ApiArm(
        policy,
        gateway_pb2_grpc.GatewayServiceStub(channel),
        (("authorization", f"Bearer {api_key}"),),
        stack.addresses["ai"],
        tls,
        Run(f"triplane_{policy}"),
    )


async def _report(arm: ApiArm, stream: Stream, decision_id: str, t: int) -> None:
    from triplane.common.v1 import types_pb2
    from triplane.gateway.v1 import gateway_pb2 as gw

    converted = arm.run.rewards[t] > 0
    value = None
    if converted:
        kind = gw.OUTCOME_KIND_CONVERTED
        value = types_pb2.Money(amount_minor=OFFER_VALUE_MINOR, currency="USD")
    elif stream.dismissed[t]:
        kind = gw.OUTCOME_KIND_DISMISSED
    else:
        kind = gw.OUTCOME_KIND_IGNORED
    try:
        await arm.stub.RecordOutcome(
            gw.RecordOutcomeRequest(
                idempotency_key=f"o{uuid.uuid4().hex}",
                decision_id=decision_id,
                kind=kind,
                value=value,
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=arm.metadata,
        )
    except Exception as error:  # counted, the run goes on
        arm.notes["record_errors"] += 1
        arm.notes.setdefault("record_error", repr(error)[:300])


async def _decide(arm: ApiArm, stream: Stream, t: int, account_id: str) -> None:
    from triplane.gateway.v1 import gateway_pb2 as gw

    index_of = {o.offer_id: i for i, o in enumerate(stream.offers)}
    for decision_id, round_ in arm.pending.pop(t, []):
        await _report(arm, stream, decision_id, round_)
    request = gw.DecideNextActionRequest(
        idempotency_key=f"d{uuid.uuid4().hex}",
        customer_id=f"c_{account_id}",
        account_id=account_id,
        surface="checkout",
        region="US",
        features={n: float(v) for n, v in zip(FEATURES, stream.contexts[t], strict=True)},
    )
    started = time.perf_counter()
    try:
        answer = await arm.stub.DecideNextAction(
            request, timeout=RPC_TIMEOUT_S, metadata=arm.metadata
        )
    except Exception as error:
        arm.notes["errors"] += 1
        arm.notes.setdefault("error", repr(error)[:300])
        arm.run.add(stream, t, None)
        return
    arm.latencies.append((time.perf_counter() - started) * 1000.0)
    for reason in answer.reasons:
        arm.notes["reasons"][reason] = arm.notes["reasons"].get(reason, 0) + 1
    arm.notes["excluded"] += bool(answer.excluded)
    if answer.rank_fallback_reason:
        # Rank did not answer (e.g. past gateway.budgets.ai_rank_budget_ms):
        # the decision falls back to arbitration and is not the learner's.
        fallbacks = arm.notes.setdefault("rank_fallbacks", {})
        fallbacks[answer.rank_fallback_reason] = fallbacks.get(answer.rank_fallback_reason, 0) + 1
    shown = index_of.get(answer.offer.offer_id) if answer.offer.offer_id else None
    if answer.action != gw.ACTION_SHOW_OFFER or shown is None:
        arm.run.add(stream, t, None)
        return
    arm.run.add(stream, t, shown)
    due = t + 1 + int(stream.delays[t])
    arm.pending.setdefault(due, []).append((answer.decision_id, t))


async def _estimate_logged(arm: ApiArm) -> None:
    """The product's own exposure log, read back by off-policy evaluation:
    the live propensity version's value on this tenant's traffic."""
    from triplane.ai.v1 import ai_pb2, ai_pb2_grpc
    from triplane.runtime.tls import open_channel

    try:
        async with open_channel(arm.ai_address, arm.tls) as ai_channel:
            registry = ai_pb2_grpc.ModelRegistryServiceStub(ai_channel)
            arm.notes["ope"] = await registry.EstimatePolicyValue(
                ai_pb2.EstimatePolicyValueRequest(model="offer_propensity", tenant_id=TENANT),
                timeout=120,
            )
    except Exception as error:
        arm.notes["ope_error"] = repr(error)[:300]


async def run_api(stream: Stream, root: Path) -> list[ApiArm]:
    """The stream through the learner's stack and, when BASELINE, through a
    second stack decided by arbitration (the path before the learner), the
    two called in turns (the order alternating each round) so both see the
    same spells of a busy machine: the same-run latency comparison."""
    policies = ["learner", "arbitration"] if BASELINE else ["learner"]
    async with contextlib.AsyncExitStack() as exits:
        arms = [await open_api_arm(exits, stream, root / p, p) for p in policies]
        for t in range(len(stream.contexts)):
            account_id = f"nbacust{int(stream.customers[t]):04d}"
            for arm in arms if t % 2 == 0 else arms[::-1]:
                await _decide(arm, stream, t, account_id)
        for arm in arms:
            for due in sorted(arm.pending):
                for decision_id, round_ in arm.pending[due]:
                    await _report(arm, stream, decision_id, round_)
            arm.pending.clear()
        await _estimate_logged(arms[0])
    return arms


# ---------------------------------------------------------------- OPE calibration

OPE_ACTIONS, OPE_DIM = 8, 4
OPE_ROUNDS = int(os.environ.get("TRIPLANE_BENCH_NBA_OPE_ROUNDS", "10000"))


@dataclass(frozen=True)
class OpeWorld:
    theta: FloatArray
    bias: FloatArray

    def q(self, x: FloatArray) -> FloatArray:
        result: FloatArray = 1.0 / (1.0 + np.exp(-(self.bias + x @ self.theta.T)))
        return result

    def logging(self, x: FloatArray) -> FloatArray:
        """The known randomized logging policy: a softmax of a weak score
        unrelated to the truth's order, mixed with uniform (every action >=
        0.3 / K)."""
        s = 0.6 * (x @ self.theta.T)[:, ::-1]
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        mixed: FloatArray = 0.7 * p + 0.3 / OPE_ACTIONS
        return mixed

    def target(self, x: FloatArray) -> FloatArray:
        """The known policy evaluated: 90% greedy on the truth, 10% uniform."""
        dist: FloatArray = (
            0.9 * ope.greedy_distribution(x @ self.theta.T + self.bias) + 0.1 / OPE_ACTIONS
        )
        return dist


def _ridge_per_action(
    x: FloatArray,
    actions: npt.NDArray[np.int64],
    rewards: FloatArray,
    fit_rows: npt.NDArray[np.bool_],
) -> FloatArray:
    design = np.hstack([np.ones((len(x), 1)), x])
    estimates = np.zeros((len(x), OPE_ACTIONS))
    for k in range(OPE_ACTIONS):
        rows = fit_rows & (actions == k)
        a, y = design[rows], rewards[rows]
        weights = np.linalg.solve(a.T @ a + np.eye(design.shape[1]), a.T @ y)
        estimates[:, k] = design @ weights
    return estimates


def ope_calibration(seeds: int, rounds: int = OPE_ROUNDS) -> dict[str, float]:
    world_rng = np.random.default_rng(SEED)
    world = OpeWorld(
        world_rng.normal(scale=0.9, size=(OPE_ACTIONS, OPE_DIM)),
        world_rng.normal(scale=0.4, size=OPE_ACTIONS) - 1.0,
    )
    population = np.random.default_rng(SEED + 1).normal(size=(1_000_000, OPE_DIM))
    truth = float((world.target(population) * world.q(population)).sum(axis=1).mean())
    logged_truth = float((world.logging(population) * world.q(population)).sum(axis=1).mean())
    covered: dict[str, int] = dict.fromkeys(ope.ESTIMATORS, 0)
    widths: dict[str, list[float]] = {e: [] for e in ope.ESTIMATORS}
    errors: dict[str, list[float]] = {e: [] for e in ope.ESTIMATORS}
    for seed in range(seeds):
        rng = np.random.default_rng(SEED + 100 + seed)
        x = rng.normal(size=(rounds, OPE_DIM))
        pb = world.logging(x)
        actions = (pb.cumsum(axis=1) > rng.random((rounds, 1))).argmax(axis=1)
        rows = np.arange(rounds)
        rewards = (rng.random(rounds) < world.q(x)[rows, actions]).astype(np.float64)
        first = rows < rounds // 2
        # Cross-fitted: each half's reward model is fitted on the other half.
        q_hat = np.where(
            first[:, None],
            _ridge_per_action(x, actions, rewards, ~first),
            _ridge_per_action(x, actions, rewards, first),
        )
        data = ope.LoggedBandit.of(actions, rewards, pb[rows, actions], world.target(x), q_hat)
        for name, found in ope.estimate_all(data, confidence=0.95).items():
            covered[name] += found.lower <= truth <= found.upper
            widths[name].append(found.upper - found.lower)
            errors[name].append(found.value - truth)
    results: dict[str, float] = {
        # The gate's estimator (ai.ope.estimator): DR.
        "ope_interval_coverage": covered["dr"] / seeds,
        "ope_seeds": seeds,
        "ope_rounds_per_seed": rounds,
        "ope_true_value": truth,
        "ope_logging_policy_value": logged_truth,
        "ope_confidence": 0.95,
    }
    for name in ope.ESTIMATORS:
        results[f"ope_coverage_{name}"] = covered[name] / seeds
        results[f"ope_interval_width_mean_{name}"] = float(np.mean(widths[name]))
        results[f"ope_bias_{name}"] = float(np.mean(errors[name]))
        results[f"ope_rmse_{name}"] = float(np.sqrt(np.mean(np.square(errors[name]))))
    return results


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


# ---------------------------------------------------------------- main


def _rows_api(results: dict[str, Any]) -> list[tuple[str, object, str]]:
    return [
        (k, results[k], note)
        for k, note in (
            ("nba_api_reward_mean", "Triplane through DecideNextAction/RecordOutcome"),
            ("vw_api_stream_reward_mean", "VW's best setting, same stream"),
            ("nba_api_vs_vw_ratio", "target >= 1.0"),
            ("vw_squarecb_reward_mean", ""),
            ("vw_epsilon_0.05_reward_mean", ""),
            ("nba_api_reward_expected_mean", "mean truth p of the offers shown"),
            ("vw_squarecb_reward_expected_mean", ""),
            ("vw_epsilon_0.05_reward_expected_mean", ""),
            ("nba_random_reward_mean", "uniform over the catalog"),
            ("nba_best_constant_reward_mean", "one offer for everyone"),
            ("nba_oracle_reward_mean", "the truth's best offer every time"),
            ("nba_api_second_half_expected_mean", "after learning"),
            ("vw_squarecb_second_half_expected_mean", ""),
            ("nba_shown_share", "decisions that showed an offer"),
            ("nba_excluded_share", "decisions with an offer excluded (cooldown)"),
            ("nba_arbitration_reward_mean", "the same stream decided by arbitration (before)"),
            ("decide_latency_ms_p99", "this run's DecideNextAction calls, learner"),
            ("decide_latency_ms_p50", ""),
            ("decide_arbitration_latency_ms_p99", "arbitration's stack, in turns"),
            ("decide_latency_p99_vs_arbitration_ratio", "target <= 1.10"),
        )
        if k in results
    ]


def main() -> int:
    results: dict[str, Any] = {}
    failed = False
    if "ope" in PHASES:
        started = time.monotonic()
        found = ope_calibration(OPE_SEEDS)
        results.update(found)
        lows = {
            e: wilson(found[f"ope_coverage_{e}"] * OPE_SEEDS, OPE_SEEDS) for e in ope.ESTIMATORS
        }
        print_table(
            f"OPE calibration ({OPE_SEEDS} seeds x {OPE_ROUNDS} rounds, "
            f"{time.monotonic() - started:.0f} s)",
            [("ope_true_value", found["ope_true_value"], "the evaluated policy's on-policy value")]
            + [
                (
                    f"ope_coverage_{e}",
                    found[f"ope_coverage_{e}"],
                    f"target >= 0.95; 95% Wilson {lows[e][0]:.3f}..{lows[e][1]:.3f}; "
                    f"mean width {found[f'ope_interval_width_mean_{e}']:.3f}, "
                    f"bias {found[f'ope_bias_{e}']:+.4f}",
                )
                for e in ope.ESTIMATORS
            ],
        )
    if "api" in PHASES:
        stream = make_stream(ROUNDS)
        base = baselines(stream)
        runs = {
            name: run_vw(stream, arguments, f"vw_{name}", SEED)
            for name, arguments in VW_SETTINGS.items()
        }
        with tempfile.TemporaryDirectory(prefix="triplane-bench-nba-") as tmp:
            started = time.monotonic()
            arms = asyncio.run(run_api(stream, Path(tmp)))
            api_s = time.monotonic() - started
        learner, api, notes = arms[0], arms[0].run, arms[0].notes
        best_name = max(runs, key=lambda n: runs[n].mean)
        vw_best = runs[best_name]
        results.update(
            {
                "nba_rounds": ROUNDS,
                "nba_offers": OFFERS,
                "nba_api_reward_mean": api.mean,
                "nba_api_reward_expected_mean": api.expected_mean,
                "nba_api_second_half_expected_mean": api.half_means()[1],
                "vw_api_stream_reward_mean": vw_best.mean,
                "vw_api_stream_best_setting": best_name,
                "nba_api_vs_vw_ratio": api.mean / vw_best.mean if vw_best.mean else math.nan,
                "nba_api_vs_vw_expected_ratio": api.expected_mean / vw_best.expected_mean
                if vw_best.expected_mean
                else math.nan,
                "nba_random_reward_mean": base.random_mean,
                "nba_best_constant_reward_mean": base.best_constant_mean,
                "nba_best_constant_offer": base.best_constant_offer,
                "nba_oracle_reward_mean": base.oracle_mean,
                "nba_shown_share": api.shown / max(1, ROUNDS),
                # Decisions where the policy plane took an offer out (a cooldown).
                "nba_excluded_share": notes["excluded"] / max(1, ROUNDS),
                "nba_decide_errors": notes["errors"],
                "nba_record_errors": notes["record_errors"],
                "nba_api_run_s": api_s,
                # The key issue 13 names; the gateway suite writes the same key
                # (its open loop at a fixed rate), so the suite run last wins:
                # nba_decide_latency_ms_p99 is this suite's alone.
                "decide_latency_ms_p99": percentile(learner.latencies, 99),
                "decide_latency_ms_p50": percentile(learner.latencies, 50),
                "nba_decide_latency_ms_p99": percentile(learner.latencies, 99),
            }
        )
        if len(arms) > 1:
            before = arms[1]
            results.update(
                {
                    "nba_arbitration_reward_mean": before.run.mean,
                    "nba_arbitration_reward_expected_mean": before.run.expected_mean,
                    "decide_arbitration_latency_ms_p99": percentile(before.latencies, 99),
                    "decide_arbitration_latency_ms_p50": percentile(before.latencies, 50),
                    "decide_latency_p99_vs_arbitration_ratio": percentile(learner.latencies, 99)
                    / percentile(before.latencies, 99),
                }
            )
        for name, run in runs.items():
            results[f"vw_{name}_reward_mean"] = run.mean
            results[f"vw_{name}_reward_expected_mean"] = run.expected_mean
            results[f"vw_{name}_second_half_expected_mean"] = run.half_means()[1]
        print_table(f"NBA through the gateway ({ROUNDS} rounds, {api_s:.0f} s)", _rows_api(results))
        for arm in arms:
            commonest = sorted(arm.notes["reasons"].items(), key=lambda kv: -kv[1])[:6]
            print(f"{arm.policy}: decision reasons: {commonest}")
            print(f"{arm.policy}: rank fallbacks: {arm.notes.get('rank_fallbacks', {})}")
            for key in ("error", "record_error"):
                if key in arm.notes:
                    print(f"{arm.policy}: first {key}: {arm.notes[key]}")
        results["nba_rank_fallback_share"] = sum(notes.get("rank_fallbacks", {}).values()) / max(
            1, ROUNDS
        )
        ope_answer = notes.get("ope")
        if ope_answer is not None:
            results["nba_ope_logged_rounds"] = int(ope_answer.logged_rounds)
            results["nba_ope_unavailable_reason"] = ope_answer.unavailable_reason or "none"
            if ope_answer.HasField("logged"):
                results["nba_ope_logged_value"] = ope_answer.logged.value
            for found in ope_answer.estimates:
                results[f"nba_ope_live_propensity_{found.estimator}_value"] = found.value
                results[f"nba_ope_live_propensity_{found.estimator}_lower"] = found.lower
                results[f"nba_ope_live_propensity_{found.estimator}_upper"] = found.upper
            print(
                "off-policy evaluation of the product's exposure log (live offer_propensity "
                f"as a greedy policy): {ope_answer.logged_rounds} rounds, unavailable: "
                f"{ope_answer.unavailable_reason or 'no'}, logged value "
                f"{ope_answer.logged.value:.4f}; "
                + ", ".join(
                    f"{e.estimator} {e.value:.4f} [{e.lower:.4f}, {e.upper:.4f}]"
                    for e in ope_answer.estimates
                )
            )
        if "ope_error" in notes:
            print(f"off-policy evaluation failed: {notes['ope_error']}")
        failed = notes["errors"] > ROUNDS // 10
    merge_results(results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
