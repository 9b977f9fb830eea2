"""A payout held for review, resolved by a human, end to end: the money,
policy and gateway planes in process over gRPC with mutual TLS (SQLite), real
NATS JetStream between them, the sandbox bank as a real process, and one
manual clock (the bank's, moved by the test) for all of them.

- Approving the payout's case logs a new decision (naming the case and the
  decision it reviewed) whose token allows exactly that payout; the event
  carries it to the gateway, which hands it to the money plane: the payout is
  approved under that decision (debited into payouts-in-flight once), sent to
  the bank by the rail worker, and settles. Resolving twice, or the event
  delivered twice, approves once.
- The approval's token is verified like any: tampered, it is refused; shown
  for another payout, the claim that differs is named.
- Declining another payout's case moves no money: it fails with
  REVIEW_DECLINED.
- The partner's webhook hears approved, failed and settled once each, and a
  reconciliation break once, with its class.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import yaml
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY
from sandbox_helpers import BankClient

from gateway.app import Gateway
from gateway.payout_events import CASE_RESOLVED_SUBJECT
from money_plane.app import MoneyPlane
from money_plane.domain import Command, Kind
from money_plane.engine import Job
from policy_plane.app import build_plane
from tests.gateway._b_helpers import Receiver, receiver, secret_file
from tests.gateway.auth_helpers import KeyedStub, partner_key
from tests.money_plane.recon.recon_samples import camt054, line
from tests.tls_helpers import dev_certificates, partner_files
from triplane.common.v1 import types_pb2
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.money.v1 import money_pb2, money_pb2_grpc, recon_pb2, recon_pb2_grpc
from triplane.policy.v1 import policy_pb2, policy_pb2_grpc
from triplane.runtime.clock import ManualClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import free_port
from triplane.runtime.status import parse_rpc_error
from triplane.runtime.tls import channel_for, open_channel
from triplane_tools import cli

pytestmark = pytest.mark.nats

SELLER = "seller_r"
SELLER_ACCOUNT = "seller_r_balance"
IN_FLIGHT = "payouts_in_flight:USD"
HOUR_S = 3600.0
# From the bank's start (a Monday, 14:00 UTC) past the next same-day ACH
# file's send time (tests/money_plane/rails/test_rail_worker.py).
TO_FLUSH_S = 85 * 60.0
# Above the default bundle's payout_new_beneficiary_review_minor (100000).
HELD_MINOR = 150_000


@dataclass
class Stack:
    tenant: str
    state_dir: Path
    money_address: str
    config: Config
    clock: ManualClock
    money: MoneyPlane
    gateway: Gateway
    partner: Any
    cases: policy_pb2_grpc.CaseServiceStub
    decisions: policy_pb2_grpc.PolicyServiceStub
    ledger: money_pb2_grpc.LedgerServiceStub
    recon: recon_pb2_grpc.ReconciliationServiceStub
    hook: Receiver
    bank: BankClient


@pytest.fixture
async def stack(tmp_path: Path, nats_url: str, clean_bank: str) -> AsyncIterator[Stack]:
    dev_certificates(tmp_path)
    # A tenant and consumers of its own on the shared NATS server.
    suffix = uuid.uuid4().hex[:8]
    tenant = f"reviews_{suffix}"
    bank = BankClient(clean_bank)
    clock = ManualClock(await bank.now_us())
    async with receiver() as hook, contextlib.AsyncExitStack() as exits:
        exits.push_async_callback(bank.aclose)
        config = load_config(
            environ={},
            overrides={
                "runtime": {"state_dir": str(tmp_path)},
                "nats": {"url": nats_url},
                "gateway": {
                    "listen": "127.0.0.1:0",
                    "holdout_share": 0.0,
                    "partner_webhooks": [
                        {"tenant_id": tenant, "url": hook.url, "secret_path": secret_file()}
                    ],
                    "payout_webhooks": {
                        "durable_name": f"payout-hooks-{suffix}",
                        "review_durable_name": f"payout-reviews-{suffix}",
                        "break_durable_name": f"break-hooks-{suffix}",
                    },
                },
                # The rail worker's loops sleep long: the test runs each unit.
                "rails": {
                    "bank_url": clean_bank,
                    "worker": {
                        "handoff_interval_s": HOUR_S,
                        "flush_check_interval_s": HOUR_S,
                        "deliver_interval_s": HOUR_S,
                    },
                },
            },
        )
        money = MoneyPlane(config, clock, listen="127.0.0.1:0")
        exits.push_async_callback(money.stop)
        money_address = f"127.0.0.1:{await money.start(metrics=False)}"
        policy = build_plane(config, clock, listen="127.0.0.1:0")
        exits.push_async_callback(policy.stop)
        policy_address = f"127.0.0.1:{await policy.start()}"
        gateway = Gateway(
            config,
            clock,
            money_address=money_address,
            policy_address=policy_address,
            ai_address=f"127.0.0.1:{free_port()}",
        )
        exits.push_async_callback(gateway.stop)
        port = await gateway.start()
        money_channel = await exits.enter_async_context(channel_for(config, money_address))
        policy_channel = await exits.enter_async_context(channel_for(config, policy_address))
        partner_channel = open_channel(f"127.0.0.1:{port}", partner_files(tmp_path))
        exits.push_async_callback(partner_channel.close)
        made = Stack(
            tenant=tenant,
            state_dir=tmp_path,
            money_address=money_address,
            config=config,
            clock=clock,
            money=money,
            gateway=gateway,
            partner=KeyedStub(
                gateway_pb2_grpc.GatewayServiceStub(partner_channel),
                await partner_key(gateway, tenant),
            ),
            cases=policy_pb2_grpc.CaseServiceStub(policy_channel),
            decisions=policy_pb2_grpc.PolicyServiceStub(policy_channel),
            ledger=money_pb2_grpc.LedgerServiceStub(money_channel),
            recon=recon_pb2_grpc.ReconciliationServiceStub(money_channel),
            hook=hook,
            bank=bank,
        )
        await _seed(made)
        yield made


async def _seed(stack: Stack) -> None:
    await stack.ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=stack.tenant))
    await stack.ledger.CreateAccounts(
        money_pb2.CreateAccountsRequest(
            tenant_id=stack.tenant,
            accounts=[
                money_pb2.NewAccount(
                    account_id="funding",
                    currency="USD",
                    kind=money_pb2.ACCOUNT_KIND_ASSET,
                    constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                ),
                money_pb2.NewAccount(
                    account_id=SELLER_ACCOUNT,
                    currency="USD",
                    kind=money_pb2.ACCOUNT_KIND_LIABILITY,
                    constraint=money_pb2.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                ),
            ],
        )
    )
    await stack.decisions.CreateTenant(
        policy_pb2.CreateTenantRequest(tenant_id=stack.tenant, display_name="Reviews")
    )
    opened = Timestamp()
    opened.FromMicroseconds(stack.clock.now_us() - 400 * 86_400_000_000)
    await stack.partner.PutCustomerProfile(
        gw.PutCustomerProfileRequest(
            tenant_id=stack.tenant,
            profile=gw.CustomerProfile(
                customer_id=SELLER, kyc_tier=2, country="US", account_opened_at=opened
            ),
            change_id="kyc-seller",
            actor="kyc-provider",
        )
    )
    # The seller's balance, booked in the plane's own ledger (what funds it
    # is not under test).
    ledger = stack.money.ledger
    assert ledger is not None
    fund = Command(
        tenant_id=stack.tenant,
        idempotency_key="fund",
        kind=Kind.PAYOUT_REVERSAL,
        debit_account_id="funding",
        credit_account_id=SELLER_ACCOUNT,
        amount_minor=500_000,
        currency="USD",
    )
    job = Job(tenant_id=stack.tenant, commands=[fund], fields=["fund"])
    [[outcome]] = await ledger.run_on_writer(
        lambda: ledger.store.commit_jobs([job], ledger.clock.now_us())
    )
    assert outcome.error is None
    for n in (1, 2):
        await stack.partner.CreateBeneficiary(
            gw.CreateBeneficiaryRequest(
                tenant_id=stack.tenant,
                idempotency_key=f"ben-{n}",
                beneficiary_id=f"ben-{n}",
                merchant_id=SELLER,
                holder_name=f"Ada Seller {'I' * n}",
                country="US",
                routing_number="011000015",
                account_number=f"98765432{n}",
                account_type="checking",
            )
        )


async def _held(stack: Stack, key: str, beneficiary_id: str) -> gw.CreatePayoutResponse:
    """A first payout to the beneficiary above the threshold: held for review."""
    held = await stack.partner.CreatePayout(
        gw.CreatePayoutRequest(
            tenant_id=stack.tenant,
            idempotency_key=key,
            merchant_id=SELLER,
            account_id=SELLER_ACCOUNT,
            beneficiary_id=beneficiary_id,
            amount=types_pb2.Money(amount_minor=HELD_MINOR, currency="USD"),
        )
    )
    assert held.outcome == gw.OUTCOME_REVIEW and held.case_id, held.reasons
    assert held.payout.state == gw.PAYOUT_STATE_PENDING_REVIEW
    return held  # type: ignore[no-any-return]


async def _resolve(stack: Stack, case_id: str, resolution: int) -> policy_pb2.Case:
    await stack.cases.ClaimCase(
        policy_pb2.ClaimCaseRequest(tenant_id=stack.tenant, case_id=case_id, reviewer="ana")
    )
    resolved = await stack.cases.ResolveCase(
        policy_pb2.ResolveCaseRequest(
            tenant_id=stack.tenant,
            case_id=case_id,
            reviewer="ana",
            resolution=resolution,  # type: ignore[arg-type]
            note="checked the seller's documents",
        )
    )
    return resolved.case


async def _payout(stack: Stack, payout_id: str) -> money_pb2.Payout:
    found = await stack.ledger.GetPayout(
        money_pb2.GetPayoutRequest(tenant_id=stack.tenant, payout_id=payout_id)
    )
    return found.payout


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Waits for what NATS, the relays and the consumers carry (a bound on
    the wait, not a timing assertion)."""
    for _ in range(600):
        if await check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"never: {what}")


