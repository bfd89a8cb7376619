"""llem_server.config: validation rules, presets, greedy rule, hashing, kwargs mapping."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llem.v1 import llem_pb2 as pb
from llem_server.config import (
    GENERATION_FIELDS,
    LOAD_FIELDS,
    MIN_TEMPERATURE,
    PRESETS,
    Capabilities,
    ConfigError,
    LoadConfig,
    Violation,
    canonical_json,
    resolve_generate,
    resolve_load,
)

IA, FP, PD = "INVALID_ARGUMENT", "FAILED_PRECONDITION", "PERMISSION_DENIED"

CPU = Capabilities()
GPU = Capabilities(
    cuda=True,
    device_count=2,
    compute_capability=(9, 0),
    flash_attn_2=True,
    flash_attn_3=True,
    quantized_cache=True,
)


def make(pytorch=None, decoder=None, prompts=("hello",), model="org/model", precision=0, **top):
    return pb.GenerateRequest(
        model=pb.ModelConfig(model=model, precision=precision, pytorch=pb.PyTorchConfig(**(pytorch or {}))),
        decoder=pb.DecoderConfig(**(decoder or {})),
        prompts=list(prompts),
        **top,
    )


def ok(req=None, caps=CPU, local=False, **kw):
    return resolve_generate(req if req is not None else make(**kw), caps, model_is_local=local)


def error(req, caps=CPU, local=False) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        resolve_generate(req, caps, model_is_local=local)
    return info.value


def only(req, path, status=IA, caps=CPU, local=False) -> Violation:
    err = error(req, caps, local)
    assert [(v.field, v.status) for v in err.violations] == [(path, status)], err.violations
    assert err.status == status
    assert err.violations[0].description
    return err.violations[0]


def load_of(caps=CPU, local=False, **kw) -> LoadConfig:
    return ok(make(**kw), caps, local).load


# ---------------------------------------------------------------------------
# Defaults
# ---------------------------------------------------------------------------


def test_defaults_on_cpu():
    r = ok()
    assert r.load == LoadConfig(
        model="org/model", precision="fp32", attn_implementation="sdpa", torch_compile=False,
        torch_compile_mode=None, torch_compile_backend=None, load_in_4bit=False, load_in_8bit=False,
        bnb_4bit_compute_dtype=None, bnb_4bit_quant_type=None, bnb_4bit_use_double_quant=None,
        device_map="auto", max_memory=(), revision="main", trust_remote_code=False, num_processes=1,
    )
    p = r.plan
    assert (p.batch_size, p.max_input_tokens, p.max_output_tokens, p.random_seed) == (1, 512, 128, 42)
    assert p.greedy is False
    # None is a sentinel: only do_sample, whose llem default differs from transformers'.
    assert p.generate_kwargs == {"do_sample": True}
    assert p.decoder == {"do_sample": True}
    assert r.warnings == ()


def test_unset_precision_is_bf16_with_cuda():
    assert load_of(GPU).precision == "bf16"
    assert load_of(GPU).load_kwargs()["dtype"] == "bfloat16"
    assert load_of(CPU).load_kwargs()["dtype"] == "float32"


def test_default_token_limits_clamped_to_a_lower_server_limit():
    caps = Capabilities(max_input_tokens=100, max_output_tokens=50)
    p = ok(caps=caps).plan
    assert (p.max_input_tokens, p.max_output_tokens) == (100, 50)


def test_explicit_request_values():
    p = ok(max_input_tokens=64, max_output_tokens=8, random_seed=-7, pytorch={"batch_size": 3}).plan
    assert (p.batch_size, p.max_input_tokens, p.max_output_tokens, p.random_seed) == (3, 64, 8, -7)


# ---------------------------------------------------------------------------
# Validation rules: one failing case each
# ---------------------------------------------------------------------------

PT = "model.pytorch."

SINGLE = [
    # rule 1
    ("4bit_and_8bit", make(pytorch={"load_in_4bit": True, "load_in_8bit": True}), PT + "load_in_8bit", IA, CPU),
    # rule 2
    ("mode_without_compile", make(pytorch={"torch_compile_mode": "default"}), PT + "torch_compile_mode", IA, CPU),
    ("backend_without_compile", make(pytorch={"torch_compile_backend": "eager"}), PT + "torch_compile_backend", IA,
     CPU),
    ("mode_with_compile_false", make(pytorch={"torch_compile": False, "torch_compile_mode": "max-autotune"}),
     PT + "torch_compile_mode", IA, CPU),
    # rule 3
    ("bnb_dtype_without_4bit", make(pytorch={"bnb_4bit_compute_dtype": pb.BNB4BIT_COMPUTE_DTYPE_FLOAT16}),
     PT + "bnb_4bit_compute_dtype", IA, CPU),
    ("bnb_quant_with_8bit", make(pytorch={"load_in_8bit": True, "bnb_4bit_quant_type": pb.BNB4BIT_QUANT_TYPE_FP4}),
     PT + "bnb_4bit_quant_type", IA, CPU),
    ("bnb_double_false_without_4bit", make(pytorch={"bnb_4bit_use_double_quant": False}),
     PT + "bnb_4bit_use_double_quant", IA, CPU),
    # rule 4
    ("cache_impl_without_cache", make(pytorch={"use_cache": False,
                                               "cache_implementation": pb.CACHE_IMPLEMENTATION_STATIC}),
     PT + "cache_implementation", IA, CPU),
    # rule 5
    ("prompt_lookup_batched", make(pytorch={"prompt_lookup_num_tokens": 3, "batch_size": 2}, prompts=["a", "b"]),
     PT + "prompt_lookup_num_tokens", IA, CPU),
    ("prompt_lookup_with_beams", make(pytorch={"prompt_lookup_num_tokens": 3, "num_beams": 2}),
     PT + "prompt_lookup_num_tokens", IA, CPU),
    # transformers: "Assisted decoding requires a cache" (RuntimeError inside generate)
    ("prompt_lookup_without_cache", make(pytorch={"prompt_lookup_num_tokens": 2, "use_cache": False}),
     PT + "prompt_lookup_num_tokens", IA, CPU),
    # draft tokens written past a fixed-size cache: IndexError in index_copy_, data-dependent
    ("prompt_lookup_static_cache", make(pytorch={"prompt_lookup_num_tokens": 2,
                                                 "cache_implementation": pb.CACHE_IMPLEMENTATION_STATIC}),
     PT + "prompt_lookup_num_tokens", IA, CPU),
    # a quantized cache cannot be cropped (transformers: "requires a cache that can be cropped")
    ("prompt_lookup_quantized_cache", make(pytorch={"prompt_lookup_num_tokens": 2,
                                                    "cache_implementation": pb.CACHE_IMPLEMENTATION_QUANTIZED}),
     PT + "prompt_lookup_num_tokens", IA, GPU),
    ("prompt_lookup_sliding_window_cache", make(pytorch={"prompt_lookup_num_tokens": 2,
                                                         "cache_implementation": pb.CACHE_IMPLEMENTATION_SLIDING_WINDOW}),
     PT + "prompt_lookup_num_tokens", IA, CPU),
    # rule 6
    ("early_stopping_without_beams", make(pytorch={"early_stopping": True}), PT + "early_stopping", IA, CPU),
    ("early_stopping_false_without_beams", make(pytorch={"early_stopping": False}), PT + "early_stopping", IA, CPU),
    ("length_penalty_one_beam", make(pytorch={"length_penalty": 2.0, "num_beams": 1}), PT + "length_penalty", IA,
     CPU),
    # rule 7
    ("num_processes_2", make(pytorch={"num_processes": 2}), PT + "num_processes", IA, CPU),
    ("num_processes_0", make(pytorch={"num_processes": 0}), PT + "num_processes", IA, CPU),
    # rule 8: ranges
    ("temperature_low", make(decoder={"temperature": -0.1}), "decoder.temperature", IA, CPU),
    ("temperature_high", make(decoder={"temperature": 2.01}), "decoder.temperature", IA, CPU),
    ("temperature_nan", make(decoder={"temperature": math.nan}), "decoder.temperature", IA, CPU),
    ("temperature_inf", make(decoder={"temperature": math.inf}), "decoder.temperature", IA, CPU),
    ("top_p_low", make(decoder={"top_p": -0.01}), "decoder.top_p", IA, CPU),
    ("top_p_high", make(decoder={"top_p": 1.01}), "decoder.top_p", IA, CPU),
    ("top_p_nan", make(decoder={"top_p": math.nan}), "decoder.top_p", IA, CPU),
    ("repetition_penalty_low", make(decoder={"repetition_penalty": 0.09}), "decoder.repetition_penalty", IA, CPU),
    ("repetition_penalty_high", make(decoder={"repetition_penalty": 10.5}), "decoder.repetition_penalty", IA, CPU),
    ("min_p_low", make(decoder={"min_p": -0.5}), "decoder.min_p", IA, CPU),
    ("min_p_high", make(decoder={"min_p": 1.5}), "decoder.min_p", IA, CPU),
    ("min_p_neg_inf", make(decoder={"min_p": -math.inf}), "decoder.min_p", IA, CPU),
    ("top_k_negative", make(decoder={"top_k": -1}), "decoder.top_k", IA, CPU),
    ("min_new_tokens_0", make(decoder={"min_new_tokens": 0}), "decoder.min_new_tokens", IA, CPU),
    ("batch_size_0", make(pytorch={"batch_size": 0}), PT + "batch_size", IA, CPU),
    ("num_beams_0", make(pytorch={"num_beams": 0}), PT + "num_beams", IA, CPU),
    ("no_repeat_ngram_negative", make(pytorch={"no_repeat_ngram_size": -1}), PT + "no_repeat_ngram_size", IA, CPU),
    ("prompt_lookup_0", make(pytorch={"prompt_lookup_num_tokens": 0}), PT + "prompt_lookup_num_tokens", IA, CPU),
    # generate() raised OverflowError: 21 ** 240 exceeds the largest float
    ("length_penalty_overflows", make(pytorch={"num_beams": 2, "length_penalty": 240.0}, max_output_tokens=20),
     PT + "length_penalty", IA, CPU),
    # logits / 1e-40 overflow float32: "probability tensor contains inf, nan or element < 0"
    ("temperature_subnormal", make(decoder={"temperature": 1e-40}), "decoder.temperature", IA, CPU),
    ("length_penalty_nan", make(pytorch={"length_penalty": math.nan, "num_beams": 2}), PT + "length_penalty", IA,
     CPU),
    ("max_input_tokens_0", make(max_input_tokens=0), "max_input_tokens", IA, CPU),
    ("max_output_tokens_negative", make(max_output_tokens=-1), "max_output_tokens", IA, CPU),
    # rule 8: unknown enum values (another language can send any int)
    ("precision_unknown", make(precision=99), "model.precision", IA, CPU),
    ("attn_unknown", make(pytorch={"attn_implementation": 99}), PT + "attn_implementation", IA, CPU),
    ("bnb_dtype_unknown", make(pytorch={"load_in_4bit": True, "bnb_4bit_compute_dtype": 42}),
     PT + "bnb_4bit_compute_dtype", IA, CPU),
    ("bnb_quant_unknown", make(pytorch={"load_in_4bit": True, "bnb_4bit_quant_type": 7}), PT + "bnb_4bit_quant_type",
     IA, CPU),
    ("cache_unknown", make(pytorch={"cache_implementation": 77}), PT + "cache_implementation", IA, CPU),
    ("preset_unknown", make(decoder={"preset": -3}), "decoder.preset", IA, CPU),
    # rule 8: empties
    ("no_prompts", make(prompts=()), "prompts", IA, CPU),
    ("empty_model", make(model=""), "model.model", IA, CPU),
    ("blank_model", make(model="   "), "model.model", IA, CPU),
    # rule 8: server limits
    ("too_many_prompts", make(prompts=["p"] * 3), "prompts", IA, Capabilities(max_prompts=2)),
    ("max_input_over_limit", make(max_input_tokens=9000), "max_input_tokens", IA, CPU),
    ("max_output_over_limit", make(max_output_tokens=4097), "max_output_tokens", IA, CPU),
    # rule 9
    ("fa2_no_cuda", make(pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2}),
     PT + "attn_implementation", FP, CPU),
    ("fa2_no_package", make(pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2}),
     PT + "attn_implementation", FP, Capabilities(cuda=True, device_count=1, compute_capability=(9, 0))),
    ("fa2_old_gpu", make(pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2}),
     PT + "attn_implementation", FP,
     Capabilities(cuda=True, device_count=1, compute_capability=(7, 5), flash_attn_2=True)),
    ("fa3_on_ampere", make(pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_3}),
     PT + "attn_implementation", FP,
     Capabilities(cuda=True, device_count=1, compute_capability=(8, 0), flash_attn_2=True, flash_attn_3=True)),
    ("fa3_no_package", make(pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_3}),
     PT + "attn_implementation", FP,
     Capabilities(cuda=True, device_count=1, compute_capability=(9, 0), flash_attn_2=True)),
    ("fa2_fp32", make(precision=pb.PRECISION_FP32,
                      pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2}),
     PT + "attn_implementation", IA, GPU),
    # rule 10
    ("remote_code", make(pytorch={"trust_remote_code": True}), PT + "trust_remote_code", PD, CPU),
    # rule 11
    ("offloaded_static_no_cuda", make(pytorch={"cache_implementation": pb.CACHE_IMPLEMENTATION_OFFLOADED_STATIC}),
     PT + "cache_implementation", FP, CPU),
    ("offloaded_no_cuda", make(pytorch={"cache_implementation": pb.CACHE_IMPLEMENTATION_OFFLOADED}),
     PT + "cache_implementation", FP, CPU),
    ("quantized_cache_no_package", make(pytorch={"cache_implementation": pb.CACHE_IMPLEMENTATION_QUANTIZED}),
     PT + "cache_implementation", FP, CPU),
    ("cache_not_in_transformers", make(pytorch={"cache_implementation": pb.CACHE_IMPLEMENTATION_STATIC}),
     PT + "cache_implementation", FP, Capabilities(cache_implementations=frozenset({"dynamic"}))),
    ("device_map_cuda_no_cuda", make(pytorch={"device_map": "cuda"}), PT + "device_map", FP, CPU),
    ("device_map_cuda_index_missing", make(pytorch={"device_map": "cuda:2"}), PT + "device_map", FP, GPU),
    ("load_4bit_no_bnb", make(pytorch={"load_in_4bit": True}), PT + "load_in_4bit", FP,
     Capabilities(bitsandbytes=False)),
    ("load_8bit_no_bnb", make(pytorch={"load_in_8bit": True}), PT + "load_in_8bit", FP,
     Capabilities(bitsandbytes=False)),
    # compile mode / backend
    ("compile_mode_unknown", make(pytorch={"torch_compile": True, "torch_compile_mode": "fast"}),
     PT + "torch_compile_mode", IA, CPU),
    ("compile_backend_missing", make(pytorch={"torch_compile": True, "torch_compile_backend": "tvm"}),
     PT + "torch_compile_backend", FP, CPU),
    ("compile_backend_typo", make(pytorch={"torch_compile": True, "torch_compile_backend": "inducter"}),
     PT + "torch_compile_backend", IA, CPU),
    ("compile_cudagraphs_on_cpu", make(pytorch={"torch_compile": True, "torch_compile_backend": "cudagraphs"}),
     PT + "torch_compile_backend", FP, CPU),
    ("compile_reduce_overhead_on_cpu", make(pytorch={"torch_compile": True, "torch_compile_mode": "reduce-overhead"}),
     PT + "torch_compile_mode", FP, CPU),
    ("compile_mode_non_inductor", make(pytorch={"torch_compile": True, "torch_compile_mode": "max-autotune",
                                                "torch_compile_backend": "eager"}),
     PT + "torch_compile_mode", IA, CPU),
    # explicitly set empty strings
    ("empty_mode", make(pytorch={"torch_compile": True, "torch_compile_mode": ""}), PT + "torch_compile_mode", IA,
     CPU),
    ("empty_backend", make(pytorch={"torch_compile": True, "torch_compile_backend": ""}),
     PT + "torch_compile_backend", IA, CPU),
    ("empty_device_map", make(pytorch={"device_map": ""}), PT + "device_map", IA, CPU),
    ("empty_revision", make(pytorch={"revision": ""}), PT + "revision", IA, CPU),
    # device_map values
    ("device_map_unknown", make(pytorch={"device_map": "gpu"}), PT + "device_map", IA, GPU),
    ("device_map_meta", make(pytorch={"device_map": "meta"}), PT + "device_map", IA, GPU),
    # max_memory
    ("max_memory_bad_key", make(pytorch={"max_memory": {"gpu0": "1GiB"}}), PT + "max_memory", IA, GPU),
    ("max_memory_negative_key", make(pytorch={"max_memory": {"-1": "1GiB"}}), PT + "max_memory", IA, GPU),
    ("max_memory_bad_value", make(pytorch={"max_memory": {"cpu": "ten gigs"}}), PT + "max_memory", IA, CPU),
    ("max_memory_bits", make(pytorch={"max_memory": {"cpu": "10gb"}}), PT + "max_memory", IA, CPU),
    ("max_memory_disk", make(pytorch={"max_memory": {"disk": "10GiB"}}), PT + "max_memory", IA, CPU),
    ("max_memory_negative", make(pytorch={"max_memory": {"cpu": "-1GiB"}}), PT + "max_memory", IA, CPU),
    ("max_memory_fraction_bytes", make(pytorch={"max_memory": {"cpu": "1.5"}}), PT + "max_memory", IA, CPU),
    ("max_memory_duplicate", make(pytorch={"max_memory": {"0": "1GiB", "00": "2GiB"}}), PT + "max_memory", IA, GPU),
    ("max_memory_gpu_on_cpu", make(pytorch={"max_memory": {"0": "1GiB"}}), PT + "max_memory", FP, CPU),
    ("max_memory_gpu_missing", make(pytorch={"max_memory": {"5": "1GiB"}}), PT + "max_memory", FP, GPU),
    ("max_memory_single_device", make(pytorch={"device_map": "cpu", "max_memory": {"cpu": "1GiB"}}),
     PT + "max_memory", IA, CPU),
    # request id (it goes into logs and metrics)
    ("request_id_long", make(request_id="x" * 129), "request_id", IA, CPU),
    ("request_id_control", make(request_id="a\nb"), "request_id", IA, CPU),
]


@pytest.mark.parametrize("req,path,status,caps", [c[1:] for c in SINGLE], ids=[c[0] for c in SINGLE])
def test_single_violation(req, path, status, caps):
    only(req, path, status, caps)


def test_revision_on_local_directory():
    v = only(make(pytorch={"revision": "v2"}), PT + "revision", IA, CPU, local=True)
    assert v.description == "revision applies to hub ids; a local directory has no revisions"
    # "main" is the default and means nothing else for a directory.
    assert load_of(CPU, local=True, pytorch={"revision": "main"}).revision == "main"
    assert load_of(CPU, local=False, pytorch={"revision": "v2"}).revision == "v2"


def test_descriptions_name_the_rule():
    assert "num_beams" in only(make(pytorch={"early_stopping": True}), PT + "early_stopping").description
    assert "one model replica per device" in only(make(pytorch={"num_processes": 4}),
                                                  PT + "num_processes").description
    fa = only(make(pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2}),
              PT + "attn_implementation", FP, Capabilities(cuda=True, device_count=1, compute_capability=(7, 5)))
    assert "8.0" in fa.description and "7.5" in fa.description and "flash_attn" in fa.description
    assert "max_prompts" in only(make(prompts=["a"] * 3), "prompts", IA, Capabilities(max_prompts=2)).description
    assert "4096" in only(make(max_output_tokens=5000), "max_output_tokens").description


# Things that look close to a violation but are fine.
VALID = [
    ("temperature_bounds_0", {"decoder": {"temperature": 0.0}}, CPU),
    ("temperature_bounds_2", {"decoder": {"temperature": 2.0}}, CPU),
    ("top_p_bounds", {"decoder": {"top_p": 0.0, "min_p": 1.0}}, CPU),
    ("rep_bounds", {"decoder": {"repetition_penalty": 0.1}}, CPU),
    ("rep_bounds_hi", {"decoder": {"repetition_penalty": 10.0}}, CPU),
    ("top_k_zero_off", {"decoder": {"top_k": 0}}, CPU),
    ("prompt_lookup_batch_one", {"pytorch": {"prompt_lookup_num_tokens": 3}, "prompts": ["a", "b", "c"]}, CPU),
    ("prompt_lookup_one_prompt_big_batch", {"pytorch": {"prompt_lookup_num_tokens": 3, "batch_size": 8}}, CPU),
    ("beams_with_flags", {"pytorch": {"num_beams": 2, "early_stopping": True, "length_penalty": -0.5}}, CPU),
    ("compile_backend_eager_default_mode", {"pytorch": {"torch_compile": True, "torch_compile_backend": "eager",
                                                        "torch_compile_mode": "default"}}, CPU),
    ("use_cache_true_with_impl", {"pytorch": {"use_cache": True,
                                              "cache_implementation": pb.CACHE_IMPLEMENTATION_STATIC}}, CPU),
    ("offloaded_on_gpu", {"pytorch": {"cache_implementation": pb.CACHE_IMPLEMENTATION_OFFLOADED_STATIC}}, GPU),
    ("quantized_with_package", {"pytorch": {"cache_implementation": pb.CACHE_IMPLEMENTATION_QUANTIZED}}, GPU),
    ("fa2_on_gpu", {"pytorch": {"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2}}, GPU),
    ("fa3_on_gpu_fp16", {"precision": pb.PRECISION_FP16,
                         "pytorch": {"attn_implementation": pb.ATTN_IMPLEMENTATION_FLASH_ATTENTION_3}}, GPU),
    ("remote_code_allowed", {"pytorch": {"trust_remote_code": True}}, Capabilities(allow_remote_code=True)),
    ("device_map_cuda1", {"pytorch": {"device_map": "cuda:1"}}, GPU),
    ("device_map_strategies", {"pytorch": {"device_map": "balanced_low_0",
                                           "max_memory": {"0": "1GiB", "1": "2GB", "cpu": "1024"}}},
     GPU),
    ("min_new_equals_max", {"decoder": {"min_new_tokens": 10}, "max_output_tokens": 10}, CPU),
    ("length_penalty_large_short", {"pytorch": {"num_beams": 2, "length_penalty": 230.0}, "max_output_tokens": 20},
     CPU),
    ("length_penalty_very_negative", {"pytorch": {"num_beams": 2, "length_penalty": -1000.0}}, CPU),
    ("temperature_tiny", {"decoder": {"temperature": 1e-20}}, CPU),
    ("request_id_uuid", {"request_id": "0b7e4c1e-6a61-4d4c-9a1b-0e1d2c3b4a59"}, CPU),
    ("at_server_limits", {"prompts": ["p"] * 256, "max_input_tokens": 8192, "max_output_tokens": 4096}, CPU),
]


@pytest.mark.parametrize("kw,caps", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_edges(kw, caps):
    ok(make(**kw), caps)


def test_all_problems_reported_together():
    req = make(
        model="",
        precision=42,
        pytorch={
            "load_in_4bit": True, "load_in_8bit": True, "torch_compile_backend": "eager", "num_processes": 3,
            "trust_remote_code": True, "device_map": "cuda:0", "early_stopping": True,
            "cache_implementation": pb.CACHE_IMPLEMENTATION_OFFLOADED_STATIC,
        },
        decoder={"temperature": 3.0, "top_p": math.nan},
        prompts=(),
        max_output_tokens=0,
    )
    err = error(req)
    got = {(v.field, v.status) for v in err.violations}
    assert got == {
        ("model.model", IA), ("model.precision", IA), (PT + "load_in_8bit", IA),
        (PT + "torch_compile_backend", IA), (PT + "num_processes", IA), (PT + "trust_remote_code", PD),
        (PT + "device_map", FP), (PT + "early_stopping", IA), (PT + "cache_implementation", FP),
        ("decoder.temperature", IA), ("decoder.top_p", IA), ("prompts", IA), ("max_output_tokens", IA),
    }
    assert err.status == IA
    assert "model.model" in str(err) and "decoder.top_p" in str(err)


def test_status_precedence():
    # PERMISSION_DENIED beats FAILED_PRECONDITION; both reported.
    err = error(make(pytorch={"trust_remote_code": True, "device_map": "cuda"}))
    assert {v.status for v in err.violations} == {PD, FP}
    assert err.status == PD
    err = error(make(pytorch={"device_map": "cuda", "cache_implementation": pb.CACHE_IMPLEMENTATION_OFFLOADED}))
    assert err.status == FP and len(err.violations) == 2
    assert ConfigError([Violation("a", "b", FP), Violation("c", "d")]).status == IA


def test_unknown_field_numbers_from_a_newer_client_are_refused():
    raw = make().SerializeToString()
    # field 99 (varint 1) appended to the request, and to the nested PyTorchConfig
    newer = pb.GenerateRequest.FromString(raw + bytes([0x98, 0x06, 0x01]))
    assert only(newer, "request").description.startswith("carries field number(s) 99")
    pt = pb.PyTorchConfig.FromString(bytes([0x98, 0x06, 0x01]))
    req = make()
    req.model.pytorch.CopyFrom(pt)
    only(req, "model.pytorch")


# ---------------------------------------------------------------------------
# LoadModel
# ---------------------------------------------------------------------------

GEN_VALUES = {
    "batch_size": 1, "use_cache": True, "cache_implementation": pb.CACHE_IMPLEMENTATION_DYNAMIC, "num_beams": 1,
    "early_stopping": False, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "prompt_lookup_num_tokens": 1,
}


def test_generation_field_sets_partition_pytorch_config():
    names = {f.name for f in pb.PyTorchConfig.DESCRIPTOR.fields}
    assert LOAD_FIELDS | GENERATION_FIELDS == names
    assert not LOAD_FIELDS & GENERATION_FIELDS
    assert set(GEN_VALUES) == GENERATION_FIELDS
    # the proto's own numbering: load fields 1-19, generation fields 20+
    for f in pb.PyTorchConfig.DESCRIPTOR.fields:
        assert (f.number >= 20) == (f.name in GENERATION_FIELDS), f.name


@pytest.mark.parametrize("name", sorted(GENERATION_FIELDS))
def test_load_model_rejects_each_generation_field(name):
    m = pb.ModelConfig(model="org/model", pytorch=pb.PyTorchConfig(**{name: GEN_VALUES[name]}))
    with pytest.raises(ConfigError) as info:
        resolve_load(m, CPU, model_is_local=False)
    assert [(v.field, v.status) for v in info.value.violations] == [(f"model.pytorch.{name}", IA)]
    assert info.value.violations[0].description == f"{name} is a generation field; LoadModel does not use it"


def test_load_model_collects_with_load_problems_and_prefix():
    m = pb.ModelConfig(model="", pytorch=pb.PyTorchConfig(batch_size=4, num_beams=2, trust_remote_code=True))
    with pytest.raises(ConfigError) as info:
        resolve_load(m, CPU, model_is_local=False, field_prefix="config")
    assert {v.field for v in info.value.violations} == {
        "config.model", "config.pytorch.batch_size", "config.pytorch.num_beams", "config.pytorch.trust_remote_code"}
    assert info.value.status == IA


def test_load_model_matches_generate_hash():
    m = pb.ModelConfig(model="org/model", precision=pb.PRECISION_FP16,
                       pytorch=pb.PyTorchConfig(torch_compile=True, max_memory={"cpu": "2GiB"}))
    load, warnings = resolve_load(m, CPU, model_is_local=False)
    assert warnings == ()
    req = pb.GenerateRequest(model=m, prompts=["x"])
    req.model.pytorch.batch_size = 4
    req.model.pytorch.num_beams = 3
    assert resolve_generate(req, CPU, model_is_local=False).load.config_hash() == load.config_hash()


# ---------------------------------------------------------------------------
# Presets, overrides, greedy rule
# ---------------------------------------------------------------------------


def kwargs_of(decoder=None, **kw):
    return ok(make(decoder=decoder, **kw))


def test_preset_deterministic():
    r = kwargs_of({"preset": pb.DECODER_PRESET_DETERMINISTIC})
    assert r.plan.greedy
    assert r.plan.generate_kwargs == {"do_sample": False}
    assert r.plan.decoder == {"do_sample": False, "preset": "deterministic"}
    assert r.warnings == ()  # temperature 0 is the greedy switch itself, not a dropped field


def test_preset_standard():
    r = kwargs_of({"preset": pb.DECODER_PRESET_STANDARD})
    assert r.plan.generate_kwargs == {"do_sample": True, "temperature": 1.0, "top_p": 0.95}
    assert not r.plan.greedy


def test_preset_creative():
    r = kwargs_of({"preset": pb.DECODER_PRESET_CREATIVE})
    assert r.plan.generate_kwargs == {"do_sample": True, "temperature": 0.8, "top_p": 0.9,
                                      "repetition_penalty": 1.1}
    assert r.plan.decoder == {**r.plan.generate_kwargs, "preset": "creative"}


def test_preset_factual():
    assert kwargs_of({"preset": pb.DECODER_PRESET_FACTUAL}).plan.generate_kwargs == {
        "do_sample": True, "temperature": 0.3}


def test_preset_table_matches_spec():
    assert PRESETS == {
        "deterministic": {"temperature": 0.0, "do_sample": False},
        "standard": {"temperature": 1.0, "do_sample": True, "top_p": 0.95},
        "creative": {"temperature": 0.8, "do_sample": True, "top_p": 0.9, "repetition_penalty": 1.1},
        "factual": {"temperature": 0.3, "do_sample": True},
    }


def test_user_fields_override_preset():
    r = kwargs_of({"preset": pb.DECODER_PRESET_CREATIVE, "temperature": 1.3, "top_k": 20,
                   "repetition_penalty": 1.0})
    assert r.plan.generate_kwargs == {"do_sample": True, "temperature": 1.3, "top_k": 20, "top_p": 0.9,
                                      "repetition_penalty": 1.0}


def test_user_temperature_zero_overrides_sampling_preset():
    r = kwargs_of({"preset": pb.DECODER_PRESET_CREATIVE, "temperature": 0.0})
    assert r.plan.greedy
    assert r.plan.generate_kwargs == {"do_sample": False, "repetition_penalty": 1.1}
    codes = dict(r.warnings)
    assert "SAMPLING_FIELDS_DROPPED" in codes
    msg = codes["SAMPLING_FIELDS_DROPPED"]
    assert "top_p" in msg and "do_sample=true" in msg and "temperature," not in msg


def test_user_sampling_overrides_deterministic_preset():
    r = kwargs_of({"preset": pb.DECODER_PRESET_DETERMINISTIC, "do_sample": True, "temperature": 0.7})
    assert not r.plan.greedy
    assert r.plan.generate_kwargs == {"do_sample": True, "temperature": 0.7}


def test_greedy_do_sample_false_drops_sampling_fields_keeps_penalties():
    r = kwargs_of({"do_sample": False, "temperature": 0.7, "top_k": 5, "top_p": 0.5, "min_p": 0.1,
                   "repetition_penalty": 1.2, "min_new_tokens": 3})
    assert r.plan.greedy
    assert r.plan.generate_kwargs == {"do_sample": False, "repetition_penalty": 1.2, "min_new_tokens": 3}
    assert r.plan.decoder == r.plan.generate_kwargs
    assert r.warnings == (("SAMPLING_FIELDS_DROPPED",
                           "greedy decoding (do_sample false): temperature, top_k, top_p, min_p not sent"),)


def test_greedy_temperature_zero_alone_no_warning():
    r = kwargs_of({"temperature": 0.0})
    assert r.plan.greedy and r.plan.generate_kwargs == {"do_sample": False} and r.warnings == ()


def test_greedy_preset_dropping_warns():
    r = kwargs_of({"preset": pb.DECODER_PRESET_STANDARD, "do_sample": False})
    assert r.plan.generate_kwargs == {"do_sample": False}
    assert r.warnings == (("SAMPLING_FIELDS_DROPPED",
                           "greedy decoding (do_sample false): temperature, top_p not sent"),)


def test_sampling_sends_only_set_fields():
    r = kwargs_of({"temperature": 0.5, "min_p": 0.05})
    assert r.plan.generate_kwargs == {"do_sample": True, "temperature": 0.5, "min_p": 0.05}
    assert r.plan.decoder == {"do_sample": True, "temperature": 0.5, "min_p": 0.05}


def test_generation_fields_to_kwargs():
    r = ok(make(pytorch={"num_beams": 4, "early_stopping": True, "length_penalty": 0.8,
                         "no_repeat_ngram_size": 3, "use_cache": True,
                         "cache_implementation": pb.CACHE_IMPLEMENTATION_STATIC, "batch_size": 2},
                decoder={"do_sample": False, "repetition_penalty": 1.1}))
    assert r.plan.generate_kwargs == {
        "do_sample": False, "repetition_penalty": 1.1, "num_beams": 4, "early_stopping": True,
        "length_penalty": 0.8, "no_repeat_ngram_size": 3, "use_cache": True, "cache_implementation": "static",
    }
    assert r.plan.batch_size == 2
    assert "max_new_tokens" not in r.plan.generate_kwargs
    json.dumps(r.plan.generate_kwargs)  # JSON-able


def test_unset_generation_fields_produce_no_kwargs_and_explicit_ones_do():
    assert ok(make(pytorch={"num_beams": 1, "use_cache": True, "prompt_lookup_num_tokens": 2})).plan.generate_kwargs \
        == {"do_sample": True, "num_beams": 1, "use_cache": True, "prompt_lookup_num_tokens": 2}
    assert ok(make(pytorch={"use_cache": False})).plan.generate_kwargs == {"do_sample": True, "use_cache": False}


def test_min_new_tokens_above_the_output_limit_runs_capped_with_a_warning():
    # config.md: int >= 1, and an llem YAML must run unchanged; generate() suppresses EOS to
    # the end either way, so what is sent (and reported) is what runs.
    r = ok(make(decoder={"min_new_tokens": 20, "temperature": 0.0}, max_output_tokens=10))
    assert r.plan.generate_kwargs["min_new_tokens"] == 10
    assert [c for c, _ in r.warnings] == ["MIN_NEW_TOKENS_CAPPED"] and "20" in r.warnings[0][1]


def test_sliding_window_accepted_with_warning():
    r = ok(make(pytorch={"cache_implementation": pb.CACHE_IMPLEMENTATION_SLIDING_WINDOW}))
    assert r.plan.generate_kwargs["cache_implementation"] == "sliding_window"
    assert [c for c, _ in r.warnings] == ["CACHE_SLIDING_WINDOW_DEPRECATED"]
    assert "static" in r.warnings[0][1]


def test_decoder_proto_round_trip():
    r = kwargs_of({"preset": pb.DECODER_PRESET_CREATIVE, "top_k": 7})
    d = r.plan.decoder_proto()
    assert d.preset == pb.DECODER_PRESET_CREATIVE
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty, d.do_sample) == (0.8, 0.9, 7, 1.1, True)
    assert not d.HasField("min_p")
    # feeding the effective decoder back gives the same kwargs
    again = ok(make(decoder={k: getattr(d, k) for k in ("temperature", "top_p", "top_k", "repetition_penalty",
                                                        "do_sample")}))
    assert again.plan.generate_kwargs == r.plan.generate_kwargs


@settings(max_examples=60, deadline=None)
@given(t=st.one_of(st.just(0.0), st.floats(MIN_TEMPERATURE, 2.0)), p=st.floats(0.0, 1.0), rp=st.floats(0.1, 10.0),
       k=st.integers(0, 2**31 - 1))
def test_any_in_range_decoder_is_accepted(t, p, rp, k):
    r = kwargs_of({"temperature": t, "top_p": p, "repetition_penalty": rp, "top_k": k})
    assert r.plan.greedy == (t == 0.0)


# ---------------------------------------------------------------------------
# Hash
# ---------------------------------------------------------------------------


def h(caps=CPU, local=False, **kw) -> str:
    return load_of(caps, local, **kw).config_hash()


EXPLICIT_DEFAULTS = [
    {"pytorch": {"attn_implementation": pb.ATTN_IMPLEMENTATION_SDPA}},  # config.md: unset is sdpa
    {"pytorch": {"device_map": "auto"}},
    {"pytorch": {"revision": "main"}},
    {"pytorch": {"torch_compile": False}},
    {"pytorch": {"load_in_4bit": False, "load_in_8bit": False}},
    {"pytorch": {"trust_remote_code": False}},
    {"pytorch": {"num_processes": 1}},
    {"precision": pb.PRECISION_FP32},  # resolved default on CPU
]


@pytest.mark.parametrize("kw", EXPLICIT_DEFAULTS, ids=lambda kw: ",".join(kw.get("pytorch", kw)))
def test_unset_and_explicit_default_hash_the_same(kw):
    assert h(**kw) == h()


def test_precision_default_follows_cuda():
    assert h(GPU) == h(GPU, precision=pb.PRECISION_BF16)
    assert h(GPU) != h(GPU, precision=pb.PRECISION_FP32)


def test_compile_and_bnb_defaults_hash_the_same():
    assert h(pytorch={"torch_compile": True}) == h(
        pytorch={"torch_compile": True, "torch_compile_mode": "default", "torch_compile_backend": "inductor"})
    assert h(pytorch={"load_in_4bit": True}) == h(pytorch={
        "load_in_4bit": True, "bnb_4bit_compute_dtype": pb.BNB4BIT_COMPUTE_DTYPE_FLOAT32,
        "bnb_4bit_quant_type": pb.BNB4BIT_QUANT_TYPE_NF4, "bnb_4bit_use_double_quant": False})
    assert h(GPU, pytorch={"device_map": "cuda"}) == h(GPU, pytorch={"device_map": "cuda:0"})


def test_generation_fields_never_change_the_hash():
    base = h()
    assert h(pytorch={"batch_size": 8, "use_cache": True, "cache_implementation": pb.CACHE_IMPLEMENTATION_STATIC,
                      "num_beams": 3, "early_stopping": True, "length_penalty": 2.0, "no_repeat_ngram_size": 2},
             decoder={"preset": pb.DECODER_PRESET_CREATIVE, "min_new_tokens": 2},
             max_input_tokens=10, max_output_tokens=10, random_seed=1, request_id="r") == base


def test_map_order_and_equivalent_sizes_hash_the_same():
    a = make(pytorch={})
    a.model.pytorch.max_memory["cpu"] = "1GiB"
    a.model.pytorch.max_memory["0"] = "500MB"
    b = make(pytorch={})
    b.model.pytorch.max_memory["0"] = "500000000"
    b.model.pytorch.max_memory["cpu"] = "1024 mib"
    la, lb = ok(a, GPU).load, ok(b, GPU).load
    assert la.config_hash() == lb.config_hash()
    assert la.max_memory == (("0", "500000000"), ("cpu", "1073741824"))
    assert h(GPU, pytorch={"max_memory": {"01": "1GiB"}}) == h(GPU, pytorch={"max_memory": {"1": "1GiB"}})


def test_load_fields_change_the_hash():
    hashes = {
        h(), h(model="org/other"), h(precision=pb.PRECISION_BF16), h(pytorch={"torch_compile": True}),
        h(pytorch={"torch_compile": True, "torch_compile_mode": "max-autotune"}),
        h(pytorch={"attn_implementation": pb.ATTN_IMPLEMENTATION_EAGER}),
        h(pytorch={"load_in_4bit": True}), h(pytorch={"load_in_8bit": True}),
        h(pytorch={"device_map": "cpu"}), h(pytorch={"max_memory": {"cpu": "1GiB"}}), h(pytorch={"revision": "v1"}),
    }
    assert len(hashes) == 11


GOLDEN_CANONICAL = (
    '{"attn_implementation":"sdpa","bnb_4bit_compute_dtype":"bfloat16","bnb_4bit_quant_type":"fp4",'
    '"bnb_4bit_use_double_quant":true,"device_map":"auto","load_in_4bit":true,"load_in_8bit":false,'
    '"max_memory":{"0":"10737418240","1":"500000000","cpu":"1024"},"model":"org/model-\\u00e9",'
    '"num_processes":1,"precision":"bf16","revision":"v1.0","torch_compile":true,'
    '"torch_compile_backend":"inductor","torch_compile_mode":"reduce-overhead","trust_remote_code":false}'
)
# Computed outside Python: printf '%s' "$GOLDEN_CANONICAL" | sha256sum
GOLDEN_HASH = "c5b14f150782e1a8b3372926f4f46d24f0cde591664705e44b3ba0ad52ea9423"
GOLDEN_DEFAULT_CPU_CANONICAL = (
    '{"attn_implementation":"sdpa","bnb_4bit_compute_dtype":null,"bnb_4bit_quant_type":null,'
    '"bnb_4bit_use_double_quant":null,"device_map":"auto","load_in_4bit":false,"load_in_8bit":false,'
    '"max_memory":{},"model":"org/model","num_processes":1,"precision":"fp32","revision":"main",'
    '"torch_compile":false,"torch_compile_backend":null,"torch_compile_mode":null,"trust_remote_code":false}'
)
GOLDEN_DEFAULT_CPU_HASH = "7e7ea4e8988cfe5041637c3de3257efbdb2e0342289857aea52d43db7b7a185b"


def test_golden_canonical_form_and_hash():
    load = load_of(GPU, model="org/model-é", precision=pb.PRECISION_BF16, pytorch={
        "attn_implementation": pb.ATTN_IMPLEMENTATION_SDPA, "torch_compile": True,
        "torch_compile_mode": "reduce-overhead", "load_in_4bit": True,
        "bnb_4bit_compute_dtype": pb.BNB4BIT_COMPUTE_DTYPE_BFLOAT16, "bnb_4bit_quant_type": pb.BNB4BIT_QUANT_TYPE_FP4,
        "bnb_4bit_use_double_quant": True, "max_memory": {"cpu": "1024", "1": "500MB", "0": "10GiB"},
        "revision": "v1.0"})
    assert load.canonical() == GOLDEN_CANONICAL
    assert hashlib.sha256(GOLDEN_CANONICAL.encode()).hexdigest() == GOLDEN_HASH
    assert load.config_hash() == GOLDEN_HASH


def test_golden_default_hash():
    load = load_of(model="org/model")
    assert load.canonical() == GOLDEN_DEFAULT_CPU_CANONICAL
    assert load.config_hash() == GOLDEN_DEFAULT_CPU_HASH


def test_canonical_json_rules():
    # floats: a JSON string of printf("%.17g"); non-ASCII escaped; keys sorted; no whitespace
    assert canonical_json({"b": 0.1, "a": [1.0, True, None], "é": "ü"}) == \
        '{"a":["1",true,null],"b":"0.10000000000000001","\\u00e9":"\\u00fc"}'
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


# ---------------------------------------------------------------------------
# kwargs mapping and protos
# ---------------------------------------------------------------------------


def test_load_kwargs_default():
    load = load_of()
    assert load.load_kwargs() == {"dtype": "float32", "device_map": "auto", "revision": "main",
                                  "trust_remote_code": False, "attn_implementation": "sdpa"}
    assert load.compile_kwargs() is None
    assert load.tokenizer_kwargs() == {"revision": "main", "trust_remote_code": False}


def test_load_kwargs_full():
    load = load_of(GPU, precision=pb.PRECISION_FP16, pytorch={
        "attn_implementation": pb.ATTN_IMPLEMENTATION_EAGER, "load_in_4bit": True,
        "bnb_4bit_compute_dtype": pb.BNB4BIT_COMPUTE_DTYPE_FLOAT16, "device_map": "sequential",
        "max_memory": {"1": "2GiB", "cpu": "10GB"}, "revision": "abc123", "torch_compile": True,
        "torch_compile_backend": "aot_eager"})
    kw = load.load_kwargs()
    assert kw == {
        "dtype": "float16", "device_map": "sequential", "revision": "abc123", "trust_remote_code": False,
        "attn_implementation": "eager", "max_memory": {"1": 2 * 2**30, "cpu": 10 * 10**9},
        "quantization_config": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16",
                                "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False},
    }
    json.dumps(kw, sort_keys=True)  # JSON-able, also with sorted keys
    assert load.compile_kwargs() == {"mode": "default", "backend": "aot_eager"}
    assert load.tokenizer_kwargs() == {"revision": "abc123", "trust_remote_code": False}


def test_load_kwargs_8bit():
    kw = load_of(pytorch={"load_in_8bit": True}).load_kwargs()
    assert kw["quantization_config"] == {"load_in_8bit": True}


@pytest.mark.parametrize("size,expected", [
    ("1024", 1024), ("1KB", 1000), ("1KiB", 1024), ("1.5GiB", 3 * 2**29), ("0.5MB", 500000), ("2TB", 2 * 10**12),
    ("0", 0), ("10 GiB", 10 * 2**30), ("10gib", 10 * 2**30), ("3 KB", 3000), ("1kB", 1000),
])
def test_max_memory_sizes(size, expected):
    assert load_of(pytorch={"max_memory": {"cpu": size}}).load_kwargs()["max_memory"] == {"cpu": expected}


def test_to_proto_is_explicit_and_round_trips():
    load = load_of(GPU, pytorch={"torch_compile": True, "load_in_4bit": True, "max_memory": {"0": "1GiB"}})
    m = load.to_proto()
    assert m.precision == pb.PRECISION_BF16
    p = m.pytorch
    for name in ("torch_compile", "torch_compile_mode", "torch_compile_backend", "load_in_4bit", "load_in_8bit",
                 "bnb_4bit_use_double_quant", "device_map", "revision", "trust_remote_code", "num_processes"):
        assert p.HasField(name), name
    assert (p.torch_compile_mode, p.torch_compile_backend, p.device_map, p.revision) == (
        "default", "inductor", "auto", "main")
    assert p.bnb_4bit_quant_type == pb.BNB4BIT_QUANT_TYPE_NF4
    assert p.bnb_4bit_compute_dtype == pb.BNB4BIT_COMPUTE_DTYPE_FLOAT32
    assert dict(p.max_memory) == {"0": "1073741824"}
    assert not any(_has_generation_field(p, f) for f in GENERATION_FIELDS)
    again, _ = resolve_load(m, GPU, model_is_local=False)
    assert again == load


def test_to_proto_of_defaults_leaves_library_defaults_unset():
    p = load_of().to_proto().pytorch
    assert p.attn_implementation == pb.ATTN_IMPLEMENTATION_SDPA  # the effective value, named (config.md)
    assert p.bnb_4bit_quant_type == 0
    assert not p.HasField("torch_compile_mode") and not p.HasField("bnb_4bit_use_double_quant")
    assert resolve_load(load_of().to_proto(), CPU, model_is_local=True)[0] == load_of()


def _has_generation_field(p, name):
    fd = p.DESCRIPTOR.fields_by_name[name]
    return p.HasField(name) if fd.has_presence else getattr(p, name) != 0


def test_module_is_pure():
    code = ("import sys, llem_server.config; "
            "bad = {'torch', 'transformers', 'grpc'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_length_penalty_checks_keep_their_order_and_never_crash():
    # rule 6 first: a length_penalty without beams is named for that, whatever its size
    assert "acts only in beam search" in only(make(pytorch={"length_penalty": 1000.0}), PT + "length_penalty").description
    # an invalid max_output_tokens is reported on its own (math.log of it raised before)
    err = error(make(pytorch={"num_beams": 2, "length_penalty": 1.0}, max_output_tokens=-1))
    assert [v.field for v in err.violations] == ["max_output_tokens"]
