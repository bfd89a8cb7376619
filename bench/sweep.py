"""A study sweep: several decoder and batch settings over one load config.

A fresh server; every request names the same model and load fields, so the model must
load once (the first request) and be a cache hit after. Reported: loads counted (requests
with ``cache_hit`` false, and the cached models ``ListModels`` shows: both must be one), and
the sweep's total wall time against the sum of the server's generation times
(``timing.generate_ms``) and the load time, per setting and in total.

    python bench/sweep.py                          # tiny CPU model, < 1 min on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as B  # noqa: E402

SETTINGS = [
    ("greedy", 1, {"temperature": 0.0}, {}),
    ("greedy", 4, {"temperature": 0.0}, {}),
    ("sampling (standard preset)", 1, {"preset": "standard"}, {}),
    ("sampling (standard preset)", 4, {"preset": "standard"}, {}),
    ("sampling t=0.7 top_k=20", 2, {"temperature": 0.7, "top_k": 20}, {}),
    ("greedy + repetition_penalty 1.2", 2, {"temperature": 0.0, "repetition_penalty": 1.2}, {}),
    ("beam search, 2 beams", 1, {"temperature": 0.0}, {"num_beams": 2}),
    ("greedy, static cache", 4, {"temperature": 0.0}, {"cache_implementation": "static"}),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    B.common_args(p, reps=2)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--prompts", type=int, default=8, help="prompts per request")
    args = p.parse_args(argv)
    hdr = B.header()
    root = B.prepare_model(args)
    srv = B.start_server(Path(tempfile.mkdtemp(prefix="llem-bench-sw-")), root, "--energy-backend", "none",
                         *B.device_flags(args), *args.server_arg)
    rows, data = [], []
    try:
        with B.client(srv.address) as c:
            t_sweep = time.perf_counter()
            for name, bs, decoder, pytorch in SETTINGS:
                cfg = B.Config(args.model, args.new, bs, args.input_tokens, pytorch=pytorch, decoder=decoder)
                cfg_prompts = [f"{i} {B.SENTENCES * (args.input_tokens // 32 + 2)}" for i in range(args.prompts)]
                from llem_client import _core

                req = _core.generate_request(cfg_prompts, **cfg.client_kwargs())
                for _ in range(args.reps):
                    t = time.perf_counter()
                    r = c.generate_request(req)
                    wall = time.perf_counter() - t
                    rows.append([name, bs, r.cache_hit, r.usage.output_tokens, wall * 1e3, r.timing.load_ms,
                                 r.timing.generate_ms, wall * 1e3 - r.timing.generate_ms - r.timing.load_ms])
                    data.append({"setting": name, "batch": bs, "cache_hit": r.cache_hit, "wall_s": wall,
                                 "load_ms": r.timing.load_ms, "generate_ms": r.timing.generate_ms,
                                 "output_tokens": r.usage.output_tokens, "config_hash": r.config_hash})
            total = time.perf_counter() - t_sweep
            models = c.list_models().models
    finally:
        srv.stop()
    loads = sum(1 for d in data if not d["cache_hit"])
    hashes = {d["config_hash"] for d in data}
    gen = sum(d["generate_ms"] for d in data) / 1e3
    load = sum(d["load_ms"] for d in data) / 1e3
    t1 = B.Table(f"Sweep: {len(SETTINGS)} settings × {args.reps} requests of {args.prompts} prompts, {args.new} new tokens, one load config",
                 ["setting", "batch", "cache hit", "output tokens", "wall ms", "load ms", "generate ms",
                  "wall − load − generate ms"], rows)
    t2 = B.Table("Sweep totals", ["requests", "config hashes", "loads (cache_hit false)", "models cached (ListModels)",
                                  "total wall s", "Σ load s", "Σ generate s", "overhead s", "Σ generate / (wall − load)"],
                 [[len(data), len(hashes), loads, len(models), total, load, gen, total - load - gen,
                   gen / (total - load) if total > load else None]],
                 "Must be: one config hash, one load, one cached model. Overhead = wall − Σ load − Σ generate: "
                 "tokenization, transport, front and pipe for every request.")
    B.write_results(B.result_name("sweep", args), hdr, [t1, t2], data=data)
    return 0 if loads == 1 and len(models) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
