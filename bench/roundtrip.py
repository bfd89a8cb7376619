"""Round trip: the same small model and config in-process and through Generate on loopback.

For 1 and 64 new tokens (batch 1, greedy, ``min_new_tokens`` = new tokens), one run
measures, interleaved request by request so that drift hits both sides alike:

* in-process, plain: tokenize as the worker does, ``model.generate`` with the worker's
  kwargs, ids to a list, decode (``common.Reference.prepare``);
* in-process, worker path: ``llem_server.generation.run_generate`` itself (step hook and
  cancel criterion included; no pipe, no gRPC);
* through the service: ``llem_client.Client.generate`` on loopback against a real
  ``llem-server`` with a cached model (server-side timing read from the response).

Reports median and p99 of each, the ratio in-process/service (of medians: tokens/s
through the service as a fraction of in-process), and the fixed cost (service p50 −
in-process p50) with where it goes (client+transport = client-observed − server
``total_ms``; front+pipe = ``total_ms`` − worker ``generate_ms`` − tokenization).

    python bench/roundtrip.py                       # tiny CPU model, < 2 min on 2 cores
    python bench/roundtrip.py --model llama-1b --kind llama-1b --new 1 128 --reps 20   # GPU
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.common_args(p, reps=200)
    p.add_argument("--new", type=int, nargs="+", default=[1, 64], help="new-token counts to measure")
    p.add_argument("--reps-long", type=int, default=40, help="repetitions for new-token counts > 1")
    args = p.parse_args(argv)
    hdr = B.header()
    root = B.prepare_model(args)
    ref = B.Reference(root, args.device)
    srv = B.start_server(Path(tempfile.mkdtemp(prefix="llem-bench-rt-")), root, "--energy-backend", "none",
                         *B.device_flags(args), *args.server_arg)
    rows, breakdown, data = [], [], {}
    try:
        with B.client(srv.address) as c:
            for n in args.new:
                cfg = B.Config(args.model, n, 1, args.input_tokens)
                plain, wpath, req = ref.prepare(cfg), ref.prepare_worker_path(cfg), cfg.request()
                reps = args.reps if n == 1 else args.reps_long
                for _ in range(args.warmup):
                    plain(), wpath(), c.generate_request(req)
                t_in, t_wp, t_sv, srv_total, srv_gen, srv_tok = [], [], [], [], [], []
                B.log(f"new_tokens={n}: {reps} reps ...")
                for i in range(reps):
                    order = (0, 1, 2) if i % 2 == 0 else (2, 1, 0)  # alternate who goes first
                    for who in order:
                        if who == 0:
                            t = time.perf_counter()
                            k = plain()
                            ref.sync()
                            t_in.append(time.perf_counter() - t)
                            assert k == n, (k, n)
                        elif who == 1:
                            t = time.perf_counter()
                            wpath()
                            ref.sync()
                            t_wp.append(time.perf_counter() - t)
                        else:
                            dt, r = B.timed_generate(c, cfg, req)
                            assert r.usage.output_tokens == n and r.cache_hit, (r.usage.output_tokens, r.cache_hit)
                            t_sv.append(dt)
                            srv_total.append(r.timing.total_ms / 1e3)
                            srv_gen.append(r.timing.generate_ms / 1e3)
                            srv_tok.append(r.timing.tokenization_ms / 1e3)
                ms = lambda xs, q: B.pct(xs, q) * 1e3  # noqa: E731
                in50, sv50 = ms(t_in, 50), ms(t_sv, 50)
                rows.append([n, reps, in50, ms(t_in, 99), ms(t_wp, 50), sv50, ms(t_sv, 99),
                             in50 / sv50, sv50 - in50])
                breakdown.append([n, sv50, ms(srv_total, 50), ms(srv_gen, 50), ms(srv_tok, 50),
                                  B.pct([a - b for a, b in zip(t_sv, srv_total)], 50) * 1e3,
                                  B.pct([a - b - c_ for a, b, c_ in zip(srv_total, srv_gen, srv_tok)], 50) * 1e3,
                                  ms(t_wp, 50) - in50])
                data[str(n)] = {"in_process_s": t_in, "worker_path_s": t_wp, "service_s": t_sv,
                                "server_total_s": srv_total, "server_generate_s": srv_gen}
    finally:
        srv.stop()
    t1 = B.Table("Round trip: in-process vs Generate on loopback (batch 1, greedy, cached model)",
                 ["new tokens", "reps", "in-process p50 ms", "in-process p99 ms", "worker path p50 ms",
                  "service p50 ms", "service p99 ms", "ratio in/service (p50)", "fixed cost p50 ms"], rows,
                 "ratio = in-process p50 / service p50 = service tokens/s as a fraction of in-process. "
                 "Target (anchors.md): fixed cost p50 ≤ 2 ms; ≥ 0.98 of in-process tokens/s.")
    t2 = B.Table("Where the fixed cost goes (medians, ms)",
                 ["new tokens", "client-observed", "server total_ms", "worker generate_ms", "tokenization_ms",
                  "client + gRPC transport", "front + pipe (total − generate − tokenize)",
                  "hook + criterion (worker path − plain)"], breakdown)
    B.write_results(B.result_name("roundtrip", args), hdr, [t1, t2], data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
