"""Metering cost: tokens/s and p50 latency with energy metering on vs off.

Two servers on the same model: one meters energy (``--energy-backend simulated`` on a
CPU machine: the real sampler thread and attribution on a simulated NVML counter with
a 100 ms update period; ``auto`` = real NVML on a GPU), one with ``--energy-backend none``.
Requests alternate between them, so drift hits both alike. Two loads:

* one client, requests back to back: every response waits for the energy counter's next
  update past the window's end (energy.md rule 2: the counter is the truth, ~100 ms
  update period), so latency and single-client tokens/s carry that wait;
* several clients per server, pipelined (``--pipelined-clients``): the device runs the next request
  while the previous one's energy settles, so tokens/s shows the device-side cost of
  metering (sampler thread, window bookkeeping).

    python bench/metering.py                       # tiny CPU model, simulated counter, < 2 min
    python bench/metering.py --on-backend auto --model llama-1b --kind llama-1b --new 128 --input-tokens 128
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402


def pipelined(address: str, req, seconds: float, clients: int = 2, records: list | None = None) -> tuple[int, float, list[float]]:
    """(output tokens, wall s, generate s per request) with ``clients`` back-to-back clients.
    ``records``, if given, gets one dict of server timings per measured request."""
    toks, gens, failed = [0], [], []
    lock = threading.Lock()
    stop = [0.0]  # set once every client has warmed up: the block measures only steady state
    # A client that fails breaks the barrier (no one waits for it for ever) and is re-raised.
    bar = threading.Barrier(clients + 1, timeout=120)

    def worker():
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failed.append(exc)
            bar.abort()

    def run():
        with B.client(address) as c:
            c.generate_request(req)
            bar.wait()
            bar.wait()
            while time.perf_counter() < stop[0]:
                r = c.generate_request(req)
                tm = r.timing
                with lock:
                    toks[0] += r.usage.output_tokens
                    gens.append(tm.generate_ms / 1e3)
                    if records is not None:
                        records.append({"generate_ms": tm.generate_ms, "queue_wait_ms": tm.queue_wait_ms,
                                        "energy_wait_ms": tm.energy_wait_ms, "total_ms": tm.total_ms,
                                        "tokenization_ms": tm.tokenization_ms})

    ts = [threading.Thread(target=worker) for _ in range(clients)]
    for t in ts:
        t.start()
    t0 = time.perf_counter()
    try:
        bar.wait()
        t0 = time.perf_counter()
        stop[0] = t0 + seconds
        bar.wait()
    except threading.BrokenBarrierError:
        pass
    for t in ts:
        t.join()
    if failed:
        raise RuntimeError(f"{len(failed)} of {clients} pipelined clients failed: {failed[0]!r}") from failed[0]
    return toks[0], time.perf_counter() - t0, gens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.common_args(p, reps=30)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--on-backend", default=None, help="metering backend (default: simulated on CPU, auto on GPU)")
    p.add_argument("--pipelined-s", type=float, default=6.0, help="seconds per pipelined block (0: skip)")
    p.add_argument("--blocks", type=int, default=2, help="pipelined blocks per server (alternating)")
    p.add_argument("--pipelined-clients", type=int, default=4,
                   help="clients per server in the pipelined blocks: enough that one generation always waits "
                        "while others wait for their energy (> 1 + energy wait / generate time)")
    args = p.parse_args(argv)
    hdr = B.header()
    root = B.prepare_model(args)
    try:
        import torch

        gpu = args.device != "cpu" and torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    on_backend = args.on_backend or ("auto" if gpu else "simulated")
    tmp = Path(tempfile.mkdtemp(prefix="llem-bench-me-"))
    starting = [B.ServerStarting(tmp / "on", root, "--energy-backend", on_backend, *B.device_flags(args),
                                 *args.server_arg),
                B.ServerStarting(tmp / "off", root, "--energy-backend", "none", *B.device_flags(args),
                                 *args.server_arg)]
    servers = [s.wait() for s in starting]
    rows, prow, data = [], [], {}
    try:
        clients = [B.client(s.address) for s in servers]
        for bs in args.batches:
            cfg = B.Config(args.model, args.new, bs, args.input_tokens)
            req = cfg.request()
            for c in clients:
                for _ in range(args.warmup):
                    c.generate_request(req)
            # k = 0: metered, energy in the response; 1: unmetered; 2: metered, energy deferred
            # (answered at once, fetched with GetEnergy after the timed call)
            lat = {0: [], 1: [], 2: []}
            energy_ok, deferred_ok, waits = 0, 0, []
            B.log(f"batch {bs}: {args.reps} rounds of [in-response, unmetered, deferred] in rotating order ...")
            for i in range(args.reps):
                for k in (0, 1, 2)[i % 3:] + (0, 1, 2)[:i % 3]:
                    rid = f"bench-{bs}-{i}"
                    dt, r = B.timed_generate(clients[1 if k == 1 else 0], cfg, B.deferred(req, rid) if k == 2 else req)
                    lat[k].append(dt)
                    if k == 0:
                        energy_ok += bool(r.energy.available)
                        waits.append(r.timing.energy_wait_ms)
                    if k == 2:
                        got = clients[0].get_energy(rid, wait_seconds=5).results[0].energy
                        deferred_ok += bool(got.available)
            toks = bs * args.new
            on50, off50, def50 = (B.pct(lat[k], 50) * 1e3 for k in (0, 1, 2))
            rows.append([bs, args.reps, f"{energy_ok}/{args.reps}", f"{deferred_ok}/{args.reps}", toks / B.med(lat[1]),
                         toks / B.med(lat[0]), B.med(lat[1]) / B.med(lat[0]), B.med(lat[1]) / B.med(lat[2]), off50,
                         on50 - off50, B.pct(waits, 50), def50 - off50])
            data[f"seq-{bs}"] = {"on_s": lat[0], "off_s": lat[1], "deferred_s": lat[2], "energy_wait_ms": waits}
            if args.pipelined_s > 0:
                res = {0: [0, 0.0], 1: [0, 0.0]}
                for blk in range(args.blocks):
                    for k in ((0, 1) if blk % 2 == 0 else (1, 0)):
                        n, wall, _ = pipelined(servers[k].address, req, args.pipelined_s, args.pipelined_clients)
                        res[k][0] += n
                        res[k][1] += wall
                on_tps, off_tps = res[0][0] / res[0][1], res[1][0] / res[1][1]
                prow.append([bs, off_tps, on_tps, on_tps / off_tps])
                data[f"pipelined-{bs}"] = res
        for c in clients:
            c.close()
    finally:
        for s in servers:
            s.stop()
    t1 = B.Table(f"Metering on ({on_backend}) vs off: one client, back to back, {args.new} new tokens",
                 ["batch", "reps", "energy in response", "deferred energy fetched", "off tok/s", "on tok/s", "on / off",
                  "deferred / off", "off p50 ms", "on: p50 added ms", "on: energy wait p50 ms",
                  "deferred: p50 added ms"], rows,
                 "Targets (energy.md rule 9): tok/s on ≥ 0.99 × off; p50 at most 1 ms higher. A response that "
                 "carries its energy waits for the counter's first update after the window's end (~100 ms update "
                 "period: timing.energy_wait_ms); with energy_delivery = DEFERRED it is sent at once and the energy "
                 "is fetched with GetEnergy.")
    tables = [t1]
    if prow:
        tables.append(B.Table(f"Metering on vs off: {args.pipelined_clients} clients per server, pipelined (the device does not wait for energy reports)",
                              ["batch", "off tok/s", "on tok/s", "on / off"], prow))
    B.write_results(B.result_name("metering", args), hdr, tables, data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