async def _balance(stack: Stack, account_id: str) -> int:
    ledger = stack.money.ledger
    assert ledger is not None
    return (await ledger.get_account(stack.tenant, account_id)).posted


async def _refused(call: Any) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    reason, field = parse_rpc_error(caught.value)
    return caught.value.code(), reason, field


def _hooks(stack: Stack, event_type: str) -> list[dict[str, Any]]:
    found = []
    for request in stack.hook.received:
        body = json.loads(request.body)
        if body["type"] == event_type:
            found.append(body["data"])
    return found


def _payout_states(stack: Stack, payout_id: str) -> list[str]:
    return sorted(
        data["state"]
        for request in stack.hook.received
        if (data := json.loads(request.body)["data"]).get("payout_id") == payout_id
    )


async def test_an_approved_review_pays_out_once_and_a_declined_one_moves_nothing(
    stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    approved = await _held(stack, "po-review-approve", "ben-1")
    declined = await _held(stack, "po-review-decline", "ben-2")
    payout_id = approved.payout.payout_id
    assert await _balance(stack, SELLER_ACCOUNT) == 500_000  # held: nothing moved

    # Approve: a decision of its own, logged, for exactly this payout.
    case = await _resolve(stack, approved.case_id, policy_pb2.RESOLUTION_APPROVE)
    assert case.status == policy_pb2.CASE_STATUS_RESOLVED and case.approval_decision_id
    again = await stack.cases.ResolveCase(
        policy_pb2.ResolveCaseRequest(
            tenant_id=stack.tenant,
            case_id=approved.case_id,
            reviewer="ana",
            resolution=policy_pb2.RESOLUTION_APPROVE,
        )
    )
    assert again.case.approval_decision_id == case.approval_decision_id
    logged = (
        await stack.decisions.GetDecision(
            policy_pb2.GetDecisionRequest(
                tenant_id=stack.tenant, decision_id=case.approval_decision_id
            )
        )
    ).decision
    assert logged.outcome == policy_pb2.OUTCOME_ALLOW and logged.decision_token
    assert logged.case_id == approved.case_id
    assert [r.reason_code for r in logged.fired_rules] == ["CASE_APPROVED"]
    assert logged.decision_id != approved.decision_id
    # The log replays it as the reviewer's (not the bundle's review again),
    # its token still exactly the reviewed movement; the chain verifies.
    replay = await stack.decisions.ReplayDecisions(
        policy_pb2.ReplayDecisionsRequest(tenant_id=stack.tenant)
    )
    assert (replay.decisions_replayed, replay.decisions_identical) == (3, 3)
    verified = await stack.decisions.VerifyDecisionLog(policy_pb2.VerifyDecisionLogRequest())
    assert verified.valid, verified.problem

    async def is_approved() -> bool:
        return (await _payout(stack, payout_id)).state == money_pb2.PAYOUT_STATE_APPROVED

    await _until(is_approved, "the approval reached the money plane")
    payout = await _payout(stack, payout_id)
    assert payout.decision_id == case.approval_decision_id and payout.entry_id
    assert await _balance(stack, SELLER_ACCOUNT) == 500_000 - HELD_MINOR
    assert await _balance(stack, IN_FLIGHT) == HELD_MINOR

    # The approval's token, verified like any: tampered, refused; for the
    # other held payout (same amount and accounts), the key it names differs.
    token = logged.decision_token
    head, claims, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert await _refused(
        stack.ledger.ApprovePayout(
            money_pb2.ApprovePayoutRequest(
                tenant_id=stack.tenant,
                payout_id=declined.payout.payout_id,
                decision_token=f"{head}.{claims}.{flipped}",
            )
        )
    ) == (grpc.StatusCode.PERMISSION_DENIED, "DECISION_TOKEN_BAD_SIGNATURE", "decision_token")
    assert await _refused(
        stack.ledger.ApprovePayout(
            money_pb2.ApprovePayoutRequest(
                tenant_id=stack.tenant, payout_id=declined.payout.payout_id, decision_token=token
            )
        )
    ) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "DECISION_TOKEN_MISMATCH",
        "decision_token.idempotency_key",
    )
    # Its own payout again (an operator, or the event once more): replayed.
    replayed = await stack.ledger.ApprovePayout(
        money_pb2.ApprovePayoutRequest(
            tenant_id=stack.tenant, payout_id=payout_id, decision_token=token
        )
    )
    assert replayed.replayed and replayed.payout.entry_id == payout.entry_id
    # The same through the operators' CLI (the token from a file).
    token_file = stack.state_dir / "approval.token"
    token_file.write_text(token)
    config_file = stack.state_dir / "cli.yaml"
    config_file.write_text(yaml.safe_dump({"runtime": {"state_dir": str(stack.state_dir)}}))
    argv = ["--config", str(config_file), "money", "approve-payout", "--tenant", stack.tenant]
    argv += ["--payout-id", payout_id, "--token-file", str(token_file)]
    argv += ["--address", stack.money_address]
    assert await asyncio.to_thread(cli.main, argv) == 0
    assert "approved (replayed)" in capsys.readouterr().out
    # The resolved event delivered to the gateway's consumer once more.
    nc = await nats.connect(stack.config.nats.url)
    try:
        subject = CASE_RESOLVED_SUBJECT.replace("*", stack.tenant)
        event = await nc.jetstream().get_last_msg("TRIPLANE_POLICY", subject)
    finally:
        await nc.close()
    assert event.data is not None
    replays = {"resolution": "approve", "result": "replayed"}
    before = REGISTRY.get_sample_value("triplane_gateway_payout_reviews_total", replays) or 0
    await stack.gateway.event_consumers[1].handle(event.data)
    after = REGISTRY.get_sample_value("triplane_gateway_payout_reviews_total", replays)
    assert after == before + 1
    assert await _balance(stack, IN_FLIGHT) == HELD_MINOR
    assert (await _payout(stack, payout_id)).entry_id == payout.entry_id

    # Decline: no decision, nothing moves, the payout fails.
    refused = await _resolve(stack, declined.case_id, policy_pb2.RESOLUTION_DECLINE)
    assert not refused.approval_decision_id

    async def is_declined() -> bool:
        found = await _payout(stack, declined.payout.payout_id)
        return found.state == money_pb2.PAYOUT_STATE_FAILED

    await _until(is_declined, "the decline reached the money plane")
    gone = await _payout(stack, declined.payout.payout_id)
    assert gone.reason_code == "REVIEW_DECLINED" and not gone.entry_id
    assert await _balance(stack, SELLER_ACCOUNT) == 500_000 - HELD_MINOR

    # Bad input: the field named, nothing changed.
    both = money_pb2.ApprovePayoutRequest(
        tenant_id=stack.tenant, payout_id=payout_id, idempotency_key="x", decision_token=token
    )
    assert await _refused(stack.ledger.ApprovePayout(both)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "PAYOUT_SELECTOR_REQUIRED",
        "payout_id",
    )
    tokenless = money_pb2.ApprovePayoutRequest(tenant_id=stack.tenant, payout_id=payout_id)
    assert await _refused(stack.ledger.ApprovePayout(tokenless)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "DECISION_TOKEN_REQUIRED",
        "decision_token",
    )
    late = money_pb2.DeclinePayoutRequest(
        tenant_id=stack.tenant, payout_id=payout_id, case_id=approved.case_id
    )
    assert await _refused(stack.ledger.DeclinePayout(late)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAYOUT_STATE_CONFLICT",
        "payout_id",
    )
    assert (await _payout(stack, payout_id)).state == money_pb2.PAYOUT_STATE_APPROVED
    again_declined = await stack.ledger.DeclinePayout(
        money_pb2.DeclinePayoutRequest(
            tenant_id=stack.tenant,
            idempotency_key=gone.idempotency_key,
            case_id=declined.case_id,
        )
    )
    assert again_declined.replayed

    # The rail worker sends the approved payout; the bank settles it.
    worker = stack.money.rail_workers[0]
    assert await worker.hand_off() == 1
    stack.clock.advance(TO_FLUSH_S)
    await stack.bank.advance(TO_FLUSH_S / 86_400)
    assert await worker.flush_if_due() == 1
    truth = await stack.bank.truth()
    assert truth[payout.end_to_end_id]["received"] == 1
    assert await worker.deliver() == 1
    assert (await _payout(stack, payout_id)).state == money_pb2.PAYOUT_STATE_SETTLED
    assert await _balance(stack, IN_FLIGHT) == 0

    async def partner_heard() -> bool:
        return _payout_states(stack, payout_id) == [
            "approved",
            "pending_review",
            "settled",
            "submitted",
        ] and _payout_states(stack, declined.payout.payout_id) == ["failed", "pending_review"]

    await _until(partner_heard, "the partner's webhook heard every state once")
    [failed] = [
        data
        for data in _hooks(stack, "payout.failed")
        if data["payout_id"] == declined.payout.payout_id
    ]
    assert failed["reason_code"] == "REVIEW_DECLINED"


