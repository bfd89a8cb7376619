"""Plain Python values to ``llem.v1`` messages, by walking the message descriptors.

No field list is written by hand: a field added to the ``.proto`` (and the
regenerated stubs) is accepted here without a code change. Every problem in a
value is collected, so one :class:`~llem_client.errors.ConfigurationError` names
all unknown keys (with a "did you mean" suggestion) and all wrong types at once.

Conventions:
  * ``None`` means "unset": the field is left absent and the server default applies.
  * Enums accept a short name (``"bf16"``, ``"flash_attention_2"``), the full
    name (``"PRECISION_BF16"``), or the number.
  * A message field accepts a dict or a message of the right type.
"""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from google.protobuf import descriptor as _d
from google.protobuf.message import Message

from .errors import ConfigurationError

__all__ = [
    "to_message",
    "enum_short_names",
    "enum_value",
    "message_to_dict",
    "suggest",
    "generation_field_numbers",
    "GENERATION_FIELD_MIN_NUMBER",
]

# The proto numbers PyTorchConfig's generation (per-request) fields from 20 up and
# its load fields below ("Fields 1-16 are load fields; fields 20-27 are generation
# fields"). LoadModel rejects generation fields, so the client strips them there.
GENERATION_FIELD_MIN_NUMBER = 20

# Names llem YAMLs have used for precisions (torch dtype names), accepted beside the
# enum's own short names so that such a YAML runs unchanged.
_ALIASES: dict[str, dict[str, str]] = {
    "llem.v1.Precision": {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "half": "FP16"},
    # llem-client run --energy-delivery says "response"
    "llem.v1.EnergyDelivery": {"response": "IN_RESPONSE"},
}

