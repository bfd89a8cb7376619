"""GenerateStream, per-request timing, and stopping work nobody waits for, against a real llem-server.

Timed assertions are relative only: a request that must not wait for a cancelled one is
compared with how long that long request would have taken (its per-token time measured on
the same server), never with a fixed number of seconds.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.request
import uuid

import grpc
import psutil
import pytest
from llem.v1 import llem_pb2 as pb

from _hardening import error_reason
from conftest import start_server, stop_server

LONG = 4000  # tokens a "long" request would generate (min_new_tokens too, so it cannot stop early)
PROMPTS = ["Hello", "Café 東京 🙂", "🙂🚀⚡🔋", "The quick brown fox jumps over", "Grüße aus München. Привет"]


def request(model: str, prompts, n: int, *, min_new: int | None = None, batch_size: int | None = None,
            request_id: str = "") -> pb.GenerateRequest:
    r = pb.GenerateRequest(model=pb.ModelConfig(model=model), prompts=list(prompts), max_output_tokens=n,
                           request_id=request_id)
    r.decoder.preset = pb.DECODER_PRESET_DETERMINISTIC
    if min_new is not None:
        r.decoder.min_new_tokens = min_new
    if batch_size is not None:
        r.model.pytorch.batch_size = batch_size
    return r


def split(messages):
    """(chunks, final) of a finished stream; asserts the final message is last and alone."""
    kinds = [m.WhichOneof("event") for m in messages]
    assert kinds and kinds[-1] == "final", kinds[-3:]
    assert set(kinds[:-1]) <= {"chunk"}, "a final message before the end of the stream"
    return [m.chunk for m in messages[:-1]], messages[-1].final


def per_token_ms(stub, model: str = "llama") -> float:
    """This server's decode time per token for batch 1, from its own timing (at a short context,
    so it underestimates how long a LONG request takes: the comparisons stay on the safe side)."""
    r = stub.Generate(request(model, ["Hello"], 64, min_new=64), timeout=120)
    assert r.usage.output_tokens == 64
    return r.timing.decode_ms / 63


@pytest.fixture(scope="module")
def long_would_take(stub) -> float:
    """Seconds a LONG-token request would keep the session server's device busy."""
    return LONG * per_token_ms(stub) / 1e3


def stopped_events(srv, request_id: str, timeout: float = 10.0) -> list[dict]:
    """The server's ``request_stopped`` log lines for one request (written after the worker stops)."""
    deadline = time.monotonic() + timeout
    while True:
        events = []
        for line in srv.log().splitlines():
            if line.startswith("{") and request_id in line:
                ev = json.loads(line)
                if ev.get("event") == "request_stopped" and ev.get("request_id") == request_id:
                    events.append(ev)
        if events or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def assert_does_not_wait(stub, long_would_take: float) -> float:
    """A short request right after a stopped long one: the device is free at once.

    Had the long request kept the device, the short one would have waited about
    ``long_would_take`` seconds in the queue. Returns the short request's wall time."""
    t0 = time.monotonic()
    r = stub.Generate(request("llama", ["Hi"], 4), timeout=120)
    waited = time.monotonic() - t0
    assert r.usage.output_tokens >= 1
    assert r.timing.queue_wait_ms < 0.25 * long_would_take * 1e3, (r.timing.queue_wait_ms, long_would_take)
    # Wall time too, with room for the scheduling stalls of a busy 2-core machine.
    assert waited < 0.5 * long_would_take, (waited, long_would_take)
    return waited


# -- stream content against Generate ---------------------------------------------------------

