"""Request protos -> resolved, validated configuration (config.md).

Pure module: protobuf stubs and the standard library only (no torch, transformers or
grpc), so the front process can validate a request without importing a model stack.

Resolution order for the decoder (config.md sections 3 and 4):

1. the preset (``decoder.preset``) is expanded;
2. the user's explicitly set fields override it;
3. the greedy rule: ``temperature == 0`` or ``do_sample == false`` means greedy, so
   ``do_sample=False`` is sent and temperature, top_k, top_p and min_p are not
   (repetition_penalty and min_new_tokens are kept); a dropped field that the user or
   the preset set is named in a ``SAMPLING_FIELDS_DROPPED`` warning;
4. defaults: an unset field produces no kwarg ("None is a sentinel"), except
   ``do_sample``, which is always sent because llem's default (true) differs from
   transformers' (false).

Every problem in a request is collected and raised together as one ``ConfigError``.

Canonical form of the load configuration (config.md section 5)
--------------------------------------------------------------
The model cache key is ``sha256(canonical).hexdigest()`` (lower-case hex), where
``canonical`` is the UTF-8 bytes of a JSON object built from section 1 only, after
defaults are resolved, so that unset and explicitly-default values hash the same.
The object has exactly these 16 keys, always present::

    attn_implementation        "sdpa" (default: transformers' own) | "eager" | "flash_attention_2"
                               | "flash_attention_3"
    bnb_4bit_compute_dtype     null unless load_in_4bit; else "float16" | "bfloat16" | "float32" (default)
    bnb_4bit_quant_type        null unless load_in_4bit; else "nf4" (default) | "fp4"
    bnb_4bit_use_double_quant  null unless load_in_4bit; else true | false (default)
    device_map                 "auto" (default) | "balanced" | "balanced_low_0" | "sequential"
                               | "cpu" | "cuda:N" ("cuda" is written "cuda:0")
    load_in_4bit               true | false
    load_in_8bit               true | false
    max_memory                 object: key = GPU index in decimal without leading zeros, or
                               "cpu"; value = the budget in bytes as a decimal
                               string ("1GiB" -> "1073741824", "500MB" -> "500000000")
    model                      the hub id as sent, or for a local model its directory relative to
                               the model root (the service names it so: one directory, one key)
    num_processes              1
    precision                  "fp32" | "fp16" | "bf16" (unset: "bf16" with CUDA, "fp32" without)
    revision                   "main" (default) or the string as sent
    torch_compile              true | false
    torch_compile_backend      null unless torch_compile; else the backend ("inductor" default)
    torch_compile_mode         null unless torch_compile; else the mode ("default" default)
    trust_remote_code          true | false

Serialisation: keys of every object sorted by code point; no whitespace (separators
``,`` and ``:``); strings JSON-escaped with every non-ASCII character written as
``\\uXXXX`` (lower-case hex, UTF-16 surrogate pairs), ``"`` and ``\\`` escaped, control
characters as ``\\n \\r \\t \\b \\f`` or ``\\u00XX``; integers in plain decimal; booleans
and null as JSON literals. A float (none today; the rule is fixed for future fields)
is written as a JSON *string* holding C ``printf("%.17g")`` of the value; NaN and
infinities are rejected before they get here. Once floats are replaced by those
strings this is exactly Python's
``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)``.
Generation fields (section 2) never enter the hash.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from llem.v1 import llem_pb2

try:  # protobuf >= 4.24; used to refuse fields a newer client sent (never silently dropped)
    from google.protobuf import unknown_fields as _unknown_fields
except ImportError:  # pragma: no cover
    _unknown_fields = None

__all__ = [
    "Capabilities",
    "ConfigError",
    "GENERATION_FIELDS",
    "GenerationPlan",
    "LOAD_FIELDS",
    "LoadConfig",
    "PRESETS",
    "ResolvedRequest",
    "Violation",
    "resolve_generate",
    "resolve_load",
]

INVALID_ARGUMENT = "INVALID_ARGUMENT"
FAILED_PRECONDITION = "FAILED_PRECONDITION"
PERMISSION_DENIED = "PERMISSION_DENIED"

# ---------------------------------------------------------------------------
# Public types
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    field: str
    description: str
    status: str = INVALID_ARGUMENT


class ConfigError(Exception):
    """All problems of one request. ``status`` is the gRPC status to answer with."""

    def __init__(self, violations: list[Violation]):
        self.violations = list(violations)
        self.status = _worst({v.status for v in self.violations})
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


def _worst(statuses: set[str]) -> str:
    """The status for a set of problems: the client's own mistakes first."""
    if INVALID_ARGUMENT in statuses or not statuses:
        return INVALID_ARGUMENT
    if PERMISSION_DENIED in statuses:
        return PERMISSION_DENIED
    return FAILED_PRECONDITION


# What transformers 5 accepts and the proto can name; the worker reports the real set.
_PROTO_CACHE_IMPLEMENTATIONS = frozenset(
    {"static", "offloaded_static", "sliding_window", "dynamic", "offloaded", "quantized"}
)


