"""Async client for the supervisor's gRPC API (used by the CLI; the full library is issue 7).

Propagates the caller's OpenTelemetry context (W3C traceparent) in gRPC metadata, so the
supervisor's spans join the caller's trace. gRPC errors become ``ClientError`` with the status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType

import grpc
from opentelemetry import propagate

from runtime.api.v1 import supervisor_pb2 as pb
from runtime.api.v1 import supervisor_pb2_grpc as pb_grpc
from runtime.model import Event, Result, Tool
from runtime.server.convert import event_from_pb, tool_from_pb
from runtime.settings import default_target


class ClientError(Exception):
    def __init__(self, code: str, details: str) -> None:
        self.code = code
        self.details = details
        super().__init__(f"{code}: {details}")


def _metadata() -> tuple[tuple[str, str], ...]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items())


def _translate(exc: grpc.aio.AioRpcError) -> ClientError:
    return ClientError(exc.code().name, exc.details() or "")


class Client:
    def __init__(self, target: str | None = None) -> None:
        self.target = target or default_target()
        self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pb_grpc.SupervisorStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def execute(self, tool: str, arguments_json: str = "{}", *, invocation_id: str = "",
                      timeout: float | None = None) -> AsyncIterator[Event]:
        """Yield Started, output chunks, and the final Result."""
        request = pb.ExecuteRequest(tool=tool, arguments_json=arguments_json, invocation_id=invocation_id)
        call = self._stub.Execute(request, timeout=timeout, metadata=_metadata())
        try:
            async for msg in call:
                yield event_from_pb(msg)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        finally:
            call.cancel()

    async def call(self, tool: str, arguments_json: str = "{}", *, timeout: float | None = None) -> Result:
        """Run a tool and return only its final Result."""
        async for event in self.execute(tool, arguments_json, timeout=timeout):
            if isinstance(event, Result):
                return event
        raise ClientError("INTERNAL", "stream ended without a result")

    async def list_tools(self) -> list[Tool]:
        try:
            resp = await self._stub.ListTools(pb.ListToolsRequest(), metadata=_metadata())
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return [tool_from_pb(t) for t in resp.tools]

    async def cancel(self, invocation_id: str) -> bool:
        try:
            resp = await self._stub.Cancel(pb.CancelRequest(invocation_id=invocation_id), metadata=_metadata())
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return bool(resp.cancelled)
