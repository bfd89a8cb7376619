"""Reflection on the real server: both protocol versions, and the contract's comments with it,
so a driver author holding only the address can read the documentation (grpcurl describe)."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2
from llem.v1 import llem_pb2
from llem_server.reflection import source_descriptor

VERSIONS = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]


def _ask(server, version: str, *requests: reflection_pb2.ServerReflectionRequest):
    with grpc.insecure_channel(server.address) as ch:
        call = ch.stream_stream(f"/{version}/ServerReflectionInfo",
                                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=10))


def _comments(fdp: descriptor_pb2.FileDescriptorProto) -> str:
    return "\n".join(loc.leading_comments for loc in fdp.source_code_info.location)


@pytest.mark.parametrize("version", VERSIONS)
def test_lists_services_and_describes_the_contract_with_its_comments(server, version):
    listed, described = _ask(server, version,
                             reflection_pb2.ServerReflectionRequest(list_services=""),
                             reflection_pb2.ServerReflectionRequest(file_containing_symbol="llem.v1.GenerateRequest"))
    assert {s.name for s in listed.list_services_response.service} == {
        "llem.v1.LlemService", "grpc.health.v1.Health", *VERSIONS}
    (raw,) = described.file_descriptor_response.file_descriptor_proto
    fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
    assert fdp.name == "llem/v1/llem.proto"
    assert "GenerateRequest runs prompts against one model configuration." in _comments(fdp)


@pytest.mark.parametrize("version", VERSIONS)
def test_describes_health_and_both_reflection_versions(server, version):
    replies = _ask(server, version, *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=s)
                                      for s in ["grpc.health.v1.Health", *VERSIONS]))
    packages = [descriptor_pb2.FileDescriptorProto.FromString(r.file_descriptor_response.file_descriptor_proto[0]).package
                for r in replies]
    assert packages == ["grpc.health.v1", "grpc.reflection.v1", "grpc.reflection.v1alpha"]
    v1 = descriptor_pb2.FileDescriptorProto.FromString(replies[1].file_descriptor_response.file_descriptor_proto[0])
    types = {m.input_type for m in v1.service[0].method} | {f.type_name for m in v1.message_type for f in m.field
                                                            if f.type_name}
    assert types and all(t.startswith(".grpc.reflection.v1.") for t in types)


def test_unknown_symbol_is_not_found_and_the_stream_goes_on(server):
    missing, found = _ask(server, VERSIONS[0],
                          reflection_pb2.ServerReflectionRequest(file_containing_symbol="llem.v1.Nope"),
                          reflection_pb2.ServerReflectionRequest(file_by_filename="llem/v1/llem.proto"))
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.original_request.file_containing_symbol == "llem.v1.Nope"
    assert found.file_descriptor_response.file_descriptor_proto


def test_commented_descriptor_is_the_one_the_stubs_were_made_from():
    """llem.binpb is written with the stubs; one regenerated without the other would
    describe a contract the server does not speak."""
    with_comments = source_descriptor()
    assert with_comments.source_code_info.location
    with_comments.ClearField("source_code_info")
    plain = descriptor_pb2.FileDescriptorProto()
    llem_pb2.DESCRIPTOR.CopyToProto(plain)
    # protoc's set also names each field's JSON name, which the stubs' embedded copy leaves out.
    for message in _messages(with_comments.message_type):
        for field in message.field:
            field.ClearField("json_name")
    assert with_comments == plain


def _messages(messages):
    for m in messages:
        yield m
        yield from _messages(m.nested_type)
