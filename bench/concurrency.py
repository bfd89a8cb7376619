"""Concurrency: 1, 4 and 16 clients against one server: tokens/s, latency percentiles, queue wait.

Each client is a thread with its own ``llem_client.Client`` (own channel) sending
batch-1 requests back to back; the server runs one generation at a time per device,
so extra clients queue. Reported per level: output tokens/s over the level's wall time,
client-observed latency p50/p90/p99, server-reported queue wait p50/p99, and the device's
busy fraction (sum of worker generate time / wall time).

    python bench/concurrency.py                    # tiny CPU model, < 1 min on 2 cores
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


def run_level(address: str, cfg: B.Config, clients: int, per_client: int) -> dict:
    req = cfg.request()
    lat, qw, gen, toks, errors = [], [], [], [], []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)

    def worker():
        with B.client(address) as c:
            c.generate_request(req)  # connect (not measured)
            start.wait()
            for _ in range(per_client):
                try:
                    dt, r = B.timed_generate(c, cfg, req)
                except Exception as exc:  # noqa: BLE001 - count it, keep going
                    with lock:
                        errors.append(repr(exc)[:200])
                    continue
                with lock:
                    lat.append(dt)
                    qw.append(r.timing.queue_wait_ms)
                    gen.append(r.timing.generate_ms / 1e3)
                    toks.append(r.usage.output_tokens)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat), "errors": errors, "wall_s": wall, "tokens": sum(toks),
            "latency_s": lat, "queue_wait_ms": qw, "generate_s": gen}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.common_args(p, reps=48)
    p.add_argument("--new", type=int, default=32, help="new tokens per request")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--energy-backend", default="none", choices=["none", "simulated", "auto", "nvml"])
    args = p.parse_args(argv)
    hdr = B.header()
    root = B.prepare_model(args)
    srv = B.start_server(Path(tempfile.mkdtemp(prefix="llem-bench-cc-")), root, "--energy-backend",
                         args.energy_backend, *B.device_flags(args), *args.server_arg)
    cfg = B.Config(args.model, args.new, 1, args.input_tokens)
    rows, data = [], []
    try:
        with B.client(srv.address) as c:
            for _ in range(args.warmup):
                c.generate_request(cfg.request())
        for n in args.clients:
            per = max(1, args.reps // n)
            B.log(f"{n} clients x {per} requests ...")
            r = run_level(srv.address, cfg, n, per)
            lat = [x * 1e3 for x in r["latency_s"]]
            rows.append([n, r["requests"], len(r["errors"]), r["tokens"] / r["wall_s"], B.pct(lat, 50),
                         B.pct(lat, 90), B.pct(lat, 99), B.pct(r["queue_wait_ms"], 50), B.pct(r["queue_wait_ms"], 99),
                         sum(r["generate_s"]) / r["wall_s"]])
            data.append(r)
    finally:
        srv.stop()
    t = B.Table(f"Concurrency: batch-1 requests of {args.new} new tokens, one device, energy backend {args.energy_backend}",
                ["clients", "requests", "errors", "tok/s", "latency p50 ms", "p90 ms", "p99 ms", "queue wait p50 ms",
                 "queue wait p99 ms", "device busy (Σ generate / wall)"], rows,
                "One generation at a time per device: with more clients latency grows by the queue wait "
                "while tok/s stays at the device's rate; 'device busy' near 1 means the front keeps the device fed.")
    B.write_results(B.result_name("concurrency", args), hdr, [t], data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
