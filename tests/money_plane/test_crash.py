"""Crash: `python -m money_plane` on PostgreSQL, killed with SIGKILL under load,
restarted, every unanswered request retried. Every transfer exists exactly
once, the books balance, and JetStream holds exactly one message per outbox
event."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from money_helpers import DbProbe, stream_count, stream_messages, transfer_token, unique_tenant

from tests.tls_helpers import channel_as, dev_certificates
from triplane.common.v1 import types_pb2
from triplane.money.v1 import money_pb2 as pb
from triplane.money.v1 import money_pb2_grpc
from triplane.runtime.net import free_port
from triplane.runtime.tokens import TokenSigner, load_signer

REPO = Path(__file__).resolve().parents[2]
TRANSFERS = 400
CLIENTS = 16
KILL_AFTER_ANSWERS = 120

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.nats]


class PlaneProcess:
    """`python -m money_plane` as a child process."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int) -> None:
        self.env, self.log_path, self.port = env, log_path, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "money_plane"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def wait_serving(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log()
            try:
                async with self.channel() as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=1.0
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"money plane did not serve in time:\n{self.log()}")

    def channel(self) -> grpc.aio.Channel:
        """A channel as the admin identity, with the state dir's dev certificates."""
        state_dir = Path(self.env["TRIPLANE_STATE_DIR"])
        return channel_as(state_dir, f"127.0.0.1:{self.port}")

    def kill(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def plane_process(pg_dsn: str, nats_url: str, tmp_path: Path) -> Iterator[PlaneProcess]:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    dev_certificates(state_dir)  # as the dev stack makes them: mutual TLS is on
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE") and k != "NATS_URL"}
    env.update(
        {
            "TRIPLANE_MONEY_DSN": pg_dsn,
            "NATS_URL": nats_url,
            "TRIPLANE_STATE_DIR": str(state_dir),
            "TRIPLANE__MONEY__LISTEN": f"127.0.0.1:{port}",
            "TRIPLANE__RUNTIME__LOG_FORMAT": "text",
            "TRIPLANE__RUNTIME__LOG_LEVEL": "WARNING",
        }
    )
    plane = PlaneProcess(env, tmp_path / "money_plane.log", port)
    try:
        yield plane
    finally:
        plane.terminate()


def _token(signer: TokenSigner, tenant: str, transfer: pb.Transfer) -> str:
    return transfer_token(signer, tenant, transfer, issued_at_s=int(time.time()))


async def test_kill_9_under_load_loses_and_duplicates_nothing(
    plane_process: PlaneProcess, pg_dsn: str, nats_url: str
) -> None:
    state_dir = Path(plane_process.env["TRIPLANE_STATE_DIR"])
    # The dev key pair the plane trusts (created now, before it starts).
    signer = load_signer("", state_dir)
    plane_process.start()
    await plane_process.wait_serving()
    tenant = unique_tenant("crash")
    async with plane_process.channel() as channel:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        await stub.CreateTenant(pb.CreateTenantRequest(tenant_id=tenant, display_name="crash"))
        await stub.CreateAccounts(
            pb.CreateAccountsRequest(
                tenant_id=tenant,
                accounts=[
                    pb.NewAccount(
                        account_id="bank",
                        currency="USD",
                        kind=pb.ACCOUNT_KIND_ASSET,
                        constraint=pb.BALANCE_CONSTRAINT_NONE,
                    ),
                    pb.NewAccount(
                        account_id="fee",
                        currency="USD",
                        kind=pb.ACCOUNT_KIND_REVENUE,
                        constraint=pb.BALANCE_CONSTRAINT_NONE,
                    ),
                    *[
                        pb.NewAccount(
                            account_id=f"cust{i}",
                            currency="USD",
                            kind=pb.ACCOUNT_KIND_LIABILITY,
                            constraint=pb.BALANCE_CONSTRAINT_DEBITS_MUST_NOT_EXCEED_CREDITS,
                        )
                        for i in range(8)
                    ],
                ],
            )
        )
    requests = []
    for i in range(TRANSFERS):
        key, amount = f"crash-{i}", 100 + i
        requests.append(
            pb.CreateTransferRequest(
                tenant_id=tenant,
                transfer=pb.Transfer(
                    idempotency_key=key,
                    kind=pb.TRANSFER_KIND_TRANSFER,
                    debit_account_id="bank",
                    credit_account_id=f"cust{i % 8}",
                    amount=types_pb2.Money(amount_minor=amount, currency="USD"),
                    splits=[
                        pb.SplitLeg(
                            account_id="fee",
                            kind=pb.SPLIT_LEG_KIND_BASIS_POINTS,
                            basis_points=150,
                            label="fee",
                        )
                    ],
                ),
            )
        )
        requests[-1].transfer.decision_token = _token(signer, tenant, requests[-1].transfer)
    answers: dict[str, str] = {}
    killed = asyncio.Event()

    async def client(channel: grpc.aio.Channel, mine: list[pb.CreateTransferRequest]) -> None:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        for request in mine:
            if killed.is_set():
                return
            try:
                reply = await stub.CreateTransfer(request, timeout=10)
            except grpc.aio.AioRpcError as err:
                # Only the crash may fail a request: nothing else is wrong with them.
                assert err.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED,
                ), err
                continue
            answers[request.transfer.idempotency_key] = reply.result.entry.entry_id
            if len(answers) >= KILL_AFTER_ANSWERS and not killed.is_set():
                killed.set()
                plane_process.kill()

    async with plane_process.channel() as channel:
        await asyncio.gather(*[client(channel, requests[c::CLIENTS]) for c in range(CLIENTS)])
    assert killed.is_set(), "the load finished before the kill"
    assert KILL_AFTER_ANSWERS <= len(answers) < TRANSFERS

    plane_process.start()
    await plane_process.wait_serving()
    async with plane_process.channel() as channel:
        stub = money_pb2_grpc.LedgerServiceStub(channel)
        # Retry everything: unanswered requests commit (or replay, if they had
        # committed unseen); answered ones replay their original entry.
        for request in requests:
            reply = await stub.CreateTransfer(request, timeout=30)
            key = request.transfer.idempotency_key
            if key in answers:
                assert reply.result.replayed
                assert reply.result.entry.entry_id == answers[key]
            answers[key] = reply.result.entry.entry_id
        check = await stub.CheckBalanced(pb.CheckBalancedRequest(tenant_id=tenant))
        assert check.balanced

    probe = DbProbe("postgres", pg_dsn)
    try:
        by_key = probe.entries_by_key(tenant)
        assert by_key == {f"crash-{i}": 1 for i in range(TRANSFERS)}
        assert probe.invariant_problems(tenant) == []
        credited = sum(probe.counters(tenant)[f"cust{i}"][1] for i in range(8))
        fees = probe.counters(tenant)["fee"][1]
        assert credited + fees == sum(100 + i for i in range(TRANSFERS))

        # The relay catches up: every outbox row published, exactly once.
        subject = f"triplane.money.{tenant}.>"
        # The ledger's events (the tenant's registration goes to its own stream).
        outbox = dict(
            probe.rows(
                "SELECT event_id, subject FROM outbox "
                "WHERE substr(subject, 1, 15) = 'triplane.money.'"
            )
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            unsent = probe.scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL")
            if unsent == 0 and await stream_count(nats_url, subject) >= len(outbox):
                break
            await asyncio.sleep(0.5)
        assert probe.scalar("SELECT COUNT(*) FROM outbox WHERE sent_at_us IS NULL") == 0
    finally:
        probe.close()
    # Account openings + one entry per transfer.
    assert len(outbox) == 10 + TRANSFERS
    assert await stream_count(nats_url, subject) == len(outbox)
    messages = await stream_messages(nats_url, subject, len(outbox))
    ids = [msg_id for msg_id, _ in messages]
    assert len(ids) == len(set(ids)) == len(outbox)
    assert dict(messages) == outbox
