"""Background sampler: one thread per sensor, a ring buffer, and the energy curve.

The thread reads its sensor about every ``period_s`` (never closer than ``floor_s``;
``schedule`` decides when) and keeps raw samples
``(t_monotonic, value, temperature_c, event_reasons)``. From them it keeps *points*
``(t, cumulative_energy_mj)`` that the attribution interpolates between:

* ``counter`` mode (NVML total energy counter): the counter only changes at its own
  updates (~100 ms), so a point is made where the value changed. The update fell
  between the two reads around the change; a ``PhaseTracker`` (phase.py) fits one
  periodic update clock to those brackets and times the point at its estimate (the
  bracket's midpoint while no confident phase is known). With a phase, reads come just
  after the predicted updates while a request's window is open or awaits its end point
  (``hurry``), and at varied offsets under one period apart otherwise, so that the
  brackets keep the phase narrow. A counter that goes
  backwards (driver reload, GPU reset) opens a *gap*: the energy across it is unknown,
  and windows touching it are reported unavailable.
* ``power`` mode (no counter): NVML's ~1 s average power is integrated (trapezoids);
  every sample is a point. Approximate.
* ``cumulative`` mode (RAPL): an exact, finely updated cumulative value; every sample
  is a point.

Requests never call the sensor: they read this buffer (``view``) under a lock.
"""
from __future__ import annotations

import bisect
import random
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

from .phase import PhaseTracker

MIN_PERIOD_S = 0.05  # energy.md rule 2: never faster than 50 ms on real hardware
READ_GUARD_S = 0.002  # a phase-locked read aims this far past the latest possible update
PROBE_EVERY = 8       # while hurrying on a known phase: every 8th update, read just before it
MISPREDICTED = 2      # phase-placed reads that contradict the phase, of the last CHECKS that tested it: restart it
CHECKS = 4


class ReadError(Exception):
    """A sensor read failed; ``reason`` is for people."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Reading:
    value: float  # counter/cumulative: mJ; power mode: W
    temperature_c: float | None = None
    event_reasons: int | None = None


@dataclass
class View:
    """A copy of what a window needs, taken under the sampler's lock."""

    pt_t: list[float]
    pt_e: list[float]  # mJ, continuous across gaps
    # Where a point's update may lie, if that is wider than its estimate's few ms (a long read
    # bracket not timed by one predicted update): the error bound takes both steps beside it.
    pt_lo: list[float]
    pt_hi: list[float]
    s_t: list[float]
    s_temp: list[float | None]
    s_reasons: list[int | None]
    s_power: list[float | None]  # power mode: each read's ~1 s average power, W (else None)
    gaps: list[tuple[float, float, str]]
    resolution_mj: float | None
    update_s: float | None
    first_t: float | None
    oldest_t: float | None


@dataclass(frozen=True)
class _NextRead:
    """A planned read. Only the one that will run is committed (``Sampler._commit``): a
    wake-up plans again, and keeps the earlier read if it is sooner."""

    at: float
    # "locked": just after a predicted update; "pre": one floor period before a locked
    # read; "probe": just before an update; "plain": not placed by the phase.
    kind: str = "plain"
    update: tuple[float, float] | None = None  # the predicted update's [earliest, latest] it is placed by
    probe: int = 0   # the sampler's probe counters once this read is committed
    probes: int = 0


@dataclass
class _Buf:
    pt_t: list[float] = field(default_factory=list)
    pt_e: list[float] = field(default_factory=list)
    pt_lo: list[float] = field(default_factory=list)
    pt_hi: list[float] = field(default_factory=list)
    s_t: list[float] = field(default_factory=list)
    s_temp: list = field(default_factory=list)
    s_reasons: list = field(default_factory=list)
    s_power: list = field(default_factory=list)

    def add_point(self, t: float, e: float, span: tuple[float, float] | None = None) -> None:
        """A point; ``span``: where its update may lie, where wider than ``t``'s error."""
        lo, hi = span or (t, t)
        for lst, x in ((self.pt_t, t), (self.pt_e, e), (self.pt_lo, lo), (self.pt_hi, hi)):
            lst.append(x)


