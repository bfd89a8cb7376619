"""Every combination of the interacting generation options that validation accepts runs.

A request validation accepts must not fail inside ``generate()``: the worker would answer
it INTERNAL (service.md: never for anything a client sent). transformers fails some
combinations only there, some only for some texts: prompt lookup without a cache, or on a
fixed-size cache once its draft overruns it. So this walks the product of the options that
interact (cache on/off and kind, prompt lookup, beams, batching, sampling), on both tiny
models and on one whose generation_config.json sets a static cache itself (it applies where
the request sends nothing), with a prompt that repeats itself (prompt lookup finds matches)
and several output lengths, through the worker's own load and generate functions in this
process. A refusal found in the worker (JobError, a client status naming the field) is
allowed; any other exception is a request answered INTERNAL.
"""
from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import shutil

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


def _with_generation_config(model_root, tmp, name: str, **fields):
    """A copy of a tiny model whose generation_config.json also sets ``fields``."""
    dst = tmp / f"{name}-gc"
    shutil.copytree(model_root / name, dst)
    gc = dst / "generation_config.json"
    data = json.loads(gc.read_text()) if gc.exists() else {}
    gc.write_text(json.dumps({**data, **fields}))
    return dst


@pytest.fixture(scope="module")
def loaded(model_root, tmp_path_factory):
    import torch

    from llem_server.models import load_model
    from llem_server.paths import resolve_model
    from llem_server.worker import _capabilities

    caps = C.Capabilities.from_worker(_capabilities(torch, "cpu"))
    root = tmp_path_factory.mktemp("gc-models")
    for name in ("llama", "gpt2"):
        shutil.copytree(model_root / name, root / name)
    _with_generation_config(model_root, root, "gpt2", cache_implementation="static")
    _with_generation_config(model_root, root, "llama", use_cache=False)
    models = {}
    for name in ("llama", "gpt2", "gpt2-gc", "llama-gc"):
        req = pb.GenerateRequest(model=pb.ModelConfig(model=name), prompts=["x"])
        resolved = C.resolve_generate(req, caps, model_is_local=True)
        src = resolve_model(name, root, False)
        models[name] = load_model(resolved.load.config_hash(), src.source, resolved.load.load_kwargs(),
                                  resolved.load.compile_kwargs())
    return caps, models


def _requests(model: str):
    names = list(OPTIONS)
    for values in itertools.product(*OPTIONS.values()):
        pytorch = {k: v for k, v in zip(names, values) if v is not None}
        for decoder in DECODERS:
            yield pytorch, decoder


@pytest.mark.parametrize("model", ["llama", "gpt2", "gpt2-gc"])
def test_every_accepted_combination_runs(loaded, model):
    from llem_server.generation import run_generate
    from llem_server.models import JobError

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
            p = {**plan.worker_payload(), "max_output_tokens": n}
            try:
                r = run_generate(entry, PROMPTS, p, job_id=1, cancel_flag=flag, emit=None, on_start=lambda t: None)
                assert all(1 <= c["output_tokens"] <= n for c in r["completions"]), r["completions"]
            except JobError as exc:  # refused in the worker, by name: a client error, not INTERNAL
                assert exc.status == "INVALID_ARGUMENT" and exc.violations, exc
                refused += 1
                break
            except Exception as exc:  # noqa: BLE001 - collected: one report for all combinations
                failures.append(f"{pytorch} {decoder} max_new={n}: {type(exc).__name__}: {str(exc)[:120]}")
                break
    assert not failures, f"{len(failures)} accepted combination(s) failed in generate():\n" + "\n".join(failures)
    # Both sides of the line are exercised: most combinations run, the known-bad ones are refused.
    assert accepted >= 40 and refused >= 40, (accepted, refused)


@pytest.mark.parametrize("model,field", [("gpt2-gc", "cache_implementation"), ("llama-gc", "use_cache")])
def test_prompt_lookup_against_the_models_own_cache_settings_is_refused_by_name(loaded, model, field):
    from llem_server.generation import run_generate
    from llem_server.models import JobError

    caps, models = loaded
    req = pb.GenerateRequest(model=pb.ModelConfig(model=model, pytorch=pb.PyTorchConfig(prompt_lookup_num_tokens=2)),
                             decoder=pb.DecoderConfig(temperature=0.0), prompts=PROMPTS[:1])
    plan = C.resolve_generate(req, caps, model_is_local=True).plan  # the request alone is fine
    p = {**plan.worker_payload(), "max_input_tokens": 64, "max_output_tokens": 12}
    flag = mp.get_context("spawn").RawValue("q", 0)
    with pytest.raises(JobError) as exc:
        run_generate(models[model], PROMPTS[:1], p, job_id=1, cancel_flag=flag, emit=None, on_start=lambda t: None)
    assert exc.value.status == "INVALID_ARGUMENT"
    assert [f for f, _ in exc.value.violations] == ["model.pytorch.prompt_lookup_num_tokens"]
    assert "generation_config.json" in exc.value.message and f"model.pytorch.{field}" in exc.value.message


def test_prompt_lookup_draft_must_fit_a_position_table(loaded):
    # GPT-2 indexes a table of n_positions rows; the lookup's draft is scored past the
    # current length, so prompt + max_output_tokens + draft must fit (IndexError before).
    from llem_server.generation import run_generate
    from llem_server.models import JobError

    _, models = loaded
    entry = models["gpt2"]
    limit = entry.model.config.n_positions
    prompt = "fox jumps over " * limit
    n_prompt = len(entry.tokenizer(prompt, truncation=True, max_length=limit - 12)["input_ids"])
    flag = mp.get_context("spawn").RawValue("q", 0)

    def run(draft: int):
        p = {"batch_size": 1, "generate_kwargs": {"do_sample": False, "prompt_lookup_num_tokens": draft},
             "max_input_tokens": n_prompt, "max_output_tokens": 10, "random_seed": 7}
        return run_generate(entry, [prompt], p, job_id=1, cancel_flag=flag, emit=None, on_start=lambda t: None)

    with pytest.raises(JobError) as exc:
        run(10)  # n_prompt + 10 + 10 > limit
    assert [f for f, _ in exc.value.violations] == ["model.pytorch.prompt_lookup_num_tokens"]
    assert run(2)["completions"][0]["output_tokens"] >= 1  # n_prompt + 10 + 2 = limit: fits


def test_beam_sampling_over_torchs_category_limit_is_refused_by_name(loaded):
    # num_beams x vocabulary categories in one multinomial draw: 32 769 x 512 > 2**24 here
    # (131 beams on a Llama-3 vocabulary); generate() failed with a RuntimeError.
    from llem_server.generation import MULTINOMIAL_MAX, run_generate
    from llem_server.models import JobError

    _, models = loaded
    entry = models["gpt2"]
    beams = MULTINOMIAL_MAX // entry.model.config.vocab_size + 1
    flag = mp.get_context("spawn").RawValue("q", 0)
    p = {"batch_size": 1, "generate_kwargs": {"do_sample": True, "num_beams": beams}, "max_input_tokens": 16,
         "max_output_tokens": 2, "random_seed": 7}
    with pytest.raises(JobError) as exc:
        run_generate(entry, ["hi"], p, job_id=1, cancel_flag=flag, emit=None, on_start=lambda t: None)
    assert [f for f, _ in exc.value.violations] == ["model.pytorch.num_beams"]
    assert f"at most {beams - 1} beams" in exc.value.message
