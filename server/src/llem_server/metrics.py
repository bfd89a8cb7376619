"""Prometheus metrics, all named ``llem_*``, on a registry of their own.

A private ``CollectorRegistry`` keeps the exposition to what this server means
(no accidental globals from libraries) and lets tests make as many ``Metrics``
as they like. Recording is always safe: a ``Metrics`` whose HTTP endpoint was
never started still counts (cheaply) and simply is not scraped, so the servicer
calls these methods unconditionally, with or without ``--metrics-port``.

Label values are kept bounded: ``method`` is the RPC's short name for this server's own
methods and ``"unknown"`` for any other path (a caller, even one refused by auth, could
otherwise mint a label per made-up name: 40 000 of them made /metrics 135 MB), ``status`` a gRPC code name, ``device`` the GPU's index
(``"0"``, ``"1"``; the worker's index, ``"0"``, on a machine without CUDA; ``"unknown"``
when the caller could not say). No
model names or request ids: those belong in logs, not in label sets that grow
without end. Requests by method and status come from :meth:`Metrics.interceptor`.

| metric | type | labels |
|---|---|---|
| llem_requests_total | counter | method, status |
| llem_request_duration_seconds | histogram | method |
| llem_input_tokens_total / llem_output_tokens_total | counter | device |
| llem_stopped_output_tokens_total | counter | device (tokens made by requests cancelled or past their deadline; not in output_tokens) |
| llem_energy_joules_total | counter | device (measured energy only; never estimated, never zero-for-unknown) |
| llem_simulated_energy_joules_total | counter | device (joules of `--energy-backend simulated`: test figures, kept out of the measured total) |
| llem_energy_unavailable_total | counter | device (requests whose energy could not be measured) |
| llem_model_cache_hits_total / _misses_total / _evictions_total | counter | device (hits and misses of completed generations; every load, a stopped request's too, is in llem_model_load_seconds) |
| llem_queue_depth | gauge | device |
| llem_model_load_seconds | histogram | device |
| llem_energy_wait_seconds | histogram | device (an answer's wait for the energy counter's next update) |
| llem_worker_restarts_total | counter | device |
| llem_server_info | gauge (1) | version |
"""
from __future__ import annotations

import asyncio
import inspect
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from . import __version__
from .energy.meter import SIMULATED_PREFIX
from .errors import stop_code

__all__ = ["Metrics", "MetricsInterceptor", "SKIP_PREFIXES"]

