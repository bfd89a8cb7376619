"""Requests that are not valid protobuf, and exceptions that escape a servicer method.

grpc's generated handlers answered both UNKNOWN, with a Python exception for a message and
no ErrorInfo. A client can send invalid UTF-8 in a string field without meaning to (half a
surrogate pair, encoded by protobufjs from a JavaScript string sliced mid-emoji).
"""
from __future__ import annotations

import asyncio

import grpc
import pytest
from llem.v1 import llem_pb2

from _hardening import error_reason, field_violations

PROMPTS_FIELD = llem_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["prompts"].number


def _bad_utf8_request() -> bytes:
    ok = llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model="llama"), max_output_tokens=2).SerializeToString()
    bad = "hi ".encode() + b"\xed\xa0\xbd"  # a lone high surrogate, as UTF-8 would spell it
    return ok + bytes([PROMPTS_FIELD << 3 | 2, len(bad)]) + bad


@pytest.mark.parametrize("method,streaming", [("Generate", False), ("GenerateStream", True)])
def test_invalid_utf8_is_invalid_argument_naming_the_request(server, method, streaming):
    with grpc.insecure_channel(server.address) as ch:
        path = f"/llem.v1.LlemService/{method}"
        call = ch.unary_stream(path) if streaming else ch.unary_unary(path)  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as exc:
            result = call(_bad_utf8_request(), timeout=30)
            if streaming:
                list(result)
        err = exc.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
        assert error_reason(err) == "INVALID_REQUEST"
        assert [f for f, _ in field_violations(err)] == ["request"]
        assert "llem.v1.GenerateRequest" in err.details() and "UTF-8" in err.details()
        # Nothing lost: the same server answers a well-formed request.
        req = llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model="llama"), prompts=["hi"],
                                       max_output_tokens=2)
        ok = ch.unary_unary("/llem.v1.LlemService/Generate", request_serializer=llem_pb2.GenerateRequest.SerializeToString,
                            response_deserializer=llem_pb2.GenerateResponse.FromString)(req, timeout=120)
        assert ok.usage.output_tokens >= 1


class _Broken:
    """A servicer whose methods fail the way a server bug would."""

    def __getattr__(self, name):
        async def unary(request, context):
            raise RuntimeError(f"bug in {name}")
        return unary

    async def GenerateStream(self, request, context):
        yield llem_pb2.GenerateStreamResponse(chunk=llem_pb2.TokenChunk())
        raise KeyError("bug mid-stream")

    async def GetServerInfo(self, request, context):
        return None  # grpc would fail serialising it: UNKNOWN

    async def UnloadModel(self, request, context):
        from llem_server.errors import ServiceError

        raise ServiceError("NOT_FOUND", "no such model")  # meant for the caller, not aborted


def test_an_exception_escaping_a_method_is_internal_with_details_not_unknown():
    from llem_server.handlers import generic_handler

    async def main():
        srv = grpc.aio.server()
        srv.add_generic_rpc_handlers((generic_handler(_Broken()),))
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                errs = []
                for path, streaming in (("ListModels", False), ("GenerateStream", True), ("GetServerInfo", False),
                                        ("UnloadModel", False)):
                    call = (ch.unary_stream if streaming else ch.unary_unary)(f"/llem.v1.LlemService/{path}")
                    try:
                        if streaming:
                            async for _ in call(b""):
                                pass
                        else:
                            await call(b"")
                    except grpc.aio.AioRpcError as err:
                        errs.append(err)
                return errs
        finally:
            await srv.stop(None)

    errs = asyncio.run(main())
    assert [e.code() for e in errs] == [grpc.StatusCode.INTERNAL] * 3 + [grpc.StatusCode.NOT_FOUND]
    assert "RuntimeError: bug in ListModels" in errs[0].details() and "KeyError" in errs[1].details()
    assert "answered NoneType, not llem.v1.GetServerInfoResponse" in errs[2].details()
    assert [error_reason(e) for e in errs] == ["INTERNAL_ERROR"] * 3 + ["MODEL_NOT_FOUND"]
    assert errs[3].details() == "no such model"