_INT_TYPES = {
    _d.FieldDescriptor.TYPE_INT32,
    _d.FieldDescriptor.TYPE_INT64,
    _d.FieldDescriptor.TYPE_UINT32,
    _d.FieldDescriptor.TYPE_UINT64,
    _d.FieldDescriptor.TYPE_SINT32,
    _d.FieldDescriptor.TYPE_SINT64,
    _d.FieldDescriptor.TYPE_FIXED32,
    _d.FieldDescriptor.TYPE_FIXED64,
    _d.FieldDescriptor.TYPE_SFIXED32,
    _d.FieldDescriptor.TYPE_SFIXED64,
}
_FLOAT_TYPES = {_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT}
_INT_RANGES = {
    _d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    _d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def suggest(word: str, candidates: list[str] | tuple[str, ...] | set[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(str(word), sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _enum_prefix(enum: _d.EnumDescriptor) -> str:
    # Every llem.v1 enum has an X_UNSPECIFIED zero whose X_ is the values' prefix;
    # fall back to the longest common underscore-delimited prefix otherwise.
    for v in enum.values:
        if v.number == 0 and v.name.endswith("UNSPECIFIED"):
            return v.name[: -len("UNSPECIFIED")]
    names = [v.name for v in enum.values]
    prefix = names[0]
    for n in names[1:]:
        while not n.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""


def enum_short_names(enum: _d.EnumDescriptor) -> dict[str, int]:
    """Lower-case short names (``"bf16"``) to numbers, without the unspecified zero."""
    prefix = _enum_prefix(enum)
    return {
        v.name[len(prefix):].lower(): v.number
        for v in enum.values
        if v.name.startswith(prefix) and v.number != 0
    }


def enum_value(enum: _d.EnumDescriptor, value: Any, path: str) -> int:
    """Resolve a short name, full name or number to the enum's number.

    Raises ConfigurationError with the allowed short names (and a suggestion).
    """
    short = enum_short_names(enum)
    if isinstance(value, bool):
        raise ConfigurationError([(path, f"expected one of {sorted(short)}, got a bool ({value!r})")])
    if isinstance(value, int):
        if enum.values_by_number.get(value) is None:
            raise ConfigurationError([(path, f"{value} is not a valid {enum.name} number; allowed: {sorted(short)}")])
        return value
    if isinstance(value, str):
        key = value.strip()
        if key in enum.values_by_name:
            return enum.values_by_name[key].number
        norm = key.lower().replace("-", "_")
        if norm in short:
            return short[norm]
        alias = _ALIASES.get(enum.full_name, {}).get(norm)
        if alias is not None:
            return enum.values_by_name[_enum_prefix(enum) + alias].number
        if norm in ("", "unspecified"):
            return 0
        hint = suggest(norm, list(short) + list(_ALIASES.get(enum.full_name, {})))
        raise ConfigurationError([(path, f"unknown value {value!r}{hint}; allowed: {', '.join(sorted(short))}")])
    raise ConfigurationError([(path, f"expected one of {sorted(short)}, got {type(value).__name__}")])


def _type_name(field: _d.FieldDescriptor) -> str:
    if field.type == _d.FieldDescriptor.TYPE_BOOL:
        return "a bool"
    if field.type in _INT_TYPES:
        return "an integer"
    if field.type in _FLOAT_TYPES:
        return "a number"
    if field.type == _d.FieldDescriptor.TYPE_STRING:
        return "a string"
    return field.type_name if hasattr(field, "type_name") else "a value"


def _scalar(field: _d.FieldDescriptor, value: Any, path: str, problems: list) -> Any:
    """Check and coerce one scalar; append a problem and return None when wrong."""
    t = field.type
    if t == _d.FieldDescriptor.TYPE_ENUM:
        try:
            return enum_value(field.enum_type, value, path)
        except ConfigurationError as e:
            problems.extend(e.problems)
            return None
    ok = False
    if t == _d.FieldDescriptor.TYPE_BOOL:
        ok = isinstance(value, bool)
    elif t in _INT_TYPES:
        # bool is an int in Python; a YAML "yes" must not become 1.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and t in _INT_RANGES:
            lo, hi = _INT_RANGES[t]
            if not lo <= value <= hi:
                problems.append((path, f"{value} is out of range for this field ({lo}..{hi})"))
                return None
        elif ok and not -(2**63) <= value <= 2**63 - 1:
            problems.append((path, f"{value} does not fit in 64 bits"))
            return None
    elif t in _FLOAT_TYPES:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif t == _d.FieldDescriptor.TYPE_STRING:
        ok = isinstance(value, str)
    elif t == _d.FieldDescriptor.TYPE_BYTES:
        ok = isinstance(value, (bytes, bytearray))
    if not ok:
        problems.append((path, f"expected {_type_name(field)}, got {type(value).__name__} ({value!r})"))
        return None
    return value


def _map_key(field: _d.FieldDescriptor, key: Any, path: str, problems: list) -> Any:
    kf = field.message_type.fields_by_name["key"]
    # max_memory keys are GPU indices: YAML gives ints, the proto wants strings.
    if kf.type == _d.FieldDescriptor.TYPE_STRING and isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    return _scalar(kf, key, f"{path}[{key!r}]", problems)


def _fill(msg: Message, value: Any, path: str, problems: list) -> None:
    desc = msg.DESCRIPTOR
    if isinstance(value, Message):
        if value.DESCRIPTOR.full_name != desc.full_name:
            problems.append((path or desc.name, f"expected a {desc.full_name} or a dict, got a {value.DESCRIPTOR.full_name}"))
            return
        msg.MergeFrom(value)
        return
    if not isinstance(value, Mapping):
        problems.append((path or desc.name, f"expected a mapping of {desc.name} fields, got {type(value).__name__} ({value!r})"))
        return
    names = list(desc.fields_by_name)
    for key, item in value.items():
        sub = f"{path}.{key}" if path else str(key)
        field = desc.fields_by_name.get(key) if isinstance(key, str) else None
        if field is None:
            hint = suggest(str(key), names)
            problems.append((sub, f"unknown key{hint}" if hint else f"unknown key; known keys: {', '.join(names)}"))
            continue
        if item is None:
            continue  # None is the "unset" sentinel: no field, server default.
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not isinstance(item, Mapping):
                problems.append((sub, f"expected a mapping, got {type(item).__name__} ({item!r})"))
                continue
            target = getattr(msg, key)
            vf = field.message_type.fields_by_name["value"]
            for k, v in item.items():
                kk = _map_key(field, k, sub, problems)
                if kk is None:
                    continue
                if vf.message_type is not None:
                    _fill(target[kk], v, f"{sub}[{kk!r}]", problems)
                else:
                    # max_memory values are strings like "10GiB"; a bare number of
                    # bytes is a reasonable thing to write in YAML.
                    if vf.type == _d.FieldDescriptor.TYPE_STRING and isinstance(v, int) and not isinstance(v, bool):
                        v = str(v)
                    vv = _scalar(vf, v, f"{sub}[{kk!r}]", problems)
                    if vv is not None:
                        target[kk] = vv
            continue
        if field.is_repeated:
            if isinstance(item, (str, bytes, Mapping)) or not hasattr(item, "__iter__"):
                problems.append((sub, f"expected a list, got {type(item).__name__}"))
                continue
            target = getattr(msg, key)
            for i, elem in enumerate(item):
                if field.message_type is not None:
                    _fill(target.add(), elem, f"{sub}[{i}]", problems)
                else:
                    ev = _scalar(field, elem, f"{sub}[{i}]", problems)
                    if ev is not None:
                        target.append(ev)
            continue
        if field.message_type is not None:
            getattr(msg, key).SetInParent()  # an empty block is still "given"
            _fill(getattr(msg, key), item, sub, problems)
            continue
        sv = _scalar(field, item, sub, problems)
        if sv is not None:
            setattr(msg, key, sv)


def to_message(cls: type[Message], value: Any, path: str = "") -> Message:
    """Build a ``cls`` message from a dict (or copy a ``cls`` message).

    ``path`` prefixes the field paths in errors (``"pytorch"`` gives
    ``pytorch.batch_size``). Raises ConfigurationError listing every problem.
    """
    msg = cls()
    problems: list[tuple[str, str]] = []
    if value is not None:
        _fill(msg, value, path, problems)
    if problems:
        raise ConfigurationError(problems)
    return msg


def generation_field_numbers(desc: _d.Descriptor) -> set[str]:
    """Names of PyTorchConfig's generation fields (numbers >= 20), see GENERATION_FIELD_MIN_NUMBER."""
    return {f.name for f in desc.fields if f.number >= GENERATION_FIELD_MIN_NUMBER}


# Messages whose figures are plain proto3 doubles: with available=false those read 0.0,
# which a result file must not show as "0 J" (energy.md rule 7: absent, with a reason).
_ABSENT_UNLESS_AVAILABLE = {"llem.v1.Energy", "llem.v1.CpuEnergy"}


def message_to_dict(msg: Message) -> dict[str, Any]:
    """A JSON-able dict with proto field names and enum short names (``"bf16"``).

    Fields with presence (``optional`` scalars, messages, oneofs) appear only when
    set, so "unset" stays distinguishable from a zero; plain scalars always appear.
    int64 stays a number (``json_format`` would make it a string), and a
    non-finite float becomes ``None`` so the result is strict JSON. An unavailable
    ``Energy`` or ``CpuEnergy`` is only ``available``, its reason and method: no zeros.
    """
    if msg.DESCRIPTOR.full_name in _ABSENT_UNLESS_AVAILABLE and not msg.available:  # type: ignore[attr-defined]
        absent: dict[str, Any] = {"available": False, "unavailable_reason": msg.unavailable_reason}  # type: ignore[attr-defined]
        if getattr(msg, "method", ""):
            absent["method"] = msg.method  # type: ignore[attr-defined]
        if getattr(msg, "absence", 0):  # Energy's kind of reason, by name (ENERGY_ABSENCE_NOT_METERED, ...)
            known = msg.DESCRIPTOR.fields_by_name["absence"].enum_type.values_by_number.get(msg.absence)
            absent["absence"] = known.name if known else msg.absence  # a newer server's kind: its number
        return absent
    out: dict[str, Any] = {}
    for field in msg.DESCRIPTOR.fields:
        value = getattr(msg, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if not value:
                continue  # an empty map is "unset"; leaving it out keeps configs readable
            vf = field.message_type.fields_by_name["value"]
            out[field.name] = {
                str(k): (message_to_dict(v) if vf.message_type is not None else _json_scalar(vf, v))
                for k, v in sorted(value.items())
            }
        elif field.is_repeated:
            out[field.name] = [
                message_to_dict(v) if field.message_type is not None else _json_scalar(field, v) for v in value
            ]
        elif field.has_presence and not msg.HasField(field.name):
            continue
        elif field.type == _d.FieldDescriptor.TYPE_ENUM and value == 0:
            continue  # X_UNSPECIFIED is proto3's "unset" for enums
        elif field.message_type is not None:
            out[field.name] = message_to_dict(value)
        else:
            out[field.name] = _json_scalar(field, value)
    return out


def _json_scalar(field: _d.FieldDescriptor, value: Any) -> Any:
    import base64
    import math

    if field.type == _d.FieldDescriptor.TYPE_ENUM:
        v = field.enum_type.values_by_number.get(value)
        if v is None:
            return value
        prefix = _enum_prefix(field.enum_type)
        return v.name[len(prefix):].lower() if v.name.startswith(prefix) else v.name
    if field.type == _d.FieldDescriptor.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
