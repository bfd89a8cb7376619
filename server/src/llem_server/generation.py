"""Running one request's prompts through ``model.generate`` (inside a worker's main thread).

Prompts run in slices of ``batch_size``, each slice one left-padded ``generate`` call.
A step hook (the ``streamer`` argument of ``generate``) stamps each decode step with
``time.monotonic()`` and, when the client streams, forwards the new token ids to the
front process; it does nothing heavier, because it runs on the generating thread.
A stopping criterion polls a shared-memory cancel flag every step.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from . import compiling
from .config import lookup_blocker
from .models import JobError, LoadedModel

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED = 1, 2, 3  # llem.v1.FinishReason values


class Cancelled(Exception):
    """Raised inside the worker when the front asked to stop the running job."""


class CancelCriterion(StoppingCriteria):
    """Stops every sequence once the front process writes this job's id into the flag."""

    def __init__(self, flag, job_id: int, batch: int, device):
        self.flag, self.job_id, self.device = flag, job_id, device
        # Answers are built once per row count (beam search and assisted decoding change
        # it from the batch size), so no tensor is made on the device per step.
        self._answers: dict[tuple[int, bool], torch.Tensor] = {}
        self.fired = False

    def __call__(self, input_ids, scores, **kwargs):
        stop = self.flag.value == self.job_id
        self.fired |= stop
        key = (input_ids.shape[0], stop)
        answer = self._answers.get(key)
        if answer is None:
            maker = torch.ones if stop else torch.zeros
            answer = self._answers[key] = maker(key[0], dtype=torch.bool, device=self.device)
        return answer


class StepHook(BaseStreamer):
    """Records the time of each decode step; optionally emits token ids per prompt."""

    def __init__(self, emit: Callable[[list[tuple[int, int]]], None] | None, prompt_indices: list[int],
                 eos_ids: frozenset[int]):
        self.emit = emit
        self.prompt_indices = prompt_indices
        self.eos_ids = eos_ids
        self.done = [False] * len(prompt_indices)
        self.step_times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        self.step_times.append(time.monotonic())
        if self.emit is None:
            return
        ids = value.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for row, tok in enumerate(ids[: len(self.done)]):
            if isinstance(tok, list):  # assisted decoding hands over several tokens per row
                toks = tok
            else:
                toks = [tok]
            for t in toks:
                if self.done[row]:
                    break
                out.append((self.prompt_indices[row], int(t)))
                if t in self.eos_ids:
                    self.done[row] = True
        if out:
            self.emit(out)

    def end(self):
        pass


@dataclass
class SliceResult:
    t_start: float
    t_end: float
    step_times: list[float]


