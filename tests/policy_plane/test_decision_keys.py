"""What a decision binds and who signs it: Evaluate takes every term a token
binds (and refuses a movement the kind of payment cannot have), refunds are
judged by the default bundle's own rules, tokens and the decision log are
signed with different keys, and a log still verifies after its key rotates,
on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from policy_plane.engine import PolicyEngine
from policy_plane.model import EvaluationInput, RefundInput, SplitInput
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import ConfigError, with_overrides
from triplane.runtime.errors import InvalidArgument
from triplane.runtime.tokens import (
    generate_private_key,
    key_id_of,
    private_key_to_b64,
    public_key_to_b64,
)

from .conftest import make_config, payment_input, replace_payment, started_engine


def refund_input(key: str, **refund: Any) -> EvaluationInput:
    """A refund of 400 of a payment of 1,000 from acct-1 to merchant-1."""
    inp = payment_input(key, kind="refund", amount_minor=refund.pop("amount_minor", 400))
    context = RefundInput(
        entry_id="ent-1",
        original_account_id="acct-1",
        captured_minor=1_000,
        refunded_minor=0,
        refund_count=0,
    )
    payment = msgspec.structs.replace(
        inp.payment,
        account_id="merchant-1",
        credit_account_id=refund.pop("credit_account_id", "acct-1"),
        refund=msgspec.structs.replace(context, **refund),
    )
    return msgspec.structs.replace(inp, payment=payment)


def _kid(token: str) -> str:
    header = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


async def test_evaluate_refuses_what_a_token_could_not_bind(engine: PolicyEngine) -> None:
    cases: list[tuple[EvaluationInput, str, str]] = [
        (replace_payment(payment_input("v1"), credit_account_id=""), "FIELD_REQUIRED",
         "payment.credit_account_id"),
        (replace_payment(payment_input("v2"), credit_account_id="acct-1"), "SAME_ACCOUNT",
         "payment.credit_account_id"),
        (replace_payment(payment_input("v3"), movement=""), "MOVEMENT_INVALID",
         "payment.movement"),
        # A purchase is not a payout, and a payout is not a refund.
        (replace_payment(payment_input("v4"), movement="payout"), "MOVEMENT_NOT_FOR_KIND",
         "payment.movement"),
        (payment_input("v5", kind="payout", movement="refund"), "MOVEMENT_NOT_FOR_KIND",
         "payment.movement"),
        (payment_input("v6", kind="refund", movement="transfer"), "MOVEMENT_NOT_FOR_KIND",
         "payment.movement"),
        (replace_payment(payment_input("v7"), splits=[SplitInput(account_id="fee",
         amount_minor=5)]), "SPLITS_NOT_ALLOWED", "payment.splits"),
        (replace_payment(payment_input("v8", movement="transfer"), splits=[SplitInput(
            account_id="fee", amount_minor=5, basis_points=10)]), "SPLIT_LEG_INVALID",
         "payment.splits[0]"),
        (replace_payment(payment_input("v9", movement="transfer"), splits=[SplitInput(
            account_id="fee", basis_points=100)] * 17), "TOO_MANY_SPLITS", "payment.splits"),
        (payment_input("v10", movement="capture"), "FIELD_REQUIRED", "payment.hold_id"),
        (replace_payment(payment_input("v11"), hold_id="hld-1"), "FIELD_NOT_ALLOWED",
         "payment.hold_id"),
        (refund_input("v12", entry_id=""), "FIELD_REQUIRED", "payment.refund.entry_id"),
        (refund_input("v13", refunded_minor=2_000), "REFUND_INVALID",
         "payment.refund.refunded_minor"),
        (replace_payment(payment_input("v14"), refund=RefundInput(entry_id="e")),
         "FIELD_NOT_ALLOWED", "payment.refund"),
    ]  # fmt: skip
    for inp, reason, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            await engine.evaluate(inp)
        assert (caught.value.reason, caught.value.field) == (reason, field), inp.idempotency_key


async def test_the_token_binds_the_payee_the_movement_and_the_splits(
    engine: PolicyEngine,
) -> None:
    legs = [SplitInput(account_id="tax", amount_minor=7), SplitInput(account_id="fee",
            basis_points=250, label="fee")]  # fmt: skip
    inp = replace_payment(payment_input("bind", movement="transfer"), splits=legs)
    decision, _ = await engine.evaluate(inp)
    record = decision.record
    assert record.verdict.outcome == "allow"
    claims = json.loads(base64.urlsafe_b64decode(record.token.split(".")[1] + "=="))
    assert (claims["kind"], claims["payment_kind"]) == ("transfer", "purchase")
    assert (claims["debit_account_id"], claims["credit_account_id"]) == ("acct-1", "merchant-1")
    assert claims["splits_digest"] and claims["jti"] == record.token_id
    reordered = replace_payment(payment_input("bind-2", movement="transfer"), splits=legs[::-1])
    again, _ = await engine.evaluate(reordered)
    other = json.loads(base64.urlsafe_b64decode(again.record.token.split(".")[1] + "=="))
    assert other["splits_digest"] == claims["splits_digest"]


async def test_the_default_bundle_judges_refunds_by_their_own_rules(
    engine: PolicyEngine,
) -> None:
    async def outcome(inp: EvaluationInput) -> tuple[str, list[str]]:
        decision, _ = await engine.evaluate(inp)
        return decision.record.verdict.outcome, decision.record.verdict.reason_codes

    # An ordinary refund is allowed, without a route and whatever the
    # customer's spending limits (a tier-0 customer, a refund above them).
    assert await outcome(refund_input("r-ok")) == ("allow", [])
    big = refund_input("r-big", amount_minor=900, captured_minor=1_000)
    big = msgspec.structs.replace(big, snapshot=msgspec.structs.replace(big.snapshot, kyc_tier=0))
    assert await outcome(big) == ("allow", [])
    assert await outcome(refund_input("r-elsewhere", credit_account_id="acct-2")) == (
        "deny",
        ["REFUND_NOT_TO_ORIGINAL_INSTRUMENT"],
    )
    assert await outcome(refund_input("r-more", amount_minor=700, refunded_minor=400)) == (
        "deny",
        ["REFUND_EXCEEDS_CAPTURED"],
    )
    assert await outcome(refund_input("r-again", refund_count=3)) == (
        "review",
        ["REFUND_VELOCITY_PER_PAYMENT"],
    )
    allowed, _ = await engine.evaluate(refund_input("r-token"))
    claims = json.loads(base64.urlsafe_b64decode(allowed.record.token.split(".")[1] + "=="))
    assert (claims["kind"], claims["entry_id"]) == ("refund", "ent-1")
    assert (claims["debit_account_id"], claims["credit_account_id"]) == ("merchant-1", "acct-1")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_the_log_verifies_after_its_key_rotates(
    request: pytest.FixtureRequest, backend: str, state_dir: Path, clock: ManualClock
) -> None:
    dsn = request.getfixturevalue("pg_dsn") if backend == "postgres" else ""
    keys_dir = state_dir / "secrets"
    keys_dir.mkdir()
    old_key, new_key = generate_private_key(), generate_private_key()
    log_key_path = keys_dir / "log.key"
    log_key_path.write_text(private_key_to_b64(old_key) + "\n")
    config = with_overrides(
        make_config(state_dir, dsn),
        {"keys": {"decision_log_private_key_path": str(log_key_path)}},
    )
    engine = await started_engine(config, clock)
    try:
        decision, _ = await engine.evaluate(payment_input("before"))
        # Tokens and the log are signed with different keys.
        assert _kid(decision.record.token) != key_id_of(old_key.verify_key)
        assert engine.log_keys.key_id == key_id_of(old_key.verify_key)
    finally:
        await engine.stop()
        engine.store.db.close()
    # The log key rotates; the old public key is kept (a file, as a Secret).
    log_key_path.write_text(private_key_to_b64(new_key) + "\n")
    old_public = keys_dir / "log-old.pub"
    old_public.write_text(public_key_to_b64(old_key.verify_key) + "\n")
    rotated = with_overrides(config, {"keys": {"decision_log_public_key_paths": [str(old_public)]}})
    engine = await started_engine(rotated, clock)
    try:
        await engine.evaluate(payment_input("after"))
        assert engine.log_keys.key_id == key_id_of(new_key.verify_key)
        result = await engine.verify_log()
        assert result.valid and result.records_checked == 2, result
    finally:
        await engine.stop()
        engine.store.db.close()
    # Without the old public key the old records are not trusted.
    forgetful = await started_engine(config, clock)
    try:
        result = await forgetful.verify_log()
        assert (result.valid, result.problem, result.first_bad_sequence) == (
            False,
            "UNKNOWN_KEY",
            1,
        )
    finally:
        await forgetful.stop()
        forgetful.store.db.close()


async def test_the_log_key_cannot_be_the_token_key(state_dir: Path, clock: ManualClock) -> None:
    shared = state_dir / "shared.key"
    shared.write_text(private_key_to_b64(generate_private_key()) + "\n")
    config = with_overrides(
        make_config(state_dir),
        {
            "keys": {
                "policy_private_key_path": str(shared),
                "decision_log_private_key_path": str(shared),
            }
        },
    )
    with pytest.raises(ConfigError):
        await started_engine(config, clock)