@dataclass(frozen=True)
class Capabilities:
    cuda: bool = False
    device_count: int = 0
    compute_capability: tuple[int, int] | None = None  # lowest among devices
    flash_attn_2: bool = False
    flash_attn_3: bool = False
    bitsandbytes: bool = True
    compile_backends: frozenset[str] = frozenset({"inductor", "eager", "aot_eager", "cudagraphs"})
    cache_implementations: frozenset[str] = _PROTO_CACHE_IMPLEMENTATIONS
    quantized_cache: bool = False
    allow_remote_code: bool = False
    max_prompts: int = 256
    max_input_tokens: int = 8192
    max_output_tokens: int = 4096

    @classmethod
    def from_worker(cls, caps: dict, **kw: Any) -> "Capabilities":
        """From a worker's probe (``worker._capabilities``); ``kw``: the server's limits and
        the like. Each worker sees only its own GPU (CUDA_VISIBLE_DEVICES): cuda:0 only."""
        cc = caps.get("compute_capability")
        fields = dict(
            cuda=bool(caps.get("cuda")), device_count=1 if caps.get("cuda") else 0,
            compute_capability=tuple(cc) if cc else None,
            flash_attn_2=bool(caps.get("flash_attn_2")), flash_attn_3=bool(caps.get("flash_attn_3")),
            bitsandbytes=bool(caps.get("bitsandbytes", False)),
            compile_backends=frozenset(caps.get("compile_backends", ["inductor"])),
            cache_implementations=frozenset(caps.get("cache_implementations", [])),
            quantized_cache=bool(caps.get("quantized_cache")),
        )
        return cls(**{**fields, **kw})


# ---------------------------------------------------------------------------
# Enum tables. An enum number missing here is "unknown" and rejected, so a value
# added to the proto fails loudly until it is mapped (test_config_coverage checks).
# ---------------------------------------------------------------------------

_PRECISION = {
    llem_pb2.PRECISION_FP32: "fp32",
    llem_pb2.PRECISION_FP16: "fp16",
    llem_pb2.PRECISION_BF16: "bf16",
}
_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_ATTN = {
    llem_pb2.ATTN_IMPLEMENTATION_SDPA: "sdpa",
    llem_pb2.ATTN_IMPLEMENTATION_FLASH_ATTENTION_2: "flash_attention_2",
    llem_pb2.ATTN_IMPLEMENTATION_FLASH_ATTENTION_3: "flash_attention_3",
    llem_pb2.ATTN_IMPLEMENTATION_EAGER: "eager",
}
_BNB_DTYPE = {
    llem_pb2.BNB4BIT_COMPUTE_DTYPE_FLOAT16: "float16",
    llem_pb2.BNB4BIT_COMPUTE_DTYPE_BFLOAT16: "bfloat16",
    llem_pb2.BNB4BIT_COMPUTE_DTYPE_FLOAT32: "float32",
}
_BNB_QUANT = {
    llem_pb2.BNB4BIT_QUANT_TYPE_NF4: "nf4",
    llem_pb2.BNB4BIT_QUANT_TYPE_FP4: "fp4",
}
_ENERGY_DELIVERY = {
    llem_pb2.ENERGY_DELIVERY_IN_RESPONSE: "in_response",
    llem_pb2.ENERGY_DELIVERY_DEFERRED: "deferred",
}
_CACHE = {
    llem_pb2.CACHE_IMPLEMENTATION_STATIC: "static",
    llem_pb2.CACHE_IMPLEMENTATION_OFFLOADED_STATIC: "offloaded_static",
    llem_pb2.CACHE_IMPLEMENTATION_SLIDING_WINDOW: "sliding_window",
    llem_pb2.CACHE_IMPLEMENTATION_DYNAMIC: "dynamic",
    llem_pb2.CACHE_IMPLEMENTATION_OFFLOADED: "offloaded",
    llem_pb2.CACHE_IMPLEMENTATION_QUANTIZED: "quantized",
}
_LOG_FLOAT_MAX = math.log(sys.float_info.max)
# Above 0 and below this, logits / temperature overflow float32 (1e-38 ran, 1e-40 did not):
# a margin of orders of magnitude, far below any temperature anyone samples with.
MIN_TEMPERATURE = 1e-30
# The caches prompt lookup can use: it crops rejected draft tokens off the cache. A
# fixed-length one (static, offloaded_static, sliding_window, hybrid) is overrun by the
# draft; a quantized one cannot be cropped. Also checked against the model's own
# generation_config in the worker (generation.py).
LOOKUP_CACHES = frozenset({"dynamic", "offloaded"})


def lookup_blocker(use_cache: bool | None, cache: str | None) -> str | None:
    """The field that keeps prompt lookup from running ("use_cache" off, or a
    "cache_implementation" it cannot crop), None when it can run. Validation asks it of
    the request, the worker of the model's own generation_config."""
    if use_cache is False:
        return "use_cache"
    if cache is not None and cache not in LOOKUP_CACHES:
        return "cache_implementation"
    return None
_PRESET = {
    llem_pb2.DECODER_PRESET_DETERMINISTIC: "deterministic",
    llem_pb2.DECODER_PRESET_STANDARD: "standard",
    llem_pb2.DECODER_PRESET_CREATIVE: "creative",
    llem_pb2.DECODER_PRESET_FACTUAL: "factual",
}


def _reverse(table: dict[int, str]) -> dict[str, int]:
    return {v: k for k, v in table.items()}


# config.md section 4.
PRESETS: dict[str, dict[str, Any]] = {
    "deterministic": {"temperature": 0.0, "do_sample": False},
    "standard": {"temperature": 1.0, "do_sample": True, "top_p": 0.95},
    "creative": {"temperature": 0.8, "do_sample": True, "top_p": 0.9, "repetition_penalty": 1.1},
    "factual": {"temperature": 0.3, "do_sample": True},
}

LOAD_FIELDS: frozenset[str] = frozenset(
    {
        "attn_implementation",
        "torch_compile",
        "torch_compile_mode",
        "torch_compile_backend",
        "load_in_4bit",
        "load_in_8bit",
        "bnb_4bit_compute_dtype",
        "bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant",
        "device_map",
        "max_memory",
        "revision",
        "trust_remote_code",
        "num_processes",
    }
)
GENERATION_FIELDS: frozenset[str] = frozenset(
    {
        "batch_size",
        "use_cache",
        "cache_implementation",
        "num_beams",
        "early_stopping",
        "length_penalty",
        "no_repeat_ngram_size",
        "prompt_lookup_num_tokens",
    }
)
_DECODER_VALUE_FIELDS = ("temperature", "do_sample", "top_k", "top_p", "repetition_penalty", "min_p", "min_new_tokens")
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")

