"""Determinism and replay: property tests that Evaluate is a pure function and
that replaying the log reproduces every logged decision; drift and backtest."""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy_plane import replay as replay_mod
from policy_plane.bundle import BundleSource, shipped_default_path
from policy_plane.engine import PolicyEngine
from policy_plane.evaluation import CompiledBundle
from policy_plane.model import (
    EvaluationInput,
    Party,
    PaymentInput,
    ScoreInput,
    SnapshotInput,
    Velocity,
)
from policy_plane.replay import ReplayWindow

from .conftest import TENANT, payment_input

NAMES = ["Jane Example", "Dmitri Volkov", "Golden Crescent Exchanges Group", "Corner Shop", ""]
velocities = st.builds(
    Velocity,
    count_1h=st.integers(0, 20),
    count_24h=st.integers(0, 60),
    amount_minor_24h=st.integers(0, 2_000_000),
    amount_minor_30d=st.integers(0, 10_000_000),
)


def _input(
    key: str,
    kind: str,
    amount: int,
    currency: str,
    tier: int,
    source: str,
    score: float,
    name: str,
    country: str,
    velocity: Velocity,
    age: int,
    features: dict[str, float],
) -> EvaluationInput:
    return EvaluationInput(
        tenant_id=TENANT,
        idempotency_key=key,
        payment=PaymentInput(
            account_id="acct-1",
            credit_account_id="merchant-1",
            movement="authorize",
            kind=kind,
            amount_minor=amount,
            currency=currency,
            merchant_id="m",
            merchant_category="7995" if amount % 7 == 0 else "5411",
            device_id="d",
            customer=Party(name="Jane Example", country="US"),
            counterparty=Party(name=name, country=country),
        ),
        snapshot=SnapshotInput(
            kyc_tier=tier,
            kyc_country="US",
            score=ScoreInput(model="risk", version="1", source=source, score=score),
            account_velocity=velocity,
            account_age_days=age,
            features=features,
            decided_at_us=1_780_315_200_000_000,
        ),
    )


inputs = st.builds(
    _input,
    st.text("abcdefghij0123456789", min_size=1, max_size=20),
    st.sampled_from(["purchase", "payout", "transfer", "invoice"]),
    st.integers(1, 3_000_000),
    st.sampled_from(["USD", "EUR", "GBP", "JPY"]),
    st.integers(0, 3),
    st.sampled_from(["triton", "in_process", "last_good", "none", ""]),
    st.floats(0, 1, allow_nan=False),
    st.sampled_from(NAMES),
    st.sampled_from(["US", "FR", "KP", ""]),
    velocities,
    st.integers(0, 2_000),
    st.dictionaries(st.sampled_from(["a", "b"]), st.floats(-1e6, 1e6, allow_nan=False), max_size=2),
)


def _bundle(engine: PolicyEngine) -> CompiledBundle:
    live = engine.bundles.live
    assert live is not None
    return live


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(inp=inputs)
def test_evaluate_is_a_pure_function(engine: PolicyEngine, inp: EvaluationInput) -> None:
    bundle = _bundle(engine)
    first = bundle.evaluate(inp)
    again = bundle.evaluate(msgspec.json.decode(msgspec.json.encode(inp), type=EvaluationInput))
    assert first == again
    # A freshly compiled copy of the same version decides the same.
    fresh = engine.bundles.compile(bundle.source)
    assert fresh.version == bundle.version and fresh.evaluate(inp) == first


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(inputs, min_size=1, max_size=8, unique_by=lambda i: i.idempotency_key))
async def test_replay_reproduces_logged_decisions(
    engine: PolicyEngine, batch: list[EvaluationInput]
) -> None:
    prefix = f"p{engine.clock.now_us()}-"
    engine.clock.advance(1)  # type: ignore[attr-defined]
    for inp in batch:
        await engine.evaluate(
            msgspec.structs.replace(inp, idempotency_key=prefix + inp.idempotency_key)
        )
    report = await engine.replay(ReplayWindow(TENANT, "", 0, 0, 0), "")
    assert report.replayed >= len(batch)
    assert report.determinism_score == 1.0, report.changed


