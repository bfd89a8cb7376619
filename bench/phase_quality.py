"""How well does the sampler time the energy counter's updates, and what does that do to
a window's energy? A simulation, on the real Sampler and PhaseTracker.

The counter updates every ~100 ms at instants no read can see; the sampler fits one
periodic update clock to the reads (energy/phase.py) and times each counter point at its
estimated update. Errors there move energy across a window's edges. This runs the sampler
on ``FakeClockRig`` (energy/simulated.py: a simulated NVML on a fake clock, minutes in a
second, deterministic for a seed) in the states a server meets: idle, busy (a request's
window always open: reads locked to the predicted updates), requests coming and going,
the GPU's load switching between idle and busy, and a loaded host whose sampler thread
is held 20–150 ms around one read in ten. For each it reports:

* the phase: the share of reads at which it is confident on the true period, on a wrong
  one (> 1 % off), and confident with an interval that misses the true update by > 2 ms
  (the interval is a hard bound reads are placed by); when it first locks on the truth;
* the points: how far each is timed from the counter's true update;
* windows of 0.2–2 s: the error of their energy against the simulator's true energy,
  and how many fall outside the bound the meter reports (a counter step at each edge).

``--jitter-ms 3`` moves each counter update by up to ±3 ms (results in
``phase_quality-jitter-sim``): the fit assumes a strictly periodic clock, and must stay
honest where the hardware's is not. ``--src DIR`` runs another checkout's server package
(e.g. a git worktree of an older commit) for a before/after comparison on the same seeds.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402

PERIOD = 0.1003  # H200 busy (energy.md)
SCENARIOS = [  # name, hurry ("no", "always", "alternating"), load switching, stalled reads
    ("idle", "no", False, 0.0),
    ("busy", "always", False, 0.0),
    ("busy, load switching", "always", True, 0.0),
    ("requests come and go, load switching", "alternating", True, 0.0),
    ("busy, stalled reads", "always", False, 0.1),
    ("busy, stalled reads, load switching", "always", True, 0.1),
    ("requests come and go, stalled reads, load switching", "alternating", True, 0.1),
]


def run(seed: int, hurry: str, switching: bool, stalls: float, steps: int, windows: int, jitter: float = 0.0) -> dict:
    from llem_server.energy.attribution import edge_step_mj, energy_at
    from llem_server.energy.simulated import FakeClockRig, switching_load

    load = switching_load(random.Random(seed + 7)) if switching else 300.0
    rig = FakeClockRig(PERIOD, seed=seed, power=load, stalls=stalls, jitter=jitter)
    s = rig.s
    t0 = rig.clock[0]
    right = wrong = outside = 0
    first_right = None
    pt_err = []
    for i in range(steps):
        if hurry == "always" and i == 0:
            s.hurry()
        elif hurry == "alternating" and i % 50 == 0:  # 50 reads (~4 s) with a request, 50 without
            if i % 100 == 0:
                s.hurry()
                rig.wake(rig.clock[0])  # as the server's sampler thread is woken
            else:
                s.relax()
        n = len(s._buf.pt_t)
        rig.step()
        if len(s._buf.pt_t) > n and n > 0:
            pt_err.append(abs(s._buf.pt_t[-1] - rig.update_before(rig.latch)))
        ph = s.phase.phase
        if ph is not None and ph.confident:
            if abs(ph.period / PERIOD - 1) < 0.01:
                right += 1
                first_right = first_right if first_right is not None else rig.clock[0] - t0
            else:
                wrong += 1
            outside += rig.phase_misses_update()
    pt_t, pt_e, pt_lo, pt_hi = s._buf.pt_t, s._buf.pt_e, s._buf.pt_lo, s._buf.pt_hi
    wr = random.Random(seed)
    rel, bounds, over = [], [], 0
    for _ in range(windows):
        a = wr.uniform(pt_t[0] + 2.0, pt_t[-1] - 3.0)
        b = a + wr.uniform(0.2, 2.0)
        got = (energy_at(pt_t, pt_e, b) - energy_at(pt_t, pt_e, a)) / 1000
        true = rig.sim.true_energy_j(0, a, b)
        bound = (edge_step_mj(pt_t, pt_e, a, pt_lo, pt_hi) + edge_step_mj(pt_t, pt_e, b, pt_lo, pt_hi)) / 1000
        rel.append(abs(got - true) / true)
        bounds.append(bound / true)
        over += abs(got - true) > bound
    return {"right": right / steps, "wrong": wrong / steps, "outside": outside / steps, "first_right_s": first_right,
            "restarts": s.phase.restarts, "pt_err": pt_err, "rel": rel, "bounds": bounds, "over": over}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--steps", type=int, default=1600, help="reads per run (~2.5 simulated minutes)")
    p.add_argument("--windows", type=int, default=1500, help="windows per run")
    p.add_argument("--jitter-ms", type=float, default=0.0,
                   help="move each counter update by up to ± this (a counter not strictly periodic)")
    p.add_argument("--src", type=Path, help="a server/src directory to run instead of this checkout's")
    p.add_argument("--name", default="phase_quality-sim", help="results file name")
    args = p.parse_args(argv)
    if args.src:
        sys.path.insert(0, str(args.src.resolve()))
        for mod in [m for m in sys.modules if m == "llem_server" or m.startswith("llem_server.")]:
            del sys.modules[mod]  # common.py imported this checkout's
    import llem_server.energy.sampler as sampler_mod
    B.log(f"sampler from {sampler_mod.__file__}")

    rows_phase, rows_err, data = [], [], {}
    for name, hurry, switching, stalls in SCENARIOS:
        t = time.monotonic()
        runs = [run(seed, hurry, switching, stalls, args.steps, args.windows, args.jitter_ms / 1e3)
                for seed in range(args.seeds)]
        pts = sorted(e for r in runs for e in r["pt_err"])
        rel = sorted(e for r in runs for e in r["rel"])
        firsts = [r["first_right_s"] for r in runs]
        locked = [f for f in firsts if f is not None]
        share = lambda k: f"{statistics.mean(r[k] for r in runs) * 100:.1f} %"  # noqa: E731
        rows_phase.append([
            name, share("right"), share("wrong"), f"{sum(r['wrong'] > 0.05 for r in runs)}/{len(runs)}", share("outside"),
            statistics.median(locked) if locked else None, max(locked) if locked else None,
            f"{len(locked)}/{len(runs)}", statistics.mean(r["restarts"] for r in runs)])
        rows_err.append([
            name, B.pct(pts, 50) * 1e3, B.pct(pts, 95) * 1e3, f"{sum(e > 0.05 for e in pts) / len(pts) * 100:.2f}",
            f"{B.pct(rel, 50) * 100:.3f}", f"{B.pct(rel, 99) * 100:.2f}", f"{statistics.mean(rel) * 100:.3f}",
            f"{statistics.mean(e for r in runs for e in r['bounds']) * 100:.2f}", f"{sum(r['over'] for r in runs)}/{len(rel)}"])
        data[name] = {k: [r[k] for r in runs] for k in ("right", "wrong", "outside", "first_right_s", "restarts", "over")}
        B.log(f"{name}: {rows_phase[-1][1:]} | {rows_err[-1][1:]} ({time.monotonic() - t:.0f} s)")

    hdr = B.header(argv)
    hdr["sampler_source"] = str(Path(sampler_mod.__file__).resolve().parent.parent.parent)
    tables = [
        B.Table(f"The phase ({args.seeds} seeds x {args.steps} reads, counter period {PERIOD * 1e3:.1f} ms"
                + (f", each update moved by up to ±{args.jitter_ms:g} ms)" if args.jitter_ms else ")"),
                ["scenario", "confident, true period", "confident, wrong period", "runs > 5 % wrong",
                 "interval misses the update", "first true lock s (median)", "(max)", "runs locked", "restarts"],
                rows_phase,
                "Shares of reads. 'Interval misses the update': confident, and the true update lies more than 2 ms "
                "outside the phase's interval. Busy: a request's window always open (phase-locked reads). Stalled "
                "reads: the sampler thread held 20–150 ms before, and again after, one read in ten."),
        B.Table("Point times and window energies",
                ["scenario", "point error p50 ms", "p95 ms", "points > 50 ms off %", "window energy error p50 %",
                 "p99 %", "mean %", "bound, mean %", "windows outside the bound"],
                rows_err,
                f"{args.windows} windows of 0.2–2 s per run, from 2 s after the sampler's first point; error against "
                "the simulator's true energy, relative to the window's energy (absolute values). The bound is the meter's: a counter "
                "step at each edge (the larger of the two beside a point; both steps beside a point whose long read bracket holds the edge)."),
    ]
    B.write_results(args.name, hdr, tables, data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
