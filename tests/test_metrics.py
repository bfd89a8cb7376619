"""metrics: record, then scrape /metrics over HTTP from a started endpoint."""
from __future__ import annotations

import math
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
    assert val("llem_output_tokens_total", device=0) == 37
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
