"""The gateway's two databases, opened from config on the one portable storage
layer (`triplane.runtime.db`: SQLite embedded, PostgreSQL at scale, the same
SQL on both):

- the engagement database (`gateway.store`): deliveries, trigger state,
  exposures, outcomes and partner API keys (tables `gw_*`);
- the idempotency database (`gateway.idempotency`): remembered answers, the
  claims of keys whose flow is running, and the outbox of their events
  (tables `remembered`, `remembered_claims`, `outbox`, `store_migrations`),
  on the request path, so on SQLite a file of its own that the engagement
  workers' writes never hold up.

Their table names are disjoint, so on PostgreSQL both may live in one
database (`TRIPLANE_GATEWAY_DSN` selects it for both), which every gateway
replica shares. It must not be a plane's database: the names `outbox` and
`store_migrations` are the gateway's own.
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


def _open(
    section: str,
    backend: str,
    sqlite_path: str,
    postgres_dsn: str,
    state_dir: Path,
    readers: int = 2,
) -> Database:
    if backend == "postgres":
        if not postgres_dsn:
            raise InvalidArgument(
                "POSTGRES_DSN_MISSING",
                f"gateway.{section}.postgres_dsn is required with backend 'postgres'",
                f"gateway.{section}.postgres_dsn",
            )
        return Database("postgres", postgres_dsn, readers=readers)
    if backend != "sqlite":
        raise InvalidArgument(
            "STORE_BACKEND_INVALID",
            f"gateway.{section}.backend must be 'sqlite' or 'postgres'",
            f"gateway.{section}.backend",
        )
    return Database("sqlite", str(_under(state_dir, sqlite_path)), readers=readers)


def open_engagement_db(store: GatewayStoreConfig, state_dir: Path) -> Database:
    """Opens `gateway.store`."""
    return _open("store", store.backend, store.sqlite_path, store.postgres_dsn, state_dir)


def open_from_config(config: Config) -> Database:
    """The engagement database of `config`."""
    return open_engagement_db(config.gateway.store, config.state_path)


def open_idempotency_db(idempotency: GatewayIdempotencyConfig, state_dir: Path) -> Database:
    """Opens `gateway.idempotency` with the reader connections its store needs."""
    return _open(
        "idempotency",
        idempotency.backend,
        idempotency.sqlite_path,
        idempotency.postgres_dsn,
        state_dir,
        readers=READ_CONNECTIONS,
    )
