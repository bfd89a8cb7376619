"""Prompts for an experiment: a .jsonl file, a .txt file, or a synthetic block.

Nothing here needs the network. Order (config.md §6 ``dataset_order``):
  * interleaved: round robin over the ``source`` groups, each in file order;
  * grouped: all prompts of one source, then the next (sources in first-seen order);
  * shuffled: a seeded shuffle (``random_seed``, 42 when unset).
``n`` then takes the first n prompts of that order.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigurationError
from .experiment import Experiment

DEFAULT_SEED = 42
NO_SOURCE = "(no source)"  # dataset.sources key for .jsonl lines without a "source"

# Short, common English words: most are one token in BPE vocabularies, so a prompt
# of k words is about k tokens. Fixed here so that synthetic prompts never change.
_WORDS = (
    "the of and to in is was for on are with as be at by this had not but from or have an they which one you were "
    "all her she there would their we him been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three energy power model token light water small large house point hand part place case week "
    "number group problem fact open table green river music paper story money night line city tree field road book"
).split()


@dataclass
class Prompt:
    text: str
    source: str | None = None
    # Where the prompt is in the dataset as loaded, so a run's order can be rebuilt from
    # its result file: the 1-based line number in a .jsonl/.txt, the 0-based index in a
    # synthetic list.
    position: int | None = None


def _resolve(path: str, base_dir: Path) -> tuple[Path, str]:
    """The dataset file and where it was found ("path", "config folder", "current directory").

    A relative path may mean the YAML's folder or the current directory; neither is
    silently preferred: the one that exists is used, and two different files are an error.
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p, "path"
    here, beside = Path.cwd() / p, base_dir / p
    found = [(c, where) for c, where in ((beside, "config folder"), (here, "current directory")) if c.is_file()]
    if len(found) == 2 and not here.samefile(beside):
        raise ConfigurationError([("dataset", f"{path!r} names two different files: {beside} (beside the config) and "
                                              f"{here} (in the current directory); give an absolute path")])
    if not found:
        raise ConfigurationError([("dataset", f"no such file: {path} (looked in {base_dir} and {Path.cwd()})")])
    return found[0][0].resolve(), found[0][1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts: list[Prompt] = []
    problems: list[tuple[str, str]] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append((where, f"not JSON: {e.msg}"))
                continue
            if not isinstance(obj, dict):
                problems.append((where, "each line must be a JSON object with a 'prompt' or 'text' field"))
                continue
            text = obj.get("prompt", obj.get("text"))
            if not isinstance(text, str) or not text:
                problems.append((where, "no 'prompt' or 'text' string field"))
                continue
            source = obj.get("source")
            prompts.append(Prompt(text, None if source is None else str(source), lineno))
            if len(problems) >= 10:
                break
    if problems:
        raise ConfigurationError(problems)
    return prompts


def _read_txt(path: Path) -> list[Prompt]:
    with path.open(encoding="utf-8") as fh:
        return [Prompt(line.rstrip("\r\n"), position=lineno) for lineno, line in enumerate(fh, 1) if line.strip()]


def synthetic_prompts(n: int, input_len: int, seed: int) -> list[Prompt]:
    """``n`` reproducible prompts of ``input_len`` words (about as many tokens)."""
    rng = random.Random(seed)
    return [Prompt(" ".join(rng.choice(_WORDS) for _ in range(input_len)), "synthetic", i) for i in range(n)]


def order_prompts(prompts: list[Prompt], order: str, seed: int) -> list[Prompt]:
    """Apply ``dataset_order``."""
    if order == "shuffled":
        out = list(prompts)
        random.Random(seed).shuffle(out)
        return out
    groups: dict[str | None, list[Prompt]] = {}
    for p in prompts:
        groups.setdefault(p.source, []).append(p)
    if order == "grouped":
        return [p for g in groups.values() for p in g]
    # interleaved: round robin over sources
    out = []
    queues = [list(g) for g in groups.values()]
    i = 0
    while any(queues):
        for q in queues:
            if i < len(q):
                out.append(q[i])
        i += 1
        if all(i >= len(q) for q in queues):
            break
    return out


def load_prompts(exp: Experiment) -> tuple[list[Prompt], dict[str, Any]]:
    """The prompts to run (order and ``n`` applied) and a description for the result."""
    seed = exp.random_seed if exp.random_seed is not None else DEFAULT_SEED
    info: dict[str, Any]
    if isinstance(exp.dataset, dict):
        syn = exp.dataset
        syn_seed = syn.get("seed", seed)
        prompts = synthetic_prompts(syn["n"], syn["input_len"], syn_seed)
        info = {
            "kind": "synthetic",
            "generator": "llem-client synthetic v1 (seeded word sampler)",
            "n": syn["n"],
            "input_len": syn["input_len"],
            "output_len": syn.get("output_len"),
            "seed": syn_seed,
            "positions": "0-based index in the generated list",
        }
    else:
        path, found_in = _resolve(exp.dataset, exp.base_dir)
        if not path.is_file():
            raise ConfigurationError([("dataset", f"no such file: {exp.dataset}")])
        prompts = _read_jsonl(path) if path.suffix == ".jsonl" else _read_txt(path)
        info = {"kind": path.suffix.lstrip("."), "path": str(path), "found_in": found_in, "sha256": _sha256(path),
                "positions": "1-based line number in the file"}
    if not prompts:
        raise ConfigurationError([("dataset", "no prompts in the dataset")])
    info["available"] = len(prompts)
    prompts = order_prompts(prompts, exp.dataset_order, seed)
    if exp.n is not None:
        if exp.n > len(prompts):
            raise ConfigurationError([("n", f"{exp.n} prompts asked for but the dataset has {len(prompts)}: "
                                            f"set n to at most {len(prompts)} (-n on the command line)")])
        prompts = prompts[: exp.n]
    info["order"] = exp.dataset_order
    if exp.dataset_order == "shuffled":
        # The seed the shuffle really used: without random_seed it is the default, which
        # the config alone does not show.
        info["shuffle_seed"] = seed
        info["shuffle_seed_from"] = "random_seed" if exp.random_seed is not None else "default (random_seed unset)"
    info["used"] = len(prompts)
    sources: dict[str, int] = {}
    for p in prompts:
        key = NO_SOURCE if p.source is None else p.source  # so that the counts add up to "used"
        sources[key] = sources.get(key, 0) + 1
    if set(sources) != {NO_SOURCE}:
        info["sources"] = sources
    return prompts, info
