"""A simulated NVML (the pynvml function names the meter uses) whose true energy is known.

Each ``SimGpu`` has a power that is a known function of time (a constant or piecewise
constant ``[(t_rel_s, watts), ...]`` from the simulator's start), a cumulative counter
that updates every ``update_period_s`` (each update moved by up to ``update_jitter_s``,
where set) with the exact energy up to that update (floored to ``resolution_mj``), and a
~1 s trailing average power like ``nvmlDeviceGetPowerUsage``.
Every call is recorded with the calling thread, so tests can prove the request path
makes none. Thread-safe.
"""
from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable

KEEP_CALLS = 100_000  # the latest NVML calls kept for tests' checks

NVML_TEMPERATURE_GPU = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

nvmlClocksEventReasonGpuIdle = 0x1
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonSwThermalSlowdown = 0x20
nvmlClocksEventReasonHwThermalSlowdown = 0x40
nvmlClocksEventReasonHwPowerBrakeSlowdown = 0x80


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"simulated NVML error {self.value}"


@dataclass
class SimGpu:
    power: float | list[tuple[float, float]] = 100.0
    update_period_s: float = 0.1
    # Each update moved by a fixed draw from ±this (the real counter's updates need not be
    # strictly periodic: a fit to one periodic clock must stay honest when they are not).
    update_jitter_s: float = 0.0
    resolution_mj: float = 1.0
    counter: bool = True               # False: nvmlDeviceGetTotalEnergyConsumption -> NOT_SUPPORTED
    power_reading: bool = True         # False: nvmlDeviceGetPowerUsage -> NOT_SUPPORTED
    backwards_at: float | None = None  # t_rel at which the counter restarts from 0 (driver reload)
    counter_start_mj: float = 5.0e8    # real counters are large: since the driver loaded
    temperature: float | Callable[[float], float] = 40.0
    reasons: int | Callable[[float], int] = 0
    persistence: int = 1
    name: str = "Simulated H200"
    uuid: str = ""
    power_limit_w: float = 700.0
    # PIDs with a compute context on the GPU (a callable is asked at each listing);
    # None: nvmlDeviceGetComputeRunningProcesses -> NOT_SUPPORTED
    processes: list[int] | Callable[[], list[int]] | None = field(default_factory=list)
    mps_processes: list[int] | None = None  # None: nvmlDeviceGetMPSComputeRunningProcesses -> NOT_SUPPORTED

    def segments(self) -> list[tuple[float, float]]:
        return [(-math.inf, float(self.power))] if not isinstance(self.power, list) else \
            [(-math.inf, self.power[0][1])] + list(self.power[1:])


