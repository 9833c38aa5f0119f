"""Clients for the supervisor's gRPC API: ``Client`` (asyncio) and ``SyncClient`` (blocking).

    async with Client() as client:                        with SyncClient() as client:
        result = await client.call("text.wordcount",          result = client.call("text.wordcount",
                                   {"text": "a b"})                                {"text": "a b"})
        async for event in client.execute(...): ...           for event in client.execute(...): ...

Deadlines
    Every RPC has one: ``timeout=`` on the call, else the client's ``default_timeout`` (ListTools, Cancel)
    or ``execute_timeout`` (Execute; ``None`` by default, so the tool's own timeout applies). The deadline
    covers retries. A deadline shorter than the tool's timeout wins at the supervisor: the sandbox is
    killed early enough for the ``timeout`` result to arrive.
Retries
    Only on ``UNAVAILABLE``, with capped exponential backoff and full jitter, inside the deadline.
    ListTools and Cancel are always safe to retry. Execute is retried only before the supervisor sent
    any event for it, and only when re-running the tool is known to change nothing: ``idempotent=True``
    from the caller, or the supervisor lists the tool as read-only or idempotent (``safe_to_retry``).
    A tool that is not known to be idempotent is never re-run silently: the caller gets
    ``UnavailableError`` and decides.
MCP tools
    A tool from a stock MCP server streams ``Progress`` events (its notifications/progress) and ends with
    a ``Result`` whose ``content`` holds its content blocks as MCP-shaped dicts and ``is_error`` its
    ``isError``; the content is parsed with a size bound, and what is unreadable becomes a text block
    saying so. Plain tools: ``content`` is empty and ``output`` is stdout, as before.
Errors
    Every gRPC status becomes one ``ClientError`` subclass, from one table (``STATUS_ERRORS``).
Tracing
    Each RPC runs under a CLIENT span (OpenTelemetry API only) whose context is injected as W3C
    ``traceparent`` into the gRPC metadata, so the supervisor's spans are children of the caller's span.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import time
from collections.abc import AsyncGenerator, Generator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry import propagate, trace

from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.api.v1 import supervisor_pb2_grpc as pb_grpc
from toolcell.errors import ToolcellError
from toolcell.model import Event, Result, Started, Tool
from toolcell.policy.annotations import safe_to_retry
from toolcell.server.convert import event_from_pb, result_from_pb, tool_from_pb
from toolcell.settings import default_target

tracer = trace.get_tracer("toolcell.client")
_SERVICE = "toolcell.v1.Supervisor"


# ---------------------------------------------------------------------------------------------- errors

class ClientError(ToolcellError):
    """An RPC failed. ``code`` is the gRPC status name (``"NOT_FOUND"``), ``details`` the server's message.

        ClientError                     any other status (UNIMPLEMENTED, DATA_LOSS, ...)
        ├── NotFoundError               NOT_FOUND: unknown tool, or no such running invocation
        ├── InvalidArgumentError        INVALID_ARGUMENT: arguments break the tool's schema (names the field)
        ├── AlreadyExistsError          ALREADY_EXISTS: invocation id in use
        ├── PermissionDeniedError       PERMISSION_DENIED
        ├── UnauthenticatedError        UNAUTHENTICATED
        ├── FailedPreconditionError     FAILED_PRECONDITION: image or OCI runtime missing
        ├── ResourceExhaustedError      RESOURCE_EXHAUSTED: rate or capacity limit
        ├── UnavailableError            UNAVAILABLE: supervisor or engine unreachable, or shutting down
        ├── DeadlineExceededError       DEADLINE_EXCEEDED
        ├── RpcCancelledError           CANCELLED
        └── InternalError               INTERNAL, UNKNOWN
    """

    def __init__(self, code: str, details: str, trailers: Mapping[str, str] | None = None) -> None:
        self.code = code
        self.details = details
        self.trailers = dict(trailers or {})
        super().__init__(f"{code}: {details}")

    @property
    def retry_after_ms(self) -> int | None:
        """The server's retry hint (trailing metadata ``retry-after-ms``) on RESOURCE_EXHAUSTED, if any."""
        value = self.trailers.get("retry-after-ms")
        return int(value) if value and value.isdigit() else None