@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_stream_text_and_final_equal_generate(stub, model):
    # batch_size 2 over 5 prompts: three generate() slices, prompt indices offset per slice.
    req = request(model, PROMPTS, 24, batch_size=2)
    full = stub.Generate(req, timeout=120)
    chunks, final = split(list(stub.GenerateStream(req, timeout=120)))

    texts: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    for c in chunks:
        assert 0 <= c.index < len(PROMPTS)
        texts[c.index] = texts.get(c.index, "") + c.text
        ids.setdefault(c.index, []).extend(c.token_ids)
    # Tokens really were streamed one step at a time, not sent at the end.
    assert max(len(c.token_ids) for c in chunks) == 1
    assert len([c for c in chunks if c.token_ids]) == full.usage.output_tokens
    for c in full.completions:
        assert texts.get(c.index, "") == c.text, c.index  # also where random weights produce U+FFFD
        assert ids.get(c.index, []) == list(c.token_ids), c.index
    # The final message carries what Generate returns; only timing and ids may differ.
    assert list(final.completions) == list(full.completions)
    assert final.usage == full.usage
    assert final.config_hash == full.config_hash and final.cache_hit
    assert final.effective_config == full.effective_config
    assert final.energy.available == full.energy.available
    assert final.energy.unavailable_reason == full.energy.unavailable_reason
    assert [w.code for w in final.warnings] == [w.code for w in full.warnings]
    assert final.timing.HasField("time_to_first_token_ms")
    assert final.timing.inter_token_latency.count == full.timing.inter_token_latency.count


def test_incremental_decoder_multibyte_and_invalid_tail(model_root):
    """Token by token, the pieces join to the full decode: characters split across tokens come
    out whole, and a genuinely invalid last byte still comes out (as U+FFFD) at the end."""
    from tokenizers import Tokenizer

    from llem_server.streaming import IncrementalDecoder

    for name in ("llama", "gpt2"):
        tok = Tokenizer.from_file(str(model_root / name / "tokenizer.json"))
        text = "Café 東京 🙂 déjà vu 🚀⚡ Привет"
        ids = tok.encode(text).ids
        dec = IncrementalDecoder(tok)
        pieces = [dec.push([i]) for i in ids] + [dec.flush()]
        assert "".join(pieces) == tok.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
        assert len(ids) > len([p for p in pieces if p])  # some characters did span several tokens

        # A lone lead byte of a 4-byte character: invalid UTF-8 whatever follows (here: nothing).
        lead = tok.encode("🙂").ids[0]
        assert tok.decode([lead]) == "\ufffd"
        for tail in ([lead], [lead, lead], [lead] + tok.encode(" ok").ids + [lead]):
            seq = tok.encode("ab").ids + tail
            dec = IncrementalDecoder(tok)
            joined = "".join(dec.push([i]) for i in seq) + dec.flush()
            assert joined == tok.decode(seq), (name, tail)
            assert joined.endswith("\ufffd")


def _byte_fallback_tokenizer():
    """A Llama-2-style tokenizer: <0xNN> byte tokens (byte_fallback) and a ByteFallback decoder,
    which turns every byte of a run that is not valid UTF-8 into U+FFFD, valid bytes included."""
    import json

    from tokenizers import Tokenizer

    vocab = {"<unk>": 0, **{f"<0x{i:02X}>": 1 + i for i in range(256)}}
    for piece in ("\u2581", "l", "o", "lo", "llo\u2581", "u", "w", "a", "h", "i", "\u2581h"):
        vocab.setdefault(piece, len(vocab))
    spec = {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": None,
            "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "vocab": vocab,
                      "merges": []}}
    return Tokenizer.from_str(json.dumps(spec)), vocab


