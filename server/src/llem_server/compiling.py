"""torch.compile in a worker: limits that fit several models, and what each request compiled.

Two things made compiled measurements quietly wrong (both measured on this project's CPU
models, transformers 5, torch 2.13):

* transformers wraps every model class's ``forward`` in one decorator function, so dynamo
  keeps a single cache for all the models a worker holds. At torch's default
  ``recompile_limit`` (8), three requests of batch 1, 2 and 4 on one model used the slots up;
  from then on new shapes, and every other model, ran eager while responses said compiled.
  Dynamo logs that once, then falls back silently: ``configure`` raises the limits and
  counts the hits, and every later response of a compiled model says one happened.
* Dynamo compiles a new graph for each new input shape inside ``generate``: the request
  that brings it pays the compile in its own time and energy window. ``graphs()`` lets the
  caller count the graphs a request compiled, so its response can say so.

Transformers also compiles the decode step by itself for a static cache on CUDA
(``generation_config.compile_config``, mode reduce-overhead) without ``torch_compile``;
``watch_auto_compile`` notes the requests where it decided to.
"""
from __future__ import annotations

import logging

# Per code object, and over all of them. A worker holds a few models (--max-models), each
# compiling a handful of graphs for its shapes; these leave room for many.
RECOMPILE_LIMIT = 64
ACCUMULATED_RECOMPILE_LIMIT = 1024

_limit_hits = 0


class _LimitHits(logging.Handler):
    """Counts dynamo's 'hit config.recompile_limit' warnings (its only trace of the fallback)."""

    def emit(self, record: logging.LogRecord) -> None:
        global _limit_hits
        if str(record.msg).startswith("torch._dynamo hit config."):
            _limit_hits += 1


def configure(torch) -> None:
    """Raise dynamo's recompile limits and start counting hits (once per worker process)."""
    dyn = torch._dynamo.config
    # torch < 2.6 names them cache_size_limit / accumulated_cache_size_limit (still aliases now).
    for names, value in ((("recompile_limit", "cache_size_limit"), RECOMPILE_LIMIT),
                         (("accumulated_recompile_limit", "accumulated_cache_size_limit"), ACCUMULATED_RECOMPILE_LIMIT)):
        name = next((n for n in names if hasattr(dyn, n)), None)
        if name is not None:
            setattr(dyn, name, max(getattr(dyn, name), value))
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(h, _LimitHits) for h in logger.handlers):
        logger.addHandler(_LimitHits())


def limit_hits() -> int:
    return _limit_hits


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001
        return 0
    return int(counters["stats"]["unique_graphs"])


def watch_auto_compile(model) -> None:
    """Note when transformers decides to compile the forward itself during ``generate``
    (``model._llem_auto_compiled``, reset by the caller before each request)."""
    decide = getattr(model, "_valid_auto_compile_criteria", None)
    model._llem_auto_compiled = False
    if decide is None:  # another transformers: nothing to watch
        return
    if "llama4" in str(getattr(model.config, "model_type", "")):
        return  # transformers' get_compiled_call returns Llama 4's forward uncompiled

    def watched(model_kwargs, generation_config):
        used = decide(model_kwargs, generation_config)
        model._llem_auto_compiled = model._llem_auto_compiled or bool(used)
        return used

    model._valid_auto_compile_criteria = watched


def request_warnings(*, compiled: bool, auto_compiled: bool, new_graphs: int) -> list[tuple[str, str]]:
    """What a response must say about compilation in its request."""
    out = []
    if auto_compiled and not compiled:
        out.append(("CACHE_AUTO_COMPILED",
                    "transformers compiled the model's decode step itself (a compilable cache such as "
                    "cache_implementation static on this device; torch.compile with generation_config.compile_config) "
                    "although model.pytorch.torch_compile is not set: this request ran compiled"))
    if new_graphs and (compiled or auto_compiled):
        out.append(("COMPILED_IN_REQUEST",
                    f"torch.compile compiled {new_graphs} new graph(s) during this request (shapes not seen "
                    "before): its time and energy include that compilation; repeat it to measure the compiled "
                    "model alone"))
    if (compiled or auto_compiled) and limit_hits():
        # Dynamo says so once, then runs the code object eager for good: every later request
        # in this worker may have run partly uncompiled.
        out.append(("COMPILE_LIMIT_REACHED",
                    "torch._dynamo reached its recompile limit in this worker: shapes it had not compiled by "
                    "then run uncompiled (eager), in this request too where they are new; restart the server "
                    "(or its worker) to compile again"))
    return out
