"""The experiment YAML of config.md §6: parsing, overrides, validation, defaults.

The keys that mirror the proto (``model``, ``precision``, ``pytorch``,
``decoder``, token limits, seed) are checked by the descriptor-driven mapping in
``convert``; the experiment-level keys (dataset, warm-up, baseline, energy,
output) are the client's own and are listed here. Every problem is collected
into one ConfigurationError so that a user fixes a YAML in one pass.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llem.v1 import llem_pb2

from . import _core
from .convert import message_to_dict, suggest, to_message
from .errors import ConfigurationError

# Top-level keys of an experiment YAML (config.md §6).
EXPERIMENT_KEYS = (
    "model",
    "backend",
    "n",
    "dataset",
    "dataset_order",
    "precision",
    "random_seed",
    "max_input_tokens",
    "max_output_tokens",
    "decoder",
    "pytorch",
    "warmup",
    "baseline",
    "energy",
    "output_dir",
)

# Defaults follow llem's, so that a YAML written for `llem run` measures the same way.
WARMUP_DEFAULTS: dict[str, Any] = {
    "enabled": True,
    "n_warmup": 5,
    "thermal_floor_seconds": 60.0,
    "convergence_detection": False,
    "cv_threshold": 0.05,
    "max_prompts": 20,
    "window_size": 3,
    "min_prompts": 5,
}
BASELINE_DEFAULTS: dict[str, Any] = {"enabled": True, "duration_seconds": 30.0}
ENERGY_DEFAULTS: dict[str, Any] = {"backend": "auto"}
SYNTHETIC_KEYS = ("n", "input_len", "output_len", "seed")
DATASET_ORDERS = ("interleaved", "grouped", "shuffled")
ENERGY_BACKENDS = ("auto", "nvml", "null")
DEFAULT_OUTPUT_DIR = "results"
SYNTHETIC_DEFAULT_INPUT_LEN = 128

# (type check, description, extra check or None) per experiment-level scalar.
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_NUM = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_BOOL = (lambda v: isinstance(v, bool), "a bool")
_STR = (lambda v: isinstance(v, str) and v != "", "a non-empty string")

_WARMUP_RULES: dict[str, tuple[Any, Any]] = {
    "enabled": (_BOOL, None),
    "n_warmup": (_INT, (lambda v: v >= 0, "must be >= 0")),
    "thermal_floor_seconds": (_NUM, (lambda v: v >= 0, "must be >= 0")),
    "convergence_detection": (_BOOL, None),
    "cv_threshold": (_NUM, (lambda v: v > 0, "must be > 0")),
    "max_prompts": (_INT, (lambda v: v >= 1, "must be >= 1")),
    "window_size": (_INT, (lambda v: v >= 2, "must be >= 2")),
    "min_prompts": (_INT, (lambda v: v >= 1, "must be >= 1")),
}
_BASELINE_RULES: dict[str, tuple[Any, Any]] = {
    "enabled": (_BOOL, None),
    "duration_seconds": (_NUM, (lambda v: 0 < v <= 600, "must be > 0 and <= 600")),
}
_SYNTHETIC_RULES: dict[str, tuple[Any, Any]] = {
    "n": (_INT, (lambda v: v >= 1, "must be >= 1")),
    "input_len": (_INT, (lambda v: v >= 1, "must be >= 1")),
    "output_len": (_INT, (lambda v: v >= 1, "must be >= 1")),
    "seed": (_INT, None),
}


def _check_block(block: Any, rules: dict[str, tuple[Any, Any]], path: str, problems: list) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, Mapping):
        problems.append((path, f"expected a mapping, got {type(block).__name__} ({block!r})"))
        return {}
    out: dict[str, Any] = {}
    for key, value in block.items():
        sub = f"{path}.{key}"
        if key not in rules:
            hint = suggest(str(key), list(rules))
            problems.append((sub, f"unknown key{hint}" if hint else f"unknown key; known keys: {', '.join(rules)}"))
            continue
        if value is None:
            continue
        (is_type, type_name), extra = rules[key]
        if not is_type(value):
            problems.append((sub, f"expected {type_name}, got {type(value).__name__} ({value!r})"))
            continue
        if extra is not None and not extra[0](value):
            problems.append((sub, f"{extra[1]} (got {value!r})"))
            continue
        out[key] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"pytorch.batch_size=4"`` -> ``("pytorch.batch_size", 4)``; the value is read as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigurationError([(text, "an override is KEY=VALUE, e.g. pytorch.batch_size=4")])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``"a.b.c"``, making blocks as needed."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigurationError([(dotted, f"cannot set it: {where} is {nxt!r}, not a block")])
        node = nxt
    node[parts[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping at ``path`` (ConfigurationError when unreadable or not a mapping)."""
    return read_config(path)[0]


