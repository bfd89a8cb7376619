"""ServiceError -> real grpc.aio server -> real client: rich details survive the wire."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from llem_server.errors import ServiceError, abort, status_from_name

SERVICE = "test.Errors"


def _handlers(err_for: dict[str, ServiceError]) -> grpc.GenericRpcHandler:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await abort(context, err_for[request.decode()])
        return b""  # unreachable

    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        yield b"first"  # a streamed message before the error, as GenerateStream may send
        await abort(context, err_for[request.decode()])

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )


ERRORS = {
    "bad": ServiceError.invalid_argument(
        [("model.pytorch.load_in_8bit", "cannot be combined with load_in_4bit"), ("prompts", "at least one prompt")]
    ),
    "busy": ServiceError.resource_exhausted("queue for device 0 is full (8 waiting)", retry_delay_s=2.5),
    "busy_queue": ServiceError.resource_exhausted("device 0 has 8 requests waiting (limit 8)", retry_delay_s=1.0,
                                                  reason="QUEUE_FULL"),
    "huge": ServiceError.invalid_argument([(f"prompts[{i}]", "x" * 500) for i in range(2000)]),
    "plain": ServiceError("NOT_FOUND", "model 'nope' not found under the model root"),
}


async def _call(method: str, key: str) -> grpc.aio.AioRpcError:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(ERRORS),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            if method == "Unary":
                call = ch.unary_unary(f"/{SERVICE}/Unary")(key.encode(), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call
            else:
                call = ch.unary_stream(f"/{SERVICE}/Stream")(key.encode(), timeout=5)
                got = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for msg in call:
                        got.append(msg)
                assert got == [b"first"]
            return info.value
    finally:
        await server.stop(None)


def _details(err: grpc.aio.AioRpcError):
    status = rpc_status.from_call(err)  # also checks code and message agree with the call's
    assert status is not None
    out = {}
    for any_msg in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.RetryInfo, error_details_pb2.ErrorInfo):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out[cls.__name__] = msg
    return out


@pytest.mark.parametrize("method", ["Unary", "Stream"])
def test_bad_request_round_trip(method):
    err = asyncio.run(_call(method, "bad"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "load_in_8bit" in err.details()
    bad = _details(err)["BadRequest"]
    assert [(v.field, v.description) for v in bad.field_violations] == ERRORS["bad"].violations


@pytest.mark.parametrize("method", ["Unary", "Stream"])
def test_retry_info_round_trip(method):
    err = asyncio.run(_call(method, "busy"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = _details(err)["RetryInfo"]
    assert info.retry_delay.ToNanoseconds() == 2_500_000_000


def test_every_error_names_its_reason_in_error_info():
    """Two RESOURCE_EXHAUSTED a program must tell apart: out of memory (the status's usual
    reason) and a full queue; a plain error carries its reason and nothing else."""
    reasons = {}
    for key in ("busy", "busy_queue", "plain", "bad"):
        info = _details(asyncio.run(_call("Unary", key)))["ErrorInfo"]
        assert info.domain == "llem.v1"
        reasons[key] = info.reason
    assert reasons == {"busy": "OUT_OF_MEMORY", "busy_queue": "QUEUE_FULL", "plain": "MODEL_NOT_FOUND",
                       "bad": "INVALID_REQUEST"}
    assert set(_details(asyncio.run(_call("Unary", "plain")))) == {"ErrorInfo"}


def test_an_unknown_reason_from_the_worker_falls_back_to_the_statuss_own():
    assert ServiceError("RESOURCE_EXHAUSTED", "x", reason="NO_SUCH_REASON").reason == "OUT_OF_MEMORY"
    assert ServiceError("INTERNAL", "x").reason == "INTERNAL_ERROR"


def test_huge_violation_list_still_arrives_bounded():
    # 2000 x 500 chars would blow the 8 KiB metadata limit and turn into a transport error.
    err = asyncio.run(_call("Unary", "huge"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [v.field for v in _details(err)["BadRequest"].field_violations]
    assert 1 < len(fields) < 2000
    assert fields[0] == "prompts[0]" and fields[-1] == "…"


def test_client_library_parses_details():
    errors = pytest.importorskip("llem_client.errors")
    err = asyncio.run(_call("Unary", "busy"))
    parsed = errors.from_rpc_error(err)
    assert isinstance(parsed, errors.ResourceExhausted) and parsed.retry_delay == 2.5
    assert parsed.reason == "OUT_OF_MEMORY"


def test_status_from_name():
    assert status_from_name("INVALID_ARGUMENT") is grpc.StatusCode.INVALID_ARGUMENT
    assert status_from_name("resource_exhausted") is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_from_name(grpc.StatusCode.NOT_FOUND) is grpc.StatusCode.NOT_FOUND
    assert status_from_name("NO_SUCH_CODE") is grpc.StatusCode.INTERNAL  # our bug, never the client's


def test_service_error_rejects_ok_and_accepts_names():
    with pytest.raises(ValueError):
        ServiceError(grpc.StatusCode.OK, "fine")
    assert ServiceError("unavailable", "draining").code is grpc.StatusCode.UNAVAILABLE
