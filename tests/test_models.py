"""Loading, in the worker's own code (no server): what a load that cannot work answers."""
from __future__ import annotations

import pytest


def test_a_model_without_sdpa_fails_the_load_naming_attn_implementation(model_root):
    """Unset attn_implementation is asked for as sdpa (config.md: the library default, and the
    cache key says so): an architecture without sdpa must fail naming the field, not INTERNAL."""
    from transformers import LlamaForCausalLM

    from llem_server.models import _classify_load_error

    class NoSdpa(LlamaForCausalLM):
        _supports_sdpa = False

    with pytest.raises(Exception) as raised:
        NoSdpa.from_pretrained(model_root / "llama", attn_implementation="sdpa")
    err = _classify_load_error(raised.value, "llama")
    assert err.status == "INVALID_ARGUMENT"
    assert err.violations[0][0] == "model.pytorch.attn_implementation" and "eager" in err.violations[0][1]


def test_a_cancel_during_tokenization_stops_before_the_next_slice(model_root):
    """Megabytes of prompts take seconds to tokenize: a caller gone meanwhile frees the device
    at the next slice (before, every slice was tokenized and the first one generated)."""
    from llem_server.generation import run_generate
    from llem_server.models import load_model

    entry = load_model("h", str(model_root / "llama"), {"dtype": "fp32", "device_map": "cpu"}, None)

    class CancelledAfterFirstRead:  # the shared-memory flag, set by the front once the first slice is tokenized
        reads = 0

        @property
        def value(self) -> int:
            self.reads += 1
            return 0 if self.reads == 1 else 7

    flag = CancelledAfterFirstRead()
    plan = {"batch_size": 1, "generate_kwargs": {"do_sample": False}, "max_input_tokens": 32,
            "max_output_tokens": 4, "random_seed": 0}
    out = run_generate(entry, ["one", "two", "three", "four"], plan, job_id=7, cancel_flag=flag, emit=None,
                       on_start=lambda t: None)
    assert out["cancelled"] and out["completions"] == [] and out["window"] is None
    assert flag.reads == 2  # stopped at the second slice, nothing more read
