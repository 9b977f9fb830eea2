"""The engagement database (deliveries, trigger state, exposures, outcomes).

It reuses the one portable database layer (`triplane.runtime.db`: SQLite embedded,
PostgreSQL at scale, the same SQL on both) rather than a second one.
"""

from __future__ import annotations

from pathlib import Path

from triplane.runtime.config import Config, GatewayStoreConfig
from triplane.runtime.db import Database
from triplane.runtime.errors import InvalidArgument

__all__ = ["Database", "open_engagement_db"]


def open_engagement_db(store: GatewayStoreConfig, state_dir: Path) -> Database:
    """Opens `gateway.store` (relative SQLite paths are under `state_dir`)."""
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
    path = Path(store.sqlite_path)
    if not path.is_absolute():
        path = state_dir / path
    return Database("sqlite", str(path))


def open_from_config(config: Config) -> Database:
    return open_engagement_db(config.gateway.store, config.state_path)
