"""Overload and faults against real ``llem-server`` processes.

* device out-of-memory, simulated at the model edge by the test-only hooks in
  ``llem_server.models`` (``LLEM_FAULT_OOM``: forward raises ``torch.cuda.OutOfMemoryError``;
  ``LLEM_FAULT_OOM_LOAD``: ``from_pretrained`` does): RESOURCE_EXHAUSTED with RetryInfo, the
  worker survives (same pid), the server stays healthy and serves the next request;
* missing, truncated and garbled weights: NOT_FOUND / FAILED_PRECONDITION with the reason;
* a full queue (``--max-queue 2``): RESOURCE_EXHAUSTED with RetryInfo, every call answered;
* 32 concurrent clients: every call OK or RESOURCE_EXHAUSTED, none lost, and all served once
  the refused ones retry after the RetryInfo delay;
* SIGTERM with a call in flight: health NOT_SERVING, new calls UNAVAILABLE, the call finishes,
  exit code 0.
"""
from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llem.v1 import llem_pb2, llem_pb2_grpc
from llem_client import Client
from llem_client.errors import ResourceExhausted

from _hardening import (COMPILE_FAIL, HOST_OOM, OOM_GEN, OOM_LOAD, SLOW_LOAD, code_of, error_reason,  # noqa: F401
                        hard_root, hard_server, json_lines, retry_delay)
from conftest import start_server, stop_server

GREEDY = llem_pb2.DecoderConfig(do_sample=False)


def _req(model: str, n: int = 4, prompts=("hello",), **kw) -> llem_pb2.GenerateRequest:
    return llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model=model), prompts=list(prompts),
                                    max_output_tokens=n, decoder=GREEDY, **kw)


@pytest.fixture(scope="module")
def hstub(hard_server):
    return llem_pb2_grpc.LlemServiceStub(hard_server.channel())


def _worker_pid(server) -> int:
    import psutil

    kids = psutil.Process(server.proc.pid).children(recursive=True)
    workers = [p for p in kids if "spawn_main" in " ".join(p.cmdline())]
    assert workers, kids
    return workers[0].pid


def _serving(server) -> int:
    ch = server.channel()
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# -- out of memory ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,where", [(OOM_GEN, "out of device memory"), (OOM_LOAD, "out of device memory while loading"),
                                         (HOST_OOM, "out of memory while running")])  # host: was INTERNAL
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_oom_is_resource_exhausted_and_the_server_recovers(hard_server, hstub, model, where, stream):
    pid = _worker_pid(hard_server)
    assert hstub.Generate(_req("llama"), timeout=60).usage.output_tokens == 4
    call = (lambda r: list(hstub.GenerateStream(r, timeout=60))) if stream else \
        (lambda r: hstub.Generate(r, timeout=60))
    code, err = code_of(call, _req(model))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    assert where in err.details()
    assert retry_delay(err) is not None and retry_delay(err) > 0
    assert error_reason(err) == "OUT_OF_MEMORY"  # told apart from a full queue without reading the text
    # The worker freed what it held and kept going: same process, healthy, the next request is served.
    assert _worker_pid(hard_server) == pid
    assert _serving(hard_server) == health_pb2.HealthCheckResponse.SERVING
    r = hstub.Generate(_req("llama", n=3), timeout=60)
    assert r.usage.output_tokens == 3 and r.cache_hit


def test_oom_during_load_leaves_a_failed_entry_not_a_ready_one(hstub):
    code, err = code_of(hstub.LoadModel, llem_pb2.LoadModelRequest(model=llem_pb2.ModelConfig(model=OOM_LOAD)),
                        timeout=60)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay(err)
    states = {m.config.model: m.state for m in hstub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models}
    assert states.get(OOM_LOAD) in (None, llem_pb2.MODEL_STATE_FAILED)


