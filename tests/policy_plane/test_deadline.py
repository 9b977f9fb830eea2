"""Deadlines are budgets (rule 7): an Evaluate past its deadline, the caller's
capped by policy.budget_ms, is answered DEADLINE_EXCEEDED with nothing logged,
whether it ran out before deciding or while it waited for the log writer."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from policy_plane.app import build_plane
from policy_plane.engine import PolicyEngine
from triplane.policy.v1 import policy_pb2_grpc as pb_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.deadline import Deadline
from triplane.runtime.errors import DeadlineExceeded
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for

from .conftest import TENANT, make_config, payment_input
from .test_grpc import request


class SwitchDeadline(Deadline):
    """A deadline the test makes pass when it chooses."""

    def __init__(self) -> None:
        super().__init__(None)
        object.__setattr__(self, "passed", False)

    def expired(self) -> bool:
        return bool(self.__dict__["passed"])


async def logged(engine: PolicyEngine) -> int:
    result = await engine.verify_log()
    assert result.valid, result
    return result.records_checked


async def test_past_its_deadline_before_deciding_nothing_is_logged(
    any_engine: PolicyEngine,
) -> None:
    await any_engine.evaluate(payment_input("early"))
    with pytest.raises(DeadlineExceeded) as caught:
        await any_engine.evaluate(payment_input("late"), Deadline(time.monotonic() - 1))
    assert caught.value.reason == "DEADLINE_EXCEEDED"
    assert await logged(any_engine) == 1
    # Nothing was kept: the same key decides afresh, not as a replay.
    decision, replayed = await any_engine.evaluate(payment_input("late"))
    assert not replayed and decision.sequence == 2


async def test_past_its_deadline_while_queued_for_the_log_nothing_is_logged(
    engine: PolicyEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    write = engine.log._write_with_retries

    def held_write(batch: list[Any]) -> Any:
        entered.set()
        release.wait(30)
        return write(batch)

    monkeypatch.setattr(engine.log, "_write_with_retries", held_write)
    first = asyncio.create_task(engine.evaluate(payment_input("first")))
    # The writer holds "first" in its transaction; what comes now queues.
    assert await asyncio.to_thread(entered.wait, 30)
    budget = SwitchDeadline()
    late = asyncio.create_task(engine.evaluate(payment_input("late"), budget))
    gone = asyncio.create_task(engine.evaluate(payment_input("gone")))
    on_time = asyncio.create_task(engine.evaluate(payment_input("on-time"), SwitchDeadline()))
    for _ in range(5):
        await asyncio.sleep(0)
    object.__setattr__(budget, "passed", True)
    gone.cancel()
    release.set()
    await first
    with pytest.raises(DeadlineExceeded):
        await late
    with pytest.raises(asyncio.CancelledError):
        await gone
    _, replayed = await on_time
    assert not replayed
    assert await logged(engine) == 2
    for key in ("late", "gone"):
        _, replayed = await engine.evaluate(payment_input(key))
        assert not replayed


async def test_grpc_caps_the_callers_deadline_with_the_budget(
    state_dir: Path, clock: ManualClock
) -> None:
    # A budget nothing can meet: every Evaluate is refused, cleanly.
    config = make_config(state_dir, budget_ms=0.000001)
    plane = build_plane(config, clock, listen="127.0.0.1:0")
    await plane.start()
    try:
        await plane.engine.create_tenant(TENANT, "Acme")
        async with channel_for(config, f"127.0.0.1:{plane.server.port}") as channel:
            stub = pb_grpc.PolicyServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Evaluate(request("k1"), timeout=10)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert parse_rpc_error(caught.value)[0] == "DEADLINE_EXCEEDED"
        assert await logged(plane.engine) == 0
    finally:
        await plane.stop()
