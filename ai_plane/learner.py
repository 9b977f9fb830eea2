"""The contextual learner: Vowpal Wabbit's `--cb_explore_adf` embedded, one
model per tenant (or tenant and surface), offers as arms described by their
catalog entries.

Features (VW namespaces; every name hashed by VW into 2^bits weights, so the
space is bounded whatever the catalogs and contexts are):

* `c`, the context (shared by every arm of a ranking): each numeric feature of
  the partner's request (`f_<name>` with its value, and `fb_<name>=<bucket>`:
  the value itself for a small integer, else its signed log2 bucket, so a
  linear model can still learn a threshold), `surface=`, `channel=`,
  `region=`, `hour=` and `daypart=` (categoricals), and the customer's stored
  features (`s_<i>`, standardized). Names never hold ' ', '|' or ':' (VW's
  separators; each becomes '_').
* `a`, the arm: `product=`, each catalog attribute `attr_<key>=<value>`, the
  value's log (`value_log`) and bucket (`vb=`), the propensity model's
  prediction (`propensity`) and `offer=<offer id>`. The id lets the model
  correct one offer; everything else is shared by every offer with the same
  attributes, so a new offer is ranked from what it is on first sight.
* `-q ca`: every context feature crossed with every arm feature (the
  preference of this context for this kind of offer).

The objective is the expected value of the outcome: the reward of a
conversion is the value realized (or the offer's catalog value) times the
offer's lever over `value_scale_minor` (capped at `max_reward`); VW learns the
expected reward of each arm in each context and explores by SquareCB (or
epsilon-greedy). VW gives the distribution; the arm is drawn from it here
with a uniform number derived from the rank id, so the logged probability is
exactly the one the arm was drawn with, and a repeat of the ranking draws the
same arm.

Determinism across replicas: VW's learning is a deterministic function of the
examples learned, in order; predictions change nothing (checked by a test),
so replicas applying the same reward stream hold the same models.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import math
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from triplane.ai.v1 import ai_pb2
from triplane.common.v1 import envelope_pb2
from triplane.runtime import bus
from triplane.runtime.config import AiLearnerConfig

CONTEXT, ARM = "c", "a"
# VW's text format separators and every control character become "_".
_UNSAFE = str.maketrans({c: "_" for c in [" ", "|", ":", *map(chr, range(32)), "\x7f"]})
# Standardization of the stored context (features.PROPENSITY_CONTEXT order,
# channel and hour excluded: they enter as categoricals).
STORED_CENTER = (3.0, 8.0, 7.0, 0.0, 10.0, 0.7, 2.0)
STORED_SCALE = (2.0, 3.0, 4.0, 10.0, 3.0, 0.2, 1.0)
_MAX_ABS = 1e9


def _name(text: str) -> str:
    return text.translate(_UNSAFE)


def _number(value: float) -> float:
    if not math.isfinite(value):
        return 0.0
    return max(-_MAX_ABS, min(_MAX_ABS, value))


def bucket(value: float) -> str:
    """A categorical for a number: small integers as themselves, else the
    signed log2 bucket (1.5 -> "l1", 300 -> "l8", -40 -> "-l5")."""
    if value == int(value) and abs(value) <= 16:
        return str(int(value))
    sign = "-" if value < 0 else ""
    return f"{sign}l{int(math.log2(1.0 + abs(value)))}"


def categorical(name: str, value: str) -> ai_pb2.LearnerFeature:
    return ai_pb2.LearnerFeature(name=f"{_name(name)}={_name(value)}", value=1.0)


def numeric(name: str, value: float) -> ai_pb2.LearnerFeature:
    return ai_pb2.LearnerFeature(name=_name(name), value=_number(value))


def context_features(
    features: Mapping[str, float],
    surface: str,
    channel: int,
    region: str,
    hour: int,
    stored: Sequence[float],
) -> list[ai_pb2.LearnerFeature]:
    """The shared context, namespace `c`. `stored` is the propensity context
    without channel and hour (features.PROPENSITY_CONTEXT[2:])."""
    out: list[ai_pb2.LearnerFeature] = []
    for key in sorted(features):
        value = _number(float(features[key]))
        out.append(numeric(f"f_{key}", value))
        out.append(categorical(f"fb_{key}", bucket(value)))
    if surface:
        out.append(categorical("surface", surface))
    out.append(categorical("channel", str(channel)))
    if region:
        out.append(categorical("region", region))
    out.append(categorical("hour", str(hour)))
    out.append(categorical("daypart", str(hour // 6)))
    for i, value in enumerate(stored[: len(STORED_CENTER)]):
        z = (float(value) - STORED_CENTER[i]) / STORED_SCALE[i]
        out.append(numeric(f"s_{i}", z))
    return out


def arm_features(
    offer_id: str,
    product: str,
    value_minor: int,
    attributes: Mapping[str, str],
    propensity: float | None,
) -> list[ai_pb2.LearnerFeature]:
    """One arm, namespace `a`: what the catalog says it is."""
    out = [categorical("product", product or "none")]
    for key in sorted(attributes):
        out.append(categorical(f"attr_{key}", attributes[key]))
    value_log = math.log1p(max(0, value_minor))
    out.append(numeric("value_log", value_log))
    out.append(categorical("vb", str(int(value_log))))
    if propensity is not None and math.isfinite(propensity):
        out.append(numeric("propensity", propensity))
    out.append(categorical("offer", offer_id))
    return out


def _line(namespace: str, features: Iterable[ai_pb2.LearnerFeature]) -> str:
    parts = [f"|{namespace}"]
    for f in features:
        parts.append(f.name if f.value == 1.0 and "=" in f.name else f"{f.name}:{f.value!r}")
    return " ".join(parts)


def example_lines(
    exposure: ai_pb2.LearnerExposure, label: tuple[int, float, float] | None = None
) -> list[str]:
    """VW's multiline ADF text: the shared context, then one line per arm;
    `label` (arm index, cost, probability) marks the arm learned from."""
    lines = ["shared " + _line(CONTEXT, exposure.context)]
    for i, arm in enumerate(exposure.arms):
        prefix = f"0:{label[1]!r}:{label[2]!r} " if label is not None and label[0] == i else ""
        lines.append(prefix + _line(ARM, arm.features))
    return lines


def unit_draw(seed: str) -> float:
    """A uniform number in [0, 1) from a string (SHA-256, deterministic)."""
    digest = hashlib.sha256(seed.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def draw(probabilities: Sequence[float], u: float) -> int:
    """The index whose cumulative band holds u; never one of probability 0."""
    cumulative = 0.0
    for i, p in enumerate(probabilities):
        cumulative += p
        if u < cumulative and p > 0:
            return i
    return max(i for i, p in enumerate(probabilities) if p > 0)


def normalized(values: Sequence[float]) -> list[float]:
    clean = [max(0.0, v) if math.isfinite(v) else 0.0 for v in values]
    total = math.fsum(clean)
    if total <= 0:
        return [1.0 / len(values)] * len(values)
    return [v / total for v in clean]


@dataclass(frozen=True)
class Prediction:
    probabilities: list[float]
    # Expected reward of each arm (the regressor's estimate; 0 before any learning).
    expected: list[float]


def vw_arguments(config: AiLearnerConfig) -> str:
    if config.exploration == "squarecb":
        explore = f"--squarecb --gamma_scale {config.gamma_scale!r}"
    else:
        explore = f"--epsilon {config.epsilon!r}"
    return (
        f"--cb_explore_adf {explore} -q {CONTEXT}{ARM} -b {config.bits} "
        f"--random_seed {config.seed} --quiet"
    )


def policy_name(config: AiLearnerConfig) -> str:
    return f"vw_cb_explore_adf_{config.exploration}"


class VwLearner:
    """One VW workspace per model key, created by the first reward it learns
    (a key with none predicts uniformly: every arm's estimate is 0). At most
    max_live_models are in memory; beyond, the least recently used is saved
    to bytes (VW's own model file, all of its state) and reloaded on use. A
    model saved and reloaded learns exactly as one kept live (tested), so
    which models a replica keeps live never changes what it learns."""

    def __init__(self, config: AiLearnerConfig) -> None:
        from vowpalwabbit import pyvw

        self._pyvw = pyvw
        self.config = config
        self._args = vw_arguments(config)
        self._live: OrderedDict[str, Any] = OrderedDict()
        self._cold: dict[str, bytes] = {}
        # The saved bytes of live models no reward moved since (a snapshot
        # saves only the models that learned: VW saves on the event loop).
        self._saved: dict[str, bytes] = {}
        self.learned = 0

    # ---- models ----

    def model_keys(self) -> list[str]:
        return sorted({*self._live, *self._cold})

    def _new(self, data: bytes | None) -> Any:
        if data is None:
            return self._pyvw.Workspace(self._args)
        fd, path = tempfile.mkstemp(prefix="triplane-vw-", suffix=".model")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return self._pyvw.Workspace(f"{self._args} -i {path}")
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    @staticmethod
    def _bytes(workspace: Any) -> bytes:
        fd, path = tempfile.mkstemp(prefix="triplane-vw-", suffix=".model")
        os.close(fd)
        try:
            workspace.save(path)
            with open(path, "rb") as f:
                return f.read()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _workspace(self, key: str, create: bool) -> Any | None:
        workspace = self._live.get(key)
        if workspace is not None:
            return workspace
        data = self._cold.pop(key, None)
        if data is None and not create:
            return None
        workspace = self._live[key] = self._new(data)
        if data is not None:
            self._saved[key] = data
        self._evict(keep=key)
        return workspace

    def _evict(self, keep: str) -> None:
        while len(self._live) > self.config.max_live_models:
            oldest = next(k for k in self._live if k != keep)
            workspace = self._live.pop(oldest)
            saved = self._saved.pop(oldest, None)
            self._cold[oldest] = saved if saved is not None else self._bytes(workspace)
            workspace.finish()

    # ---- ranking and learning ----

    def predict(self, key: str, exposure: ai_pb2.LearnerExposure) -> Prediction:
        n = len(exposure.arms)
        workspace = self._workspace(key, create=False)
        if workspace is None:
            return Prediction([1.0 / n] * n, [0.0] * n)
        examples = workspace.parse(example_lines(exposure))
        try:
            pmf = workspace.predict(examples)
            # Index 0 is the shared example; each arm's partial prediction is
            # its estimated cost (the negative reward).
            expected = [-float(e.get_partial_prediction()) for e in examples[1:]]
        finally:
            workspace.finish_example(examples)
        return Prediction(normalized([float(p) for p in pmf]), expected)

    def learn(self, key: str, exposure: ai_pb2.LearnerExposure, index: int, reward: float) -> None:
        workspace = self._workspace(key, create=True)
        assert workspace is not None
        self._live.move_to_end(key)
        self._saved.pop(key, None)
        probability = max(exposure.arms[index].probability, 1e-6)
        workspace.learn(example_lines(exposure, (index, -float(reward), probability)))
        self.learned += 1

    # ---- snapshot ----

    def state(self) -> dict[str, bytes]:
        """Every model as VW's own saved bytes (on the event loop: VW is not
        thread safe), the cold ones first and the live ones in reward order."""
        out = dict(self._cold)
        for key, workspace in self._live.items():
            saved = self._saved.get(key)
            if saved is None:
                saved = self._saved[key] = self._bytes(workspace)
            out[key] = saved
        return out

    def live_order(self) -> list[str]:
        return list(self._live)

    def load_state(self, models: Mapping[str, bytes], live_order: Sequence[str]) -> None:
        self.close()
        self._cold = dict(models)
        for key in live_order:
            if key in self._cold:
                data = self._cold.pop(key)
                self._live[key] = self._new(data)
                self._saved[key] = data
        self._evict(keep="")

    def close(self) -> None:
        for workspace in self._live.values():
            workspace.finish()
        self._live.clear()
        self._cold.clear()
        self._saved.clear()


REWARD_EVENT = "ai.learner.reward"
REWARD_FILTER = "triplane.ai.*.learner.reward"


def reward_key(tenant_id: str, outcome_id: str) -> str:
    """What dedupes an outcome (the Nats-Msg-Id): outcome ids are unique per
    tenant only."""
    return f"{tenant_id}|{outcome_id}"


def window_outcome_id(rank_id: str) -> str:
    return f"window-{rank_id}"


def encode_reward(reward: ai_pb2.LearnerReward, occurred_at_us: int) -> bytes:
    envelope = bus.make_envelope(
        event_type=REWARD_EVENT,
        tenant_id=reward.tenant_id,
        payload=reward,
        occurred_at_us=occurred_at_us,
        event_id=reward.outcome_id,
    )
    return envelope.SerializeToString()


def decode_reward(data: bytes) -> ai_pb2.LearnerReward:
    envelope = envelope_pb2.EventEnvelope.FromString(data)
    return ai_pb2.LearnerReward.FromString(envelope.payload)


class RewardLearner:
    """The contextual learner with what it learned from, fed by the spine in
    stream order (or directly, for one replica without NATS).

    Rules, applied in stream order so every replica decides alike: an outcome
    id counts once (the newest max_outcome_ids remembered); per ranking, the
    first reward that is not late is learned and every later one is recorded
    only (`late` counts them), so a window's 0 and an outcome never both
    count."""

    event_type = REWARD_EVENT
    subject_filter = REWARD_FILTER
    snapshot_suffix = "learner"

    def __init__(self, vw: VwLearner, max_outcome_ids: int, max_rewarded_ranks: int) -> None:
        self.vw = vw
        self._max_ids = max_outcome_ids
        self._max_ranks = max_rewarded_ranks
        # outcome key -> (stream sequence, whether it was learned).
        self._applied: OrderedDict[str, tuple[int, bool]] = OrderedDict()
        # tenant|rank_id of rankings whose reward was learned.
        self._rewarded: OrderedDict[str, None] = OrderedDict()
        self.sequence = 0
        self.late = 0
        self._moved = asyncio.Event()

    def seen(self, key: str) -> bool:
        return key in self._applied

    def applied_at(self, key: str) -> int | None:
        found = self._applied.get(key)
        return None if found is None else found[0]

    def learned(self, key: str) -> bool:
        found = self._applied.get(key)
        return found is not None and found[1]

    def rewarded(self, tenant_id: str, rank_id: str) -> bool:
        return f"{tenant_id}|{rank_id}" in self._rewarded

    def apply_message(self, data: bytes, sequence: int) -> None:
        self.apply(decode_reward(data), sequence)

    def apply(self, reward: ai_pb2.LearnerReward, sequence: int = 0) -> bool:
        """Learns the reward if it is the ranking's first in-window one;
        False for a repeat, a late one or a later one."""
        if sequence:
            self.sequence = max(self.sequence, sequence)
        key = reward_key(reward.tenant_id, reward.outcome_id)
        learned = False
        if key not in self._applied:
            rank = f"{reward.tenant_id}|{reward.rank_id}"
            exposure = reward.exposure
            valid = 0 <= reward.arm_index < len(exposure.arms) and not exposure.held_out
            if not reward.late and rank not in self._rewarded and valid:
                self.vw.learn(exposure.model_key, exposure, reward.arm_index, reward.reward)
                learned = True
                self._rewarded[rank] = None
                while len(self._rewarded) > self._max_ranks:
                    self._rewarded.popitem(last=False)
            else:
                self.late += 1
            self._applied[key] = (sequence, learned)
            while len(self._applied) > self._max_ids:
                self._applied.popitem(last=False)
        if sequence:
            self._moved.set()
            self._moved = asyncio.Event()
        return learned

    async def wait_for(self, sequence: int) -> None:
        while self.sequence < sequence:
            await self._moved.wait()

    # ---- snapshot ----

    def capture(self) -> dict[str, Any]:
        models = self.vw.state()
        keys = list(models)
        blobs = [models[k] for k in keys]
        return {
            "sequence": np.asarray(self.sequence, dtype=np.int64),
            "late": np.asarray(self.late, dtype=np.int64),
            "outcome_ids": np.asarray(list(self._applied), dtype=np.str_),
            "outcome_sequences": np.asarray([s for s, _ in self._applied.values()], np.int64),
            "outcome_learned": np.asarray([ok for _, ok in self._applied.values()], np.bool_),
            "rewarded": np.asarray(list(self._rewarded), dtype=np.str_),
            "model_keys": np.asarray(keys, dtype=np.str_),
            "model_sizes": np.asarray([len(b) for b in blobs], dtype=np.int64),
            "model_bytes": np.frombuffer(b"".join(blobs), dtype=np.uint8),
            "live_order": np.asarray(self.vw.live_order(), dtype=np.str_),
        }

    @staticmethod
    def encode(captured: dict[str, Any]) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **captured)
        return buffer.getvalue()

    def snapshot(self) -> bytes:
        return self.encode(self.capture())

    def restore(self, data: bytes) -> None:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            keys = [str(k) for k in saved["model_keys"].tolist()]
            sizes = [int(n) for n in saved["model_sizes"].tolist()]
            blob = saved["model_bytes"].tobytes()
            models: dict[str, bytes] = {}
            offset = 0
            for key, size in zip(keys, sizes, strict=True):
                models[key] = blob[offset : offset + size]
                offset += size
            self.vw.load_state(models, [str(k) for k in saved["live_order"].tolist()])
            ids = [str(k) for k in saved["outcome_ids"].tolist()]
            sequences = [int(n) for n in saved["outcome_sequences"].tolist()]
            learned = [bool(b) for b in saved["outcome_learned"].tolist()]
            self._applied = OrderedDict(
                (k, (q, ok)) for k, q, ok in zip(ids, sequences, learned, strict=True)
            )
            self._rewarded = OrderedDict((str(r), None) for r in saved["rewarded"].tolist())
            self.sequence = int(saved["sequence"])
            self.late = int(saved["late"])