@pytest.mark.parametrize("pieces", [
    ["llo\u2581", "<0x68>", "<0x93>"],                  # "h" then a stray continuation byte
    ["u", "<0x6D>", "<0x2C>", "<0xE3>", "w"],          # valid ASCII bytes, then a truncated lead byte
    ["<0xE6>", "<0x97>", "<0xA5>", "a"],               # 日, whole
    ["a", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>", "<0xE3>", "\u2581h", "i", "<0x80>"],
])
def test_incremental_decoder_with_byte_fallback_joins_to_the_full_decode(pieces):
    """A byte run can turn bytes already decoded into U+FFFD when a later byte makes the run
    invalid: the stream holds a run back until it ends, so its pieces still join to the final text."""
    from llem_server.streaming import IncrementalDecoder

    tok, vocab = _byte_fallback_tokenizer()
    ids = [vocab[p] for p in pieces]
    dec = IncrementalDecoder(tok)
    assert "".join(dec.push([i]) for i in ids) + dec.flush() == tok.decode(ids)


# -- timing ------------------------------------------------------------------------------------

def check_timing(t: pb.Timing, output_tokens: int) -> None:
    assert t.tokenization_ms > 0
    assert t.HasField("time_to_first_token_ms") and t.time_to_first_token_ms > 0
    itl = t.inter_token_latency
    assert itl.count == output_tokens - 1
    assert 0 < itl.median_ms <= itl.p95_ms <= itl.p99_ms
    assert itl.mean_ms > 0
    assert t.time_to_first_token_ms + t.decode_ms == pytest.approx(t.generate_ms, rel=1e-6, abs=1e-3)
    assert 0 < t.decode_ms <= t.generate_ms <= t.total_ms
    assert t.queue_wait_ms >= 0
    # mean ITL × gaps is the decode time up to the last token (decode also holds the end of generate()).
    assert itl.mean_ms * itl.count <= t.decode_ms * (1 + 1e-6)


def test_timing_in_generate_and_in_the_final_stream_message(stub):
    req = request("llama", ["The quick brown fox"], 48, min_new=48)
    full = stub.Generate(req, timeout=120)
    check_timing(full.timing, full.usage.output_tokens)
    _, final = split(list(stub.GenerateStream(req, timeout=120)))
    check_timing(final.timing, final.usage.output_tokens)
    assert full.usage.output_tokens == final.usage.output_tokens == 48


def test_queue_wait_of_a_request_behind_a_running_one(stub):
    long_stream = stub.GenerateStream(request("llama", ["Hello"], 1500, min_new=1500), timeout=120)
    assert next(long_stream).WhichOneof("event") == "chunk"  # the long one runs now
    t_sent = time.monotonic()
    second = stub.Generate.future(request("llama", ["Hi"], 4), timeout=120)
    chunks, final = split(list(long_stream))
    t_long_done = time.monotonic()
    r = second.result()
    assert final.usage.output_tokens == 1500
    # It waited in the queue for much of the long request's decoding, and says so. (Compared
    # with the server's own decode time: the client may read the stream long after it ended.)
    assert r.timing.queue_wait_ms >= 0.25 * final.timing.decode_ms
    assert r.timing.queue_wait_ms <= (t_long_done - t_sent) * 1e3
    assert r.timing.queue_wait_ms + r.timing.generate_ms <= r.timing.total_ms
    assert final.timing.queue_wait_ms < r.timing.queue_wait_ms


# -- stopping ----------------------------------------------------------------------------------

def test_cancelled_stream_stops_and_frees_the_device(server, stub, long_would_take):
    rid = f"cancel-{uuid.uuid4().hex[:8]}"
    call = stub.GenerateStream(request("llama", ["Hello"], LONG, min_new=LONG, request_id=rid), timeout=120)
    first = next(call)
    assert first.WhichOneof("event") == "chunk"
    seen = len(first.chunk.token_ids)
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        for m in call:
            seen += len(m.chunk.token_ids)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    waited = assert_does_not_wait(stub, long_would_take)

    (ev,) = stopped_events(server, rid)
    assert 1 <= ev["output_tokens"] < LONG
    steps_after_cancel = ev["output_tokens"] - seen
    print(f"cancel: {seen} tokens seen, {ev['output_tokens']} generated ({steps_after_cancel} steps after the "
          f"client's cancel at {long_would_take / LONG * 1e3:.2f} ms/token); short request {waited * 1e3:.1f} ms vs "
          f"{long_would_take * 1e3:.0f} ms for the long one")


@pytest.mark.parametrize("kind", ["stream", "stream-unread", "unary"])
def test_missed_deadline_stops_and_frees_the_device(server, stub, kind, long_would_take):
    rid = f"deadline-{kind}-{uuid.uuid4().hex[:8]}"
    if kind == "stream-unread":
        # A client that stops reading: the server's writes fill the flow-control window, so the
        # deadline finds the handler inside grpc's write, outside the servicer's own code.
        req = request("llama", ["Hello"] * 8, LONG, min_new=LONG, batch_size=8, request_id=rid)
        call = stub.GenerateStream(req, timeout=0.15 * long_would_take)
        assert next(call).WhichOneof("event") == "chunk"
        assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    else:
        req = request("llama", ["Hello"], LONG, min_new=LONG, request_id=rid)
        with pytest.raises(grpc.RpcError) as err:
            if kind == "stream":
                for _ in stub.GenerateStream(req, timeout=0.02 * long_would_take):  # ~LONG/50 tokens in
                    pass
            else:
                stub.Generate(req, timeout=0.02 * long_would_take)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    waited = assert_does_not_wait(stub, long_would_take)
    (ev,) = stopped_events(server, rid)
    assert 1 <= ev["output_tokens"] < LONG * len(req.prompts)  # summed over the prompts
    print(f"deadline ({kind}): stopped after {ev['output_tokens']} tokens; short request {waited * 1e3:.1f} ms "
          f"vs {long_would_take * 1e3:.0f} ms for the long one")


def test_cancel_while_queued_is_skipped_and_released(server, stub, long_would_take):
    """A request cancelled before it reached the device never runs, and its bookkeeping ends
    at once, not when the device comes free."""
    rid = f"queued-{uuid.uuid4().hex[:8]}"
    long_stream = stub.GenerateStream(request("llama", ["Hello"], LONG, min_new=LONG), timeout=120)
    assert next(long_stream).WhichOneof("event") == "chunk"
    queued = stub.Generate.future(request("llama", ["Hi"], LONG, min_new=LONG, request_id=rid), timeout=120)
    deadline = time.monotonic() + 30
    while stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).devices[0].queue_depth < 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.01)
    queued.cancel()
    (ev,) = stopped_events(server, rid)
    assert ev["output_tokens"] == 0
    long_stream.cancel()  # only now: the queued one was accounted for while the device was busy
    assert_does_not_wait(stub, long_would_take)


