"""The decision log on SQLite and PostgreSQL: chained, signed, idempotent, and
verify-log catches altered, removed, reordered and cut-off records."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import msgspec
import pytest

from policy_plane.engine import PolicyEngine
from policy_plane.model import record_decoder
from triplane.runtime.clock import ManualClock
from triplane.runtime.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from triplane.runtime.tokens import Movement, TokenVerifier, load_public_keys

from .conftest import OTHER_TENANT, TENANT, payment_input, replace_payment


async def log_some(engine: PolicyEngine, count: int, prefix: str = "k") -> list[str]:
    decisions = await asyncio.gather(
        *(
            engine.evaluate(payment_input(f"{prefix}{i}", amount_minor=1_000 + i))
            for i in range(count)
        )
    )
    return [d.record.decision_id for d, _ in decisions]


async def test_chain_verifies_and_tokens_are_what_money_plane_accepts(
    any_engine: PolicyEngine, clock: ManualClock, state_dir: Path
) -> None:
    await log_some(any_engine, 12)
    result = await any_engine.verify_log()
    assert result.valid and result.records_checked == 12
    decision, _ = await any_engine.evaluate(payment_input("tok", amount_minor=4_321))
    record = decision.record
    assert record.verdict.outcome == "allow"
    # The keys the money plane loads for this state dir (no keys configured).
    verifier = TokenVerifier(load_public_keys([], state_dir))
    hold = Movement(
        tenant_id=TENANT,
        kind="authorize",
        debit_account_id="acct-1",
        credit_account_id="merchant-1",
        amount_minor=4_321,
        currency="USD",
        idempotency_key="tok",
    )
    claims = verifier.verify(
        record.token, field="decision_token", movement=hold, now_us=clock.now_us()
    )
    live = any_engine.bundles.live
    assert live is not None
    assert (claims.decision_id, claims.policy_version) == (record.decision_id, live.version)
    assert (
        claims.expires_at_s
        == record.token_expires_at_s
        == (clock.now_us() // 1_000_000 + any_engine.config.token_ttl_s)
    )
    # The token authorizes this payment only: not another tenant, payer,
    # payee, kind of movement or key.
    for terms, claim in [
        ({"tenant_id": OTHER_TENANT}, "tenant_id"),
        ({"debit_account_id": "acct-2"}, "debit_account_id"),
        ({"credit_account_id": "someone-else"}, "credit_account_id"),
        ({"kind": "payout"}, "kind"),
        ({"idempotency_key": "tok2"}, "idempotency_key"),
    ]:
        with pytest.raises(PermissionDenied) as caught:
            verifier.verify(
                record.token,
                field="decision_token",
                movement=msgspec.structs.replace(hold, **terms),
                now_us=clock.now_us(),
            )
        assert (caught.value.reason, caught.value.field) == (
            "DECISION_TOKEN_MISMATCH",
            f"decision_token.{claim}",
        )
    # A decision that does not allow the payment carries no token at all.
    reviewed, _ = await any_engine.evaluate(payment_input("tok-review", score=0.8))
    assert reviewed.record.verdict.outcome == "review"
    assert (reviewed.record.token, reviewed.record.token_expires_at_s) == ("", 0)


async def test_idempotent_retry_and_reuse_with_another_payload(any_engine: PolicyEngine) -> None:
    first, replayed = await any_engine.evaluate(payment_input("same"))
    assert not replayed
    again, replayed = await any_engine.evaluate(payment_input("same"))
    assert replayed and again.record == first.record
    with pytest.raises(AlreadyExists) as caught:
        await any_engine.evaluate(payment_input("same", amount_minor=9_999))
    assert caught.value.field == "payment.amount.amount_minor"
    concurrent = await asyncio.gather(
        *(any_engine.evaluate(payment_input("burst")) for _ in range(8))
    )
    assert len({d.record.decision_id for d, _ in concurrent}) == 1
    assert (await any_engine.verify_log()).records_checked == 2


async def test_a_retry_with_or_without_the_stamped_time_is_the_same_request(
    any_engine: PolicyEngine, clock: ManualClock
) -> None:
    first, _ = await any_engine.evaluate(payment_input("stamped"))
    stamped = first.record.input.snapshot.decided_at_us
    assert stamped == clock.now_us()
    clock.advance(5)
    # The retry carries the time the plane stamped: the original decision.
    explicit = payment_input("stamped", decided_at_us=stamped)
    again, replayed = await any_engine.evaluate(explicit)
    assert replayed and again.record == first.record
    # Sent with its own time first, retried without one: the original too.
    fixed, _ = await any_engine.evaluate(payment_input("fixed", decided_at_us=stamped - 7))
    again, replayed = await any_engine.evaluate(payment_input("fixed"))
    assert replayed and again.record == fixed.record
    # What a caller declares of its customer is not part of the request (the
    # plane reads the profile): declaring another tier is the same request.
    again, replayed = await any_engine.evaluate(payment_input("stamped", tier=3))
    assert replayed and again.record == first.record
    again, replayed = await any_engine.evaluate(payment_input("stamped", account_age_days=3))
    assert replayed and again.record == first.record
    # Another time, or any other field, is another request.
    for changed, field in [
        (payment_input("stamped", decided_at_us=stamped + 1), "snapshot.decided_at"),
        (payment_input("stamped", score=0.2), "snapshot.model_score.score"),
    ]:
        with pytest.raises(AlreadyExists) as caught:
            await any_engine.evaluate(changed)
        assert caught.value.field == field
    assert (await any_engine.verify_log()).records_checked == 2


async def test_bad_requests_change_nothing(any_engine: PolicyEngine) -> None:
    with pytest.raises(NotFound) as not_found:
        await any_engine.evaluate(payment_input("x", tenant_id="nobody"))
    assert (not_found.value.reason, not_found.value.field) == ("TENANT_NOT_FOUND", "tenant_id")
    for bad, field in [
        (payment_input("x", amount_minor=0), "payment.amount.amount_minor"),
        (payment_input("x", currency="XXX"), "payment.amount.currency"),
        (payment_input("x", tier=7), "snapshot.kyc.tier"),
        (payment_input("x", kind="gift"), "payment.kind"),
        (payment_input("x", score=1.5), "snapshot.model_score.score"),
        (payment_input("x", source="guess"), "snapshot.model_score.source"),
        (payment_input("bad key!"), "idempotency_key"),
        (replace_payment(payment_input("x"), account_id=""), "payment.account_id"),
    ]:
        with pytest.raises(InvalidArgument) as caught:
            await any_engine.evaluate(bad)
        assert caught.value.field == field
    assert (await any_engine.verify_log()).records_checked == 0
    decision, _ = await any_engine.evaluate(payment_input("mine"))
    with pytest.raises(NotFound):
        await any_engine.get_decision(OTHER_TENANT, decision.record.decision_id)


def _tamper(engine: PolicyEngine, sql: str, *params: object) -> None:
    with engine.store.db.tx() as tx:
        tx.execute(sql, params)


async def _expect_problem(engine: PolicyEngine, problem: str) -> None:
    result = await engine.verify_log()
    assert not result.valid
    assert result.problem == problem, result


async def test_altered_record_is_detected(any_engine: PolicyEngine) -> None:
    await log_some(any_engine, 6)
    row = any_engine.store.chain_page("main", 2, 1)[0]
    record = record_decoder.decode(row.body)
    forged = msgspec.structs.replace(
        record, verdict=msgspec.structs.replace(record.verdict, outcome="deny")
    )
    from policy_plane.model import canonical_encoder

    _tamper(
        any_engine,
        "UPDATE decision_log SET body = ? WHERE seq = ?",
        canonical_encoder.encode(forged).decode(),
        3,
    )
    await _expect_problem(any_engine, "RECORD_ALTERED")


async def test_altered_index_column_is_detected(any_engine: PolicyEngine) -> None:
    await log_some(any_engine, 4)
    _tamper(any_engine, "UPDATE decision_log SET outcome = 'deny' WHERE seq = 2")
    await _expect_problem(any_engine, "RECORD_ALTERED")


async def test_removed_record_is_detected(any_engine: PolicyEngine) -> None:
    await log_some(any_engine, 6)
    _tamper(any_engine, "DELETE FROM decision_log WHERE seq = 4")
    await _expect_problem(any_engine, "RECORD_MISSING")


async def test_reordered_records_are_detected(any_engine: PolicyEngine) -> None:
    await log_some(any_engine, 6)
    # Swap the contents of records 2 and 5 (everything but their positions).
    _tamper(any_engine, "UPDATE decision_log SET seq = -2 WHERE seq = 2")
    _tamper(any_engine, "UPDATE decision_log SET seq = 2 WHERE seq = 5")
    _tamper(any_engine, "UPDATE decision_log SET seq = 5 WHERE seq = -2")
    result = await any_engine.verify_log()
    # Seq 2 now holds record 5, which links to record 4, not to record 1.
    assert not result.valid and result.problem == "CHAIN_BROKEN"
    assert result.first_bad_sequence == 2


async def test_cut_off_tail_is_detected(any_engine: PolicyEngine) -> None:
    await log_some(any_engine, 5)
    _tamper(any_engine, "DELETE FROM decision_log WHERE seq >= 4")
    await _expect_problem(any_engine, "RECORD_MISSING")


async def test_forged_signature_is_detected(any_engine: PolicyEngine) -> None:
    await log_some(any_engine, 3)
    row = any_engine.store.chain_page("main", 0, 1)[0]
    other = row.signature[:-4] + ("AAA=" if not row.signature.endswith("AAA=") else "BBB=")
    _tamper(any_engine, "UPDATE decision_log SET signature = ? WHERE seq = 1", other)
    await _expect_problem(any_engine, "BAD_SIGNATURE")


async def test_retention_purges_a_prefix_and_the_rest_still_verifies(
    any_engine: PolicyEngine, clock: ManualClock
) -> None:
    await log_some(any_engine, 4, "old")
    clock.advance(10 * 86_400)
    await log_some(any_engine, 3, "new")
    # Retention of 4 years: nothing goes yet.
    assert await any_engine.purge_expired() == 0
    clock.advance(1461 * 86_400 - 5 * 86_400)
    assert await any_engine.purge_expired() == 4
    result = await any_engine.verify_log()
    assert result.valid and result.records_checked == 3
    await log_some(any_engine, 2, "newer")
    assert (await any_engine.verify_log()).records_checked == 5


async def test_reads_do_not_wait_for_the_writers_transaction(any_engine: PolicyEngine) -> None:
    ids = await log_some(any_engine, 3, prefix="r")
    store = any_engine.store
    inside, release = threading.Event(), threading.Event()

    class RolledBack(Exception):
        pass

    def long_write() -> None:
        # A write transaction held open (then rolled back): what a slow group
        # commit looks like to a reader.
        with contextlib.suppress(RolledBack), store.db.tx() as tx:
            tx.execute("DELETE FROM decision_log WHERE decision_id = ?", (ids[1],))
            inside.set()
            release.wait(30)
            raise RolledBack

    writer = threading.Thread(target=long_write)
    writer.start()
    try:
        assert inside.wait(30)
        read: list[object] = []
        reader = threading.Thread(
            target=lambda: read.extend([store.get_decision(ids[0]), store.count_decisions(TENANT)])
        )
        reader.start()
        reader.join(30)
        # Answered while the writer still holds its transaction open.
        assert not reader.is_alive() and writer.is_alive()
        # ...and saw the committed state only.
        row, count = read
        assert row is not None and row.decision_id == ids[0]  # type: ignore[attr-defined]
        assert count == 3
    finally:
        release.set()
        writer.join(30)
    assert (await any_engine.verify_log()).records_checked == 3