class NotFoundError(ClientError):
    pass


class InvalidArgumentError(ClientError):
    pass


class AlreadyExistsError(ClientError):
    pass


class PermissionDeniedError(ClientError):
    pass


class UnauthenticatedError(ClientError):
    pass


class FailedPreconditionError(ClientError):
    pass


class ResourceExhaustedError(ClientError):
    pass


class UnavailableError(ClientError):
    pass


class DeadlineExceededError(ClientError):
    pass


class RpcCancelledError(ClientError):
    pass


class InternalError(ClientError):
    pass


# The one table from gRPC status codes to client exceptions; anything not listed is a plain ClientError.
STATUS_ERRORS: Mapping[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: RpcCancelledError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
}


def error_from_status(code: grpc.StatusCode, details: str | None,
                      trailers: Mapping[str, str] | None = None) -> ClientError:
    return STATUS_ERRORS.get(code, ClientError)(code.name, details or "", trailers)


def _translate(exc: grpc.RpcError) -> ClientError:
    """grpc.aio.AioRpcError and the sync client's errors both carry code(), details(), trailing_metadata()."""
    trailers = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    return error_from_status(exc.code(), exc.details(), trailers)


# ---------------------------------------------------------------------------------------------- credentials

@dataclass(frozen=True)
class ClientTls:
    """TLS to a TCP listener: the CA that signed the server's certificate; cert/key for mTLS."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # override the name checked against the server's certificate

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


# ---------------------------------------------------------------------------------------------- retries

@dataclass(frozen=True)
class RetryPolicy:
    """Retries on UNAVAILABLE: capped exponential backoff with full jitter. ``max_attempts=1``: never."""

    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff(self, retry: int) -> float:
        """Delay before retry number ``retry`` (0-based): uniform in [0, min(cap, initial * multiplier**retry)]."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** retry)
        return _jitter.uniform(0.0, cap)


NO_RETRY = RetryPolicy(max_attempts=1)
_jitter = random.SystemRandom()


class _Budget:
    """One call's deadline and attempts, shared by every retry of it."""

    def __init__(self, timeout: float | None, policy: RetryPolicy) -> None:
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.policy = policy
        self.attempts = 0

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def retry_delay(self, error: ClientError) -> float | None:
        """Seconds to wait before retrying after ``error``, or None to give up."""
        if not isinstance(error, UnavailableError) or self.attempts >= self.policy.max_attempts:
            return None
        delay = self.policy.backoff(self.attempts - 1)
        remaining = self.remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay


Files = Mapping[str, bytes | str]
# A result may carry output files beside the output streams: the supervisor's server.max_message_bytes is
# the real bound (4 MiB by default, raised by admins with large workspaces); the client accepts up to this.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def _request(tool: str, arguments: Mapping[str, Any] | str | None, invocation_id: str,
             caller_metadata: Mapping[str, str] | None, session_id: str = "",
             files: Files | None = None) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(tool=tool, arguments_json=_arguments_json(arguments), invocation_id=invocation_id,
                             caller_metadata=dict(caller_metadata or {}), session_id=session_id,
                             files=[pb.File(path=path, content=data.encode() if isinstance(data, str) else data)
                                    for path, data in (files or {}).items()])


@dataclass(frozen=True)
class SessionInfo:
    """An open session (``Client.open_session``): name it in ``execute``/``call`` as ``session=``."""

    session_id: str
    tool: str
    idle_ttl_s: float
    max_lifetime_s: float
    max_calls: int
    sandbox_id: str
    tools: tuple[str, ...] = ()  # the tools it serves (a stock MCP server's share one)


