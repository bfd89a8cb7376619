"""No field is silently ignored: every field of the request protos is consumed by config.

The field list is not written here: it is walked from the proto descriptors, starting at
GenerateRequest (which reaches ModelConfig, PyTorchConfig and DecoderConfig). For every
field a non-default valid value is set on a valid base request and the test asserts that
config consumed it: the resolved output (load config and its hash, kwargs, generation
plan, warnings) changed, or ConfigError named exactly that field path. A field added to
the .proto that config.py does not read leaves the output unchanged and fails here; an
enum value added to the .proto that config.py does not map is refused as "unknown" and
fails the enum check, which demands every declared value be accepted and distinct.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from llem.v1 import llem_pb2 as pb
from llem_server.config import GENERATION_FIELDS, LOAD_FIELDS, Capabilities, ConfigError, resolve_generate

# Everything available, so that each value can show its effect without a capability
# refusal standing in for it.
FULL = Capabilities(
    cuda=True,
    device_count=2,
    compute_capability=(9, 0),
    flash_attn_2=True,
    flash_attn_3=True,
    bitsandbytes=True,
    quantized_cache=True,
    allow_remote_code=True,
)

ROOT = pb.GenerateRequest.DESCRIPTOR


def base() -> pb.GenerateRequest:
    return pb.GenerateRequest(model=pb.ModelConfig(model="org/model"), prompts=["hello"])


def _is_map(fd) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def walk(descriptor, prefix: str = "", stack: tuple = ()):
    """(path, FieldDescriptor) for every leaf field; sub-messages are walked, not leaves."""
    for fd in descriptor.fields:
        path = prefix + fd.name
        if fd.message_type is not None and not _is_map(fd) and not fd.is_repeated:
            assert fd.message_type.full_name not in stack, f"recursive message at {path}"
            yield from walk(fd.message_type, path + ".", stack + (descriptor.full_name,))
        else:
            yield path, fd


def walked_messages(descriptor, seen=None) -> set[str]:
    seen = set() if seen is None else seen
    seen.add(descriptor.full_name)
    for fd in descriptor.fields:
        if fd.message_type is not None and not _is_map(fd) and fd.message_type.full_name not in seen:
            walked_messages(fd.message_type, seen)
    return seen


FIELDS = dict(walk(ROOT))


def scalar_candidates(fd) -> list[Any]:
    t = fd.type
    if t == fd.TYPE_BOOL:
        return [True, False]
    if t == fd.TYPE_ENUM:
        return [v.number for v in fd.enum_type.values if v.number != 0]
    if t in (fd.TYPE_INT32, fd.TYPE_INT64, fd.TYPE_SINT32, fd.TYPE_SINT64, fd.TYPE_UINT32, fd.TYPE_UINT64,
             fd.TYPE_FIXED32, fd.TYPE_FIXED64, fd.TYPE_SFIXED32, fd.TYPE_SFIXED64):
        return [2, 3]
    if t in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        return [0.5, 1.5]
    if t == fd.TYPE_STRING:
        return ["probe"]
    if t == fd.TYPE_BYTES:
        return [b"probe"]
    raise AssertionError(f"no candidate rule for field type {t} ({fd.full_name}): extend this test")


def candidates(fd) -> list[Any]:
    if _is_map(fd):
        key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        return [{scalar_candidates(key_fd)[0]: v} for v in scalar_candidates(value_fd)]
    if fd.is_repeated:
        return [[v] for v in scalar_candidates(fd)]
    return scalar_candidates(fd)


# Fields whose default-adjacent values are invalid or need a companion field. "context" is
# applied to the baseline and the probe alike, so the probe differs in one field only.
COMPILE = {"model.pytorch.torch_compile": True}
Q4 = {"model.pytorch.load_in_4bit": True}
BEAMS = {"model.pytorch.num_beams": 2}
OVERRIDES: dict[str, dict[str, Any]] = {
    "model.pytorch.torch_compile_mode": {"context": COMPILE, "candidates": ["max-autotune", "reduce-overhead"]},
    "model.pytorch.torch_compile_backend": {"context": COMPILE, "candidates": ["eager", "aot_eager"]},
    "model.pytorch.bnb_4bit_compute_dtype": {"context": Q4},
    "model.pytorch.bnb_4bit_quant_type": {"context": Q4},
    "model.pytorch.bnb_4bit_use_double_quant": {"context": Q4},
    "model.pytorch.device_map": {"candidates": ["cpu", "balanced", "cuda:1"]},
    "model.pytorch.max_memory": {"candidates": [{"cpu": "1GiB"}, {"0": "2GiB", "cpu": "1GiB"}]},
    "model.pytorch.revision": {"candidates": ["v1.0"]},
    "model.pytorch.early_stopping": {"context": BEAMS},
    "model.pytorch.length_penalty": {"context": BEAMS},
    # The plan does not carry the prompts (the worker gets them from the request), so
    # show that config reads them: over the server's prompt limit is refused by name.
    "prompts": {"caps": dataclasses.replace(FULL, max_prompts=1), "candidates": [["a", "b"]]},
    # request_id is echoed by the service; config checks it is fit for logs.
    "request_id": {"candidates": ["x" * 129, "a\x00b"]},
}


def set_field(msg, path: str, value: Any) -> None:
    *parents, name = path.split(".")
    for p in parents:
        msg = getattr(msg, p)
    fd = msg.DESCRIPTOR.fields_by_name[name]
    if _is_map(fd):
        getattr(msg, name).clear()
        getattr(msg, name).update(value)
    elif fd.is_repeated:
        del getattr(msg, name)[:]
        getattr(msg, name).extend(value)
    else:
        setattr(msg, name, value)


def observe(req, caps, local=False):
    try:
        r = resolve_generate(req, caps, model_is_local=local)
    except ConfigError as err:
        return ("error", frozenset(v.field for v in err.violations))
    load = r.load
    return ("ok", load.canonical(), load, load.load_kwargs(), load.compile_kwargs(), r.plan, r.warnings)


def setup(path):
    spec = OVERRIDES.get(path, {})
    req = base()
    for p, v in spec.get("context", {}).items():
        set_field(req, p, v)
    return spec, req, spec.get("caps", FULL), spec.get("local", False)


# ---------------------------------------------------------------------------


def test_walk_reaches_the_config_messages():
    names = walked_messages(ROOT)
    assert {"llem.v1.GenerateRequest", "llem.v1.ModelConfig", "llem.v1.PyTorchConfig",
            "llem.v1.DecoderConfig"} <= names
    pytorch = {p.split(".")[-1] for p in FIELDS if p.startswith("model.pytorch.")}
    assert pytorch == LOAD_FIELDS | GENERATION_FIELDS
    assert len(FIELDS) >= 36


def test_overrides_name_real_fields():
    for path, spec in OVERRIDES.items():
        assert path in FIELDS, path
        for p in spec.get("context", {}):
            assert p in FIELDS, p


def test_base_request_is_valid():
    for path in FIELDS:
        _, req, caps, local = setup(path)
        assert observe(req, caps, local)[0] == "ok", path


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_field_is_consumed(path):
    fd = FIELDS[path]
    spec, baseline, caps, local = setup(path)
    ref = observe(baseline, caps, local)
    consumed = []
    for value in spec.get("candidates") or candidates(fd):
        probe = pb.GenerateRequest()
        probe.CopyFrom(baseline)
        set_field(probe, path, value)
        got = observe(probe, caps, local)
        if got[0] == "error":
            # refused by name, and only this field (the base request is valid)
            assert got[1] == {path}, (value, got)
            consumed.append(value)
        elif got != ref:
            consumed.append(value)
            # a load field that changes LoadConfig must change its hash too
            if got[2] != ref[2]:
                assert got[1] != ref[1], (path, value)
    assert consumed, f"{path}: no value changed what config resolves: the field is silently ignored"


ENUM_FIELDS = sorted(p for p, fd in FIELDS.items() if fd.type == fd.TYPE_ENUM)


@pytest.mark.parametrize("path", ENUM_FIELDS)
def test_every_enum_value_is_mapped_and_distinct(path):
    fd = FIELDS[path]
    _, baseline, caps, local = setup(path)
    outputs = []
    for value in candidates(fd):
        probe = pb.GenerateRequest()
        probe.CopyFrom(baseline)
        set_field(probe, path, value)
        got = observe(probe, caps, local)
        assert got[0] == "ok", f"{path}={fd.enum_type.values_by_number[value].name} refused: {got}"
        outputs.append(got)
    assert len({repr(o[1:]) for o in outputs}) == len(outputs), f"{path}: two enum values resolve the same"


@pytest.mark.parametrize("path", ENUM_FIELDS)
def test_unknown_enum_number_is_refused(path):
    fd = FIELDS[path]
    _, req, caps, local = setup(path)
    set_field(req, path, max(v.number for v in fd.enum_type.values) + 1)
    assert observe(req, caps, local) == ("error", frozenset({path}))
