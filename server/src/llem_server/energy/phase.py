"""When does the GPU energy counter update? A phase estimate from bracketing reads.

NVML's total energy counter changes about every 100 ms, at instants we cannot see: a
read only tells whether an update happened since the previous read. Each observed
change therefore *brackets* one update: it fell after the previous read began (that read
still returned the old value) and before this read ended. Timing the update at the
bracket's midpoint (the simple way) errs by up to half the read spacing (±25–50 ms), and
a window's end can then only be settled one whole update later when the midpoint falls
before it.

The updates are periodic (H200: 100.0 ms idle, 100.3 ms busy; energy.md), so one
update instant ``u_k = phase + k * period`` explains every bracket. Intersecting the
brackets of the last few seconds, for each candidate period on a small grid, narrows
the phase to a few milliseconds once the reads have fallen at varied offsets from the
updates. The sampler uses the estimate twice:

* to time each counter point (interpolation is then right at the window edges), and
* to read just after the next predicted update while a request waits for its energy
  (the wait after a window's end drops from ~1.5 update periods to ~0.5 of one).

Nothing here is trusted blindly: a bracket always bounds its own update (an estimate is
clamped into it), an estimate with no consistent phase falls back to the midpoint, and a
phase jump (brackets that no period fits) restarts the history. Pure and stdlib-only.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

HISTORY = 48           # brackets kept: ~5 s at 100 ms
MIN_BRACKETS = 8       # before this many, no phase estimate
PERIOD_GRID = 41       # candidate periods tried around the nominal one
PINNED_GRID = 21       # ... around a pinned period (a narrower range: fewer suffice, and each costs GIL time)
PERIOD_SPAN = 0.01     # ± this fraction of the nominal period
CONFIDENT_S = 0.03     # an estimate this narrow (30 ms) is used for read scheduling
ANCHOR_EVERY = 10      # one phase estimate kept every 10 updates (1 s at 100 ms) ...
ANCHORS = 600          # ... for 6000 updates (10 minutes): the period from estimates far apart
ANCHOR_MIN_AGE = 100   # updates between the two estimates that pin the period
MIN_SPAN = 2e-4        # the narrowest period range tried: ±0.02 %
REFIT_EVERY = 4        # with a narrow phase (SKIP_WIDTH_S) that predicts the new bracket, refit every 4th
# (Any confident width: on a loaded host phases are 15-30 ms wide, and refitting at every
# bracket doubled the sampler's fits and its GIL time; simulated accuracy unchanged.)
SKIP_WIDTH_S = 0.030
# Before the period is pinned, a narrow phase is trusted only if the brackets reject these
# periods (relative to the one fitted): the fitted range is only ±1 % around a hint that
# can itself be several % off, and wide brackets fit a wrong period as narrowly as the true one.
ALIASES = (0.88, 0.94, 0.97, 1.03, 1.06, 1.12)


@dataclass(frozen=True)
class Phase:
    """The latest update is in ``[lo, hi]`` (best guess ``at``); updates recur every ``period``."""

    at: float
    lo: float
    hi: float
    period: float
    # How far the true period can be from ``period``: half the range of the grid periods
    # that fit, plus one grid step (the truth may lie up to a step beyond the outermost).
    period_err: float = 0.0

    @property
    def width(self) -> float:
        return self.hi - self.lo

    @property
    def confident(self) -> bool:
        return self.width <= CONFIDENT_S

    def next_after(self, t: float) -> float:
        """The first predicted update instant (best guess) after ``t``."""
        n = max(0, int((t - self.at) // self.period) + 1)
        return self.at + n * self.period


class PhaseTracker:
    def __init__(self, history: int = HISTORY):
        self._brackets: deque[tuple[float, float]] = deque(maxlen=history)
        self.phase: Phase | None = None
        self.restarts = 0
        self.restarts_no_fit = 0  # of which: no periodic clock fitted the brackets (the rest: the sampler's checks)
        # The period of the last confident phase, the hint for the next fit. A restart
        # forgets it unless pinned: a few wide brackets also fit a wrong period, and kept
        # as the hint, a wrong one would be found again after every restart.
        self.known_period: float | None = None
        self.known_period_err = 0.0
        self.known_period_pinned = False  # from anchors (≥ ANCHOR_MIN_AGE updates apart), not ±1 %
        self._since_fit = 0
        self._anchors: deque[tuple[float, float]] = deque(maxlen=ANCHORS)  # (at, half width)
        self._pin_cache: tuple = (None, None)  # (anchors' length and newest, _pin's answer)

    def add(self, lo: float, hi: float, period_hint: float) -> float:
        """Record that one update fell in ``(lo, hi]``; return the time to give it.
        ``period_hint``: the update period to within 1 % (the sampler's mean spacing of
        counter changes; periods within ±1 % of it are tried)."""
        mid = (lo + hi) / 2
        prior = self.phase if self.phase is not None and self.phase.confident else None
        self._brackets.append((lo, hi))
        self._since_fit += 1
        if prior is not None and prior.width <= SKIP_WIDTH_S and self._since_fit < REFIT_EVERY:
            # The fit costs ~1 ms of Python (the GIL of the server's front process): skip
            # it while the known phase puts this update well inside the bracket.
            u = _predicted(prior, lo, hi, None)
            if u is not None and u - (prior.at - prior.lo) > lo and u + (prior.hi - prior.at) <= hi:
                shift = u - prior.at  # the latest update is now this one
                self.phase = Phase(at=u, lo=prior.lo + shift, hi=prior.hi + shift, period=prior.period,
                                   period_err=prior.period_err)
                return u
        self._since_fit = 0
        if len(self._brackets) < MIN_BRACKETS:
            self.phase = None
            return mid
        p0, span = self._period_range(period_hint)
        ph = self._fit(p0, span)
        pinned = ph is not None and span < PERIOD_SPAN
        if ph is None and span < PERIOD_SPAN:
            # The period moved off its long-run value: try the wide range, forget the anchors.
            ph = self._fit(period_hint, PERIOD_SPAN)
            self._anchors.clear()
        if ph is None:
            # No periodic phase fits (a stall, a jump, a driver change): start over from here.
            self.restarts_no_fit += 1
            self.restart(keep_period=self.known_period_pinned)
            return _predicted(prior, lo, hi, mid)
        self.phase = ph
        if ph.confident:
            self.known_period = ph.period
            self.known_period_err = ph.period_err
            self.known_period_pinned = pinned
        # Anchors pin the period for minutes: only a confident estimate makes one.
        if ph.confident and (not self._anchors or ph.at - self._anchors[-1][0] >= ANCHOR_EVERY * ph.period):
            self._anchors.append((ph.at, ph.width / 2))
        # A wide estimate (few brackets, or a period not yet pinned) is no better than the
        # midpoint, unless the phase known until now still puts this update in the bracket.
        return min(max(ph.at, lo), hi) if ph.confident else _predicted(prior, lo, hi, mid)

    def restart(self, keep_period: bool) -> None:
        """Start over from the newest bracket. ``keep_period``: keep the known period as the
        next fit's hint (unpinned: it is searched ±1 % around)."""
        self.restarts += 1
        if self._brackets:
            last = self._brackets[-1]
            self._brackets.clear()
            self._brackets.append(last)
        self._anchors.clear()
        if not keep_period:
            self.known_period = None
        self.known_period_pinned = False
        self.phase = None

    def _period_range(self, hint: float) -> tuple[float, float]:
        """(period, relative span) to try: pinned by the anchors once they span enough
        updates (``_pin``, recomputed only when an anchor is added), else ±1 % of the hint."""
        if self.phase is None or not self._anchors:
            return hint, PERIOD_SPAN
        key = (len(self._anchors), self._anchors[-1])
        if self._pin_cache[0] != key:
            self._pin_cache = (key, _pin(list(self._anchors), self.phase.period))
        return self._pin_cache[1] or (hint, PERIOD_SPAN)

    def _fit(self, p0: float, span: float) -> Phase | None:
        if not p0 or p0 <= 0:
            return None
        grid = PERIOD_GRID if span >= PERIOD_SPAN else PINNED_GRID
        grid_periods = [p0 * (1 - span + 2 * span * g / (grid - 1)) for g in range(grid)]
        narrow = _narrowest_first(self._brackets)  # the same for every period: sorted once
        fits = [(p, _intersect(narrow, p)) for p in grid_periods]
        if not any(got for _, got in fits):
            # The quick intersection can reject the true clock (rarely: a wide bracket
            # shifted the wrong way); before giving the phase up, the exact one decides.
            exact = _newest_and_older(self._brackets)
            fits = [(p, _intersect_exact(exact, p)) for p in grid_periods]
        lows, highs, ats, periods = [], [], [], []
        for p, got in fits:
            if got is not None:
                lows.append(got[0])
                highs.append(got[1])
                ats.append((got[0] + got[1]) / 2)
                periods.append(p)
        if not ats:
            return None
        step = 2 * span * p0 / (grid - 1)
        at, lo, hi, period = sum(ats) / len(ats), min(lows), max(highs), sum(periods) / len(periods)
        if span >= PERIOD_SPAN and hi - lo <= CONFIDENT_S:
            # Not pinned yet: a wrong hint (a spacing made long by reads that saw two updates
            # as one) fitted 5-16 % off in simulation, confidently, for tens of seconds.
            if any(_intersect(narrow, period * f) for f in ALIASES):
                lo, hi = min(lo, at - CONFIDENT_S), max(hi, at + CONFIDENT_S)  # the period is not told: not confident
        return Phase(at=at, lo=lo, hi=hi, period=period, period_err=(max(periods) - min(periods)) / 2 + step)


