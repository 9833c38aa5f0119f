"""gRPC reflection under v1 (what current grpcurl asks first) and v1alpha, on a real supervisor.

The v1 client is built the way grpcurl builds one: the descriptor of ``grpc.reflection.v1.ServerReflection``
is fetched through reflection (v1alpha, which grpcio-reflection ships), and v1's messages are made from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2

from tests.support import running_supervisor

pytestmark = pytest.mark.docker

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"


async def ask(channel: grpc.aio.Channel, service: str, request: Any, response_type: Any) -> Any:
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo", request_serializer=type(request).SerializeToString,
                                 response_deserializer=response_type.FromString)
    replies = [r async for r in call(iter([request]))]
    assert len(replies) == 1
    return replies[0]


async def v1_messages(channel: grpc.aio.Channel) -> tuple[Any, Any]:
    """v1's request and response classes, from the descriptor the server gives for the v1 service."""
    reply = await ask(channel, V1ALPHA, reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1),
                      reflection_pb2.ServerReflectionResponse)
    pool = descriptor_pool.DescriptorPool()
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(raw))
    method = pool.FindServiceByName(V1).FindMethodByName("ServerReflectionInfo")
    assert method.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    return (message_factory.GetMessageClass(method.input_type), message_factory.GetMessageClass(method.output_type))


async def test_reflection_lists_services_under_v1_and_v1alpha(tmp_path: Path) -> None:
    async with running_supervisor(tmp_path) as (app, _), grpc.aio.insecure_channel(app.address) as channel:
        v1_request, v1_response = await v1_messages(channel)
        cases = [  # service asked, request class, response class
            (V1, v1_request, v1_response),
            (V1ALPHA, reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse),
        ]
        for service, request, response in cases:
            reply = await ask(channel, service, request(list_services=""), response)
            names = {s.name for s in reply.list_services_response.service}
            assert {"toolcell.v1.Supervisor", "grpc.health.v1.Health", V1, V1ALPHA} <= names, (service, names)
            # A listed service resolves to its file through the same version (grpcurl describe).
            found = await ask(channel, service, request(file_containing_symbol="toolcell.v1.Supervisor"), response)
            files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
                     for raw in found.file_descriptor_response.file_descriptor_proto]
            assert any(f.package == "toolcell.v1" and any(s.name == "Supervisor" for s in f.service) for f in files)
            missing = await ask(channel, service, request(file_containing_symbol="no.such.Service"), response)
            assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
