"""Experiment assignment: deterministic, stable across processes, a global
holdout of the configured share, arms split by weight, bad config refused."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.experiments import HOLDOUT_ARM, Experiments, unit_interval
from triplane.runtime.config import ExperimentArmConfig, ExperimentConfig, load_config
from triplane.runtime.errors import InvalidArgument, NotFound

N = 40_000


def experiment(name: str, *arms: tuple[str, float], salt: str = "") -> ExperimentConfig:
    return ExperimentConfig(
        name=name, salt=salt or name, arms=[ExperimentArmConfig(name=a, weight=w) for a, w in arms]
    )


@pytest.fixture
def experiments() -> Experiments:
    return Experiments(
        [
            experiment("nba", ("control", 1.0), ("treatment", 3.0)),
            experiment("copy", ("a", 1.0), ("b", 1.0), ("c", 2.0)),
        ],
        holdout_share=0.1,
    )


def test_holdout_share_and_arm_weights(experiments: Experiments) -> None:
    arms: dict[str, int] = {}
    for i in range(N):
        arm = experiments.assign("acme", "nba", f"tok_{i}").arm
        arms[arm] = arms.get(arm, 0) + 1
    # Binomial standard deviation at N=40,000 is 0.0015 for 10%: allow 4 of them.
    assert abs(arms[HOLDOUT_ARM] / N - 0.1) < 0.006
    treated = arms["control"] + arms["treatment"]
    assert abs(arms["treatment"] / treated - 0.75) < 0.01


def test_assignment_is_deterministic_and_stable_across_processes(
    experiments: Experiments,
) -> None:
    first = [experiments.assign("acme", "copy", f"tok_{i}") for i in range(200)]
    again = [experiments.assign("acme", "copy", f"tok_{i}") for i in range(200)]
    assert first == again
    # Another interpreter (another hash seed) computes the same numbers.
    code = "from gateway.experiments import unit_interval;print(repr(unit_interval('a', 'b', 'c')))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
        timeout=30,
    )
    assert float(out.stdout) == unit_interval("a", "b", "c")


def test_holdout_is_global_and_per_tenant(experiments: Experiments) -> None:
    for i in range(2000):
        token = f"tok_{i}"
        nba = experiments.assign("acme", "nba", token)
        copy = experiments.assign("acme", "copy", token)
        assert nba.holdout == copy.holdout == experiments.in_holdout("acme", token)
    # Tenants are hashed apart: the same tokens are not held out together.
    acme = {i for i in range(N) if experiments.in_holdout("acme", f"tok_{i}")}
    globex = {i for i in range(N) if experiments.in_holdout("globex", f"tok_{i}")}
    assert len(acme & globex) / len(acme) < 0.15


def test_experiments_are_independent_of_each_other(experiments: Experiments) -> None:
    together = 0
    treated = 0
    for i in range(N):
        nba = experiments.assign("acme", "nba", f"tok_{i}")
        if nba.holdout:
            continue
        treated += 1
        together += (
            nba.arm == "treatment" and experiments.assign("acme", "copy", f"tok_{i}").arm == "c"
        )
    # P(treatment) x P(c) = 0.75 x 0.5.
    assert abs(together / treated - 0.375) < 0.015


def test_shipped_config_and_bad_definitions() -> None:
    shipped = Experiments.from_config(load_config(environ={}).gateway)
    assert shipped.names() == ["nba_default"]
    assert shipped.assign("demo", "nba_default", "tok_1").arm in ("learner", HOLDOUT_ARM)
    with pytest.raises(NotFound):
        shipped.assign("demo", "nope", "tok_1")
    with pytest.raises(InvalidArgument):
        shipped.assign("demo", "nba_default", "")
    cases = [
        ([experiment("x", ("a", 1.0))], 1.0, "gateway.holdout_share"),
        ([experiment("x", ("a", 1.0))], -0.1, "gateway.holdout_share"),
        ([experiment("x")], 0.1, "gateway.experiments[0].arms"),
        ([experiment("x", ("a", 0.0))], 0.1, "gateway.experiments[0].arms"),
        ([experiment("x", ("a", 1.0), ("a", 1.0))], 0.1, "gateway.experiments[0].arms"),
        ([experiment("x", (HOLDOUT_ARM, 1.0))], 0.1, "gateway.experiments[0].arms"),
        ([experiment("bad name", ("a", 1.0))], 0.1, "gateway.experiments[0].name"),
        (
            [experiment("x", ("a", 1.0)), experiment("x", ("b", 1.0))],
            0.1,
            "gateway.experiments[1].name",
        ),
    ]
    for definitions, share, field in cases:
        with pytest.raises(InvalidArgument) as err:
            Experiments(definitions, share)
        assert err.value.field == field


def test_no_holdout_means_everyone_is_treated() -> None:
    none = Experiments([experiment("x", ("only", 1.0))], 0.0)
    assert all(not none.assign("t", "x", f"c{i}").holdout for i in range(1000))


@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_every_customer_gets_exactly_one_stable_arm(tenant: str, token: str) -> None:
    experiments = Experiments([experiment("x", ("a", 1.0), ("b", 2.0))], holdout_share=0.25)
    first = experiments.assign(tenant, "x", token)
    assert first == experiments.assign(tenant, "x", token)
    assert first.arm in ("a", "b", HOLDOUT_ARM)
    assert first.holdout == (first.arm == HOLDOUT_ARM)
    assert 0.0 <= unit_interval(tenant, token) < 1.0