def _session_info(msg: pb.Session) -> SessionInfo:
    return SessionInfo(session_id=msg.session_id, tool=msg.tool, idle_ttl_s=msg.idle_ttl_seconds,
                       max_lifetime_s=msg.max_lifetime_seconds, max_calls=msg.max_calls, sandbox_id=msg.sandbox_id,
                       tools=tuple(msg.tools))


def _called(span: trace.Span, msg: pb.Result) -> Result:
    result = result_from_pb(msg)
    span.set_attribute("toolcell.invocation_id", result.invocation_id)
    return result


async def _last_result(events: AsyncGenerator[Event, None]) -> Result:
    try:
        async for event in events:
            if isinstance(event, Result):
                return event
    finally:
        await events.aclose()
    raise InternalError("INTERNAL", "stream ended without a result")


def _last_result_of(events: Generator[Event, None, None]) -> Result:
    try:
        for event in events:
            if isinstance(event, Result):
                return event
    finally:
        events.close()
    raise InternalError("INTERNAL", "stream ended without a result")


def _arguments_json(arguments: Mapping[str, Any] | str | None) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(dict(arguments), separators=(",", ":"))


def _span(method: str, **attributes: str) -> trace.Span:
    return tracer.start_span(f"{_SERVICE}/{method}", kind=trace.SpanKind.CLIENT, attributes={
        "rpc.system": "grpc", "rpc.service": _SERVICE, "rpc.method": method, **attributes})