def _percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return 0.0
    k = (len(sorted_vals) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def _lengths(slices) -> list[int]:
    """Each prompt's token count after tokenization (padding excluded), in prompt order."""
    return [n for _, enc in slices for n in enc["attention_mask"].sum(dim=1).tolist()]


MULTINOMIAL_MAX = 2 ** 24  # torch.multinomial: "number of categories cannot exceed 2^24"


def _vocabulary(model) -> int:
    """Rows of the logits: the output layer's width (a composite config may keep
    vocab_size under its text config)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None)
    if width:
        return int(width)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(cfg, "vocab_size", 0) or 0)


def _check_beam_sampling(model, beams: int, sampling: bool, from_request: bool) -> None:
    """Beam sampling draws from num_beams x vocabulary categories at once: past torch's
    limit generate() fails (131 beams on a 128 256-token vocabulary)."""
    vocab = _vocabulary(model)
    if sampling and beams > 1 and beams * vocab > MULTINOMIAL_MAX:
        what = (f"beam sampling draws from num_beams x vocabulary = {beams} x {vocab} tokens, over torch's limit "
                f"of {MULTINOMIAL_MAX}" + ("" if from_request else
                                           f" (num_beams {beams} comes from the model's generation_config.json)"))
        raise JobError("INVALID_ARGUMENT", f"{what}; use at most {MULTINOMIAL_MAX // vocab} beams with sampling, "
                       "or greedy beam search", violations=(("model.pytorch.num_beams", what),))


def _check_lookup(model, gen_kwargs: dict) -> None:
    """Prompt lookup where the model's own generation_config.json supplies the cache.

    Validation refuses a request that asks for prompt lookup on a cache it cannot use; the
    checkpoint's generation_config applies where the request sent nothing, and may set
    ``use_cache: false`` or a fixed-length cache (Gemma ships "hybrid"). transformers then
    fails inside generate() (RuntimeError, or an IndexError depending on the text)."""
    if not gen_kwargs.get("prompt_lookup_num_tokens"):
        return
    gc = model.generation_config
    path = "model.pytorch.prompt_lookup_num_tokens"
    use_cache = gen_kwargs.get("use_cache", getattr(gc, "use_cache", True))
    cache = gen_kwargs.get("cache_implementation") or getattr(gc, "cache_implementation", None)
    blocker = lookup_blocker(use_cache, cache)
    if blocker == "use_cache":
        what = "prompt lookup decoding needs the KV cache, which the model's generation_config.json switches off"
        raise JobError("INVALID_ARGUMENT", f"{what}; set model.pytorch.use_cache to true",
                       violations=((path, what),))
    if blocker == "cache_implementation":
        what = (f"prompt lookup decoding cannot run on the {cache!r} cache the model's generation_config.json "
                "sets (its draft overruns or cannot be cropped from it)")
        raise JobError("INVALID_ARGUMENT", f"{what}; set model.pytorch.cache_implementation to dynamic",
                       violations=((path, what),))


def _check_positions(model, lengths: list[int], max_new: int, draft: int = 0) -> None:
    """Refuse empty prompts, and what a model with a learned position table cannot run.

    GPT-2-style models index a table of ``n_positions`` (``max_position_embeddings``) rows:
    a prompt plus ``max_new_tokens`` beyond it fails deep inside torch with an IndexError
    (a bare INTERNAL). Say so up front, naming the field to change. Prompt lookup's draft
    (``draft`` tokens) is scored past the current length, so it must fit too.
    Rotary (RoPE) and ALiBi models have no table and run on past their nominal length.
    """
    # A prompt with no tokens (an empty string, without a BOS token) would reach the model
    # as a zero-length sequence: a reshape error, or a crash inside a quantized kernel.
    for i, n in enumerate(lengths):
        if n == 0:
            path = f"prompts[{i}]"
            raise JobError("INVALID_ARGUMENT", f"{path} has no tokens after tokenization (an empty prompt?); "
                           "send at least one token", violations=((path, "no tokens after tokenization"),))
    cfg = model.config
    if any(v is not None for k, v in vars(cfg).items() if "rope" in k):
        return
    limit = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not isinstance(limit, int) or not lengths:
        return
    longest = max(lengths)
    if longest + max_new > limit:
        what = f"the prompt ({longest} tokens) plus max_output_tokens ({max_new}) exceed the model's {limit} positions"
        raise JobError("INVALID_ARGUMENT", f"{what}; lower max_output_tokens or max_input_tokens",
                       violations=(("max_output_tokens", what),))
    if draft and longest + max_new + draft > limit:
        what = (f"the prompt ({longest} tokens) plus max_output_tokens ({max_new}) plus prompt lookup's draft "
                f"({draft}) exceed the model's {limit} positions")
        raise JobError("INVALID_ARGUMENT", f"{what}; lower prompt_lookup_num_tokens, max_output_tokens or "
                       "max_input_tokens", violations=(("model.pytorch.prompt_lookup_num_tokens", what),))


def run_generate(entry: LoadedModel, prompts: list[str], plan: dict, *, job_id: int, cancel_flag,
                 emit: Callable[[list[tuple[int, int]]], None] | None,
                 on_start: Callable[[float], None]) -> dict:
    """Generate for all prompts; returns completions, token counts and timing as plain data."""
    model, tok = entry.model, entry.tokenizer
    batch_size = int(plan["batch_size"])
    gen_kwargs = dict(plan["generate_kwargs"])
    max_new = int(plan["max_output_tokens"])
    device = next(model.parameters()).device
    # The model's generation_config applies where the request sent nothing (a checkpoint may
    # ship num_beams > 1): beam search has no per-step hook.
    beams = int(gen_kwargs.get("num_beams") or getattr(model.generation_config, "num_beams", None) or 1)

    t_tok = time.monotonic()
    limit = int(plan["max_input_tokens"])
    texts, char_cut = _cut_long_prompts(tok, prompts, limit)
    # A caller gone during a long tokenization (megabytes of prompts take seconds) frees the
    # device at the next slice, not after all of them: checked before each one.
    cancelled = False
    slices = []
    for start in range(0, len(texts), batch_size):
        if cancel_flag.value == job_id:
            cancelled, slices = True, []
            break
        batch = texts[start:start + batch_size]
        enc = tok(batch, return_tensors="pt", padding=True, truncation=True, max_length=limit)
        slices.append((start, enc))
    decoder_used = _effective_decoder(model, gen_kwargs)
    warnings = []
    if not cancelled:
        lengths = _lengths(slices)
        warnings = _truncation_warning(tok, texts, slices, lengths, limit, char_cut)
        warnings += _model_defaults_warning(model, gen_kwargs, sampling=decoder_used["do_sample"])
        _check_lookup(model, gen_kwargs)
        _check_beam_sampling(model, beams, decoder_used["do_sample"], "num_beams" in gen_kwargs)
        _check_positions(model, lengths, max_new, int(gen_kwargs.get("prompt_lookup_num_tokens") or 0))
    tokenization_ms = (time.monotonic() - t_tok) * 1e3

    # The seed is applied once per request, before its first generate call (CPU and CUDA).
    torch.manual_seed(int(plan["random_seed"]))

    completions: list[dict] = [None] * len(prompts)  # type: ignore[list-item]
    results: list[SliceResult] = []
    graphs_before = compiling.graphs()
    model._llem_auto_compiled = False
    started = False
    for start, enc in slices:
        input_ids = enc["input_ids"].to(device)
        attention = enc["attention_mask"].to(device)
        rows = input_ids.shape[0]
        criterion = CancelCriterion(cancel_flag, job_id, rows, device)
        hook = StepHook(emit, list(range(start, start + rows)), entry.eos_ids) if beams == 1 else None
        if cancel_flag.value == job_id:
            cancelled = True
            break
        t0 = time.monotonic()
        if not started:
            on_start(t0)
            started = True
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new,
                pad_token_id=entry.pad_id, streamer=hook,
                stopping_criteria=StoppingCriteriaList([criterion]), **gen_kwargs,
            )
        new = out[:, input_ids.shape[1]:].tolist()  # .tolist() synchronises: the window ends after the device
        t1 = time.monotonic()
        results.append(SliceResult(t0, t1, hook.step_times if hook else []))
        in_counts = attention.sum(dim=1).tolist()
        for row, ids in enumerate(new):
            cut, reason = len(ids), FINISH_LENGTH
            for i, t in enumerate(ids):
                if t in entry.eos_ids:
                    cut, reason = i + 1, FINISH_STOP
                    break
            # Everything after a row's EOS is padding generate() added while other rows ran on.
            ids = ids[:cut]
            if criterion.fired and reason != FINISH_STOP and len(ids) < max_new:
                reason = FINISH_CANCELLED
            completions[start + row] = {
                "index": start + row, "token_ids": ids,
                "text": tok.decode(ids, skip_special_tokens=True),
                "input_tokens": int(in_counts[row]), "output_tokens": len(ids), "finish_reason": reason,
            }
        if criterion.fired:
            cancelled = True
            break

    entry.use_count += 1
    entry.last_used_unix = time.time()
    auto_compiled = bool(getattr(model, "_llem_auto_compiled", False))
    warnings += compiling.request_warnings(compiled=entry.compiled, auto_compiled=auto_compiled,
                                           new_graphs=compiling.graphs() - graphs_before)
    return {
        "completions": [c for c in completions if c is not None],
        "cancelled": cancelled,
        "timing": _timing(results, tokenization_ms),
        "window": (results[0].t_start, results[-1].t_end) if results else None,
        "effective_generate_kwargs": {**gen_kwargs, "max_new_tokens": max_new},
        "effective_decoder": decoder_used,
        "warnings": warnings,
        "compiled": entry.compiled or auto_compiled,  # this request: transformers may compile by itself
    }


# The tokenizer reads a whole prompt before truncation drops what max_input_tokens cannot use
# (a 15.9 MB prompt kept 512 tokens after 37 s and 3.3 GB in the worker), so a prompt longer
# than CHARS_PER_TOKEN characters per token of max_input_tokens is cut by characters first.
# A token spans 3-5 characters of English or code on average, fewer of CJK text or bytes:
# 16 leaves room for text of long tokens (runs of spaces or punctuation), so a cut prompt
# still has several times max_input_tokens tokens and truncation keeps the same ones. Shorter
# prompts, every normal one, are tokenized exactly as sent.
CHARS_PER_TOKEN = 16


def _cut_long_prompts(tok, prompts: list[str], limit: int) -> tuple[list[str], dict[int, int]]:
    """The texts to tokenize, and {prompt index: characters sent} for those cut by characters,
    on the side truncation keeps (its first characters, or its last with truncation_side left)."""
    room = limit * CHARS_PER_TOKEN
    keep_end = getattr(tok, "truncation_side", "right") == "left"
    texts, cut = [], {}
    for i, p in enumerate(prompts):
        if len(p) > room:
            cut[i] = len(p)
            p = p[len(p) - room:] if keep_end else p[:room]
        texts.append(p)
    return texts, cut


def _truncation_warning(tok, texts: list[str], slices, lengths: list[int], limit: int,
                        char_cut: dict[int, int]) -> list[tuple[str, str]]:
    """Say which prompts were cut, and from how many tokens: silently measuring a shorter prompt
    than was sent would skew every per-token figure.

    Nothing is tokenized twice in full: a fast tokenizer keeps what truncation removed (its
    encodings' overflowing pieces, each with the special tokens added again); with another,
    only prompts that reached the limit are tokenized again, whole, and those are at most
    CHARS_PER_TOKEN * limit characters. A prompt cut by characters has no full count: the
    warning says it was cut before tokenization."""
    counts: dict[int, int] = {}  # tokens before truncation, for prompts that truncation shortened
    specials = tok.num_special_tokens_to_add()
    for start, enc in slices:
        encodings = getattr(enc, "encodings", None)
        if encodings is not None:
            for row, e in enumerate(encodings):
                if e.overflowing:
                    counts[start + row] = sum(e.attention_mask) + sum(sum(o.attention_mask) - specials
                                                                      for o in e.overflowing)
            continue
        again = [start + row for row in range(len(enc["input_ids"]))
                 if lengths[start + row] >= limit and start + row not in char_cut]
        if again:
            whole = tok([texts[i] for i in again], truncation=False)["input_ids"]
            counts.update((i, len(ids)) for i, ids in zip(again, whole) if len(ids) > limit)
    cut = sorted(set(counts) | set(char_cut))
    if not cut:
        return []

    def what(i: int) -> str:
        if i in char_cut:
            return (f"prompts[{i}] ({char_cut[i]} characters, cut to {limit * CHARS_PER_TOKEN} before "
                    f"tokenization, {lengths[i]} tokens kept)")
        return f"prompts[{i}] ({counts[i]} tokens)"

    shown = ", ".join(what(i) for i in cut[:10]) + (f" and {len(cut) - 10} more" if len(cut) > 10 else "")
    side = "first" if getattr(tok, "truncation_side", "right") == "right" else "last"
    return [("INPUT_TRUNCATED", f"{len(cut)} prompt(s) were cut to fit max_input_tokens ({limit}), keeping at most "
                                f"their {side} {limit} tokens: {shown}; raise max_input_tokens to keep them whole")]


# generation_config entries that are not generation choices (token ids, bookkeeping), or that
# max_new_tokens overrides.
_NOT_CHOICES = {"_from_model_config", "transformers_version", "output_attentions", "output_hidden_states",
                "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "max_length",
                "max_new_tokens"}  # always sent (max_output_tokens), with the pad id, streamer and criteria
_SAMPLING = {"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"}


def _model_defaults_warning(model, gen_kwargs: dict, *, sampling: bool) -> list[tuple[str, str]]:
    """Name what the model's own generation_config.json changed in this request.

    An unset field sends no kwarg (config.md), so generate() takes the checkpoint's values
    before transformers' global defaults: a no_repeat_ngram_size or cache_implementation
    shipped with the weights changes the output and the energy without appearing in the
    request. Sampling values count only where sampling ran (``sampling``: what
    :func:`_effective_decoder` found generate used)."""
    gc = model.generation_config
    defaults = _global_defaults(gc)
    shown = []
    for name, value in sorted(gc.to_diff_dict().items()):
        if name in _NOT_CHOICES or name.startswith("_") or name in gen_kwargs or value is None:
            continue
        if name in _SAMPLING and not sampling:
            continue
        if name in defaults and value == defaults[name]:
            continue
        shown.append(f"{name}={value!r}")
    if not shown:
        return []
    return [("MODEL_GENERATION_CONFIG", "generate() used the model's generation_config.json for fields this request "
                                        "left unset: " + ", ".join(shown) + "; set them in the request to override")]


def _global_defaults(gc) -> dict:
    """transformers' own defaults, which generate() fills in where neither the kwargs nor the
    model's generation_config say (transformers 5 leaves those fields None)."""
    return getattr(type(gc), "_get_default_generation_params", dict)()


def _effective_decoder(model, gen_kwargs: dict) -> dict:
    """The decoder values generate() really used, in its order of precedence: our kwargs, then
    the model's generation_config, then transformers' global defaults (transformers 5 leaves
    unset fields None and fills them in generate). Sampling values only where sampling ran:
    greedy search does not use them."""
    gc = model.generation_config
    defaults = _global_defaults(gc)

    def used(name: str):
        for value in (gen_kwargs.get(name), getattr(gc, name, None), defaults.get(name)):
            if value is not None:
                return value
        return None

    out = {"do_sample": bool(used("do_sample"))}
    sampling = ("temperature", "top_k", "top_p", "min_p") if out["do_sample"] else ()
    for name in ("repetition_penalty", "min_new_tokens", *sampling):
        value = used(name)
        if value is not None:
            out[name] = value
    return out


def _timing(results: list[SliceResult], tokenization_ms: float) -> dict:
    timing = {"tokenization_ms": tokenization_ms, "generate_ms": 0.0, "decode_ms": 0.0}
    if not results:
        return timing
    timing["generate_ms"] = sum((r.t_end - r.t_start) for r in results) * 1e3
    if results[0].step_times:
        timing["time_to_first_token_ms"] = (results[0].step_times[0] - results[0].t_start) * 1e3
        gaps = []
        decode = 0.0
        for r in results:
            if r.step_times:
                decode += r.t_end - r.step_times[0]
                gaps.extend((b - a) * 1e3 for a, b in zip(r.step_times, r.step_times[1:]))
        timing["decode_ms"] = decode * 1e3
        if gaps:
            s = sorted(gaps)
            timing["inter_token_latency"] = {
                "mean_ms": statistics.fmean(s), "median_ms": _percentile(s, 0.5),
                "p95_ms": _percentile(s, 0.95), "p99_ms": _percentile(s, 0.99), "count": len(s),
            }
    return timing
