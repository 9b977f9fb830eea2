"""Reconciliation through the money plane's real gRPC server (mutual TLS, the
admin identity), driven by `triplane recon import`."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from money_helpers import ledger_config, new_signer, unique_tenant
from recon_samples import camt053, line, statement

from money_plane.app import MoneyPlane
from triplane.money.v1 import money_pb2, money_pb2_grpc, recon_pb2, recon_pb2_grpc
from triplane.runtime.tls import channel_for
from triplane_tools.cli import _recon_import


async def test_recon_import_cli_over_grpc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plane = MoneyPlane(ledger_config(tmp_path, new_signer()), listen="127.0.0.1:0")
    port = await plane.start(sweepers=False, relay=False, metrics=False)
    address = f"127.0.0.1:{port}"
    tenant = unique_tenant("r")
    try:
        async with channel_for(plane.config, address) as channel:
            ledger = money_pb2_grpc.LedgerServiceStub(channel)
            await ledger.CreateTenant(money_pb2.CreateTenantRequest(tenant_id=tenant))
            await ledger.CreateAccounts(
                money_pb2.CreateAccountsRequest(
                    tenant_id=tenant,
                    accounts=[
                        money_pb2.NewAccount(
                            account_id="bank",
                            currency="USD",
                            kind=money_pb2.ACCOUNT_KIND_ASSET,
                            constraint=money_pb2.BALANCE_CONSTRAINT_NONE,
                        )
                    ],
                )
            )
            recon = recon_pb2_grpc.ReconciliationServiceStub(channel)
            file = tmp_path / "eod.xml"
            file.write_bytes(camt053(statement([line(4200, e2e="NOBODY")])))
            args = argparse.Namespace(
                tenant=tenant, account="bank", actor="cli-test", file=str(file), timeout_s=60
            )
            raised = await _recon_import(plane.config, address, args, file.read_bytes())
            again = await _recon_import(plane.config, address, args, file.read_bytes())
            listed = await recon.ListBreaks(recon_pb2.ListBreaksRequest(tenant_id=tenant))
            refused = await _recon_import(plane.config, address, args, b"<Document>")
    finally:
        await plane.stop()
    out = capsys.readouterr()
    assert raised == 1 and "unmatched_bank" in out.out
    assert again == 0 and "imported before" in out.out
    # The ledger holds no such transfer, so the statement's closing balance
    # disagrees with the ledger's bank account too (money.recon.check_ledger_balance).
    assert sorted(b.break_class for b in listed.breaks) == ["balance_mismatch", "unmatched_bank"]
    assert refused == 2 and "INVALID_ARGUMENT" in out.err
