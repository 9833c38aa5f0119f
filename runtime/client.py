"""Async client for the supervisor's gRPC API (used by the CLI; the full library is issue 7).

Propagates the caller's OpenTelemetry context (W3C traceparent) in gRPC metadata, so the
supervisor's spans join the caller's trace. gRPC errors become ``ClientError`` with the status code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType

import grpc
from opentelemetry import propagate

from runtime.api.v1 import supervisor_pb2 as pb
from runtime.api.v1 import supervisor_pb2_grpc as pb_grpc
from runtime.model import Event, Result, Tool
from runtime.server.convert import event_from_pb, tool_from_pb
from runtime.settings import default_target


class ClientError(Exception):
    def __init__(self, code: str, details: str, trailers: dict[str, str] | None = None) -> None:
        self.code = code
        self.details = details
        self.trailers = trailers or {}
        super().__init__(f"{code}: {details}")

    @property
    def retry_after_ms(self) -> int | None:
        """The server's retry hint on RESOURCE_EXHAUSTED, if it gave one."""
        value = self.trailers.get("retry-after-ms")
        return int(value) if value and value.isdigit() else None


@dataclass(frozen=True)
class ClientTls:
    """TLS to a TCP listener: the CA that signed the server's certificate; cert/key for mTLS."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # override the name checked against the server's certificate


def _translate(exc: grpc.aio.AioRpcError) -> ClientError:
    trailers = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    return ClientError(exc.code().name, exc.details() or "", trailers)


class Client:
    def __init__(self, target: str | None = None, *, token: str | None = None, tls: ClientTls | None = None) -> None:
        self.target = target or default_target()
        self.token = token
        if tls is not None:
            creds = grpc.ssl_channel_credentials(tls.ca_pem, tls.key_pem, tls.cert_pem)
            options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
            self._channel = grpc.aio.secure_channel(self.target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self.target)
        self._stub = pb_grpc.SupervisorStub(self._channel)  # type: ignore[no-untyped-call]

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if self.token:
            carrier["authorization"] = f"Bearer {self.token}"
        return tuple(carrier.items())

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
        call = self._stub.Execute(request, timeout=timeout, metadata=self._metadata())
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
            resp = await self._stub.ListTools(pb.ListToolsRequest(), metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return [tool_from_pb(t) for t in resp.tools]

    async def cancel(self, invocation_id: str) -> bool:
        try:
            resp = await self._stub.Cancel(pb.CancelRequest(invocation_id=invocation_id), metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return bool(resp.cancelled)
