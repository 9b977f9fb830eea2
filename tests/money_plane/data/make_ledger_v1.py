"""Writes ledger_v1.json: a ledger database as schema version 1 left it (the
tables' rows as that version wrote them, and what it answered about them),
for tests/money_plane/test_schema_migration.py.

It must run with the version-1 code, commit 3b7ec3a (the last one before
every table was led by tenant_id), since it drives the ledger through its own
API; run with today's code it would write version 2's tables:

    mkdir -p /tmp/v1/tests/money_plane/data && git archive 3b7ec3a | tar -x -C /tmp/v1
    cp tests/money_plane/data/make_ledger_v1.py /tmp/v1/tests/money_plane/data/
    cd /tmp/v1 && PYTHONPATH=.:tests/money_plane \\
        python tests/money_plane/data/make_ledger_v1.py OUT.json

Two tenants (one with a dash, as tenant ids may have), transfers, a split
with a reserve released later, holds pending, captured and voided, a refund,
some outbox events relayed and some not.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
from money_helpers import (
    STANDARD_ACCOUNTS,
    Kit,
    bps_leg,
    ledger_config,
    make_ledger,
)

from money_plane.domain import Command
from triplane.runtime.clock import ManualClock
from triplane.runtime.tokens import TokenSigner, generate_private_key, private_key_to_b64

TENANTS = ("acme", "beta-2")
TABLES = (
    "tenants",
    "accounts",
    "entries",
    "postings",
    "holds",
    "reserves",
    "idempotency",
    "decision_tokens",
    "outbox",
)
BLOBS = {"body", "data"}


async def make(out: Path) -> None:
    signing_key = generate_private_key()
    signer = TokenSigner(signing_key)
    clock = ManualClock()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "ledger.db"
        config = ledger_config(Path(tmp) / "state", signer)
        ledger = make_ledger("sqlite", db, config, signer, clock)
        await ledger.start(sweepers=False)
        replays: list[dict[str, Any]] = []

        async def keep(kit: Kit, command: Command) -> None:
            outcome = await kit.ok(command)
            replays.append(
                {
                    "command": msgspec.json.decode(msgspec.json.encode(command)),
                    "entry_id": outcome.entry.entry_id if outcome.entry else "",
                    "hold_id": outcome.hold.hold_id if outcome.hold else "",
                }
            )

        for tenant in TENANTS:
            await ledger.create_tenant(tenant, f"Tenant {tenant}")
            kit = Kit(ledger, clock, signer, "sqlite", db, tenant)
            await kit.open(*STANDARD_ACCOUNTS)
            await kit.fund("alice", 50_000)
            clock.advance(1)
            for i in range(4):
                await keep(kit, kit.move(f"t{i}", "alice", "merchant", 1_000 + i))
                clock.advance(1)
            release_at_us = clock.now_us() + 86_400 * 1_000_000
            await keep(
                kit,
                kit.move(
                    "split",
                    "alice",
                    "merchant",
                    5_000,
                    splits=[bps_leg("reserve", 1_000, "reserve", release_at_us, "merchant")],
                ),
            )
            await keep(kit, kit.authorize("h-pending", "alice", "merchant", 700))
            held = await kit.ok(kit.authorize("h-captured", "alice", "merchant", 900))
            assert held.hold is not None
            await keep(kit, kit.capture("c-captured", held.hold.hold_id))
            voided = await kit.ok(kit.authorize("h-voided", "alice", "merchant", 300))
            assert voided.hold is not None
            await keep(kit, kit.void("v-voided", voided.hold.hold_id))
            first = replays[-5]["entry_id"]
            await keep(kit, kit.refund("r-first", first, 400))
            clock.advance(1)
            await kit.assert_balanced()
            kit.probe.close()

        store = ledger.store
        unsent = store.unsent(1_000)
        store.mark_sent([e.event_id for e in unsent[: len(unsent) // 2]], clock.now_us())

        expected: dict[str, Any] = {"balances": {}, "history": {}, "holds": {}, "reserves": {}}
        for tenant in TENANTS:
            balances: dict[str, list[int]] = {}
            history: dict[str, list[list[Any]]] = {}
            for account_id, *_ in STANDARD_ACCOUNTS:
                account = await ledger.get_account(tenant, account_id)
                balances[account_id] = list(account.counters())
                rows = await ledger.list_postings(tenant, account_id, 1_000, 0)
                history[account_id] = [
                    [r.entry_id, r.side, r.amount_minor, r.currency, r.posted_at_us] for r in rows
                ]
            expected["balances"][tenant] = balances
            expected["history"][tenant] = history
        await ledger.stop()

        conn = sqlite3.connect(db)
        tables: dict[str, Any] = {}
        for table in TABLES:
            cur = conn.execute(f"SELECT * FROM {table} ORDER BY 1")
            columns = [d[0] for d in cur.description]
            rows = [
                [
                    value.hex() if column in BLOBS else value
                    for column, value in zip(columns, row, strict=True)
                ]
                for row in cur.fetchall()
            ]
            tables[table] = {"columns": columns, "rows": rows}
        for tenant in TENANTS:
            expected["holds"][tenant] = {
                key.split("/", 1)[1]: state
                for key, state in conn.execute(
                    "SELECT hold_key, state FROM holds WHERE tenant_id = ?", (tenant,)
                )
            }
            expected["reserves"][tenant] = {
                key.split("/", 1)[1]: [release_at, released]
                for key, release_at, released in conn.execute(
                    "SELECT reserve_key, release_at_us, released FROM reserves WHERE tenant_id = ?",
                    (tenant,),
                )
            }
        expected["outbox_order"] = [
            [event_id, sent is not None]
            for event_id, sent in conn.execute(
                "SELECT event_id, sent_at_us FROM outbox ORDER BY seq"
            )
        ]
        conn.close()
    text = (
        json.dumps(
            {
                "made_by": "make_ledger_v1.py at 3b7ec3a (schema version 1)",
                "clock_us": clock.now_us(),
                "signer_key": private_key_to_b64(signing_key),
                "tables": tables,
                "replays": replays,
                "expected": expected,
            },
            indent=1,
        )
        + "\n"
    )
    await asyncio.to_thread(out.write_text, text)


if __name__ == "__main__":
    asyncio.run(make(Path(sys.argv[1])))