def _pin(anchors: list[tuple[float, float]], period: float) -> tuple[float, float] | None:
    """(period, relative span) from phase estimates ``(at, half width)`` seconds to minutes
    apart, or None while they span under ``ANCHOR_MIN_AGE`` updates. Estimates far apart
    pin the period far better than a few seconds of brackets: (their errors) / (updates
    between). A straight line through all of them, after dropping those off the median
    pairs' line by more than their width: one anchor off (a confident fit can be) once
    pinned a range without the true period for tens of seconds, when one pair (the first
    anchor and the current phase) set it. ``period``: the current one, to count updates."""
    # Updates between anchors, counted gap by gap: before pinning the period can be ~0.5 %
    # off (wide brackets fit it), which miscounts a gap of hundreds of updates but not one
    # of tens; after 50 updates the anchors' own period counts the next gap.
    at0, p_run, ks = anchors[0][0], period, [0]
    for (a, _), (b, _) in zip(anchors, anchors[1:]):
        ks.append(ks[-1] + round((b - a) / p_run))
        if ks[-1] >= 50:
            p_run = (b - at0) / ks[-1]
    # A robust start: the median period of pairs half the list apart (or, a short list,
    # the fewest anchors apart that span ANCHOR_MIN_AGE updates).
    gap = len(anchors) // 2
    while gap < len(anchors) - 1 and ks[-1] - ks[-1 - gap] < ANCHOR_MIN_AGE:
        gap += 1
    rough = sorted((anchors[i + gap][0] - anchors[i][0]) / (ks[i + gap] - ks[i])
                   for i in range(len(anchors) - gap) if ks[i + gap] - ks[i] >= ANCHOR_MIN_AGE)
    if not rough:
        return None
    p = rough[len(rough) // 2]
    res = [at - k * p for (at, _), k in zip(anchors, ks)]
    mid = sorted(res)[len(res) // 2]
    keep = [i for i, (r, (_, hw)) in enumerate(zip(res, anchors)) if abs(r - mid) <= 3 * hw + 0.002]
    if len(keep) < 2 or ks[keep[-1]] - ks[keep[0]] < ANCHOR_MIN_AGE:
        return None
    # Least squares on the kept ones (the residuals against ``p``: small numbers).
    k_mean = sum(ks[i] for i in keep) / len(keep)
    sxx = sum((ks[i] - k_mean) ** 2 for i in keep)
    p += sum((ks[i] - k_mean) * (res[i] - mid) for i in keep) / sxx
    # The slope's error from the anchors' widths, counting one anchor in five as independent
    # (an anchor's fit covers ~5 anchors' brackets); the range is three of those. (Two
    # anchors: their widths over the updates between, as the one pair gave before.) In
    # simulation the true period stayed within a third of the range (10 seeds, 3 states).
    hw = sorted(anchors[i][1] for i in keep)[len(keep) // 2]
    err = hw / math.sqrt(sxx / min(5, len(keep)))
    return p, max(3 * err / p, MIN_SPAN)


def _predicted(ph: Phase | None, lo: float, hi: float, fallback):
    """The update ``ph`` predicts inside ``(lo, hi]`` if exactly one, else ``fallback``."""
    if ph is None:
        return fallback
    u = ph.next_after(lo)
    return u if u <= hi and u + ph.period > hi else fallback


def _narrowest_first(brackets) -> list[tuple[float, float, float, bool]]:
    """``(lo, hi, midpoint, is_newest)`` per bracket, narrowest first (for ``_intersect``)."""
    last = len(brackets) - 1
    order = sorted(range(len(brackets)), key=lambda i: brackets[i][1] - brackets[i][0])
    return [(brackets[i][0], brackets[i][1], (brackets[i][0] + brackets[i][1]) / 2, i == last) for i in order]


def _intersect(prepared, p: float) -> tuple[float, float] | None:
    """The latest update's interval if one period-``p`` clock fits every bracket, else None.

    ``prepared``: ``_narrowest_first(brackets)``. Narrowest bracket first: each further
    bracket is shifted by the whole number of periods that puts it on the interval so far
    (of the two nearest, the one overlapping it more); narrow intervals make that choice
    unambiguous. (Runs up to 41 times per fit on the sampler thread, holding the GIL: kept lean.)
    """
    lo, hi = prepared[0][0], prepared[0][1]
    k_newest = 0
    for j in range(1, len(prepared)):
        b_lo, b_hi, b_mid, newest = prepared[j]
        k = math.floor((b_mid - (lo + hi) / 2) / p)
        best_k, best_w = 0, -1.0
        for kk in (k, k + 1):
            if kk:
                w = min(hi, b_hi - kk * p) - max(lo, b_lo - kk * p)
                if w >= 0 and w > best_w:
                    best_k, best_w = kk, w
        if not best_k:
            return None
        lo, hi = max(lo, b_lo - best_k * p), min(hi, b_hi - best_k * p)
        if newest:
            k_newest = best_k
    return lo + k_newest * p, hi + k_newest * p


def _newest_and_older(brackets) -> tuple[tuple[float, float], list[tuple[float, float]]]:
    """(the newest bracket, the older ones narrowest first): ``_intersect_exact``'s input."""
    *older, newest = brackets
    return newest, sorted(older, key=lambda b: b[1] - b[0])


def _intersect_exact(prepared, p: float) -> tuple[float, float] | None:
    """As ``_intersect``, without ever choosing: the latest update ``u`` lies in the newest
    bracket; an older bracket holds an earlier update ``u - m * p`` (``m >= 1``), so it
    allows ``u`` in its own interval shifted by each ``m`` that reaches the newest bracket
    (at most two: every bracket is shorter than a period). The possible ``u`` are kept as
    disjoint pieces; the answer is their hull (wider than one piece where the brackets
    leave two possibilities open: never narrower than the truth)."""
    (n_lo, n_hi), older = prepared
    pieces = [(n_lo, n_hi)]
    for b_lo, b_hi in older:
        m = max(1, math.ceil((n_lo - b_hi) / p))
        kept = []
        while b_lo + m * p <= n_hi:
            a_lo, a_hi = b_lo + m * p, b_hi + m * p
            for f_lo, f_hi in pieces:
                lo, hi = max(a_lo, f_lo), min(a_hi, f_hi)
                if lo <= hi:
                    kept.append((lo, hi))
            m += 1
        if not kept:
            return None
        pieces = sorted(kept)
    return pieces[0][0], pieces[-1][1]