def read_config(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """:func:`read_yaml`, and the text it was read from (read once: what ran is what is stored)."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigurationError([(str(p), f"cannot read the config: {e.strerror or e}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # PyYAML names a parsed string "<unicode string>": name the file instead.
        where = str(e).replace('"<unicode string>"', f'"{p}"')
        raise ConfigurationError([(str(p), f"not valid YAML: {where}")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigurationError([(str(p), f"the config must be a mapping of keys, got {type(data).__name__}")])
    return data, text


@dataclass
class Experiment:
    """A validated experiment: what the runner needs, plus the effective config."""

    model: str
    model_config: llem_pb2.ModelConfig  # load and generation fields (pytorch.batch_size included)
    decoder: llem_pb2.DecoderConfig | None
    batch_size: int
    n: int | None
    dataset: str | dict[str, Any]
    dataset_order: str
    random_seed: int | None
    max_input_tokens: int | None
    max_output_tokens: int | None
    warmup: dict[str, Any]
    baseline: dict[str, Any]
    energy_backend: str  # "auto", "nvml" or "null"
    output_dir: Path
    source: str | None = None  # the YAML path
    base_dir: Path = field(default_factory=Path.cwd)  # relative dataset paths resolve here too

    def request(self, prompts: Sequence[str], request_id: str) -> llem_pb2.GenerateRequest:
        """The GenerateRequest for one batch."""
        req = llem_pb2.GenerateRequest(prompts=list(prompts), request_id=request_id)
        req.model.CopyFrom(self.model_config)
        if self.decoder is not None:
            req.decoder.CopyFrom(self.decoder)
        if self.max_input_tokens is not None:
            req.max_input_tokens = self.max_input_tokens
        if self.max_output_tokens is not None:
            req.max_output_tokens = self.max_output_tokens
        if self.random_seed is not None:
            req.random_seed = self.random_seed
        return req

    def effective(self) -> dict[str, Any]:
        """The configuration as run: the YAML after overrides and client defaults.

        Unset proto fields stay absent (the server's defaults apply and come back
        in each response's ``effective_config``).
        """
        mc = message_to_dict(self.model_config)
        out: dict[str, Any] = {
            "model": self.model,
            "backend": "pytorch",
            "n": self.n,
            "dataset": self.dataset,
            "dataset_order": self.dataset_order,
            "precision": mc.get("precision"),
            "random_seed": self.random_seed,
            "max_input_tokens": self.max_input_tokens,
            "max_output_tokens": self.max_output_tokens,
            "decoder": message_to_dict(self.decoder) if self.decoder is not None else None,
            "pytorch": mc.get("pytorch", {}),
            "warmup": self.warmup,
            "baseline": self.baseline,
            "energy": {"backend": self.energy_backend},
            "output_dir": str(self.output_dir),
        }
        return out

    def config_digest(self) -> str:
        """sha256 of the effective config (canonical JSON), to match runs of the same experiment.

        ``output_dir`` is left out: where the file goes changes nothing measured, and
        repeats written to different folders must group together.
        """
        eff = {k: v for k, v in self.effective().items() if k != "output_dir"}
        canon = json.dumps(eff, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canon.encode()).hexdigest()


def build_experiment(
    data: Mapping[str, Any],
    *,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
    source: str | None = None,
) -> Experiment:
    """Validate ``data`` (a parsed YAML) with dotted ``overrides`` and flag values applied.

    ``flags`` maps dotted keys to values from command-line options (``None``:
    not given). Raises one ConfigurationError listing every problem.
    """
    data = copy.deepcopy(dict(data))
    problems: list[tuple[str, str]] = []
    for text in overrides:
        try:
            apply_override(data, *parse_override(text))
        except ConfigurationError as e:
            problems.extend(e.problems)
    for key, value in (flags or {}).items():
        if value is not None:
            try:
                apply_override(data, key, value)
            except ConfigurationError as e:
                problems.extend(e.problems)

    for key in data:
        if key not in EXPERIMENT_KEYS:
            hint = suggest(str(key), EXPERIMENT_KEYS)
            problems.append((str(key), f"unknown key{hint}" if hint else f"unknown key; known keys: {', '.join(EXPERIMENT_KEYS)}"))

    # A top-level null means unset, as it does inside the blocks (`output_dir: null` is the default).
    data = {k: v for k, v in data.items() if v is not None}

    backend = data.get("backend", "pytorch")
    if backend != "pytorch":
        problems.append(
            ("backend", f"{backend!r} is not supported: llem-serve runs the PyTorch (transformers) backend only; use backend: pytorch")
        )

    model = data.get("model")
    if model is not None and not isinstance(model, str):
        problems.append(("model", f"expected a string (the model directory or a hub id), got {type(model).__name__} ({model!r})"))
        model = ""
    elif not model:
        problems.append(("model", "required: the model directory under the server's model root (or a hub id)"))
        model = ""

    # Proto-mirrored keys: the descriptor-driven mapping checks names and types.
    model_cfg = llem_pb2.ModelConfig(model=model)
    try:
        model_cfg = _core.model_config(model or "-", data.get("precision"), data.get("pytorch"))
        model_cfg.model = model
    except ConfigurationError as e:
        problems.extend(e.problems)
    decoder = None
    if data.get("decoder") is not None:
        try:
            decoder = to_message(llem_pb2.DecoderConfig, data["decoder"], "decoder")
        except ConfigurationError as e:
            problems.extend(e.problems)
    scalars = llem_pb2.GenerateRequest()
    for k in ("random_seed", "max_input_tokens", "max_output_tokens"):  # one at a time: a bad one hides no other
        try:
            scalars.MergeFrom(to_message(llem_pb2.GenerateRequest, {k: data.get(k)}))
        except ConfigurationError as e:
            problems.extend(e.problems)
    for k in ("max_input_tokens", "max_output_tokens"):
        if scalars.HasField(k) and getattr(scalars, k) < 1:
            problems.append((k, f"must be >= 1 (got {getattr(scalars, k)})"))

    n = data.get("n")
    if n is not None and (not _INT[0](n) or n < 1):
        problems.append(("n", f"expected an integer >= 1, got {n!r}"))
        n = None

    order = data.get("dataset_order", "interleaved")
    if order not in DATASET_ORDERS:
        problems.append(("dataset_order", f"unknown value {order!r}{suggest(str(order), DATASET_ORDERS)}; allowed: {', '.join(DATASET_ORDERS)}"))

    dataset = data.get("dataset")
    max_out = scalars.max_output_tokens if scalars.HasField("max_output_tokens") else None
    if dataset is None:
        problems.append(("dataset", "required: a .jsonl or .txt path, or a synthetic block {n, input_len, output_len, seed}"))
    elif isinstance(dataset, Mapping):
        syn = _check_block(dataset, _SYNTHETIC_RULES, "dataset", problems)
        syn.setdefault("input_len", SYNTHETIC_DEFAULT_INPUT_LEN)
        if "n" not in syn:
            if n is None:
                problems.append(("dataset.n", "a synthetic dataset needs n (here or at the top level)"))
            else:
                syn["n"] = n
        if n is not None and "n" in syn and n > syn["n"]:
            problems.append(("n", f"{n} prompts asked for but the synthetic dataset makes {syn['n']}"))
        if "output_len" in syn:
            if max_out is None:
                max_out = syn["output_len"]
            elif max_out != syn["output_len"]:
                problems.append(
                    ("dataset.output_len", f"{syn['output_len']} conflicts with max_output_tokens {max_out}; give one of them")
                )
        dataset = syn
    elif isinstance(dataset, str):
        if not dataset.endswith((".jsonl", ".txt")):
            problems.append(("dataset", f"{dataset!r}: expected a .jsonl or .txt file, or a synthetic block"))
    else:
        problems.append(("dataset", f"expected a path or a synthetic block, got {type(dataset).__name__}"))

    warmup = {**WARMUP_DEFAULTS, **_check_block(data.get("warmup"), _WARMUP_RULES, "warmup", problems)}
    if warmup["convergence_detection"]:
        # The CV is first computed after max(min_prompts, window_size) requests; a smaller
        # max_prompts would end the warm-up before it, so cv_threshold would never apply.
        for key in ("min_prompts", "window_size"):
            if warmup["max_prompts"] < warmup[key]:
                problems.append(("warmup.max_prompts", f"{warmup['max_prompts']} is below warmup.{key} ({warmup[key]}): "
                                 "the latency CV would never be checked; raise max_prompts or lower " + key))
    baseline = {**BASELINE_DEFAULTS, **_check_block(data.get("baseline"), _BASELINE_RULES, "baseline", problems)}

    energy_backend = "auto"
    energy = data.get("energy")
    if energy is not None:
        if not isinstance(energy, Mapping):
            problems.append(("energy", f"expected a mapping with 'backend', got {energy!r}"))
        else:
            for key, value in energy.items():
                if key != "backend":
                    hint = suggest(str(key), ["backend"])
                    problems.append((f"energy.{key}", f"unknown key{hint}" if hint else "unknown key; known keys: backend"))
                    continue
                value = "null" if value is None or value is False else value
                if value not in ENERGY_BACKENDS:
                    problems.append(
                        ("energy.backend", f"unknown value {value!r}{suggest(str(value), ENERGY_BACKENDS)}; allowed: {', '.join(ENERGY_BACKENDS)}")
                    )
                else:
                    energy_backend = value

    output_dir = data.get("output_dir", DEFAULT_OUTPUT_DIR)
    if not _STR[0](output_dir):
        problems.append(("output_dir", f"expected a directory path, got {output_dir!r}"))
        output_dir = DEFAULT_OUTPUT_DIR

    batch_size = model_cfg.pytorch.batch_size if model_cfg.pytorch.HasField("batch_size") else 1
    if batch_size < 1:
        problems.append(("pytorch.batch_size", f"must be >= 1 (got {batch_size})"))

    if problems:
        raise ConfigurationError(problems)
    return Experiment(
        model=model,
        model_config=model_cfg,
        decoder=decoder,
        batch_size=batch_size,
        n=n,
        dataset=dataset,  # type: ignore[arg-type]
        dataset_order=order,
        random_seed=scalars.random_seed if scalars.HasField("random_seed") else None,
        max_input_tokens=scalars.max_input_tokens if scalars.HasField("max_input_tokens") else None,
        max_output_tokens=max_out,
        warmup=warmup,
        baseline=baseline,
        energy_backend=energy_backend,
        output_dir=Path(output_dir),
        source=source,
        base_dir=Path(source).resolve().parent if source else Path.cwd(),
    )