# -- a worker that dies mid-stream; metrics of stopped work -----------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(srv) -> list[int]:
    procs = psutil.Process(srv.proc.pid).children(recursive=True)
    return [p.pid for p in procs if "spawn_main" in " ".join(p.cmdline())]


def metric(port: int, name: str, **labels) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + " ") and not want:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def own_server(model_root, tmp_path_factory):
    """A server of this module's own: its worker gets killed, and it serves metrics."""
    port = free_port()
    srv = start_server(tmp_path_factory.mktemp("stream-server"), model_root, "--metrics-port", str(port))
    srv.metrics_port = port
    yield srv
    stop_server(srv)


def test_stopped_tokens_reach_the_metrics(own_server):
    stub = own_server.stub()
    stub.Generate(request("llama", ["Hi"], 2), timeout=120)  # load
    rid = f"metrics-{uuid.uuid4().hex[:8]}"
    call = stub.GenerateStream(request("llama", ["Hello"], LONG, min_new=LONG, request_id=rid), timeout=120)
    next(call)
    call.cancel()
    (ev,) = stopped_events(own_server, rid)
    assert ev["output_tokens"] >= 1
    port = own_server.metrics_port
    assert metric(port, "llem_stopped_output_tokens_total", device="0") == ev["output_tokens"]


