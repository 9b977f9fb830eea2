"""The shape every Triplane server interceptor shares: wrap each unary-unary
method's behavior, once per method, and hand gRPC the same wrapped handler on
every call after (so interceptors outside it see a stable handler too)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Unary = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class UnaryWrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        # method -> (the handler wrapped, its wrapper): rebuilt only if the
        # continuation ever hands back another handler for the method.
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def wraps(self, method: str) -> bool:
        """Whether this interceptor wraps `method` at all."""
        return True

    def wrap(self, method: str, behavior: Unary) -> Unary:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or not self.wraps(method):
            return handler
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = grpc.unary_unary_rpc_method_handler(
            self.wrap(method, handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        self._handlers[method] = (handler, wrapped)
        return wrapped
