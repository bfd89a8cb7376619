"""metrics: record, then scrape /metrics over HTTP from a started endpoint."""
from __future__ import annotations

import asyncio
import math
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llem_server.errors import ServiceError, abort
from llem_server.metrics import Metrics


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def served():
    m = Metrics()
    port = m.start_http(0, host="127.0.0.1")
    try:
        yield m, port
    finally:
        m.stop_http()


def test_scrape_shows_llem_metrics(served):
    m, port = served
    m.record_request("/llem.v1.LlemService/Generate", grpc.StatusCode.OK, 0.2)
    m.record_request("Generate", "INVALID_ARGUMENT", 0.001)
    m.record_request("GenerateStream", grpc.StatusCode.CANCELLED, 1.5)
    m.record_tokens(0, input_tokens=12, output_tokens=30)
    m.record_tokens(0, input_tokens=4, output_tokens=7, stopped=True)
    m.record_energy(0, 41.5)
    m.record_energy(0, None)  # not measured: no joules, one "unavailable"
    m.record_energy(1, float("nan"))
    m.record_cache(0, hit=True)
    m.record_cache(0, hit=False)
    m.record_eviction(0)
    m.set_queue_depth(0, 3)
    m.set_queue_depth("cpu", -1)  # clamped
    m.record_load(0, 12.0)
    m.record_worker_restart(1)

    got = _scrape(port)
    names = {name for name, _ in got}
    assert all(n.startswith("llem_") for n in names), names

    def val(name, **labels):
        return got[(name, tuple(sorted((k, str(v)) for k, v in labels.items())))]

    assert val("llem_requests_total", method="Generate", status="OK") == 1  # path cut to the short name
    assert val("llem_requests_total", method="Generate", status="INVALID_ARGUMENT") == 1
    assert val("llem_requests_total", method="GenerateStream", status="CANCELLED") == 1
    assert val("llem_request_duration_seconds_count", method="Generate") == 2
    assert val("llem_request_duration_seconds_bucket", method="GenerateStream", le="2.5") == 1
    assert val("llem_input_tokens_total", device=0) == 16
    assert val("llem_output_tokens_total", device=0) == 30  # stopped requests' tokens are counted apart
    assert val("llem_stopped_output_tokens_total", device=0) == 7
    assert val("llem_energy_joules_total", device=0) == 41.5
    assert val("llem_energy_unavailable_total", device=0) == 1
    assert val("llem_energy_unavailable_total", device=1) == 1
    assert ("llem_energy_joules_total", (("device", "1"),)) not in got  # never a zero for "unknown"
    assert val("llem_model_cache_hits_total", device=0) == 1
    assert val("llem_model_cache_misses_total", device=0) == 1
    assert val("llem_model_cache_evictions_total", device=0) == 1
    assert val("llem_queue_depth", device=0) == 3
    assert val("llem_queue_depth", device="cpu") == 0
    assert val("llem_model_load_seconds_sum", device=0) == 12.0
    assert val("llem_worker_restarts_total", device=1) == 1
    assert val("llem_server_info", version=__import__("llem_server").__version__) == 1


def test_private_registries_do_not_collide():
    a, b = Metrics(), Metrics()  # a second instance would raise "Duplicated timeseries" on the global registry
    a.record_tokens(0, output_tokens=5)
    assert b'llem_output_tokens_total{device="0"}' not in b.render()
    assert b'llem_output_tokens_total{device="0"} 5.0' in a.render()


def test_recording_without_endpoint_is_safe():
    m = Metrics()  # metrics disabled: nothing served, recording still fine
    m.record_request("Generate", "OK", -1)  # a bad duration is not observed, the request still counts
    m.record_load(0, math.inf)
    assert b'llem_requests_total{method="Generate",status="OK"} 1.0' in m.render()
    assert b'llem_request_duration_seconds_count{method="Generate"}' not in m.render()


def test_start_twice_refused(served):
    m, _ = served
    with pytest.raises(RuntimeError):
        m.start_http(0, host="127.0.0.1")