@pytest.mark.parametrize("rpc", ["Generate", "LoadModel"])
def test_a_load_whose_caller_gave_up_still_lands_in_the_cache(hstub, rpc):
    """The client's deadline passes while the model is still loading (the slow-load hook holds
    from_pretrained 2 s): the worker finishes the load, and the front's list must say READY,
    not LOADING forever, nor forget a model the worker holds."""
    budget = {"Generate": "1GiB", "LoadModel": "2GiB"}[rpc]  # a load config of this case's own
    req = _req(SLOW_LOAD, n=2)
    req.model.pytorch.max_memory["cpu"] = budget
    call = {"Generate": lambda t: hstub.Generate(req, timeout=t),
            "LoadModel": lambda t: hstub.LoadModel(llem_pb2.LoadModelRequest(model=req.model), timeout=t)}[rpc]
    code, _ = code_of(call, 0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 60
    while True:
        states = [m.state for m in hstub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models
                  if m.config.model == SLOW_LOAD and int(m.config.pytorch.max_memory["cpu"]) == int(budget[0]) * 1024**3]
        if states == [llem_pb2.MODEL_STATE_READY] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert states == [llem_pb2.MODEL_STATE_READY]
    assert call(120).cache_hit


def test_a_compile_failure_is_not_fatal(hstub):
    """config.md: a compile failure serves the model uncompiled, with a warning saying so."""
    req = _req(COMPILE_FAIL, n=2)
    req.model.pytorch.torch_compile = True
    req.model.pytorch.torch_compile_backend = "eager"
    r = hstub.Generate(req, timeout=120)
    assert r.usage.output_tokens == 2 and not r.effective_config.compiled
    (w,) = [w for w in r.warnings if w.code == "COMPILE_FAILED"]
    assert "uncompiled" in w.message and "simulated compile failure" in w.message
    # ListModels says so too, not only the answers of the moment.
    listed = {m.config_hash: m for m in hstub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models}
    assert [w.code for w in listed[r.config_hash].warnings] == ["COMPILE_FAILED"]


# -- broken weights -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,code,reason", [
    ("missing", grpc.StatusCode.NOT_FOUND, "no usable weights"),
    ("corrupt", grpc.StatusCode.FAILED_PRECONDITION, "corrupt weights"),
    ("garbled", grpc.StatusCode.FAILED_PRECONDITION, "corrupt weights"),
    # service.md: "not a model" is NOT_FOUND (they were FAILED_PRECONDITION / NOT_SUPPORTED_HERE,
    # which says another server could run them)
    ("no-model-type", grpc.StatusCode.NOT_FOUND, "is not a model"),
    ("no-tokenizer", grpc.StatusCode.NOT_FOUND, "no tokenizer files"),
])
@pytest.mark.parametrize("rpc", ["Generate", "LoadModel"])
def test_broken_weights_get_a_clear_status(hard_server, hard_root, hstub, model, code, reason, rpc):
    if rpc == "Generate":
        got, err = code_of(hstub.Generate, _req(model), timeout=60)
    else:
        got, err = code_of(hstub.LoadModel, llem_pb2.LoadModelRequest(model=llem_pb2.ModelConfig(model=model)),
                           timeout=60)
    assert got == code, err
    assert reason in err.details() and model in err.details()
    assert str(hard_root) not in err.details()  # the server's directory layout stays private
    entry = {m.config.model: m for m in hstub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models}.get(model)
    assert entry is None or (entry.state == llem_pb2.MODEL_STATE_FAILED and reason in entry.error)
    assert _serving(hard_server) == health_pb2.HealthCheckResponse.SERVING


# -- queue full ----------------------------------------------------------------------------------------------

def _long(n: int = 250) -> llem_pb2.GenerateRequest:
    return llem_pb2.GenerateRequest(model=llem_pb2.ModelConfig(model="llama"), prompts=["queue"], max_output_tokens=n,
                                    decoder=llem_pb2.DecoderConfig(do_sample=False, min_new_tokens=n))


