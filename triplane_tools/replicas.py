"""What `triplane up --replicas N` changes in the stack's config: every plane
on the shared engines (PostgreSQL, one database per plane created on the local
server unless a DSN is configured; Redis for the AI plane's features and
pending ranks), then one config per replica with its own ports, its own
decision-log writer, its own AI model directory (its own Triton), and the
gateway dialling every replica of each plane (round_robin over an ipv4:
address list)."""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import urlsplit

import msgspec
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from triplane.runtime.config import Config
from triplane.runtime.net import dial_address, free_port, port_open

DEFAULT_PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DEFAULT_DATABASE_PREFIX = "triplane"
# The planes' sections holding ports a second replica must not share.
EXTRA_PORT_KEYS = ("metrics_listen", "admin_listen")


def _refuse(message: str) -> None:
    # Imported here: stack imports this module.
    from triplane_tools.stack import StackError

    raise StackError(message)


def check_redis(url: str) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if not port_open(host, port):
        _refuse(
            f"more than one replica needs Redis (the AI plane's features and pending ranks, "
            f"ai.features.redis_url = {url}): nothing answers at {host}:{port}; start "
            "redis-server or set ai.features.redis_url (TRIPLANE__AI__FEATURES__REDIS_URL)"
        )


def ensure_database(admin_dsn: str, name: str) -> str:
    """Creates database `name` on the server of admin_dsn unless it exists;
    returns its DSN."""
    params = conninfo_to_dict(admin_dsn)
    host = str(params.get("host", "127.0.0.1"))
    port = int(str(params.get("port", 5432)))
    if not host.startswith("/") and not port_open(host, port):
        _refuse(
            f"more than one replica needs PostgreSQL (the planes' shared state): nothing "
            f"answers at {host}:{port} ({admin_dsn}); start PostgreSQL, pass --postgres "
            "with an admin DSN, or give each plane a DSN (TRIPLANE_MONEY_DSN, "
            "TRIPLANE_POLICY_DSN, TRIPLANE_AI_DSN, TRIPLANE_GATEWAY_DSN)"
        )
    try:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists is None:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as error:
        _refuse(f"PostgreSQL ({admin_dsn}): cannot create database {name}: {error}")
    return make_conninfo(admin_dsn, dbname=name)


def drop_databases(admin_dsn: str, prefix: str) -> None:
    """Drops the planes' databases a stack made with `prefix` (tests)."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=5) as connection:
        for plane in ("money", "policy", "ai", "gateway"):
            name = f"{prefix}_{plane}"
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def shared_engines_config(
    config: Config, *, admin_dsn: str, prefix: str, ai_replicas: int
) -> Config:
    """The config with every plane's shared state on PostgreSQL and Redis.
    A plane already configured on PostgreSQL keeps its DSN."""
    data: dict[str, Any] = msgspec.to_builtins(config)
    check_redis(config.ai.features.redis_url)

    def dsn_for(plane: str, section: dict[str, Any]) -> str:
        if section.get("backend") == "postgres" and section.get("postgres_dsn"):
            return str(section["postgres_dsn"])
        return ensure_database(admin_dsn, f"{prefix}_{plane}")

    money = data["money"]["store"]
    money.update(backend="postgres", postgres_dsn=dsn_for("money", money))
    policy = data["policy"]["store"]
    policy.update(backend="postgres", postgres_dsn=dsn_for("policy", policy))
    registry = data["ai"]["registry"]
    registry.update(backend="postgres", postgres_dsn=dsn_for("ai", registry))
    gateway = data["gateway"]
    gateway_dsn = dsn_for("gateway", gateway["store"])
    for section in ("store", "idempotency"):
        gateway[section].update(backend="postgres", postgres_dsn=gateway_dsn)
    data["ai"]["features"]["backend"] = "redis"
    data["ai"]["replicas"] = ai_replicas
    data["runtime"]["grpc"]["load_balancing"] = "round_robin"
    return msgspec.convert(data, Config)


def with_stream_replicas(config: Config, replicas: int) -> Config:
    nats = msgspec.structs.replace(config.nats, stream_replicas=replicas)
    return msgspec.structs.replace(config, nats=nats)


def _loopback_port() -> str:
    return f"127.0.0.1:{free_port()}"


def replica_configs(
    base: dict[str, Any], counts: dict[str, int]
) -> dict[tuple[str, int], dict[str, Any]]:
    """One config (as builtins) per (plane, replica): replica 0 keeps the
    configured ports, the others get free loopback ports; the gateway's
    plane_addresses name every replica of each plane it dials."""
    listens: dict[str, list[str]] = {}
    for plane, count in counts.items():
        first = base[plane]["listen"]
        listens[plane] = [first, *(_loopback_port() for _ in range(count - 1))]
    shared = copy.deepcopy(base)
    for plane in ("money", "policy", "ai"):
        if plane in listens and not shared["gateway"]["plane_addresses"].get(plane):
            addresses = [dial_address(listen) for listen in listens[plane]]
            if len(addresses) == 1:
                shared["gateway"]["plane_addresses"][plane] = addresses[0]
            else:
                hosts = ",".join(addresses)
                shared["gateway"]["plane_addresses"][plane] = f"ipv4:{hosts}"
    configs: dict[tuple[str, int], dict[str, Any]] = {}
    for plane, count in counts.items():
        for replica in range(count):
            data = copy.deepcopy(shared)
            data[plane]["listen"] = listens[plane][replica]
            if replica > 0:
                for key in EXTRA_PORT_KEYS:
                    if data[plane].get(key):
                        data[plane][key] = _loopback_port()
                if data["runtime"].get("health_listen"):
                    data["runtime"]["health_listen"] = _loopback_port()
            if plane == "policy" and count > 1 and not data["policy"]["decision_log"]["writer_id"]:
                data["policy"]["decision_log"]["writer_id"] = f"r{replica}"
            if plane == "ai" and replica > 0:
                # Its own Triton model repository (a Triton per replica), the
                # models themselves from the shared registry.
                data["ai"]["models"]["dir"] = f"{data['ai']['models']['dir']}-r{replica}"
            configs[(plane, replica)] = data
    return configs


__all__ = [
    "DEFAULT_DATABASE_PREFIX",
    "DEFAULT_PG_ADMIN_DSN",
    "drop_databases",
    "ensure_database",
    "replica_configs",
    "shared_engines_config",
    "with_stream_replicas",
]
