"""Money plane fixtures: a started Ledger on both backends (SQLite in a temp dir,
PostgreSQL in a fresh database), a manual clock, and a signer it trusts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from money_helpers import (
    BACKENDS,
    STANDARD_ACCOUNTS,
    BackendPlace,
    DbProbe,
    Kit,
    ledger_config,
    make_ledger,
    new_signer,
    unique_tenant,
)

from triplane.runtime.clock import ManualClock
from triplane.runtime.tokens import TokenSigner


@pytest.fixture(params=BACKENDS)
def backend_place(request: pytest.FixtureRequest, tmp_path: Path) -> BackendPlace:
    backend: str = request.param
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    if backend == "sqlite":
        return BackendPlace(backend, state_dir / "money.db", state_dir)
    dsn: str = request.getfixturevalue("pg_dsn")
    return BackendPlace(backend, dsn, state_dir)


@pytest.fixture
def signer() -> TokenSigner:
    return new_signer()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def kit(
    backend_place: BackendPlace, signer: TokenSigner, clock: ManualClock
) -> AsyncIterator[Kit]:
    """A started Ledger (no background sweepers: tests call them) with one
    tenant and the standard accounts."""
    config = ledger_config(backend_place.state_dir, signer)
    ledger = make_ledger(backend_place.backend, backend_place.where, config, signer, clock)
    await ledger.start(sweepers=False)
    tenant = unique_tenant()
    await ledger.create_tenant(tenant, "Test tenant")
    result = Kit(ledger, clock, signer, backend_place.backend, backend_place.where, tenant)
    await result.open(*STANDARD_ACCOUNTS)
    try:
        yield result
    finally:
        result.probe.close()
        await ledger.stop()


@pytest.fixture
def probe(backend_place: BackendPlace) -> DbProbe:
    return DbProbe(backend_place.backend, backend_place.where)
