"""What does the energy sampler thread cost the server's own Python?

The sampler (server/src/llem_server/energy/sampler.py) runs in the server's front
process; generation runs in a worker process, so the sampler never holds *its* GIL. In the
front process the sensor call releases the GIL (ctypes), but the bookkeeping and the phase
fit hold it, against the front's own work: gRPC, request handling, and relaying every
streamed token from the worker. While a request's window is open the sampler is *hurried*
(reads just after each predicted counter update). This measures, on the real Sampler and
PhaseTracker:

1. the sampler thread's CPU per second, idle and hurried (process CPU while the main
   thread sleeps), and the count and cost of phase fits;
2. what it takes from a CPU-bound Python loop in the same process (a worst case for the
   front's work: always wanting the GIL): the loop's rate in blocks
   alternating between the sampler hurried and the sampler parked inside its sensor call.
   Paired blocks cancel drift; the answer is the median on/off ratio with its quartiles.

Default: a simulated counter (100.3 ms updates) read through a 4 ms GIL-free call, as NVML
costs on an H200. ``--nvml``: GPU 0's real counter, temperature and clock event reasons.

    python bench/sampler_cost.py             # CPU, ~1.5 min
    python bench/sampler_cost.py --nvml      # on a GPU machine
    python bench/sampler_cost.py --nvml --read-guard-ms 10   # hurried reads aimed later

With ``--nvml`` it also times each NVML call alone (counter, temperature, clock event
reasons, process lists: wall and CPU, sampler parked). On an H200 a read cost ~6 ms of
CPU idle and ~10 ms hurried, where reads land ~2 ms after the counter's update
(``READ_GUARD_S``): ``--read-guard-ms`` aims them later, to see whether that is why.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402


def sensor(nvml: bool):
    from llem_server.energy.sampler import Reading

    if nvml:
        import pynvml

        from llem_server.energy import nvml as _nvml

        pynvml.nvmlInit()
        dev = _nvml.DeviceReader(pynvml, 0)
        return lambda: Reading(dev.energy_mj(), dev.temperature_c(), dev.event_reasons())
    from llem_server.energy.simulated import SimGpu, SimulatedNvml

    sim = SimulatedNvml([SimGpu(power=300.0, update_period_s=0.1003)])

    def read():
        time.sleep(0.004)  # NVML's call: ~4 ms in the driver, GIL released
        return Reading(sim.nvmlDeviceGetTotalEnergyConsumption(0), 40.0, 0)
    return read


def time_nvml_calls(n: int, gate: threading.Event) -> list[list]:
    """Wall and CPU time of each NVML call the meter makes, n calls each, sampler parked."""
    import pynvml

    from llem_server.energy import nvml as _nvml

    dev = _nvml.DeviceReader(pynvml, 0)
    gate.clear()
    time.sleep(0.2)  # a read under way finishes
    out = []
    for name, fn in (("counter", dev.energy_mj), ("temperature", dev.temperature_c),
                     ("clock event reasons", dev.event_reasons), ("process lists", dev.compute_pids)):
        wall, cpu = [], []
        try:
            for _ in range(n):
                w, c = time.perf_counter(), time.thread_time()
                fn()
                cpu.append((time.thread_time() - c) * 1e3)
                wall.append((time.perf_counter() - w) * 1e3)
                time.sleep(0.013)  # off the counter's 100 ms rhythm
        except _nvml.NvmlFailure as f:
            out.append([name, len(wall), None, None, f"failed: {f.reason}"])
            continue
        wall.sort()
        out.append([name, n, statistics.median(wall), wall[int(0.9 * (n - 1))], statistics.median(cpu)])
    gate.set()
    return out


def _f(i: int) -> int:
    return (i * 7) ^ (i >> 3)


def loop_rate(seconds: float) -> float:
    """Iterations per second of a small-function-call loop (holds the GIL throughout)."""
    n, t0 = 0, time.perf_counter()
    end = t0 + seconds
    x = 0
    while True:
        for i in range(2000):
            x += _f(i)
        n += 2000
        t = time.perf_counter()
        if t >= end:
            return n / (t - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nvml", action="store_true", help="GPU 0's real sensors instead of the simulated counter")
    p.add_argument("--cpu-s", type=float, default=15.0, help="seconds of each CPU measurement (idle, hurried)")
    p.add_argument("--pairs", type=int, default=15, help="on/off block pairs of the loop")
    p.add_argument("--block-s", type=float, default=1.0)
    p.add_argument("--pin-timeout-s", type=float, default=25.0, help="wait this long for the period to be pinned")
    p.add_argument("--read-guard-ms", type=float, default=None,
                   help="aim hurried reads this far past the predicted update (default: the sampler's READ_GUARD_S)")
    p.add_argument("--calls", type=int, default=40, help="--nvml: timed calls of each NVML function")
    args = p.parse_args(argv)
    from llem_server.energy import sampler as sampler_mod
    from llem_server.energy.sampler import Sampler

    if args.read_guard_ms is not None:
        sampler_mod.READ_GUARD_S = args.read_guard_ms / 1000.0

    read = sensor(args.nvml)
    gate = threading.Event()
    gate.set()

    def gated():
        gate.wait()  # "off": the thread parks here, as if the sensor call never returned
        return read()

    s = Sampler(gated, mode="counter", period_s=0.1, fast_period_s=0.05, name="gpu0")
    fits = {"n": 0, "s": 0.0}
    fit = s.phase._fit

    def timed_fit(*a):
        t = time.thread_time()
        try:
            return fit(*a)
        finally:
            fits["n"] += 1
            fits["s"] += time.thread_time() - t
    s.phase._fit = timed_fit
    s.start()
    t_end = time.monotonic() + args.pin_timeout_s
    while not s.phase.known_period_pinned and time.monotonic() < t_end:
        time.sleep(0.2)
    pinned = s.phase.known_period_pinned
    B.log(f"period pinned: {pinned} after {s.stats()['reads']} reads")

    rows = []
    for mode in ("idle", "hurried"):
        if mode == "hurried":
            s.hurry()
        st0, f0 = s.stats(), dict(fits)
        c0, w0 = time.process_time(), time.monotonic()
        time.sleep(args.cpu_s)
        c1, w1 = time.process_time(), time.monotonic()
        st1 = s.stats()
        wall = w1 - w0
        nfit, sfit = fits["n"] - f0["n"], fits["s"] - f0["s"]
        reads = (st1["reads"] - st0["reads"]) / wall
        rows.append([mode, reads, (c1 - c0) / wall * 1e3, (c1 - c0) / wall * 1e3 / reads if reads else None,
                     nfit / wall, sfit / nfit * 1e3 if nfit else None, sfit / wall * 1e3])
        B.log(f"{mode}: {rows[-1]}")
    st = s.stats()  # before the parked blocks below stretch its read times
    calls = time_nvml_calls(args.calls, gate) if args.nvml else []

    on, off = [], []
    for i in range(args.pairs):  # hurried throughout, as while a request runs
        for side in (("on", "off") if i % 2 == 0 else ("off", "on")):
            if side == "on":
                gate.set()
            else:
                gate.clear()
                time.sleep(0.15)  # let a read already under way finish
            (on if side == "on" else off).append(loop_rate(args.block_s))
    gate.set()
    ratios = sorted(a / b for a, b in zip(on, off))
    q = statistics.quantiles(ratios, n=4)
    s.stop()
    B.log(f"loop on/off: median {statistics.median(ratios):.4f}, quartiles {q[0]:.4f}–{q[2]:.4f}")

    hdr = B.header(argv)
    tables = [
        B.Table("Sampler thread CPU (front process), period pinned" if pinned else "Sampler thread CPU (period not yet pinned)",
                ["state", "reads/s", "CPU ms per s", "CPU ms per read", "phase fits/s", "ms per fit", "fit ms per s"],
                rows,
                "CPU ms per s: process CPU while the main thread sleeps, so the sampler's alone, sensor call "
                "included (in the simulation a 4 ms sleep, whose wake-ups cost CPU but not the GIL). "
                "Hurried: a request's window is open."),
        B.Table("A CPU-bound Python loop in the same process, sampler hurried vs parked",
                ["pairs", "block s", "on/off median", "on/off quartiles", "on it/s (median)", "off it/s (median)"],
                [[args.pairs, args.block_s, f"{statistics.median(ratios):.4f}", f"{q[0]:.4f} – {q[2]:.4f}",
                  statistics.median(on), statistics.median(off)]],
                "energy.md rule 9 allows metering 1 % of tokens/s. This is the most the sampler can take from "
                "the front process's Python (GIL and CPU), free of GPU drift; generation itself runs in the "
                "worker process."),
    ]
    if calls:
        tables.append(B.Table("Each NVML call alone (sampler parked), GPU 0",
                              ["call", "n", "wall ms p50", "wall ms p90", "CPU ms p50"], calls,
                              "The sampler's read = counter + temperature + clock event reasons; the process "
                              "lists are read about once a second (ENERGY_OTHER_PROCESSES)."))
    notes = [f"read guard: {sampler_mod.READ_GUARD_S * 1000:g} ms", f"sensor: {'GPU 0 via NVML' if args.nvml else 'simulated counter, 100.3 ms updates, 4 ms GIL-free read'}",
             f"sampler stats after the CPU measurement: {st}"]
    B.write_results(f"sampler_cost-{'gpu' if args.nvml else 'cpu'}", hdr, tables, notes=notes, data={"cpu": rows, "on": on, "off": off})
    return 0


if __name__ == "__main__":
    sys.exit(main())