def test_servicer_level_helpers():
    llem_pb2 = pytest.importorskip("llem.v1.llem_pb2")
    m = Metrics()
    measured = llem_pb2.Energy(available=True, total_j=10.0, devices=[llem_pb2.DeviceEnergy(index=1, energy_j=10.0)])
    m.generated(8, 20, cache_hit=False, energy=measured)  # device taken from the single-GPU reading
    m.generated(2, 3, cache_hit=True, energy=llem_pb2.Energy(available=False, unavailable_reason="no GPU"),
                device="cpu")
    m.stopped_tokens(4, device=1)
    m.model_loaded(3.0, device=1)
    depth = [5]
    m.track_queue(1, lambda: depth[0])
    depth[0] = 2  # read at scrape time
    text = m.render().decode()
    for line in [
        'llem_input_tokens_total{device="1"} 8.0', 'llem_output_tokens_total{device="1"} 20.0',
        'llem_energy_joules_total{device="1"} 10.0', 'llem_model_cache_misses_total{device="1"} 1.0',
        'llem_model_cache_hits_total{device="cpu"} 1.0', 'llem_energy_unavailable_total{device="cpu"} 1.0',
        'llem_stopped_output_tokens_total{device="1"} 4.0', 'llem_model_load_seconds_count{device="1"} 1.0',
        'llem_queue_depth{device="1"} 2.0',
    ]:
        assert line in text, line
    assert 'llem_energy_joules_total{device="cpu"}' not in text


def test_simulated_joules_are_kept_out_of_the_measured_total():
    llem_pb2 = pytest.importorskip("llem.v1.llem_pb2")
    m = Metrics()
    for method, j in (("nvml_total_energy_counter/exclusive", 10.0), ("simulated:nvml_total_energy_counter/exclusive", 99.0)):
        m.record_energy_message(llem_pb2.Energy(available=True, method=method, total_j=j,
                                                devices=[llem_pb2.DeviceEnergy(index=0, energy_j=j)]))
    text = m.render().decode()
    assert 'llem_energy_joules_total{device="0"} 10.0' in text
    assert 'llem_simulated_energy_joules_total{device="0"} 99.0' in text


SERVICE = "test.Metered"


