"""Hostile input survived (issue 11 §6): every RPC of every plane, found in
the contracts' descriptors, called through the real servers as a legitimate
caller (the admin certificate for the planes, a partner key with every scope
for the gateway) with requests drawn by tests/fuzz/strategies.py.

Each case asserts, from outside the servers: the answer is never INTERNAL or
UNKNOWN (nor DATA_LOSS, UNIMPLEMENTED, UNAUTHENTICATED or UNAVAILABLE for a
legitimate caller), no plane dies, no call outlives its deadline, and a call
that was refused changed nothing (every table of every database, the model
registry, every JetStream stream; tests/fuzz/state.py).

TRIPLANE_FUZZ_CASES cases per plane, split over its RPCs (`make fuzz`: 10,000;
`make test`: a short run). An RPC's requests depend only on TRIPLANE_FUZZ_SEED,
its path and the case count, so a finding replays with its RPC alone (the
failure says how).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed

from bench.common import merge_results
from tests.fuzz.harness import (
    CASES_PER_PLANE,
    SEED,
    TALLY,
    WRITE_RESULTS,
    FuzzWorld,
    PlaneDied,
)
from tests.fuzz.targets import PLANE_OF_PACKAGE, Target, cases_of, services, targets

TARGETS = targets()
# The most cases one RPC gets, for its timeout.
_MOST_PER_RPC = max(cases_of(t, TARGETS, CASES_PER_PLANE) for t in TARGETS)
pytestmark = [pytest.mark.nats, pytest.mark.timeout(max(300, 3 * _MOST_PER_RPC))]


@pytest.fixture(scope="module")
def fuzz_world() -> Iterator[FuzzWorld]:
    world = FuzzWorld()
    try:
        world.start()
        yield world
    finally:
        world.stop()
        if WRITE_RESULTS and TALLY.planes:
            merge_results(TALLY.totals())


def test_every_rpc_of_every_contract_is_fuzzed() -> None:
    methods = {f"/{s.full_name}/{m.name}" for s in services() for m in s.methods}
    assert {t.path for t in TARGETS} == methods
    assert {t.plane for t in TARGETS} == set(PLANE_OF_PACKAGE.values())


@pytest.mark.parametrize("target", TARGETS, ids=[t.test_id for t in TARGETS])
def test_rpc_survives_hostile_input(fuzz_world: FuzzWorld, target: Target) -> None:
    strategy = fuzz_world.strategy_for(target)

    @hypothesis_seed(SEED ^ zlib.crc32(target.path.encode()))
    @settings(
        max_examples=cases_of(target, TARGETS, CASES_PER_PLANE),
        deadline=None,
        database=None,
        # Findings are counted, not raised: nothing to shrink.
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def case(spec: dict[str, Any]) -> None:
        fuzz_world.run_case(target, spec)

    # A plane that died is reported below, with the request that killed it.
    with contextlib.suppress(PlaneDied):
        case()
    findings = TALLY.findings_of(target.test_id)
    replay = (
        f"replay: TRIPLANE_FUZZ_SEED={SEED} TRIPLANE_FUZZ_CASES={CASES_PER_PLANE}"
        f" pytest tests/fuzz -k '{target.test_id}'"
    )
    assert not findings, "\n".join([replay] + [f.describe() for f in findings])
