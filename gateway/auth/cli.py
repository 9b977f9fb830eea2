"""`triplane keys create|list|rotate|revoke`: a platform's API keys, through
the gateway's ApiKeyService.

The command calls as an admin: with the admin certificate when TLS is on
(`<state_dir>/tls/admin.crt` in the dev stack), and with the bootstrap admin
key when there is one (gateway.auth.admin_key_file, or the dev stack's
`<state_dir>/keys/gateway-admin.key`); `--api-key` (or $TRIPLANE_API_KEY)
uses a tenant's own key holding `keys:admin` instead. A new key's secret is
printed once: store it now, the gateway cannot show it again."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
from typing import Any

import grpc

from gateway.auth import secrets
from gateway.auth.scopes import ALL_SCOPES
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.runtime import codec
from triplane.runtime.clock import SystemClock
from triplane.runtime.config import Config, load_config
from triplane.runtime.net import dial_address
from triplane.runtime.status import error_details
from triplane.runtime.tls import channel_for

API_KEY_ENV = "TRIPLANE_API_KEY"
TIMEOUT_S = 10.0


def _credential(args: argparse.Namespace, config: Config) -> str:
    """The key to call with: --api-key, $TRIPLANE_API_KEY, else the bootstrap
    admin key when there is one, else none (the admin certificate alone)."""
    explicit = args.api_key or os.environ.get(API_KEY_ENV, "")
    if explicit:
        return str(explicit)
    return secrets.load_admin_key(config.gateway.auth, config.state_path) or ""


def _when(stamp: Any) -> str:
    us = codec.micros(stamp, "time")
    if not us:
        return "-"
    return dt.datetime.fromtimestamp(us / 1e6, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _describe(key: gw.ApiKey) -> str:
    state = "revoked" if key.HasField("revoked_at") else "active"
    if key.rotated_to_key_id:
        state = f"rotated to {key.rotated_to_key_id}, works until {_when(key.retires_at)}"
    return (
        f"{key.key_id}  {key.redacted_key}...  tenant {key.tenant_id}  "
        f"scopes {' '.join(key.scopes)}  created {_when(key.created_at)}  "
        f"expires {_when(key.expires_at)}  {state}"
        + (f"  name {key.display_name!r}" if key.display_name else "")
    )


def _expires_at(args: argparse.Namespace) -> Any:
    if not args.expires_in_s:
        return None
    return codec.timestamp(SystemClock().now_us() + int(args.expires_in_s * 1_000_000))


async def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    address = args.address or dial_address(config.gateway.listen)
    key = _credential(args, config)
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    async with channel_for(config, address) as channel:
        stub = gateway_pb2_grpc.ApiKeyServiceStub(channel)
        try:
            return int(await args.action(stub, args, metadata))
        except grpc.aio.AioRpcError as err:
            details = error_details(err)
            extra = f" (scope {details.metadata['scope']})" if "scope" in details.metadata else ""
            print(
                f"{err.code().name} {details.reason or '-'} {details.field or '-'}: "
                f"{err.details()}{extra}",
                file=sys.stderr,
            )
            return 1


async def _create(stub: Any, args: argparse.Namespace, metadata: Any) -> int:
    answer: gw.CreateApiKeyResponse = await stub.CreateApiKey(
        gw.CreateApiKeyRequest(
            tenant_id=args.tenant,
            idempotency_key=args.idempotency_key or os.urandom(16).hex(),
            scopes=args.scope,
            display_name=args.name,
            expires_at=_expires_at(args),
        ),
        metadata=metadata,
        timeout=TIMEOUT_S,
    )
    print(_describe(answer.api_key))
    if answer.secret:
        print(f"secret (shown once, store it now): {answer.secret}")
    else:
        print("replayed: this idempotency key made the key before; its secret is not shown again")
    return 0


async def _list(stub: Any, args: argparse.Namespace, metadata: Any) -> int:
    token = ""
    while True:
        page: gw.ListApiKeysResponse = await stub.ListApiKeys(
            gw.ListApiKeysRequest(
                tenant_id=args.tenant, page_token=token, include_revoked=args.include_revoked
            ),
            metadata=metadata,
            timeout=TIMEOUT_S,
        )
        for key in page.api_keys:
            print(_describe(key))
        token = page.next_page_token
        if not token:
            return 0


async def _rotate(stub: Any, args: argparse.Namespace, metadata: Any) -> int:
    answer: gw.RotateApiKeyResponse = await stub.RotateApiKey(
        gw.RotateApiKeyRequest(
            tenant_id=args.tenant,
            idempotency_key=args.idempotency_key or os.urandom(16).hex(),
            key_id=args.key_id,
            overlap_s=args.overlap_s,
            expires_at=_expires_at(args),
        ),
        metadata=metadata,
        timeout=TIMEOUT_S,
    )
    print(f"old  {_describe(answer.rotated)}")
    print(f"new  {_describe(answer.api_key)}")
    if answer.secret:
        print(f"secret (shown once, store it now): {answer.secret}")
    return 0


async def _revoke(stub: Any, args: argparse.Namespace, metadata: Any) -> int:
    answer: gw.RevokeApiKeyResponse = await stub.RevokeApiKey(
        gw.RevokeApiKeyRequest(tenant_id=args.tenant, key_id=args.key_id),
        metadata=metadata,
        timeout=TIMEOUT_S,
    )
    print(_describe(answer.api_key))
    return 0


def _cmd(args: argparse.Namespace) -> int:
    return asyncio.run(_run(args))


def register_keys(subparsers: Any) -> None:
    """Adds `keys create|list|rotate|revoke`."""
    keys = subparsers.add_parser("keys", help="partner API keys (the gateway's ApiKeyService)")
    commands = keys.add_subparsers(dest="keys_command", required=True)

    def command(name: str, help_text: str, action: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help_text)
        parser.add_argument("--tenant", required=True, help="tenant id")
        parser.add_argument("--address", default="", help="host:port (default: gateway.listen)")
        parser.add_argument(
            "--api-key",
            default="",
            help=f"call with this key (default: ${API_KEY_ENV}, else admin)",
        )
        parser.set_defaults(func=_cmd, action=action)
        return parser

    create = command("create", "make a key (its secret is printed once)", _create)
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=sorted(ALL_SCOPES),
        help="a scope the key holds (repeat the flag for several)",
    )
    create.add_argument("--name", default="", help="a label for the key")
    create.add_argument("--expires-in-s", type=float, default=0, help="0: never expires")
    create.add_argument("--idempotency-key", default="", help="default: a new one")
    listing = command("list", "a tenant's keys (no secrets)", _list)
    listing.add_argument("--include-revoked", action="store_true")
    rotate = command("rotate", "replace a key; the old one works for the overlap", _rotate)
    rotate.add_argument("key_id")
    rotate.add_argument(
        "--overlap-s", type=int, default=0, help="0: gateway.auth.rotation_overlap_s"
    )
    rotate.add_argument("--expires-in-s", type=float, default=0, help="the new key's; 0: never")
    rotate.add_argument("--idempotency-key", default="", help="default: a new one")
    revoke = command(
        "revoke", "stop a key (every replica within gateway.auth.cache_ttl_s)", _revoke
    )
    revoke.add_argument("key_id")
