"""Observability and scale-out against real ``llem-server`` processes.

* grpc.health.v1: overall, ``llem.v1.LlemService``, and one service name per cached config
  hash, with Watch following load (NOT_SERVING while loading, SERVING when ready), eviction
  and unload (SERVICE_UNKNOWN to a watcher, then no entry: NOT_FOUND);
* Prometheus on ``--metrics-port``: every family named ``llem_*``; requests by status, latency,
  tokens, cache hits/misses/evictions, queue depth, load seconds after real traffic;
* structlog JSON lines with request id, config hash, tokens, energy and status;
* the Python client spreading calls over two replicas (round_robin over a list of targets),
  and a ``dns:///`` target with the round_robin policy.
"""
from __future__ import annotations

import queue
import re
import threading
import json
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llem.v1 import llem_pb2, llem_pb2_grpc
from llem_client import Client

from _hardening import free_port, hard_root, json_lines  # noqa: F401
from conftest import start_server, stop_server

H = health_pb2.HealthCheckResponse


@pytest.fixture(scope="module")
def obs(hard_root, tmp_path_factory):
    """One model per device (--max-models 1) so that a second load evicts the first; metrics on."""
    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("obs-server"), hard_root, "--max-models", "1",
                       "--metrics-port", str(port))
    srv.metrics_url = f"http://127.0.0.1:{port}/metrics"
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def ostub(obs):
    return llem_pb2_grpc.LlemServiceStub(obs.channel())


def _model(name: str) -> llem_pb2.ModelConfig:
    return llem_pb2.ModelConfig(model=name)


class Watcher:
    """A Health.Watch stream read in a thread; statuses land in a queue."""

    def __init__(self, channel, service: str):
        self.statuses: queue.Queue = queue.Queue()
        self.seen: list[int] = []
        self.call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=120)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.statuses.put(msg.status)
        except grpc.RpcError:
            pass

    def wait_for(self, status: int, timeout: float = 30) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s = self.statuses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(s)
            if s == status:
                return self.seen
        raise AssertionError(f"no {H.ServingStatus.Name(status)} on the watch; saw "
                             f"{[H.ServingStatus.Name(s) for s in self.seen]}")

    def close(self) -> None:
        self.call.cancel()


def _check(h, service: str):
    """The status of a Check, or "NOT_FOUND" for a name the server never had."""
    try:
        return h.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
        return "NOT_FOUND"


# -- health --------------------------------------------------------------------------------------------------