async def _interceptor_scenario(m: Metrics):
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from llem_server.auth import BearerTokenInterceptor

    release = asyncio.Event()

    async def ok(request, context):
        return b"ok"

    async def invalid(request, context):
        await abort(context, ServiceError.invalid_argument([("prompts", "at least one")]))

    async def bug(request, context):
        raise RuntimeError("a server bug")

    async def set_code(request, context):
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("gone")
        return b""

    async def slow(request, context):
        await release.wait()
        return b"late"

    async def stream(request, context):
        for i in range(3):
            yield bytes([i])

    async def stream_fail(request, context):
        yield b"x"
        await abort(context, ServiceError.resource_exhausted("queue full", 1.0))

    handlers = grpc.method_handlers_generic_handler(SERVICE, {
        "Ok": grpc.unary_unary_rpc_method_handler(ok),
        "Invalid": grpc.unary_unary_rpc_method_handler(invalid),
        "Bug": grpc.unary_unary_rpc_method_handler(bug),
        "SetCode": grpc.unary_unary_rpc_method_handler(set_code),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
        "StreamFail": grpc.unary_stream_rpc_method_handler(stream_fail),
    })
    token = "tok-0123456789abcdef"
    own = [f"/test.Metered/{name}" for name in ("Ok", "Invalid", "Bug", "SetCode", "Slow", "Stream", "StreamFail")]
    server = grpc.aio.server(interceptors=[m.interceptor(methods=own), BearerTokenInterceptor([token])])
    server.add_generic_rpc_handlers((handlers,))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    md = (("authorization", f"Bearer {token}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            def unary(name):
                return ch.unary_unary(f"/{SERVICE}/{name}")

            assert await unary("Ok")(b"", metadata=md, timeout=5) == b"ok"
            for name, code in [("Invalid", "INVALID_ARGUMENT"), ("Bug", "UNKNOWN"), ("SetCode", "NOT_FOUND")]:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await unary(name)(b"", metadata=md, timeout=5)
                assert info.value.code().name == code
            with pytest.raises(grpc.aio.AioRpcError):
                await unary("Ok")(b"", timeout=5)  # no token
            for i in range(20):  # made-up names, refused by auth: one "unknown" label, not 20
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await ch.unary_unary(f"/x.Made/Up{i}")(b"", timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert [x async for x in ch.unary_stream(f"/{SERVICE}/Stream")(b"", metadata=md, timeout=5)] == [
                b"\x00", b"\x01", b"\x02"]
            with pytest.raises(grpc.aio.AioRpcError):
                async for _ in ch.unary_stream(f"/{SERVICE}/StreamFail")(b"", metadata=md, timeout=5):
                    pass
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await unary("Slow")(b"", metadata=md, timeout=0.2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            call = unary("Slow")(b"", metadata=md, timeout=5)
            await asyncio.sleep(0.1)
            call.cancel()
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        for _ in range(50):  # server-side handlers finish after the client gave up
            if b'method="Slow",status="CANCELLED"' in m.render():
                break
            await asyncio.sleep(0.02)
    finally:
        release.set()
        await server.stop(None)


def test_interceptor_counts_every_outcome():
    m = Metrics()
    asyncio.run(_interceptor_scenario(m))
    text = m.render().decode()
    for method, status in [("Ok", "OK"), ("Invalid", "INVALID_ARGUMENT"), ("Bug", "UNKNOWN"),
                           ("SetCode", "NOT_FOUND"), ("Ok", "UNAUTHENTICATED"), ("Stream", "OK"),
                           ("StreamFail", "RESOURCE_EXHAUSTED"), ("Slow", "DEADLINE_EXCEEDED"),
                           ("Slow", "CANCELLED")]:
        assert f'llem_requests_total{{method="{method}",status="{status}"}} 1.0' in text, (method, status, text)
    assert "Health" not in text  # probes are not counted
    assert 'llem_request_duration_seconds_count{method="Slow"} 2.0' in text
    # A caller cannot mint labels: 20 made-up methods are one "unknown" series (they once made
    # /metrics 135 MB at 40 000 names).
    assert 'llem_requests_total{method="unknown",status="UNAUTHENTICATED"} 20.0' in text
    assert "Made" not in text and "Up1" not in text


class _Ctx:
    def __init__(self, remaining):
        self._remaining = remaining

    def time_remaining(self):
        return self._remaining

    def code(self):
        return None


def test_final_code_reads_an_early_deadline_and_a_stream_closed_after_its_answer():
    from llem_server.metrics import _final_code

    # grpc ends a call at its deadline a hair early by the server's clock: 3 in 60 were
    # counted CANCELLED while the caller (and the server's log) saw DEADLINE_EXCEEDED
    assert _final_code(_Ctx(0.02), asyncio.CancelledError()) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _final_code(_Ctx(5.0), asyncio.CancelledError()) == grpc.StatusCode.CANCELLED
    # a caller that closes its stream once the final message is in has its whole answer
    # (the Python client does; 116 of 896 such streams were counted CANCELLED)
    assert _final_code(_Ctx(5.0), GeneratorExit(), answered=True) == grpc.StatusCode.OK
    assert _final_code(_Ctx(None), GeneratorExit()) == grpc.StatusCode.CANCELLED


def test_a_streams_final_message_is_recognised():
    from llem.v1 import llem_pb2
    from llem_server.metrics import _is_final

    assert _is_final(llem_pb2.GenerateStreamResponse(final=llem_pb2.GenerateResponse()))
    assert not _is_final(llem_pb2.GenerateStreamResponse(chunk=llem_pb2.TokenChunk(index=0)))
    assert not _is_final(b"raw") and not _is_final(llem_pb2.GenerateResponse())
