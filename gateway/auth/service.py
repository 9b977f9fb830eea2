"""The thin ApiKeyService servicer: protobuf in, the key admin called with
the verified caller, protobuf out (errors mapped by the runtime's
interceptor)."""

from __future__ import annotations

import grpc

from gateway import codec
from gateway.auth.admin import ApiKeyAdmin, MadeKey
from gateway.auth.principal import Principal, current_principal
from triplane.gateway.v1 import gateway_pb2 as gw
from triplane.gateway.v1 import gateway_pb2_grpc
from triplane.runtime import codec as wire
from triplane.runtime.server import Service


def _caller() -> Principal:
    caller = current_principal()
    # The credential interceptor runs before every ApiKeyService method.
    assert caller is not None, "ApiKeyService served without the credential interceptor"
    return caller


def _made(made: MadeKey) -> tuple[gw.ApiKey, str, bool]:
    return codec.api_key(made.record), made.secret, made.replayed


class ApiKeyServicer(gateway_pb2_grpc.ApiKeyServiceServicer):
    def __init__(self, admin: ApiKeyAdmin) -> None:
        self._admin = admin

    async def CreateApiKey(
        self, request: gw.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> gw.CreateApiKeyResponse:
        made = await self._admin.create(
            _caller(),
            request.tenant_id,
            request.idempotency_key,
            list(request.scopes),
            request.display_name,
            wire.micros(request.expires_at, "expires_at"),
        )
        key, secret, replayed = _made(made)
        return gw.CreateApiKeyResponse(
            api_key=key, secret=secret, replayed=replayed, idempotency_key=request.idempotency_key
        )

    async def ListApiKeys(
        self, request: gw.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> gw.ListApiKeysResponse:
        records, token = await self._admin.list(
            _caller(),
            request.tenant_id,
            request.page_size,
            request.page_token,
            request.include_revoked,
        )
        return gw.ListApiKeysResponse(
            api_keys=[codec.api_key(r) for r in records], next_page_token=token
        )

    async def RotateApiKey(
        self, request: gw.RotateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> gw.RotateApiKeyResponse:
        rotation = await self._admin.rotate(
            _caller(),
            request.tenant_id,
            request.idempotency_key,
            request.key_id,
            request.overlap_s,
            wire.micros(request.expires_at, "expires_at"),
        )
        key, secret, replayed = _made(rotation.new)
        return gw.RotateApiKeyResponse(
            api_key=key,
            secret=secret,
            rotated=codec.api_key(rotation.old),
            replayed=replayed,
            idempotency_key=request.idempotency_key,
        )

    async def RevokeApiKey(
        self, request: gw.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> gw.RevokeApiKeyResponse:
        record = await self._admin.revoke(_caller(), request.tenant_id, request.key_id)
        return gw.RevokeApiKeyResponse(api_key=codec.api_key(record))


def api_key_services(servicer: ApiKeyServicer) -> list[Service]:
    return [
        Service(
            gw.DESCRIPTOR.services_by_name["ApiKeyService"].full_name,
            lambda server: gateway_pb2_grpc.add_ApiKeyServiceServicer_to_server(servicer, server),
        )
    ]
