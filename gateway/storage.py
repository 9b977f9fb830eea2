"""The gateway's two databases, opened from config on the one portable storage
layer (`triplane.runtime.db`: SQLite embedded, PostgreSQL at scale, the same
SQL on both):

- the engagement database (`gateway.store`): deliveries, trigger state,
  exposures and outcomes;
- the idempotency database (`gateway.idempotency`): remembered answers and the
  outbox of their events, on the request path, so a file of its own that the
  engagement workers' writes never hold up.
"""

from __future__ import annotations

from pathlib import Path

from gateway.idempotency import READ_CONNECTIONS
from triplane.runtime.config import Config, GatewayIdempotencyConfig, GatewayStoreConfig
from triplane.runtime.db import Database
from triplane.runtime.errors import InvalidArgument

__all__ = ["Database", "open_engagement_db", "open_from_config", "open_idempotency_db"]


def _under(state_dir: Path, sqlite_path: str) -> Path:
    """Relative SQLite paths are under the state directory."""
    path = Path(sqlite_path)
    return path if path.is_absolute() else state_dir / path


def open_engagement_db(store: GatewayStoreConfig, state_dir: Path) -> Database:
    """Opens `gateway.store`."""
    if store.backend == "postgres":
        if not store.postgres_dsn:
            raise InvalidArgument(
                "POSTGRES_DSN_MISSING",
                "gateway.store.postgres_dsn is required with backend 'postgres'",
                "gateway.store.postgres_dsn",
            )
        return Database("postgres", store.postgres_dsn)
    if store.backend != "sqlite":
        raise InvalidArgument(
            "STORE_BACKEND_INVALID",
            "gateway.store.backend must be 'sqlite' or 'postgres'",
            "gateway.store.backend",
        )
    return Database("sqlite", str(_under(state_dir, store.sqlite_path)))


def open_from_config(config: Config) -> Database:
    """The engagement database of `config`."""
    return open_engagement_db(config.gateway.store, config.state_path)


def open_idempotency_db(idempotency: GatewayIdempotencyConfig, state_dir: Path) -> Database:
    """Opens `gateway.idempotency` on SQLite, the embedded default, with the
    reader connections the store needs. `IdempotencyStore` runs on a PostgreSQL
    `Database` as well (its tests run on both); a config key to choose it comes
    with the multi-replica store."""
    path = _under(state_dir, idempotency.sqlite_path)
    return Database("sqlite", str(path), readers=READ_CONNECTIONS)
