"""The counter's update clock (energy/phase.py) and the sampler's phase-locked reads.

The sampler's runs use ``FakeClockRig`` (energy/simulated.py): a simulated NVML on a fake
clock, each read taking 1.5–6 ms (sometimes 14 ms, as NVML does on an H200), its value
latched inside the call; the counter updates every ``period`` s; the sampler's own
schedule (``Sampler.schedule``) decides when to read.
"""
from __future__ import annotations

import random
import statistics

import pytest

from llem_server.energy.phase import PhaseTracker
from llem_server.energy.sampler import Reading, Sampler
from llem_server.energy.simulated import FakeClockRig, switching_load


def _brackets(period: float, n: int, rng: random.Random, offset: float = 0.0123, t: float = 5.0,
              spacing: tuple[float, float] = (0.5, 0.95)):
    """(lo, hi, true update) for reads at varied spacing under one period (``spacing``:
    the range, in periods)."""
    out, prev_start, prev_val = [], None, None
    for _ in range(n):
        latch = t + rng.uniform(0.001, 0.004)
        end = latch + rng.uniform(0.0005, 0.002)
        val = int((latch - offset) // period)
        if prev_val is not None and val > prev_val and end - prev_start < 0.98 * period:
            out.append((prev_start, end, offset + val * period))
        prev_start, prev_val = t, val
        t += rng.uniform(*spacing) * period
    return out


@pytest.mark.parametrize("period", [0.1, 0.1003, 0.0997])
def test_tracker_times_updates_to_a_few_ms_and_bounds_them(period):
    rng = random.Random(7)
    tr = PhaseTracker()
    errs = []
    for k, (lo, hi, true) in enumerate(_brackets(period, 600, rng)):
        est = tr.add(lo, hi, 0.1)  # the hint is the nominal 100 ms, up to 0.3 % off
        assert lo <= est <= hi  # never outside what the reads prove
        if tr.phase is not None:
            assert tr.phase.lo - 1e-9 <= true <= tr.phase.hi + 1e-9
        if k > 100:
            errs.append(abs(est - true))
    assert tr.restarts == 0
    errs.sort()
    # Midpoint timing errs by up to ~45 ms here; the phase estimate by a few.
    assert errs[len(errs) // 2] < 0.002 and errs[int(len(errs) * 0.95)] < 0.005
    assert tr.phase.period == pytest.approx(period, rel=2e-4)


def test_tracker_restarts_on_a_phase_jump_and_recovers():
    rng = random.Random(3)
    tr = PhaseTracker()
    first = _brackets(0.1, 200, rng, offset=0.0123, t=5.0)
    second = _brackets(0.1, 300, rng, offset=0.0493, t=first[-1][1] + 0.2)  # updates moved by 37 ms
    for lo, hi, _ in first:
        tr.add(lo, hi, 0.1)
    errs = []
    for lo, hi, true in second:
        est = tr.add(lo, hi, 0.1)
        assert lo <= est <= hi
        errs.append(abs(est - true))
    assert tr.restarts >= 1
    assert statistics.median(errs[-100:]) < 0.004  # vs the 37 ms jump


def test_a_wrong_period_hint_is_not_trusted():
    """Before the period is pinned, the fit tries only ±1 % around the sampler's spacing
    hint, which reads that saw two updates as one can make several % long. Wide brackets
    then fit the wrong period as narrowly as the true one: the phase must not claim it
    (the old fit did, in about half of its fits here)."""
    period, n, wrong = 0.1003, 0, 0
    for seed in range(40):
        rng = random.Random(seed)
        tr = PhaseTracker()
        for lo, hi, true in _brackets(period, 40, rng, spacing=(0.8, 0.97)):
            est = tr.add(lo, hi, period * 1.08)
            assert lo <= est <= hi
            n += 1
            wrong += tr.phase is not None and tr.phase.confident and abs(tr.phase.period / period - 1) > 0.01
    assert wrong / n < 0.02, wrong / n


def test_exact_intersection_never_rejects_the_true_clock():
    """The quick intersection can reject the true update clock where brackets are wide
    (then the tracker restarts and the period is unpinned); the exact one, which the fit
    falls back to, never does, and bounds the latest update."""
    from llem_server.energy.phase import _intersect, _intersect_exact, _narrowest_first, _newest_and_older

    rng = random.Random(1)
    per, quick_misses, n = 0.1, 0, 0
    for _ in range(1500):
        ph, t = rng.uniform(0, per), rng.uniform(0, 5)
        prev, bs = t, []
        for _ in range(48):  # dithered reads, one in ten stalled
            start = prev + rng.uniform(0.5, 0.95) * per + (rng.random() < 0.1) * rng.uniform(0.02, 0.15)
            end, latch = start + rng.uniform(0.002, 0.006), start + 0.002
            if (latch - ph) // per - (prev + 0.002 - ph) // per == 1 and end - prev < 0.98 * per:
                bs.append((prev, end))
            prev = start
        if len(bs) < 8:
            continue
        n += 1
        true = ph + ((bs[-1][1] - ph) // per) * per
        got = _intersect_exact(_newest_and_older(bs), per)
        assert got is not None and got[0] - 1e-9 <= true <= got[1] + 1e-9
        quick_misses += _intersect(_narrowest_first(bs), per) is None
    assert n > 1000 and quick_misses > 0  # the case the fallback is for does occur


@pytest.mark.parametrize("period", [0.1, 0.1003])
def test_sampler_times_points_and_sees_a_windows_end_soon(period):
    """Busy server (a window always open): points within a few ms of the true updates,
    and a window's end point is read soon after the first update past it."""
    rig = FakeClockRig(period)
    rig.s.hurry()
    errs, waits, excess = [], [], []
    end = rig.clock[0] + 5.0
    for _ in range(2500):
        n = len(rig.s._buf.pt_t)
        rig.step()
        if len(rig.s._buf.pt_t) > n and rig.clock[0] > 1010:
            errs.append(abs(rig.s._buf.pt_t[-1] - rig.update_before(rig.latch)))
        if rig.clock[0] >= end and rig.s._buf.pt_t[-1] >= end:
            if end > 1010:
                waits.append(rig.clock[0] - end)
                excess.append(rig.clock[0] - (rig.update_before(end) + period))
            end = rig.clock[0] + rig.rng.uniform(0.3, 1.5)
    starts = rig.starts
    assert min(b - a for a, b in zip(starts, starts[1:])) >= 0.05 - 1e-9  # energy.md rule 2: the floor
    errs.sort()
    assert errs[len(errs) // 2] < 0.002 and errs[int(len(errs) * 0.95)] < 0.020  # midpoints: ~25, up to 50
    # The counter itself makes a window wait for its next update (~50 ms on average);
    # what the sampler adds is the time from that update to the read that sees it
    # (midpoint timing with 50 ms reads: ~28 ms, a whole period when the midpoint
    # falls before the window's end).
    assert statistics.median(excess) < 0.012
    assert max(waits) < 0.25


def _miss_share(rig: FakeClockRig, steps: int, before_step=lambda i: None) -> float:
    """Of ``steps`` reads, the share after which the phase is confident and its interval
    misses the true update (``FakeClockRig.phase_misses_update``), of those confident."""
    n = outside = 0
    for i in range(steps):
        before_step(i)
        rig.step()
        miss = rig.phase_misses_update()
        if miss is not None:
            n += 1
            outside += miss
    return outside / n


def test_a_busy_samplers_phase_interval_holds_the_true_update():
    """A request always running: while the phase is confident, its interval (a hard bound
    the sampler places reads by) holds the true update. Busy, the brackets come from
    probes only and span tens of seconds; an estimate one period minus a few ms off, or a
    period pinned slightly wrong, still fitted them, and locked reads could not tell
    (the old sampler: up to 17 % of the time, 5 ms off, in one of these runs)."""
    for seed in range(8):
        rig = FakeClockRig(0.1003, seed=seed)
        rig.s.hurry()
        share = _miss_share(rig, 1600)
        assert share < 0.02, (seed, share)


def test_a_pinned_period_survives_a_bad_anchor_on_a_loaded_host():
    """Requests coming and going on a loaded host (stalled reads, load switching): the
    phase interval still holds the true update. The period is pinned from phase estimates
    seconds apart; pinned from one pair (the first anchor and the current phase), one
    anchor off by more than its width pinned a range without the true period, and the
    interval missed the update 5-12 % of the time in 3 of these 8 runs (now at most 1.2 %)."""
    for seed in range(8):
        rig = FakeClockRig(0.1003, seed=seed, power=switching_load(random.Random(seed + 7)), stalls=0.1)

        def come_and_go(i: int, s=rig.s) -> None:
            if i % 50 == 0:  # 50 reads (~4 s) with a request waiting, 50 without
                (s.hurry if i % 100 == 0 else s.relax)()

        share = _miss_share(rig, 1600, come_and_go)
        assert share < 0.03, (seed, share)


def test_a_wake_up_that_keeps_the_planned_read_keeps_its_kind():
    """Requests open windows at any moment: ``hurry`` wakes the sampler, which plans again
    and keeps the read already planned if it is sooner. That read must still be checked
    as what it was planned as. Re-planning used to commit the new plan's kind anyway: an
    idle read kept after a wake-up counted as a phase-locked read that missed its update
    (13-23 false misses per run here, in the statistic a GPU run is judged by, and in the
    checks that restart the phase); now at most 1."""
    for seed in range(8):
        rig = FakeClockRig(0.1003, seed=seed)
        rng = random.Random(seed)
        for _ in range(100):  # idle: the phase is known before requests come
            rig.step()
        window_end, t_open = None, rig.clock[0] + rng.uniform(0, 0.1)
        for _ in range(1500):
            if t_open is not None and t_open <= rig.nxt:  # a window opens before the next read
                rig.s.hurry()
                rig.wake(t_open)
                window_end, t_open = t_open + rng.uniform(0.3, 2.0), None
            rig.step()
            if window_end is not None and rig.s._buf.pt_t[-1] >= window_end:  # its end point is in
                rig.s.relax()
                window_end, t_open = None, rig.clock[0] + rng.uniform(0.002, 0.3)
        st = rig.s.stats()
        assert st["locked_read_misses"] <= 2 and st["phase_restarts"] == 0, (seed, st)


def test_idle_reads_vary_their_offset_and_stay_under_one_period():
    rig = FakeClockRig(0.1, seed=5)
    for _ in range(400):
        rig.step()
    gaps = [b - a for a, b in zip(rig.starts[100:], rig.starts[101:])]
    assert min(gaps) >= 0.05 - 1e-9 and max(gaps) < 0.1
    assert statistics.pstdev(gaps) > 0.005  # varied: brackets at all phases
    assert rig.s.phase.phase is not None and rig.s.phase.phase.confident


@pytest.mark.parametrize("jitter", [0.0, 0.003])
@pytest.mark.parametrize("switching", [False, True])
@pytest.mark.parametrize("stalls", [False, True])
def test_window_energy_stays_within_the_reported_bound(stalls, switching, jitter):
    """What a user reads: the energy of any window on these points is within the bound
    the meter reports (a counter step at each edge), also when the sampler thread is
    preempted for 20–150 ms around one read in ten (a loaded 2-core machine), when the
    load switches between idle and busy, and when the counter's updates are not strictly
    periodic (each moved by up to ±3 ms: the sampler fits one periodic clock to them)."""
    from llem_server.energy.attribution import edge_step_mj, energy_at

    rng = random.Random(9)
    rig = FakeClockRig(0.1, seed=2, power=switching_load(random.Random(3)) if switching else 300.0,
                       stalls=0.1 if stalls else 0.0, stall_rng=rng, jitter=jitter)
    for step in range(2500):
        if step % 50 == 0:  # requests come and go: hurried and idle schedules alternate
            (rig.s.hurry if step % 100 == 0 else rig.s.relax)()
        rig.step()
    pt_t, pt_e = rig.s._buf.pt_t, rig.s._buf.pt_e
    ratios = []
    for _ in range(1000):
        t0 = rng.uniform(pt_t[50], pt_t[-50])
        t1 = t0 + rng.uniform(0.2, 2.0)
        got = (energy_at(pt_t, pt_e, t1) - energy_at(pt_t, pt_e, t0)) / 1000
        bound = (edge_step_mj(pt_t, pt_e, t0, rig.s._buf.pt_lo, rig.s._buf.pt_hi)
                 + edge_step_mj(pt_t, pt_e, t1, rig.s._buf.pt_lo, rig.s._buf.pt_hi)) / 1000
        ratios.append(abs(got - rig.sim.true_energy_j(0, t0, t1)) / bound)
    ratios.sort()
    assert ratios[-1] <= 1.0
    if not stalls and not switching:
        assert ratios[-1] <= 0.5 and ratios[len(ratios) // 2] <= 0.05


def test_a_stalled_reads_update_is_counted_by_its_step_at_steady_power():
    """A request always running at steady power, one read in ten stalled 20–150 ms: a
    stalled read's change can hold two predicted updates and latch after either. The
    step's size tells which (twice the recent single steps: the later one); timed at the
    bracket's midpoint instead, these points were up to 100 ms off and windows erred by
    1.8–2.6 % on average in these runs (now at most 0.4 %)."""
    from llem_server.energy.attribution import energy_at

    for seed in range(6):
        rig = FakeClockRig(0.1003, seed=seed, stalls=0.1)
        rig.s.hurry()
        for _ in range(1200):
            rig.step()
        pt_t, pt_e = rig.s._buf.pt_t, rig.s._buf.pt_e
        rng, rel = random.Random(seed), []
        for _ in range(400):
            a = rng.uniform(pt_t[0] + 10, pt_t[-1] - 3)
            b = a + rng.uniform(0.2, 2.0)
            true = rig.sim.true_energy_j(0, a, b)
            rel.append(abs((energy_at(pt_t, pt_e, b) - energy_at(pt_t, pt_e, a)) / 1000 - true) / true)
        assert statistics.mean(rel) < 0.008, (seed, statistics.mean(rel))


def test_busy_sampler_on_a_loaded_host_keeps_the_true_period():
    """A request always running (reads locked to the predicted updates), one read in ten
    stalled 20–150 ms, the load switching between idle and busy, from the sampler's start:
    the phase is soon confident on the counter's own period and almost never on another.
    A stalled read can see two updates as one change, which makes the spacing hint long;
    the old sampler then fitted a period 5–16 % off to the wide brackets and kept it for
    up to 80 s (wrong 27 % of the time in two of these runs)."""
    period, ok = 0.1003, []
    for seed in range(6):
        rig = FakeClockRig(period, seed=seed, power=switching_load(random.Random(seed + 7)), stalls=0.1)
        rig.s.hurry()
        t0, n_ok, n_wrong, first_ok = rig.clock[0], 0, 0, None
        for _ in range(2000):
            rig.step()
            ph = rig.s.phase.phase
            if ph is not None and ph.confident:
                right = abs(ph.period / period - 1) < 0.01
                n_ok += right
                n_wrong += not right
                if right and first_ok is None:
                    first_ok = rig.clock[0] - t0
        assert n_wrong / 2000 < 0.02, (seed, n_wrong / 2000)
        assert first_ok is not None and first_ok < 30, (seed, first_ok)
        ok.append(n_ok / 2000)
    assert statistics.mean(ok) > 0.85, ok


def test_sampler_reports_its_own_cpu_time_inside_and_outside_sensor_calls():
    """The shutdown log's sampler cost (the GIL it takes from the server) is measured: a
    sensor call that burns 3 ms of CPU shows as such, and the total includes it."""
    import threading
    import time

    def read():
        c0 = time.thread_time()
        while time.thread_time() - c0 < 0.003:
            pass
        return Reading(time.monotonic() // 0.02 * 1000.0)

    s = Sampler(read, mode="counter", period_s=0.05, floor_s=0.05)
    assert s.stats()["cpu_ms_per_s"] is None  # no thread yet: nothing measured, not zero
    s.start()
    try:
        time.sleep(1.0)
        st = s.stats()
    finally:
        s.stop()
    assert not any(t.name == "llem-energy-sensor" for t in threading.enumerate())
    per_read = st["read_cpu_ms_per_s"] / (st["reads"] / 1.0)
    assert 2.5 <= per_read <= 4.5, st
    assert st["read_cpu_ms_per_s"] <= st["cpu_ms_per_s"] < st["read_cpu_ms_per_s"] + 30, st
