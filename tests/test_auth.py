"""auth: bearer tokens against a real grpc.aio server (unary, server streaming, health, reflection)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llem_server import reflection
from llem_server.auth import BearerTokenInterceptor, load_tokens

SERVICE = "test.Guarded"
GOOD = "tok-0123456789abcdef"
OTHER = "tok-fedcba9876543210"


def _generic() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context) -> bytes:
        return b"echo:" + request

    async def count(request: bytes, context):
        for i in range(3):
            yield str(i).encode()

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


async def _scenario(check, options=()) -> None:
    """Start a guarded server with health + reflection, run ``check(channel)``, stop."""
    server = grpc.aio.server(interceptors=[BearerTokenInterceptor([GOOD, OTHER])], options=list(options))
    server.add_generic_rpc_handlers((_generic(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable(server, [SERVICE, health.SERVICE_NAME])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await check(ch)
    finally:
        await server.stop(None)


def _md(value: str | None):
    return None if value is None else (("authorization", value),)


async def _unary(ch, md):
    return await ch.unary_unary(f"/{SERVICE}/Echo")(b"hi", metadata=md, timeout=5)


async def _stream(ch, md):
    return [m async for m in ch.unary_stream(f"/{SERVICE}/Count")(b"", metadata=md, timeout=5)]


@pytest.mark.parametrize(
    "auth, expect_msg",
    [
        (None, "missing"),
        ("Bearer wrong-token-0000000000", "invalid"),
        (GOOD, "invalid"),  # no scheme
        ("Basic " + GOOD, "invalid"),
        ("Bearer " + GOOD + "x", "invalid"),
        ("Bearer " + GOOD[:-1], "invalid"),
        ("Bearer ", "invalid"),
    ],
)
def test_refused(auth, expect_msg):
    async def check(ch):
        for call in (_unary, _stream):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(ch, _md(auth))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert expect_msg in info.value.details()

    asyncio.run(_scenario(check))


@pytest.mark.parametrize("auth", ["Bearer " + GOOD, "bearer " + OTHER, "  Bearer  " + GOOD + "  "])
def test_accepted_unary_and_stream(auth):
    async def check(ch):
        assert await _unary(ch, _md(auth)) == b"echo:hi"
        assert await _stream(ch, _md(auth)) == [b"0", b"1", b"2"]

    asyncio.run(_scenario(check))


def test_health_and_reflection_open_without_token():
    async def check(ch):
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        # Watch is server streaming: open as well.
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        # Reflection is bidirectional streaming.
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert SERVICE in names
        # ... under v1 as well (same messages on the wire, another method path).
        v1 = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                              request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                              response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)(timeout=5)
        await v1.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        assert SERVICE in {s.name for s in (await v1.read()).list_services_response.service}
        await v1.done_writing()

    asyncio.run(_scenario(check))


def test_unknown_method_needs_a_token_first():
    async def check(ch):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/test.Guarded/Nope")(b"", timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await ch.unary_unary("/test.Guarded/Nope")(b"", metadata=_md("Bearer " + GOOD), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(_scenario(check))


def test_an_unauthenticated_body_is_never_read():
    """Refused before gRPC reads the message: a body over the receive limit gets
    UNAUTHENTICATED, not the limit's RESOURCE_EXHAUSTED (150 unauthenticated 30 MB calls once
    took the front process to 5.7 GB before being refused)."""
    big = b"x" * 64 * 1024

    async def check(ch):
        for method in ("Echo", "Nope"):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ch.unary_unary(f"/{SERVICE}/{method}")(big, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        with pytest.raises(grpc.aio.AioRpcError) as info:  # with a token, the limit applies
            await ch.unary_unary(f"/{SERVICE}/Echo")(big, metadata=_md("Bearer " + GOOD), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as info:  # server streaming ends cleanly too
            [m async for m in ch.unary_stream(f"/{SERVICE}/Count")(big, timeout=5)]
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(_scenario(check, options=[("grpc.max_receive_message_length", 1024)]))


def test_load_tokens(tmp_path: Path):
    f = tmp_path / "tokens"
    f.write_text(f"# team A\n\n  {GOOD}  \n#{OTHER}\n{OTHER}\n{GOOD}\n")
    assert load_tokens(f) == [GOOD, OTHER]  # comment skipped, whitespace stripped, duplicates dropped


@pytest.mark.parametrize(
    "text, match",
    [("", "no tokens"), ("# only a comment\n\n", "no tokens"), ("short\n", "shorter"),
     (f"{GOOD} # inline\n", "whitespace"), (f"Bearer {GOOD}\n", "whitespace"),
     (f"\ufeff{GOOD}\n", "printable ASCII"), ("tökenwithunicode-0123\n", "printable ASCII")],
)
def test_load_tokens_refuses(tmp_path: Path, text, match):
    f = tmp_path / "tokens"
    f.write_text(text)
    with pytest.raises(ValueError, match=match) as info:
        load_tokens(f)
    assert GOOD not in str(info.value)  # never echo a secret


def test_reload_rotates_and_keeps_old_tokens_on_a_bad_file(tmp_path: Path):
    f = tmp_path / "tokens"
    f.write_text(GOOD + "\n")
    interceptor = BearerTokenInterceptor.from_file(f)
    assert interceptor.is_valid(GOOD) and not interceptor.is_valid(OTHER)
    f.write_text(OTHER + "\n")
    assert interceptor.reload() == 1
    assert interceptor.is_valid(OTHER) and not interceptor.is_valid(GOOD)
    f.write_text("")
    with pytest.raises(ValueError):
        interceptor.reload()
    assert interceptor.is_valid(OTHER)


def test_no_tokens_is_a_configuration_error():
    with pytest.raises(ValueError):
        BearerTokenInterceptor([])


def test_a_world_readable_token_file_is_warned_about_once(tmp_path):
    from structlog.testing import capture_logs

    from llem_server.auth import load_tokens

    f = tmp_path / "tokens"
    f.write_text("t" * 32 + "\n")
    f.chmod(0o644)
    with capture_logs() as logs:
        load_tokens(f, warn=False)  # the CLI's start-up check
        load_tokens(f)  # the server's own load
    assert [e["event"] for e in logs] == ["auth.token_file_world_readable"]
