"""The one retry policy: it refuses bad bounds naming the config key, waits
and stops as configured, and each of its users really retries per its own
config section (the outbox relay against a NATS that is unreachable and then
comes back, the ledger's group commit against a locked database, the decision
log against another writer that logged the same key first)."""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from money_plane import codec
from money_plane.domain import AccountKind, AccountSpec, Command, Constraint, Kind
from money_plane.engine import Job
from money_plane.store.base import StoreConflict
from money_plane.store.sqlite import SqliteLedgerStore
from policy_plane.app import build_engine
from policy_plane.engine import PolicyEngine
from policy_plane.model import EvaluationInput, Party, PaymentInput, ScoreInput, SnapshotInput
from triplane.runtime import bus
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, ConfigError, load_config
from triplane.runtime.errors import Unavailable
from triplane.runtime.net import free_port, host_port
from triplane.runtime.outbox import OutboxRelay, RelaySettings
from triplane.runtime.retry import RetryPolicy

log = logging.getLogger("tests.retry")
START_US = 1_780_315_200_000_000
# Bounds the waits for background work, so a broken relay fails the test
# instead of hanging it; nothing asserts how long anything took.
GIVE_UP_S = 60.0


def policy(**changes: Any) -> RetryPolicy:
    values: dict[str, Any] = {
        "initial_interval_s": 0.1,
        "backoff_coefficient": 2.0,
        "maximum_interval_s": 1.0,
        "maximum_attempts": 5,
        "jitter_s": 0.0,
    }
    values.update(changes)
    return RetryPolicy(**values)