def test_cancelled_streams_are_counted_as_cancelled(own_server):
    stub = own_server.stub()
    stub.Generate(request("llama", ["Hi"], 2), timeout=120)
    port = own_server.metrics_port
    before = metric(port, "llem_requests_total", method="GenerateStream", status="CANCELLED")
    for _ in range(5):
        call = stub.GenerateStream(request("llama", ["Hello"], LONG, min_new=LONG), timeout=120)
        next(call)
        call.cancel()
    # The RPC's own count is taken when grpc lets go of the handler: wait for it.
    deadline = time.monotonic() + 10
    while metric(port, "llem_requests_total", method="GenerateStream", status="CANCELLED") < before + 5:
        assert metric(port, "llem_requests_total", method="GenerateStream", status="UNKNOWN") == 0
        assert time.monotonic() < deadline, "cancelled streams were not counted as CANCELLED"
        time.sleep(0.05)


def test_worker_killed_mid_stream_ends_it_with_unavailable_and_recovers(own_server):
    stub = own_server.stub()
    stub.Generate(request("llama", ["Hi"], 2), timeout=120)  # loaded, so the stream starts at once
    (pid,) = worker_pids(own_server)
    call = stub.GenerateStream(request("llama", ["Hello"], LONG, min_new=LONG), timeout=120)
    assert next(call).WhichOneof("event") == "chunk"
    psutil.Process(pid).kill()
    with pytest.raises(grpc.RpcError) as err:
        for m in call:
            assert m.WhichOneof("event") == "chunk"
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "died" in err.value.details() and "restart" in err.value.details()
    assert error_reason(err.value) == "WORKER_RESTARTED"
    # The server stays up, starts a new worker and serves the next request.
    r = stub.Generate(request("llama", ["Hi"], 4), timeout=120)
    assert r.usage.output_tokens >= 1 and not r.cache_hit
    (new_pid,) = worker_pids(own_server)
    assert new_pid != pid
    assert own_server.proc.poll() is None


