"""Reconciliation fixtures: the money plane's ledger kit (real SQLite and
PostgreSQL, a manual clock; tests/money_plane/conftest.py) with a Reconciler
on its store, and a write-off account."""

from __future__ import annotations

import pytest
from money_helpers import NO_CONSTRAINT, Kit

from money_plane.recon.codec import encode_break_event
from money_plane.recon.reconciler import Reconciler
from triplane.runtime.config import ReconConfig


@pytest.fixture
async def recon(kit: Kit) -> Reconciler:
    await kit.open(("recon-write-off", "USD", NO_CONSTRAINT, 0))
    reconciler = Reconciler(
        kit.ledger, ReconConfig(check_ledger_balance=False), kit.clock, encode_break_event
    )
    await reconciler.start()
    return reconciler