def test_full_queue_is_resource_exhausted_with_retry_info(hard_server, hstub):
    hstub.Generate(_req("llama"), timeout=60)  # loaded: what follows measures the queue, not a load
    n = 8
    barrier = threading.Barrier(n)

    def one(_):
        barrier.wait()
        return code_of(hstub.Generate, _long(150), timeout=120)

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    codes = [c for c, _ in results]
    assert len(results) == n
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    refused = [e for c, e in results if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
    # One runs, two wait (--max-queue 2): the rest are refused at once.
    assert 3 <= codes.count(grpc.StatusCode.OK) and refused, codes
    for err in refused:
        assert "limit 2" in err.details()
        assert retry_delay(err) == pytest.approx(1.0) and error_reason(err) == "QUEUE_FULL"
    assert all(r.usage.output_tokens == 150 for c, r in results if c == grpc.StatusCode.OK)


def _wait_running(stub, model: str) -> None:
    deadline = time.monotonic() + 60
    while not any(m.active_requests and m.config.model == model
                  for m in stub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_requests_that_give_up_while_queued_free_their_places(hard_server, hstub):
    """Two queued requests whose deadlines pass (--max-queue 2): their places are free at once,
    not held until the running request ends (every caller was refused meanwhile)."""
    hstub.Generate(_req("llama"), timeout=60)
    running = hstub.Generate.future(_long(4000), timeout=120)
    _wait_running(hstub, "llama")
    for _ in range(2):
        code, _ = code_of(hstub.Generate, _long(4), timeout=0.5)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    queued = [hstub.Generate.future(_long(4), timeout=120) for _ in range(2)]  # both fit again
    assert [q.result().usage.output_tokens for q in queued] == [4, 4]
    assert running.result().usage.output_tokens == 4000


def test_max_models_holds_when_every_cached_model_has_requests_waiting(hard_server, hstub):
    """--max-models 2 is a memory cap: with three configs in flight at once the third load must
    evict one of the others (their requests load it again), not grow the cache to three."""
    hstub.Generate(_req("llama"), timeout=60)
    running = hstub.Generate.future(_long(800), timeout=120)
    _wait_running(hstub, "llama")
    other = _req("llama", n=2)
    other.model.pytorch.max_memory["cpu"] = "4GiB"  # a third load config
    waiting = [hstub.Generate.future(_req("gpt2", n=2), timeout=120), hstub.Generate.future(other, timeout=120)]
    assert all(w.result().usage.output_tokens == 2 for w in waiting) and running.result()
    ready = [m for m in hstub.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models
             if m.state == llem_pb2.MODEL_STATE_READY]
    assert len(ready) <= 2, [(m.config.model, dict(m.config.pytorch.max_memory)) for m in ready]


def test_32_concurrent_clients_none_lost(hard_server):
    """32 clients, one channel each, fired together at a device with a queue of 2: every call is
    answered, OK or RESOURCE_EXHAUSTED with RetryInfo, none lost or failed otherwise."""
    n = 32
    barrier = threading.Barrier(n)
    outcomes: list = [None] * n

    def client(i: int) -> None:
        with Client(hard_server.address, timeout=120) as c:
            barrier.wait()
            try:
                r = c.generate(f"client {i}", model="llama", max_output_tokens=8,
                               decoder={"do_sample": False, "min_new_tokens": 8}, request_id=f"c32-{i}")
                outcomes[i] = ("OK", r.usage.output_tokens)
            except ResourceExhausted as e:
                outcomes[i] = ("RESOURCE_EXHAUSTED", e.retry_delay)
            except Exception as e:  # noqa: BLE001 - recorded, asserted on below
                outcomes[i] = ("OTHER", repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert None not in outcomes, outcomes  # every call answered
    ok = [o for o in outcomes if o[0] == "OK"]
    refused = [o for o in outcomes if o[0] == "RESOURCE_EXHAUSTED"]
    print(f"\n32 concurrent clients (queue 2): {len(ok)} OK, {len(refused)} RESOURCE_EXHAUSTED, "
          f"{n - len(ok) - len(refused)} other, 0 lost")
    assert len(ok) + len(refused) == n, outcomes
    assert len(ok) >= 3 and all(o == ("OK", 8) for o in ok)
    assert all(delay and delay > 0 for _, delay in refused)
    # The server logged exactly the ones it served.
    time.sleep(0.2)
    served = {l["request_id"] for l in json_lines(hard_server) if str(l.get("request_id", "")).startswith("c32-")
              and l.get("status") == "OK"}
    assert len(served) == len(ok)
    assert _serving(hard_server) == health_pb2.HealthCheckResponse.SERVING


def test_refused_calls_are_served_after_the_retry_delay(hard_server, hstub):
    """Refused for a full queue, a call honouring RetryInfo is served on a later try."""
    n = 6
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait()
        for attempt in range(30):
            code, res = code_of(hstub.Generate, _long(100), timeout=120)
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                return code, res, attempt
            time.sleep(retry_delay(res) * (0.3 + 0.1 * i))
        return code, res, attempt

    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    assert all(code == grpc.StatusCode.OK and r.usage.output_tokens == 100 for code, r, _ in results), results
    assert max(attempt for *_, attempt in results) >= 1  # some were refused first


# -- SIGTERM drain ---------------------------------------------------------------------------------------------

def test_sigterm_drains(hard_root, tmp_path):
    srv = start_server(tmp_path / "drain", hard_root, "--grace-seconds", "30")
    try:
        ch = srv.channel()
        stub, health = llem_pb2_grpc.LlemServiceStub(ch), health_pb2_grpc.HealthStub(ch)
        # Loaded, and how fast this machine decodes (a shared CI box may be several times slower).
        stub.Generate(_req("llama", n=2), timeout=60)
        t = time.monotonic()
        stub.Generate(_long(200), timeout=60)
        per_token = (time.monotonic() - t) / 200
        # In flight: about 1.5 s of decoding, over three prompts one after another (batch_size 1).
        n = max(150, min(1000, int(0.5 / per_token)))
        long = llem_pb2.GenerateRequest(
            model=llem_pb2.ModelConfig(model="llama", pytorch=llem_pb2.PyTorchConfig(batch_size=1)),
            prompts=["a", "b", "c"], max_output_tokens=n,
            decoder=llem_pb2.DecoderConfig(do_sample=False, min_new_tokens=n))
        stream = stub.GenerateStream(long, timeout=120)
        next(stream)  # running
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)

        deadline = time.monotonic() + 10
        status = None
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.02)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="llem.v1.LlemService"), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        for call in (lambda: stub.Generate(_req("llama", n=2), timeout=10),
                     lambda: list(stub.GenerateStream(_req("llama", n=2), timeout=10)),
                     lambda: stub.LoadModel(llem_pb2.LoadModelRequest(model=llem_pb2.ModelConfig(model="gpt2")),
                                            timeout=10)):
            code, err = code_of(call)
            assert code == grpc.StatusCode.UNAVAILABLE, err
            assert "shutting down" in err.details() and retry_delay(err) and error_reason(err) == "SHUTTING_DOWN"

        finals = [m.final for m in stream if m.HasField("final")]  # the in-flight call finishes
        assert len(finals) == 1 and finals[0].usage.output_tokens == 3 * n
        assert srv.proc.wait(40) == 0
        assert time.monotonic() - t0 < 30
        log = srv.log()
        assert "server_draining" in log and "server_stopped" in log
    finally:
        stop_server(srv)


