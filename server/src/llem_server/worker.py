"""The worker process: one per device, ``generate`` in its main thread.

Protocol over a ``multiprocessing`` pipe (pickled dicts):

front → worker: ``{"op": "generate"|"load"|"unload"|"stop", "job": int, ...}`` one at a time; a load
(or generate) of a local model may carry ``"model_root"``, under which the model's files are
checked again just before ``from_pretrained``.
worker → front: ``{"type": "hello", ...}`` once; per job ``{"type": "started", "job", "t"}``
(generation began; monotonic seconds), ``{"type": "tokens", "job", "items": [(prompt, id), ...]}``
while streaming, then ``{"type": "done", "job", "result"}`` or ``{"type": "error", "job",
"status", "message"}``.

Cancellation does not use the pipe: the front writes the job id into a shared
``RawValue`` that a stopping criterion reads every decode step.
"""
from __future__ import annotations

import os
import sys
import traceback


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a missing parent package ("optimum" for "optimum.quanto")
        return False


# Registered torch.compile backends that need a package of their own to run.
_BACKEND_PACKAGES = {"tvm": "tvm", "openxla": "torch_xla", "onnxrt": "onnxruntime", "tensorrt": "torch_tensorrt",
                     "torch_tensorrt": "torch_tensorrt", "ipex": "intel_extension_for_pytorch"}


_DEBUG_BACKENDS = ("eager", "aot_eager")  # tagged "debug" by torch, but config.md names them


def _compile_backends(listed, registered) -> list[str]:
    """The backends a request may name here: torch's own list (no debug or experimental
    ones, no test fixtures) plus eager and aot_eager, less those whose package is missing."""
    names = set(listed) | {b for b in _DEBUG_BACKENDS if b in registered}
    return sorted(b for b in names if b not in _BACKEND_PACKAGES or _has_module(_BACKEND_PACKAGES[b]))


def _capabilities(torch, device: str) -> dict:
    import transformers
    from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    info = {
        "cuda": cuda,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "compute_capability": None,
        "name": "cpu", "total_memory_bytes": 0,
        "flash_attn_2": _has_module("flash_attn"),
        "flash_attn_3": _has_module("flash_attn_interface"),
        "bitsandbytes": _has_module("bitsandbytes"),
        "quantized_cache": any(_has_module(m) for m in ("optimum.quanto", "hqq")),
        "cache_implementations": list(ALL_CACHE_IMPLEMENTATIONS),
        # Plain strings: torch.__version__ is a TorchVersion, and unpickling one in the front
        # process would import torch there.
        "versions": {"torch": str(torch.__version__), "transformers": str(transformers.__version__),
                     "cuda": str(torch.version.cuda or ""), "python": sys.version.split()[0]},
    }
    try:
        import torch._dynamo

        info["compile_backends"] = _compile_backends(torch._dynamo.list_backends(),
                                                     torch._dynamo.list_backends(exclude_tags=()))
    except Exception:  # noqa: BLE001
        info["compile_backends"] = ["inductor"]
    if _has_module("bitsandbytes"):
        # On CPUs with AVX512-BF16, importing bitsandbytes logs "Failed to load CPU
        # gemm_4bit_forward from kernels-community" when the optional `kernels` package is
        # absent: a speed hint (4-bit runs without it), not a failure; keep it out of the log.
        import logging

        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
            lambda r: not str(r.msg).startswith("Failed to load CPU gemm_4bit_forward"))
        try:
            import bitsandbytes

            info["versions"]["bitsandbytes"] = bitsandbytes.__version__
        except Exception as exc:  # noqa: BLE001 - report, don't die
            info["bitsandbytes"] = False
            info["bitsandbytes_error"] = repr(exc)
    if cuda:
        # Open the CUDA context now: idle power with a context is the serving state that
        # baselines must measure (~124 W vs ~81 W without one on an H200, energy.md).
        torch.zeros(1, device="cuda")
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, total_memory_bytes=int(props.total_memory),
                    compute_capability=(props.major, props.minor))
    else:
        try:
            import psutil

            info["total_memory_bytes"] = int(psutil.virtual_memory().total)
        except Exception:  # noqa: BLE001
            pass
    return info


def _log_like_the_front() -> None:
    """Library output (transformers, bitsandbytes warnings, progress bars) as the front's log
    lines: with JSON logs a log shipper must see one JSON object per line, nothing else."""
    import logging
    import warnings

    from .logs import OncePerMessage, configure

    as_json = os.environ.get("LLEM_LOG_FORMAT", "json") == "json"
    configure(json=as_json, level=os.environ.get("LLEM_LOG_LEVEL", "info"))
    for handler in logging.getLogger().handlers:  # the worker logs only library messages
        handler.addFilter(OncePerMessage())
    logging.captureWarnings(True)
    warnings.simplefilter("once")
    # torch's own deprecation notices (torch.jit on import) say nothing an operator can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
    if as_json:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    import transformers

    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    if as_json:
        transformers.utils.logging.disable_progress_bar()


