"""Loading models and the per-worker model cache (runs inside a worker process).

The load configuration arrives already validated and resolved by ``config.py`` as
JSON-able ``from_pretrained`` kwargs; here they become torch dtypes and a
``BitsAndBytesConfig``. The cache is keyed by the config hash, bounded, and evicts
the least recently used model that the current job does not use.
"""
from __future__ import annotations

import gc
import os
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from . import compiling

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class JobError(Exception):
    """A job that failed for a reason the client can act on: a gRPC status name, a message,
    for INVALID_ARGUMENT the ``(field_path, description)`` pairs of ``BadRequest``, and the
    ``ErrorInfo`` reason (``errors.REASONS``; None: the status's usual one)."""

    def __init__(self, status: str, message: str, violations: tuple[tuple[str, str], ...] = (),
                 reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.violations = tuple(violations)
        self.reason = reason


class LoadError(JobError):
    """A load that failed."""


@dataclass
class LoadedModel:
    config_hash: str
    model: Any
    tokenizer: Any
    eos_ids: frozenset[int]
    pad_id: int
    device: str
    memory_bytes: int
    load_time_s: float
    compile_time_s: float
    compiled: bool
    load_window: tuple[float, float]
    warnings: list[tuple[str, str]] = field(default_factory=list)
    loaded_unix: float = field(default_factory=time.time)
    last_used_unix: float = field(default_factory=time.time)
    use_count: int = 0
    tokenizer_json: str | None = None  # the fast tokenizer, so the front process can decode streams
    resolved_revision: str = ""  # the hub commit a hub id's revision resolved to ("" for a local model)

    def info(self) -> dict:
        return {
            "config_hash": self.config_hash, "device": self.device, "memory_bytes": self.memory_bytes,
            "load_time_s": self.load_time_s, "compile_time_s": self.compile_time_s, "compiled": self.compiled,
            "loaded_unix": self.loaded_unix, "last_used_unix": self.last_used_unix, "use_count": self.use_count,
            "load_window": self.load_window, "warnings": list(self.warnings),
            "resolved_revision": self.resolved_revision,
        }


def to_from_pretrained_kwargs(load_kwargs: dict) -> dict:
    """Turn config.py's JSON-able kwargs into what ``from_pretrained`` takes."""
    kwargs = dict(load_kwargs)
    if "dtype" in kwargs:
        kwargs["dtype"] = _DTYPES[kwargs["dtype"]]
    quant = kwargs.pop("quantization_config", None)
    if quant:
        from transformers import BitsAndBytesConfig

        quant = dict(quant)
        if "bnb_4bit_compute_dtype" in quant:
            quant["bnb_4bit_compute_dtype"] = _DTYPES[quant["bnb_4bit_compute_dtype"]]
        kwargs["quantization_config"] = BitsAndBytesConfig(**quant)
    if "max_memory" in kwargs:
        kwargs["max_memory"] = {(int(k) if str(k).isdigit() else k): v for k, v in kwargs["max_memory"].items()}
    return kwargs


def _hub_commit(source: str, revision: str | None) -> str:
    """The commit a hub id's revision ("main", a tag) resolved to, read from the local hub cache
    that from_pretrained just used: the snapshot folder is named by it. "" for a local model."""
    if os.path.isdir(source):
        return ""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(source, "config.json", revision=revision or "main")
    except Exception:  # noqa: BLE001 - provenance only: never fail a load over it
        return ""
    return os.path.basename(os.path.dirname(path)) if isinstance(path, str) else ""


def _model_device(model) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "cpu"


def _refuse_disk_offload(model, source: str, load_kwargs: dict) -> None:
    """Refuse a model whose weights did not all get memory.

    With ``device_map`` planning, weights that fit in no ``max_memory`` budget are "offloaded
    to disk": left on the meta device, and generation then fails deep inside torch. This
    server does not serve disk offload, so the load fails here, naming what to change.
    """
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    on_meta = sum(p.numel() for p in model.parameters() if p.device.type == "meta")
    if "disk" not in placed and not on_meta:
        return
    share = on_meta / max(1, sum(p.numel() for p in model.parameters()))
    what = f"{share:.0%} of the weights of {source} got no memory (transformers would offload them to disk, " \
           "which this server does not serve)"
    if load_kwargs.get("max_memory"):
        raise LoadError("INVALID_ARGUMENT", f"{what}: raise model.pytorch.max_memory or leave it unset",
                        violations=(("model.pytorch.max_memory",
                                     f"{load_kwargs['max_memory']} is too small for this model: {what}"),))
    raise LoadError("RESOURCE_EXHAUSTED", f"{what}: this server's memory is too small for the model; "
                                          "unload other models or use 4/8-bit quantization")


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError
    ("DefaultCPUAllocator: can't allocate memory", as in a memory-limited container)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return any(w in text for w in _OOM_WORDS)


def oom_message(exc: BaseException, where: str) -> str:
    kind = "device memory" if isinstance(exc, torch.cuda.OutOfMemoryError) or "cuda" in str(exc).lower() else "memory"
    return f"out of {kind} {where}: {type(exc).__name__}: {str(exc)[:300]}"


_TOKENIZER_FILES = ("tokenizer", "vocab", "merges.txt", "spiece", "sentencepiece")


def _has_tokenizer_files(directory: str) -> bool:
    names = os.listdir(directory)
    return any(n.startswith(_TOKENIZER_FILES) or n.endswith((".model", ".tiktoken")) for n in names)


def _classify_load_error(exc: BaseException, source: str) -> LoadError:
    text = f"{type(exc).__name__}: {exc}"
    if is_out_of_memory(exc):
        return LoadError("RESOURCE_EXHAUSTED", oom_message(exc, f"while loading {source}"), reason="OUT_OF_MEMORY")
    if isinstance(exc, ImportError):
        return LoadError("FAILED_PRECONDITION", f"a package needed to load {source} is missing: {exc}",
                         reason="PACKAGE_MISSING")
    if isinstance(exc, (OSError, EnvironmentError)):
        low = str(exc).lower()
        if ("does not appear to have" in low or "no such file" in low or "not a valid model identifier" in low
                or "no file named" in low):
            return LoadError("NOT_FOUND", f"model {source} has no usable weights or config: {exc}")
        return LoadError("FAILED_PRECONDITION", f"model {source} could not be read (missing or corrupt files?): {exc}",
                         reason="MODEL_INVALID")
    # Truncated or garbled weight files: safetensors raises its own SafetensorError (not a
    # ValueError), torch.load an UnpicklingError or a RuntimeError from its zip reader.
    low = text.lower()
    if any(k in low for k in ("safetensor", "header", "deserializ", "corrupt", "unpickl", "invalid load key",
                              "pytorchstreamreader", "incomplete metadata")):
        return LoadError("FAILED_PRECONDITION", f"model {source} has corrupt weights: {text}", reason="MODEL_INVALID")
    if "scaled_dot_product_attention" in low and "does not support" in low:
        what = f"{source} does not support sdpa attention (the default)"
        return LoadError("INVALID_ARGUMENT", f"{what}: set model.pytorch.attn_implementation to eager",
                         violations=(("model.pytorch.attn_implementation", f"{what}; use eager"),))
    if isinstance(exc, ValueError):
        # service.md: "not a model" is NOT_FOUND. transformers says so in a ValueError: a
        # config.json without a model_type, or no tokenizer it can build.
        if "should have a `model_type` key" in low or "unrecognized model in" in low:
            return LoadError("NOT_FOUND", f"{source} is not a model: its config.json names no model_type ({exc})",
                             reason="MODEL_NOT_FOUND")
        if "couldn't instantiate the backend tokenizer" in low:
            if os.path.isdir(source) and not _has_tokenizer_files(source):
                return LoadError("NOT_FOUND", f"{source} is not a servable model: it has no tokenizer files "
                                 f"(tokenizer.json or the like) ({str(exc)[:200]})", reason="MODEL_NOT_FOUND")
            # Files there, but transformers could not build them: likely a missing package.
            return LoadError("FAILED_PRECONDITION", f"the tokenizer of {source} could not be built (a package such "
                             f"as sentencepiece or tiktoken may be missing): {str(exc)[:300]}",
                             reason="PACKAGE_MISSING")
        return LoadError("FAILED_PRECONDITION", f"transformers refused to load {source} with this configuration: {exc}")
    return LoadError("INTERNAL", f"unexpected error loading {source}: {text}", reason="INTERNAL_ERROR")


# -- test-only fault injection -------------------------------------------------------
# TEST-ONLY hooks that let the test suite simulate device out-of-memory "at the model edge"
# on a machine without a GPU. Never set these variables in production. Each holds a
# substring; a model whose source path contains it fails:
#   LLEM_FAULT_OOM_LOAD: from_pretrained raises torch.cuda.OutOfMemoryError (OOM during load);
#   LLEM_FAULT_OOM:      the loaded model's forward raises it (OOM during generation);
#   LLEM_FAULT_HOST_OOM: the forward raises the CPU allocator's "can't allocate memory"
#                        (host memory exhausted, as under a container's memory limit);
#   LLEM_FAULT_SLOW_LOAD: from_pretrained first waits 2 s (a load that outlasts a short deadline:
#                        a tiny model reloads in ~15 ms, too fast to cancel reliably);
#   LLEM_FAULT_COMPILE:  torch.compile's warm-up raises (a backend that fails to compile).
# The errors then take the real paths (classification, worker clean-up, status mapping).
FAULT_OOM_LOAD_ENV = "LLEM_FAULT_OOM_LOAD"
FAULT_OOM_ENV = "LLEM_FAULT_OOM"
FAULT_HOST_OOM_ENV = "LLEM_FAULT_HOST_OOM"
FAULT_SLOW_LOAD_ENV = "LLEM_FAULT_SLOW_LOAD"
FAULT_COMPILE_ENV = "LLEM_FAULT_COMPILE"


def _fault_matches(env: str, source: str) -> bool:
    needle = os.environ.get(env, "")
    return bool(needle) and needle in source


def _inject_load_fault(source: str) -> None:
    if _fault_matches(FAULT_SLOW_LOAD_ENV, source):
        time.sleep(2.0)
    if _fault_matches(FAULT_OOM_LOAD_ENV, source):
        raise torch.cuda.OutOfMemoryError(f"simulated out of memory while loading ({FAULT_OOM_LOAD_ENV}, test-only)")


def _inject_generate_fault(model, source: str) -> None:
    host = _fault_matches(FAULT_HOST_OOM_ENV, source)
    if not (host or _fault_matches(FAULT_OOM_ENV, source)):
        return

    def forward(*_args, **_kwargs):
        # Allocate first, as a real OOM would leave a half-built activation behind.
        _scratch = torch.empty(1 << 20)  # noqa: F841
        if host:  # the text torch's CPU allocator raises
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: can't allocate "
                               f"memory: you tried to allocate 68719476736 bytes ({FAULT_HOST_OOM_ENV}, test-only)")
        raise torch.cuda.OutOfMemoryError(f"simulated out of memory in forward ({FAULT_OOM_ENV}, test-only)")

    model.forward = forward