def _metadata(span: trace.Span, token: str | None = None) -> tuple[tuple[str, str], ...]:
    """W3C trace context of ``span`` (a child of whatever span is current in the caller); the bearer token."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    if token:
        carrier["authorization"] = f"Bearer {token}"
    return tuple(carrier.items())


def _end(span: trace.Span, error: ClientError | None) -> None:
    if error is not None:
        span.set_attribute("rpc.grpc.status_code", error.code)
        span.set_status(trace.Status(trace.StatusCode.ERROR, error.code))
    span.end()


# ---------------------------------------------------------------------------------------------- asyncio

class Client:
    """Asyncio client. One gRPC channel; safe to share between tasks; close it (or use ``async with``)."""

    def __init__(self, target: str | None = None, *, default_timeout: float | None = 30.0,
                 execute_timeout: float | None = None, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, tls: ClientTls | None = None) -> None:
        self.target = target or default_target()
        self.default_timeout = default_timeout
        self.execute_timeout = execute_timeout
        self.retry = retry
        self.token = token
        self._channel = grpc.aio.secure_channel(self.target, tls.credentials(),
                                                options=tls.options() + CHANNEL_OPTIONS) \
            if tls is not None else grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SupervisorStub(self._channel)  # type: ignore[no-untyped-call]
        self._annotations: dict[str, Mapping[str, Any]] | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def with_token(self, token: str | None) -> Client:
        """This client's channel with another caller's bearer token (a bridge acting for its callers).

        The channel is shared: close the original, not the copies.
        """
        other = copy.copy(self)
        other.token = token
        other._annotations = None  # what one caller may see is not another's
        return other

    async def execute(self, tool: str, arguments: Mapping[str, Any] | str | None = None, *,
                      invocation_id: str = "", timeout: float | None = None, idempotent: bool | None = None,
                      caller_metadata: Mapping[str, str] | None = None, session: str = "",
                      files: Files | None = None) -> AsyncGenerator[Event, None]:
        """Run ``tool``; yield ``Started``, output chunks (for a tool from an MCP server: ``Progress``) as
        they happen, and the final ``Result``.

        ``arguments``: a mapping, or the JSON text of one. Closing the iterator early (or cancelling the
        task) cancels the RPC, and the supervisor removes the sandbox. ``session``: run in this open session
        (never retried: a session keeps state); ``files``: input files for the tool's workspace (path -> bytes).
        """
        request = _request(tool, arguments, invocation_id, caller_metadata, session, files)
        idempotent = False if session else idempotent
        budget = _Budget(timeout if timeout is not None else self.execute_timeout, self.retry)
        span = _span("Execute", **{"toolcell.tool": tool})
        error: ClientError | None = None
        try:
            while True:
                budget.attempts += 1
                got_event = False
                call = self._stub.Execute(request, timeout=budget.remaining(), metadata=_metadata(span, self.token))
                try:
                    async for msg in call:
                        got_event = True
                        event = event_from_pb(msg)
                        if isinstance(event, Started):
                            span.set_attribute("toolcell.invocation_id", event.invocation_id)
                        yield event
                    return
                except grpc.aio.AioRpcError as exc:
                    error = _translate(exc)
                finally:
                    call.cancel()
                delay = None if got_event else budget.retry_delay(error)
                if delay is None or not await self._safe_to_rerun(tool, idempotent):
                    raise error
                span.add_event("retry", {"attempt": budget.attempts + 1, "status": error.code})
                await asyncio.sleep(delay)
                error = None
        finally:
            _end(span, error)

    async def call(self, tool: str, arguments: Mapping[str, Any] | str | None = None, *,
                   invocation_id: str = "", timeout: float | None = None, idempotent: bool | None = None,
                   session: str = "", files: Files | None = None) -> Result:
        """Run ``tool`` and return only its final ``Result`` (output is in ``result.output``; a tool from an
        MCP server also has its content blocks in ``result.content`` and its ``isError`` in ``result.is_error``).

        One unary ``Call`` RPC (nothing streams, so nothing extra is written or read on the way); a
        supervisor without ``Call`` is asked with ``Execute`` instead. Retried on UNAVAILABLE only when
        re-running the tool is known to be harmless: a unary call gives no sign of whether it started.
        ``session`` and ``files``: as for ``execute``.
        """
        request = _request(tool, arguments, invocation_id, None, session, files)
        idempotent = False if session else idempotent
        budget = _Budget(timeout if timeout is not None else self.execute_timeout, self.retry)
        span = _span("Call", **{"toolcell.tool": tool})
        error: ClientError | None = None
        try:
            while True:
                budget.attempts += 1
                try:
                    msg = await self._stub.Call(request, timeout=budget.remaining(),
                                                metadata=_metadata(span, self.token))
                    return _called(span, msg)
                except grpc.aio.AioRpcError as exc:
                    error = _translate(exc)
                if error.code == "UNIMPLEMENTED":  # an older supervisor: the same call, streamed
                    error = None
                    return await _last_result(self.execute(tool, arguments, invocation_id=invocation_id,
                                                           timeout=budget.remaining(), idempotent=idempotent,
                                                           session=session, files=files))
                delay = budget.retry_delay(error)
                if delay is None or not await self._safe_to_rerun(tool, idempotent):
                    raise error
                span.add_event("retry", {"attempt": budget.attempts + 1, "status": error.code})
                await asyncio.sleep(delay)
                error = None
        finally:
            _end(span, error)

    async def list_tools(self, *, timeout: float | None = None) -> list[Tool]:
        """The tools this caller may use, with their MCP annotations (derived from the profile)."""
        resp = await self._unary("ListTools", self._stub.ListTools, pb.ListToolsRequest(), timeout)
        tools = [tool_from_pb(t) for t in resp.tools]
        self._annotations = {t.name: t.annotations for t in tools}
        return tools

    async def cancel(self, invocation_id: str, *, timeout: float | None = None) -> bool:
        """Kill a running invocation's sandbox; its Execute stream ends with status ``killed``."""
        resp = await self._unary("Cancel", self._stub.Cancel, pb.CancelRequest(invocation_id=invocation_id), timeout)
        return bool(resp.cancelled)

    async def open_session(self, tool: str, *, timeout: float | None = None) -> SessionInfo:
        """Open a session of ``tool`` (one sandbox kept for this caller's calls that name it). Not retried:
        a retry could leave the first attempt's session open."""
        span = _span("OpenSession", **{"toolcell.tool": tool})
        error: ClientError | None = None
        try:
            msg = await self._stub.OpenSession(pb.OpenSessionRequest(tool=tool),
                                               timeout=timeout if timeout is not None else self.default_timeout,
                                               metadata=_metadata(span, self.token))
            return _session_info(msg)
        except grpc.aio.AioRpcError as exc:
            error = _translate(exc)
            raise error from None
        finally:
            _end(span, error)

    async def close_session(self, session_id: str, *, timeout: float | None = None) -> int:
        """Close one of this caller's sessions (its sandbox is removed); returns the calls it served."""
        resp = await self._unary("CloseSession", self._stub.CloseSession,
                                 pb.CloseSessionRequest(session_id=session_id), timeout)
        return int(resp.calls)

    async def _unary(self, method: str, rpc: Any, request: Any, timeout: float | None) -> Any:
        budget = _Budget(timeout if timeout is not None else self.default_timeout, self.retry)
        span = _span(method)
        error: ClientError | None = None
        try:
            while True:
                budget.attempts += 1
                try:
                    return await rpc(request, timeout=budget.remaining(), metadata=_metadata(span, self.token))
                except grpc.aio.AioRpcError as exc:
                    error = _translate(exc)
                delay = budget.retry_delay(error)
                if delay is None:
                    raise error
                span.add_event("retry", {"attempt": budget.attempts + 1, "status": error.code})
                await asyncio.sleep(delay)
                error = None
        finally:
            _end(span, error)

    async def _safe_to_rerun(self, tool: str, idempotent: bool | None) -> bool:
        if idempotent is not None:
            return idempotent
        if self._annotations is None or tool not in self._annotations:
            try:
                await self.list_tools(timeout=self.default_timeout)
            except ClientError:
                return False
        return safe_to_retry((self._annotations or {}).get(tool, {}))


