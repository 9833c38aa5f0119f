"""gRPC server reflection under both names: ``grpc.reflection.v1`` (asked first by current grpcurl) and v1alpha.

grpcio-reflection (1.85) ships only v1alpha. v1 is the same protocol under another package: every message
has the same fields and numbers, so one servicer (grpcio-reflection's own) answers both, its messages
read and written as v1's bytes. The v1 file descriptor is v1alpha's renamed, added to the default pool
so a client can resolve v1 itself as it resolves any listed service.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's FileDescriptorProto with v1's file name and package (type references follow the package)."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.options.ClearField("java_package")
    for message in proto.message_type:
        for fld in message.field:
            if fld.HasField("type_name"):
                fld.type_name = fld.type_name.replace(old, f".{V1_PACKAGE}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, f".{V1_PACKAGE}.")
            method.output_type = method.output_type.replace(old, f".{V1_PACKAGE}.")
    return proto


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.Add(_v1_file())


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha on ``server``, listing ``service_names`` and both reflection services."""
    _register_v1_descriptor(descriptor_pool.Default())
    names = tuple(dict.fromkeys((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)))
    servicer = reflection.aio.ReflectionServicer(names)
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service,
                                                                              {"ServerReflectionInfo": handler}),))
