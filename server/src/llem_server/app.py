"""Assembling and running the server: devices, workers, energy meter, gRPC, drain."""
from __future__ import annotations

import asyncio
import functools
import os
import platform
import signal
import sys
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import handlers, reflection
from .scheduler import DeviceWorker
from .service import SERVICE_NAME, LlemServicer, Settings


def detect_devices(spec: str) -> list[tuple[str, int | None]]:
    """(device, physical CUDA index) per worker. NVML finds GPUs without importing torch here."""
    if spec == "cpu":
        return [("cpu", None)]
    if spec not in ("auto", ""):
        return [(f"cuda:{i}", int(i)) for i in spec.split(",")]
    count = 0
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver / no GPU: serve on the CPU
        count = 0
    if count == 0:
        return [("cpu", None)]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    indices = [int(x) for x in visible.split(",") if x.strip().isdigit()] if visible else list(range(count))
    return [(f"cuda:{i}", i) for i in indices]


# What one client connection may hold, so that open endpoints (health, reflection, and the
# auth refusal itself) cannot be used to hoard the front's memory and descriptors: streams per
# connection (llem-client keeps a few; 32 concurrent callers on one channel fit easily), a
# connection that has not finished its HTTP/2 (or TLS) handshake in 10 s is dropped (a peer
# that only opens sockets held each for ~2 min), and one idle for 10 min is closed (clients
# reconnect by themselves). A fleet of peers can still exhaust descriptors: put a proxy or a
# network policy in front (README, Serving real models).
CONNECTION_LIMITS = [
    ("grpc.max_concurrent_streams", 256),
    ("grpc.server_handshake_timeout_ms", 10_000),
    ("grpc.max_connection_idle_ms", 600_000),
]


def make_meter(settings: Settings, devices: list[tuple[str, int | None]], versions: dict[str, str],
               worker_pid: Callable[[], int | None] = lambda: None):
    """(meter, worker index → metered GPU index, reason energy is absent where it is)."""
    from .energy import EnergyMeter

    backend = settings.energy_backend
    if backend == "none":
        reason = "energy metering is switched off on this server (--energy-backend none)"
        return EnergyMeter.unavailable(reason, versions=versions, rapl_root=None), {}, reason
    if backend == "simulated":
        # A simulated NVML counter whose true energy is known (tests, CPU benchmarks): the
        # real sampler and attribution run on it, metering worker 0.
        from .energy.simulated import SimGpu, SimulatedNvml

        watts = float(settings.extra.get("simulated_power_w", 150.0))
        others = [int(p) for p in settings.extra.get("simulated_other_pids", ())]
        # The simulated GPU lists worker 0 as a real one would, and any other PIDs asked for.
        nvml = SimulatedNvml([SimGpu(power=watts, processes=lambda: [p for p in [worker_pid()] if p] + others)])
        return EnergyMeter([0], nvml=nvml, versions=versions, simulated=True), {0: 0}, ""
    gpus = [phys for _, phys in devices if phys is not None]
    if not gpus:
        reason = ("no NVIDIA GPU: this server generates on the CPU, and NVML found no GPU energy counter "
                  "(GPU energy is measured only for CUDA devices)")
        return EnergyMeter.unavailable(reason, versions=versions), {}, reason
    return EnergyMeter(gpus, versions=versions), {i: phys for i, (_, phys) in enumerate(devices)}, ""