async def test_a_reconciliation_break_reaches_the_partner_webhook_once(stack: Stack) -> None:
    """A bank line nothing expected (a credit the ledger lacks) is an
    unmatched_bank break: money.recon.break on the money stream, one
    partner webhook with its class, also when the event comes again."""
    await stack.ledger.CreateAccounts(
        money_pb2.CreateAccountsRequest(
            tenant_id=stack.tenant,
            accounts=[
                money_pb2.NewAccount(
                    account_id="bank_usd",
                    currency="USD",
                    kind=money_pb2.ACCOUNT_KIND_ASSET,
                    constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                )
            ],
        )
    )
    imported = await stack.recon.ImportStatement(
        recon_pb2.ImportStatementRequest(
            tenant_id=stack.tenant,
            ledger_account_id="bank_usd",
            content=camt054(line(4_200, e2e="NOBODY-EXPECTED")),
            actor="ops@reviews",
        )
    )
    [found] = imported.breaks
    assert found.break_class == "unmatched_bank"

    async def heard() -> bool:
        return len(_hooks(stack, "recon.break")) == 1

    await _until(heard, "the break's webhook arrived")
    nc = await nats.connect(stack.config.nats.url)
    try:
        event = await nc.jetstream().get_last_msg(
            "TRIPLANE_MONEY", f"triplane.money.{stack.tenant}.recon.break"
        )
    finally:
        await nc.close()
    assert event.data is not None
    await stack.gateway.event_consumers[2].handle(event.data)
    # Queued once (any status: the worker may be trying it again).
    engagement = stack.gateway.engagement
    assert engagement is not None
    assert sum((await engagement.delivery.counts(stack.tenant)).values()) == 1
    [data] = _hooks(stack, "recon.break")
    assert data["break_id"] == found.break_id
    assert data["break_class"] == "unmatched_bank"
    assert (data["amount_minor"], data["currency"]) == (4_200, "USD")
    assert data["detected_at_us"] == found.detected_at.ToMicroseconds()
    assert "NOBODY-EXPECTED" not in stack.hook.received[-1].body
