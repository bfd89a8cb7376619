"""Status mapping of llem_client against a real gRPC server (an in-test fake servicer).

The fake exists only to produce chosen statuses with google.rpc details; the CLI
and end-to-end tests use the real llem-server.
"""
from __future__ import annotations

import asyncio
from concurrent import futures

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import llem_client
from llem.v1 import llem_pb2, llem_pb2_grpc


def _status(code: int, message: str, *details) -> grpc.Status:
    st = status_pb2.Status(code=code, message=message)
    for d in details:
        st.details.add().Pack(d)
    return rpc_status.to_status(st)


class _Fake(llem_pb2_grpc.LlemServiceServicer):
    def __init__(self, name: str = "fake"):
        self.name = name
        self.metadata: list[dict] = []
        self.cancelled = 0

    def Generate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if request.prompts[0] == "bad":
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field="model.pytorch.load_in_8bit", description="with load_in_4bit"),
                    error_details_pb2.BadRequest.FieldViolation(field="decoder.top_p", description="must be <= 1"),
                ]
            )
            context.abort_with_status(_status(code_pb2.INVALID_ARGUMENT, "2 invalid fields", bad))
        if request.prompts[0] == "full":
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000))
            context.abort_with_status(_status(code_pb2.RESOURCE_EXHAUSTED, "queue full", retry))
        if request.prompts[0] == "slow":
            # Wait until the client cancels; count it.
            while context.is_active():
                context.time_remaining()
                import time

                time.sleep(0.01)
            self.cancelled += 1
            return llem_pb2.GenerateResponse()
        return llem_pb2.GenerateResponse(config_hash=self.name, usage=llem_pb2.Usage(output_tokens=1))

    def GenerateStream(self, request, context):
        yield llem_pb2.GenerateStreamResponse(chunk=llem_pb2.TokenChunk(index=0, token_ids=[1], text="a"))
        context.abort(grpc.StatusCode.CANCELLED, "stopped mid-stream")

    def LoadModel(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model.model!r}")

    def UnloadModel(self, request, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "flash_attn missing")

    def ListModels(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "outside model root")

    def GetServerInfo(self, request, context):
        return llem_pb2.GetServerInfoResponse(server_version=self.name)

    def MeasureBaseline(self, request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")


def _serve(fake: _Fake):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    llem_pb2_grpc.add_LlemServiceServicer_to_server(fake, server)
    h = health.HealthServicer()
    h.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def fake():
    f = _Fake()
    server, addr = _serve(f)
    f.address = addr
    yield f
    server.stop(None)


def test_bad_request_details_become_field_violations(fake):
    with llem_client.Client(fake.address) as c, pytest.raises(llem_client.InvalidArgument) as ei:
        c.generate(["bad"], model="demo")
    e = ei.value
    assert isinstance(e, llem_client.LlemError)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.details == "2 invalid fields"
    assert e.field_violations == [("model.pytorch.load_in_8bit", "with load_in_4bit"), ("decoder.top_p", "must be <= 1")]
    assert "model.pytorch.load_in_8bit" in str(e)


def test_retry_info_and_plain_codes(fake):
    with llem_client.Client(fake.address) as c:
        with pytest.raises(llem_client.ResourceExhausted) as ei:
            c.generate(["full"], model="demo")
        assert ei.value.retry_delay == pytest.approx(2.5)
        with pytest.raises(llem_client.NotFound, match="no model 'nope'"):
            c.load_model("nope")
        with pytest.raises(llem_client.FailedPrecondition):
            c.unload_model("abc")
        with pytest.raises(llem_client.PermissionDenied):
            c.list_models()
        with pytest.raises(llem_client.Unauthenticated):
            c.measure_baseline(1.0)
        assert c.health().status == health_pb2.HealthCheckResponse.SERVING


def test_streaming_errors_are_mapped(fake):
    with llem_client.Client(fake.address) as c:
        stream = c.generate_stream(["x"], model="demo")
        first = next(stream)
        assert first.chunk.text == "a"
        with pytest.raises(llem_client.Cancelled, match="stopped mid-stream"):
            next(stream)


def test_deadline_and_unreachable():
    with llem_client.Client("127.0.0.1:1", timeout=5) as c, pytest.raises(llem_client.Unavailable):
        c.server_info()


def test_deadline_exceeded_cancels_on_the_server(fake):
    with llem_client.Client(fake.address) as c, pytest.raises(llem_client.DeadlineExceeded):
        c.generate(["slow"], model="demo", timeout=0.2)


def test_token_is_sent_as_bearer_metadata(fake):
    with llem_client.Client(fake.address, token="s3cret") as c:
        c.generate(["ok"], model="demo")
    assert fake.metadata[-1]["authorization"] == "Bearer s3cret"


def test_config_errors_raise_before_sending(fake):
    before = len(fake.metadata)
    with llem_client.Client(fake.address) as c, pytest.raises(llem_client.ConfigurationError, match="did you mean 'batch_size'"):
        c.generate(["ok"], model="demo", pytorch={"batchsize": 2})
    assert len(fake.metadata) == before


def test_round_robin_over_targets():
    a, b = _Fake("a"), _Fake("b")
    (sa, addr_a), (sb, addr_b) = _serve(a), _serve(b)
    try:
        with llem_client.Client(targets=[addr_a, addr_b]) as c:
            seen = {c.generate(["ok"], model="demo").config_hash for _ in range(8)}
        assert seen == {"a", "b"}
    finally:
        sa.stop(None)
        sb.stop(None)


def test_async_client_maps_errors_the_same_way(fake):
    async def main():
        async with llem_client.AsyncClient(fake.address, token="t") as c:
            info = await c.server_info()
            assert info.server_version == "fake"
            with pytest.raises(llem_client.InvalidArgument) as ei:
                await c.generate(["bad"], model="demo")
            assert len(ei.value.field_violations) == 2
            with pytest.raises(llem_client.ResourceExhausted) as ei2:
                await c.generate(["full"], model="demo")
            assert ei2.value.retry_delay == pytest.approx(2.5)
            chunks = []
            with pytest.raises(llem_client.Cancelled):
                async for msg in c.generate_stream(["x"], model="demo"):
                    chunks.append(msg)
            assert len(chunks) == 1
            assert (await c.health()).status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(main())


def test_ctrl_c_while_waiting_cancels_the_rpc(fake):
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, llem_client\n"
        f"c = llem_client.Client({fake.address!r})\n"
        "print('go', flush=True)\n"
        "try:\n"
        "    c.generate(['slow'], model='demo')\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    before = fake.cancelled
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().strip() == "go"
    time.sleep(0.5)  # the call is now waiting on the server
    p.send_signal(signal.SIGINT)
    assert p.wait(timeout=20) == 130
    deadline = time.time() + 10
    while fake.cancelled == before and time.time() < deadline:
        time.sleep(0.05)
    assert fake.cancelled == before + 1  # the server saw the cancellation


def _cli_error_text(err, **kw) -> str:
    import io

    from llem_client.cli import _server_error
    from llem_client.display import Display

    out = io.StringIO()
    _server_error(err, Display(out, rich=False), "127.0.0.1:50051", **kw)
    return out.getvalue()


def test_a_violation_the_message_already_says_is_not_repeated():
    said = "model.pytorch.trust_remote_code: remote code is not allowed on this server (start it with --allow-remote-code)"
    err = llem_client.PermissionDenied(said, field_violations=[
        ("model.pytorch.trust_remote_code", "remote code is not allowed on this server (start it with --allow-remote-code)")])
    assert str(err).count("remote code is not allowed") == 1
    assert _cli_error_text(err).count("remote code is not allowed") == 1
    bad = llem_client.InvalidArgument(said.replace("trust_remote_code", "load_in_8bit"),
                                      field_violations=[("model.pytorch.load_in_8bit", "remote code is not allowed on this "
                                                         "server (start it with --allow-remote-code)")])
    assert str(bad).count("remote code is not allowed") == 1
    assert _cli_error_text(bad).count("remote code is not allowed") == 1
    # distinct violations are all listed
    two = llem_client.InvalidArgument("2 invalid fields", field_violations=[("decoder.top_p", "must be <= 1"), ("a", "b")])
    assert "decoder.top_p: must be <= 1" in str(two) and "a: b" in str(two)


def test_cli_error_lines_say_what_happened():
    gone = llem_client.Unavailable("Stream removed")
    text = _cli_error_text(gone, stage="measure")
    assert "the server at 127.0.0.1:50051 went away during measure" in text and "Stream removed" in text
    empty = llem_client.NotFound("")
    assert _cli_error_text(empty).strip() != "error: NOT_FOUND:"
    assert "NOT_FOUND (the server gave no details)" in _cli_error_text(empty)