def test_health_overall_and_service(obs):
    h = health_pb2_grpc.HealthStub(obs.channel())
    for service in ("", "llem.v1.LlemService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == H.SERVING
    with pytest.raises(grpc.RpcError) as err:
        h.Check(health_pb2.HealthCheckRequest(service="no-such-hash"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_watch_follows_load_eviction_and_unload(obs, ostub):
    ch = obs.channel()
    h = health_pb2_grpc.HealthStub(ch)
    # The hash of llama's default configuration, then gone again: the watch starts from nothing.
    a = ostub.LoadModel(llem_pb2.LoadModelRequest(model=_model("llama")), timeout=60).config_hash
    ostub.UnloadModel(llem_pb2.UnloadModelRequest(config_hash=a), timeout=60)
    watch_a = Watcher(ch, a)
    try:
        watch_a.wait_for(H.SERVICE_UNKNOWN)
        ostub.LoadModel(llem_pb2.LoadModelRequest(model=_model("llama")), timeout=60)
        seen = watch_a.wait_for(H.SERVING)
        assert set(seen) <= {H.SERVICE_UNKNOWN, H.NOT_SERVING, H.SERVING}  # NOT_SERVING while loading
        assert h.Check(health_pb2.HealthCheckRequest(service=a), timeout=10).status == H.SERVING

        # --max-models 1: loading gpt2 evicts llama, whose service name goes away.
        b = ostub.LoadModel(llem_pb2.LoadModelRequest(model=_model("gpt2")), timeout=60).config_hash
        watch_a.wait_for(H.SERVICE_UNKNOWN)
        assert a not in {m.config_hash for m in ostub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models}
        assert h.Check(health_pb2.HealthCheckRequest(service=b), timeout=10).status == H.SERVING

        watch_b = Watcher(ch, b)
        try:
            watch_b.wait_for(H.SERVING)
            ostub.UnloadModel(llem_pb2.UnloadModelRequest(config_hash=b), timeout=60)
            watch_b.wait_for(H.SERVICE_UNKNOWN)
            # and the entry is gone, as for a name never served: no entry kept per config ever seen
            assert _check(h, b) == "NOT_FOUND" and _check(h, a) == "NOT_FOUND"
        finally:
            watch_b.close()
    finally:
        watch_a.close()


def test_failed_load_is_not_serving(obs, ostub):
    h = health_pb2_grpc.HealthStub(obs.channel())
    ready = ostub.LoadModel(llem_pb2.LoadModelRequest(model=_model("llama")), timeout=60).config_hash
    code = None
    try:
        ostub.LoadModel(llem_pb2.LoadModelRequest(model=_model("corrupt")), timeout=60)
    except grpc.RpcError as err:
        code = err.code()
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    models = {m.config_hash: m for m in ostub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models}
    failed = [m for m in models.values() if m.state == llem_pb2.MODEL_STATE_FAILED]
    assert len(failed) == 1 and "corrupt weights" in failed[0].error
    assert h.Check(health_pb2.HealthCheckRequest(service=failed[0].config_hash), timeout=10).status == H.NOT_SERVING
    # --max-models 1: the worker evicted llama to make room before the load failed; the front
    # must not go on listing it (or reporting it SERVING).
    assert ready not in models
    assert _check(h, ready) in ("NOT_FOUND", H.SERVICE_UNKNOWN)
    assert h.Check(health_pb2.HealthCheckRequest(), timeout=10).status == H.SERVING  # the server itself is fine


# -- metrics -------------------------------------------------------------------------------------------------

def _scrape(obs) -> str:
    with urllib.request.urlopen(obs.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def _samples(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric's samples."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            out[m.group(1) or ""] = float(m.group(2))
    return out


def _total(text: str, name: str, **labels: str) -> float:
    return sum(v for k, v in _samples(text, name).items()
               if all(f'{lk}="{lv}"' in k for lk, lv in labels.items()))


def test_metrics_scraped_over_http(obs, ostub):
    before = _scrape(obs)
    ostub.LoadModel(llem_pb2.LoadModelRequest(model=_model("llama")), timeout=60)
    r1 = ostub.Generate(llem_pb2.GenerateRequest(model=_model("llama"), prompts=["a", "b"], max_output_tokens=5,
                                                 decoder=llem_pb2.DecoderConfig(min_new_tokens=5)), timeout=60)
    assert r1.cache_hit
    r2 = ostub.Generate(llem_pb2.GenerateRequest(model=_model("gpt2"), prompts=["c"], max_output_tokens=3,
                                                 decoder=llem_pb2.DecoderConfig(min_new_tokens=3)), timeout=60)
    assert not r2.cache_hit  # a miss that evicts llama (--max-models 1)
    with pytest.raises(grpc.RpcError):
        ostub.Generate(llem_pb2.GenerateRequest(model=_model("../x"), prompts=["a"]), timeout=10)
    # An aborted call's status can reach the client before the interceptor has counted it.
    deadline = time.monotonic() + 5
    while True:
        text = _scrape(obs)
        if (_total(text, "llem_requests_total", method="Generate", status="PERMISSION_DENIED")
                > _total(before, "llem_requests_total", method="Generate", status="PERMISSION_DENIED")
                or time.monotonic() > deadline):
            break
        time.sleep(0.05)

    families = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
    assert families and all(f.startswith("llem_") for f in families), families

    def delta(name, **labels):
        return _total(text, name, **labels) - _total(before, name, **labels)

    assert delta("llem_requests_total", method="Generate", status="OK") == 2
    assert delta("llem_requests_total", method="Generate", status="PERMISSION_DENIED") == 1
    assert delta("llem_requests_total", method="LoadModel", status="OK") == 1
    assert delta("llem_request_duration_seconds_count", method="Generate") == 3
    assert delta("llem_input_tokens_total") == r1.usage.input_tokens + r2.usage.input_tokens
    assert delta("llem_output_tokens_total") == 13
    assert delta("llem_model_cache_hits_total") == 1
    assert delta("llem_model_cache_misses_total") == 1
    assert delta("llem_model_cache_evictions_total") >= 1
    assert delta("llem_model_load_seconds_count") >= 1
    assert "llem_queue_depth{" in text and _total(text, "llem_queue_depth") == 0
    # No GPU here: energy is counted as unavailable, never as 0 J.
    assert delta("llem_energy_unavailable_total") == 2
    assert _total(text, "llem_energy_joules_total") == 0
    assert _total(text, "llem_server_info") == 1


def test_energy_metrics_count_each_request_once_deferred_or_not(hard_root, tmp_path_factory):
    """Simulated counter: an answer carrying its energy and a deferred one each add their
    measured joules once; only the first waited for the counter (the wait histogram).
    Metrics listen on --metrics-host only (another loopback address than gRPC's)."""
    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("obs-energy"), hard_root, "--energy-backend", "simulated",
                       "--metrics-port", str(port), "--metrics-host", "127.0.0.2")
    srv.metrics_url = f"http://127.0.0.2:{port}/metrics"
    try:
        with Client(srv.address, timeout=60) as c:
            c.load_model(model="llama")
            with pytest.raises(OSError):  # not on gRPC's address
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
            before = _scrape(srv)
            r1 = c.generate(["in the answer"], model="llama", max_output_tokens=3)
            r2 = c.generate(["deferred"], model="llama", max_output_tokens=3, request_id="obs-d",
                            energy_delivery="deferred")
            e2 = c.get_energy("obs-d", wait_seconds=5).results[0].energy
        assert r1.energy.available and not r2.energy.available and e2.available
        text = _scrape(srv)

        def delta(name, **labels):
            return _total(text, name, **labels) - _total(before, name, **labels)

        # simulated joules are counted apart from measured ones
        assert delta("llem_simulated_energy_joules_total") == pytest.approx(r1.energy.total_j + e2.total_j)
        assert delta("llem_energy_joules_total") == 0
        assert delta("llem_energy_unavailable_total") == 0  # "deferred" is not "unmeasured"
        assert delta("llem_energy_wait_seconds_count") == 1
        assert delta("llem_energy_wait_seconds_sum") == pytest.approx(r1.timing.energy_wait_ms / 1e3)

        # Callers gone after generation, before the answer (beam search's tokens come once done,
        # then the answer waits ~50-100 ms for the counter): their tokens and energy still count.
        stub = llem_pb2_grpc.LlemServiceStub(srv.channel())
        got = 0
        for i in range(3):
            call = stub.GenerateStream(llem_pb2.GenerateRequest(
                model=llem_pb2.ModelConfig(model="llama", pytorch=llem_pb2.PyTorchConfig(num_beams=2)),
                prompts=["beams"], max_output_tokens=6, request_id=f"obs-beam-{i}",
                decoder=llem_pb2.DecoderConfig(min_new_tokens=6, do_sample=False)), timeout=30)
            got += len(next(call).chunk.token_ids)
            call.cancel()
        assert got == 18
        deadline = time.monotonic() + 10
        while len([l for l in json_lines(srv) if l.get("event") == "request_stopped"]) < 3 \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = [l for l in json_lines(srv) if l.get("event") == "request_stopped"]
        assert sorted(l["request_id"] for l in stopped) == [f"obs-beam-{i}" for i in range(3)]
        assert all(l["status"] == "CANCELLED" and l["output_tokens"] == 6 and l["energy_j"] > 0 for l in stopped)
        after = _scrape(srv)
        assert _total(after, "llem_stopped_output_tokens_total") - _total(text, "llem_stopped_output_tokens_total") == 18
        assert _total(after, "llem_simulated_energy_joules_total") - _total(text, "llem_simulated_energy_joules_total") \
            == pytest.approx(sum(l["energy_j"] for l in stopped))
    finally:
        stop_server(srv)


def test_worker_restart_is_counted(obs, ostub):
    import psutil

    before = _total(_scrape(obs), "llem_worker_restarts_total")
    workers = [p for p in psutil.Process(obs.proc.pid).children(recursive=True)
               if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) == 1
    workers[0].kill()
    deadline = time.monotonic() + 60
    while _total(_scrape(obs), "llem_worker_restarts_total") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _total(_scrape(obs), "llem_worker_restarts_total") == before + 1
    (died,) = [l for l in json_lines(obs) if l.get("event") == "worker_died" and l.get("restarts") == before + 1]
    assert died["level"] == "warning" and died["exit_code"] == -9
    r = ostub.Generate(llem_pb2.GenerateRequest(model=_model("llama"), prompts=["back"], max_output_tokens=2),
                       timeout=120)  # served by the new worker (after a fresh load)
    assert r.usage.output_tokens == 2 and not r.cache_hit


# -- logs ----------------------------------------------------------------------------------------------------

def test_json_logs_carry_request_fields(obs, ostub):
    r = ostub.Generate(llem_pb2.GenerateRequest(model=_model("llama"), prompts=["log me"], max_output_tokens=4,
                                                decoder=llem_pb2.DecoderConfig(min_new_tokens=4),
                                                request_id="log-ok-1"), timeout=60)
    with pytest.raises(grpc.RpcError):
        ostub.Generate(llem_pb2.GenerateRequest(model=_model("llama"), prompts=["a"], max_output_tokens=-1,
                                                request_id="log-bad-1"), timeout=10)
    time.sleep(0.2)  # the lines are written after the response
    lines = json_lines(obs)
    ok = [l for l in lines if l.get("request_id") == "log-ok-1"]
    assert len(ok) == 1, ok
    line = ok[0]
    assert line["event"] == "generate" and line["status"] == "OK"
    assert line["config_hash"] == r.config_hash
    assert line["input_tokens"] == r.usage.input_tokens and line["output_tokens"] == 4
    assert "energy_j" in line  # null here: no GPU energy on this machine
    assert line["level"] == "info" and "timestamp" in line
    bad = [l for l in lines if l.get("request_id") == "log-bad-1"]
    assert len(bad) == 1 and bad[0]["status"] == "INVALID_ARGUMENT" and "max_output_tokens" in bad[0]["message"]


def test_server_started_says_what_serves(obs):
    (line,) = [l for l in json_lines(obs) if l.get("event") == "server_started"]
    assert line["version"] and line["energy_backend"] and line["metrics_port"] and line["devices"]
    assert "no NVIDIA GPU" in line["energy"]  # why energy is absent on this machine, from the start


def test_json_logs_are_only_json_lines_worker_output_included(obs, ostub):
    """With --log-format json a log shipper sees one JSON object per line: the worker's library
    output (transformers' load progress bar and notices, bitsandbytes' per-call 8-bit warning)
    goes through the same renderer (it came out raw, ~115 lines for one 8-bit request)."""
    req = llem_pb2.GenerateRequest(model=_model("other"), prompts=["eight bits"], max_output_tokens=4)
    req.model.pytorch.load_in_8bit = True
    assert ostub.Generate(req, timeout=120).usage.output_tokens >= 1
    raw = [line for line in obs.log().splitlines()
           if line.strip() and not line.startswith("llem-server listening")]  # (stdout's start-up line)
    not_json = [line for line in raw if not line.lstrip().startswith("{")]
    assert not not_json, not_json[:5]
    warned = [json.loads(line) for line in raw if "MatMul8bitLt" in line]
    assert len(warned) <= 1


def test_failed_and_stopped_requests_are_logged_with_their_ids_and_status(obs, ostub):
    """A failure is findable in the log: the server's own request id where the client sent none,
    the config hash once known; a stopped request says whether it was cancelled or timed out."""
    with pytest.raises(grpc.RpcError):  # no request_id: the server makes one
        ostub.Generate(llem_pb2.GenerateRequest(model=_model("no-such-model"), prompts=["a"]), timeout=10)
    with pytest.raises(grpc.RpcError) as late:
        ostub.Generate(llem_pb2.GenerateRequest(model=_model("llama"), prompts=["a"], max_output_tokens=3000,
                                                decoder=llem_pb2.DecoderConfig(min_new_tokens=3000),
                                                request_id="log-late-1"), timeout=1)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 30
    while not [l for l in json_lines(obs) if l.get("event") == "request_stopped"
               and l.get("request_id") == "log-late-1"] and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = json_lines(obs)
    (missing,) = [l for l in lines if l.get("event") == "generate" and l.get("status") == "NOT_FOUND"
                  and "no-such-model" in l.get("message", "")]
    assert len(missing["request_id"]) == 32
    (stopped,) = [l for l in lines if l.get("event") == "request_stopped" and l.get("request_id") == "log-late-1"]
    assert stopped["status"] == "DEADLINE_EXCEEDED" and len(stopped["config_hash"]) == 64


def test_an_oversize_request_id_is_refused_before_it_is_logged_or_kept(obs, ostub):
    """A 15 MB id used to be written to the log and held in the deferred-energy store although
    the request was refused; LoadModel did not check it at all."""
    rid = "r" * 100_000
    gen = llem_pb2.GenerateRequest(model=_model("llama"), prompts=["a"], max_output_tokens=2, request_id=rid,
                                   energy_delivery=llem_pb2.ENERGY_DELIVERY_DEFERRED)
    load = llem_pb2.LoadModelRequest(model=_model("llama"), request_id=rid)
    for call, req in ((ostub.Generate, gen), (ostub.LoadModel, load)):
        with pytest.raises(grpc.RpcError) as err:
            call(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in err.value.details()
    time.sleep(0.2)
    assert rid not in obs.log()
    got = ostub.GetEnergy(llem_pb2.GetEnergyRequest(request_ids=[rid[:128]]), timeout=10).results[0]
    assert not got.energy.available


# -- replicas --------------------------------------------------------------------------------------------------

def test_client_round_robin_over_two_replicas(server, obs):
    """Calls from one Client(targets=[a, b]) reach both servers (seen in each server's own log)."""
    with Client(targets=[server.address, obs.address], timeout=60) as c:
        for i in range(12):
            c.generate("spread", model="llama", max_output_tokens=2, request_id=f"rr-{i}")
    time.sleep(0.2)
    served = {}
    for name, srv in (("a", server), ("b", obs)):
        served[name] = {l["request_id"] for l in json_lines(srv)
                        if l.get("event") == "generate" and str(l.get("request_id", "")).startswith("rr-")}
    assert served["a"] and served["b"], served
    assert served["a"] | served["b"] == {f"rr-{i}" for i in range(12)}
    assert not served["a"] & served["b"]
    assert abs(len(served["a"]) - len(served["b"])) <= 2  # round robin, not pick-first


def test_dns_target_uses_round_robin(obs):
    port = obs.address.rsplit(":", 1)[1]
    with Client(f"dns:///localhost:{port}", timeout=60) as c:
        assert c.health().status == H.SERVING
        assert c.generate("dns", model="llama", max_output_tokens=2).usage.output_tokens == 2