def _check_still_confined(source: str, model_root: str) -> None:
    """The front checked the directory when the request arrived; a load runs later (queued
    behind other jobs), and files swapped in meanwhile (a weight file or shard index turned
    into a link out of the root) would be followed by from_pretrained: check again now."""
    from .paths import ModelPathError, check_local

    try:
        check_local(source, model_root)
    except ModelPathError as exc:
        raise LoadError(exc.status, exc.message, reason=exc.reason) from None


def load_model(config_hash: str, source: str, load_kwargs: dict, compile_kwargs: dict | None,
               model_root: str | None = None) -> LoadedModel:
    """from_pretrained the model and tokenizer, optionally compile, and warm the compiled graph.

    A compile failure is not fatal: the model is served uncompiled with a warning.
    ``model_root``: for a local model, the root it must stay under (checked again here).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    kwargs = to_from_pretrained_kwargs(load_kwargs)
    try:
        _inject_load_fault(source)
        if model_root is not None:
            _check_still_confined(source, model_root)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        # The tokenizer gets the same revision and trust_remote_code as the model
        # (upstream forgot the revision for the tokenizer).
        tok_kwargs = {k: kwargs[k] for k in ("revision", "trust_remote_code") if k in kwargs}
        tokenizer = AutoTokenizer.from_pretrained(source, **tok_kwargs)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified into a status
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise _classify_load_error(exc, source) from exc
    try:
        _refuse_disk_offload(model, source, load_kwargs)
    except LoadError:
        del model, tokenizer  # what did get memory goes back before the error is answered
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise
    model.eval()
    compiling.watch_auto_compile(model)
    _inject_generate_fault(model, source)
    # Decoder-only models must be left-padded in a batch; GPT-2-style tokenizers pad
    # right by default and have no pad token, so EOS stands in.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = frozenset(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    load_time = time.monotonic() - t0

    warnings: list[tuple[str, str]] = []
    compiled, compile_time = False, 0.0
    if compile_kwargs is not None:
        compiled, compile_time, warning = _compile(model, tokenizer, compile_kwargs, source)
        if warning:
            warnings.append(warning)
    t1 = time.monotonic()
    tokenizer_json = None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        tokenizer_json = backend.to_str()
    return LoadedModel(
        config_hash=config_hash, model=model, tokenizer=tokenizer, eos_ids=eos_ids,
        pad_id=int(tokenizer.pad_token_id), device=_model_device(model),
        memory_bytes=_memory_bytes(model), load_time_s=load_time, compile_time_s=compile_time,
        compiled=compiled, load_window=(t0, t1), warnings=warnings, tokenizer_json=tokenizer_json,
        resolved_revision=_hub_commit(source, kwargs.get("revision")),
    )


def _memory_bytes(model) -> int:
    """Parameters and buffers, plus bitsandbytes' quantization state, which hangs off the
    weights unregistered: 4-bit blocks' absmax (about 1/8 of the packed weights without double
    quant, 1/30 with it), 8-bit rows' scales. get_memory_footprint() leaves it out, so nf4
    with and without double quant read the same."""
    total = int(model.get_memory_footprint())
    seen = {t.data_ptr() for t in (*model.parameters(), *model.buffers())}

    def count(t) -> int:
        if not torch.is_tensor(t) or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        for state in (qs, getattr(qs, "state2", None)):
            if state is not None:
                total += sum(count(getattr(state, k, None)) for k in ("absmax", "code", "offset"))
        total += count(getattr(p, "SCB", None))
    return total


def _compile(model, tokenizer, compile_kwargs: dict, source: str) -> tuple[bool, float, tuple[str, str] | None]:
    """Compile in place and run a tiny forward so that compile errors surface now, not mid-request.

    ``torch.compile(model)`` would return a wrapper whose ``.generate`` still calls the
    uncompiled forward; ``nn.Module.compile`` compiles the module's ``__call__`` that
    ``generate`` uses.
    """
    t = time.monotonic()
    try:
        model.compile(**compile_kwargs)
        if _fault_matches(FAULT_COMPILE_ENV, source):
            raise RuntimeError(f"simulated compile failure ({FAULT_COMPILE_ENV}, test-only)")
        ids = tokenizer(["warm up"], return_tensors="pt").to(_model_device(model))
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return True, time.monotonic() - t, None
    except Exception as exc:  # noqa: BLE001 - compile failure is not fatal by contract
        # Back to eager. Not torch._dynamo.reset(): that would throw away the graphs of every
        # other compiled model in this worker, whose next requests would compile again inside
        # their energy windows (measured: 11.5 ms -> 3.1 s for the next request of another model).
        model._compiled_call_impl = None
        return False, time.monotonic() - t, (
            "COMPILE_FAILED",
            f"torch.compile({compile_kwargs}) failed, serving the model uncompiled: {type(exc).__name__}: {str(exc)[:500]}",
        )


class ModelCache:
    """The models one worker holds, least recently used first."""

    def __init__(self, max_models: int):
        self.max_models = max(1, max_models)
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()

    def get(self, config_hash: str) -> LoadedModel | None:
        entry = self._models.get(config_hash)
        if entry is not None:
            self._models.move_to_end(config_hash)
        return entry

    def make_room(self, keep: set[str]) -> list[tuple[str, int]]:
        """Evict least recently used models until one more fits: first those not in ``keep``
        (models that queued requests will use), then, as ``max_models`` is a memory cap and
        not a wish, those too (their requests load them again)."""
        evicted = []
        while len(self._models) >= self.max_models:
            victim = next((h for h in self._models if h not in keep), next(iter(self._models)))
            evicted.append((victim, self.unload(victim)))
        return evicted

    def add(self, entry: LoadedModel) -> None:
        self._models[entry.config_hash] = entry

    def unload(self, config_hash: str) -> int:
        """Drop a model and really return its memory; returns the bytes it held (0 if absent)."""
        entry = self._models.pop(config_hash, None)
        if entry is None:
            return 0
        freed = entry.memory_bytes
        ref = weakref.ref(entry.model)
        entry.model = None
        entry.tokenizer = None
        del entry
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if ref() is not None:
            # Something still holds the module: its memory is not back. Say so rather than claim it.
            return 0
        return freed

    def hashes(self) -> list[str]:
        return list(self._models)
