"""The service end to end: a real llem-server on loopback, real transformers, real bitsandbytes."""
from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys

import grpc
import pytest
from llem.v1 import llem_pb2 as pb

from llem_client import Client, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied

from conftest import ROOT, start_server, stop_server

GREEDY = {"preset": "deterministic"}


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def kwargs_of(resp) -> dict:
    return {k: json.loads(v) for k, v in resp.effective_config.generate_kwargs.items()}


def load_kwargs_of(resp) -> dict:
    return {k: json.loads(v) for k, v in resp.effective_config.load_kwargs.items()}


# -- contract and packaging ------------------------------------------------------------

def test_committed_stubs_match_the_proto():
    out = subprocess.run([sys.executable, str(ROOT / "buildscripts" / "gen_stubs.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_client_imports_without_torch_or_transformers():
    code = ("import sys, llem_client, llem_client.cli, llem.v1.llem_pb2_grpc; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_front_process_never_loads_torch(server, client):
    """Only workers import torch (docs/architecture.md): the front stays small and starts fast.
    A torch object in a worker's message would import it while unpickling."""
    client.generate(["Hi"], model="llama", decoder=GREEDY, max_output_tokens=2)
    client.server_info()
    maps = open(f"/proc/{server.proc.pid}/maps").read()
    assert "libtorch" not in maps


def test_compile_backends_offered_are_usable_ones(client):
    backends = set(client.server_info().compile_backends)
    assert {"inductor", "eager", "aot_eager"} <= backends
    assert not [b for b in backends if "TESTING_ONLY" in b or "minifier" in b or b == "tvm"]


# -- generation ---------------------------------------------------------------------

def test_generate_returns_completions_in_prompt_order_with_real_token_counts(client):
    prompts = ["Hello", "The quick brown fox jumps over", "Café 東京 🙂"]
    r = client.generate(prompts, model="llama", decoder=GREEDY, max_output_tokens=6, pytorch={"batch_size": 2})
    assert [c.index for c in r.completions] == [0, 1, 2]
    assert len(r.config_hash) == 64
    for c in r.completions:
        assert c.output_tokens == len(c.token_ids) <= 6
        assert c.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert r.usage.output_tokens == sum(c.output_tokens for c in r.completions)
    assert r.usage.input_tokens == sum(c.input_tokens for c in r.completions)
    # input tokens are the prompt's own, not the padded width of the batch
    assert r.completions[0].input_tokens < r.completions[1].input_tokens
    assert r.effective_config.decoder.do_sample is False
    assert r.effective_config.max_output_tokens == 6


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_left_padding_gives_the_same_greedy_text_alone_and_in_a_padded_batch(client, model):
    short = "Café"
    alone = client.generate([short], model=model, decoder=GREEDY, max_output_tokens=8)
    batch = client.generate(["A much longer prompt about energy and joules", short, "Hi"], model=model,
                            decoder=GREEDY, max_output_tokens=8, pytorch={"batch_size": 3})
    assert batch.completions[1].token_ids == alone.completions[0].token_ids
    assert batch.completions[1].text == alone.completions[0].text


def test_finish_reason_stop_cuts_at_eos_and_counts_nothing_after(client, model_root, tmp_path):
    """Make the greedy continuation's 3rd token an EOS id (via generation_config) and check the cut."""
    probe = client.generate(["Hello world"], model="gpt2", decoder=GREEDY, max_output_tokens=8,
                            pytorch={"batch_size": 1})
    ids = list(probe.completions[0].token_ids)
    stop_at = next(i for i, t in enumerate(ids) if t not in ids[:i])  # first new distinct token
    eos_variant = model_root / "gpt2-eos"
    if not eos_variant.exists():
        import shutil

        shutil.copytree(model_root / "gpt2", eos_variant)
        gc_path = eos_variant / "generation_config.json"
        cfg = json.loads(gc_path.read_text())
        cfg["eos_token_id"] = [cfg.get("eos_token_id", 0), ids[stop_at]]
        gc_path.write_text(json.dumps(cfg))
    r = client.generate(["Hello world", "x"], model="gpt2-eos", decoder=GREEDY, max_output_tokens=8,
                        pytorch={"batch_size": 2})
    c = r.completions[0]
    assert c.finish_reason == pb.FINISH_REASON_STOP
    assert list(c.token_ids) == ids[: stop_at + 1]
    assert c.output_tokens == stop_at + 1


def test_effective_decoder_is_what_generate_used(client, model_root):
    """Greedy search reports no sampling values (it used none), and sampling reports the values
    that ran: the model's generation_config where set, transformers' defaults elsewhere."""
    variant = model_root / "llama-gc"
    if not variant.exists():
        import shutil

        shutil.copytree(model_root / "llama", variant)
        gc_path = variant / "generation_config.json"
        gc_path.write_text(json.dumps({**json.loads(gc_path.read_text()), "temperature": 0.6, "top_k": 20}))
    greedy = client.generate(["Hi"], model="llama-gc", decoder=GREEDY, max_output_tokens=2).effective_config.decoder
    assert greedy.do_sample is False
    assert not any(greedy.HasField(f) for f in ("temperature", "top_k", "top_p", "min_p"))
    sampled = client.generate(["Hi"], model="llama-gc", decoder={"do_sample": True, "top_p": 0.8},
                              max_output_tokens=2).effective_config.decoder
    assert (sampled.temperature, sampled.top_k, sampled.top_p) == (pytest.approx(0.6), 20, pytest.approx(0.8))
    plain = client.generate(["Hi"], model="llama", decoder={"do_sample": True}, max_output_tokens=2)
    assert (plain.effective_config.decoder.temperature, plain.effective_config.decoder.top_k) == (1.0, 50)


def test_generation_settings_shipped_with_a_model_are_used_and_said(client, model_root):
    """An unset field sends no kwarg, so generate() takes the checkpoint's generation_config:
    beams and n-gram blocking shipped with the weights change output and energy, and the answer
    must say so. Beam search from the checkpoint must not trip the per-step hook either."""
    variant = model_root / "llama-beams"
    if not variant.exists():
        import shutil

        shutil.copytree(model_root / "llama", variant)
        gc_path = variant / "generation_config.json"
        gc_path.write_text(json.dumps({**json.loads(gc_path.read_text()), "num_beams": 2, "no_repeat_ngram_size": 2,
                                       "max_new_tokens": 20}))
    prompts = ["The energy of", "a b"]
    r = client.generate(prompts, model="llama-beams", decoder=GREEDY, max_output_tokens=6)
    (w,) = [w for w in r.warnings if w.code == "MODEL_GENERATION_CONFIG"]
    assert "num_beams=2" in w.message and "no_repeat_ngram_size=2" in w.message
    assert "max_new_tokens" not in w.message  # always sent (max_output_tokens): the checkpoint's is unused
    assert all(c.output_tokens <= 6 for c in r.completions)
    # What ran is what the same settings sent explicitly give on the plain model.
    explicit = client.generate(prompts, model="llama", decoder=GREEDY, max_output_tokens=6,
                               pytorch={"num_beams": 2, "no_repeat_ngram_size": 2})
    assert [list(c.token_ids) for c in r.completions] == [list(c.token_ids) for c in explicit.completions]
    assert "MODEL_GENERATION_CONFIG" not in [w.code for w in explicit.warnings]
    streamed = list(client.generate_stream(prompts, model="llama-beams", decoder=GREEDY, max_output_tokens=6))
    final = streamed[-1].final
    assert [c.text for c in final.completions] == [c.text for c in r.completions]
    assert "STREAM_NOT_INCREMENTAL" in [w.code for w in final.warnings]
    # Set in the request, the field is the request's: nothing to report for it.
    own = client.generate(prompts, model="llama-beams", decoder=GREEDY, max_output_tokens=6,
                          pytorch={"num_beams": 1, "no_repeat_ngram_size": 0})
    assert "MODEL_GENERATION_CONFIG" not in [w.code for w in own.warnings]


def test_random_seed_is_applied_per_request_and_echoed(client):
    sample = {"do_sample": True, "temperature": 1.5, "top_k": 0}
    a = client.generate(["Hello"], model="llama", decoder=sample, max_output_tokens=12, random_seed=7)
    b = client.generate(["Hello"], model="llama", decoder=sample, max_output_tokens=12, random_seed=7)
    c = client.generate(["Hello"], model="llama", decoder=sample, max_output_tokens=12, random_seed=8)
    assert a.completions[0].token_ids == b.completions[0].token_ids
    assert a.completions[0].token_ids != c.completions[0].token_ids
    assert a.effective_config.random_seed == 7 and c.effective_config.random_seed == 8


def test_max_input_tokens_truncates_and_says_which_prompts_it_cut(client):
    r = client.generate(["Hi", "one two three four five six seven eight nine ten eleven twelve"], model="llama",
                        decoder=GREEDY, max_output_tokens=2, max_input_tokens=4, pytorch={"batch_size": 2})
    assert r.completions[1].input_tokens == 4 and r.completions[0].input_tokens < 4
    (cut,) = [w.message for w in r.warnings if w.code == "INPUT_TRUNCATED"]
    assert "prompts[1]" in cut and "prompts[0]" not in cut and "max_input_tokens (4)" in cut
    whole = client.generate(["Hi"], model="llama", decoder=GREEDY, max_output_tokens=2, max_input_tokens=4)
    assert not [w for w in whole.warnings if w.code == "INPUT_TRUNCATED"]


def test_energy_is_absent_with_a_reason_on_a_machine_without_gpu(client):
    r = client.generate(["Hello"], model="llama", decoder=GREEDY, max_output_tokens=2)
    assert not r.energy.available
    assert "GPU" in r.energy.unavailable_reason
    assert r.energy.absence == pb.ENERGY_ABSENCE_NOT_METERED  # for a program: every request here
    assert not r.energy.HasField("joules_per_output_token")
    assert any(w.code == "ENERGY_UNAVAILABLE" for w in r.warnings)


# -- every configuration field through gRPC ----------------------------------------------------

# Each case: (pytorch, decoder, extra request kwargs, check(response)).
FIELD_CASES = {
    "attn_eager": ({"attn_implementation": "eager"}, GREEDY, {},
                   lambda r: load_kwargs_of(r)["attn_implementation"] == "eager"),
    "attn_sdpa": ({"attn_implementation": "sdpa"}, GREEDY, {},
                  lambda r: load_kwargs_of(r)["attn_implementation"] == "sdpa"),
    "compile": ({"torch_compile": True, "torch_compile_backend": "eager", "torch_compile_mode": "default"}, GREEDY,
                {}, lambda r: r.effective_config.compiled and r.effective_config.model.pytorch.torch_compile_backend
                == "eager"),
    "bnb_4bit": ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_type": "fp4",
                  "bnb_4bit_use_double_quant": True}, GREEDY, {},
                 lambda r: load_kwargs_of(r)["quantization_config"]["bnb_4bit_quant_type"] == "fp4"),
    "bnb_8bit": ({"load_in_8bit": True}, GREEDY, {},
                 lambda r: load_kwargs_of(r)["quantization_config"] == {"load_in_8bit": True}),
    "device_map_cpu": ({"device_map": "cpu", "revision": "main", "trust_remote_code": False, "num_processes": 1},
                       GREEDY, {}, lambda r: load_kwargs_of(r)["device_map"] == "cpu"),
    "max_memory": ({"max_memory": {"cpu": "2GiB"}}, GREEDY, {}, lambda r: "max_memory" in load_kwargs_of(r)),
    "generation_fields": ({"batch_size": 2, "use_cache": True, "cache_implementation": "static",
                           "no_repeat_ngram_size": 2}, GREEDY, {},
                          lambda r: kwargs_of(r)["cache_implementation"] == "static"
                          and kwargs_of(r)["no_repeat_ngram_size"] == 2),
    "no_cache": ({"use_cache": False}, GREEDY, {}, lambda r: kwargs_of(r)["use_cache"] is False),
    "beams": ({"num_beams": 2, "early_stopping": True, "length_penalty": 0.5, "batch_size": 2}, GREEDY, {},
              lambda r: kwargs_of(r)["num_beams"] == 2 and kwargs_of(r)["length_penalty"] == 0.5),
    "prompt_lookup": ({"prompt_lookup_num_tokens": 2, "batch_size": 1}, GREEDY, {},
                      lambda r: kwargs_of(r)["prompt_lookup_num_tokens"] == 2),
    "sampling": ({}, {"temperature": 0.7, "do_sample": True, "top_k": 5, "top_p": 0.9, "min_p": 0.05,
                      "repetition_penalty": 1.2, "min_new_tokens": 3}, {"random_seed": 3},
                 lambda r: kwargs_of(r)["top_k"] == 5 and kwargs_of(r)["min_p"] == 0.05
                 and all(c.output_tokens >= 3 for c in r.completions)),
    "preset": ({}, {"preset": "creative"}, {},
               lambda r: kwargs_of(r)["repetition_penalty"] == 1.1 and kwargs_of(r)["top_p"] == 0.9),
}


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
def test_each_configuration_field_runs_through_grpc(client, case):
    pytorch, decoder, extra, check = FIELD_CASES[case]
    prompts = ["Hello world"] if pytorch.get("prompt_lookup_num_tokens") else ["Hello world", "Energy"]
    r = client.generate(prompts, model="llama", pytorch=pytorch, decoder=decoder, max_output_tokens=5,
                        max_input_tokens=32, request_id=f"field-{case}", **extra)
    assert r.request_id == f"field-{case}"
    assert len(r.completions) == len(prompts)
    assert check(r), r.effective_config


def test_field_cases_cover_every_pytorch_and_decoder_field():
    used = {("pytorch", k) for p, _, _, _ in FIELD_CASES.values() for k in p}
    used |= {("decoder", k) for _, d, _, _ in FIELD_CASES.values() for k in d}
    wanted = {("pytorch", f.name) for f in pb.PyTorchConfig.DESCRIPTOR.fields}
    wanted |= {("decoder", f.name) for f in pb.DecoderConfig.DESCRIPTOR.fields}
    assert wanted - used == set()


def test_quantized_models_are_smaller(client):
    sizes = {}
    for name, pytorch in {"fp32": {}, "8bit": {"load_in_8bit": True}, "4bit": {"load_in_4bit": True}}.items():
        sizes[name] = client.load_model(model="llama", pytorch=pytorch).model.memory_bytes
    assert sizes["4bit"] < sizes["8bit"] < sizes["fp32"]


# -- validation ---------------------------------------------------------------------------

def test_all_problems_come_back_together_as_field_violations(client):
    with pytest.raises(InvalidArgument) as exc:
        client.generate(["x"], model="llama",
                        pytorch={"load_in_4bit": True, "load_in_8bit": True, "torch_compile_mode": "default",
                                 "early_stopping": True},
                        decoder={"temperature": 5.0})
    fields = {f for f, _ in exc.value.field_violations}
    assert {"model.pytorch.load_in_8bit", "model.pytorch.torch_compile_mode", "model.pytorch.early_stopping",
            "decoder.temperature"} <= fields


def test_status_codes_for_preconditions_permissions_and_missing_models(client):
    """Each with the ErrorInfo reason a program decides on (two PERMISSION_DENIED differ)."""
    with pytest.raises(FailedPrecondition, match="flash") as e:
        client.generate(["x"], model="llama", pytorch={"attn_implementation": "flash_attention_2"})
    assert e.value.reason == "NOT_SUPPORTED_HERE"
    with pytest.raises(FailedPrecondition) as e:
        client.generate(["x"], model="llama", pytorch={"cache_implementation": "offloaded_static"})
    assert e.value.reason == "NOT_SUPPORTED_HERE"
    with pytest.raises(PermissionDenied) as e:
        client.generate(["x"], model="llama", pytorch={"trust_remote_code": True})
    assert e.value.reason == "REMOTE_CODE_NOT_ALLOWED"
    with pytest.raises(NotFound) as e:
        client.generate(["x"], model="no-such-model")
    assert e.value.reason == "MODEL_NOT_FOUND"
    with pytest.raises(PermissionDenied) as e:
        client.generate(["x"], model="../../etc")
    assert e.value.reason == "OUTSIDE_MODEL_ROOT"
    with pytest.raises(InvalidArgument) as e:
        client.generate(["x"], model="llama", decoder={"temperature": 5.0})
    assert e.value.reason == "INVALID_REQUEST"
    with pytest.raises(NotFound) as e:
        client.unload_model("0" * 64)
    assert e.value.reason == "UNKNOWN_CONFIG_HASH"


def test_bad_requests_leave_the_server_serving(client, stub):
    for _ in range(3):  # raw stub: the Python client would refuse an empty prompt list itself
        with pytest.raises(grpc.RpcError) as exc:
            stub.Generate(pb.GenerateRequest(model=pb.ModelConfig(model="llama")))
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts" in exc.value.details()
    assert client.generate(["ok"], model="llama", decoder=GREEDY, max_output_tokens=2).completions


def test_unload_without_a_hash_is_invalid_not_not_found(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub.UnloadModel(pb.UnloadModelRequest(config_hash=""), timeout=30)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "config_hash" in exc.value.details()


def test_input_the_worker_refuses_names_its_field(client):
    """Checks that only the loaded model can make (an empty prompt, too many positions) still
    answer INVALID_ARGUMENT with a BadRequest field path, not just words."""
    with pytest.raises(InvalidArgument) as empty:
        client.generate(["fine", ""], model="gpt2", decoder=GREEDY, max_output_tokens=2, pytorch={"batch_size": 2})
    assert empty.value.field_violations[0][0] == "prompts[1]"
    with pytest.raises(InvalidArgument) as long:  # GPT-2's table has 1024 positions
        client.generate(["word " * 1000], model="gpt2", decoder=GREEDY, max_input_tokens=1000,
                        max_output_tokens=100)
    assert long.value.field_violations[0][0] == "max_output_tokens"
    assert "1024 positions" in long.value.field_violations[0][1]
    assert client.generate(["ok"], model="gpt2", decoder=GREEDY, max_output_tokens=2).completions


def test_a_max_memory_too_small_for_the_model_is_refused_and_not_cached(client):
    """transformers would leave the weights that fit no budget on the meta device ("offloaded to
    disk"), and every generate would then fail inside torch: the load must fail, naming the field."""
    tiny = {"max_memory": {"cpu": "1KB"}}
    for _ in range(2):  # the second try must not find a broken model in the cache
        with pytest.raises(InvalidArgument) as exc:
            client.generate(["a"], model="llama", pytorch=tiny, decoder=GREEDY, max_output_tokens=2)
        assert exc.value.field_violations[0][0] == "model.pytorch.max_memory"
        assert "disk" in exc.value.field_violations[0][1]
    assert not [m for m in client.list_models().models
                if dict(m.config.pytorch.max_memory) == {"cpu": "1KB"} and m.state == pb.MODEL_STATE_READY]
    ok = client.generate(["a"], model="llama", pytorch={"max_memory": {"cpu": "10MB"}}, decoder=GREEDY,
                         max_output_tokens=2)
    assert ok.completions[0].output_tokens == 2

# -- the model cache ------------------------------------------------------------------------

def test_second_request_is_a_cache_hit_without_reload(client):
    cfg = {"attn_implementation": "eager", "device_map": "auto"}
    first = client.generate(["a"], model="gpt2", pytorch=cfg, decoder=GREEDY, max_output_tokens=2)
    before = {m.config_hash: m for m in client.list_models().models}[first.config_hash]
    second = client.generate(["b"], model="gpt2", pytorch={"attn_implementation": "eager"},  # device_map default
                             decoder={"temperature": 0.0}, max_output_tokens=3)
    after = {m.config_hash: m for m in client.list_models().models}[first.config_hash]
    assert second.config_hash == first.config_hash and second.cache_hit
    assert second.timing.load_ms == 0.0
    assert after.loaded_unix == before.loaded_unix and after.load_time_s == before.load_time_s
    assert after.use_count == before.use_count + 1
    assert after.state == pb.MODEL_STATE_READY and after.memory_bytes > 0


def test_names_of_one_directory_share_one_cache_entry(client, model_root):
    first = client.generate(["a"], model="llama", decoder=GREEDY, max_output_tokens=2)
    for alias in ("./llama", "gpt2/../llama", str(model_root / "llama")):
        r = client.generate(["a"], model=alias, decoder=GREEDY, max_output_tokens=2)
        assert (r.config_hash, r.cache_hit, r.effective_config.model.model) == (first.config_hash, True, "llama")


def test_unload_returns_the_memory_and_forgets_the_model(client):
    loaded = client.load_model(model="gpt2", pytorch={"device_map": "cpu"})
    assert loaded.model.state == pb.MODEL_STATE_READY and loaded.model.load_time_s > 0
    assert not loaded.model.load_energy.available and loaded.model.load_energy.unavailable_reason
    assert "ENERGY_UNAVAILABLE" in [w.code for w in loaded.warnings]
    gone = client.unload_model(loaded.config_hash)
    # freed_bytes is only claimed when the worker saw the module collected (weakref dead)
    assert gone.unloaded and gone.freed_bytes == loaded.model.memory_bytes > 0
    assert loaded.config_hash not in {m.config_hash for m in client.list_models().models}
    with pytest.raises(NotFound):
        client.unload_model(loaded.config_hash)


def test_load_model_refuses_generation_fields(client):
    with pytest.raises(InvalidArgument) as exc:
        client.load_model(model="llama", pytorch={"batch_size": 4})
    assert exc.value.field_violations[0][0] == "model.pytorch.batch_size"


def test_server_info_reports_versions_devices_and_limits(client):
    info = client.server_info()
    assert {"torch", "transformers", "grpcio", "protobuf", "python"} <= set(info.versions)
    assert info.devices[0].kind == "cpu" and not info.devices[0].energy_sensor.available
    assert info.limits.max_models == 3
    assert "static" in info.cache_implementations and "inductor" in info.compile_backends
    # Only what a request can name and this CPU server runs: no CUDA-only caches or CUDA graphs,
    # no quantized cache without its package, nothing the proto has no value for.
    assert set(info.cache_implementations) == {"static", "dynamic", "sliding_window"}
    assert "cudagraphs" not in info.compile_backends


def test_every_offered_cache_implementation_runs(client):
    info = client.server_info()
    for cache in info.cache_implementations:
        r = client.generate(["Hi"], model="llama", decoder=GREEDY, max_output_tokens=2,
                            pytorch={"cache_implementation": cache})
        assert r.usage.output_tokens == 2, cache


def test_memory_counts_the_quantization_state(client, model_root):
    """4-bit weights carry per-block scales beside the packed weights (more of them without
    double quant, plus a second level with it): the footprint must count them, so nf4 with and
    without double quant cannot read the same."""
    sizes = {}
    for dq in (False, True):
        r = client.load_model(model="llama", pytorch={"load_in_4bit": True, "bnb_4bit_use_double_quant": dq})
        sizes[dq] = r.model.memory_bytes
    assert sizes[False] != sizes[True]
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ref = AutoModelForCausalLM.from_pretrained(model_root / "llama",
                                               quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert sizes[False] > ref.get_memory_footprint()  # parameters and buffers alone


@pytest.fixture(scope="module")
def small_cache_server(model_root, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("lru"), model_root, "--max-models", "2")
    yield srv
    stop_server(srv)


def test_lru_eviction_drops_the_least_recently_used_model(small_cache_server):
    with Client(small_cache_server.address, timeout=120) as c:
        a = c.load_model(model="llama").config_hash
        b = c.load_model(model="gpt2").config_hash
        c.generate(["touch a"], model="llama", decoder=GREEDY, max_output_tokens=1)  # a is now most recent
        d = c.load_model(model="gpt2", pytorch={"attn_implementation": "eager"}).config_hash
        cached = {m.config_hash for m in c.list_models().models}
        assert cached == {a, d}, "b was least recently used and must be the one evicted"
        assert b not in cached
        again = c.generate(["b again"], model="gpt2", decoder=GREEDY, max_output_tokens=1)
        assert again.config_hash == b and not again.cache_hit


def test_concurrent_first_requests_load_the_model_once(small_cache_server):
    pytorch = {"attn_implementation": "sdpa", "device_map": "cpu"}
    with Client(small_cache_server.address, timeout=120) as c:
        with cf.ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda i: c.generate([f"p{i}"], model="llama", pytorch=pytorch,
                                                         decoder=GREEDY, max_output_tokens=2), range(6)))
        assert sum(not r.cache_hit for r in results) == 1
        assert len({r.config_hash for r in results}) == 1
        entry = {m.config_hash: m for m in c.list_models().models}[results[0].config_hash]
        assert entry.use_count == 6


# Combinations transformers fails inside generate() (RuntimeError, or an IndexError that
# depends on the generated text): refused up front, naming the field, never INTERNAL.
@pytest.mark.parametrize("pytorch", [
    {"prompt_lookup_num_tokens": 2, "use_cache": False},
    {"prompt_lookup_num_tokens": 2, "cache_implementation": "static"},
    {"prompt_lookup_num_tokens": 2, "cache_implementation": "sliding_window"},
], ids=["no_cache", "static", "sliding_window"])
def test_prompt_lookup_on_a_cache_it_cannot_use_is_refused_by_name(client, pytorch):
    with pytest.raises(InvalidArgument) as exc:
        client.generate(["The quick brown fox jumps"], model="gpt2", pytorch=pytorch, decoder=GREEDY,
                        max_output_tokens=6)
    assert [f for f, _ in exc.value.field_violations] == ["model.pytorch.prompt_lookup_num_tokens"]
    # The same request with a dynamic cache runs (and is what a user can fall back to).
    ok = {k: v for k, v in pytorch.items() if k == "prompt_lookup_num_tokens"}
    assert client.generate(["The quick brown fox jumps"], model="gpt2", pytorch=ok, decoder=GREEDY,
                           max_output_tokens=6).usage.output_tokens >= 1


def test_min_new_tokens_above_max_output_tokens_runs_to_the_limit(client):
    r = client.generate(["Hi", "There"], model="llama", decoder={**GREEDY, "min_new_tokens": 50},
                        max_output_tokens=5)
    assert [c.output_tokens for c in r.completions] == [5, 5]
    assert r.effective_config.decoder.min_new_tokens == 5
    assert "MIN_NEW_TOKENS_CAPPED" in {w.code for w in r.warnings}


def test_server_info_names_the_loaded_models_cache_keys(client):
    r = client.generate(["Hi"], model="llama", decoder=GREEDY, max_output_tokens=2)
    device = client.server_info().devices[0]
    assert r.config_hash in device.loaded_config_hashes
    assert set(device.loaded_config_hashes) <= {m.config_hash for m in client.list_models().models}