# Requests range from a cached one-token reply (ms) to long batched generations (minutes).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The energy counter updates every ~100 ms: an answer waits 0-100 ms plus a read for it.
_ENERGY_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.5, 1)
# Loads range from a tiny model (< 1 s) to a large quantized + compiled one (many minutes).
_LOAD_BUCKETS = (0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


# Probes and discovery would drown the request counts (a probe every few seconds per pod).
SKIP_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/", "/grpc.reflection.")


UNKNOWN_DEVICE = "unknown"  # label for a count whose device the caller did not say


def _known_methods() -> frozenset[str]:
    from llem.v1 import llem_pb2

    return frozenset(f"/{s.full_name}/{m.name}" for s in llem_pb2.DESCRIPTOR.services_by_name.values()
                     for m in s.methods)


_KNOWN_METHODS = _known_methods()
_KNOWN_SHORT = frozenset(p.rsplit("/", 1)[-1] for p in _KNOWN_METHODS)


def _method(name: str) -> str:
    """A full path or short name of this server's methods; "unknown" for anything else."""
    short = name.rsplit("/", 1)[-1]
    return short if name in _KNOWN_METHODS or name in _KNOWN_SHORT else "unknown"


def _status(code: grpc.StatusCode | str) -> str:
    return code.name if isinstance(code, grpc.StatusCode) else str(code).upper()


def _device(device: int | str | None) -> str:
    return UNKNOWN_DEVICE if device is None else str(device)


class Metrics:
    """The server's metrics. One instance per server process.

    Two layers: ``record_*`` take explicit values; ``generated``, ``stopped_tokens``,
    ``model_loaded`` and ``track_queue`` take what the servicer and scheduler
    already hold (an ``llem.v1.Energy``, a queue-depth callable). Requests by method
    and status are counted by :meth:`interceptor`, so no handler has to remember.

    Args:
        registry: where to register (default: a fresh private registry).
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.c_requests = Counter("llem_requests", "RPCs finished, by method and gRPC status.",
                                  ["method", "status"], registry=r)
        self.h_request_seconds = Histogram("llem_request_duration_seconds",
                                           "RPC latency from arrival to the last message, seconds.",
                                           ["method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.c_input_tokens = Counter("llem_input_tokens", "Prompt tokens processed (after truncation, no padding).",
                                      ["device"], registry=r)
        self.c_output_tokens = Counter("llem_output_tokens", "New tokens generated (no padding, nothing after EOS).",
                                       ["device"], registry=r)
        self.c_stopped_tokens = Counter("llem_stopped_output_tokens",
                                        "New tokens generated by requests that were cancelled or passed their deadline.",
                                        ["device"], registry=r)
        self.c_energy_joules = Counter("llem_energy_joules", "Measured GPU energy attributed to requests, joules.",
                                       ["device"], registry=r)
        self.c_simulated_joules = Counter("llem_simulated_energy_joules",
                                          "Simulated GPU energy (--energy-backend simulated), joules: not a measurement.",
                                          ["device"], registry=r)
        self.c_energy_unavailable = Counter("llem_energy_unavailable",
                                            "Requests whose energy could not be measured.", ["device"], registry=r)
        self.c_cache_hits = Counter("llem_model_cache_hits", "Requests served by an already loaded model.",
                                    ["device"], registry=r)
        self.c_cache_misses = Counter("llem_model_cache_misses", "Requests that had to load their model.",
                                      ["device"], registry=r)
        self.c_cache_evictions = Counter("llem_model_cache_evictions", "Models evicted from a device's cache.",
                                         ["device"], registry=r)
        self.g_queue_depth = Gauge("llem_queue_depth", "Jobs waiting for a device (not counting the running one).",
                                   ["device"], registry=r)
        self.h_load_seconds = Histogram("llem_model_load_seconds", "Model load (and compile) time, seconds.",
                                        ["device"], buckets=_LOAD_BUCKETS, registry=r)
        self.h_energy_wait = Histogram("llem_energy_wait_seconds",
                                       "Time an answer waited after generation for the energy counter's next update.",
                                       ["device"], buckets=_ENERGY_WAIT_BUCKETS, registry=r)
        self.c_worker_restarts = Counter("llem_worker_restarts", "Worker processes restarted after dying.",
                                         ["device"], registry=r)
        self.g_info = Gauge("llem_server_info", "Constant 1; the labels describe the server.", ["version"], registry=r)
        self.g_info.labels(version=__version__).set(1)
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    # -- recording: explicit values ------------------------------------------------

    def record_request(self, method: str, status: grpc.StatusCode | str, seconds: float) -> None:
        """One finished RPC of this server's (the interceptor counts them; call it yourself only
        without one)."""
        self._record(_method(method), status, seconds)

    def _record(self, m: str, status: grpc.StatusCode | str, seconds: float) -> None:
        self.c_requests.labels(method=m, status=_status(status)).inc()
        if seconds >= 0 and math.isfinite(seconds):
            self.h_request_seconds.labels(method=m).observe(seconds)

    def record_tokens(self, device: int | str | None, input_tokens: int = 0, output_tokens: int = 0,
                      stopped: bool = False) -> None:
        """Real tokens of a request. ``stopped``: the request was cancelled or passed its
        deadline; its output tokens count in ``llem_stopped_output_tokens`` only, so
        ``llem_output_tokens`` is what clients received in full."""
        d = _device(device)
        if input_tokens > 0:
            self.c_input_tokens.labels(device=d).inc(input_tokens)
        if output_tokens > 0:
            (self.c_stopped_tokens if stopped else self.c_output_tokens).labels(device=d).inc(output_tokens)

    def record_energy(self, device: int | str | None, joules: float | None, *, simulated: bool = False) -> None:
        """Measured joules for one request on one device. ``None`` (or a value that
        is not a finite, non-negative number) counts as unavailable, never as 0 J.
        Simulated joules go to a counter of their own: a dashboard summing the measured
        total must not take in a test figure."""
        d = _device(device)
        if joules is None or not math.isfinite(joules) or joules < 0:
            self.c_energy_unavailable.labels(device=d).inc()
            return
        (self.c_simulated_joules if simulated else self.c_energy_joules).labels(device=d).inc(joules)

    def record_energy_wait(self, device: int | str | None, seconds: float) -> None:
        if math.isfinite(seconds) and seconds >= 0:
            self.h_energy_wait.labels(device=_device(device)).observe(seconds)

    def record_cache(self, device: int | str | None, *, hit: bool) -> None:
        (self.c_cache_hits if hit else self.c_cache_misses).labels(device=_device(device)).inc()

    def record_eviction(self, device: int | str | None, count: int = 1) -> None:
        if count > 0:
            self.c_cache_evictions.labels(device=_device(device)).inc(count)

    def set_queue_depth(self, device: int | str, depth: int) -> None:
        self.g_queue_depth.labels(device=_device(device)).set(max(0, depth))

    def record_load(self, device: int | str | None, seconds: float) -> None:
        if seconds >= 0 and math.isfinite(seconds):
            self.h_load_seconds.labels(device=_device(device)).observe(seconds)

    def record_worker_restart(self, device: int | str) -> None:
        self.c_worker_restarts.labels(device=_device(device)).inc()

    # -- recording: from what the servicer holds -------------------------------------

    def generated(self, input_tokens: int, output_tokens: int, cache_hit: bool, energy: Any = None,
                  device: int | str | None = None) -> None:
        """A completed generation: tokens, cache hit/miss, and energy from an
        ``llem.v1.Energy`` (per-device joules when ``available``; otherwise one
        "unavailable"). Without ``device``, a single-GPU energy reading names it."""
        devices = list(getattr(energy, "devices", ()) or ()) if energy is not None else []
        if device is None and len(devices) == 1:
            device = devices[0].index
        self.record_tokens(device, input_tokens, output_tokens)
        self.record_cache(device, hit=cache_hit)
        if energy is not None:
            self.record_energy_message(energy, device)

    def record_energy_message(self, energy: Any, device: int | str | None = None) -> None:
        """An ``llem.v1.Energy``: its per-device joules when ``available`` (else ``device``
        gets the total), or one "unavailable" on ``device``."""
        if not getattr(energy, "available", False):
            self.record_energy(device, None)
            return
        simulated = energy.method.startswith(SIMULATED_PREFIX)
        if energy.devices:
            for d in energy.devices:
                self.record_energy(d.index, d.energy_j, simulated=simulated)
        else:
            self.record_energy(device, energy.total_j, simulated=simulated)

    def stopped_tokens(self, tokens: int, device: int | str | None = None) -> None:
        """Output tokens a cancelled (or timed-out) request produced before it stopped."""
        self.record_tokens(device, output_tokens=tokens, stopped=True)

    def model_loaded(self, seconds: float, device: int | str | None = None) -> None:
        self.record_load(device, seconds)

    def track_queue(self, device: int | str, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth()`` at scrape time (no bookkeeping on the hot path)."""
        self.g_queue_depth.labels(device=_device(device)).set_function(lambda: max(0, int(depth())))

    def interceptor(self, skip_prefixes: Iterable[str] = SKIP_PREFIXES,
                    methods: Iterable[str] | None = None) -> MetricsInterceptor:
        """A server interceptor counting every RPC by method and final status, with latency.
        Put it first in the list, so calls refused by auth are counted too. ``methods``: the
        full paths that get a label of their own (default: llem.v1's); any other is "unknown"."""
        return MetricsInterceptor(self, skip_prefixes, methods)

    # -- exposition ----------------------------------------------------------------

    def start_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from this registry in a daemon thread; returns the bound
        port (pass 0 for a free one). The endpoint carries no secrets and no auth:
        bind it to a private interface (``host``) where the network is not trusted."""
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already started")
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
            self._http_thread = None

    def render(self) -> bytes:
        """The text exposition (what ``/metrics`` returns), for tests and debugging."""
        return generate_latest(self.registry)


def _final_code(context: grpc.aio.ServicerContext, exc: BaseException | None,
                answered: bool = False) -> grpc.StatusCode:
    # GeneratorExit: grpc closed a streaming handler's generator because the call ended
    # (the client cancelled or its deadline passed while a message was being written).
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        if answered:  # the stream's final message was sent: the caller has its whole answer
            return grpc.StatusCode.OK
        return stop_code(context)
    code = context.code()  # set by abort()/abort_with_status()/set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN  # what grpc answers for an exception escaping a handler
    return grpc.StatusCode.OK


def _is_final(item: Any) -> bool:
    """A stream's last message, whole answer inside (GenerateStreamResponse.final)."""
    try:
        return item.HasField("final")
    except (AttributeError, ValueError):
        return False


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each handler to record ``llem_requests_total`` and ``llem_request_duration_seconds``."""

    def __init__(self, metrics: Metrics, skip_prefixes: Iterable[str] = SKIP_PREFIXES,
                 methods: Iterable[str] | None = None):
        self._m = metrics
        self._skip = tuple(skip_prefixes)
        self._methods = _KNOWN_METHODS if methods is None else frozenset(methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._skip):
            return handler
        label = method.rsplit("/", 1)[-1] if method in self._methods else "unknown"
        return _wrap(handler, label, self._m)


def _wrap(handler: grpc.RpcMethodHandler, label: str, m: Metrics) -> grpc.RpcMethodHandler:
    if handler.unary_unary:
        kind, behavior, factory = "unary_unary", handler.unary_unary, grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        kind, behavior, factory = "unary_stream", handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        kind, behavior, factory = "stream_unary", handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        kind, behavior, factory = "stream_stream", handler.stream_stream, grpc.stream_stream_rpc_method_handler

    def done(context, start: float, exc: BaseException | None, answered: bool = False) -> None:
        m._record(label, _final_code(context, exc, answered), time.monotonic() - start)

    if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
        return handler  # a sync handler runs in grpc's thread pool; wrapping it here would block the loop
    if inspect.isasyncgenfunction(behavior):
        # Streaming handlers written as async generators must stay generators.
        async def wrapped(request, context):
            start, exc, answered = time.monotonic(), None, False
            try:
                async for item in behavior(request, context):
                    # Counted once the final message is handed to grpc, where the log and the
                    # token counters count the answer: a caller that closes once it has it (as
                    # the Python client's stream does) did get what it asked for.
                    answered = _is_final(item)
                    yield item
            except BaseException as e:
                exc = e
                raise
            finally:
                done(context, start, exc, answered)
    else:
        async def wrapped(request, context):
            start, exc = time.monotonic(), None
            try:
                return await behavior(request, context)
            except BaseException as e:
                exc = e
                raise
            finally:
                done(context, start, exc)

    wrapped.__name__ = f"metered_{kind}"
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
