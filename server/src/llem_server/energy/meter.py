"""The energy meter the service uses: per-request GPU energy from NVML's counter.

Method (shared/spec/energy.md):

* **The counter is the truth.** One background sampler thread per GPU reads
  ``nvmlDeviceGetTotalEnergyConsumption`` about every 100 ms (never faster than 50 ms)
  into a ring buffer with ``time.monotonic()`` timestamps. The counter changes only at its
  own updates (~100 ms on Hopper); each change becomes a point timed at the midpoint of
  the two reads around it, and energy at any instant is linearly interpolated between
  points. GPUs without the counter integrate NVML's ~1 s average power instead, marked
  approximate. Nothing on the request path calls NVML: windows only read the buffer.
* **Windows** are stamped with ``time.monotonic()`` in the worker process (CLOCK_MONOTONIC
  is system-wide on Linux) and registered here with ``open_window``/``close_window``.
  ``report`` waits, on the calling thread and not on the device, for the first counter
  update past the window's end, then computes; the device is already running the next job.
* **Attribution** (rule 3): an exclusive window gets the curve's energy over it. Where
  windows overlap on a GPU, the time axis is cut at every start and end; each piece's
  energy is shared equally among the windows active in it (by time; by token rate with
  ``split="tokens"`` when every window in the piece is closed with a token count), and
  pieces with no window go to an idle bucket. The ledger (attributed + idle) therefore
  equals the counter delta; tests check it within one counter step.
* **Uncertainty**: at each edge, the energy of the counter step containing it, or of the
  step across the nearer point where that is larger, or of both steps beside a point whose
  update a stalled read left anywhere in a bracket holding the edge
  (``attribution.edge_step_mj``): about one update's energy per edge. Windows under 1 s
  or with fewer than 10 updates are low-confidence.
* **Failures are never zeros**: every absence carries a reason (no driver, no GPU, NVML
  error, no counter and no power reading, counter went backwards, sampler stalled).
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from . import nvml as _nvml
from .attribution import Span, edge_step_mj, energy_at, split, updates_inside
from .baseline import STALE_AFTER_S, BaselineResult
from .processes import ProcessWatch
from .rapl import RaplReader, RaplUnavailable
from .sampler import MIN_PERIOD_S, PIN_LIMIT, Reading, ReadError, Sampler

METHOD_COUNTER = "nvml_total_energy_counter"
METHOD_POWER = "nvml_power_average_integrated (approximate)"
METHOD_RAPL = "rapl_package_energy"
SIMULATED_PREFIX = "simulated:"

SHORT_WINDOW_S = 1.0
MIN_UPDATES = 10
COUNTER_UNIT_MJ = 1.0  # nvmlDeviceGetTotalEnergyConsumption counts whole millijoules
PHASE_WAIT_S = 5.0  # a baseline waits at most this long for the sampler to learn the update clock
TEMP_DRIFT_C = 10.0
POWER_AVG_SPAN_S = 1.0  # NVML's average power covers about the last second
POWER_SHORT_WINDOW_S = 10.0  # counter-less GPUs: windows shorter than 10 spans are low-confidence
ABANDON_AFTER_S = 300.0  # a closed window unreported this long is given up
SETTLE_EVERY_S = 10.0  # the ledger settles at least this often, requests or not (its horizon pins the samples)
POWER_AVG_REL = 0.015  # counter vs integrated average agreed within 1.5 % over >= 8 s (energy.md)

_ids = itertools.count(1)


@dataclass
class SensorState:
    available: bool
    reason: str = ""
    method: str = ""
    # Why other processes on this GPU cannot be seen ('' while NVML lists them): then
    # ENERGY_OTHER_PROCESSES is never sent for it.
    processes_unseen: str = ""


@dataclass
class Window:
    request_id: str
    devices: tuple[int, ...]
    t_start: float
    t_end: float | None = None
    output_tokens: int | None = None
    id: int = field(default_factory=lambda: next(_ids))
    reported: bool = False
    closed_at: float | None = None
    hurried: list = field(default_factory=list)  # samplers reading fast for this window


@dataclass
class CpuReport:
    available: bool
    reason: str = ""
    energy_j: float | None = None
    domains: list[str] = field(default_factory=list)


@dataclass
class DeviceReport:
    index: int
    name: str | None = None
    uuid: str | None = None
    energy_j: float = 0.0
    avg_power_w: float = 0.0
    power_limit_w: float | None = None
    persistence_mode: bool | None = None
    temperature_start_c: float | None = None
    temperature_end_c: float | None = None
    counter_resolution_mj: float | None = None
    counter_update_ms: float | None = None
    counter_updates: int = 0
    baseline_power_w: float | None = None
    uncertainty_j: float = 0.0
    exclusive: bool = True


@dataclass
class DeviceReading:
    """A GPU's cumulative energy at one instant (``EnergyMeter.read``)."""
    index: int
    available: bool
    reason: str = ""
    energy_j: float | None = None  # counter energy at the instant, from an arbitrary zero
    uncertainty_j: float | None = None
    method: str = ""
    uuid: str = ""
    interruptions: int = 0  # counter resets seen so far: a difference across one is unknown