_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_CUDA_ONLY_CACHES = frozenset({"offloaded_static", "offloaded"})
_CUDA_GRAPH_BACKENDS = frozenset({"cudagraphs"})
_FLASH_MIN_CC = {"flash_attention_2": (8, 0), "flash_attention_3": (9, 0)}


def _cache_missing(cache: str, caps: Capabilities) -> list[str]:
    """What this server lacks to run a cache_implementation (empty: it runs)."""
    missing = []
    if cache not in caps.cache_implementations:
        missing.append("the installed transformers does not offer it")
    if cache in _CUDA_ONLY_CACHES and not caps.cuda:
        missing.append("it needs CUDA and this server has none")
    if cache == "quantized" and not caps.quantized_cache:
        missing.append("it needs the optimum-quanto or hqq package (not installed on this server)")
    return missing


def usable_cache_implementations(caps: Capabilities) -> list[str]:
    """What pytorch.cache_implementation can name and this server runs (GetServerInfo): the
    proto's values that validation would not refuse here."""
    return sorted(c for c in _CACHE.values() if not _cache_missing(c, caps))


def usable_compile_backends(caps: Capabilities) -> list[str]:
    """The torch.compile backends a request may name here (CUDA graphs only with CUDA)."""
    return sorted(b for b in caps.compile_backends if caps.cuda or b not in _CUDA_GRAPH_BACKENDS)

_DEFAULT_BATCH_SIZE = 1
_DEFAULT_MAX_INPUT_TOKENS = 512
_DEFAULT_MAX_OUTPUT_TOKENS = 128
_DEFAULT_SEED = 42
_MAX_REQUEST_ID_CHARS = 128