def worker_main(conn, device: str, cuda_index: int | None, cancel_flag, max_models: int) -> None:
    """Entry point of a worker process (multiprocessing 'spawn')."""
    if cuda_index is not None:
        # Each worker sees exactly its own GPU; set before torch initialises CUDA.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(cuda_index)
    fault = os.environ.get("LLEM_FAULT_START_FILE")  # test-only: a worker that cannot start
    if fault and os.path.exists(fault):
        sys.exit(3)
    _log_like_the_front()  # (imports torch: after the line above)
    import torch

    from . import compiling
    from .generation import run_generate
    from .models import JobError, LoadError, ModelCache, is_out_of_memory, load_model, oom_message

    compiling.configure(torch)
    cache = ModelCache(max_models)
    conn.send({"type": "hello", "pid": os.getpid(), "capabilities": _capabilities(torch, device)})

    def send(msg: dict) -> None:
        conn.send(msg)

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op, job = msg.get("op"), msg.get("job")
        evicted: list = []  # models dropped to make room: reported even when the load then fails
        oom = False
        if op == "stop":
            return
        try:
            if op == "die":  # used by tests to simulate a crashed worker
                os._exit(3)
            if op in ("load", "generate"):
                entry = cache.get(msg["config_hash"])
                cache_hit = entry is not None
                if entry is None:
                    evicted = cache.make_room(set(msg.get("pinned", ())) | {msg["config_hash"]})
                    entry = load_model(msg["config_hash"], msg["source"], msg["load_kwargs"],
                                       msg.get("compile_kwargs"), model_root=msg.get("model_root"))
                    cache.add(entry)
                base = {"cache_hit": cache_hit, "evicted": evicted, "model": entry.info()}
                if op == "load":
                    send({"type": "done", "job": job, "result": {**base, "tokenizer_json": entry.tokenizer_json}})
                    continue
                if not cache_hit:
                    # Before generating: the front needs the tokenizer to decode a stream.
                    send({"type": "loaded", "job": job, "result": {**base, "tokenizer_json": entry.tokenizer_json}})
                emit = None
                if msg.get("stream"):
                    def emit(items, _job=job):
                        send({"type": "tokens", "job": _job, "items": items})
                result = run_generate(
                    entry, msg["prompts"], msg["plan"], job_id=job, cancel_flag=cancel_flag, emit=emit,
                    on_start=lambda t, _job=job: send({"type": "started", "job": _job, "t": t}),
                )
                # Evictions went out with "loaded"; the model's info is refreshed after use.
                result.update(cache_hit=cache_hit, model=entry.info())
                send({"type": "done", "job": job, "result": result})
            elif op == "unload":
                freed = cache.unload(msg["config_hash"])
                send({"type": "done", "job": job, "result": {"freed_bytes": freed}})
            else:
                send({"type": "error", "job": job, "status": "INTERNAL", "reason": "INTERNAL_ERROR",
                      "message": f"unknown op {op!r}"})
        except JobError as exc:
            # A load or input the client can act on; after out of memory while loading, a retry
            # can help once other models are unloaded.
            send({"type": "error", "job": job, "status": exc.status, "message": exc.message,
                  "reason": exc.reason,
                  "violations": list(exc.violations), "load_failed": isinstance(exc, LoadError),
                  "retryable": exc.status == "RESOURCE_EXHAUSTED", "evicted": evicted})
        except (ValueError, TypeError) as exc:
            # transformers rejects a combination config.py let through: the client's input.
            send({"type": "error", "job": job, "status": "INVALID_ARGUMENT",
                  "message": f"transformers rejected the request: {type(exc).__name__}: {exc}"})
        except Exception as exc:  # noqa: BLE001 - a server bug: report it, keep serving
            if is_out_of_memory(exc):  # device or host (MemoryError, the CPU allocator's error)
                oom = True
                send({"type": "error", "job": job, "status": "RESOURCE_EXHAUSTED", "reason": "OUT_OF_MEMORY",
                      "message": oom_message(exc, "while running this request"), "retryable": True})
            else:
                send({"type": "error", "job": job, "status": "INTERNAL", "reason": "INTERNAL_ERROR",
                      "message": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        finally:
            if cancel_flag.value == job:
                cancel_flag.value = 0
        if oom:
            # Only now: inside the except clause the traceback still holds the failed forward's
            # frames, and with them its activations, so nothing could go back to the device.
            _free_cuda(torch)


def _free_cuda(torch) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