@dataclass
class EnergyReport:
    available: bool
    reason: str = ""
    absence: str = ""  # when not available: NOT_METERED or MEASUREMENT_FAILED (llem.v1.EnergyAbsence)
    method: str = ""
    attribution: str = ""  # "exclusive", "shared_by_time", "shared_by_tokens"
    exclusive: bool = False
    total_j: float | None = None
    duration_s: float = 0.0
    uncertainty_j: float = 0.0
    low_confidence: bool = False
    approximate: bool = False
    devices: list[DeviceReport] = field(default_factory=list)
    baseline_power_w: float | None = None
    adjusted_j: float | None = None
    adjusted_uncertainty_j: float | None = None
    joules_per_output_token: float | None = None
    output_tokens: int | None = None
    provenance: dict[str, str] = field(default_factory=dict)
    cpu: CpuReport = field(default_factory=lambda: CpuReport(False, "not measured"))
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def method_label(self) -> str:
        """E.g. "nvml_total_energy_counter/exclusive" (the proto's Energy.method)."""
        return f"{self.method}/{self.attribution}" if self.method and self.attribution else self.method


@dataclass
class _Dev:
    index: int
    state: SensorState
    static: dict[str, Any] = field(default_factory=dict)
    sampler: Sampler | None = None
    windows: list[Window] = field(default_factory=list)
    acct_t: float | None = None
    settled_at: float | None = None  # clock time of the last settle
    busy_since: float | None = None  # a job runs on the device since then (hold)
    procs: ProcessWatch | None = None  # other processes on the GPU (None: NVML cannot list them)
    attr_mj: float = 0.0
    idle_mj: float = 0.0


def _edge_power_w(v, t: float) -> float:
    """The highest average power read within 0.3 s of ``t`` (else the nearest read), W."""
    reads = [(abs(ts - t), p) for ts, p in zip(v.s_t, v.s_power) if p is not None]
    near = [p for dt, p in reads if dt <= 0.3]
    return max(near) if near else min(reads, default=(0.0, 0.0))[1]


def _dur_h(t0: float, t1: float) -> str:
    return f"{(t1 - t0) / 3600:.1f} h"


def _pending(w: Window, now: float) -> bool:
    """Still to be reported: open, or closed less than ABANDON_AFTER_S ago (a closed window
    never reported for that long is abandoned, not a reason to hold samples or the ledger)."""
    return not w.reported and (w.t_end is None or now - (w.closed_at or now) < ABANDON_AFTER_S)


def _nearest(ts: list[float], vals: list, t: float):
    best, best_d = None, None
    for x, v in zip(ts, vals):
        if v is not None and (best_d is None or abs(x - t) < best_d):
            best, best_d = v, abs(x - t)
    return best


def _edges_mj(v, t0: float, t1: float) -> float:
    """The error bound of the energy over [t0, t1] on a sampler's ``View``: a step at each edge."""
    return (edge_step_mj(v.pt_t, v.pt_e, t0, v.pt_lo, v.pt_hi)
            + edge_step_mj(v.pt_t, v.pt_e, t1, v.pt_lo, v.pt_hi))


def _counted_power(v, t0: float, t1: float, period: float | None,
                   period_err: float) -> tuple[float | None, float]:
    """Idle power over whole counter updates inside [t0, t1]: (watts, bound), or (None, 0)
    without a pinned update period or at least 5 whole updates. The counter is exact at
    its updates; their spacing is a whole number of periods, counted from the points'
    times (right while their errors stay under a quarter period)."""
    if not period:
        return None, 0.0
    inside = [k for k, t in enumerate(v.pt_t) if t0 <= t <= t1]
    if len(inside) < 2:
        return None, 0.0
    i, j = inside[0], inside[-1]
    span = v.pt_t[j] - v.pt_t[i]
    n = round(span / period)
    if n < 5 or abs(span - n * period) > period / 4:
        return None, 0.0
    dt = n * period
    watts = (v.pt_e[j] - v.pt_e[i]) / 1000.0 / dt
    # The counter's unit (1 mJ) at each end, and the period's own error: the fit's claim
    # (pinned by estimates ≥ 100 updates apart: ~0.02 %), plus how far the points' own
    # spacing is from it (their timing errors over n periods: small for a long baseline;
    # on a loaded host, a pinned period 0.1 % off with a 0.08 % claim was seen).
    err = period_err + abs(span / n - period)
    return watts, 2 * COUNTER_UNIT_MJ / 1000.0 / dt + abs(watts) * err / period


