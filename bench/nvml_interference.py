"""Does reading the GPU's sensors slow generation down?

The energy sampler reads NVML (energy counter, temperature, clock event reasons) from the
server's front process while the worker process generates; each read takes ~4 ms in the
driver on an H200. This measures what that costs the generation itself: in-process
``model.generate`` (Llama-1B-shaped, eager, batch 1 — launch-bound, so the most sensitive
to driver contention) in blocks that alternate between a second process reading those
three sensors every 50 ms (the sampler's fastest rate: the 50 ms floor of energy.md rule 2)
and the same process idle. Paired blocks (on, off in alternating order) cancel the
machine's drift; the answer is the median on/off ratio of block times with its spread.

    python bench/nvml_interference.py                # on a GPU machine, ~1.5 min
    python bench/nvml_interference.py --smoke        # CPU, tiny model, a fake 4 ms "read"
    python bench/nvml_interference.py --cache static --new 128   # static cache (compiled by
        # transformers on CUDA, as the service's static rows are): shorter kernels, fewer launches
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402


def reader(go, stop, period_s: float, smoke: bool, reads) -> None:
    """Child process: read the sensors every ``period_s`` while ``go`` is set."""
    if smoke:
        def read():
            time.sleep(0.004)
    else:
        import pynvml

        from llem_server.energy import nvml as _nvml

        pynvml.nvmlInit()
        dev = _nvml.DeviceReader(pynvml, 0)

        def read():
            dev.energy_mj()
            dev.temperature_c()
            dev.event_reasons()
    nxt = time.monotonic()
    while not stop.is_set():
        if not go.wait(0.05):
            nxt = time.monotonic()
            continue
        read()
        with reads.get_lock():
            reads.value += 1
        nxt += period_s
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--pairs", type=int, default=None, help="block pairs (default 25; smoke 4)")
    p.add_argument("--gens", type=int, default=3, help="generate calls per block")
    p.add_argument("--new", type=int, default=None, help="new tokens per call (default 32; smoke 8)")
    p.add_argument("--period-s", type=float, default=0.05)
    p.add_argument("--cache", choices=["dynamic", "static"], default="dynamic",
                   help="cache_implementation (static: compiled by transformers on CUDA)")
    p.add_argument("--model-root", default=None)
    args = p.parse_args(argv)
    pairs = args.pairs or (4 if args.smoke else 25)
    new = args.new or (8 if args.smoke else 32)
    root = Path(args.model_root or (B.DEFAULT_MODEL_ROOT if args.smoke else "/tmp/llem-gpu-models"))
    name = "tiny-llama" if args.smoke else "llama-1b"
    hdr = B.header()
    B.ensure_model(root, name, "llama" if args.smoke else "llama-1b")
    ref = B.Reference(root, "cpu" if args.smoke else "auto")
    cfg = B.Config(name, new, 1, 32 if args.smoke else 128,
                   pytorch={"cache_implementation": "static"} if args.cache == "static" else None)
    run = ref.prepare(cfg)

    ctx = mp.get_context("spawn")
    go, stop, reads = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    child = ctx.Process(target=reader, args=(go, stop, args.period_s, args.smoke, reads), daemon=True)
    child.start()
    try:
        for _ in range(3):  # warm-up (static: the compile)
            run()
        ref.sync()
        times = {"on": [], "off": []}
        n_reads = 0
        for i in range(pairs):
            for side in (("on", "off") if i % 2 == 0 else ("off", "on")):
                (go.set if side == "on" else go.clear)()
                time.sleep(0.12)  # the reader is (not) running before the block starts
                r0 = reads.value
                ref.sync()
                t = time.perf_counter()
                for _ in range(args.gens):
                    run()
                ref.sync()
                times[side].append(time.perf_counter() - t)
                if side == "on":
                    n_reads += reads.value - r0
        go.clear()
    finally:
        stop.set()
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    ratios = sorted(a / b for a, b in zip(times["on"], times["off"]))
    med = statistics.median(ratios)
    q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
    mean = statistics.fmean(ratios)
    se = statistics.stdev(ratios) / len(ratios) ** 0.5 if len(ratios) > 1 else float("nan")
    on_s = sum(times["on"])
    rows = [[args.cache, pairs, args.gens, new, B.med(times["off"]), B.med(times["on"]), med, f"{q1:.4f}–{q3:.4f}",
             f"{mean:.4f} ± {2 * se:.4f}", n_reads / on_s if on_s else None]]
    table = B.Table("Generation time with a second process reading NVML every "
                    f"{args.period_s * 1000:.0f} ms vs not (block time on / off)",
                    ["cache", "pairs", "generate calls per block", "new tokens", "off block s (p50)", "on block s (p50)",
                     "on / off (median)", "on / off (IQR)", "on / off (mean ± 2 s.e.)", "reads per s during on"],
                    rows,
                    "Each read = energy counter + temperature + clock event reasons (what the sampler reads). "
                    "The server's sampler reads at most this often (about half as often once phase-locked).")
    B.write_results("nvml_interference-" + ("smoke" if args.smoke else "gpu")
                    + ("-static" if args.cache == "static" else ""), hdr, [table],
                    data={"times": times, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