def test_sigterm_when_idle_exits_at_once(hard_root, tmp_path):
    srv = start_server(tmp_path / "idle", hard_root, "--grace-seconds", "30")
    t0 = time.monotonic()
    assert stop_server(srv) == 0
    assert time.monotonic() - t0 < 10  # nothing in flight: no waiting out the grace period


def test_a_full_queue_is_shared_between_connections(hard_server):
    """One connection holds the running request and both queue places (--max-queue 2); another
    connection still gets in: the first one's newest queued request is pushed out with
    QUEUE_FULL and RetryInfo (a client retrying at once used to keep every place), while the
    first connection itself is refused rather than pushing out its own."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # two real connections, two peers
    eager = llem_pb2_grpc.LlemServiceStub(grpc.insecure_channel(hard_server.address, options=options))
    polite = llem_pb2_grpc.LlemServiceStub(grpc.insecure_channel(hard_server.address, options=options))
    config_hash = eager.Generate(_req("llama"), timeout=60).config_hash  # loaded

    def depth() -> int:
        return eager.GetServerInfo(llem_pb2.GetServerInfoRequest(), timeout=10).devices[0].queue_depth

    running = eager.Generate.future(_long(400), timeout=120)
    deadline = time.monotonic() + 30
    queued = []
    for _ in range(2):
        queued.append(eager.Generate.future(_long(20), timeout=120))
        want = len(queued)
        while depth() < want:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    code, err = code_of(eager.Generate, _req("llama"), timeout=60)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and error_reason(err) == "QUEUE_FULL"
    assert "limit 2" in err.details()  # its own: refused, nothing pushed out
    served = polite.Generate.future(_req("llama"), timeout=120)
    with pytest.raises(grpc.RpcError) as pushed:
        queued[1].result()
    assert pushed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pushed out" in pushed.value.details()
    assert error_reason(pushed.value) == "QUEUE_FULL" and retry_delay(pushed.value) == pytest.approx(1.0)
    assert served.result().usage.output_tokens == 4
    assert queued[0].result().usage.output_tokens == 20 and running.result().usage.output_tokens == 400
    # the pushed-out request let go of its model: nothing is left counted as active
    llama = [m for m in eager.ListModels(llem_pb2.ListModelsRequest(), timeout=10).models if m.config_hash == config_hash]
    assert [(m.state, m.active_requests) for m in llama] == [(llem_pb2.MODEL_STATE_READY, 0)]
