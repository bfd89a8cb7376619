"""Throughput: output tokens/s through the service vs in-process, batch 1 and 8.

Same model, prompts, tokenization and generate kwargs on both sides (``common.Reference``);
greedy with ``min_new_tokens`` so every run makes exactly batch × new tokens. One client,
requests back to back, in-process and service runs interleaved (order alternating), median
of ``--reps`` after ``--warmup``.

    python bench/throughput.py                     # tiny CPU model, < 2 min on 2 cores
    python bench/throughput.py --model llama-1b --kind llama-1b --new 128 --input-tokens 128   # GPU
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
    B.common_args(p, reps=10)
    p.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="prompts per request (one generate call)")
    p.add_argument("--cache", default=None, help="pytorch.cache_implementation, e.g. static")
    args = p.parse_args(argv)
    hdr = B.header()
    root = B.prepare_model(args)
    ref = B.Reference(root, args.device)
    srv = B.start_server(Path(tempfile.mkdtemp(prefix="llem-bench-tp-")), root, "--energy-backend", "none",
                         *B.device_flags(args), *args.server_arg)
    rows, data = [], {}
    extra = {"cache_implementation": args.cache} if args.cache else None
    try:
        with B.client(srv.address) as c:
            for bs in args.batches:
                cfg = B.Config(args.model, args.new, bs, args.input_tokens, pytorch=extra)
                plain, wpath, req = ref.prepare(cfg), ref.prepare_worker_path(cfg), cfg.request()
                for _ in range(args.warmup):
                    plain(), wpath(), c.generate_request(req)
                t_in, t_wp, t_sv, gen = [], [], [], []
                B.log(f"batch {bs}: {args.reps} reps ...")
                for i in range(args.reps):
                    for who in ((0, 1, 2) if i % 2 == 0 else (2, 1, 0)):
                        t = time.perf_counter()
                        if who == 0:
                            assert plain() == bs * args.new
                            ref.sync()
                            t_in.append(time.perf_counter() - t)
                        elif who == 1:
                            wpath()
                            ref.sync()
                            t_wp.append(time.perf_counter() - t)
                        else:
                            r = c.generate_request(req)
                            t_sv.append(time.perf_counter() - t)
                            assert r.usage.output_tokens == bs * args.new
                            gen.append(r.timing.generate_ms / 1e3)
                toks = bs * args.new
                tin, twp, tsv = toks / B.med(t_in), toks / B.med(t_wp), toks / B.med(t_sv)
                rows.append([bs, args.new, args.reps, tin, twp, tsv, tsv / tin, toks / B.med(gen), tsv / twp])
                data[str(bs)] = {"in_process_s": t_in, "worker_path_s": t_wp, "service_s": t_sv,
                                 "server_generate_s": gen}
    finally:
        srv.stop()
    t = B.Table("Throughput: output tokens/s, service vs in-process (one client, back to back)",
                ["batch", "new tokens", "reps", "in-process tok/s", "worker path tok/s", "service tok/s",
                 "service / in-process", "server generate-only tok/s", "service / worker path"], rows,
                "Target (anchors.md): service ≥ 0.98 × in-process (GPU, batch 1, eager and compiled). "
                "'worker path' is llem_server.generation.run_generate in this process (step hook + cancel "
                "criterion, no pipe, no gRPC).")
    B.write_results(B.result_name("throughput", args), hdr, [t], data=data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
