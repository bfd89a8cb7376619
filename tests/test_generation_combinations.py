"""Every combination of the interacting generation options that validation accepts runs.

A request validation accepts must not fail inside ``generate()``: the worker would answer
it INTERNAL (service.md: never for anything a client sent). transformers fails some
combinations only there, some only for some texts: prompt lookup without a cache, or on a
fixed-size cache once its draft overruns it. So this walks the product of the options that
interact (cache on/off and kind, prompt lookup, beams, batching, sampling), on both tiny
models, with a prompt that repeats itself (prompt lookup finds matches) and several output
lengths, through the worker's own load and generate functions in this process.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp

import pytest
from llem.v1 import llem_pb2 as pb

from llem_server import config as C

PROMPTS = ["The quick brown fox jumps", "The quick brown fox jumps over the lazy dog. The quick brown fox jumps"]
LENGTHS = (6, 9, 12)  # gpt2 + static cache + prompt lookup failed at 6, 9 and 12 before it was refused

OPTIONS = {
    "use_cache": [None, True, False],
    "cache_implementation": [None, pb.CACHE_IMPLEMENTATION_DYNAMIC, pb.CACHE_IMPLEMENTATION_STATIC,
                             pb.CACHE_IMPLEMENTATION_SLIDING_WINDOW],
    "prompt_lookup_num_tokens": [None, 2],
    "num_beams": [None, 2],
    "batch_size": [1, 2],
}
DECODERS = [{"temperature": 0.0}, {"do_sample": True, "top_k": 5}]


@pytest.fixture(scope="module")
def loaded(model_root):
    import torch

    from llem_server.models import load_model
    from llem_server.paths import resolve_model
    from llem_server.worker import _capabilities

    caps = C.Capabilities.from_worker(_capabilities(torch, "cpu"))
    models = {}
    for name in ("llama", "gpt2"):
        req = pb.GenerateRequest(model=pb.ModelConfig(model=name), prompts=["x"])
        resolved = C.resolve_generate(req, caps, model_is_local=True)
        src = resolve_model(name, model_root, False)
        models[name] = load_model(resolved.load.config_hash(), src.source, resolved.load.load_kwargs(),
                                  resolved.load.compile_kwargs())
    return caps, models


def _requests(model: str):
    names = list(OPTIONS)
    for values in itertools.product(*OPTIONS.values()):
        pytorch = {k: v for k, v in zip(names, values) if v is not None}
        for decoder in DECODERS:
            yield pytorch, decoder


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_every_accepted_combination_runs(loaded, model):
    from llem_server.generation import run_generate

    caps, models = loaded
    entry = models[model]
    flag = mp.get_context("spawn").RawValue("q", 0)
    accepted = refused = 0
    failures = []
    for pytorch, decoder in _requests(model):
        req = pb.GenerateRequest(model=pb.ModelConfig(model=model, pytorch=pb.PyTorchConfig(**pytorch)),
                                 decoder=pb.DecoderConfig(**decoder), prompts=PROMPTS, random_seed=7)
        try:
            plan = C.resolve_generate(req, caps, model_is_local=True).plan
        except C.ConfigError:
            refused += 1
            continue
        accepted += 1
        for n in LENGTHS:
            p = {"batch_size": plan.batch_size, "generate_kwargs": plan.generate_kwargs,
                 "max_input_tokens": plan.max_input_tokens, "max_output_tokens": n, "random_seed": plan.random_seed}
            try:
                r = run_generate(entry, PROMPTS, p, job_id=1, cancel_flag=flag, emit=None, on_start=lambda t: None)
                assert all(1 <= c["output_tokens"] <= n for c in r["completions"]), r["completions"]
            except Exception as exc:  # noqa: BLE001 - collected: one report for all combinations
                failures.append(f"{pytorch} {decoder} max_new={n}: {type(exc).__name__}: {str(exc)[:120]}")
                break
    assert not failures, f"{len(failures)} accepted combination(s) failed in generate():\n" + "\n".join(failures)
    # Both sides of the line are exercised: most combinations run, the known-bad ones are refused.
    assert accepted >= 40 and refused >= 40, (accepted, refused)