_MEMORY_UNITS = {
    "": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
# As accelerate reads them: units in any case, spaces allowed ("10 gib"); but accelerate takes a
# decimal unit ending in a lower-case "b" ("10gb") as bits, which is refused as ambiguous.
_MEMORY_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_CUDA_DEVICE_RE = re.compile(r"^cuda(?::(\d+))?$")

# ---------------------------------------------------------------------------
# Resolved configuration
# ---------------------------------------------------------------------------


def _canonical_value(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite float in canonical form")
        return "%.17g" % value
    if isinstance(value, dict):
        return {str(k): _canonical_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    return value


def canonical_json(obj: Any) -> str:
    """The canonical JSON text described in the module docstring."""
    return json.dumps(
        _canonical_value(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


@dataclass(frozen=True)
class LoadConfig:
    model: str
    precision: str
    attn_implementation: str
    torch_compile: bool
    torch_compile_mode: str | None
    torch_compile_backend: str | None
    load_in_4bit: bool
    load_in_8bit: bool
    bnb_4bit_compute_dtype: str | None
    bnb_4bit_quant_type: str | None
    bnb_4bit_use_double_quant: bool | None
    device_map: str
    max_memory: tuple[tuple[str, str], ...]
    revision: str
    trust_remote_code: bool
    num_processes: int

    def _as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "precision": self.precision,
            "attn_implementation": self.attn_implementation,
            "torch_compile": self.torch_compile,
            "torch_compile_mode": self.torch_compile_mode,
            "torch_compile_backend": self.torch_compile_backend,
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
            "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "device_map": self.device_map,
            "max_memory": dict(self.max_memory),
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "num_processes": self.num_processes,
        }

    def canonical(self) -> str:
        return canonical_json(self._as_dict())

    def config_hash(self) -> str:
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()

    def load_kwargs(self) -> dict[str, Any]:
        """JSON-able kwargs for ``AutoModelForCausalLM.from_pretrained(model, **kw)``.

        The worker turns ``dtype`` into a torch dtype and ``quantization_config`` into
        ``BitsAndBytesConfig`` (its ``bnb_4bit_compute_dtype`` into a torch dtype).
        """
        kw: dict[str, Any] = {
            "dtype": _DTYPE[self.precision],
            "device_map": self.device_map,
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
        }
        kw["attn_implementation"] = self.attn_implementation
        if self.max_memory:
            # Byte counts as ints: accelerate rejects a unit-less string such as "1024".
            # Keys stay strings so the dict survives json.dumps(sort_keys=True); the
            # worker turns GPU keys into ints (accelerate needs int keys for GPUs).
            kw["max_memory"] = {k: int(v) for k, v in self.max_memory}
        if self.load_in_4bit:
            kw["quantization_config"] = {
                "load_in_4bit": True,
                "bnb_4bit_compute_dtype": self.bnb_4bit_compute_dtype,
                "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            }
        elif self.load_in_8bit:
            kw["quantization_config"] = {"load_in_8bit": True}
        return kw

    def tokenizer_kwargs(self) -> dict[str, Any]:
        """Kwargs for ``AutoTokenizer.from_pretrained``: the same revision and remote-code
        choice as the model (upstream forgot the tokenizer)."""
        return {"revision": self.revision, "trust_remote_code": self.trust_remote_code}

    def compile_kwargs(self) -> dict[str, str] | None:
        if not self.torch_compile:
            return None
        return {"mode": self.torch_compile_mode, "backend": self.torch_compile_backend}

    def to_proto(self) -> llem_pb2.ModelConfig:
        """The resolved values, explicitly set (effective_config.model, ListModels)."""
        pt = llem_pb2.PyTorchConfig(
            torch_compile=self.torch_compile,
            load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit,
            device_map=self.device_map,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            num_processes=self.num_processes,
        )
        pt.attn_implementation = _reverse(_ATTN)[self.attn_implementation]
        if self.torch_compile:
            pt.torch_compile_mode = self.torch_compile_mode
            pt.torch_compile_backend = self.torch_compile_backend
        if self.load_in_4bit:
            pt.bnb_4bit_compute_dtype = _reverse(_BNB_DTYPE)[self.bnb_4bit_compute_dtype]
            pt.bnb_4bit_quant_type = _reverse(_BNB_QUANT)[self.bnb_4bit_quant_type]
            pt.bnb_4bit_use_double_quant = bool(self.bnb_4bit_use_double_quant)
        pt.max_memory.update(dict(self.max_memory))
        return llem_pb2.ModelConfig(
            model=self.model, precision=_reverse(_PRECISION)[self.precision], pytorch=pt
        )


@dataclass(frozen=True)
class GenerationPlan:
    batch_size: int
    max_input_tokens: int
    max_output_tokens: int
    random_seed: int
    greedy: bool
    generate_kwargs: dict[str, Any]  # excludes max_new_tokens: the worker adds it
    decoder: dict[str, Any]  # DecoderConfig field names; "preset" as its lower-case name
    energy_delivery: str = "in_response"  # or "deferred": the service answers before the energy settles

    def worker_payload(self) -> dict[str, Any]:
        """What the worker's run_generate reads (plain data, sent over the pipe)."""
        return {"batch_size": self.batch_size, "generate_kwargs": self.generate_kwargs,
                "max_input_tokens": self.max_input_tokens, "max_output_tokens": self.max_output_tokens,
                "random_seed": self.random_seed}

    def decoder_proto(self) -> llem_pb2.DecoderConfig:
        d = llem_pb2.DecoderConfig(**{k: v for k, v in self.decoder.items() if k != "preset"})
        if "preset" in self.decoder:
            d.preset = _reverse(_PRESET)[self.decoder["preset"]]
        return d


@dataclass(frozen=True)
class ResolvedRequest:
    load: LoadConfig
    plan: GenerationPlan
    warnings: tuple[tuple[str, str], ...]


# ---------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------


MAX_MEMORY_KEYS = 64  # max_memory keys accepted: far more than the GPUs of any machine, plus "cpu"
# A person reads these, and the error trailer holds a few dozen: more only cost the front
# process time (a request can name hundreds of thousands of bad map keys).
MAX_VIOLATIONS = 100
_MAX_DESCRIPTION_CHARS = 1000  # descriptions quote the client's values, which may be megabytes


@dataclass
class _Collector:
    violations: list[Violation] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    count: int = 0  # every problem found, kept or not
    _dropped: set[str] = field(default_factory=set)  # statuses of those not kept

    def bad(self, path: str, description: str, status: str = INVALID_ARGUMENT) -> None:
        self.count += 1
        if len(self.violations) >= MAX_VIOLATIONS:
            self._dropped.add(status)
            return
        if len(description) > _MAX_DESCRIPTION_CHARS:
            description = description[: _MAX_DESCRIPTION_CHARS - 1] + "…"
        self.violations.append(Violation(path, description, status))

    def error(self) -> ConfigError:
        """Every kept problem, then one saying how many more were found; that last one carries
        the worst status among them, so the error's status is what all of them would give."""
        more = self.count - len(self.violations)
        extra = [Violation("…", f"{more} more problem(s) not listed", _worst(self._dropped))] if more else []
        return ConfigError(self.violations + extra)

    def warn(self, code: str, message: str) -> None:
        self.warnings.append((code, message))


def _has(msg: Any, name: str) -> bool:
    """Presence: HasField for fields with presence, non-zero for plain enums,
    non-empty for maps and repeated fields."""
    fd = msg.DESCRIPTOR.fields_by_name[name]
    if fd.is_repeated:
        return len(getattr(msg, name)) > 0
    if fd.has_presence:
        return msg.HasField(name)
    return getattr(msg, name) != fd.default_value


def _check_unknown_fields(col: _Collector, msg: Any, path: str) -> None:
    # A client built from a newer .proto may send field numbers this server does not
    # know; protobuf would keep them aside and the server would ignore them silently.
    if _unknown_fields is None:
        return
    numbers = sorted({f.field_number for f in _unknown_fields.UnknownFieldSet(msg)})
    if numbers:
        col.bad(
            path,
            f"carries field number(s) {', '.join(map(str, numbers))} that this server's "
            f"{msg.DESCRIPTOR.full_name} does not have (client built from a newer llem.proto?); "
            "they would be ignored, so the request is refused",
        )


def _enum(col: _Collector, path: str, value: int, table: dict[int, str], enum_name: str) -> str | None:
    if value == 0:
        return None
    if value not in table:
        allowed = ", ".join(table.values())
        col.bad(path, f"unknown {enum_name} value {value}; allowed: {allowed} (or leave it unset)")
        return None
    return table[value]


def _int_range(col: _Collector, path: str, value: int, lo: int, hi: int | None = None, hi_why: str = "") -> bool:
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        col.bad(path, f"must be {rng}{hi_why}, got {value}")
        return False
    return True


def _float_range(col: _Collector, path: str, value: float, lo: float | None, hi: float | None) -> bool:
    if not math.isfinite(value):
        col.bad(path, f"must be a finite number, got {value}")
        return False
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        col.bad(path, f"must be {rng}, got {value}")
        return False
    return True


def _nonempty(col: _Collector, path: str, value: str) -> bool:
    if value == "":
        col.bad(path, "is set to the empty string; leave it unset for the default or give a value")
        return False
    return True


def _parse_memory(value: str) -> int | None:
    m = _MEMORY_RE.match(value)
    number, unit = (m.group(1), m.group(2) or "") if m else ("", "")
    if not m or (unit.endswith("b") and not unit.lower().endswith("ib")):  # "10gb": bits to accelerate
        return None
    unit = unit.upper().replace("IB", "iB")  # "gib" -> "GiB", "kb" was refused above
    if "." in number and unit == "":
        return None  # fractional bytes make no sense
    # Integer arithmetic where possible; accelerate truncates a fractional byte count.
    if "." in number:
        whole, frac = number.split(".")
        scaled = int(whole + frac) * _MEMORY_UNITS[unit] // 10 ** len(frac)
    else:
        scaled = int(number) * _MEMORY_UNITS[unit]
    return scaled if scaled < 2**63 else None


def _resolve_load(
    col: _Collector, m: llem_pb2.ModelConfig, caps: Capabilities, model_is_local: bool, prefix: str
) -> LoadConfig | None:
    pp = f"{prefix}.pytorch"
    p = m.pytorch
    start = col.count
    _check_unknown_fields(col, m, prefix)
    _check_unknown_fields(col, p, pp)

    if not m.model.strip():
        col.bad(f"{prefix}.model", "is required: a directory under the server's model root or a hub id")

    # precision: unset is bf16 with CUDA; without CUDA, fp32 (reported back as effective).
    precision = _enum(col, f"{prefix}.precision", m.precision, _PRECISION, "precision")
    if precision is None:
        precision = "bf16" if caps.cuda else "fp32"

    # attention (rule 9)
    # Unset is transformers' default, sdpa (config.md), and is asked for by name so that the cached
    # model is the one the key says: a model without sdpa fails the load naming this field,
    # where transformers would quietly fall back to eager.
    attn = _enum(col, f"{pp}.attn_implementation", p.attn_implementation, _ATTN, "attn_implementation") or "sdpa"
    if attn in _FLASH_MIN_CC:
        need = _FLASH_MIN_CC[attn]
        package = "flash_attn" if attn == "flash_attention_2" else "flash_attn_interface (flash-attn 3)"
        have_pkg = caps.flash_attn_2 if attn == "flash_attention_2" else caps.flash_attn_3
        missing = []
        if not caps.cuda:
            missing.append("a CUDA GPU (this server has none)")
        elif caps.compute_capability is None or tuple(caps.compute_capability) < need:
            cc = "unknown" if caps.compute_capability is None else "%d.%d" % tuple(caps.compute_capability)
            missing.append(f"compute capability >= {need[0]}.{need[1]} (this server has {cc})")
        if not have_pkg:
            missing.append(f"the {package} package (not installed on this server)")
        if missing:
            col.bad(f"{pp}.attn_implementation", f"{attn} needs " + " and ".join(missing), FAILED_PRECONDITION)
        elif precision == "fp32":
            col.bad(
                f"{pp}.attn_implementation",
                f"{attn} runs only in fp16/bf16; set precision to fp16 or bf16 (it is fp32)",
            )

    # compile (rule 2, modes, backends)
    compile_on = p.torch_compile if p.HasField("torch_compile") else False
    mode = backend = None
    for name, allowed in (("torch_compile_mode", _COMPILE_MODES), ("torch_compile_backend", None)):
        if not p.HasField(name):
            continue
        value = getattr(p, name)
        path = f"{pp}.{name}"
        if not _nonempty(col, path, value):
            continue
        if not compile_on:
            col.bad(path, f"{name} is set but torch_compile is not true; set torch_compile: true or unset {name}")
            continue
        if allowed is not None and value not in allowed:
            col.bad(path, f"{value!r} is not a torch.compile mode; allowed: {', '.join(allowed)}")
            continue
        if (value == "reduce-overhead" or value in _CUDA_GRAPH_BACKENDS) and not caps.cuda:
            # CUDA graphs only: on CPU torch skips them and the choice would do nothing.
            col.bad(path, f"{value!r} uses CUDA graphs; this server has no CUDA device", FAILED_PRECONDITION)
            continue
        if allowed is None and value not in caps.compile_backends:
            # A near miss of an installed backend is a typo (the client's to fix); any other name
            # may be a backend that another server has installed.
            usable = usable_compile_backends(caps)
            near = difflib.get_close_matches(value, usable, n=1, cutoff=0.75)
            col.bad(
                path,
                f"{value!r} is not a torch.compile backend on this server"
                + (f" (did you mean {near[0]!r}?)" if near else "")
                + f"; available: {', '.join(usable)}",
                INVALID_ARGUMENT if near else FAILED_PRECONDITION,
            )
            continue
        if name == "torch_compile_mode":
            mode = value
        else:
            backend = value
    if compile_on:
        mode = mode or "default"
        backend = backend or "inductor"
        if mode != "default" and backend != "inductor" and p.HasField("torch_compile_mode"):
            # torch hands mode to non-inductor backends, which ignore it.
            col.bad(
                f"{pp}.torch_compile_mode",
                f"torch_compile_mode {mode!r} applies only to the inductor backend (backend is {backend!r})",
            )

    # quantization (rules 1, 3, 11)
    q4 = p.load_in_4bit if p.HasField("load_in_4bit") else False
    q8 = p.load_in_8bit if p.HasField("load_in_8bit") else False
    if q4 and q8:
        col.bad(f"{pp}.load_in_8bit", "load_in_4bit and load_in_8bit are both true; choose one")
    if (q4 or q8) and not caps.bitsandbytes:
        which = "load_in_4bit" if q4 else "load_in_8bit"
        col.bad(f"{pp}.{which}", f"{which} needs the bitsandbytes package (not installed on this server)",
                FAILED_PRECONDITION)
    bnb_dtype = _enum(col, f"{pp}.bnb_4bit_compute_dtype", p.bnb_4bit_compute_dtype, _BNB_DTYPE,
                      "bnb_4bit_compute_dtype")
    bnb_quant = _enum(col, f"{pp}.bnb_4bit_quant_type", p.bnb_4bit_quant_type, _BNB_QUANT, "bnb_4bit_quant_type")
    bnb_double = p.bnb_4bit_use_double_quant if p.HasField("bnb_4bit_use_double_quant") else None
    for name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
        if _has(p, name) and not q4:
            col.bad(f"{pp}.{name}", f"{name} is set but load_in_4bit is not true; set load_in_4bit: true or unset it")
    if q4:
        bnb_dtype = bnb_dtype or "float32"
        bnb_quant = bnb_quant or "nf4"
        bnb_double = bool(bnb_double)
    else:
        bnb_dtype = bnb_quant = bnb_double = None

    # device_map (rule 11 for CUDA devices)
    device_map = "auto"
    if p.HasField("device_map") and _nonempty(col, f"{pp}.device_map", p.device_map):
        dm = p.device_map
        cuda_m = _CUDA_DEVICE_RE.match(dm)
        if dm in _DEVICE_MAP_STRATEGIES or dm == "cpu":
            device_map = dm
        elif cuda_m:
            # transformers maps bare "cuda" to cuda:LOCAL_RANK, i.e. cuda:0 here.
            index = int(cuda_m.group(1) or 0)
            device_map = f"cuda:{index}"
            if not caps.cuda:
                col.bad(f"{pp}.device_map", f"device_map {dm!r} needs CUDA; this server has no CUDA device",
                        FAILED_PRECONDITION)
            elif index >= caps.device_count:
                col.bad(f"{pp}.device_map",
                        f"device_map {dm!r}: a model here sees {caps.device_count} CUDA device(s) "
                        f"(indexes 0-{caps.device_count - 1}): each worker process drives one GPU, seen "
                        "as cuda:0, and the server spreads models over its GPUs itself; use 'auto' or "
                        "'cuda:0'", FAILED_PRECONDITION)
        else:
            col.bad(f"{pp}.device_map",
                    f"{dm!r} is not a device map; allowed: {', '.join(_DEVICE_MAP_STRATEGIES)}, cpu, cuda, cuda:N")

    # max_memory
    mem: dict[str, str] = {}
    entries = p.max_memory.items()
    if len(p.max_memory) > MAX_MEMORY_KEYS:
        # A budget has one key per GPU and "cpu"; checking 400,000 keys one by one took the
        # front process 0.6 s, so a map this long is refused as a whole.
        col.bad(f"{pp}.max_memory", f"has {len(p.max_memory)} keys; at most {MAX_MEMORY_KEYS} are accepted "
                                     "(keys are GPU indexes (0, 1, ...) or 'cpu')")
        entries = ()
    for key, value in entries:
        path = f"{pp}.max_memory"
        if key.isascii() and key.isdigit():
            norm = str(int(key))
            if not caps.cuda or int(key) >= caps.device_count:
                col.bad(path, f"key {key!r}: a model here sees {caps.device_count if caps.cuda else 0} CUDA "
                              "device(s) (each worker process drives one GPU, seen as GPU 0); accelerate would "
                              "ignore the budget", FAILED_PRECONDITION)
        elif key == "cpu":
            norm = key
        elif key == "disk":
            col.bad(path, "key 'disk': this server does not serve disk offload (weights that fit in no budget "
                          "fail the load); keys are GPU indexes (0, 1, ...) or 'cpu'")
            continue
        else:
            col.bad(path, f"key {key!r} is not a GPU index (0, 1, ...) or 'cpu'")
            continue
        size = _parse_memory(value)
        if size is None:
            col.bad(path, f"value {value!r} for key {key!r} is not a size; write bytes ('1024') or a number "
                          "with a unit: KB, MB, GB, TB, KiB, MiB, GiB, TiB (e.g. '10GiB'); a decimal unit "
                          "ending in a lower-case b ('10gb') is ambiguous: accelerate reads it as bits")
            continue
        if norm in mem:
            col.bad(path, f"key {key!r} names the same device as another key")
            continue
        mem[norm] = str(size)
    if p.max_memory and device_map not in _DEVICE_MAP_STRATEGIES:
        # transformers only consults max_memory when it plans the placement itself.
        col.bad(f"{pp}.max_memory", f"max_memory is used only with device_map "
                f"{'/'.join(_DEVICE_MAP_STRATEGIES)}; device_map is {device_map!r}")

    # revision
    revision = "main"
    if p.HasField("revision") and _nonempty(col, f"{pp}.revision", p.revision):
        revision = p.revision
        if model_is_local and revision != "main":
            # from_pretrained silently ignores revision for a directory.
            col.bad(f"{pp}.revision", "revision applies to hub ids; a local directory has no revisions")

    # trust_remote_code (rule 10)
    trust = p.trust_remote_code if p.HasField("trust_remote_code") else False
    if trust and not caps.allow_remote_code:
        col.bad(f"{pp}.trust_remote_code",
                "trust_remote_code is refused: this server was not started allowing remote code",
                PERMISSION_DENIED)

    # num_processes (rule 7)
    if p.HasField("num_processes") and p.num_processes != 1:
        if p.num_processes < 1:
            col.bad(f"{pp}.num_processes", f"must be >= 1, got {p.num_processes}")
        else:
            col.bad(f"{pp}.num_processes",
                    f"this server runs one model replica per device; num_processes must be 1, "
                    f"got {p.num_processes}")

    if col.count > start:
        return None
    return LoadConfig(
        model=m.model,
        precision=precision,
        attn_implementation=attn,
        torch_compile=compile_on,
        torch_compile_mode=mode,
        torch_compile_backend=backend,
        load_in_4bit=q4,
        load_in_8bit=q8,
        bnb_4bit_compute_dtype=bnb_dtype,
        bnb_4bit_quant_type=bnb_quant,
        bnb_4bit_use_double_quant=bnb_double,
        device_map=device_map,
        max_memory=tuple(sorted(mem.items())),
        revision=revision,
        trust_remote_code=trust,
        num_processes=1,
    )


def request_id_problem(request_id: str) -> str | None:
    """Why a request id cannot be used (it goes into logs and the deferred-energy store), or None."""
    if len(request_id) > _MAX_REQUEST_ID_CHARS:
        return f"is {len(request_id)} characters; at most {_MAX_REQUEST_ID_CHARS}"
    if any(unicodedata.category(c) == "Cc" for c in request_id):
        return "contains control characters (it goes into logs)"
    return None


def _resolve_plan(col: _Collector, req: llem_pb2.GenerateRequest, caps: Capabilities) -> GenerationPlan | None:
    start = col.count
    p = req.model.pytorch
    d = req.decoder
    pp = "model.pytorch"
    _check_unknown_fields(col, req, "request")
    _check_unknown_fields(col, d, "decoder")

    # --- request level
    n_prompts = len(req.prompts)
    if n_prompts == 0:
        col.bad("prompts", "at least one prompt is required")
    elif n_prompts > caps.max_prompts:
        col.bad("prompts", f"{n_prompts} prompts exceed this server's limit of {caps.max_prompts} (max_prompts)")
    max_in = min(_DEFAULT_MAX_INPUT_TOKENS, caps.max_input_tokens)
    if req.HasField("max_input_tokens"):
        max_in = req.max_input_tokens
        _int_range(col, "max_input_tokens", max_in, 1, caps.max_input_tokens, " (this server's max_input_tokens limit)")
    max_out = min(_DEFAULT_MAX_OUTPUT_TOKENS, caps.max_output_tokens)
    if req.HasField("max_output_tokens"):
        max_out = req.max_output_tokens
        _int_range(col, "max_output_tokens", max_out, 1, caps.max_output_tokens,
                   " (this server's max_output_tokens limit)")
    # Any int64 is a valid seed: torch.manual_seed takes the whole range.
    seed = req.random_seed if req.HasField("random_seed") else _DEFAULT_SEED
    why = request_id_problem(req.request_id)
    if why:
        col.bad("request_id", why)
    delivery = _enum(col, "energy_delivery", req.energy_delivery, _ENERGY_DELIVERY, "energy_delivery") or "in_response"

    # --- pytorch generation fields (section 2)
    gen: dict[str, Any] = {}
    batch_size = _DEFAULT_BATCH_SIZE
    if p.HasField("batch_size") and _int_range(col, f"{pp}.batch_size", p.batch_size, 1):
        batch_size = p.batch_size
    num_beams = 1
    if p.HasField("num_beams") and _int_range(col, f"{pp}.num_beams", p.num_beams, 1):
        num_beams = p.num_beams
        gen["num_beams"] = num_beams
    for name in ("early_stopping", "length_penalty"):
        if not p.HasField(name):
            continue
        value = getattr(p, name)
        if name == "length_penalty" and not _float_range(col, f"{pp}.{name}", value, None, None):
            continue
        if num_beams <= 1:
            # rule 6: transformers would only log that the flag is ignored.
            col.bad(f"{pp}.{name}", f"{name} acts only in beam search; set num_beams > 1 or unset {name}")
            continue
        if name == "length_penalty" and value > 0 and max_out >= 1 and \
                value * math.log(max_out + 1) > _LOG_FLOAT_MAX:
            # Beam scores divide by (generated length) ** length_penalty, a Python float:
            # past the largest float generate() raises OverflowError. (An invalid
            # max_output_tokens is reported on its own.)
            col.bad(f"{pp}.{name}", f"length_penalty {value:g} overflows beam scoring over {max_out} new tokens "
                                    f"(their count to the power length_penalty exceeds the largest float); "
                                    f"at most {_LOG_FLOAT_MAX / math.log(max_out + 1):.0f} here")
            continue
        gen[name] = value
    if p.HasField("no_repeat_ngram_size") and _int_range(col, f"{pp}.no_repeat_ngram_size",
                                                         p.no_repeat_ngram_size, 0):
        gen["no_repeat_ngram_size"] = p.no_repeat_ngram_size
    use_cache = p.use_cache if p.HasField("use_cache") else None
    if use_cache is not None:
        gen["use_cache"] = use_cache
    cache = _enum(col, f"{pp}.cache_implementation", p.cache_implementation, _CACHE, "cache_implementation")
    if cache is not None:
        path = f"{pp}.cache_implementation"
        missing = _cache_missing(cache, caps)
        if use_cache is False:
            # rule 4
            col.bad(path, "cache_implementation is set but use_cache is false; unset one of them")
        elif missing:
            col.bad(path, f"cache_implementation {cache!r}: " + "; ".join(missing), FAILED_PRECONDITION)
        else:
            gen["cache_implementation"] = cache
            if cache == "sliding_window":
                col.warn("CACHE_SLIDING_WINDOW_DEPRECATED",
                         "cache_implementation 'sliding_window' is deprecated in transformers 5; "
                         "use 'static' or 'offloaded_static'")
    if p.HasField("prompt_lookup_num_tokens") and _int_range(col, f"{pp}.prompt_lookup_num_tokens",
                                                             p.prompt_lookup_num_tokens, 1):
        per_call = min(batch_size, n_prompts)
        if per_call > 1:
            # rule 5: transformers raises "assisted generate is only supported for batch_size = 1".
            col.bad(f"{pp}.prompt_lookup_num_tokens",
                    f"prompt lookup decoding runs one prompt per generate() call; this request puts {per_call} "
                    "in a call (set batch_size: 1 or send one prompt)")
        elif num_beams > 1:
            # transformers would log that assisted generation ignores beams and carry on.
            col.bad(f"{pp}.prompt_lookup_num_tokens",
                    "prompt lookup decoding works only with greedy search or sampling; unset num_beams or set it to 1")
        elif (blocker := lookup_blocker(use_cache, cache)) == "use_cache":
            # transformers raises "Assisted decoding requires a cache" inside generate().
            col.bad(f"{pp}.prompt_lookup_num_tokens",
                    "prompt lookup decoding needs the KV cache; unset use_cache or set it to true")
        elif blocker == "cache_implementation":
            # A fixed-length cache is overrun whenever the lookup finds a match near its end
            # (transformers 5: IndexError in index_copy_, data-dependent); a quantized one
            # cannot be cropped (ValueError).
            col.bad(f"{pp}.prompt_lookup_num_tokens",
                    f"prompt lookup decoding cannot run on a {cache!r} cache: it crops rejected draft tokens, "
                    "which a fixed-length cache overruns and a quantized one cannot do; unset cache_implementation "
                    "or use dynamic")
        else:
            gen["prompt_lookup_num_tokens"] = p.prompt_lookup_num_tokens

    # --- decoder: validate the user's values, then preset -> user -> greedy -> defaults
    dp = "decoder"
    user: dict[str, Any] = {}
    float_ranges = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "repetition_penalty": (0.1, 10.0),
                    "min_p": (0.0, 1.0)}
    if d.HasField("temperature") and 0.0 < d.temperature < MIN_TEMPERATURE:
        # float32 logits divided by it become inf, and sampling fails ("probability tensor
        # contains inf, nan or element < 0"); 0 is the way to ask for greedy.
        col.bad(f"{dp}.temperature", f"temperature {d.temperature:g} is too small to sample with (logits overflow "
                                     f"below {MIN_TEMPERATURE:g}); use 0 for greedy decoding")
    int_mins = {"top_k": 0, "min_new_tokens": 1}
    for name in _DECODER_VALUE_FIELDS:
        if not d.HasField(name):
            continue
        value = getattr(d, name)
        ok = True
        if name in float_ranges:
            ok = _float_range(col, f"{dp}.{name}", value, *float_ranges[name])
        elif name in int_mins:
            ok = _int_range(col, f"{dp}.{name}", value, int_mins[name])
        if ok:
            user[name] = value
    if "min_new_tokens" in user and user["min_new_tokens"] > max_out:
        # Accepted (config.md: int >= 1; an llem YAML must run unchanged): generate() would
        # suppress end-of-sequence to the last token either way, so send what runs.
        col.warn("MIN_NEW_TOKENS_CAPPED",
                 f"min_new_tokens {user['min_new_tokens']} is above max_output_tokens {max_out}: every completion "
                 f"runs to {max_out} tokens (end-of-sequence is suppressed throughout); sent as {max_out}")
        user["min_new_tokens"] = max_out
    preset = _enum(col, f"{dp}.preset", d.preset, _PRESET, "preset")
    chosen = {**PRESETS.get(preset or "", {}), **user}
    temp_zero = chosen.get("temperature") == 0.0
    greedy = temp_zero or chosen.get("do_sample") is False
    decoder: dict[str, Any] = {}
    if greedy:
        dropped = [n for n in _SAMPLING_ONLY if n in chosen and not (n == "temperature" and temp_zero)]
        if temp_zero and chosen.get("do_sample") is True:
            dropped.insert(0, "do_sample=true")
        if dropped:
            why = "temperature 0" if temp_zero else "do_sample false"
            col.warn("SAMPLING_FIELDS_DROPPED", f"greedy decoding ({why}): {', '.join(dropped)} not sent")
        decoder["do_sample"] = False
    else:
        decoder["do_sample"] = True
        for name in _SAMPLING_ONLY:
            if name in chosen:
                decoder[name] = chosen[name]
    for name in ("repetition_penalty", "min_new_tokens"):
        if name in chosen:
            decoder[name] = chosen[name]

    if col.count > start:
        return None
    generate_kwargs = {**decoder, **gen}
    if preset is not None:
        decoder["preset"] = preset
    return GenerationPlan(
        batch_size=batch_size,
        max_input_tokens=max_in,
        max_output_tokens=max_out,
        random_seed=seed,
        greedy=greedy,
        generate_kwargs=generate_kwargs,
        decoder=decoder,
        energy_delivery=delivery,
    )


def resolve_generate(
    req: llem_pb2.GenerateRequest, caps: Capabilities, *, model_is_local: bool
) -> ResolvedRequest:
    """Validate and resolve a GenerateRequest; raises ConfigError with every problem."""
    col = _Collector()
    load = _resolve_load(col, req.model, caps, model_is_local, "model")
    plan = _resolve_plan(col, req, caps)
    if col.count:
        raise col.error()
    assert load is not None and plan is not None
    return ResolvedRequest(load=load, plan=plan, warnings=tuple(col.warnings))


def resolve_load(
    model: llem_pb2.ModelConfig, caps: Capabilities, *, model_is_local: bool, field_prefix: str = "model"
) -> tuple[LoadConfig, tuple[tuple[str, str], ...]]:
    """Validate and resolve a LoadModel configuration. Generation fields are refused:
    they would not change the load, and no field is silently ignored."""
    col = _Collector()
    for fd in model.pytorch.DESCRIPTOR.fields:
        if fd.name in GENERATION_FIELDS and _has(model.pytorch, fd.name):
            col.bad(f"{field_prefix}.pytorch.{fd.name}", f"{fd.name} is a generation field; LoadModel does not use it")
    load = _resolve_load(col, model, caps, model_is_local, field_prefix)
    if col.count:
        raise col.error()
    assert load is not None
    return load, tuple(col.warnings)
