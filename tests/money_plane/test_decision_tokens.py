"""Decisions bound to the money they allow, through the real servers: the
policy plane (gRPC) decides and signs, the money plane (gRPC) refuses every
token that does not name exactly the movement it is presented for (each
claim), one that is forged, replayed for another transfer (also after a
failure the ledger did not remember), expired or for another audience, and a
purchase's decision presented for a payout. Both planes share one manual
clock, so expiry is tested without sleeping. Then the token key rotates while
tokens signed with the old one are outstanding."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from money_helpers import DbProbe, sign_movement, transfer_token

from money_plane.app import MoneyPlane
from policy_plane.app import PolicyPlane, build_plane
from policy_plane.profiles import CustomerProfile
from tests.tls_helpers import channel_as, dev_certificates
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2 as mpb
from triplane.money.v1 import money_pb2_grpc
from triplane.policy.v1 import policy_pb2 as ppb
from triplane.policy.v1 import policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import GATEWAY
from triplane.runtime.tokens import (
    Movement,
    TokenSigner,
    generate_private_key,
    private_key_from_b64,
    private_key_to_b64,
    public_key_to_b64,
)

TENANT = "acme"
CUSTOMER = "c-1"
USD = "USD"
C = grpc.StatusCode


@dataclass
class Planes:
    """A policy plane and a money plane of one state dir, as the gateway sees them."""

    config: Config
    clock: ManualClock
    policy: PolicyPlane
    money: MoneyPlane
    evaluate_stub: policy_pb2_grpc.PolicyServiceStub
    ledger: money_pb2_grpc.LedgerServiceStub
    probe: DbProbe
    state_dir: Path
    # The token key the policy plane signs with, and the directory of public
    # keys the money plane trusts (a mounted Secret, as in a cluster).
    token_key_path: Path
    trusted_dir: Path
    channels: list[grpc.aio.Channel]

    async def decide(self, key: str, **payment: Any) -> ppb.Decision:
        response = await self.evaluate_stub.Evaluate(evaluate_request(key, **payment))
        return response.decision

    async def transfer(self, transfer: mpb.Transfer) -> mpb.CreateTransferResponse:
        return await self.ledger.CreateTransfer(
            mpb.CreateTransferRequest(tenant_id=TENANT, transfer=transfer)
        )

    def written(self) -> tuple[Any, ...]:
        return (
            self.probe.counters(TENANT),
            self.probe.entry_count(TENANT),
            self.probe.hold_count(TENANT),
        )

    async def refused(
        self, transfer: mpb.Transfer, code: C, reason: str, field: str | None = None
    ) -> None:
        """The transfer is refused with (code, reason, field), nothing written."""
        before = self.written()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.transfer(transfer)
        got_reason, got_field = parse_rpc_error(caught.value)
        assert (caught.value.code(), got_reason) == (code, reason), caught.value.details()
        if field is not None:
            assert got_field == field, caught.value.details()
        assert self.written() == before


def evaluate_request(
    key: str,
    *,
    account_id: str = "cust",
    credit_account_id: str = "shop",
    amount_minor: int = 1_000,
    kind: ppb.PaymentKind.ValueType = ppb.PAYMENT_KIND_PURCHASE,
    movement: ppb.MoneyMovement.ValueType = ppb.MONEY_MOVEMENT_AUTHORIZE,
    splits: list[ppb.SplitLeg] | None = None,
) -> ppb.EvaluateRequest:
    return ppb.EvaluateRequest(
        tenant_id=TENANT,
        idempotency_key=key,
        payment=ppb.Payment(
            account_id=account_id,
            credit_account_id=credit_account_id,
            kind=kind,
            movement=movement,
            amount=types_pb2.Money(amount_minor=amount_minor, currency=USD),
            splits=splits or [],
            customer=ppb.Party(name="Jane Example", country="US"),
            counterparty=ppb.Party(name="Corner Shop", country="US"),
            customer_id=CUSTOMER,
        ),
        snapshot=ppb.ContextSnapshot(
            model_score=types_pb2.ModelScoreRef(
                model="payment_risk", version="1", source="triton", score=0.05
            ),
            # Counted, and nothing yet (unset counters would be unknown).
            account_velocity=ppb.VelocityCounters(),
            device_velocity=ppb.VelocityCounters(),
            merchant_velocity=ppb.VelocityCounters(),
        ),
    )


def hold(key: str, token: str, **fields: Any) -> mpb.Transfer:
    """The AUTHORIZE the gateway places for evaluate_request(key)."""
    transfer = mpb.Transfer(
        idempotency_key=key,
        kind=mpb.TRANSFER_KIND_AUTHORIZE,
        debit_account_id="cust",
        credit_account_id="shop",
        amount=types_pb2.Money(amount_minor=1_000, currency=USD),
        decision_token=token,
    )
    for name, value in fields.items():
        if name == "amount_minor":
            transfer.amount.amount_minor = value
        elif name == "currency":
            transfer.amount.currency = value
        elif name == "splits":
            transfer.splits.extend(value)
        else:
            setattr(transfer, name, value)
    return transfer


def _accounts() -> list[mpb.NewAccount]:
    limited = mpb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS
    none = mpb.BALANCE_CONSTRAINT_NONE
    specs = [
        ("bank", mpb.ACCOUNT_KIND_ASSET, none, USD),
        ("cust", mpb.ACCOUNT_KIND_LIABILITY, limited, USD),
        ("shop", mpb.ACCOUNT_KIND_LIABILITY, limited, USD),
        ("other-shop", mpb.ACCOUNT_KIND_LIABILITY, limited, USD),
        ("fee", mpb.ACCOUNT_KIND_REVENUE, none, USD),
        ("cust-eur", mpb.ACCOUNT_KIND_LIABILITY, none, "EUR"),
    ]
    return [
        mpb.NewAccount(account_id=a, kind=k, constraint=c, currency=cur) for a, k, c, cur in specs
    ]


@pytest.fixture
async def planes(tmp_path: Path) -> AsyncIterator[Planes]:
    state_dir = tmp_path / "state"
    dev_certificates(state_dir)
    keys_dir = state_dir / "secrets"
    trusted_dir = keys_dir / "trusted"
    trusted_dir.mkdir(parents=True)
    token_key = generate_private_key()
    token_key_path = keys_dir / "token.key"
    token_key_path.write_text(private_key_to_b64(token_key) + "\n")
    (trusted_dir / "key-1.pub").write_text(public_key_to_b64(token_key.verify_key) + "\n")
    config = load_config(
        environ={},
        overrides={
            "runtime": {"state_dir": str(state_dir)},
            "nats": {"url": ""},
            "keys": {
                "policy_private_key_path": str(token_key_path),
                "policy_public_key_paths": [str(trusted_dir)],
            },
            # Key files are looked at on every verification here, so a
            # rotation shows at once (in a cluster: every 10 s).
            "money": {"tokens": {"key_reload_interval_s": 0}, "budget_ms": 60_000},
        },
    )
    clock = ManualClock()
    policy = build_plane(config, clock, listen="127.0.0.1:0")
    money = MoneyPlane(config, clock=clock, listen="127.0.0.1:0")
    policy_port = await policy.start()
    money_port = await money.start(sweepers=False)
    admin = channel_as(state_dir, f"127.0.0.1:{money_port}")
    gateway_money = channel_as(state_dir, f"127.0.0.1:{money_port}", GATEWAY)
    gateway_policy = channel_as(state_dir, f"127.0.0.1:{policy_port}", GATEWAY)
    await policy.engine.create_tenant(TENANT, "Acme")
    # The customer's KYC, as the platform recorded it: fully verified.
    await policy.engine.put_customer_profile(
        CustomerProfile(
            tenant_id=TENANT,
            customer_id=CUSTOMER,
            kyc_tier=3,
            country="US",
            account_opened_at_us=clock.now_us() - 400 * 86_400_000_000,
        ),
        "kyc-1",
        "tests",
    )
    admin_ledger = money_pb2_grpc.LedgerServiceStub(admin)
    await admin_ledger.CreateTenant(mpb.CreateTenantRequest(tenant_id=TENANT, display_name="Acme"))
    await admin_ledger.CreateAccounts(
        mpb.CreateAccountsRequest(tenant_id=TENANT, accounts=_accounts())
    )
    result = Planes(
        config=config,
        clock=clock,
        policy=policy,
        money=money,
        evaluate_stub=policy_pb2_grpc.PolicyServiceStub(gateway_policy),
        ledger=money_pb2_grpc.LedgerServiceStub(gateway_money),
        probe=DbProbe("sqlite", state_dir / "money.db"),
        state_dir=state_dir,
        token_key_path=token_key_path,
        trusted_dir=trusted_dir,
        channels=[admin, gateway_money, gateway_policy],
    )
    # The customer's money, moved under a decision of its own.
    funding = await result.decide(
        "fund",
        account_id="bank",
        credit_account_id="cust",
        amount_minor=100_000,
        kind=ppb.PAYMENT_KIND_TRANSFER,
        movement=ppb.MONEY_MOVEMENT_TRANSFER,
    )
    await result.transfer(
        mpb.Transfer(
            idempotency_key="fund",
            kind=mpb.TRANSFER_KIND_TRANSFER,
            debit_account_id="bank",
            credit_account_id="cust",
            amount=types_pb2.Money(amount_minor=100_000, currency=USD),
            decision_token=funding.decision_token,
        )
    )
    try:
        yield result
    finally:
        result.probe.close()
        for channel in result.channels:
            await channel.close()
        await money.stop()
        # The plane serving now (a test may have restarted it).
        await result.policy.stop()


def _key() -> str:
    return f"pay-{uuid.uuid4().hex[:12]}"


async def test_a_decision_moves_exactly_the_money_it_names(planes: Planes) -> None:
    key = _key()
    decision = await planes.decide(key)
    assert decision.outcome == ppb.OUTCOME_ALLOW
    header = json.loads(base64.urlsafe_b64decode(decision.decision_token.split(".")[0] + "=="))
    assert header == {
        "alg": "Ed25519",
        "typ": "triplane-decision+jwt",
        "kid": decision.token_key_id,
    }
    placed = await planes.transfer(hold(key, decision.decision_token))
    assert placed.result.hold.decision_id == decision.decision_id
    # The same transfer again with the same token: the same hold, nothing new.
    again = await planes.transfer(hold(key, decision.decision_token))
    assert again.result.replayed and again.result.hold.hold_id == placed.result.hold.hold_id
    assert planes.probe.hold_count(TENANT) == 1


@pytest.mark.parametrize(
    ("claim", "change"),
    [
        ("tenant_id", None),  # another tenant's decision: see the test body
        ("kind", {"kind": mpb.TRANSFER_KIND_TRANSFER}),
        ("debit_account_id", {"debit_account_id": "bank"}),
        ("credit_account_id", {"credit_account_id": "other-shop"}),
        ("amount_minor", {"amount_minor": 999}),
        ("currency", {"currency": "EUR"}),
        ("splits_digest", None),  # see the test body
        ("idempotency_key", {"idempotency_key": "someone-elses-key"}),
    ],
)
async def test_a_token_for_another_movement_is_refused_naming_the_claim(
    planes: Planes, claim: str, change: dict[str, Any] | None
) -> None:
    key = _key()
    if claim == "splits_digest":
        # A decision for a transfer without splits cannot pay a fee out of it.
        decision = await planes.decide(
            key, kind=ppb.PAYMENT_KIND_TRANSFER, movement=ppb.MONEY_MOVEMENT_TRANSFER
        )
        fee = mpb.SplitLeg(account_id="fee", kind=mpb.SPLIT_LEG_KIND_FIXED, amount_minor=10)
        transfer = hold(key, decision.decision_token, kind=mpb.TRANSFER_KIND_TRANSFER)
        transfer.splits.append(fee)
    elif claim == "tenant_id":
        # A token signed by the policy plane's key for another tenant.
        signer = TokenSigner(private_key_from_b64(planes.token_key_path.read_text()))
        transfer = hold(key, "")
        transfer.decision_token = transfer_token(
            signer, "globex", transfer, issued_at_s=planes.clock.now_us() // 1_000_000
        )
    else:
        assert change is not None
        decision = await planes.decide(key)
        transfer = hold(key, decision.decision_token, **change)
    await planes.refused(
        transfer, C.PERMISSION_DENIED, "DECISION_TOKEN_MISMATCH", f"transfer.decision_token.{claim}"
    )


async def test_a_purchase_decision_cannot_pay_out(planes: Planes) -> None:
    key = _key()
    decision = await planes.decide(key)  # a purchase: a hold
    payout = hold(key, decision.decision_token, kind=mpb.TRANSFER_KIND_PAYOUT)
    await planes.refused(
        payout, C.PERMISSION_DENIED, "DECISION_TOKEN_MISMATCH", "transfer.decision_token.kind"
    )
    # Nor can a caller ask the policy plane for a payout under a purchase.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await planes.decide(_key(), movement=ppb.MONEY_MOVEMENT_PAYOUT)
    assert parse_rpc_error(caught.value) == ("MOVEMENT_NOT_FOR_KIND", "payment.movement")


async def test_a_forged_token_is_refused(planes: Planes) -> None:
    key = _key()
    decision = await planes.decide(key)
    header, payload, signature = decision.decision_token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["amount_minor"] = 1_000_000
    richer = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    forged = f"{header}.{richer}.{signature}"
    await planes.refused(
        hold(key, forged, amount_minor=1_000_000),
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_BAD_SIGNATURE",
        "transfer.decision_token",
    )
    # Signed by a key the money plane does not trust.
    stranger = TokenSigner(generate_private_key())
    transfer = hold(key, "")
    transfer.decision_token = transfer_token(
        stranger, TENANT, transfer, issued_at_s=planes.clock.now_us() // 1_000_000
    )
    await planes.refused(transfer, C.PERMISSION_DENIED, "DECISION_TOKEN_UNKNOWN_KEY")


async def test_a_token_for_another_audience_is_refused(planes: Planes) -> None:
    """Signed with the policy plane's own key, for every term of the
    transfer, but addressed to someone else."""
    signer = TokenSigner(private_key_from_b64(planes.token_key_path.read_text()))
    key = _key()
    movement = Movement(
        tenant_id=TENANT,
        kind="authorize",
        debit_account_id="cust",
        credit_account_id="shop",
        amount_minor=1_000,
        currency=USD,
        idempotency_key=key,
    )
    for_gateway = sign_movement(
        signer,
        movement,
        issued_at_s=planes.clock.now_us() // 1_000_000,
        audience="triplane.gateway",
    )
    await planes.refused(
        hold(key, for_gateway),
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_WRONG_AUDIENCE",
        "transfer.decision_token.aud",
    )
    good = sign_movement(signer, movement, issued_at_s=planes.clock.now_us() // 1_000_000)
    await planes.transfer(hold(key, good))


async def test_an_expired_token_is_refused_and_decided_at_cannot_stretch_it(
    planes: Planes,
) -> None:
    ttl_s = planes.config.policy.token_ttl_s
    skew_s = planes.config.money.tokens.clock_skew_s
    key = _key()
    # A caller's decision time a day ahead: the rules see it, the token's
    # life is counted from the policy plane's own clock.
    request = evaluate_request(key)
    request.snapshot.decided_at.FromMicroseconds(planes.clock.now_us() + 86_400_000_000)
    decision = (await planes.evaluate_stub.Evaluate(request)).decision
    assert decision.token_expires_at.ToMicroseconds() == planes.clock.now_us() + ttl_s * 1_000_000
    planes.clock.advance(ttl_s + skew_s + 1)
    await planes.refused(
        hold(key, decision.decision_token),
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_EXPIRED",
        "transfer.decision_token",
    )


async def test_a_token_is_spent_once_even_by_a_failure_the_ledger_forgets(
    planes: Planes,
) -> None:
    key = _key()
    decision = await planes.decide(key, credit_account_id="late-shop")
    token = decision.decision_token
    # The payee does not exist yet: refused, and not remembered (the key is free).
    first = hold(key, token, credit_account_id="late-shop", description="first try")
    await planes.refused(first, C.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    admin = money_pb2_grpc.LedgerServiceStub(planes.channels[0])
    await admin.CreateAccounts(
        mpb.CreateAccountsRequest(
            tenant_id=TENANT,
            accounts=[
                mpb.NewAccount(
                    account_id="late-shop",
                    currency=USD,
                    kind=mpb.ACCOUNT_KIND_LIABILITY,
                    constraint=mpb.BALANCE_CONSTRAINT_NONE,
                )
            ],
        )
    )
    # The same token for another transfer (under the same free key): replayed.
    other = hold(key, token, credit_account_id="late-shop", description="another transfer")
    await planes.refused(
        other, C.PERMISSION_DENIED, "DECISION_TOKEN_REUSED", "transfer.decision_token"
    )
    # The same transfer retried with its token goes through, once.
    placed = await planes.transfer(first)
    again = await planes.transfer(first)
    assert again.result.replayed and again.result.hold.hold_id == placed.result.hold.hold_id


async def test_a_capture_with_splits_and_a_refund_are_decided(planes: Planes) -> None:
    key = _key()
    placed = await planes.transfer(hold(key, (await planes.decide(key)).decision_token))
    hold_id = placed.result.hold.hold_id
    fee = mpb.SplitLeg(account_id="fee", kind=mpb.SPLIT_LEG_KIND_FIXED, amount_minor=30)
    capture = mpb.Transfer(
        idempotency_key=f"{key}-capture", kind=mpb.TRANSFER_KIND_CAPTURE, hold_id=hold_id
    )
    capture.splits.append(fee)
    await planes.refused(capture, C.PERMISSION_DENIED, "DECISION_TOKEN_MISSING")
    # A capture is decided for a hold, which the request must name.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await planes.decide(
            f"{key}-capture",
            movement=ppb.MONEY_MOVEMENT_CAPTURE,
            splits=[ppb.SplitLeg(account_id="fee", amount_minor=30)],
        )
    assert parse_rpc_error(caught.value) == ("FIELD_REQUIRED", "payment.hold_id")
    request = evaluate_request(
        f"{key}-cap2",
        movement=ppb.MONEY_MOVEMENT_CAPTURE,
        splits=[ppb.SplitLeg(account_id="fee", amount_minor=30)],
    )
    request.payment.hold_id = hold_id
    decision = (await planes.evaluate_stub.Evaluate(request)).decision
    capture.idempotency_key = f"{key}-cap2"
    capture.decision_token = decision.decision_token
    captured = await planes.transfer(capture)
    entry = captured.result.entry
    assert entry.decision_id == decision.decision_id and entry.credit_account_id == "shop"
    # A refund: decided on the entry as the ledger holds it.
    refund_key = f"{key}-refund"
    refund_request = evaluate_request(
        refund_key,
        account_id="shop",
        credit_account_id="cust",
        amount_minor=400,
        kind=ppb.PAYMENT_KIND_REFUND,
        movement=ppb.MONEY_MOVEMENT_REFUND,
    )
    refund_request.payment.refund.CopyFrom(
        ppb.RefundContext(
            entry_id=entry.entry_id,
            original_account_id="cust",
            captured_minor=entry.amount.amount_minor,
            refunded_minor=entry.refunded_minor,
            refund_count=entry.refund_count,
        )
    )
    refund_decision = (await planes.evaluate_stub.Evaluate(refund_request)).decision
    assert refund_decision.outcome == ppb.OUTCOME_ALLOW
    refund = mpb.Transfer(
        idempotency_key=refund_key,
        kind=mpb.TRANSFER_KIND_REFUND,
        entry_id=entry.entry_id,
        amount=types_pb2.Money(amount_minor=400, currency=USD),
        decision_token=refund_decision.decision_token,
    )
    # Not for another entry, nor for more.
    other = mpb.Transfer()
    other.CopyFrom(refund)
    other.amount.amount_minor = 401
    await planes.refused(
        other,
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_MISMATCH",
        "transfer.decision_token.amount_minor",
    )
    refunded = await planes.transfer(refund)
    assert refunded.result.entry.refers_to_entry_id == entry.entry_id
    after = await planes.ledger.GetEntry(
        mpb.GetEntryRequest(tenant_id=TENANT, entry_id=entry.entry_id)
    )
    assert (after.entry.refunded_minor, after.entry.refund_count) == (400, 1)


async def test_the_token_key_rotates_while_old_tokens_are_outstanding(planes: Planes) -> None:
    used_key, unused_key = _key(), _key()
    used = await planes.decide(used_key)
    outstanding = await planes.decide(unused_key)
    # Rotation: the money plane learns the new key first (a second file in the
    # mounted Secret), then the policy plane signs with it (restarted).
    new_key = generate_private_key()
    (planes.trusted_dir / "key-2.pub").write_text(public_key_to_b64(new_key.verify_key) + "\n")
    planes.token_key_path.write_text(private_key_to_b64(new_key) + "\n")
    await planes.policy.stop()
    restarted = build_plane(planes.config, planes.clock, listen="127.0.0.1:0")
    port = await restarted.start()
    planes.policy = restarted
    channel = channel_as(planes.state_dir, f"127.0.0.1:{port}", GATEWAY)
    planes.channels.append(channel)
    planes.evaluate_stub = policy_pb2_grpc.PolicyServiceStub(channel)
    fresh_key = _key()
    fresh = await planes.decide(fresh_key)
    assert fresh.token_key_id != used.token_key_id
    # A token signed before the rotation is still good, and so is a new one.
    await planes.transfer(hold(used_key, used.decision_token))
    await planes.transfer(hold(fresh_key, fresh.decision_token))
    # The rotation ends: the old key leaves the Secret, no restart needed; a
    # token of the old key still outstanding is refused from then on.
    (planes.trusted_dir / "key-1.pub").unlink()
    await planes.refused(
        hold(unused_key, outstanding.decision_token),
        C.PERMISSION_DENIED,
        "DECISION_TOKEN_UNKNOWN_KEY",
    )
    # The policy plane still shows the old decision it logged.
    logged = await planes.evaluate_stub.GetDecision(
        ppb.GetDecisionRequest(tenant_id=TENANT, decision_id=outstanding.decision_id)
    )
    assert logged.decision.token_key_id == used.token_key_id