# ---------------------------------------------------------------------------------------------- blocking

class SyncClient:
    """Blocking client with the same API and semantics as ``Client`` (thread-safe; ``cancel`` may be
    called from another thread while ``execute`` is being iterated)."""

    def __init__(self, target: str | None = None, *, default_timeout: float | None = 30.0,
                 execute_timeout: float | None = None, retry: RetryPolicy = RetryPolicy(),
                 token: str | None = None, tls: ClientTls | None = None) -> None:
        self.target = target or default_target()
        self.default_timeout = default_timeout
        self.execute_timeout = execute_timeout
        self.retry = retry
        self.token = token
        self._channel = grpc.secure_channel(self.target, tls.credentials(), options=tls.options() + CHANNEL_OPTIONS) \
            if tls is not None else grpc.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.SupervisorStub(self._channel)  # type: ignore[no-untyped-call]
        self._annotations: dict[str, Mapping[str, Any]] | None = None

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def execute(self, tool: str, arguments: Mapping[str, Any] | str | None = None, *,
                invocation_id: str = "", timeout: float | None = None, idempotent: bool | None = None,
                caller_metadata: Mapping[str, str] | None = None, session: str = "",
                files: Files | None = None) -> Generator[Event, None, None]:
        """See ``Client.execute``."""
        request = _request(tool, arguments, invocation_id, caller_metadata, session, files)
        idempotent = False if session else idempotent
        budget = _Budget(timeout if timeout is not None else self.execute_timeout, self.retry)
        span = _span("Execute", **{"toolcell.tool": tool})
        error: ClientError | None = None
        try:
            while True:
                budget.attempts += 1
                got_event = False
                call = self._stub.Execute(request, timeout=budget.remaining(), metadata=_metadata(span, self.token))
                try:
                    for msg in call:
                        got_event = True
                        event = event_from_pb(msg)
                        if isinstance(event, Started):
                            span.set_attribute("toolcell.invocation_id", event.invocation_id)
                        yield event
                    return
                except grpc.RpcError as exc:
                    error = _translate(exc)
                finally:
                    call.cancel()
                delay = None if got_event else budget.retry_delay(error)
                if delay is None or not self._safe_to_rerun(tool, idempotent):
                    raise error
                span.add_event("retry", {"attempt": budget.attempts + 1, "status": error.code})
                time.sleep(delay)
                error = None
        finally:
            _end(span, error)

    def call(self, tool: str, arguments: Mapping[str, Any] | str | None = None, *,
             invocation_id: str = "", timeout: float | None = None, idempotent: bool | None = None,
             session: str = "", files: Files | None = None) -> Result:
        """See ``Client.call``."""
        request = _request(tool, arguments, invocation_id, None, session, files)
        idempotent = False if session else idempotent
        budget = _Budget(timeout if timeout is not None else self.execute_timeout, self.retry)
        span = _span("Call", **{"toolcell.tool": tool})
        error: ClientError | None = None
        try:
            while True:
                budget.attempts += 1
                try:
                    msg = self._stub.Call(request, timeout=budget.remaining(), metadata=_metadata(span, self.token))
                    return _called(span, msg)
                except grpc.RpcError as exc:
                    error = _translate(exc)
                if error.code == "UNIMPLEMENTED":  # an older supervisor: the same call, streamed
                    error = None
                    return _last_result_of(self.execute(tool, arguments, invocation_id=invocation_id,
                                                        timeout=budget.remaining(), idempotent=idempotent,
                                                        session=session, files=files))
                delay = budget.retry_delay(error)
                if delay is None or not self._safe_to_rerun(tool, idempotent):
                    raise error
                span.add_event("retry", {"attempt": budget.attempts + 1, "status": error.code})
                time.sleep(delay)
                error = None
        finally:
            _end(span, error)

    def list_tools(self, *, timeout: float | None = None) -> list[Tool]:
        """See ``Client.list_tools``."""
        resp = self._unary("ListTools", self._stub.ListTools, pb.ListToolsRequest(), timeout)
        tools = [tool_from_pb(t) for t in resp.tools]
        self._annotations = {t.name: t.annotations for t in tools}
        return tools

    def cancel(self, invocation_id: str, *, timeout: float | None = None) -> bool:
        """See ``Client.cancel``."""
        resp = self._unary("Cancel", self._stub.Cancel, pb.CancelRequest(invocation_id=invocation_id), timeout)
        return bool(resp.cancelled)

    def open_session(self, tool: str, *, timeout: float | None = None) -> SessionInfo:
        """See ``Client.open_session``."""
        span = _span("OpenSession", **{"toolcell.tool": tool})
        error: ClientError | None = None
        try:
            msg = self._stub.OpenSession(pb.OpenSessionRequest(tool=tool),
                                         timeout=timeout if timeout is not None else self.default_timeout,
                                         metadata=_metadata(span, self.token))
            return _session_info(msg)
        except grpc.RpcError as exc:
            error = _translate(exc)
            raise error from None
        finally:
            _end(span, error)

    def close_session(self, session_id: str, *, timeout: float | None = None) -> int:
        """See ``Client.close_session``."""
        resp = self._unary("CloseSession", self._stub.CloseSession, pb.CloseSessionRequest(session_id=session_id),
                           timeout)
        return int(resp.calls)

    def _unary(self, method: str, rpc: Any, request: Any, timeout: float | None) -> Any:
        budget = _Budget(timeout if timeout is not None else self.default_timeout, self.retry)
        span = _span(method)
        error: ClientError | None = None
        try:
            while True:
                budget.attempts += 1
                try:
                    return rpc(request, timeout=budget.remaining(), metadata=_metadata(span, self.token))
                except grpc.RpcError as exc:
                    error = _translate(exc)
                delay = budget.retry_delay(error)
                if delay is None:
                    raise error
                span.add_event("retry", {"attempt": budget.attempts + 1, "status": error.code})
                time.sleep(delay)
                error = None
        finally:
            _end(span, error)

    def _safe_to_rerun(self, tool: str, idempotent: bool | None) -> bool:
        if idempotent is not None:
            return idempotent
        if self._annotations is None or tool not in self._annotations:
            try:
                self.list_tools(timeout=self.default_timeout)
            except ClientError:
                return False
        return safe_to_retry((self._annotations or {}).get(tool, {}))
