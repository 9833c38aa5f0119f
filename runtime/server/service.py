"""The Supervisor gRPC service: proto in, model through the supervisor, proto out."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from toolcell import metrics
from toolcell.api.v1 import supervisor_pb2 as pb
from toolcell.api.v1 import supervisor_pb2_grpc as pb_grpc
from toolcell.endings import Ending
from toolcell.errors import (
    InvalidArguments,
    InvocationNotFound,
    PermissionDenied,
    ResourceExhausted,
    SessionNotFound,
    ToolcellError,
)
from toolcell.gate import Gate
from toolcell.model import Event, InputFile, Result, Started
from toolcell.pipeline import Emit, describe
from toolcell.policy.access import Principal
from toolcell.policy.requests import check_cancel, check_request, check_session_id, check_tool_name
from toolcell.policy.scrub import Redactor
from toolcell.quoting import quote
from toolcell.server.convert import (
    STRUCT_INLINE_BYTES,
    arguments_text,
    check_arguments_fields,
    event_to_pb,
    request_from_pb,
    result_to_pb,
    tool_to_pb,
)
from toolcell.server.identity import Authenticator
from toolcell.server.status import RETRY_AFTER_KEY, status_for
from toolcell.sessions.registry import Session
from toolcell.supervisor import Supervisor, new_invocation_id

log = logging.getLogger("toolcell.server")
tracer = trace.get_tracer("toolcell.server")


@contextmanager
def caller_trace(context: grpc.aio.ServicerContext, name: str) -> Iterator[trace.Span]:
    """Continue the caller's W3C trace (traceparent in gRPC metadata) with a SERVER span."""
    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    token = otel_context.attach(propagate.extract(carrier))
    try:
        # No automatic exception recording: an abort carries the rejection message, which may quote
        # the caller's arguments; rejections are recorded as a status code instead.
        attributes = {"rpc.system": "grpc", "rpc.service": "toolcell.v1.Supervisor",
                      "rpc.method": name.rsplit("/", 1)[-1]}
        with tracer.start_as_current_span(name, kind=trace.SpanKind.SERVER, attributes=attributes,
                                          record_exception=False, set_status_on_exception=False) as span:
            yield span
    finally:
        otel_context.detach(token)