async def serve(settings: Settings, *, port_file: Path | None = None, auth_token_file: Path | None = None,
                tls: tuple[Path, Path, Path | None] | None = None, metrics_port: int | None = None,
                metrics_host: str | None = None, log=None, ready: asyncio.Event | None = None) -> int:
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA indices in NVML's order
    devices = detect_devices(settings.devices)
    workers = [DeviceWorker(i, dev, phys, max_models=settings.max_models, max_queue=settings.max_queue)
               for i, (dev, phys) in enumerate(devices)]
    await asyncio.gather(*(w.start() for w in workers))
    caps = workers[0].capabilities
    versions = {k: caps["versions"].get(k, "") for k in ("torch", "transformers", "cuda")}
    meter, meter_devices, energy_reason = make_meter(settings, devices, versions, lambda: workers[0].pid)
    # A GPU's own worker is not "another process" on it; a worker restarted after a crash has a new PID.
    meter.set_server_pids(lambda: {w.pid: meter_devices[w.index] for w in workers
                                   if w.pid is not None and w.index in meter_devices})
    meter.start()
    for w in workers:  # the ledger keeps a running job's time unsettled (see EnergyMeter.hold)
        if w.index in meter_devices:
            w.on_busy = functools.partial(meter.hold, meter_devices[w.index])
    baseline_s = float(settings.extra.get("baseline_seconds") or 0)
    if baseline_s > 0 and meter_devices:
        # Before serving, so nothing runs; the workers already hold their CUDA contexts.
        results = await asyncio.to_thread(meter.measure_baseline, baseline_s, None,
                                          {i: 0 for i in meter_devices.values()})
        for idx, res in sorted(results.items()) if log is not None else ():  # nobody asked over gRPC: logged
            log.info("baseline_measured", device=idx, available=res.available, power_w=res.power_w,
                     uncertainty_w=res.uncertainty_w, reason=res.reason,
                     warnings=[f"{code}: {msg}" for code, msg in res.warnings()])

    metrics = None
    if metrics_port is not None:
        from .metrics import Metrics

        metrics = Metrics()
        metrics_port = metrics.start_http(metrics_port, metrics_host or settings.host)  # 0: the one bound
        for w in workers:
            metrics.track_queue(w.index, w.queue_depth)

    interceptors = []
    if metrics is not None:
        interceptors.append(metrics.interceptor())  # first: calls refused by auth are counted too
    auth = None
    if auth_token_file is not None:
        from .auth import BearerTokenInterceptor

        auth = BearerTokenInterceptor.from_file(auth_token_file)
        interceptors.append(auth)
    # Twice the limit: the servicer answers requests over --max-message-bytes with INVALID_ARGUMENT
    # naming the limit; beyond this ceiling gRPC refuses them itself (RESOURCE_EXHAUSTED).
    options = [("grpc.max_receive_message_length", 2 * settings.max_message_bytes),
               ("grpc.max_send_message_length", max(settings.max_message_bytes, 64 * 1024 * 1024)),
               *CONNECTION_LIMITS]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    front_versions = {"python": platform.python_version(), "grpcio": grpc.__version__,
                      "protobuf": _protobuf_version(), "llem_server": _own_version()}
    servicer = LlemServicer(settings, workers, meter, meter_devices=meter_devices, energy_reason=energy_reason,
                            log=log, metrics=metrics,
                            health=health_servicer, front_versions=front_versions)
    server.add_generic_rpc_handlers((handlers.generic_handler(servicer),))  # requests parsed there: never UNKNOWN
    reflection.enable(server, [SERVICE_NAME, health.SERVICE_NAME])

    address = f"{settings.host}:{settings.port}"
    if tls is not None:
        from .tls import server_credentials

        port = server.add_secure_port(address, server_credentials(*tls))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"could not bind {address}")
    # Signal handlers before anything says the server is up: a SIGTERM right after the port
    # file appeared once found Python's default action (exit -15, no drain; a CI run saw it).
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if auth is not None:
        loop.add_signal_handler(signal.SIGHUP, auth.reload)  # rotate tokens without a restart
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if port_file is not None:
        tmp = Path(str(port_file) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    print(f"llem-server listening on {settings.host}:{port} ({', '.join(d for d, _ in devices)})", flush=True)
    if log is not None:
        log.info("server_started", address=f"{settings.host}:{port}", devices=[d for d, _ in devices],
                 version=_own_version(), energy_backend=settings.energy_backend,
                 energy=energy_reason or "measured", metrics_port=metrics_port)
    if ready is not None:
        ready.set()
    await stop.wait()

    # Drain: probes see NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get the grace period.
    # The server keeps accepting calls while work is in flight, so that probes read NOT_SERVING and
    # new calls get the servicer's UNAVAILABLE (with RetryInfo) rather than a refused connection or a
    # CANCELLED from a gRPC server that is already stopping; then it stops with the grace left.
    servicer.draining = True
    await health_servicer.enter_graceful_shutdown()
    if log is not None:
        log.info("server_draining", grace_seconds=settings.grace_seconds)
    deadline = loop.time() + settings.grace_seconds
    while loop.time() < deadline and any(w.current is not None or w.queue_depth() for w in workers):
        await asyncio.sleep(0.05)
    await server.stop(max(0.0, deadline - loop.time()))
    await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
    if log is not None:
        # Conservation over the server's life (energy.md rule 4), for GPU checks: attributed + idle
        # should equal the counter's delta within one counter step per GPU.
        for idx in sorted(set(meter_devices.values())):
            try:
                attributed_j, idle_j = meter.ledger(idx)
                log.info("energy_ledger", device=idx, attributed_j=round(attributed_j, 4), idle_j=round(idle_j, 4),
                         counter_delta_j=round(meter.counter_delta_j(idx), 4), sampler=meter.sampler_stats(idx))
            except Exception as exc:  # noqa: BLE001 - a log line must not stop the shutdown
                log.warning("energy_ledger_failed", device=idx, error=repr(exc))
    meter.close()
    if log is not None:
        log.info("server_stopped")
    return 0


def _protobuf_version() -> str:
    import google.protobuf

    return google.protobuf.__version__


def _own_version() -> str:
    from . import __version__

    return __version__


def run(settings: Settings, **kwargs) -> int:
    try:
        return asyncio.run(serve(settings, **kwargs))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the llem-server command")