# How far a pin may hold points back, in capacities: beyond it the oldest go anyway (a
# window open that long, 8-16 h at the default capacity, is then refused with a reason).
PIN_LIMIT = 8


class Sampler:
    def __init__(self, read: Callable[[], Reading], *, mode: str = "counter", period_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic, capacity: int = 72_000, name: str = "sensor",
                 fast_period_s: float | None = None, floor_s: float = MIN_PERIOD_S):
        if mode not in ("counter", "power", "cumulative"):
            raise ValueError(mode)
        self._read = read
        self.mode = mode
        self.period_s = period_s
        # While a request's window is open or awaits its end point, reads come at this
        # (shorter, never under the 50 ms floor) period: a counter update is then seen
        # sooner (less time before the response can be sent) and timed more tightly.
        self.fast_period_s = fast_period_s
        self.floor_s = min(floor_s, period_s, fast_period_s or period_s)  # never two reads closer than this
        self.phase = PhaseTracker()
        self._rng = random.Random(0x11E)
        self._probe = 0
        self._probes = 0
        self._last_start: float | None = None  # when the latest read began
        self._last_end: float | None = None  # ... and ended
        self._last_changed = True  # whether it saw a counter update
        self._n_reads = 0
        self._read_s = 0.0
        # CPU time of the sampler thread (the GIL it takes from the front process is the
        # part outside the sensor call): for the shutdown log and benchmarks.
        self._read_cpu_s = 0.0
        self._cpu = (0.0, 0.0, 0.0)  # (thread CPU, of which in sensor calls, wall) at the last read's end
        self._misses = 0  # phase-locked reads (not probes) that found no update yet
        self._checks: deque[bool] = deque(maxlen=CHECKS)  # phase-placed reads: did each contradict the phase
        self._next = _NextRead(0.0)  # the read planned next (then running, then just done)
        self._waiting = 0  # callers blocked in wait_for_point: no probe while they wait
        self._hurry = 0
        self._wake = threading.Event()
        self._clock = clock
        self._cap = capacity  # 72 000 samples = 2 h at 100 ms
        # Points at or after this time are kept (up to PIN_LIMIT x capacity): the meter pins
        # what its ledger has not settled and what open windows still need, so a request
        # longer than the buffer, or a long idle stretch, is measured and accounted whole.
        self._pin: float | None = None
        # Called on the sampler's thread after each read (the meter's periodic settling).
        self.after_read: Callable[[], None] | None = None
        self.name = name
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._buf = _Buf()
        self._gaps: list[tuple[float, float, str]] = []
        self._prev_raw: float | None = None
        self._prev_t: float | None = None
        self._prev_power: float | None = None
        self._offset = 0.0  # keeps pt_e continuous over a counter reset
        self._min_step: float | None = None
        # (time since the previous point, counter updates it spans: 2 where _count_doubles
        # finds a stalled read's change to be two updates, else 1)
        self._intervals: deque[tuple[float, int]] = deque(maxlen=200)
        self._pending: tuple[float, float, bool] | None = None  # see _count_doubles
        self._single_steps: deque[float] = deque(maxlen=4)  # the latest changes that surely held one update
        self._first_t: float | None = None
        self._first_e: float | None = None
        self.last_error = ""
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- thread -------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"llem-energy-{self.name}", daemon=True)
            self._thread.start()

    def hurry(self) -> None:
        """Until the matching ``relax``: counter mode with a known phase, read just after
        each predicted update; otherwise read at ``fast_period_s``."""
        with self._lock:
            self._hurry += 1
        self._wake.set()

    def relax(self) -> None:
        with self._lock:
            self._hurry = max(0, self._hurry - 1)

    def _current_period(self) -> float:
        return self.fast_period_s if self._hurry > 0 and self.fast_period_s else self.period_s

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with self._cond:
            self._cond.notify_all()

    def _next_read(self, last: float, nxt: float) -> _NextRead:
        """The next read, given the last read's start and the plain schedule ``nxt``
        (changes nothing but the random draw: ``_commit`` does)."""
        probe, probes = self._probe, self._probes
        if self.mode != "counter":
            return _NextRead(nxt, probe=probe, probes=probes)
        ph = self.phase.phase
        floor = last + self.floor_s
        if self._hurry > 0 and ph is not None and ph.confident:
            # Just after the first predicted update that the floor allows: a window's
            # end point is then seen a few ms after the counter has it. These reads are a
            # period apart, so their brackets (a period wide) say little about the phase.
            # Now and then, just before an update instead (a probe: the bracket to the read
            # after it has a tight lower side), and as often a read one floor period before
            # a locked read (a pre-read: the locked read's bracket then has a tight upper
            # side). With tight lower sides alone, a period a little too long fitted too.
            if not self._last_changed:
                # A probe or pre-read (or a locked read the update was late for): catch the
                # update as soon as allowed; it is the locked read for the same update.
                return _NextRead(floor, "locked", self._next.update, probe, probes)
            probe = (probe + 1) % PROBE_EVERY
            # The interval [lo, hi] is a hard bound, far wider than the estimate's usual
            # error: aim halfway to its edge (a rare miss costs one floor period).
            late = (ph.hi - ph.at) / 2 + READ_GUARD_S
            if probe == 0 and self._waiting == 0:
                # Just before the update (a tight lower side); every other one done (as
                # reads usually take) before the update's earliest instant: it then finds no
                # update unless the phase is wrong (_check_phase).
                probes += 1
                ahead = READ_GUARD_S
                if probes % 2 == 0:
                    ahead += (ph.at - ph.lo) + (self._read_s / self._n_reads if self._n_reads else 0.0)
                u = ph.next_after(floor + ahead)
                return _NextRead(u - ahead, "probe", (u - (ph.at - ph.lo), u + (ph.hi - ph.at)), probe, probes)
            u = ph.next_after(floor - late)
            update = (u - (ph.at - ph.lo), u + (ph.hi - ph.at))
            locked = u + late
            pre = max(locked - self.floor_s, floor)
            if probe == PROBE_EVERY // 2 and pre + self.floor_s - locked <= READ_GUARD_S:
                # It should see no update; the locked read follows at the floor.
                return _NextRead(pre, "pre", update, probe, probes)
            return _NextRead(locked, "locked", update, probe, probes)
        period = self._period_guess()
        if period is None:
            return _NextRead(nxt, probe=probe, probes=probes)
        # Varied offsets from the updates (brackets at every phase narrow the estimate),
        # spacing under one update period (so a bracket never holds two updates). With no
        # phase known, the guess can be several % long (reads that saw two updates as one
        # change): spacing under 0.75 of it keeps that from feeding on itself, and the
        # narrower brackets tell the period sooner.
        learning = ph is None or not ph.confident
        hi = max(period * (0.75 if self._hurry > 0 or learning else 0.95), self.floor_s)
        lo = max(period * (0.5 if self._hurry > 0 or learning else 0.6), self.floor_s)
        return _NextRead(last + self._rng.uniform(lo, max(lo, hi)), probe=probe, probes=probes)

    def _plan_next(self, last: float, nxt: float) -> _NextRead:
        nr = self._next_read(last, nxt + self._current_period())
        return nr if nr.at >= last + self.floor_s else replace(nr, at=last + self.floor_s)

    def _commit(self, nr: _NextRead) -> float:
        self._next, self._probe, self._probes = nr, nr.probe, nr.probes
        return nr.at

    def schedule(self, last: float, nxt: float) -> float:
        """The next read's time after a read that began at ``last``; ``nxt`` is the
        previous planned time (an absolute schedule: read time does not add up as drift)."""
        return self._commit(self._plan_next(last, nxt))

    def rescheduled(self, last: float, nxt: float) -> float:
        """After a wake-up (``hurry``, or a caller began waiting for a point): the read
        planned for ``nxt`` stays unless the plan made now is sooner; a planned probe
        gives way to a catch while someone waits. (Re-planning used to commit the new plan
        even where the earlier read was kept, so that read was checked as another kind.)"""
        again = self._plan_next(last, last)
        if (self._next.kind == "probe" and self._waiting) or again.at < nxt:
            return self._commit(again)
        return nxt

    def _run(self) -> None:
        nxt = self._clock()
        cpu0, wall0 = time.thread_time(), time.monotonic()
        while not self._stop.is_set():
            last = self._clock()
            self.sample_once()
            if self.after_read is not None:
                try:
                    self.after_read()
                except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop the readings
                    self.last_error = f"after a read: {exc!r}"
            self._cpu = (time.thread_time() - cpu0, self._read_cpu_s, time.monotonic() - wall0)
            nxt = self.schedule(last, nxt)
            if nxt < self._clock():
                nxt = self._clock()
            while not self._stop.is_set():
                delay = nxt - self._clock()
                if delay <= 0:
                    break
                if self._wake.wait(delay):
                    self._wake.clear()
                    nxt = self.rescheduled(last, nxt)

    def sample_once(self) -> None:
        c0 = time.thread_time()
        t0 = self._clock()
        try:
            r = self._read()
        except ReadError as exc:
            with self._cond:
                self.last_error, self.errors = exc.reason, self.errors + 1
                self._cond.notify_all()
            return
        t1 = self._clock()
        self._read_cpu_s += time.thread_time() - c0
        self._n_reads += 1
        self._read_s += t1 - t0
        t = (t0 + t1) / 2  # a read takes ms on NVML; its value is from inside the call
        est = None
        if self.mode == "counter" and self._prev_raw is not None and r.value > self._prev_raw:
            # The phase fit (~0.2–1 ms of Python) runs outside the lock: hurry(), relax() and
            # the request path's readers never wait for it. Only this thread writes what it reads.
            est = self._update_time(self._prev_t, t, t1, t0, r.value - self._prev_raw)
        with self._cond:
            self._add(t, r, t0, est, t1)
            self.last_error = ""
            self._cond.notify_all()

    # -- buffer -------------------------------------------------------------------
    def _point(self, t: float, e: float, span: tuple[float, float] | None = None) -> None:
        """A point in the curve and in the spacing statistics (``_Buf.add_point``: ``span``)."""
        b = self._buf
        if b.pt_t:
            self._intervals.append((t - b.pt_t[-1], 1))
        else:
            self._first_t, self._first_e = t, e
        b.add_point(t, e, span)

    def _add(self, t: float, r: Reading, start: float, est: tuple[float, tuple[float, float] | None] | None,
             end: float) -> None:
        """Under the lock. ``est``: what ``_update_time`` gave a counter increase; ``start``,
        ``end``: the read call's."""
        b = self._buf
        b.s_t.append(t)
        b.s_temp.append(r.temperature_c)
        b.s_reasons.append(r.event_reasons)
        b.s_power.append(r.value if self.mode == "power" else None)
        v, prev, prev_t = r.value, self._prev_raw, self._prev_t
        if self.mode == "power":
            e = 0.0 if not b.pt_e else b.pt_e[-1] + (self._prev_power + v) / 2 * (t - prev_t) * 1000.0
            self._prev_power = v
            self._point(t, e)
        elif prev is None:
            self._point(t, v)
        elif self.mode == "cumulative":
            self._point(t, v)
        elif v > prev:
            step = v - prev
            self._min_step = step if self._min_step is None else min(self._min_step, step)
            self._point(est[0], v + self._offset, est[1])
            self._count_doubles(t - (self._last_start if self._last_start is not None else prev_t), step)
        elif v < prev:
            # Counter went backwards: energy since the last update before it is unknown.
            last = b.pt_t[-1] if b.pt_t else prev_t
            self._gaps.append((last, t, f"the GPU energy counter went backwards (from {prev:.0f} mJ to {v:.0f} mJ), "
                                        "probably a driver reload or GPU reset: energy across it is unknown"))
            self._offset += prev - v
            b.add_point(t, v + self._offset)
        self._last_changed = prev is None or v != prev
        if self._next.kind == "locked" and not self._last_changed:
            self._misses += 1
        self._check_phase(start, end)
        self._last_end = end
        self._prev_raw, self._prev_t = v, t
        self._last_start = start
        self._trim()

    def _check_phase(self, start: float, end: float) -> None:
        """After a phase-placed read, test the phase: a read done wholly before the predicted
        update's earliest instant that found an update, or begun after its latest that found
        none, contradicts it, where the read before could not have seen that update (a
        stalled read can); a probe that found none confirms it. Two contradictions among the
        last four tests: restart the phase. (A locked read that finds an update proves
        little: with the phase a period minus a few ms early, every locked read sees the
        update before the one predicted.) In simulation, an early wrong estimate pinned a
        period 0.1 % off whose aliases kept fitting the pinned range for minutes, each
        locked read seeing the update before the one it was placed after."""
        kind, plan, ph = self._next.kind, self._next.update, self.phase.phase
        if plan is None or ph is None or self._last_end is None:
            return
        if kind in ("pre", "probe") and self._last_changed:
            if end >= plan[0] or self._last_start <= plan[1] - ph.period:
                return
            self._checks.append(True)
        elif kind == "locked" and not self._last_changed:
            if start <= plan[1] or self._last_end >= plan[0]:
                return
            self._checks.append(True)
        elif kind == "probe" and not self._last_changed:
            self._checks.append(False)
        else:
            return
        if sum(self._checks) >= MISPREDICTED:
            self._checks.clear()
            self.phase.restart(keep_period=True)

    def _count_doubles(self, bracket: float, step: float) -> None:
        """After a counter change's point: settle whether the change before it spanned two
        updates. A read bracket about a period long or longer (a stalled or late read) can
        hold two, seen as one change; its step is then about twice both neighbours' (a load
        change moves the steps for good, not for one change). Such an interval counts two
        periods in ``_update_period``."""
        p = self._pending  # (the step before that change, its step, whether its bracket was long)
        if p is not None and p[2] and len(self._intervals) >= 2 and p[1] >= 1.6 * p[0] and p[1] >= 1.6 * step:
            self._intervals[-2] = (self._intervals[-2][0], 2)
        long = len(self._intervals) >= 5 and bracket >= 0.8 * statistics.median(x for x, _ in self._intervals)
        self._pending = (p[1] if p is not None else step, step, long)

    def _update_time(self, prev_t: float, t: float, end: float, start: float,
                     step: float) -> tuple[float, tuple[float, float] | None]:
        """When the (latest) update between the previous read (began at ``_last_start``)
        and this one (``start`` to ``end``) happened, and, where that is not sure (a long
        bracket not timed by one predicted update), the bracket: the point's span."""
        b = self._buf
        lo = self._last_start if self._last_start is not None else prev_t  # the previous read's start
        ph = self.phase.phase
        period = self._period_guess()
        est = (prev_t + t) / 2  # no period known yet: the midpoint
        span = (lo, end)  # unless the update is timed surely (below)
        if period is not None:
            # Only a bracket shorter than one period surely holds a single update.
            if end - lo < 0.98 * period:
                est, span = self.phase.add(lo, end, period), None
                self._single_steps.append(step)
            elif ph is not None and ph.confident:
                # A longer bracket (phase-locked reads come a period apart). The updates it
                # may hold are those predicted after the previous point's and up to this
                # read's end; the value is the counter at the latest one it holds. One
                # candidate: it is that one (the value changed). Several: the latest, if
                # it was predicted before this read began (the value is latched inside the
                # call), else the one the step's size counts to (_counted_update), else
                # unknown: the midpoint. Only the first two are sure; the others keep the
                # bracket as the point's span (the error bound widens where it holds an edge).
                after = max(lo, b.pt_t[-1]) if b.pt_t else lo
                cands = []
                u = ph.next_after(after)
                while u <= end and len(cands) < 4:
                    cands.append(u)
                    u += ph.period
                if len(cands) == 1:
                    est, span = min(max(cands[0], lo), end), None
                elif cands and cands[-1] + (ph.hi - ph.at) <= start:
                    est, span = cands[-1], None
                elif len(cands) > 1 and b.pt_t:
                    est = self._counted_update(cands, step, b.pt_t[-1], ph.period) or est
        return (max(est, b.pt_t[-1] + 1e-6) if b.pt_t else est), span

    def _counted_update(self, cands: list[float], step: float, prev: float, period: float) -> float | None:
        """Of several predicted updates a read may have latched after, the one the counter
        step counts to: at steady power each update adds about the same energy, so a step
        about n times the recent single-update steps (four, within 30 % of each other) ends
        at the n-th update after the previous point (at ``prev``). None where the power was
        not steady or the ratio is not near a whole number. (Simulated, busy with one read
        in ten stalled: window energy error 2.2 % -> 0.3 % on average; with the load
        switching too, a wrong count sometimes: 0.05 % of points a period off, bounded.)"""
        if len(self._single_steps) < self._single_steps.maxlen:
            return None
        ss = sorted(self._single_steps)
        if ss[-1] > 1.3 * ss[0]:
            return None
        m = step / ((ss[1] + ss[2]) / 2)
        n = round(m)
        if abs(m - n) >= 0.25:
            return None
        return next((c for c in cands if round((c - prev) / period) == n), None)

    def pin(self, t: float | None) -> None:
        """Keep the points from ``t`` on (None: no pin)."""
        self._pin = t

    def _trim(self) -> None:
        b = self._buf
        limit = PIN_LIMIT * self._cap
        keep_pts = keep_samples = self._pin
        if keep_pts is not None and len(b.pt_t) > limit:
            # Held back too long: the oldest points go anyway, and the samples (temperatures,
            # throttling) of the same time with them, so both lists cover the same stretch.
            keep_pts = keep_samples = max(keep_pts, b.pt_t[len(b.pt_t) - limit])
        if keep_samples is not None and len(b.s_t) > limit:
            # Reads can outnumber points many times (a counter that stopped changing adds
            # none): the samples are held to the same limit on their own.
            keep_samples = max(keep_samples, b.s_t[len(b.s_t) - limit])
        for ts, others, keep_from in ((b.s_t, (b.s_temp, b.s_reasons, b.s_power), keep_samples),
                                      (b.pt_t, (b.pt_e, b.pt_lo, b.pt_hi), keep_pts)):
            if len(ts) > 2 * self._cap:  # amortised: lists stay bisectable
                cut = len(ts) - self._cap
                if keep_from is not None:
                    # a few points before it: interpolation there needs its neighbours
                    cut = min(cut, bisect.bisect_right(ts, keep_from) - 4)
                    if cut < self._cap // 2:
                        continue  # too few to free: wait for the pin to move
                del ts[:cut]
                for o in others:
                    del o[:cut]

    def stats(self) -> dict:
        """How the sampler has been doing (for the shutdown log and benchmarks)."""
        cpu, read_cpu, wall = self._cpu
        with self._lock:
            ph = self.phase.phase
            return {"reads": self._n_reads, "points": len(self._buf.pt_t),
                    "mean_read_ms": round(self._read_s / self._n_reads * 1e3, 3) if self._n_reads else None,
                    "phase_period_ms": round(ph.period * 1e3, 4) if ph else None,
                    "phase_width_ms": round(ph.width * 1e3, 3) if ph else None,
                    "phase_restarts": self.phase.restarts, "phase_restarts_no_fit": self.phase.restarts_no_fit,
                    "locked_read_misses": self._misses,
                    # the thread's CPU per second of its life, and the part inside sensor calls
                    "cpu_ms_per_s": round(cpu / wall * 1e3, 3) if wall else None,
                    "read_cpu_ms_per_s": round(read_cpu / wall * 1e3, 3) if wall else None}

    # -- readers (request path: no sensor call) -----------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_for_point(self, t: float, deadline: float) -> bool:
        """Block until a point at/after ``t`` exists (the next counter update), or until
        ``deadline`` (real ``time.monotonic()`` seconds: how long a caller may block)."""
        with self._cond:
            if self._buf.pt_t and self._buf.pt_t[-1] >= t:
                return True
            self._waiting += 1
            self._wake.set()  # a probe planned for the next read becomes a catch
            try:
                while not self._buf.pt_t or self._buf.pt_t[-1] < t:
                    left = deadline - time.monotonic()
                    if left <= 0 or self._stop.is_set() or not self.running:
                        return False
                    self._cond.wait(min(left, 0.05))
                return True
            finally:
                self._waiting -= 1

    def wait_phase(self, deadline: float) -> bool:
        """Counter mode: block until the update clock is known to within ``CONFIDENT_S``
        (edges timed to a few ms instead of the midpoint's ±50 ms), or until ``deadline``
        (``time.monotonic()``). True when known; other modes: True at once."""
        while self.mode == "counter":
            ph = self.phase.phase
            if ph is not None and ph.confident:
                return True
            if time.monotonic() >= deadline or self._stop.is_set() or not self.running:
                return False
            time.sleep(0.05)
        return True

    @property
    def interruptions(self) -> int:
        """Times the counter went backwards so far (a reset): energy across one is unknown."""
        with self._lock:
            return len(self._gaps)

    def last_point(self) -> tuple[float, float] | None:
        with self._lock:
            b = self._buf
            return (b.pt_t[-1], b.pt_e[-1]) if b.pt_t else None

    def first_point(self) -> tuple[float, float] | None:
        with self._lock:
            return None if self._first_t is None else (self._first_t, self._first_e)

    def _period_guess(self) -> float | None:
        """The update period: the current phase's, else the last confident one, else the
        mean spacing of counter points (it only seeds the fit, which tries ±1 % around it)."""
        ph = self.phase.phase
        return ph.period if ph is not None else self.phase.known_period or self._update_period()

    def _update_period(self) -> float | None:
        # Recent intervals between points over the updates they span: midpoint timing makes
        # single intervals jitter by a sample period, their sum does not (it telescopes).
        # A stalled read's change can span two updates (_count_doubles counts them: left
        # as one, they biased this 8–16 % long under stalls, and the fit then locked onto a
        # wrong period). Longer gaps (a starved thread) are left out.
        if self.phase.phase is not None:
            return self.phase.phase.period
        if not self._intervals:
            return None
        med = statistics.median(x for x, _ in self._intervals)
        kept = [(x, k) for x, k in self._intervals if x <= 3 * med]
        return sum(x for x, _ in kept) / sum(k for _, k in kept)

    def view(self, t0: float, t1: float) -> View:
        """Points bracketing [t0, t1] and the samples inside it."""
        with self._lock:
            b = self._buf
            # Two more points each side than the edges need: a point there may hold a long
            # bracket that reaches across an edge (edge_step_mj looks at them).
            i = max(bisect.bisect_right(b.pt_t, t0) - 3, 0)
            j = bisect.bisect_left(b.pt_t, t1) + 3
            k = max(bisect.bisect_right(b.s_t, t0) - 1, 0)
            m = bisect.bisect_left(b.s_t, t1) + 1
            return View(
                pt_t=b.pt_t[i:j], pt_e=b.pt_e[i:j], pt_lo=b.pt_lo[i:j], pt_hi=b.pt_hi[i:j],
                s_t=b.s_t[k:m], s_temp=b.s_temp[k:m], s_reasons=b.s_reasons[k:m],
                s_power=b.s_power[k:m],
                gaps=[g for g in self._gaps if g[0] < t1 and g[1] > t0],
                resolution_mj=self._min_step,
                update_s=self._update_period(),
                first_t=self._first_t,
                oldest_t=b.pt_t[0] if b.pt_t else None,
            )