class SimulatedNvml:
    """Module-like object: pass as ``EnergyMeter(nvml=SimulatedNvml(...))``."""

    NVMLError = NVMLError

    def __init__(self, gpus: list[SimGpu] | None = None, *, clock: Callable[[], float] = time.monotonic,
                 init_error: int | None = None, count_error: int | None = None):
        self.gpus = gpus if gpus is not None else [SimGpu()]
        for i, g in enumerate(self.gpus):
            g.uuid = g.uuid or f"GPU-sim-{i:04d}"
        self.clock = clock
        self.t0 = clock()
        self.init_error = init_error
        self.count_error = count_error
        # (thread ident, function name) of the latest calls: bounded, since a simulated server
        # (demos, CI) may run for weeks and its samplers call ~40 times a second.
        self.calls: deque[tuple[int, str]] = deque(maxlen=KEEP_CALLS)
        self._n_calls = 0
        self._lock = threading.Lock()
        g = globals()
        for k in list(g):
            if k.startswith(("NVML_", "nvmlClocksEventReason")):
                setattr(self, k, g[k])

    # -- truth ---------------------------------------------------------------------
    def true_energy_j(self, index: int, t_a: float, t_b: float) -> float:
        """Exact energy between absolute times t_a and t_b (same clock as the simulator)."""
        segs = self.gpus[index].segments()
        a, b = t_a - self.t0, t_b - self.t0
        total = 0.0
        for k, (start, watts) in enumerate(segs):
            end = segs[k + 1][0] if k + 1 < len(segs) else math.inf
            lo, hi = max(a, start), min(b, end)
            if hi > lo:
                total += watts * (hi - lo)
        return total

    def last_update(self, index: int, now: float) -> float:
        """The counter's latest update at or before ``now`` (absolute time)."""
        g = self.gpus[index]
        k0 = math.floor((now - self.t0) / g.update_period_s)
        if not g.update_jitter_s:
            return self.t0 + k0 * g.update_period_s
        for k in (k0 + 1, k0, k0 - 1):  # a jitter under half a period moves no update past a neighbour
            jitter = (random.Random(k * 7919 + index).random() * 2 - 1) * g.update_jitter_s
            upd = self.t0 + k * g.update_period_s + jitter
            if upd <= now:
                return upd
        raise AssertionError("update_jitter_s must be under half the update period")

    def _counter_mj(self, index: int, now: float) -> float:
        g = self.gpus[index]
        rel = now - self.t0
        upd = self.last_update(index, now)
        if g.backwards_at is not None and rel >= g.backwards_at:
            e = self.true_energy_j(index, self.t0 + g.backwards_at, max(upd, self.t0 + g.backwards_at)) * 1000
            base = 0.0
        else:
            e = self.true_energy_j(index, self.t0, upd) * 1000
            base = g.counter_start_mj
        return base + math.floor(e / g.resolution_mj) * g.resolution_mj

    # -- pynvml surface ------------------------------------------------------------
    def _rec(self, name: str) -> None:
        with self._lock:
            self.calls.append((threading.get_ident(), name))
            self._n_calls += 1

    def _gpu(self, handle: int) -> SimGpu:
        return self.gpus[handle]

    def nvmlInit(self) -> None:
        self._rec("nvmlInit")
        if self.init_error is not None:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._rec("nvmlShutdown")

    def nvmlDeviceGetCount(self) -> int:
        self._rec("nvmlDeviceGetCount")
        if self.count_error is not None:
            raise NVMLError(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._rec("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        self._rec("nvmlDeviceGetTotalEnergyConsumption")
        if not self._gpu(h).counter:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(self._counter_mj(h, self.clock()))

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        self._rec("nvmlDeviceGetPowerUsage")
        if not self._gpu(h).power_reading:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        now = self.clock()
        return int(round(self.true_energy_j(h, now - 1.0, now) * 1000))  # 1 s trailing average, mW

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        self._rec("nvmlDeviceGetTemperature")
        t = self._gpu(h).temperature
        return int(t(self.clock() - self.t0) if callable(t) else t)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h: int) -> int:
        self._rec("nvmlDeviceGetCurrentClocksEventReasons")
        r = self._gpu(h).reasons
        return int(r(self.clock() - self.t0) if callable(r) else r)

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        self._rec("nvmlDeviceGetComputeRunningProcesses")
        procs = self._gpu(h).processes
        if procs is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [SimpleNamespace(pid=int(p), usedGpuMemory=None) for p in (procs() if callable(procs) else procs)]

    def nvmlDeviceGetMPSComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        self._rec("nvmlDeviceGetMPSComputeRunningProcesses")
        procs = self._gpu(h).mps_processes
        if procs is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [SimpleNamespace(pid=int(p), usedGpuMemory=None) for p in procs]

    def nvmlDeviceGetName(self, h: int) -> str:
        self._rec("nvmlDeviceGetName")
        return self._gpu(h).name

    def nvmlDeviceGetUUID(self, h: int) -> str:
        self._rec("nvmlDeviceGetUUID")
        return self._gpu(h).uuid

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        self._rec("nvmlDeviceGetEnforcedPowerLimit")
        return int(self._gpu(h).power_limit_w * 1000)

    def nvmlDeviceGetPersistenceMode(self, h: int) -> int:
        self._rec("nvmlDeviceGetPersistenceMode")
        return self._gpu(h).persistence

    def nvmlSystemGetDriverVersion(self) -> str:
        self._rec("nvmlSystemGetDriverVersion")
        return "580.159-sim"

    def nvmlSystemGetNVMLVersion(self) -> str:
        self._rec("nvmlSystemGetNVMLVersion")
        return "13.580.159-sim"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._rec("nvmlSystemGetCudaDriverVersion")
        return 13000

    # -- test helpers --------------------------------------------------------------
    def calls_since(self, since: int = 0) -> list[tuple[int, str]]:
        """(thread, function) of the calls after the ``since``-th (as ``call_count`` said)."""
        with self._lock:
            skip = since - (self._n_calls - len(self.calls))
            return list(itertools.islice(self.calls, max(skip, 0), None))

    def calls_from(self, thread_ident: int, since: int = 0) -> list[str]:
        return [n for tid, n in self.calls_since(since) if tid == thread_ident]

    def call_count(self) -> int:
        with self._lock:
            return self._n_calls


def switching_load(rng: random.Random, seconds: float = 400.0) -> list[tuple[float, float]]:
    """Piecewise power for ``SimGpu.power``: idle (78–130 W) and busy (600–700 W) in turns
    of 0.05–1.5 s and 0.2–2 s (requests coming and going)."""
    load, t, busy = [], 0.0, False
    while t < seconds:
        load.append((t, rng.uniform(600, 700) if busy else rng.uniform(78, 130)))
        t += rng.uniform(0.2, 2.0) if busy else rng.uniform(0.05, 1.5)
        busy = not busy
    return load


class FakeClockRig:
    """The real ``Sampler`` on one simulated counter, on a fake clock, one read per
    ``step()`` at the time the sampler's own schedule (``Sampler.schedule``) asks for: the
    phase tracking and read scheduling run as in the server, minutes in a second.

    A read takes 1–4 ms before its value is latched and 0.5–2 ms after (5 % of reads 12 ms
    more: NVML on an H200 takes 3–17 ms). ``stalls``: the probability that the sampler
    thread is held 20–150 ms before, and again after, a read (a loaded host; drawn from
    ``stall_rng``). ``jitter``: each counter update moved by up to ± this. ``latch`` is the
    latest read's latch instant, ``starts`` every read's start.
    """

    def __init__(self, period: float, seed: int = 1, *, power: float | list[tuple[float, float]] = 300.0,
                 stalls: float = 0.0, stall_rng: random.Random | None = None, jitter: float = 0.0):
        from .sampler import Reading, Sampler  # the sampler needs nothing from here

        self._reading = Reading
        self.clock = [1000.0]
        self.period = period
        self.sim = SimulatedNvml([SimGpu(power=power, update_period_s=period, update_jitter_s=jitter)],
                                 clock=lambda: self.clock[0])
        self.rng = random.Random(seed)
        self.stalls = stalls
        self.stall_rng = stall_rng if stall_rng is not None else random.Random(seed + 100)
        self.latch = 0.0
        self.starts: list[float] = []
        self.s = Sampler(self._read, mode="counter", period_s=0.1, fast_period_s=0.05, floor_s=0.05,
                         clock=lambda: self.clock[0])
        self.nxt = self.clock[0]

    def _stall(self) -> None:
        if self.stalls and self.stall_rng.random() < self.stalls:
            self.clock[0] += self.stall_rng.uniform(0.02, 0.15)

    def _read(self):
        self._stall()
        self.clock[0] += self.rng.uniform(0.001, 0.004)
        v = self.sim.nvmlDeviceGetTotalEnergyConsumption(0)
        self.latch = self.clock[0]
        self.clock[0] += self.rng.uniform(0.0005, 0.002) + (self.rng.random() < 0.05) * 0.012
        self._stall()
        return self._reading(float(v))

    def step(self) -> None:
        self.clock[0] = max(self.clock[0], self.nxt)
        last = self.clock[0]
        self.starts.append(last)
        self.s.sample_once()
        self.nxt = self.s.schedule(last, self.nxt)

    def wake(self, at: float) -> None:
        """The sampler thread woken at ``at`` (by ``hurry``, or a caller starting to wait
        for a point) before its next read: it plans again, as ``Sampler._run`` does."""
        if self.starts:  # (before the first read there is no plan to change)
            self.clock[0] = max(self.clock[0], min(at, self.nxt))
            self.nxt = self.s.rescheduled(self.starts[-1], self.nxt)

    def phase_misses_update(self, tol: float = 0.002) -> bool | None:
        """None without a confident phase; else whether the true update lies more than
        ``tol`` outside the phase's interval (a hard bound the sampler places reads by)."""
        ph = self.s.phase.phase
        if ph is None or not ph.confident:
            return None
        off = ph.at - self.update_before(ph.at + self.period / 2)
        return not (ph.lo - ph.at - tol <= off <= ph.hi - ph.at + tol)

    def update_before(self, t: float) -> float:
        """The counter's last true update at or before ``t``."""
        return self.sim.last_update(0, t)
