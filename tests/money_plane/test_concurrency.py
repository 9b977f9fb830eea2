"""Concurrency: many clients retrying the same idempotency keys at once, in
tasks, threads and processes, and two ledgers (replicas) on one PostgreSQL
database. Every entry must exist exactly once and the books must balance."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from money_helpers import (
    DEBITS_LIMITED,
    NO_CONSTRAINT,
    BackendPlace,
    DbProbe,
    Kit,
    bps_leg,
    ledger_config,
    make_ledger,
    sign_token,
    spec,
    unique_tenant,
)

from money_plane.domain import Command, Kind, Outcome
from money_plane.ledger import Ledger
from triplane.runtime.clock import ManualClock, SystemClock
from triplane.runtime.errors import Unavailable
from triplane.runtime.tokens import (
    TokenSigner,
    generate_private_key,
    private_key_from_b64,
    private_key_to_b64,
)

KEYS = 40


def _commands(kit: Kit, prefix: str) -> list[Command]:
    return [kit.move(f"{prefix}-{i}", "bank", "alice", i + 1) for i in range(KEYS)]


async def _submit_with_retry(
    ledger: Ledger, tenant: str, commands: list[Command], unavailable: list[int]
) -> list[Outcome]:
    """A well-behaved client: retries what the ledger says is retryable."""
    for _ in range(20):
        try:
            return await ledger.submit(tenant, commands)
        except Unavailable:
            unavailable.append(1)
            await asyncio.sleep(0.01)
    raise AssertionError("the ledger stayed unavailable")


def _check_exactly_once(probe: DbProbe, tenant: str, prefix: str) -> None:
    by_key = probe.entries_by_key(tenant)
    mine = {k: n for k, n in by_key.items() if k.startswith(f"{prefix}-")}
    assert mine == {f"{prefix}-{i}": 1 for i in range(KEYS)}
    assert probe.invariant_problems(tenant) == []


async def test_tasks_retrying_the_same_keys_make_each_entry_once(kit: Kit) -> None:
    commands = _commands(kit, "same")
    unavailable: list[int] = []

    async def client(seed: int) -> dict[str, str]:
        rng = random.Random(seed)
        order = commands[:]
        rng.shuffle(order)
        seen: dict[str, str] = {}
        while order:
            # Some clients send one at a time, others in (non-atomic) batches.
            size = rng.choice([1, 1, 3, 7])
            chunk, order = order[:size], order[size:]
            for command, outcome in zip(
                chunk,
                await _submit_with_retry(kit.ledger, kit.tenant, chunk, unavailable),
                strict=True,
            ):
                assert outcome.error is None, outcome.error
                assert outcome.entry is not None
                seen[command.idempotency_key] = outcome.entry.entry_id
        return seen

    answers = await asyncio.gather(*[client(seed) for seed in range(12)])
    for key in answers[0]:
        assert len({answer[key] for answer in answers}) == 1, key
    _check_exactly_once(kit.probe, kit.tenant, "same")
    assert (await kit.balance("alice"))[0] == KEYS * (KEYS + 1) // 2
    await kit.assert_balanced()


async def test_tasks_racing_on_a_scarce_balance_agree_on_each_answer(kit: Kit) -> None:
    """Concurrent retries of transfers that cannot all succeed: each key gets
    one answer (success or a remembered refusal), the same for every client."""
    await kit.fund("alice", 100)
    commands = [kit.move(f"scarce-{i}", "alice", "merchant", 30) for i in range(8)]

    async def client(seed: int) -> dict[str, str]:
        order = commands[:]
        random.Random(seed).shuffle(order)
        outcomes = await asyncio.gather(*[kit.one(c) for c in order])
        return {
            c.idempotency_key: (o.error.reason if o.error else o.entry.entry_id)  # type: ignore[union-attr]
            for c, o in zip(order, outcomes, strict=True)
        }

    answers = await asyncio.gather(*[client(seed) for seed in range(6)])
    for key in answers[0]:
        assert len({answer[key] for answer in answers}) == 1, key
    successes = [k for k, v in answers[0].items() if v.startswith("ent_")]
    assert len(successes) == 3
    assert (await kit.balance("alice"))[0] == 10
    by_key = kit.probe.entries_by_key(kit.tenant)
    assert {k: n for k, n in by_key.items() if k.startswith("scarce-")} == {k: 1 for k in successes}
    # The other five were refused for the balance, and remembered as such.
    assert [v for v in answers[0].values() if not v.startswith("ent_")] == [
        "INSUFFICIENT_FUNDS"
    ] * 5
    await kit.assert_balanced()


def _thread_client(
    place: BackendPlace,
    signer: TokenSigner,
    tenant: str,
    seed: int,
    errors: list[BaseException],
    answers: list[dict[str, str]],
) -> None:
    """One thread, its own event loop and its own Ledger on the shared store."""

    async def run() -> None:
        clock = SystemClock()
        config = ledger_config(place.state_dir, signer)
        ledger = make_ledger(place.backend, place.where, config, signer, clock)
        await ledger.start(sweepers=False)
        try:
            now_s = clock.now_us() // 1_000_000
            commands = [
                Command(
                    tenant_id=tenant,
                    idempotency_key=f"thr-{i}",
                    kind=Kind.TRANSFER,
                    debit_account_id="bank",
                    credit_account_id="alice",
                    amount_minor=i + 1,
                    currency="USD",
                    decision_token=sign_token(
                        signer, tenant, f"thr-{i}", "bank", "alice", i + 1, issued_at_s=now_s
                    ),
                )
                for i in range(KEYS)
            ]
            random.Random(seed).shuffle(commands)
            unavailable: list[int] = []
            seen: dict[str, str] = {}
            for start in range(0, KEYS, 5):
                chunk = commands[start : start + 5]
                outcomes = await asyncio.gather(
                    *[_submit_with_retry(ledger, tenant, [c], unavailable) for c in chunk]
                )
                for command, [outcome] in zip(chunk, outcomes, strict=True):
                    assert outcome.entry is not None, outcome.error
                    seen[command.idempotency_key] = outcome.entry.entry_id
            answers.append(seen)
        finally:
            await ledger.stop()

    try:
        asyncio.run(run())
    except BaseException as exc:
        errors.append(exc)


async def test_threads_each_with_a_ledger_make_each_entry_once(
    backend_place: BackendPlace, signer: TokenSigner
) -> None:
    tenant = await _prepare_tenant(backend_place, signer)
    errors: list[BaseException] = []
    answers: list[dict[str, str]] = []
    threads = [
        threading.Thread(
            target=_thread_client, args=(backend_place, signer, tenant, seed, errors, answers)
        )
        for seed in range(4)
    ]
    for thread in threads:
        thread.start()
    loop = asyncio.get_running_loop()
    for thread in threads:
        await loop.run_in_executor(None, thread.join)
    assert errors == []
    assert len(answers) == 4
    for key in answers[0]:
        assert len({a[key] for a in answers}) == 1
    probe = DbProbe(backend_place.backend, backend_place.where)
    try:
        _check_exactly_once(probe, tenant, "thr")
        assert probe.counters(tenant)["alice"][1] == KEYS * (KEYS + 1) // 2
    finally:
        probe.close()


async def _prepare_tenant(place: BackendPlace, signer: TokenSigner) -> str:
    config = ledger_config(place.state_dir, signer)
    ledger = make_ledger(place.backend, place.where, config, signer, ManualClock())
    await ledger.start(sweepers=False)
    tenant = unique_tenant()
    await ledger.create_tenant(tenant, "concurrency")
    await ledger.create_accounts(
        tenant,
        [
            spec("bank"),
            spec("alice", constraint=DEBITS_LIMITED),
            *[spec(f"acct{i}") for i in range(6)],
            *[spec(f"lim{i}", constraint=DEBITS_LIMITED) for i in range(2)],
        ],
    )
    await ledger.stop()
    return tenant


def _process_client(
    backend: str,
    where: str,
    state_dir: str,
    private_key_b64: str,
    tenant: str,
    seed: int,
    queue: Any,
) -> None:
    """Runs in a spawned process: a whole Ledger of its own."""
    signer = TokenSigner(private_key_from_b64(private_key_b64))
    errors: list[BaseException] = []
    answers: list[dict[str, str]] = []
    place = BackendPlace(backend, where if backend == "postgres" else Path(where), Path(state_dir))
    _thread_client(place, signer, tenant, seed, errors, answers)
    queue.put((repr(errors), answers))


@pytest.mark.postgres
async def test_processes_each_with_a_ledger_make_each_entry_once(
    pg_dsn: str, tmp_path: Path
) -> None:
    private_key = generate_private_key()
    signer = TokenSigner(private_key)
    place = BackendPlace("postgres", pg_dsn, tmp_path)
    tenant = await _prepare_tenant(place, signer)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    key_b64 = private_key_to_b64(private_key)
    processes = [
        context.Process(
            target=_process_client,
            args=("postgres", pg_dsn, str(tmp_path), key_b64, tenant, seed, queue),
        )
        for seed in range(3)
    ]
    for process in processes:
        process.start()
    loop = asyncio.get_running_loop()
    results = [await loop.run_in_executor(None, queue.get, True, 120) for _ in processes]
    for process in processes:
        await loop.run_in_executor(None, process.join, 30)
        assert process.exitcode == 0
    assert [errors for errors, _ in results] == ["[]"] * 3
    answers = [a for _, [a] in results]
    for key in answers[0]:
        assert len({a[key] for a in answers}) == 1
    probe = DbProbe("postgres", pg_dsn)
    try:
        _check_exactly_once(probe, tenant, "thr")
    finally:
        probe.close()


@pytest.mark.postgres
async def test_two_replicas_on_one_database_hammering_shared_keys(
    pg_dsn: str, signer: TokenSigner, tmp_path: Path
) -> None:
    """Two Ledgers (two replicas, two committers each) on the same PostgreSQL,
    the same keys sent to both in different orders, transfers crossing a small
    set of accounts in both directions: no deadlock, exactly once, balanced,
    and both replicas give the same answer for each key."""
    place = BackendPlace("postgres", pg_dsn, tmp_path)
    tenant = await _prepare_tenant(place, signer)
    clock = SystemClock()
    config = ledger_config(tmp_path, signer)
    replicas = [make_ledger("postgres", pg_dsn, config, signer, clock) for _ in range(2)]
    for ledger in replicas:
        await ledger.start(sweepers=False)
    rng = random.Random(7)
    names = [f"acct{i}" for i in range(6)] + ["lim0", "lim1"]
    now_s = clock.now_us() // 1_000_000
    commands: list[Command] = []
    for i in range(300):
        debit, credit = rng.sample(names, 2)
        amount = rng.randint(1, 50)
        k = f"rep-{i}"
        commands.append(
            Command(
                tenant_id=tenant,
                idempotency_key=k,
                kind=Kind.TRANSFER,
                debit_account_id=debit,
                credit_account_id=credit,
                amount_minor=amount,
                currency="USD",
                decision_token=sign_token(
                    signer, tenant, k, debit, credit, amount, issued_at_s=now_s
                ),
            )
        )
    unavailable: list[int] = []

    async def client(ledger: Ledger, seed: int) -> dict[str, str]:
        order = commands[:]
        random.Random(seed).shuffle(order)
        answers: dict[str, str] = {}

        async def worker(items: list[Command]) -> None:
            index = 0
            while index < len(items):
                batch = items[index : index + random.Random(index + seed).choice([1, 2, 5])]
                index += len(batch)
                outcomes = await _submit_with_retry(ledger, tenant, batch, unavailable)
                for command, outcome in zip(batch, outcomes, strict=True):
                    answers[command.idempotency_key] = (
                        outcome.error.reason if outcome.error else outcome.entry.entry_id  # type: ignore[union-attr]
                    )

        await asyncio.gather(*[worker(order[w::8]) for w in range(8)])
        return answers

    try:
        results = await asyncio.wait_for(
            asyncio.gather(
                client(replicas[0], 1),
                client(replicas[1], 2),
                client(replicas[0], 3),
                client(replicas[1], 4),
            ),
            timeout=180,
        )
    finally:
        for ledger in replicas:
            await ledger.stop()
    for key in results[0]:
        assert len({r[key] for r in results}) == 1, key
    for answer in results[0].values():
        assert answer.startswith("ent_") or answer == "INSUFFICIENT_FUNDS", answer
    probe = DbProbe("postgres", pg_dsn)
    try:
        by_key = probe.entries_by_key(tenant)
        committed = {k for k, v in results[0].items() if v.startswith("ent_")}
        assert {k for k in by_key if k.startswith("rep-")} == committed
        assert all(by_key[k] == 1 for k in committed)
        assert probe.invariant_problems(tenant) == []
        dbname = pg_dsn.rsplit("dbname=", 1)[1]
        deadlocks = probe.scalar(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = %s", (dbname,)
        )
        assert deadlocks == 0
    finally:
        probe.close()


@pytest.mark.postgres
async def test_two_replicas_release_a_reserve_once(
    pg_dsn: str, signer: TokenSigner, tmp_path: Path
) -> None:
    clock = ManualClock()
    config = ledger_config(tmp_path, signer)
    replicas = [make_ledger("postgres", pg_dsn, config, signer, clock) for _ in range(2)]
    for ledger in replicas:
        await ledger.start(sweepers=False)
    try:
        tenant = unique_tenant()
        await replicas[0].create_tenant(tenant, "reserves")
        kit = Kit(replicas[0], clock, signer, "postgres", pg_dsn, tenant)
        await kit.open(
            ("bank", "USD", NO_CONSTRAINT, 0),
            ("merchant", "USD", NO_CONSTRAINT, 0),
            ("reserve", "USD", DEBITS_LIMITED, 0),
        )
        release_at = clock.now_us() + 1_000_000
        for i in range(5):
            await kit.ok(
                kit.move(
                    f"pay-{i}",
                    "bank",
                    "merchant",
                    1_000,
                    splits=[bps_leg("reserve", 1_000, "reserve", release_at, "merchant")],
                )
            )
        clock.advance(1)
        counts = await asyncio.gather(*[replicas[i % 2].release_due_reserves() for i in range(8)])
        assert sum(counts) == 5
        releases = {
            k: n
            for k, n in kit.probe.entries_by_key(tenant).items()
            if k.startswith("reserve-release:")
        }
        assert len(releases) == 5 and set(releases.values()) == {1}
        assert kit.probe.counters(tenant)["reserve"][:2] == (500, 500)
        assert kit.probe.invariant_problems(tenant) == []
        kit.probe.close()
    finally:
        for ledger in replicas:
            await ledger.stop()
