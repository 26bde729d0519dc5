"""The server interceptor that checks bearer tokens and the projects they are bound to.

Every memsvc RPC (``/memsvc.v1.*``) needs the metadata ``authorization: Bearer
<token>`` with a token of the tokens file: without one the call ends with
UNAUTHENTICATED (``ERROR_REASON_UNAUTHENTICATED``). A token bound to projects may only
name those: any other ``project_id`` (``episode.project_id`` for RecordEpisode, and an
empty project filter of WatchLifecycle) ends with PERMISSION_DENIED
(``ERROR_REASON_PERMISSION_DENIED``). Health and reflection need no token.

The check runs inside the metrics interceptor, so refused calls are counted by their
code, and outside the error interceptor. Its cost per call is reading the call's
metadata, one SHA-256 of the token and one dict lookup (two with a bound token).

Streams are checked when they open, and again whenever the tokens change: a watch
whose token was removed ends with UNAUTHENTICATED, one whose token no longer covers
its project with PERMISSION_DENIED.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor
from grpc_status import rpc_status

from memsvc.api._errors import to_rpc_status
from memsvc.api._intercept import HandlerWrapper, Undecodable, abort
from memsvc.auth import Grant, TokenTable
from memsvc.domain._errors import PermissionDenied, Unauthenticated
from memsvc.v1 import (
    data_removal_pb2,
    episodic_pb2,
    graph_checkpoint_pb2,
    lifecycle_pb2,
    working_memory_pb2,
)

ProjectOf = Callable[[Any], str]
# (code, details, trailing metadata): what context.abort() takes.
Refusal = tuple[grpc.StatusCode, str, Any]


def _project_getter(request_type: Descriptor) -> ProjectOf | None:
    """How to read the project a request names, from its message type."""
    if "project_id" in request_type.fields_by_name:
        return lambda request: str(request.project_id)
    for field in request_type.fields:
        if field.message_type is not None and "project_id" in field.message_type.fields_by_name:
            name = field.name
            return lambda request: str(getattr(request, name).project_id)
    return None


def _project_getters() -> dict[str, ProjectOf | None]:
    getters: dict[str, ProjectOf | None] = {}
    for module in (
        working_memory_pb2,
        lifecycle_pb2,
        episodic_pb2,
        data_removal_pb2,
        graph_checkpoint_pb2,
    ):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                getters[f"/{service.full_name}/{method.name}"] = _project_getter(method.input_type)
    return getters


# Every memsvc method and how to read its request's project (None: it names none, so a
# token bound to projects may not call it; tests/integration/test_auth.py checks there
# is no such method).
PROJECT_OF: dict[str, ProjectOf | None] = _project_getters()


def _project(request: Any, project_of: ProjectOf | None) -> str:
    """The project ``request`` names; "" when none (or it could not be parsed)."""
    if project_of is None or isinstance(request, Undecodable):
        return ""
    return project_of(request)


def _refusal(error: Unauthenticated | PermissionDenied) -> Refusal:
    status = rpc_status.to_status(to_rpc_status(error))
    return status.code, status.details, status.trailing_metadata


_MISSING = _refusal(
    Unauthenticated(
        "this call needs a bearer token: send the metadata `authorization: Bearer <token>`"
    )
)
_MALFORMED = _refusal(Unauthenticated("the authorization metadata must be one `Bearer <token>`"))
_UNKNOWN = _refusal(Unauthenticated("the bearer token is not valid (unknown or revoked)"))
_UNAUTHENTICATED = {"missing": _MISSING, "malformed": _MALFORMED, "unknown": _UNKNOWN}


def _denied(project_id: str) -> Refusal:
    if not project_id:
        message = (
            "this token is bound to projects and the call names none: set project_id to"
            " one of them (a watch of every project is refused too)"
        )
    else:
        # Quoted in part: a request's project_id can be megabytes long, and status
        # details travel in trailers, which gRPC caps (16 KiB by default).
        project_id = project_id[:64]
        message = f"this token may not access project {project_id!r}"
    return _refusal(PermissionDenied(message, project_id))


class AuthInterceptor(HandlerWrapper):
    """Admits a memsvc call only with a valid bearer token that covers its project.

    ``tokens`` is read at each call; assign a new table with :meth:`replace_tokens`,
    which also ends the open streams the new table no longer admits.
    """

    def __init__(self, tokens: TokenTable) -> None:
        super().__init__()
        self.tokens = tokens
        # Open streams: their task, token digest and project, and why a revoked
        # one was cancelled.
        self._streams: dict[asyncio.Task[Any], tuple[bytes, str]] = {}
        self._revoked: dict[asyncio.Task[Any], Refusal] = {}

    def replace_tokens(self, tokens: TokenTable) -> int:
        """Put ``tokens`` in force; end the open streams it refuses. Returns how many."""
        self.tokens = tokens
        ended = 0
        for task, (token_digest, project_id) in list(self._streams.items()):
            grant = tokens.get(token_digest)
            if grant is None:
                self._revoked[task] = _UNKNOWN
            elif not grant.allows(project_id):
                self._revoked[task] = _denied(project_id)
            else:
                continue
            task.cancel()
            ended += 1
        return ended

    def _check(
        self, request: Any, context: grpc.aio.ServicerContext, project_of: ProjectOf | None
    ) -> Grant | Refusal:
        grant = self.tokens.authorize(context.invocation_metadata())
        if isinstance(grant, str):
            return _UNAUTHENTICATED[grant]
        if grant.projects is None:
            return grant
        if isinstance(request, Undecodable):
            # Refused, as its project cannot be read; saying so beats "name a project".
            return _refusal(
                PermissionDenied(
                    f"this token is bound to projects, and the request could not be parsed "
                    f"({request.problem}) to read its project_id",
                    "",
                )
            )
        project_id = _project(request, project_of)
        if project_id and project_id.lower() in grant.projects:
            return grant
        return _denied(project_id)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        project_of = PROJECT_OF.get(method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, project_of),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                self._generator(behavior, project_of)
                if inspect.isasyncgenfunction(behavior)
                else self._writer(behavior, project_of),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # memsvc has no client-streaming RPC; refuse rather than pass one unchecked.
        raise TypeError("AuthInterceptor wraps unary and server-streaming methods only")

    def _unary(
        self,
        behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]],
        project_of: ProjectOf | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        check = self._check

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            verdict = check(request, context, project_of)
            if not isinstance(verdict, Grant):
                await abort(context, *verdict)
            return await behavior(request, context)

        return unary

    def _open(self, grant: Grant, request: Any, project_of: ProjectOf | None) -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        self._streams[task] = (grant.digest, _project(request, project_of))
        return task

    def _close(self, task: asyncio.Task[Any]) -> None:
        self._streams.pop(task, None)
        self._revoked.pop(task, None)

    def _generator(
        self,
        behavior: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]],
        project_of: ProjectOf | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        check, revoked = self._check, self._revoked

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            verdict = check(request, context, project_of)
            if not isinstance(verdict, Grant):
                await abort(context, *verdict)
                return  # abort() raises; never reached
            task = self._open(verdict, request, project_of)
            try:
                async for response in behavior(request, context):
                    yield response
            except asyncio.CancelledError:
                refusal = revoked.get(task)
                if refusal is None:
                    raise
                await abort(context, *refusal)
            finally:
                self._close(task)

        return stream

    def _writer(
        self,
        behavior: Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]],
        project_of: ProjectOf | None,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        check, revoked = self._check, self._revoked

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> None:
            verdict = check(request, context, project_of)
            if not isinstance(verdict, Grant):
                await abort(context, *verdict)
                return  # abort() raises; never reached
            task = self._open(verdict, request, project_of)
            try:
                await behavior(request, context)
            except asyncio.CancelledError:
                refusal = revoked.get(task)
                if refusal is None:
                    raise
                await abort(context, *refusal)
            finally:
                self._close(task)

        return stream
