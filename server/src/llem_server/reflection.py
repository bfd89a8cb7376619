"""gRPC server reflection, v1 and v1alpha, with the contract's comments.

grpcio-reflection serves only ``grpc.reflection.v1alpha`` and builds its answers with
``FileDescriptor.CopyToProto``, which drops source info: ``grpcurl describe`` showed the
contract's messages without a word of their documentation, and clients that speak only
``grpc.reflection.v1`` found nothing. This servicer answers under both names (their
messages are the same on the wire) and sends ``llem/v1/llem.proto`` as protoc wrote it
with ``--include_source_info`` (``llem/v1/llem.binpb``, written beside the stubs by
``buildscripts/gen_stubs.py`` and checked with them), so every comment in the ``.proto``
reaches a driver author who has only the server.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from llem.v1 import llem_pb2

__all__ = ["V1", "V1ALPHA", "enable", "source_descriptor"]

V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"


def source_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """llem/v1/llem.proto with its comments (source_code_info), as protoc wrote it."""
    data = resources.files("llem.v1").joinpath("llem.binpb").read_bytes()
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    (proto,) = [f for f in fds.file if f.name == llem_pb2.DESCRIPTOR.name]
    return proto


def _plain(file_descriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file_descriptor.CopyToProto(proto)
    return proto


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file reflection describes: the contract (with comments), health, and
    reflection under both of its package names."""
    v1alpha = _plain(reflection_pb2.DESCRIPTOR)
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(v1alpha)
    v1.name = "grpc/reflection/v1/reflection.proto"
    v1.package = "grpc.reflection.v1"
    for field in (f for m in v1.message_type for f in m.field if f.type_name):
        field.type_name = field.type_name.replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1.")
    for method in v1.service[0].method:
        for attr in ("input_type", "output_type"):
            setattr(method, attr, getattr(method, attr).replace(".grpc.reflection.v1alpha.", ".grpc.reflection.v1."))
    v1.options.Clear()
    return [source_descriptor(), _plain(health_pb2.DESCRIPTOR), v1alpha, v1]


class ReflectionServicer:
    """Answers ServerReflectionInfo from a private pool of the files above."""

    def __init__(self, service_names: Iterable[str]):
        self._services = tuple(sorted(service_names))
        self._pool = descriptor_pool.DescriptorPool()
        self._serialized: dict[str, bytes] = {}
        for proto in _files():
            self._pool.Add(proto)
            self._serialized[proto.name] = proto.SerializeToString()

    def _file_response(self, file_descriptor, request):
        # The file and everything it imports, each once, as the protocol asks.
        names: list[str] = []
        todo = [file_descriptor]
        while todo:
            fd = todo.pop()
            if fd.name in names:
                continue
            names.append(fd.name)
            todo.extend(fd.dependencies)
        files = [self._serialized[n] for n in names]  # every file of the pool, dependencies included
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(file_descriptor_proto=files))

    @staticmethod
    def _error(request, code: grpc.StatusCode, message: str):
        return reflection_pb2.ServerReflectionResponse(
            original_request=request,
            error_response=reflection_pb2.ErrorResponse(error_code=code.value[0], error_message=message))

    def answer(self, request):
        kind = request.WhichOneof("message_request")
        try:
            if kind == "file_by_filename":
                return self._file_response(self._pool.FindFileByName(request.file_by_filename), request)
            if kind == "file_containing_symbol":
                return self._file_response(self._pool.FindFileContainingSymbol(request.file_containing_symbol), request)
            if kind == "file_containing_extension":
                ext = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(ext.containing_type)
                extension = self._pool.FindExtensionByNumber(message, ext.extension_number)
                return self._file_response(extension.file, request)
            if kind == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(e.number for e in self._pool.FindAllExtensions(message))
                return reflection_pb2.ServerReflectionResponse(
                    original_request=request,
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers))
            if kind == "list_services":
                return reflection_pb2.ServerReflectionResponse(
                    original_request=request,
                    list_services_response=reflection_pb2.ListServiceResponse(
                        service=[reflection_pb2.ServiceResponse(name=s) for s in self._services]))
        except KeyError:
            return self._error(request, grpc.StatusCode.NOT_FOUND, "not found")
        return self._error(request, grpc.StatusCode.INVALID_ARGUMENT, "no request kind set")

    async def info(self, request_iterator: AsyncIterator, context) -> AsyncIterator:
        async for request in request_iterator:
            yield self.answer(request)


def enable(server: grpc.aio.Server, service_names: Iterable[str]) -> ReflectionServicer:
    """Serve reflection under v1 and v1alpha on ``server``; both names are listed."""
    servicer = ReflectionServicer([*service_names, V1, V1ALPHA])
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.info,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(tuple(
        grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler}) for name in (V1, V1ALPHA)))
    return servicer
