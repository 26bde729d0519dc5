"""The shape every memsvc server interceptor shares: wrap each method's handler once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar

import grpc

# memsvc's own services; health and reflection are left as they are where it matters.
OWN_METHOD_PREFIX = "/memsvc."


class HandlerWrapper(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps a method's handler the first time it is called and reuses the wrapper:
    the lookup depends on the method alone, so each call costs one dict lookup.

    Subclasses implement :meth:`_wrap`; with ``own_only`` the other services'
    handlers pass through untouched.
    """

    own_only: ClassVar[bool] = True

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or (self.own_only and not method.startswith(OWN_METHOD_PREFIX)):
            return handler
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError
