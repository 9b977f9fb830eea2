"""Each break class the sandbox bank produces (rejected, returned, booked
twice, booked late, booked with another amount) detected and classified from
its own end-of-day statements, checked against its own record of what it did
(GET /v1/truth). The bank runs as a real process (triplane_sim.sandbox_bank)
with a manual clock; payouts reach it through the instant rail adapter."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from money_helpers import Kit

from money_plane.rails.adapters import InstantRail
from money_plane.recon.model import BreakState, Direction, ExpectedPayment
from money_plane.recon.reconciler import Reconciler
from triplane.runtime.config import ReconConfig
from triplane.runtime.net import free_port, port_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rails"))
from sandbox_helpers import BankClient, rails_config, us_payout

START_TIMEOUT_S = 30.0  # a bound on a wait, not a timing assertion
DAY0 = dt.date(2026, 12, 7)  # the bank's manual clock starts that Monday
FAULTS = {
    "reject_rate": 0.1,
    "return_rate": 0.15,
    "duplicate_rate": 0.15,
    "late_rate": 0.15,
    "amount_change_rate": 0.15,
    "batch_rate": 0.0,
}


def _start_bank(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    section = {
        "listen": f"127.0.0.1:{port}",
        "clock": "manual",
        "manual_start": "2026-12-07T14:00:00+00:00",
        "seed": 21,
        "faults": FAULTS,
    }
    path = tmp / "bank.yaml"
    path.write_text(yaml.safe_dump({"sandbox_bank": section}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIPLANE_")}
    env["TRIPLANE_CONFIG"] = str(path)
    log = (tmp / "bank.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "triplane_sim.sandbox_bank"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=Path(__file__).resolve().parents[3],
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((tmp / "bank.log").read_text())
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}"


def _classes_from_truth(payment: dict[str, Any]) -> set[str]:
    """The breaks the bank's record says this payment must raise."""
    if payment["outcome"] == "rejected":
        return {"unmatched_ledger"}
    wanted = {
        {"duplicate": "duplicate", "late": "late", "amount_changed": "amount_mismatch"}[f]
        for f in payment["faults"]
        if f in {"duplicate", "late", "amount_changed"}
    }
    if payment["outcome"] == "returned":
        wanted.add("returned")
    return wanted


# One bank run, on SQLite: the store's SQL is covered on PostgreSQL by test_recon.
@pytest.mark.parametrize("backend_place", ["sqlite"], indirect=True)
async def test_sandbox_bank_faults_are_classified_as_its_record_says(kit: Kit) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="recon-bank-"))
    proc, url = _start_bank(tmp)
    client = BankClient(url)
    try:
        clock = await client.clock()
        instant = InstantRail(rails_config(url), clock=clock)
        payouts = [us_payout(n, amount=1_000 + n, salt="recon") for n in range(60)]
        for payout in payouts:
            await instant.submit(payout)
        await instant.aclose()
        await client.advance(4)  # late bookings and returns have happened
        truth = await client.truth()
        # grace 0: a payment expected on day 0 and booked on day 1 is late.
        recon = Reconciler(
            kit.ledger, ReconConfig(check_ledger_balance=False, grace_days=0), kit.clock
        )
        await recon.start()
        await recon.create_expected_payments(
            kit.tenant,
            [
                ExpectedPayment(
                    tenant_id="",
                    expected_id=p.payout_id,
                    ledger_account_id="bank",
                    direction=Direction.DEBIT,
                    currency="USD",
                    amount_minor=p.amount_minor,
                    amount_min_minor=0,
                    amount_max_minor=0,
                    date_from=DAY0.isoformat(),
                    date_to=DAY0.isoformat(),
                    end_to_end_id=p.end_to_end_id,
                )
                for p in payouts
            ],
        )
        for offset in range(5):
            day = DAY0 + dt.timedelta(days=offset)
            await recon.import_statement(
                kit.tenant, "bank", await client.statement("camt.053", day)
            )
    finally:
        await client.aclose()
        proc.terminate()
        proc.wait(10)
    by_e2e = {p.end_to_end_id: p.payout_id for p in payouts}
    wanted = {by_e2e[e2e]: _classes_from_truth(p) for e2e, p in truth.items()}
    assert any(wanted.values()), "the seed produced no fault"
    found: dict[str, set[str]] = defaultdict(set)
    for b in await recon.list_breaks(kit.tenant, state=BreakState.OPEN.value, limit=1000):
        found[b.expected_id].add(b.break_class.value)
    assert {k: v for k, v in wanted.items() if v} == dict(found)
    produced = set().union(*wanted.values())
    assert {"unmatched_ledger", "returned", "duplicate", "late", "amount_mismatch"} <= produced
