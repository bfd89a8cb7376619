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