async def _abort(context: grpc.aio.ServicerContext, span: trace.Span, exc: ToolcellError, what: str,
                 redactor: Redactor) -> None:
    """One way out for every refusal: status from the table, retry hint in trailing metadata."""
    code = status_for(exc)
    metrics.record_rejection(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    log.info("%s rejected: %s (%s)", what, code.name, describe(exc, redactor),
             extra={"code": code.name, "error": type(exc).__name__})
    if isinstance(exc, ResourceExhausted):
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
    await context.abort(code, str(exc))


def _trace_id(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


@dataclasses.dataclass(frozen=True)
class Undecodable:
    """What a request that is not a valid protobuf message becomes: refused INVALID_ARGUMENT by the screen,
    charged to the peer (gRPC's own handling would answer UNKNOWN and log a traceback per request)."""

    message: str


def _lenient(parse: Callable[[bytes], Any], message: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(message)

    return deserialize


class _Capture:
    """Stands in for the server while the generated code registers its handlers, so we can adjust them."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        return

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = dict(handlers)


def add_to_server(servicer: SupervisorService, server: grpc.aio.Server) -> None:
    """The generated registration, with every request deserializer made lenient (``Undecodable``)."""
    capture = _Capture()
    pb_grpc.add_SupervisorServicer_to_server(servicer, capture)  # type: ignore[no-untyped-call]
    service = pb.DESCRIPTOR.services_by_name["Supervisor"]
    handlers = {
        name: handler._replace(request_deserializer=_lenient(
            handler.request_deserializer, service.methods_by_name[name].input_type.name))
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class SupervisorService(pb_grpc.SupervisorServicer):
    """Every RPC passes the same screen first (``_screen``), cheapest check first:

        peer's refusal budget -> caller strings bounded and well-formed -> authenticate -> (the RPC)

    A refusal anywhere is charged to the peer (``Gate.refused``), so refusals cost the caller, not
    the supervisor: a peer over its budget is turned away before its request is even looked at.
    """

    def __init__(self, supervisor: Supervisor, gate: Gate, authenticator: Authenticator) -> None:
        self.supervisor = supervisor
        self.gate = gate
        self.auth = authenticator
        self._ends: set[asyncio.Future[None]] = set()

    async def _refuse(self, context: grpc.aio.ServicerContext, span: trace.Span, peer: str, exc: ToolcellError,
                      what: str) -> NoReturn:
        self.gate.refused(peer, exc)
        await _abort(context, span, exc, what, self.supervisor.redactor)
        raise exc  # unreachable: abort raises

    async def _screen(self, context: grpc.aio.ServicerContext, span: trace.Span, action: str, request: object,
                      check: Callable[[], object], tool: str = "") -> tuple[str, Principal]:
        """Refusal budget, edge checks, authentication; returns (peer, principal) or aborts the RPC."""
        peer = self.auth.peer_key(context)
        try:
            await self.gate.check_peer(peer)
        except ToolcellError as exc:
            await _abort(context, span, exc, action, self.supervisor.redactor)
            raise  # unreachable: abort raises
        try:
            if isinstance(request, Undecodable):
                raise InvalidArguments(f"not a valid {request.message} message", path="request")
            check()
        except ToolcellError as exc:
            await self._refuse(context, span, peer, exc, action)
        try:
            return peer, await self.auth.principal(context)
        except ToolcellError as exc:
            await self.gate.record(None, "decision", action=action, tool=tool, decision="deny",
                                   status="UNAUTHENTICATED", reason=str(exc), peer=peer, trace_id=_trace_id(span))
            await self._refuse(context, span, peer, exc, action)

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> None:
        async def emit(event: Event) -> None:
            await context.write(event_to_pb(event))

        with caller_trace(context, "toolcell.v1.Supervisor/Execute") as span:
            result = await self._invoke("Execute", request, context, span, emit)
            if result is not None:
                await context.write(event_to_pb(result))

    async def Call(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> pb.Result:
        async def emit(event: Event) -> None:  # nothing streams: the caller wants only the result
            return

        with caller_trace(context, "toolcell.v1.Supervisor/Call") as span:
            result = await self._invoke("Call", request, context, span, emit)
            return result_to_pb(result) if result is not None else pb.Result()

    async def _invoke(self, method: str, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext,
                      span: trace.Span, emit: Emit) -> Result | None:
        """Screen, authorize, admit, run, account. None: the call was refused (the RPC is aborted).

        Once an invocation has its id, whatever ends it (result, error, cancel, disconnect, deadline,
        shutdown, internal error) is accounted for once, in the ``finally`` below: audit record, metric,
        log line and span status (``Ending``).
        """
        remaining = context.time_remaining()
        deadline_s = time.monotonic() + remaining if remaining is not None else None
        undecodable = isinstance(request, Undecodable)
        message = pb.ExecuteRequest() if undecodable else request
        # A Struct's arguments become JSON text; a large one off the event loop (its size is the message's).
        struct_error: InvalidArguments | None = None
        try:
            arguments = await asyncio.to_thread(arguments_text, message) \
                if message.HasField("arguments") and message.arguments.ByteSize() > STRUCT_INLINE_BYTES \
                else arguments_text(message)
        except InvalidArguments as exc:
            arguments, struct_error = "", exc
        call = request_from_pb(message, deadline_s, arguments)

        def screen() -> None:
            check_arguments_fields(message)
            if struct_error is not None:
                raise struct_error
            check_request(call, self.supervisor.config.limits)

        peer, principal = await self._screen(context, span, "call", request, screen,
                                             "" if undecodable else request.tool)
        # From here on the caller's strings are bounded and of a small character set.
        ending: Ending | None = None

        async def emit_and_note(event: Event) -> None:
            if isinstance(event, Started) and ending is not None:
                ending.profile = event.profile
            await emit(event)

        try:
            await self.gate.authorize(principal, "call", call.tool, _trace_id(span))
            if call.session_id:  # the caller's own open session, or NOT_FOUND before anything is counted
                span.set_attribute("toolcell.session_id", call.session_id)
                try:
                    self.supervisor.sessions.get(principal.id, call.session_id)
                except SessionNotFound as exc:  # on record, and charged to the peer: ids are not for guessing
                    await self.gate.record(principal, "decision", action="call", tool=call.tool, decision="deny",
                                           status="NOT_FOUND", reason=str(exc), session_id=call.session_id,
                                           trace_id=_trace_id(span))
                    raise
            async with self.gate.admit(principal, call.tool, _trace_id(span), in_session=bool(call.session_id)):
                call = dataclasses.replace(call, invocation_id=call.invocation_id or new_invocation_id())
                ending = Ending(call.invocation_id, call.tool, self.supervisor.known_tool(call.tool))
                span.set_attribute("toolcell.invocation_id", call.invocation_id)
                try:
                    ending.result = await self.supervisor.execute(call, emit_and_note, owner=principal.id)
                except ToolcellError as exc:
                    ending.error = exc
                    raise
                except asyncio.CancelledError:
                    ending.cancelled = True
                    raise
                except Exception as exc:
                    ending.error = exc
                    log.exception("%s: internal error", method, extra={"invocation_id": ending.invocation_id})
                    raise ToolcellError(f"internal error (trace id {_trace_id(span)})") from exc
                finally:
                    await self._end(ending, principal, context, span, call.arguments_json, call.session_id,
                                    call.files)
        except ToolcellError as exc:
            await self._refuse(context, span, peer, exc, f"{method} {quote(call.tool)}")
        assert ending is not None  # nosec B101 - every other path raised
        return ending.result

    async def _end(self, ending: Ending, principal: Principal, context: grpc.aio.ServicerContext,
                   span: trace.Span, arguments_json: str, session_id: str = "",
                   input_files: Sequence[InputFile] = ()) -> None:
        """The one place an invocation's end is accounted: audit record, metric, log line, span status."""
        code = status_for(ending.error).name if isinstance(ending.error, ToolcellError) else ""
        ending.finish(closing=self.supervisor.closing, time_remaining=context.time_remaining(), code_name=code)
        if ending.result is None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, ending.kind))
        span.set_attribute("toolcell.ending", ending.kind)
        metrics.record_end(ending.metric_tool, ending.kind, ending.status, ending.duration_s,
                           ending.result.redactions if ending.result is not None else {}, bool(session_id))
        log.info("invocation finished", extra={
            "tool": ending.metric_tool, "invocation_id": ending.invocation_id, "ending": ending.kind,
            **({"session_id": session_id} if session_id else {}),
            "status": ending.status, "exit_code": ending.result.exit_code if ending.result is not None else None,
            "duration_ms": int(ending.duration_s * 1000)})
        # On disk before the caller sees the result; shielded: a cancelled call still leaves its record.
        record = asyncio.ensure_future(self.gate.invocation_end(
            principal, ending.tool, arguments_json, result=ending.result, status=ending.status,
            profile=ending.profile, duration_ms=int(ending.duration_s * 1000), trace_id=_trace_id(span),
            invocation_id=ending.invocation_id, ending=ending.kind, session_id=session_id,
            input_files=input_files))
        self._ends.add(record)
        record.add_done_callback(self._ends.discard)
        await asyncio.shield(record)  # cancelled again meanwhile: the record is still written (``flush``)

    async def flush(self) -> None:
        """Wait for end records still being written (shutdown: before the audit file is closed)."""
        if self._ends:
            await asyncio.wait(list(self._ends))

    async def ListTools(self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext
                        ) -> pb.ListToolsResponse:
        with caller_trace(context, "toolcell.v1.Supervisor/ListTools") as span:
            peer, principal = await self._screen(context, span, "list", request, lambda: None)
            tools = {t.name: t for t in self.supervisor.list_tools()}
            try:
                shown = await self.gate.visible(principal, tools)
            except ToolcellError as exc:
                await self._refuse(context, span, peer, exc, "ListTools")
            return pb.ListToolsResponse(tools=[tool_to_pb(tools[name]) for name in shown])

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
                     ) -> pb.CancelResponse:
        with caller_trace(context, "toolcell.v1.Supervisor/Cancel") as span:
            peer, principal = await self._screen(context, span, "cancel", request,
                                                 lambda: check_cancel(request.invocation_id))
            try:
                try:
                    await self.supervisor.cancel(request.invocation_id, owner=principal.id)
                except InvocationNotFound:
                    await self.gate.cancel_decision(principal, request.invocation_id, allowed=False)
                    raise
                await self.gate.cancel_decision(principal, request.invocation_id, allowed=True)
            except ToolcellError as exc:
                await self._refuse(context, span, peer, exc, "Cancel")
            return pb.CancelResponse(cancelled=True)

    # --- sessions (issue 18) ---------------------------------------------------------------------------

    async def OpenSession(self, request: pb.OpenSessionRequest, context: grpc.aio.ServicerContext) -> pb.Session:
        with caller_trace(context, "toolcell.v1.Supervisor/OpenSession") as span:
            peer, principal = await self._screen(context, span, "session", request,
                                                 lambda: check_tool_name(request.tool),
                                                 "" if isinstance(request, Undecodable) else request.tool)
            trace_id = _trace_id(span)
            try:
                await self.gate.authorize(principal, "call", request.tool, trace_id)
                release = await self.gate.session_slot(principal, request.tool, trace_id)
                try:
                    session = await self.supervisor.open_session(request.tool, principal.id, release=release,
                                                                 principal=principal)
                except BaseException:
                    release()
                    raise
                metrics.sessions_open.add(1)
                try:  # on record before the caller has the id; fail closed: no record, no session
                    await self.gate.record(principal, "session_open", session_id=session.id, tool=session.tool,
                                           profile=session.profile, sandbox_id=session.sandbox.id, trace_id=trace_id,
                                           idle_ttl_s=session.policy.idle_ttl_s,
                                           max_lifetime_s=session.policy.max_lifetime_s,
                                           max_calls=session.policy.max_calls)
                except BaseException:
                    await self.supervisor.sessions.end(session, "audit_failed")
                    raise
            except ToolcellError as exc:
                if not isinstance(exc, (PermissionDenied, ResourceExhausted)):  # those are on record already
                    await self.gate.record(principal, "decision", action="session", tool=request.tool,
                                           decision="refuse", status=status_for(exc).name,
                                           reason=describe(exc, self.supervisor.redactor), trace_id=trace_id)
                await self._refuse(context, span, peer, exc, f"OpenSession {quote(request.tool)}")
            span.set_attribute("toolcell.session_id", session.id)
            log.info("session opened", extra={"tool": session.tool, "session_id": session.id})
            return pb.Session(session_id=session.id, tool=session.tool, idle_ttl_seconds=session.policy.idle_ttl_s,
                              max_lifetime_seconds=session.policy.max_lifetime_s, max_calls=session.policy.max_calls,
                              sandbox_id=session.sandbox.id, tools=self.supervisor.session_tools(session))

    async def CloseSession(self, request: pb.CloseSessionRequest, context: grpc.aio.ServicerContext
                           ) -> pb.CloseSessionResponse:
        with caller_trace(context, "toolcell.v1.Supervisor/CloseSession") as span:
            peer, principal = await self._screen(context, span, "session", request,
                                                 lambda: check_session_id(request.session_id, required=True))
            try:
                session = await self.supervisor.close_session(request.session_id, principal.id)
            except ToolcellError as exc:
                await self.gate.record(principal, "decision", action="close_session", decision="deny",
                                       status=status_for(exc).name, trace_id=_trace_id(span))
                await self._refuse(context, span, peer, exc, "CloseSession")
            span.set_attribute("toolcell.session_id", session.id)
            return pb.CloseSessionResponse(calls=session.calls)

    async def session_ended(self, session: Session, reason: str) -> None:
        """The one place a session's end is accounted: audit record, metrics, log line."""
        metrics.sessions_open.add(-1)
        metrics.session_ends.add(1, {"reason": reason})
        duration_s = round(self.supervisor.sessions.clock() - session.opened_at, 3)
        log.info("session ended", extra={"tool": session.tool, "session_id": session.id, "ending": reason})
        principal = session.principal if isinstance(session.principal, Principal) else None
        await self.gate.record(principal, "session_end", session_id=session.id, tool=session.tool, reason=reason,
                               calls=session.calls, duration_s=duration_s, sandbox_id=session.sandbox.id)