# ---- the type: bounds, schedule, attempts ----


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"maximum_interval_s": 0.0}, "maximum_interval_s"),
        ({"maximum_interval_s": 100_000.0}, "maximum_interval_s"),
        ({"maximum_interval_s": math.nan}, "maximum_interval_s"),
        ({"maximum_interval_s": math.inf}, "maximum_interval_s"),
        ({"initial_interval_s": -0.1}, "initial_interval_s"),
        ({"initial_interval_s": 2.0}, "initial_interval_s"),
        ({"initial_interval_s": math.nan}, "initial_interval_s"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient"),
        ({"backoff_coefficient": 11.0}, "backoff_coefficient"),
        ({"jitter_s": -1.0}, "jitter_s"),
        ({"jitter_s": 5.0}, "jitter_s"),
        ({"maximum_attempts": -1}, "maximum_attempts"),
        ({"maximum_attempts": 10_001}, "maximum_attempts"),
    ],
)
def test_a_policy_out_of_bounds_is_refused_when_built(changes: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        policy(**changes)


def test_config_names_the_section_of_a_bad_policy() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(
            environ={},
            overrides={"money": {"store": {"conflict_retry": {"maximum_interval_s": -1}}}},
        )
    assert "maximum_interval_s" in str(caught.value)
    assert "money.store.conflict_retry" in str(caught.value)


def test_config_refuses_an_unknown_key_in_a_retry_section() -> None:
    with pytest.raises(ConfigError, match=r"money\.outbox\.relay_retry\.max_attempts"):
        load_config(
            environ={}, overrides={"money": {"outbox": {"relay_retry": {"max_attempts": 3}}}}
        )


@pytest.mark.parametrize(
    "key",
    ["money.outbox.relay_retry", "gateway.outbox.relay_retry", "policy.outbox.relay_retry"],
)
def test_a_relay_must_retry_until_cancelled(key: str) -> None:
    plane, outbox, section = key.split(".")
    overrides = {plane: {outbox: {section: {"maximum_attempts": 3}}}}
    with pytest.raises(ConfigError, match=rf"{key}\.maximum_attempts must be 0"):
        load_config(environ={}, overrides=overrides)


@pytest.mark.parametrize(
    "key",
    ["money.store.conflict_retry", "policy.decision_log.write_retry", "gateway.delivery.retry"],
)
def test_work_that_must_end_is_never_retried_until_cancelled(key: str) -> None:
    plane, part, section = key.split(".")
    overrides = {plane: {part: {section: {"maximum_attempts": 0}}}}
    with pytest.raises(ConfigError, match=rf"{key}\.maximum_attempts must be >= 1"):
        load_config(environ={}, overrides=overrides)


def test_an_sre_tunes_a_policy_from_the_environment() -> None:
    config = load_config(
        environ={
            "TRIPLANE__MONEY__STORE__CONFLICT_RETRY__MAXIMUM_ATTEMPTS": "7",
            "TRIPLANE__GATEWAY__OUTBOX__RELAY_RETRY__MAXIMUM_INTERVAL_S": "30",
        }
    )
    assert config.money.store.conflict_retry.maximum_attempts == 7
    assert config.gateway.outbox.relay_retry.maximum_interval_s == 30.0
    # Only what was set changed.
    assert config.money.outbox.relay_retry.maximum_interval_s == 5.0


def test_waits_grow_by_the_coefficient_up_to_the_maximum() -> None:
    p = policy(initial_interval_s=0.1, backoff_coefficient=3.0, maximum_interval_s=2.0)
    waits = [p.backoff_s(n) for n in range(1, 6)]
    assert waits == pytest.approx([0.1, 0.3, 0.9, 2.0, 2.0])
    constant = policy(initial_interval_s=0.5, backoff_coefficient=1.0)
    assert [constant.backoff_s(n) for n in (1, 4, 9)] == pytest.approx([0.5, 0.5, 0.5])


def test_jitter_adds_at_most_jitter_s_and_never_passes_the_maximum() -> None:
    p = policy(initial_interval_s=0.2, maximum_interval_s=0.5, jitter_s=0.25)
    first = [p.backoff_s(1) for _ in range(300)]
    assert all(0.2 <= w <= 0.45 for w in first)
    assert len({round(w, 6) for w in first}) > 1, "jitter spreads the waits"
    assert all(p.backoff_s(3) == pytest.approx(0.5) for _ in range(50))  # 0.8 + jitter, capped


def test_exhausted_counts_the_first_attempt() -> None:
    p = policy(maximum_attempts=3)
    assert [p.exhausted(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    assert not policy(maximum_attempts=0).exhausted(10_000)


def test_blocking_retries_stop_after_maximum_attempts_and_raise_the_last_error() -> None:
    p = policy(initial_interval_s=0.1, maximum_interval_s=1.0, maximum_attempts=4)
    slept: list[float] = []
    calls: list[int] = []

    def always_fails() -> None:
        calls.append(len(calls) + 1)
        raise ConnectionError(f"attempt {len(calls)}")

    retrying = p.retrying(ConnectionError, "test work", log, sleep=slept.append)
    with pytest.raises(ConnectionError, match="attempt 4"):
        retrying(always_fails)
    assert calls == [1, 2, 3, 4]
    assert slept == pytest.approx([0.1, 0.2, 0.4])


def test_an_error_it_is_not_for_is_raised_at_once() -> None:
    p = policy(maximum_attempts=5)
    slept: list[float] = []
    calls: list[int] = []

    def wrong_kind() -> None:
        calls.append(1)
        raise KeyError("not a conflict")

    with pytest.raises(KeyError):
        p.retrying(ConnectionError, "test work", log, sleep=slept.append)(wrong_kind)
    assert (calls, slept) == ([1], [])


def test_a_predicate_picks_which_errors_are_retried() -> None:
    p = policy(maximum_attempts=3)
    slept: list[float] = []
    errors = [ValueError("retry me"), ValueError("retry me"), ValueError("final")]

    def fails_then_final() -> None:
        raise errors.pop(0)

    retrying = p.retrying(lambda e: "retry me" in str(e), "test work", log, sleep=slept.append)
    with pytest.raises(ValueError, match="final"):
        retrying(fails_then_final)
    assert len(slept) == 2 and errors == []


async def test_until_cancelled_retries_past_any_count_and_then_succeeds() -> None:
    p = policy(maximum_attempts=0, initial_interval_s=0.0, maximum_interval_s=0.01)
    slept: list[float] = []
    calls = 0

    async def no_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def succeeds_on_the_50th() -> str:
        nonlocal calls
        calls += 1
        if calls < 50:
            raise ConnectionError("down")
        return "up"

    retrying = p.async_retrying(ConnectionError, "test work", log, sleep=no_sleep)
    assert await retrying(succeeds_on_the_50th) == "up"
    assert calls == 50 and len(slept) == 49


async def test_cancelling_the_caller_stops_a_retry_that_never_gives_up() -> None:
    p = policy(maximum_attempts=0, initial_interval_s=0.01, maximum_interval_s=0.01)
    calls = 0
    third_failure = asyncio.Event()

    async def never_succeeds() -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            third_failure.set()
        raise ConnectionError("down")

    task = asyncio.create_task(p.retry(never_succeeds, ConnectionError, "test work", log))
    await asyncio.wait_for(third_failure.wait(), GIVE_UP_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_each_retry_is_logged_with_its_attempt_and_wait(caplog: pytest.LogCaptureFixture) -> None:
    p = policy(maximum_attempts=2, initial_interval_s=0.25)
    with caplog.at_level(logging.WARNING, logger="tests.retry"), pytest.raises(OSError):
        p.retrying(OSError, "publishing", log, sleep=lambda _: None)(_raise_os_error)
    messages = [r.getMessage() for r in caplog.records if r.name == "tests.retry"]
    assert len(messages) == 1
    assert "publishing failed (attempt 1 of 2" in messages[0]
    assert "retrying in 0.250 s" in messages[0]


def _raise_os_error() -> None:
    raise OSError("boom")


# ---- the outbox relay: NATS unreachable, then reachable ----


class MemoryOutbox:
    """An outbox table in memory (the relay's OutboxSource protocol)."""

    def __init__(self) -> None:
        self.events: list[bus.OutgoingEvent] = []
        self.sent: set[str] = set()

    def unsent(self, limit: int) -> list[bus.OutgoingEvent]:
        return [e for e in self.events if e.event_id not in self.sent][:limit]

    def mark_sent(self, event_ids: Sequence[str], now_us: int) -> None:
        self.sent.update(event_ids)

    def delete_sent_before(self, before_us: int) -> int:
        return 0


class Forwarder:
    """A TCP port that is closed until `open()`, then forwards to NATS; it
    stands for a NATS server that goes away and comes back."""

    def __init__(self, port: int, target: tuple[str, int]) -> None:
        self.port = port
        self._target = target
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + GIVE_UP_S
    while not condition():
        if loop.time() > give_up_at:
            pytest.fail(f"gave up waiting for: {what}")
        await asyncio.sleep(0.01)


def event(tenant: str, index: int) -> bus.OutgoingEvent:
    return bus.OutgoingEvent(
        event_id=f"{tenant}-{index}",
        subject=f"triplane.money.{tenant}.retry_test.e{index}",
        data=f"event {index}".encode(),
    )


async def assert_in_jetstream(nats_url: str, events: list[bus.OutgoingEvent]) -> None:
    config = load_config(environ={}, overrides={"nats": {"url": nats_url}})
    client = await bus.connect(config.nats, "retry-test-reader")
    try:
        js = client.jetstream()
        for e in events:
            stored = await js.get_last_msg("TRIPLANE_MONEY", e.subject)
            assert stored.data == e.data
            assert stored.headers is not None and stored.headers["Nats-Msg-Id"] == e.event_id
    finally:
        await client.close()


async def test_relay_retries_while_nats_is_unreachable_then_publishes(nats_url: str) -> None:
    port = free_port()
    forwarder = Forwarder(port, host_port(nats_url.removeprefix("nats://")))
    config = load_config(
        environ={},
        overrides={
            "nats": {
                "url": f"nats://127.0.0.1:{port}",
                "connect_timeout_s": 0.5,
                "publish_timeout_s": 0.5,
            },
            "money": {
                "outbox": {
                    "relay_idle_poll_ms": 10,
                    "relay_retry": {
                        "initial_interval_s": 0.01,
                        "maximum_interval_s": 0.05,
                        "jitter_s": 0.0,
                    },
                }
            },
        },
    )
    tenant = f"retry{free_port()}"
    source = MemoryOutbox()
    source.events = [event(tenant, 0), event(tenant, 1)]
    relay = OutboxRelay(
        source,
        config.nats,
        RelaySettings.from_config(config.money.outbox, ["TRIPLANE_MONEY"]),
        ManualClock(START_US),
        client_name="retry-test-relay",
    )
    task = asyncio.create_task(relay.run())
    try:
        # Nothing listens: the relay keeps trying to connect, and publishes nothing.
        await until(lambda: relay.connect_failures >= 3, "three failed connection attempts")
        assert source.sent == set() and not task.done()
        await forwarder.open()
        await until(lambda: len(source.sent) == 2, "the first events published")
        await assert_in_jetstream(nats_url, source.events)

        # NATS goes away while connected: publishing fails and is retried.
        await forwarder.close()
        failures_before = relay.publish_failures
        source.events += [event(tenant, 2), event(tenant, 3)]
        relay.kick()
        await until(
            lambda: relay.publish_failures >= failures_before + 2, "two failed publish attempts"
        )
        assert source.sent == {e.event_id for e in source.events[:2]}
        await forwarder.open()
        await until(lambda: len(source.sent) == 4, "the later events published")
        await assert_in_jetstream(nats_url, source.events)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await relay.close()
        await forwarder.close()


# ---- the ledger: a group commit that finds the database locked ----


class ContendedStore(SqliteLedgerStore):
    """Another writer holds SQLite's write lock until the group commit's
    `release_on_attempt`-th attempt (0: for good)."""

    blocker: sqlite3.Connection
    release_on_attempt = 0
    attempts = 0

    def _group_transaction(self) -> Any:
        self.attempts += 1
        if self.attempts == self.release_on_attempt:
            self.blocker.rollback()
        return super()._group_transaction()


def contended_store(tmp_path: Path, conflict_retry: RetryPolicy) -> ContendedStore:
    store = ContendedStore(
        tmp_path / "money.db",
        codec.encode_event,
        codec.encode_account_event,
        3600,
        conflict_retry,
        # SQLite's own busy wait off: a locked database is a conflict at once.
        busy_timeout_ms=0,
    )
    store.create_schema()
    store.create_tenant("acme", "Acme", START_US)
    store.create_accounts("acme", [account("bank"), account("cust")], START_US)
    store.blocker = sqlite3.connect(tmp_path / "money.db", isolation_level=None)
    store.blocker.execute("BEGIN IMMEDIATE")
    return store


def account(account_id: str) -> AccountSpec:
    return AccountSpec(
        account_id=account_id,
        currency="USD",
        kind=AccountKind.ASSET,
        constraint=Constraint.NONE,
        overdraft_limit_minor=0,
        metadata={},
    )


def transfer_job(key: str) -> Job:
    command = Command(
        tenant_id="acme",
        idempotency_key=key,
        kind=Kind.TRANSFER,
        debit_account_id="bank",
        credit_account_id="cust",
        amount_minor=1_000,
        currency="USD",
    )
    return Job(tenant_id="acme", commands=[command])


def conflict_policy(maximum_attempts: int) -> RetryPolicy:
    return load_config(
        environ={},
        overrides={"money": {"store": {"conflict_retry": {"maximum_attempts": maximum_attempts}}}},
    ).money.store.conflict_retry


def test_group_commit_retries_a_locked_database_per_its_config(tmp_path: Path) -> None:
    store = contended_store(tmp_path, conflict_policy(3))
    store.release_on_attempt = 3
    try:
        [[outcome]] = store.commit_jobs([transfer_job("t1")], START_US)
        assert outcome.ok and outcome.entry is not None
        assert store.attempts == 3
        assert store.get_entry("acme", outcome.entry.entry_id) == outcome.entry
    finally:
        store.blocker.close()
        store.close()


def test_group_commit_gives_up_after_its_attempts_and_writes_nothing(tmp_path: Path) -> None:
    store = contended_store(tmp_path, conflict_policy(2))
    try:
        with pytest.raises(StoreConflict):
            store.commit_jobs([transfer_job("t1")], START_US)
        assert store.attempts == 2
        store.blocker.rollback()
        assert store.get_entry_by_idempotency_key("acme", "t1") is None
        account = store.get_account("acme", "cust")
        assert account is not None and account.credits_posted == 0
    finally:
        store.blocker.close()
        store.close()


# ---- the decision log: another chain logged the same key first ----


def policy_config(state_dir: Path, chain_id: str, maximum_attempts: int) -> Config:
    return load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": ""},
            "policy": {
                "decision_log": {
                    "chain_id": chain_id,
                    "write_retry": {"maximum_attempts": maximum_attempts},
                }
            },
        },
    )


def payment(key: str) -> EvaluationInput:
    return EvaluationInput(
        tenant_id="acme",
        idempotency_key=key,
        payment=PaymentInput(
            account_id="acct-1",
            credit_account_id="merchant-1",
            kind="purchase",
            amount_minor=2_500,
            currency="USD",
            merchant_id="m-1",
            merchant_category="5411",
            device_id="dev-1",
            customer=Party(name="Jane Example", country="US"),
            counterparty=Party(name="Corner Shop", country="US"),
        ),
        snapshot=SnapshotInput(
            kyc_tier=2,
            kyc_country="US",
            score=ScoreInput(model="payment_risk", version="3", source="triton", score=0.1),
            account_age_days=400,
        ),
    )


async def started_policy_engine(config: Config) -> PolicyEngine:
    engine = build_engine(config, ManualClock(START_US))
    await engine.start()
    await engine.create_tenant("acme", "Acme")
    return engine


def lose_the_first_check(engine: PolicyEngine) -> list[int]:
    """The log's first look for already-logged keys finds nothing, as if the
    other chain's insert landed just after it; returns the call count."""
    store = engine.store
    real = store.find_many_by_idempotency
    calls: list[int] = []

    def raced(tx: Any, keys: Any) -> Any:
        calls.append(1)
        return {} if len(calls) == 1 else real(tx, keys)

    store.find_many_by_idempotency = raced  # type: ignore[method-assign]
    return calls


async def test_decision_log_retries_a_key_logged_meanwhile_and_answers_with_it(
    state_dir: Path,
) -> None:
    first = await started_policy_engine(policy_config(state_dir, "chain-a", 4))
    second = await started_policy_engine(policy_config(state_dir, "chain-b", 4))
    try:
        original, replayed = await first.evaluate(payment("k1"))
        assert not replayed
        checks = lose_the_first_check(second)
        again, replayed = await second.evaluate(payment("k1"))
        assert replayed
        assert again.record.decision_id == original.record.decision_id
        assert (again.chain_id, again.sequence) == ("chain-a", original.sequence)
        assert len(checks) == 2, "one attempt hit the unique key, the retry found the record"
    finally:
        for engine in (first, second):
            await engine.stop()
            engine.store.db.close()


async def test_decision_log_gives_up_after_its_attempts(state_dir: Path) -> None:
    first = await started_policy_engine(policy_config(state_dir, "chain-a", 4))
    second = await started_policy_engine(policy_config(state_dir, "chain-b", 1))
    try:
        await first.evaluate(payment("k1"))
        checks = lose_the_first_check(second)
        with pytest.raises(Unavailable) as caught:
            await second.evaluate(payment("k1"))
        assert caught.value.reason == "DECISION_LOG_UNAVAILABLE"
        assert len(checks) == 1
        # The chain it failed to extend is intact, and a new key still logs.
        fresh, replayed = await second.evaluate(payment("k2"))
        assert not replayed and (fresh.chain_id, fresh.sequence) == ("chain-b", 1)
        assert (await second.verify_log()).valid
    finally:
        for engine in (first, second):
            await engine.stop()
            engine.store.db.close()


async def test_retry_awaits_a_callable_that_returns_a_coroutine() -> None:
    # tenacity awaits only coroutine functions: a lambda must still be awaited.
    p = policy(maximum_attempts=3, initial_interval_s=0.0, maximum_interval_s=0.01)
    answers: list[Exception | str] = [ConnectionError("down"), "up"]

    async def flaky() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await p.retry(lambda: flaky(), ConnectionError, "test work", log) == "up"
    assert answers == []
