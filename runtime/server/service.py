"""The Supervisor gRPC service: proto in, model through the supervisor, proto out."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from runtime.api.v1 import supervisor_pb2 as pb
from runtime.api.v1 import supervisor_pb2_grpc as pb_grpc
from runtime.errors import ToolcellError
from runtime.model import Event
from runtime.pipeline import describe
from runtime.server.convert import event_to_pb, request_from_pb, tool_to_pb
from runtime.server.status import status_for
from runtime.supervisor import Supervisor

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


class SupervisorService(pb_grpc.SupervisorServicer):
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    async def Execute(self, request: pb.ExecuteRequest, context: grpc.aio.ServicerContext) -> None:
        remaining = context.time_remaining()
        deadline_s = time.monotonic() + remaining if remaining is not None else None

        async def emit(event: Event) -> None:
            await context.write(event_to_pb(event))

        with caller_trace(context, "toolcell.v1.Supervisor/Execute") as span:
            try:
                result = await self.supervisor.execute(request_from_pb(request, deadline_s), emit)
            except ToolcellError as exc:
                code = status_for(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                log.info("Execute %.128r rejected: %s (%s)", request.tool, code.name,
                         describe(exc, self.supervisor.redactor),
                         extra={"code": code.name, "error": type(exc).__name__})
                await context.abort(code, str(exc))
                return
            await context.write(event_to_pb(result))

    async def ListTools(self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext
                        ) -> pb.ListToolsResponse:
        with caller_trace(context, "toolcell.v1.Supervisor/ListTools"):
            return pb.ListToolsResponse(tools=[tool_to_pb(t) for t in self.supervisor.list_tools()])

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
                     ) -> pb.CancelResponse:
        with caller_trace(context, "toolcell.v1.Supervisor/Cancel"):
            try:
                await self.supervisor.cancel(request.invocation_id)
            except ToolcellError as exc:
                await context.abort(status_for(exc), str(exc))
            return pb.CancelResponse(cancelled=True)