async def test_drift_under_another_bundle_and_backtest(engine: PolicyEngine) -> None:
    amounts = [1_000, 30_000, 60_000, 80_000, 2_000]
    decisions = []
    for index, amount in enumerate(amounts):
        decision, _ = await engine.evaluate(
            payment_input(f"d{index}", amount_minor=amount, score=None, source="none")
        )
        decisions.append(decision)
    # A stricter candidate: review every payment without a score above 250.00.
    stricter = (
        shipped_default_path()
        .read_text()
        .replace("no_score_review_minor: 50000", "no_score_review_minor: 25000")
    )
    info = engine.bundles.load(BundleSource(yaml_text=stricter, label_override="stricter"), "store")
    same = await engine.replay(ReplayWindow(TENANT, "", 0, 0, 0), "")
    assert same.determinism_score == 1.0 and same.replayed == 5
    await engine.label_decision(TENANT, decisions[1].record.decision_id, "fraud")
    await engine.label_decision(TENANT, decisions[2].record.decision_id, "chargeback")
    await engine.label_decision(TENANT, decisions[0].record.decision_id, "legitimate")
    report = await engine.replay(ReplayWindow(TENANT, "", 0, 0, 0), info.version)
    assert report.changed_count == 1 and report.drift_rate == 1 / 5
    changed = report.changed[0]
    assert changed.decision_id == decisions[1].record.decision_id
    assert (changed.logged_outcome, changed.replayed_outcome) == ("allow", "review")
    assert report.labelled == 3
    logged, replayed = report.logged_backtest, report.replayed_backtest
    assert (logged.true_positives, logged.false_negatives, logged.true_negatives) == (1, 1, 1)
    assert (replayed.true_positives, replayed.false_negatives) == (2, 0)
    assert replayed.recall == 1.0 and logged.recall == 0.5 and replayed.precision == 1.0


async def test_replay_window_by_account_and_time(engine: PolicyEngine) -> None:
    start = engine.clock.now_us()
    await engine.evaluate(payment_input("w1"))
    engine.clock.advance(60)  # type: ignore[attr-defined]
    middle = engine.clock.now_us()
    await engine.evaluate(payment_input("w2"))
    report = await engine.replay(ReplayWindow(TENANT, "", middle, 0, 0), "")
    assert report.replayed == 1
    report = await engine.replay(ReplayWindow(TENANT, "acct-other", start, 0, 0), "")
    assert report.replayed == 0


async def test_parallel_replay_gives_the_serial_report(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    decisions = []
    for index in range(60):
        amount = [1_000, 30_000, 45_000, 60_000, 600_000][index % 5]
        if index % 3 == 0:
            inp = payment_input(f"par{index}", amount_minor=amount, score=None, source="none")
        else:
            inp = payment_input(f"par{index}", amount_minor=amount, score=(index % 10) / 10)
        decisions.append((await engine.evaluate(inp))[0])
    for index, decision in enumerate(decisions[::4]):
        label = ["fraud", "legitimate", "chargeback"][index % 3]
        await engine.label_decision(TENANT, decision.record.decision_id, label)
    stricter = (
        shipped_default_path()
        .read_text()
        .replace("no_score_review_minor: 50000", "no_score_review_minor: 25000")
        .replace("score_review: 0.70", "score_review: 0.50")
    )
    candidate = engine.bundles.load(
        BundleSource(yaml_text=stricter, label_override="stricter"), "store"
    ).version
    sent_to_workers: list[int] = []

    class CountingExecutor(ProcessPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            sent_to_workers.append(len(args[0]))
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(replay_mod, "ProcessPoolExecutor", CountingExecutor)
    window = ReplayWindow(TENANT, "", 0, 2**62, 1_000)
    for version in ("", candidate):
        # Pages of 7, 3 changed decisions listed: order and merging both count.
        serial = replay_mod.replay_window(
            engine.store, engine.bundles.resolve, window, version, 7, 3, sealer=engine.sealer
        )
        parallel = replay_mod.replay_window(
            engine.store,
            engine.bundles.resolve,
            window,
            version,
            7,
            3,
            replay_mod.ReplayParallelism(workers=2, min_decisions=10),
            sealer=engine.sealer,
        )
        serial.elapsed_s = parallel.elapsed_s = 0.0
        assert parallel == serial
        assert serial.replayed == 60 and serial.labelled == 15
    assert serial.changed_count > 3 and len(serial.changed) == 3
    assert serial.determinism_score < 1.0
    # Pages beyond the first 10 decisions (two pages of 7) went to the workers
    # (or were replayed here while the workers were busy).
    assert 0 < sum(sent_to_workers) <= 2 * (60 - 14)


def failing_worker_start(*args: object) -> None:
    """A worker initializer that fails (as a worker whose start breaks does)."""
    raise RuntimeError("worker cannot start")


async def test_parallel_replay_falls_back_in_process_when_workers_fail(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for index in range(12):
        await engine.evaluate(payment_input(f"fb{index}", amount_minor=1_000 + 9_000 * index))
    window = ReplayWindow(TENANT, "", 0, 2**62, 1_000)
    serial = replay_mod.replay_window(
        engine.store, engine.bundles.resolve, window, "", 3, 5, sealer=engine.sealer
    )
    monkeypatch.setattr(replay_mod, "_worker_start", failing_worker_start)
    parallel = replay_mod.replay_window(
        engine.store,
        engine.bundles.resolve,
        window,
        "",
        3,
        5,
        replay_mod.ReplayParallelism(workers=2, min_decisions=1),
        sealer=engine.sealer,
    )
    serial.elapsed_s = parallel.elapsed_s = 0.0
    assert parallel == serial and serial.replayed == 12
    assert "replay workers failed" in caplog.text
