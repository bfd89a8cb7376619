"""The gRPC servicer: validation, routing, streaming, cancellation, energy, responses.

Everything here runs on the front process's event loop; generation happens in the
worker processes (``scheduler``). Errors are ``ServiceError``s turned into statuses
with ``google.rpc`` details (``errors``); anything a client sends that we cannot serve
gets a specific status, never UNKNOWN or INTERNAL.
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
from llem.v1 import llem_pb2, llem_pb2_grpc

from . import __version__, config
from . import energy_proto
from .errors import ServiceError, abort, stop_code
from .logs import bind
from .paths import ModelPathError, resolve_model
from .registry import FAILED, READY, Registry
from .scheduler import START_TRIES, DeviceWorker, QueueFull, error_from_worker
from .streaming import IncrementalDecoder

_S = grpc.StatusCode


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    model_root: Path | None = None
    max_models: int = 2
    max_queue: int = 64
    max_prompts: int = 256
    max_input_tokens: int = 8192
    max_output_tokens: int = 4096
    max_message_bytes: int = 16 * 1024 * 1024
    allow_hub: bool = False
    allow_remote_code: bool = False
    grace_seconds: float = 30.0
    energy_backend: str = "auto"  # auto | nvml | simulated | none
    devices: str = "auto"  # auto | cpu | comma-separated CUDA indices
    deferred_energy_keep: int = 10_000  # deferred energies kept for GetEnergy, most recent first
    extra: dict = field(default_factory=dict)


def _status_of(name: str) -> grpc.StatusCode:
    return getattr(_S, name)


# A request's config problems, by the status they come to (config._worst): what the user can do.
_CONFIG_REASON = {"INVALID_ARGUMENT": "INVALID_REQUEST", "FAILED_PRECONDITION": "NOT_SUPPORTED_HERE",
                  "PERMISSION_DENIED": "REMOTE_CODE_NOT_ALLOWED"}


def _config_error(err: config.ConfigError) -> ServiceError:
    return ServiceError(_status_of(err.status), "; ".join(f"{v.field}: {v.description}" for v in err.violations),
                        violations=[(v.field, v.description) for v in err.violations],
                        reason=_CONFIG_REASON[err.status])


def _json_map(d: dict) -> dict[str, str]:
    return {k: json.dumps(v, sort_keys=True) for k, v in d.items()}


def _check_request_id(request_id: str) -> None:
    """Before the id is logged, bound to the RPC or kept for GetEnergy: a 15 MB id used to be
    written to the log and held in the deferred store although the request was refused."""
    why = config.request_id_problem(request_id)
    if why:
        raise ServiceError(_S.INVALID_ARGUMENT, f"request_id: {why}", violations=[("request_id", why)])


def _hide_root(data: dict, model) -> dict:
    """Worker messages name a local model by its real path; clients see its name under the root."""
    if model.is_local and model.source != model.display:
        data = {**data, "message": str(data.get("message", "")).replace(model.source, model.display)}
    return data


def _name_by_directory(model_config: llem_pb2.ModelConfig, model) -> None:
    """One directory, one cache key: a local model is keyed (and reported) by its real path
    under the model root, so "./m", "org/../m" and a link to m share m's entry, and a link
    pointed at new weights gets a new one."""
    if model.is_local:
        model_config.model = model.display


SERVICE_NAME = llem_pb2.DESCRIPTOR.services_by_name["LlemService"].full_name  # its health name too
_FAILED_DEFERRED_KEEP = 1000  # failed deferred requests whose reason GetEnergy still gives


@dataclass
class _Deferred:
    """A deferred request's energy to come: known from the request's arrival."""
    fut: asyncio.Future  # -> (Energy, [Warning])
    generating: bool = True  # until its tokens are done; then the counter's update is awaited


class _JobWindow:
    """A generate job's energy window, opened and closed as the worker's events arrive
    (``Job.watch``), not when the RPC's handler reads them: a handler blocked writing to a
    slow stream reader would otherwise hold the window open while the next request runs,
    and that request's energy would be split with it."""

    def __init__(self, meter, devices: list[int], request_id: str):
        self.meter, self.devices, self.request_id = meter, devices, request_id
        self.window = None

    def __call__(self, kind: str, data) -> None:
        if kind == "started" and self.window is None:
            self.window = self.meter.open_window(self.devices, data, self.request_id)
        elif kind == "done" and data.get("window"):
            t0, t1 = data["window"]
            if self.window is None:  # "started" is always sent first; keep a window regardless
                self.window = self.meter.open_window(self.devices, t0, self.request_id)
            self.meter.close_window(self.window, t1, sum(c["output_tokens"] for c in data.get("completions", [])))
        elif kind == "error" and self.window is not None:
            self.meter.discard(self.window)


