"""torch.compile as a study sees it: what ran compiled, and what a request's figures include.

A server of its own: dynamo's caches live in the worker process, so another test's compiled
requests would change which shapes are new here.
"""
from __future__ import annotations

import pytest
from llem_client import Client

from conftest import start_server, stop_server

GREEDY = {"do_sample": False}
EAGER_BACKEND = {"torch_compile": True, "torch_compile_backend": "eager"}  # dynamo traces; no C++ build


@pytest.fixture(scope="module")
def cclient(model_root, tmp_path_factory):
    srv = start_server(tmp_path_factory.mktemp("compile-server"), model_root, "--max-models", "3",
                       "--energy-backend", "none")
    with Client(srv.address) as c:
        yield c
    stop_server(srv)


def _codes(r) -> list[str]:
    return [w.code for w in r.warnings]


def test_a_request_that_compiles_says_so_and_its_repeat_does_not(cclient):
    """The first request of a shape compiles graphs inside its own window: its time and energy
    include the compile, which a study must not take for the compiled model's cost."""
    def run():
        return cclient.generate(["one two three", "four"], model="llama", decoder=GREEDY, max_output_tokens=4,
                                pytorch={**EAGER_BACKEND, "batch_size": 2})

    first, again = run(), run()
    assert first.effective_config.compiled and again.effective_config.compiled
    (w,) = [w for w in first.warnings if w.code == "COMPILED_IN_REQUEST"]
    assert "graph" in w.message and "energy include" in w.message
    assert "COMPILED_IN_REQUEST" not in _codes(again)
    assert list(again.completions[1].token_ids) == list(first.completions[1].token_ids)


def test_new_shapes_and_a_second_compiled_model_stay_compiled(cclient):
    """One worker's models share transformers' forward code object: at torch's default recompile
    limit (8) a few batch shapes used it up and later shapes, and a second model, ran eager while
    the response said compiled. The server raises the limit and says when it is reached."""
    responses = []
    for precision in ("fp32", "bf16"):  # two cache entries of one model class
        for n in (1, 2, 3, 4, 5):
            responses.append(cclient.generate([f"prompt {i} " * (i + 1) for i in range(n)], model="llama",
                                              precision=precision, decoder=GREEDY, max_output_tokens=3,
                                              pytorch={**EAGER_BACKEND, "batch_size": n}))
    assert all(r.effective_config.compiled for r in responses)
    assert not [c for r in responses for c in _codes(r) if c == "COMPILE_LIMIT_REACHED"]


def test_an_uncompiled_model_reports_no_compilation(cclient):
    r = cclient.generate(["plain"], model="llama", decoder=GREEDY, max_output_tokens=3)
    assert not r.effective_config.compiled
    assert not {"COMPILED_IN_REQUEST", "CACHE_AUTO_COMPILED", "COMPILE_LIMIT_REACHED"} & set(_codes(r))


def test_transformers_compiling_a_static_cache_by_itself_is_noticed(model_root):
    """With a static cache on CUDA, generate() compiles the forward itself (no torch_compile
    asked). That decision is watched on the model; here it is forced on the CPU through
    generation_config.compile_config, the same code path transformers takes on a GPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.configuration_utils import CompileConfig

    from llem_server import compiling

    tok = AutoTokenizer.from_pretrained(model_root / "llama")
    model = AutoModelForCausalLM.from_pretrained(model_root / "llama").eval()
    compiling.watch_auto_compile(model)
    ids = tok(["hello"], return_tensors="pt")

    def run(**kw) -> bool:
        model._llem_auto_compiled = False
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id, **kw)
        return model._llem_auto_compiled

    assert run() is False  # dynamic cache: never auto-compiled
    forced = CompileConfig(backend="eager")
    forced._compile_all_devices = True
    model.generation_config.compile_config = forced
    assert run(cache_implementation="static") is True
    codes = [c for c, _ in compiling.request_warnings(compiled=False, auto_compiled=True, new_graphs=2)]
    assert codes == ["CACHE_AUTO_COMPILED", "COMPILED_IN_REQUEST"]