class EnergyMeter:
    def __init__(self, devices: list[int], *, nvml: Any = None, period_s: float = 0.1,
                 rapl_root: str | None = "/sys/class/powercap", versions: dict[str, str] | None = None,
                 clock: Callable[[], float] = time.monotonic, split: str = "time",
                 min_period_s: float = MIN_PERIOD_S, registration_grace_s: float = 2.0,
                 capacity: int = 72_000, unavailable_reason: str = "", simulated: bool = False):
        # min_period_s: tests lower it for a fast simulator; real hardware keeps 50 ms.
        # registration_grace_s: how late (after its start) a window may still be registered
        # before the ledger has already settled that time.
        self._clock = clock
        # A simulated counter (--energy-backend simulated): every figure says so in its method
        # and a warning, so that fake joules cannot be filtered in with measured ones.
        self._simulated = simulated
        self._period = max(period_s, min_period_s)
        self._fast_period = max(period_s / 2, min_period_s)
        self._split = split
        self._grace = registration_grace_s
        self._versions = dict(versions or {})
        self._lock = threading.Lock()
        self._devs: dict[int, _Dev] = {}
        self._baselines: dict[int, BaselineResult] = {}
        self._started = False
        self._gpu_reason = unavailable_reason
        self._system: dict[str, str] = {}
        self._session = None
        if devices and not unavailable_reason:
            self._session = _nvml.open_session(nvml)
            if self._session.ok:
                self._system = _nvml.system_info(self._session.nvml)
        for idx in devices:
            self._devs[idx] = self._open_device(idx, capacity)
        self._cpu_state = SensorState(False, "", "")
        self._cpu_sampler: Sampler | None = None
        self._cpu_windows: dict[int, Window] = {}  # not yet reported: they pin the RAPL samples
        self._cpu_domains: list[str] = []
        if rapl_root is None:
            # Metering switched off: no CPU sampler either, so no report waits for one.
            self._cpu_state = SensorState(False, "CPU energy metering is switched off on this server", "")
            return
        try:
            rapl = RaplReader(rapl_root)
            self._cpu_sampler = Sampler(rapl.read, mode="cumulative", period_s=self._period, clock=clock,
                                        capacity=capacity, name="rapl", fast_period_s=self._fast_period)
            self._cpu_domains = rapl.domains
            self._cpu_state = SensorState(True, "", METHOD_RAPL)
        except RaplUnavailable as exc:
            self._cpu_state = SensorState(False, exc.reason, "")

    @classmethod
    def unavailable(cls, reason: str, **kw: Any) -> "EnergyMeter":
        """A meter with no GPU (CPU-only server): every report is unavailable with ``reason``."""
        return cls([], unavailable_reason=reason, **kw)

    def _open_device(self, idx: int, capacity: int) -> _Dev:
        s = self._session
        if s is None or not s.ok:
            return _Dev(idx, SensorState(False, s.reason if s else self._gpu_reason))
        try:
            reader = _nvml.DeviceReader(s.nvml, idx)
        except _nvml.NvmlFailure as f:
            return _Dev(idx, SensorState(False, f.reason))
        static = reader.static()
        static.update(self._system)
        mode, method = "counter", METHOD_COUNTER
        try:
            reader.energy_mj()
        except _nvml.NvmlFailure as f:
            if f.code != "NVML_ERROR_NOT_SUPPORTED":
                return _Dev(idx, SensorState(False, f"GPU {idx}: {f.reason}"), static)
            try:
                reader.power_w()
                mode, method = "power", METHOD_POWER
            except _nvml.NvmlFailure as g:
                return _Dev(idx, SensorState(
                    False, f"GPU {idx} has no energy sensor: neither the total energy counter nor power usage "
                           f"is readable ({f.code}; {g.code or g.reason})"), static)
        extras = []
        for fn in (reader.temperature_c, reader.event_reasons):
            try:
                fn()
                extras.append(fn)
            except _nvml.NvmlFailure:
                extras.append(None)  # unsupported: don't spend NVML calls on it every sample
        temp_fn, reasons_fn = extras
        value_fn = reader.energy_mj if mode == "counter" else reader.power_w

        def read() -> Reading:
            try:
                v = value_fn()
            except _nvml.NvmlFailure as f:
                raise ReadError(f.reason) from None
            temp = reasons = None
            try:
                temp = temp_fn() if temp_fn else None
                reasons = reasons_fn() if reasons_fn else None
            except _nvml.NvmlFailure:
                pass
            return Reading(v, temp, reasons)

        sampler = Sampler(read, mode=mode, period_s=self._period, clock=self._clock, capacity=capacity,
                          fast_period_s=self._fast_period,
                          name=f"gpu{idx}")
        procs: ProcessWatch | None = ProcessWatch(idx, reader.compute_pids, self._clock)
        unseen = ""
        try:
            reader.compute_pids()
        except _nvml.NvmlFailure as f:
            if f.code in ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION"):
                procs = None  # for good; else a later listing may work
                unseen = f"GPU {idx}: {f.reason}: other processes on it go unseen"
        dev = _Dev(idx, SensorState(True, "", method, unseen), static, sampler, procs=procs)
        sampler.after_read = lambda: self._housekeep(dev)
        return dev

    def _housekeep(self, d: _Dev) -> None:
        """After each read, on the sampler's thread: list the GPU's processes about once a
        second; settle the ledger now and then even with no request reported (it pins the
        sampler's points from its horizon on, so an idle stretch must not hold them)."""
        if d.procs is not None:
            d.procs.poll()
        if d.settled_at is None or self._clock() - d.settled_at >= SETTLE_EVERY_S:
            self._settle(d)
            with self._lock:
                self._pin_cpu()  # a window abandoned on an idle server must not hold the RAPL samples

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        for d in self._devs.values():
            if d.sampler:
                d.sampler.start()
        if self._cpu_sampler:
            self._cpu_sampler.start()
        self._started = True

    def sample_once(self) -> None:
        """Take one reading on every sensor now, on this thread (tools and deterministic
        tests drive the meter this way; the sampler threads do it every period)."""
        for d in self._devs.values():
            if d.sampler:
                d.sampler.sample_once()
                self._housekeep(d)
        if self._cpu_sampler:
            self._cpu_sampler.sample_once()

    def close(self) -> None:
        for d in self._devs.values():
            if d.sampler:
                d.sampler.stop()
        if self._cpu_sampler:
            self._cpu_sampler.stop()
        s = self._session
        if s is not None and s.ok:
            try:
                s.nvml.nvmlShutdown()
            except Exception:
                pass

    def set_server_pids(self, pids: Callable[[], dict[int, int]]) -> None:
        """This server's workers as {pid: GPU index}, read when a window is judged: a GPU's
        own worker is not "another process" (processes.py)."""
        for d in self._devs.values():
            if d.procs is not None:
                d.procs.server_pids = pids

    # -- info ------------------------------------------------------------------------
    def _label(self, method: str) -> str:
        return f"{SIMULATED_PREFIX}{method}" if self._simulated and method else method

    def sensors(self) -> dict[int, SensorState]:
        out = {}
        for i, d in self._devs.items():
            unseen = d.state.processes_unseen
            if not unseen and d.procs is not None and d.procs.failing:
                unseen = f"GPU {i}: listing its processes fails ({d.procs.failing}): other processes on it go unseen"
            out[i] = SensorState(d.state.available, d.state.reason, self._label(d.state.method), unseen)
        return out

    def cpu_sensor(self) -> SensorState:
        return self._cpu_state

    def device_static(self, index: int) -> dict:
        d = self._devs.get(index)
        if d is None:
            return {"index": index}
        return {**d.static, "index": index, "energy_available": d.state.available,
                "energy_reason": d.state.reason, "energy_method": d.state.method}

    def provenance(self) -> dict[str, str]:
        v = self._versions
        return {"driver_version": self._system.get("driver_version", ""),
                "nvml_version": self._system.get("nvml_version", ""),
                "cuda_driver_version": self._system.get("cuda_driver_version", ""),
                "cuda_version": v.get("cuda", "") or "",
                "torch_version": v.get("torch", "") or "",
                "transformers_version": v.get("transformers", "") or ""}

    # -- windows ---------------------------------------------------------------------
    def open_window(self, devices: list[int], t_start: float, request_id: str) -> Window:
        w = Window(request_id, tuple(devices), t_start)
        with self._lock:
            for i in w.devices:
                d = self._devs.get(i)
                if d is not None and d.state.available:
                    d.windows.append(w)
                    if d.sampler is not None:
                        w.hurried.append(d.sampler)
                    if d.procs is not None:
                        d.procs.soon()
            if self._cpu_sampler is not None:
                w.hurried.append(self._cpu_sampler)
                self._cpu_windows[w.id] = w
                self._pin_cpu()
        for sampler in w.hurried:
            sampler.hurry()
        return w

    def _pin_cpu(self) -> None:
        """(under the lock) Keep the RAPL samples from the oldest unreported window's start; a
        closed one unreported for 5 min is abandoned, as in the ledger."""
        if self._cpu_sampler is None:
            return
        now = self._clock()
        for key, w in list(self._cpu_windows.items()):
            if not _pending(w, now):
                del self._cpu_windows[key]
        self._cpu_sampler.pin(min((w.t_start for w in self._cpu_windows.values()), default=None))

    def hold(self, index: int, since: float | None) -> None:
        """A job runs on device ``index`` since ``since`` (None: none runs). The ledger keeps
        that time unsettled: a load's window is registered only when the load ends, with its
        start in the past, and must not find its time booked as idle."""
        d = self._devs.get(index)
        if d is not None:
            with self._lock:
                d.busy_since = since

    def close_window(self, window: Window, t_end: float, output_tokens: int | None) -> None:
        with self._lock:
            window.t_end = max(t_end, window.t_start)
            window.output_tokens = output_tokens
            window.closed_at = self._clock()

    def discard(self, window: Window) -> None:
        """Forget a window whose request failed: no energy is attributed to it (its time
        goes to idle) and its samplers return to the normal period."""
        with self._lock:
            if window.t_end is None:
                window.t_end = window.t_start
                window.closed_at = self._clock()
            window.reported = True
            hurried, window.hurried = window.hurried, []
            self._pin_cpu()
        for sampler in hurried:
            sampler.relax()

    # -- report ----------------------------------------------------------------------
    def _unavailable(self, window: Window, reason: str, absence: str = "MEASUREMENT_FAILED", **kw: Any) -> EnergyReport:
        """An absent figure; ``absence`` NOT_METERED where this server never meters the device."""
        dur = (window.t_end - window.t_start) if window.t_end is not None else 0.0
        return EnergyReport(False, reason, absence=absence, duration_s=dur, output_tokens=window.output_tokens,
                            provenance=self.provenance(), warnings=[("ENERGY_UNAVAILABLE", reason)], **kw)

    def report(self, window: Window, timeout_s: float = 1.0) -> EnergyReport:
        """Blocking (call from a thread pool): energy of a closed window. Never raises for
        measurement problems: an unavailable report carries the reason."""
        try:
            return self._report(window, timeout_s)
        finally:
            with self._lock:
                window.reported = True
                hurried, window.hurried = window.hurried, []
                self._pin_cpu()
            for sampler in hurried:
                sampler.relax()
            for i in window.devices:
                d = self._devs.get(i)
                if d is not None and d.sampler is not None:
                    self._settle(d)

    def _report(self, window: Window, timeout_s: float) -> EnergyReport:
        deadline = time.monotonic() + timeout_s  # real time: how long this thread may block
        if window.t_end is None:
            return self._unavailable(window, "the energy window was never closed")
        t0, t1 = window.t_start, window.t_end
        cpu = self._cpu_report(t0, t1, deadline)
        if not window.devices:
            return self._unavailable(window, self._gpu_reason or "no GPU in this request's energy window",
                                     "NOT_METERED", cpu=cpu)
        devs = []
        for i in window.devices:
            d = self._devs.get(i)
            if d is None:
                return self._unavailable(window, f"GPU {i} is not metered by this server", "NOT_METERED", cpu=cpu)
            if not d.state.available:
                return self._unavailable(window, d.state.reason, "NOT_METERED", cpu=cpu)
            devs.append(d)
        for d in devs:
            if not d.sampler.wait_for_point(t1, deadline):
                err = d.sampler.last_error
                return self._unavailable(window, (
                    f"GPU {d.index}: no energy counter update after the window's end within {timeout_s:.1f} s"
                    + (f" (last read failed: {err})" if err else
                       " (sampler stalled)" if d.sampler.running else " (sampler not running)")), cpu=cpu)
        dur = t1 - t0
        out: list[DeviceReport] = []
        bl_unc_w: list = []  # each device's baseline bound, beside out
        share_s: list[float] = []  # this window's share of each device's time, beside out
        warnings: list[tuple[str, str]] = []
        shared_tokens = shared_time = False
        approximate = False
        for d in devs:
            v = d.sampler.view(t0, t1)
            if v.first_t is None or t0 < v.first_t:
                return self._unavailable(window, f"GPU {d.index}: the window began before the energy sampler's "
                                                 "first reading", cpu=cpu)
            if v.oldest_t is not None and t0 < v.oldest_t:
                return self._unavailable(window, (
                    f"GPU {d.index}: the window ({_dur_h(t0, t1)}) began before the oldest energy sample kept: "
                    f"samples are held for an open request up to {PIN_LIMIT} x the buffer (8-16 h); split the work into "
                    "shorter requests"), cpu=cpu)
            if v.gaps:
                return self._unavailable(window, f"GPU {d.index}: {v.gaps[0][2]}", cpu=cpu)
            with self._lock:
                spans = [Span(w.id, w.t_start, w.t_end, w.output_tokens) for w in d.windows
                         if w is window or Span(0, w.t_start, w.t_end).overlaps(t0, t1)]
            if not any(s.key == window.id for s in spans):
                spans.append(Span(window.id, t0, t1, window.output_tokens))
            exclusive = len(spans) == 1
            try:
                sp = split(v.pt_t, v.pt_e, spans, t0, t1, by=self._split)
            except ValueError:
                return self._unavailable(window, f"GPU {d.index}: energy samples do not cover the window", cpu=cpu)
            shared_tokens |= sp.by_tokens
            shared_time |= sp.by_time
            e_j = sp.shares_mj.get(window.id, 0.0) / 1000.0
            share_s.append(sp.shares_s.get(window.id, 0.0))
            unc_j = _edges_mj(v, t0, t1) / 1000.0
            avg_w = e_j / dur if dur > 0 else 0.0
            if d.state.method == METHOD_POWER:
                approximate = True
                # Integrating a trailing ~1 s average counts up to 1 s of power from before
                # the window and misses up to 1 s of its end: each at most the average read
                # at that edge (a burst shorter than the span is in the first read after it).
                # The window's own average cannot bound it: it is what the lag hides.
                unc_j += POWER_AVG_SPAN_S * max(_edge_power_w(v, t0), _edge_power_w(v, t1)) + POWER_AVG_REL * e_j
            # Reasons are a state at read time: include the first sample after the end.
            reasons = 0
            for ts, r in zip(v.s_t, v.s_reasons):
                if r is not None and t0 <= ts:
                    reasons |= r
            st = d.static
            bl = self._baselines.get(d.index)
            bl_unc_w.append(bl.uncertainty_w if bl and bl.available else None)
            out.append(DeviceReport(
                index=d.index, name=st.get("name"), uuid=st.get("uuid"), energy_j=e_j, avg_power_w=avg_w,
                power_limit_w=st.get("power_limit_w"), persistence_mode=st.get("persistence_mode"),
                temperature_start_c=_nearest(v.s_t, v.s_temp, t0), temperature_end_c=_nearest(v.s_t, v.s_temp, t1),
                counter_resolution_mj=v.resolution_mj if d.state.method == METHOD_COUNTER else None,
                # A counter-less GPU has no counter updates: its points are power reads.
                counter_update_ms=v.update_s * 1000.0 if v.update_s and d.state.method == METHOD_COUNTER else None,
                counter_updates=updates_inside(v.pt_t, t0, t1) if d.state.method == METHOD_COUNTER else 0,
                baseline_power_w=bl.power_w if bl and bl.available else None,
                uncertainty_j=unc_j, exclusive=exclusive))
            warnings += self._device_warnings(d, out[-1], reasons, bl)
            if d.procs is not None and (others := d.procs.others(t0, t1)):
                warnings.append(("ENERGY_OTHER_PROCESSES", f"{others}: the energy counter measures the whole GPU, "
                                                           "so their energy is in this figure (processes are listed "
                                                           "about once a second)"))
        total = sum(r.energy_j for r in out)
        unc = sum(r.uncertainty_j for r in out)
        exclusive = all(r.exclusive for r in out)
        if approximate:
            # The counter's "10 updates", for a trailing 1 s average: 10 of its spans.
            low = dur < POWER_SHORT_WINDOW_S
            if low:
                warnings.insert(0, ("ENERGY_SHORT_WINDOW",
                                    f"energy window of {dur:.3f} s integrates a ~1 s average power (no counter): "
                                    f"under {POWER_SHORT_WINDOW_S:g} s its edges weigh: {total:.3f} J ± {unc:.3f} J"))
        else:
            min_updates = min(r.counter_updates for r in out)
            low = dur < SHORT_WINDOW_S or min_updates < MIN_UPDATES
            if low:
                warnings.insert(0, ("ENERGY_SHORT_WINDOW",
                                    f"energy window of {dur:.3f} s spans {min_updates} counter update(s) (under "
                                    f"{SHORT_WINDOW_S:g} s or {MIN_UPDATES} updates): {total:.3f} J ± {unc:.3f} J"))
        if not exclusive:
            how = "by token rate" if shared_tokens and not shared_time else "by time"
            warnings.append(("ENERGY_SHARED_WINDOW",
                             f"other requests ran on the same GPU during this one: the shared energy was split {how} "
                             "(energy.md rule 3)"))
        baseline_w = adjusted = adjusted_unc = None
        if all(r.baseline_power_w is not None for r in out):
            baseline_w = sum(r.baseline_power_w for r in out)
            # Idle power over this window's share of each GPU's time (its whole window when
            # exclusive): a shared window's energy is a share, so is the idle energy in it.
            adjusted = total - sum(r.baseline_power_w * s for r, s in zip(out, share_s))
            adjusted_unc = unc + sum(u * s for u, s in zip(bl_unc_w, share_s))
        tokens = window.output_tokens
        if self._simulated:
            warnings.append(("ENERGY_SIMULATED", "this energy comes from a simulated NVML counter "
                                                 "(--energy-backend simulated): a test figure, not a measurement"))
        return EnergyReport(
            available=True, method=self._label(METHOD_POWER if approximate else METHOD_COUNTER),
            attribution="exclusive" if exclusive else (
                "shared_by_tokens" if shared_tokens and not shared_time else "shared_by_time"),
            exclusive=exclusive, total_j=total, duration_s=dur, uncertainty_j=unc, low_confidence=low,
            approximate=approximate, devices=out, baseline_power_w=baseline_w,
            adjusted_j=adjusted, adjusted_uncertainty_j=adjusted_unc,
            joules_per_output_token=total / tokens if tokens else None, output_tokens=tokens,
            provenance=self.provenance(), cpu=cpu, warnings=warnings)

    def _device_warnings(self, d: _Dev, r: DeviceReport, reasons: int,
                         bl: BaselineResult | None) -> list[tuple[str, str]]:
        w = []
        if d.state.method == METHOD_POWER:
            w.append(("ENERGY_APPROXIMATE", f"GPU {d.index} has no energy counter: its energy integrates NVML's "
                                            "~1 s average power (approximate)"))
        if r.persistence_mode is False:
            w.append(("ENERGY_PERSISTENCE_OFF", f"persistence mode is off on GPU {d.index}: the driver may "
                                                "deinitialise between requests, changing idle power and timing "
                                                "(nvidia-smi -pm 1)"))
        if r.temperature_start_c is not None and r.temperature_end_c is not None and \
                abs(r.temperature_end_c - r.temperature_start_c) > TEMP_DRIFT_C:
            w.append(("ENERGY_TEMPERATURE_DRIFT", f"GPU {d.index} went from {r.temperature_start_c:.0f} °C to "
                                                  f"{r.temperature_end_c:.0f} °C during the window (over "
                                                  f"{TEMP_DRIFT_C:g} °C): power depends on temperature"))
        held = [name for bit, name in {**_nvml.THERMAL_REASONS, **_nvml.POWER_REASONS}.items() if reasons & bit]
        if held:
            w.append(("ENERGY_THROTTLED", f"GPU {d.index} clocks were held back during the window: "
                                          + ", ".join(held)))
        if bl is not None and bl.available and bl.other_processes:
            w.append(("ENERGY_BASELINE_OTHER_PROCESSES", f"the baseline behind adjusted_j was measured while "
                                                         f"{bl.other_processes}: adjusted_j subtracts their power "
                                                         "too; measure it again"))
        if bl is not None and bl.available:
            age = self._clock() - bl.measured_monotonic
            if age > STALE_AFTER_S:
                w.append(("ENERGY_BASELINE_STALE", f"the baseline of GPU {d.index} is {age / 3600:.1f} h old "
                                                   "(over 1 h): measure it again"))
        return w

    def _cpu_report(self, t0: float, t1: float, deadline: float) -> CpuReport:
        s = self._cpu_sampler
        if s is None:
            return CpuReport(False, self._cpu_state.reason)
        if not s.wait_for_point(t1, deadline):
            return CpuReport(False, f"no RAPL reading after the window's end{': ' + s.last_error if s.last_error else ''}")
        v = s.view(t0, t1)
        e0, e1 = energy_at(v.pt_t, v.pt_e, t0), energy_at(v.pt_t, v.pt_e, t1)
        if e0 is None or e1 is None:
            if v.first_t is not None and t0 >= v.first_t:
                return CpuReport(False, f"the window ({_dur_h(t0, t1)}) began before the oldest RAPL sample kept "
                                        f"(held for an open request up to {PIN_LIMIT} x the buffer)")
            return CpuReport(False, "the window began before the RAPL sampler's first reading")
        # Package energy over the window, all processes: not split between requests.
        return CpuReport(True, "", (e1 - e0) / 1000.0, list(self._cpu_domains))

    # -- ledger ----------------------------------------------------------------------
    def _settle(self, d: _Dev) -> None:
        """Move the ledger's settled horizon forward and forget windows wholly behind it."""
        lp = d.sampler.last_point()
        if lp is None:
            return
        now = self._clock()
        with self._lock:
            d.settled_at = now
            if d.acct_t is None:
                d.acct_t = d.sampler.first_point()[0]
                d.sampler.pin(d.acct_t)
            h = min(lp[0], now - self._grace)
            if d.busy_since is not None:
                h = min(h, d.busy_since)
            for w in d.windows:
                if _pending(w, now):
                    h = min(h, w.t_start)
            if h <= d.acct_t:
                return
            self._account(d, d.acct_t, h, commit=True)
            d.acct_t = h
            # Open windows start after the horizon (it waits for them): pinning it keeps
            # both the ledger's and their points.
            d.sampler.pin(h)
            d.windows = [w for w in d.windows if not (w.t_end is not None and w.t_end <= h and not _pending(w, now))]

    def _account(self, d: _Dev, t0: float, t1: float, commit: bool) -> tuple[float, float]:
        v = d.sampler.view(t0, t1)
        if not v.pt_t:
            return 0.0, 0.0
        t0 = max(t0, v.pt_t[0])  # an evicted stretch cannot be accounted (buffer too short)
        t1 = min(t1, v.pt_t[-1])
        if t1 <= t0:
            return 0.0, 0.0
        spans = [Span(w.id, w.t_start, w.t_end, w.output_tokens) for w in d.windows]
        sp = split(v.pt_t, v.pt_e, spans, t0, t1, by=self._split)
        attr = sum(sp.shares_mj.values())
        if commit:
            d.attr_mj += attr
            d.idle_mj += sp.idle_mj
        return attr, sp.idle_mj

    def ledger(self, index: int) -> tuple[float, float]:
        """(attributed_j, idle_j) since start: settled totals plus the unsettled tail."""
        d = self._devs.get(index)
        if d is None or d.sampler is None:
            return 0.0, 0.0
        self._settle(d)
        lp = d.sampler.last_point()
        with self._lock:
            if lp is None or d.acct_t is None:
                return 0.0, 0.0
            a, i = self._account(d, d.acct_t, lp[0], commit=False)
            return (d.attr_mj + a) / 1000.0, (d.idle_mj + i) / 1000.0

    def sampler_stats(self, index: int) -> dict | None:
        d = self._devs.get(index)
        return d.sampler.stats() if d is not None and d.sampler is not None else None

    def counter_delta_j(self, index: int) -> float:
        """Counter energy from the first reading to the latest update (gaps excluded)."""
        d = self._devs.get(index)
        if d is None or d.sampler is None:
            return 0.0
        first, last = d.sampler.first_point(), d.sampler.last_point()
        return 0.0 if first is None or last is None else (last[1] - first[1]) / 1000.0

    # -- baseline --------------------------------------------------------------------
    def measure_baseline(self, duration_s: float, cancel: threading.Event | None = None,
                         models_loaded: dict[int, int] | None = None) -> dict[int, BaselineResult]:
        """Blocking; the caller guarantees no request runs on these devices meanwhile.

        ``cancel`` set during the measurement abandons it: the caller no longer holds the
        devices idle, so nothing is stored.
        """
        out: dict[int, BaselineResult] = {}
        live = []
        for i, d in self._devs.items():
            if not d.state.available:
                out[i] = BaselineResult(i, False, d.state.reason)
            elif not d.sampler.running:
                out[i] = BaselineResult(i, False, "the energy sampler is not running (EnergyMeter.start)")
            else:
                live.append(d)
        if not live:
            return out
        deadline = time.monotonic() + 2.0
        for d in live:  # need a point at or before the start
            d.sampler.wait_for_point(-float("inf"), deadline)
        # Right after start-up the counter's update clock is still being learnt: wait for
        # it (a few seconds at most), so both edges are timed to a few ms.
        deadline = time.monotonic() + PHASE_WAIT_S
        for d in live:
            d.sampler.wait_phase(deadline)
        t0 = self._clock()
        if (cancel or threading.Event()).wait(duration_s):
            return {**out, **{d.index: BaselineResult(d.index, False, "cancelled: the devices were no longer held "
                                                                       "idle, so nothing was measured") for d in live}}
        t1 = self._clock()
        unix1 = time.time()  # a baseline's age counts from the end of its measurement
        deadline = time.monotonic() + 2.0
        for d in live:
            if not d.sampler.wait_for_point(t1, deadline):
                out[d.index] = BaselineResult(d.index, False, f"GPU {d.index}: no counter update after the "
                                                              f"baseline ended ({d.sampler.last_error or 'stalled'})")
                continue
            v = d.sampler.view(t0, t1)
            e0, e1 = energy_at(v.pt_t, v.pt_e, t0), energy_at(v.pt_t, v.pt_e, t1)
            if v.gaps:
                res = BaselineResult(d.index, False, f"GPU {d.index}: {v.gaps[0][2]}")
            elif e0 is None or e1 is None:
                res = BaselineResult(d.index, False, f"GPU {d.index}: energy samples do not cover the baseline")
            else:
                # Interpolated edges: about one counter update's energy each.
                power = (e1 - e0) / 1000.0 / (t1 - t0)
                unc = _edges_mj(v, t0, t1) / 1000.0 / (t1 - t0)
                tr = d.sampler.phase  # the period must be pinned: a ±1 % guess can be off by more
                counted, c_unc = _counted_power(v, t0, t1, tr.known_period if tr.known_period_pinned else None,
                                                tr.known_period_err)
                if counted is not None and abs(counted - power) <= unc + c_unc:
                    power, unc = counted, c_unc  # whole updates: far tighter, and it agrees
                res = BaselineResult(d.index, True, "", power, t1 - t0, unix1, t1, self._label(d.state.method),
                                     uncertainty_w=unc, models_loaded=(models_loaded or {}).get(d.index),
                                     other_processes=d.procs.others(t0, t1) if d.procs is not None else "")
                with self._lock:
                    self._baselines[d.index] = res
            out[d.index] = res
        return out

    # -- readings ---------------------------------------------------------------------
    def read(self, timeout_s: float = 2.0) -> tuple[float, dict[int, DeviceReading]]:
        """Blocking (call from a thread pool): each device's cumulative energy as of now,
        interpolated to this instant once the counter has updated past it (~100 ms).

        Two readings bracket a phase (a benchmark's measured phase, the idle time between its
        requests included): its energy is their difference, with one edge's bound at each
        end. Nothing is attributed: requests' windows are unaffected."""
        t = self._clock()
        live = [d for d in self._devs.values() if d.state.available and d.sampler is not None and d.sampler.running]
        for d in live:
            d.sampler.hurry()  # read just after the next predicted update
        try:
            deadline = time.monotonic() + timeout_s
            out: dict[int, DeviceReading] = {}
            for i, d in self._devs.items():
                uuid = str(d.static.get("uuid") or "")
                if not d.state.available:
                    out[i] = DeviceReading(i, False, d.state.reason, uuid=uuid)
                elif d.sampler is None or not d.sampler.running:
                    out[i] = DeviceReading(i, False, "the energy sampler is not running", uuid=uuid)
                elif not d.sampler.wait_for_point(t, deadline):
                    out[i] = DeviceReading(i, False, f"GPU {i}: no counter update after the reading "
                                                     f"({d.sampler.last_error or 'stalled'})", uuid=uuid)
                else:
                    v = d.sampler.view(t, t)
                    e = energy_at(v.pt_t, v.pt_e, t)
                    if e is None or v.gaps:
                        why = v.gaps[0][2] if v.gaps else "energy samples do not cover the reading"
                        out[i] = DeviceReading(i, False, f"GPU {i}: {why}", uuid=uuid)
                    else:
                        unc = edge_step_mj(v.pt_t, v.pt_e, t, v.pt_lo, v.pt_hi)
                        out[i] = DeviceReading(i, True, "", e / 1000.0, unc / 1000.0, self._label(d.state.method),
                                               uuid, d.sampler.interruptions)
            return t, out
        finally:
            for d in live:
                d.sampler.relax()

    def baseline(self, index: int) -> BaselineResult | None:
        """Latest successful baseline of a device, with its age now."""
        with self._lock:
            b = self._baselines.get(index)
        return None if b is None else replace(b, age_s=self._clock() - b.measured_monotonic)