class LlemServicer(llem_pb2_grpc.LlemServiceServicer):
    def __init__(self, settings: Settings, workers: list[DeviceWorker], meter, *, meter_devices: dict[int, int],
                 energy_reason: str = "", log=None, metrics=None, health=None,
                 front_versions: dict[str, str] | None = None):
        self.settings = settings
        self.workers = workers
        self.meter = meter
        self._read_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llem-read-energy")
        self._server_id = uuid.uuid4().hex  # ReadEnergy: readings of different server runs differ
        # worker index -> metered GPU index (absent: that worker's device is not metered)
        self.meter_devices = meter_devices
        self.energy_reason = energy_reason  # why GPU energy is absent on workers with no metered device
        self.log = log
        self.metrics = metrics
        self.health = health
        self.front_versions = front_versions or {}
        self.registry = Registry(on_change=self._on_model_change)
        self.draining = False
        self._background: set[asyncio.Task] = set()
        # request_id -> its (Energy, [Warning]) to come, for ENERGY_DELIVERY_DEFERRED requests
        self._deferred: OrderedDict[str, _Deferred] = OrderedDict()
        # Deferred requests that failed (refused, cancelled), kept apart with their reason: a
        # flood of refusals must not push measured energies out of _deferred.
        self._deferred_failed: OrderedDict[str, _Deferred] = OrderedDict()
        for w in workers:
            w.on_restart = self._on_worker_restart
            w.on_start_failed = self._on_worker_start_failed
            w.on_ready = self._on_worker_ready

    def _on_worker_restart(self, index: int, exitcode: int | None = None) -> None:
        if self.log is not None:
            w = self.workers[index]
            self.log.warning("worker_died", device=w.device, exit_code=exitcode, restarts=w.restarts,
                             note="its running request failed with UNAVAILABLE; restarting it")
        self.registry.drop_device(index)
        if self.metrics is not None:
            self.metrics.record_worker_restart(self.meter_devices.get(index, index))
        self._update_health()

    def _on_worker_start_failed(self, index: int, tries: int, error: Exception) -> None:
        if self.log is not None:
            self.log.error("worker_start_failed", device=self.workers[index].device, tries=tries, error=str(error),
                           note="retrying with back-off; queued requests fail with UNAVAILABLE after "
                                f"{START_TRIES} tries in a row")
        self._update_health()

    def _on_worker_ready(self, index: int) -> None:
        if self.log is not None:
            self.log.info("worker_restarted", device=self.workers[index].device, restarts=self.workers[index].restarts)
        self._update_health()

    def _update_health(self) -> None:
        """Readiness (llem.v1.LlemService): some worker can take requests. Liveness (""): no
        worker is stuck failing to start (a lost GPU: restarting the process may help)."""
        if self.health is None or self.draining:
            return
        from grpc_health.v1 import health_pb2

        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        ready = any(w.state == "ready" for w in self.workers)
        stuck = any(w.start_failures >= START_TRIES for w in self.workers)
        self._in_background(self.health.set(SERVICE_NAME, serving if ready else not_serving))
        self._in_background(self.health.set("", not_serving if stuck else serving))

    # -- helpers -------------------------------------------------------------
    def capabilities(self) -> config.Capabilities:
        caps = self.workers[0].capabilities if self.workers else {}
        ccs = [tuple(w.capabilities["compute_capability"]) for w in self.workers
               if w.capabilities.get("compute_capability")]
        return config.Capabilities.from_worker(
            caps, compute_capability=min(ccs) if ccs else None,  # the lowest: a request may land on any
            allow_remote_code=self.settings.allow_remote_code,
            max_prompts=self.settings.max_prompts, max_input_tokens=self.settings.max_input_tokens,
            max_output_tokens=self.settings.max_output_tokens,
        )

    def _on_model_change(self, config_hash: str, state: int | None) -> None:
        if self.health is None:
            return
        self._in_background(self._sync_health(config_hash))

    async def _sync_health(self, config_hash: str) -> None:
        """Set a config's health from the registry as it is when this runs (so tasks that
        overtake one another still end on the latest state). A config gone from the cache:
        its watchers see SERVICE_UNKNOWN, then its entry is dropped (Check answers NOT_FOUND,
        as for a name never served), so a server that has cached thousands of configurations
        keeps no entry per one gone. grpc's servicer has no call for that: its status map is
        reached directly."""
        from grpc_health.v1 import health_pb2

        serving = health_pb2.HealthCheckResponse
        entry = self.registry.get(config_hash)
        if entry is not None:
            await self.health.set(config_hash, serving.SERVING if entry.state == READY else serving.NOT_SERVING)
            return
        await self.health.set(config_hash, serving.SERVICE_UNKNOWN)
        statuses = getattr(self.health, "_server_status", None)
        # Not while draining: grpc's shutdown walks this map, awaiting inside the walk.
        if self.registry.get(config_hash) is None and isinstance(statuses, dict) and not self.draining \
                and statuses.get(config_hash) == serving.SERVICE_UNKNOWN:  # not loaded again meanwhile
            del statuses[config_hash]

    def _check_open(self) -> None:
        if self.draining:
            raise ServiceError(_S.UNAVAILABLE, "the server is shutting down; retry on another replica", retry_delay_s=1.0,
                               reason="SHUTTING_DOWN")

    def _check_size(self, request) -> None:
        # The transport lets messages up to twice --max-message-bytes through (a hard memory
        # ceiling, answered by gRPC itself with RESOURCE_EXHAUSTED) so that this check can
        # answer the usual oversize request with INVALID_ARGUMENT naming the limit.
        size = request.ByteSize()
        if size > self.settings.max_message_bytes:
            text = f"the request is {size} bytes, over this server's limit of {self.settings.max_message_bytes} (max_message_bytes)"
            raise ServiceError(_S.INVALID_ARGUMENT, text,
                               violations=[("prompts", f"{text}: send fewer or shorter prompts per request")])

    def _resolve_model(self, name: str, field_path: str):
        if not name:
            raise ServiceError(_S.INVALID_ARGUMENT, f"{field_path}: a model name is required",
                               violations=[(field_path, "a model name is required")])
        try:
            return resolve_model(name, self.settings.model_root, self.settings.allow_hub)
        except ModelPathError as exc:
            violations = [(field_path, exc.message)] if exc.status == "INVALID_ARGUMENT" else None
            raise ServiceError(_status_of(exc.status), exc.message, violations=violations, reason=exc.reason) from None

    def _route(self, config_hash: str) -> DeviceWorker:
        index = self.registry.device_of(config_hash)
        if index is not None:
            return self.workers[index]
        # A worker that cannot start answers its queue at once: never prefer it for its short queue.
        return min(self.workers, key=lambda w: (w.state != "ready", w.queue_depth() + (1 if w.current else 0), w.index))

    def _submit(self, worker: DeviceWorker, op: str, payload: dict, context=None):
        try:
            return worker.submit(op, payload, peer=context.peer() if context is not None else "")
        except QueueFull as exc:
            raise ServiceError(_S.RESOURCE_EXHAUSTED, str(exc), retry_delay_s=1.0, reason="QUEUE_FULL") from None

    def _meter_indices(self, worker: DeviceWorker) -> list[int]:
        idx = self.meter_devices.get(worker.index)
        return [] if idx is None else [idx]

    async def _energy(self, window) -> tuple[llem_pb2.Energy, list[llem_pb2.Warning]]:
        """Waits (off the device) for the counter to pass the window's end, then attributes.
        The window was closed where its end became known (_JobWindow, _note_load)."""
        if window is None:
            return energy_proto.absent("no generation ran for this request", llem_pb2.ENERGY_ABSENCE_NOT_RUN), []
        if not window.devices and not self.meter.cpu_sensor().available:
            # Nothing to wait for (no metered GPU, no RAPL): the report is immediate, so skip the
            # thread-pool hop (two context switches on every unmetered request's path).
            report = self.meter.report(window)
        else:
            report = await asyncio.to_thread(self.meter.report, window)
        return energy_proto.energy(report), energy_proto.warnings(report)

    # -- Generate / GenerateStream ------------------------------------------
    async def Generate(self, request, context):
        try:
            final = None
            async for event in self._generate(request, context, stream=False):
                final = event
            return final
        except ServiceError as err:
            self._log_failed(request, err)
            await abort(context, err)

    async def GenerateStream(self, request, context):
        events = self._generate(request, context, stream=True)
        try:
            async for event in events:
                if isinstance(event, llem_pb2.GenerateResponse):
                    yield llem_pb2.GenerateStreamResponse(final=event)
                else:
                    yield llem_pb2.GenerateStreamResponse(chunk=event)
        except ServiceError as err:
            self._log_failed(request, err)
            await abort(context, err)
        finally:
            # A stream cancelled while grpc was writing a message is closed here, not
            # cancelled: close _generate now so that its stop bookkeeping runs at once.
            await events.aclose()

    def _log_failed(self, request, err: ServiceError) -> None:
        if self.log is not None:  # request_id and config_hash (once known) are bound to the RPC's task
            self.log.info("generate", status=err.code.name, message=err.message[:300])

    async def _generate(self, request: llem_pb2.GenerateRequest, context, *, stream: bool) -> AsyncIterator:
        _check_request_id(request.request_id)
        request_id = request.request_id or uuid.uuid4().hex
        bind(request_id=request_id)  # every line of this RPC, its failure's included, carries it
        if request.energy_delivery != llem_pb2.ENERGY_DELIVERY_DEFERRED:
            async for event in self._generate_request(request, request_id, context, stream=stream):
                yield event
            return
        # GetEnergy knows a deferred request from its arrival: asked while it still runs, it
        # waits for it; a request that fails leaves a reason, not "never sent".
        deferred = self._reserve_deferred(request_id)
        inner = self._generate_request(request, request_id, context, stream=stream, deferred=deferred)
        try:
            async for event in inner:
                yield event
        except BaseException as exc:
            # Only while it generates: a stream closed just after its final message is done,
            # and its energy, settling in the background, is still to come.
            if deferred.generating and not deferred.fut.done():
                why = exc.message if isinstance(exc, ServiceError) else "the request was cancelled"
                deferred.fut.set_result((energy_proto.absent((
                    f"the request did not finish: {why}"), llem_pb2.ENERGY_ABSENCE_NOT_RUN), []))
                self._move_to_failed(request_id, deferred)
            raise
        finally:
            await inner.aclose()

    async def _generate_request(self, request: llem_pb2.GenerateRequest, request_id: str, context, *,
                                stream: bool, deferred: _Deferred | None = None) -> AsyncIterator:
        t_arrival = time.monotonic()
        self._check_open()
        self._check_size(request)
        model = self._resolve_model(request.model.model, "model.model")
        _name_by_directory(request.model, model)
        try:
            resolved = config.resolve_generate(request, self.capabilities(), model_is_local=model.is_local)
        except config.ConfigError as err:
            raise _config_error(err) from None
        load, plan = resolved.load, resolved.plan
        config_hash = load.config_hash()
        bind(config_hash=config_hash)
        worker = self._route(config_hash)
        entry = self.registry.reserve(config_hash, load.to_proto(), worker.index)
        payload = {
            "config_hash": config_hash, "source": model.source, "model_root": model.root,
            "load_kwargs": load.load_kwargs(), "compile_kwargs": load.compile_kwargs(),
            "prompts": list(request.prompts), "stream": stream,
            "pinned": self.registry.hashes_on(worker.index),
            "plan": plan.worker_payload(),
        }
        try:
            job = self._submit(worker, "generate", payload, context)
        except ServiceError:
            self.registry.release(entry)
            raise
        # Set before any event can arrive (they come through this loop, after this step).
        edges = job.watch = _JobWindow(self.meter, self._meter_indices(worker), request_id)
        # The RPC can end (cancel, disconnect, deadline) while this handler waits anywhere,
        # a stream typically inside grpc's write: stop the device from the RPC's own end.
        context.add_done_callback(lambda _ctx: None if job.finished else worker.cancel(job))
        decoders, result = {}, None
        try:
            while True:
                kind, data = await job.events.get()
                if kind == "loaded":
                    self._note_load(entry, data)
                elif kind == "tokens" and stream:
                    for chunk in self._chunks(entry, decoders, data):
                        yield chunk
                elif kind == "done":
                    result = data
                    break
                elif kind == "error":  # its window was discarded as the error arrived
                    data = _hide_root(data, model)
                    self._job_failed(entry, data)
                    raise error_from_worker(data)
        except ServiceError:
            raise
        except Exception:
            # A bug on this side (a token that will not decode): the caller gets INTERNAL, and
            # the device's work is stopped and accounted as a stopped request's, its window
            # measured (left unreported, it would keep the samplers hurried for good).
            if job.finished:
                if edges.window is not None and not edges.window.reported and edges.window.t_end is not None:
                    self._in_background(self._energy(edges.window))
            else:
                worker.cancel(job)
                self._finish_in_background(worker, job, entry, edges, request_id, "INTERNAL")
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # Client cancelled, went away or its deadline passed (a closed stream sees
            # GeneratorExit): stop within one decode step, account for the work in the background.
            worker.cancel(job)
            self._finish_in_background(worker, job, entry, edges, request_id, stop_code(context).name)
            raise
        finally:
            if result is not None or not job.cancelled:
                self.registry.release(entry)
        # A load (and its evictions) was reported by the "loaded" event before generation began.
        self.registry.used(entry, result["model"])
        window = edges.window  # closed already, as "done" arrived
        out_tokens = sum(c["output_tokens"] for c in result["completions"])
        device = self.meter_devices.get(entry.device_index, entry.device_index)
        stream_warnings = []
        try:
            # Every token goes out before the energy wait (the counter's next update, up to
            # ~100 ms): a stream's last token is not delayed by metering, only its totals.
            if stream and not decoders and out_tokens:
                # Beam search has no per-step signal: its tokens can only be sent once known.
                for c in result["completions"]:
                    yield llem_pb2.TokenChunk(index=c["index"], token_ids=c["token_ids"], text=c["text"])
                stream_warnings.append(llem_pb2.Warning(
                    code="STREAM_NOT_INCREMENTAL",
                    message="num_beams > 1: beam search picks its sequences at the end, so tokens were sent once done"))
            if stream:
                for index, dec in decoders.items():
                    tail = dec.flush()
                    if tail:
                        yield llem_pb2.TokenChunk(index=index, text=tail)
        except Exception:
            # The tail failed (a decoder's last characters): the answer is lost, but the window
            # is measured, so it does not keep its samplers hurried, nor stay unreported.
            self._in_background(self._energy(window))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # Closed after generation, before its totals: the work was done, so its window is
            # closed and measured (left open, it would share every later window's energy).
            if deferred is not None:
                self._defer_energy(deferred, request_id, config_hash, window, device)
                self._stopped_after_generation(context, request_id, config_hash, out_tokens, device, None)
            else:
                self._stopped_after_generation(context, request_id, config_hash, out_tokens, device,
                                               self._in_background(self._energy(window)))
            raise
        t_wait = time.monotonic()
        if deferred is not None:
            self._defer_energy(deferred, request_id, config_hash, window, device)
            energy, energy_warnings = energy_proto.absent((
                "deferred (energy_delivery = ENERGY_DELIVERY_DEFERRED): fetch it with GetEnergy(request_id) once "
                "the energy counter has passed this request's end (~100 ms)"), llem_pb2.ENERGY_ABSENCE_DEFERRED), []
        else:
            # Shielded: a caller whose deadline passes during this wait (most of a short
            # request's latency) stops waiting, but its tokens and energy are still counted.
            measuring = self._in_background(self._energy(window))
            try:
                energy, energy_warnings = await asyncio.shield(measuring)
            except asyncio.CancelledError:
                self._stopped_after_generation(context, request_id, config_hash, out_tokens, device, measuring)
                raise
        energy_warnings.extend(stream_warnings)
        # Deferred: nothing waited for the counter (registering the settlement is bookkeeping).
        wait_ms = 0.0 if deferred is not None else (time.monotonic() - t_wait) * 1e3
        yield self._response(request_id, config_hash, entry, resolved, result, energy, energy_warnings, job,
                             t_arrival, energy_wait_ms=wait_ms, deferred=deferred is not None)

    def _reserve_deferred(self, request_id: str) -> _Deferred:
        """A deferred request's place for GetEnergy, from its arrival (most recent kept)."""
        held = _Deferred(asyncio.get_running_loop().create_future())
        self._deferred.pop(request_id, None)  # a reused id: the latest request wins
        self._deferred_failed.pop(request_id, None)
        self._deferred[request_id] = held
        while len(self._deferred) > max(self.settings.deferred_energy_keep, 1):
            self._deferred.popitem(last=False)
        return held

    def _move_to_failed(self, request_id: str, held: _Deferred) -> None:
        if self._deferred.get(request_id) is held:
            del self._deferred[request_id]
            self._deferred_failed[request_id] = held
            while len(self._deferred_failed) > _FAILED_DEFERRED_KEEP:
                self._deferred_failed.popitem(last=False)

    def _defer_energy(self, held: _Deferred, request_id: str, config_hash: str, window, device) -> None:
        """Settle a deferred request's energy in the background, kept for GetEnergy."""
        held.generating = False
        fut = held.fut

        async def settle():
            try:
                energy, warnings = await self._energy(window)
            except Exception as exc:  # noqa: BLE001 - a reason, never a lost future
                energy, warnings = energy_proto.absent(f"energy failed: {exc!r}",
                                                       llem_pb2.ENERGY_ABSENCE_MEASUREMENT_FAILED), []
            if not fut.done():
                fut.set_result((energy, warnings))
            if self.metrics is not None:  # counted once, when known: the answer itself did not count it
                self.metrics.record_energy_message(energy, device)
            if self.log is not None:
                self.log.info("deferred_energy", request_id=request_id, config_hash=config_hash,
                              energy_j=energy.total_j if energy.available else None,
                              reason=None if energy.available else energy.unavailable_reason[:200])

        self._in_background(settle())

    async def ReadEnergy(self, request, context):
        loop = asyncio.get_running_loop()
        # Its own two threads: each reading blocks ~100 ms, and a flood of them must not queue
        # up in front of the requests' energy reports (which run in the default executor).
        t, readings = await loop.run_in_executor(self._read_pool, self.meter.read)
        resp = llem_pb2.ReadEnergyResponse(monotonic_s=t, unix_s=time.time() - (time.monotonic() - t),
                                           server_id=self._server_id)
        for i, r in sorted(readings.items()):
            d = resp.devices.add(index=i, uuid=r.uuid, available=r.available, unavailable_reason=r.reason,
                                 method=r.method, counter_resets=r.interruptions)
            if r.available:
                d.energy_j, d.uncertainty_j = r.energy_j, r.uncertainty_j
        if not readings:  # no GPU metered here: say why, as every energy figure does
            resp.devices.add(index=0, available=False, unavailable_reason=self.energy_reason or "no GPU is metered")
        return resp

    async def GetEnergy(self, request, context):
        try:
            ids = list(request.request_ids)
            wait = request.wait_seconds if request.HasField("wait_seconds") else 2.0
            problems = []
            if not ids:
                problems.append(("request_ids", "name at least one request id"))
            elif len(ids) > 1000:
                problems.append(("request_ids", f"{len(ids)} ids; at most 1000 per call"))
            if not (0 <= wait <= 30) or math.isnan(wait):
                problems.append(("wait_seconds", "must be between 0 and 30 seconds"))
            if problems:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(f"{f}: {m}" for f, m in problems),
                                   violations=problems)
            deadline = time.monotonic() + wait
            resp = llem_pb2.GetEnergyResponse()
            for rid in ids:
                held = self._deferred.get(rid) or self._deferred_failed.get(rid)
                item = resp.results.add(request_id=rid, state=llem_pb2.DEFERRED_ENERGY_STATE_SETTLED)
                if held is None:
                    item.state = llem_pb2.DEFERRED_ENERGY_STATE_UNKNOWN
                    item.energy.CopyFrom(energy_proto.absent((
                        "no deferred energy for this request id on this server: it was not sent with "
                        "ENERGY_DELIVERY_DEFERRED, is older than the last "
                        f"{self.settings.deferred_energy_keep} deferred requests, or went to another server"),
                        llem_pb2.ENERGY_ABSENCE_UNKNOWN_REQUEST))
                    continue
                try:
                    energy, warnings = await asyncio.wait_for(asyncio.shield(held.fut),
                                                              max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    state = "still generating" if held.generating else "not settled"
                    item.state = llem_pb2.DEFERRED_ENERGY_STATE_PENDING
                    item.energy.CopyFrom(energy_proto.absent((
                        f"{state} within wait_seconds={wait:g}: ask again"), llem_pb2.ENERGY_ABSENCE_PENDING))
                    continue
                item.energy.CopyFrom(energy)
                item.warnings.extend(warnings)
            return resp
        except ServiceError as err:
            await abort(context, err)

    def _note_load(self, entry, data: dict) -> None:
        # "loaded" comes only from a real load, even for an entry listed READY (the worker
        # may have dropped it: an unload whose caller gave up, a restart): record it all,
        # evictions included, or the listing drifts from what the worker holds.
        self.registry.loaded(entry, data["model"], data.get("tokenizer_json"))
        if self.metrics is not None:  # once per load, whether LoadModel or a Generate cache miss loaded it
            self.metrics.model_loaded(data["model"].get("load_time_s", 0.0) + data["model"].get("compile_time_s", 0.0),
                                      device=self.meter_devices.get(entry.device_index, entry.device_index))
        self._drop_evicted(entry, data)
        # Every load's energy (LoadModel or a Generate's cache miss), measured off the request
        # path: the window is registered after the fact; its energy comes from the samples.
        entry.load_energy = energy_proto.absent((
            "being measured: the energy counter has not yet passed the end of the load"),
            llem_pb2.ENERGY_ABSENCE_PENDING)
        entry.load_energy_warnings = []
        # Registered now, in this step: the job's consumer runs before the dispatcher sees it
        # over and lets the ledger settle past the job (EnergyMeter.hold), so the load's time,
        # its start long past, is not booked as idle meanwhile.
        t0, t1 = data["model"]["load_window"]
        worker = self.workers[entry.device_index]
        window = self.meter.open_window(self._meter_indices(worker), t0, f"load-{entry.config_hash[:16]}")
        self.meter.close_window(window, t1, None)
        entry.load_energy_task = self._in_background(self._measure_load(entry, window))

    async def _measure_load(self, entry, window) -> None:
        entry.load_energy, entry.load_energy_warnings = await self._energy(window)

    def _job_failed(self, entry, data: dict) -> None:
        """A job's error: a failed load is listed with its reason; other errors (cancelled,
        worker died) leave the entry to the registry's count of who still holds it."""
        if data.get("load_failed"):
            self.registry.failed(entry, data.get("message", ""))
        self._drop_evicted(entry, data)

    def _drop_evicted(self, entry, data: dict) -> None:
        """Forget the models the worker evicted to make room (reported with the load, or with its error)."""
        for evicted_hash, _freed in data.get("evicted", []):
            if self.registry.remove(evicted_hash) is not None and self.metrics is not None:
                self.metrics.record_eviction(self.meter_devices.get(entry.device_index, entry.device_index))

    def _chunks(self, entry, decoders: dict, items: list) -> list[llem_pb2.TokenChunk]:
        by_prompt: dict[int, list[int]] = {}
        for index, token in items:
            by_prompt.setdefault(index, []).append(token)
        chunks = []
        for index, ids in by_prompt.items():
            dec = decoders.get(index)
            if dec is None:
                dec = decoders[index] = IncrementalDecoder(entry.tokenizer)
            chunks.append(llem_pb2.TokenChunk(index=index, token_ids=ids, text=dec.push(ids)))
        return chunks

    def _stopped_after_generation(self, context, request_id: str, config_hash: str, out_tokens: int, device,
                                  measuring: asyncio.Task | None) -> None:
        """A caller gone after its generation ended, before its answer: the tokens were made
        and the energy spent, so both are counted (as a stopped request's) and logged."""
        status = stop_code(context).name

        async def finish():
            energy = None
            if measuring is not None:
                try:
                    energy, _ = await measuring
                except Exception:  # noqa: BLE001 - counted without its energy
                    energy = None
            self._record_stopped(request_id, config_hash, status, out_tokens, energy, device, after_generation=True)

        self._in_background(finish())

    def _record_stopped(self, request_id: str, config_hash: str, status: str, tokens: int, energy, device,
                        **extra) -> None:
        """A stopped request's tokens (apart from answered ones) and measured energy, and its log line."""
        measured = energy is not None and energy.available
        if self.metrics is not None:
            self.metrics.stopped_tokens(tokens, device=device)
            if measured:
                self.metrics.record_energy_message(energy, device)
        if self.log is not None:
            self.log.info("request_stopped", request_id=request_id, config_hash=config_hash, status=status,
                          output_tokens=tokens, energy_j=energy.total_j if measured else None, **extra)

    def _finish_in_background(self, worker, job, entry, edges: _JobWindow, request_id, status: str) -> None:
        """After a cancel: wait for the worker's partial result, then log its tokens and energy."""
        async def finish():
            try:
                while True:
                    kind, data = await job.events.get()
                    if kind == "loaded":  # the load finished although nobody waits: the cache has it
                        self._note_load(entry, data)
                    elif kind in ("done", "error"):
                        break
                if kind == "error":
                    self._job_failed(entry, data)
                tokens = sum(c["output_tokens"] for c in data.get("completions", [])) if kind == "done" else 0
                energy, w = None, edges.window
                if w is not None and kind == "done" and data.get("window"):
                    energy, _ = await self._energy(w)
                elif w is not None:
                    self.meter.discard(w)
                self._record_stopped(request_id, entry.config_hash, status, tokens, energy,
                                     self.meter_devices.get(worker.index, worker.index))
            finally:
                self.registry.release(entry)

        self._in_background(finish())

    def _in_background(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _load_outcome_of(self, entry, kind: str, data: dict, model) -> None:
        """A load job's answer into the registry; raises the client's error for a failed one."""
        if kind == "error":
            data = _hide_root(data, model)
            self._job_failed(entry, data)
            raise error_from_worker(data)
        if not data["cache_hit"]:
            self._note_load(entry, data)

    async def _load_outcome(self, job, entry, model) -> None:
        try:
            self._load_outcome_of(entry, *(await job.events.get()), model)
        except ServiceError:
            pass  # nobody is waiting for this load's error; the registry has it
        finally:
            self.registry.release(entry)

    def _response(self, request_id, config_hash, entry, resolved, result, energy, energy_warnings, job, t_arrival,
                  energy_wait_ms: float = 0.0, deferred: bool = False):
        resp = llem_pb2.GenerateResponse(request_id=request_id, config_hash=config_hash, cache_hit=result["cache_hit"])
        in_tok = out_tok = 0
        for c in result["completions"]:
            resp.completions.add(index=c["index"], text=c["text"], token_ids=c["token_ids"],
                                 input_tokens=c["input_tokens"], output_tokens=c["output_tokens"],
                                 finish_reason=c["finish_reason"])
            in_tok += c["input_tokens"]
            out_tok += c["output_tokens"]
        resp.usage.input_tokens, resp.usage.output_tokens = in_tok, out_tok
        t = result["timing"]
        timing = resp.timing
        timing.queue_wait_ms = ((job.dispatched or t_arrival) - job.enqueued) * 1e3
        if not result["cache_hit"]:
            info = result["model"]
            timing.load_ms = (info.get("load_time_s", 0.0) + info.get("compile_time_s", 0.0)) * 1e3
        timing.tokenization_ms = t.get("tokenization_ms", 0.0)
        timing.generate_ms = t.get("generate_ms", 0.0)
        timing.decode_ms = t.get("decode_ms", 0.0)
        if "time_to_first_token_ms" in t:
            timing.time_to_first_token_ms = t["time_to_first_token_ms"]
        if "inter_token_latency" in t:
            for k, v in t["inter_token_latency"].items():
                setattr(timing.inter_token_latency, k, v)
        timing.total_ms = (time.monotonic() - t_arrival) * 1e3
        timing.energy_wait_ms = energy_wait_ms
        resp.energy.CopyFrom(energy)
        for code, message in [*resolved.warnings, *result["model"].get("warnings", []), *result.get("warnings", [])]:
            resp.warnings.add(code=code, message=message)
        resp.warnings.extend(energy_warnings)
        eff = resp.effective_config
        eff.model.CopyFrom(resolved.load.to_proto())
        eff.resolved_revision = result["model"].get("resolved_revision", "")
        decoder = resolved.plan.decoder_proto()
        for k, v in result.get("effective_decoder", {}).items():
            if not decoder.HasField(k) and k in llem_pb2.DecoderConfig.DESCRIPTOR.fields_by_name:
                setattr(decoder, k, v)
        eff.decoder.CopyFrom(decoder)
        eff.max_input_tokens = resolved.plan.max_input_tokens
        eff.max_output_tokens = resolved.plan.max_output_tokens
        eff.random_seed = resolved.plan.random_seed
        for k, v in _json_map(result["effective_generate_kwargs"]).items():
            eff.generate_kwargs[k] = v
        for k, v in _json_map(resolved.load.load_kwargs()).items():
            eff.load_kwargs[k] = v
        eff.compiled = bool(result.get("compiled", result["model"].get("compiled")))
        eff.device = result["model"].get("device", "")
        if self.metrics is not None:
            device = self.meter_devices.get(entry.device_index, entry.device_index)
            # A deferred energy is counted by the task that settles it.
            self.metrics.generated(in_tok, out_tok, result["cache_hit"], None if deferred else energy, device=device)
            if not deferred and energy.available:
                self.metrics.record_energy_wait(device, energy_wait_ms / 1e3)
        if self.log is not None:
            self.log.info("generate", request_id=request_id, config_hash=config_hash, status="OK", input_tokens=in_tok,
                          output_tokens=out_tok, cache_hit=result["cache_hit"],
                          energy_j=energy.total_j if energy.available else None, total_ms=round(timing.total_ms, 2),
                          energy_wait_ms=round(energy_wait_ms, 2))
        return resp

    # -- model cache -----------------------------------------------------------
    async def LoadModel(self, request, context):
        try:
            _check_request_id(request.request_id)
            self._check_open()
            model = self._resolve_model(request.model.model, "model.model")
            _name_by_directory(request.model, model)
            try:
                load, warnings = config.resolve_load(request.model, self.capabilities(), model_is_local=model.is_local)
            except config.ConfigError as err:
                raise _config_error(err) from None
            config_hash = load.config_hash()
            worker = self._route(config_hash)
            entry = self.registry.reserve(config_hash, load.to_proto(), worker.index)
            try:
                job = self._submit(worker, "load", {
                    "config_hash": config_hash, "source": model.source, "model_root": model.root,
                    "load_kwargs": load.load_kwargs(),
                    "compile_kwargs": load.compile_kwargs(), "pinned": self.registry.hashes_on(worker.index)},
                    context)
            except ServiceError:
                self.registry.release(entry)
                raise
            try:
                kind, data = await job.events.get()
            except asyncio.CancelledError:
                # The caller gave up; the worker still finishes the load: list it when it lands.
                self._in_background(self._load_outcome(job, entry, model))
                raise
            try:
                self._load_outcome_of(entry, kind, data, model)
            finally:
                self.registry.release(entry)
            cache_hit = data["cache_hit"]
            if not cache_hit and entry.load_energy_task is not None:
                await asyncio.shield(entry.load_energy_task)  # this answer carries the load's energy
            resp = llem_pb2.LoadModelResponse(config_hash=config_hash, cache_hit=cache_hit, model=entry.to_proto())
            for code, message in list(warnings) + list(data["model"].get("warnings", [])):
                resp.warnings.add(code=code, message=message)
            if not cache_hit:
                resp.warnings.extend(entry.load_energy_warnings)
            if self.log is not None:
                e = entry.load_energy
                self.log.info("load_model", request_id=request.request_id or None, config_hash=config_hash,
                              cache_hit=cache_hit, status="OK", load_time_s=resp.model.load_time_s,
                              compile_time_s=resp.model.compile_time_s,
                              energy_j=e.total_j if e is not None and e.available else None)
            return resp
        except ServiceError as err:
            if self.log is not None:
                rid = None if config.request_id_problem(request.request_id) else request.request_id
                self.log.info("load_model", request_id=rid or None, status=err.code.name, message=err.message[:300])
            await abort(context, err)

    async def UnloadModel(self, request, context):
        try:
            if not request.config_hash.strip():
                raise ServiceError(_S.INVALID_ARGUMENT, "config_hash: the hash of the model to unload is required",
                                   violations=[("config_hash", "required (ListModels shows each model's hash)")])
            entry = self.registry.get(request.config_hash)
            if entry is None:
                raise ServiceError(_S.NOT_FOUND, f"no cached model has config hash {request.config_hash!r}",
                                   reason="UNKNOWN_CONFIG_HASH")
            if entry.state == FAILED:
                self.registry.remove(request.config_hash)
                return llem_pb2.UnloadModelResponse(unloaded=True, freed_bytes=0)
            worker = self.workers[entry.device_index]
            job = self._submit(worker, "unload", {"config_hash": request.config_hash}, context)
            try:
                kind, data = await job.events.get()
            except asyncio.CancelledError:
                # The caller gave up, but the worker still unloads: take it off the list then.
                self._in_background(self._unload_outcome(job, request.config_hash))
                raise
            if kind == "error":
                raise error_from_worker(data)
            self._unloaded(request.config_hash, data)
            return llem_pb2.UnloadModelResponse(unloaded=True, freed_bytes=int(data["freed_bytes"]))
        except ServiceError as err:
            if self.log is not None:
                self.log.info("unload_model", config_hash=request.config_hash, status=err.code.name)
            await abort(context, err)

    def _unloaded(self, config_hash: str, data: dict) -> None:
        self.registry.remove(config_hash)
        if self.log is not None:
            self.log.info("unload_model", config_hash=config_hash, status="OK", freed_bytes=int(data["freed_bytes"]))

    async def _unload_outcome(self, job, config_hash: str) -> None:
        kind, data = await job.events.get()
        if kind != "error":
            self._unloaded(config_hash, data)

    async def ListModels(self, request, context):
        return llem_pb2.ListModelsResponse(models=[e.to_proto() for e in self.registry.list()])

    # -- server info and baseline -------------------------------------------------
    async def GetServerInfo(self, request, context):
        resp = llem_pb2.GetServerInfoResponse(server_version=__version__)
        versions = dict(self.front_versions)
        if self.workers:
            versions.update(self.workers[0].capabilities.get("versions", {}))
            caps = self.capabilities()
            resp.compile_backends.extend(config.usable_compile_backends(caps))
            resp.cache_implementations.extend(config.usable_cache_implementations(caps))
        for k, v in versions.items():
            resp.versions[k] = str(v)
        sensors = self.meter.sensors()
        for w in self.workers:
            caps = w.capabilities
            d = resp.devices.add(index=w.index, kind="cuda" if caps.get("cuda") else "cpu", name=caps.get("name", ""),
                                 total_memory_bytes=int(caps.get("total_memory_bytes", 0)),
                                 worker_state=w.state, queue_depth=w.queue_depth(),
                                 loaded_config_hashes=self.registry.ready_on(w.index))
            cc = caps.get("compute_capability")
            if cc:
                d.compute_capability = f"{cc[0]}.{cc[1]}"
            idx = self.meter_devices.get(w.index)
            if idx is not None and idx in sensors:
                d.energy_sensor.CopyFrom(energy_proto.sensor(sensors[idx]))
                static = self.meter.device_static(idx) or {}
                d.uuid = static.get("uuid", "") or ""
                base = self.meter.baseline(idx)
                if base is not None:
                    d.baseline.CopyFrom(energy_proto.baseline(base))
            else:
                d.energy_sensor.CopyFrom(llem_pb2.EnergySensor(available=False, unavailable_reason=self.energy_reason))
        resp.cpu_energy_sensor.CopyFrom(energy_proto.sensor(self.meter.cpu_sensor()))
        s = self.settings
        resp.limits.CopyFrom(llem_pb2.Limits(
            max_models=s.max_models, max_queue=s.max_queue, max_prompts=s.max_prompts,
            max_input_tokens=s.max_input_tokens, max_output_tokens=s.max_output_tokens,
            max_message_bytes=s.max_message_bytes))
        resp.allow_hub, resp.allow_remote_code = s.allow_hub, s.allow_remote_code
        return resp

    async def MeasureBaseline(self, request, context):
        try:
            self._check_open()
            duration = request.duration_s if request.HasField("duration_s") else 30.0
            if not (0 < duration <= 600) or duration != duration:
                raise ServiceError(_S.INVALID_ARGUMENT, "duration_s must be > 0 and <= 600 seconds",
                                   violations=[("duration_s", "must be > 0 and <= 600 seconds")])
            resp = llem_pb2.MeasureBaselineResponse()
            metered = {self.meter_devices[w.index]: w for w in self.workers if w.index in self.meter_devices}
            if not metered:
                for w in self.workers:
                    resp.devices.add(index=w.index, available=False, unavailable_reason=self.energy_reason)
                return resp
            # Idle means idle: wait for running requests, and hold new ones, until done. A caller
            # that goes away frees the devices at once, so the measurement is abandoned too.
            cancel, held = threading.Event(), []
            try:
                for w in sorted(metered.values(), key=lambda w: w.index):
                    await w.exclusive.acquire()
                    held.append(w.exclusive)
                loaded = {i: self.registry.loaded_on(w.index) for i, w in metered.items()}
                results = await asyncio.to_thread(self.meter.measure_baseline, duration, cancel, loaded)
            except asyncio.CancelledError:
                cancel.set()
                raise
            finally:
                for lock in held:
                    lock.release()
            for _idx, res in sorted(results.items()):
                resp.devices.append(energy_proto.device_baseline(res))
                for code, message in res.warnings():
                    resp.warnings.add(code=code, message=message)
            return resp
        except ServiceError as err:
            await abort(context, err)