def _listed_and_health(srv, config_hash: str) -> tuple[list, int | str]:
    """Its states in ListModels, and its health ("NOT_FOUND" once forgotten)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch = srv.channel()
    listed = [m.state for m in srv.stub().ListModels(pb.ListModelsRequest(), timeout=30).models
              if m.config_hash == config_hash]
    try:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=config_hash), timeout=10)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.NOT_FOUND
        return listed, "NOT_FOUND"
    return listed, health.status


def _wait_running(srv, config_hash: str) -> None:
    deadline = time.monotonic() + 60
    while not any(m.active_requests for m in srv.stub().ListModels(pb.ListModelsRequest(), timeout=30).models
                  if m.config_hash == config_hash):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_model_reloaded_by_a_queued_request_after_a_worker_death_is_listed_ready(own_server):
    """The worker dies under a request while another waits behind it: the waiting one loads the
    model again on the new worker, and the list and per-model health must say READY/SERVING
    (they said LOADING/NOT_SERVING for good, and later requests could never mend it)."""
    from grpc_health.v1 import health_pb2

    stub = own_server.stub()
    h = stub.Generate(request("llama", ["Hi"], 2), timeout=120).config_hash
    (pid,) = worker_pids(own_server)
    running = stub.Generate.future(request("llama", ["Hello"], LONG, min_new=LONG), timeout=120)
    _wait_running(own_server, h)
    queued = stub.Generate.future(request("llama", ["Hi"], 2), timeout=120)
    time.sleep(0.3)
    psutil.Process(pid).kill()
    with pytest.raises(grpc.RpcError) as err:
        running.result()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not queued.result().cache_hit  # loaded again on the new worker
    for _ in range(2):
        assert stub.Generate(request("llama", ["Hi"], 2), timeout=120).cache_hit
    assert _listed_and_health(own_server, h) == ([pb.MODEL_STATE_READY], health_pb2.HealthCheckResponse.SERVING)


def test_an_unload_queued_between_requests_leaves_the_reloaded_model_listed(own_server):
    """UnloadModel waits behind a running request, and a Generate for the same model waits
    behind the unload: that Generate loads the model again, and the list must show it."""
    from grpc_health.v1 import health_pb2

    stub = own_server.stub()
    h = stub.Generate(request("llama", ["Hi"], 2), timeout=120).config_hash
    running = stub.Generate.future(request("llama", ["Hello"], 1500, min_new=1500), timeout=120)
    _wait_running(own_server, h)
    unload = stub.UnloadModel.future(pb.UnloadModelRequest(config_hash=h), timeout=120)
    time.sleep(0.3)
    queued = stub.Generate.future(request("llama", ["Hi"], 2), timeout=120)
    running.result()
    assert unload.result().unloaded
    assert not queued.result().cache_hit
    assert _listed_and_health(own_server, h) == ([pb.MODEL_STATE_READY], health_pb2.HealthCheckResponse.SERVING)
    # and an unload with nobody waiting forgets the model
    assert stub.UnloadModel(pb.UnloadModelRequest(config_hash=h), timeout=60).unloaded
    assert _listed_and_health(own_server, h)[0] == []


def test_an_unload_whose_caller_gave_up_still_leaves_the_list(own_server):
    """UnloadModel waits behind a running request and its caller's deadline passes: the worker
    still unloads, so the list and health must drop the model (they said READY/SERVING for
    good, and the next load's evictions were then lost too)."""
    from grpc_health.v1 import health_pb2

    stub = own_server.stub()
    h = stub.Generate(request("llama", ["Hi"], 2), timeout=120).config_hash
    running_hash = stub.LoadModel(pb.LoadModelRequest(model=pb.ModelConfig(model="gpt2")), timeout=120).config_hash
    running = stub.Generate.future(request("gpt2", ["Hello"], 1000, min_new=1000), timeout=120)  # 1024 positions
    _wait_running(own_server, running_hash)
    with pytest.raises(grpc.RpcError) as err:
        stub.UnloadModel(pb.UnloadModelRequest(config_hash=h), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    running.result()
    deadline = time.monotonic() + 30
    while _listed_and_health(own_server, h)[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _listed_and_health(own_server, h) == ([], "NOT_FOUND")
    # and the model the worker loads again is listed READY once more
    assert not stub.Generate(request("llama", ["Hi"], 2), timeout=120).cache_hit
    assert _listed_and_health(own_server, h) == ([pb.MODEL_STATE_READY], health_pb2.HealthCheckResponse.SERVING)
    assert running_hash in {m.config_hash for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models}


def test_beam_search_streams_its_sequences_once_chosen(stub):
    """Beam search has no per-step signal (transformers refuses a streamer with beams): the
    stream still carries the same text as Generate, sent once known, and says so."""
    req = request("llama", ["Hello world", "Energy"], 6, batch_size=2)
    req.model.pytorch.num_beams = 2
    unary = stub.Generate(req, timeout=120)
    chunks, final = split(list(stub.GenerateStream(req, timeout=120)))
    for c in unary.completions:
        mine = [ch for ch in chunks if ch.index == c.index]
        assert "".join(ch.text for ch in mine) == c.text
        assert [t for ch in mine for t in ch.token_ids] == list(c.token_ids)
    assert any(w.code == "STREAM_NOT_INCREMENTAL" for w in final.warnings)
    assert not final.timing.HasField("time_to_first_token_ms")  # no per-step signal to time it by


def test_a_worker_that_cannot_start_again_is_seen_and_refuses_queued_work(model_root, tmp_path):
    """The worker dies and every new one fails to start (a lost GPU, a broken install): health
    says so (readiness at once, liveness after 3 failed starts), each failure is logged, queued
    requests get UNAVAILABLE instead of waiting forever, and service resumes once a start works."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from _hardening import json_lines

    flag = tmp_path / "worker-cannot-start"
    srv = start_server(tmp_path / "srv", model_root, env={"LLEM_FAULT_START_FILE": str(flag)})
    try:
        stub = srv.stub()
        health = health_pb2_grpc.HealthStub(srv.channel())

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        def wait_for(service: str, want: int, within: float) -> None:
            deadline = time.monotonic() + within
            while status(service) != want:
                assert time.monotonic() < deadline, f"health {service!r} never became {want}"
                time.sleep(0.05)

        assert stub.Generate(request("llama", ["Hi"], 2), timeout=120).usage.output_tokens == 2
        flag.touch()
        (pid,) = worker_pids(srv)
        psutil.Process(pid).kill()
        wait_for("llem.v1.LlemService", health_pb2.HealthCheckResponse.NOT_SERVING, 10)
        with pytest.raises(grpc.RpcError) as err:  # queued while restarts fail: answered, not left waiting
            stub.Generate(request("llama", ["Hi"], 2), timeout=60)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "cannot start (3 tries" in err.value.details()
        assert error_reason(err.value) == "WORKER_RESTARTED"
        assert status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        flag.unlink()
        wait_for("llem.v1.LlemService", health_pb2.HealthCheckResponse.SERVING, 60)
        assert status("") == health_pb2.HealthCheckResponse.SERVING
        assert stub.Generate(request("llama", ["Hi"], 2), timeout=120).usage.output_tokens == 2
        events = [line["event"] for line in json_lines(srv)]
        assert events.count("worker_died") == 1 and events.count("worker_start_failed") >= 3
        assert "worker_restarted" in events
    finally:
        stop_server(srv)


def test_sigterm_while_the_worker_restarts_is_a_clean_stop(model_root, tmp_path):
    """A deploy that lands just after a worker crash: the stop is not taken for a second crash
    (a false worker_died, and yet another worker started during shutdown)."""
    from _hardening import json_lines

    srv = start_server(tmp_path / "srv", model_root)
    try:
        assert srv.stub().Generate(request("llama", ["Hi"], 2), timeout=120).usage.output_tokens == 2
        (pid,) = worker_pids(srv)
        psutil.Process(pid).kill()
        time.sleep(0.2)  # the new worker is starting
        children = psutil.Process(srv.proc.pid).children(recursive=True)
        assert srv.stop(60) == 0
        events = [line["event"] for line in json_lines(srv)]
        after = events[events.index("server_draining"):]
        assert "worker_died" not in after and "worker_restarted" not in after, events
        assert events.count("worker_died") == 1
        # Orphans of the stopped server (a worker being spawned, multiprocessing's resource
        # tracker) exit on their own a moment later; one still running after 10 s is a leak.
        _, alive = psutil.wait_procs(children, timeout=10)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [(p.pid, p.name(), p.cmdline()[-3:]) for p in alive]
    finally:
        stop_server(srv)


def test_a_request_given_up_while_the_worker_restarts_never_runs(own_server):
    """Its caller's deadline passes while the worker restarts: the dispatcher, waiting for the
    worker, used to send the dead job anyway, and the next request then waited behind 4000
    tokens nobody wanted while the device counted as idle."""
    stub = own_server.stub()
    stub.Generate(request("llama", ["Hi"], 2), timeout=120)
    (pid,) = worker_pids(own_server)
    psutil.Process(pid).kill()

    def wait_state(want: str) -> None:
        deadline = time.monotonic() + 60
        while stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).devices[0].worker_state != want:
            assert time.monotonic() < deadline
            time.sleep(0.02)

    wait_state("restarting")  # the front has seen the death: the next request waits for the new worker
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request("llama", ["Hello"], 4000, min_new=4000), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_state("ready")
    r = stub.Generate(request("llama", ["Hi"], 2), timeout=120)
    assert r.usage.output_tokens == 2
    # The new worker's first request is this one: the dead job neither loaded the model nor ran.
    assert not r.cache_hit
    (info,) = [m for m in stub.ListModels(pb.ListModelsRequest(), timeout=30).models if m.config_hash == r.config_hash]
    assert info.use_count == 1
