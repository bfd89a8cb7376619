"""The README's first command, end to end: make a small model, serve it, call it, stop.

    python buildscripts/demo.py [--model-root DIR] [--port PORT] [--kind llama|gpt2]

Makes a tiny random-weight Llama-style model (tokenizer trained on the spot, nothing
downloaded) under the model root, starts ``llem-server`` on loopback, generates twice
through the Python client (the second call is a cache hit), prints the completions,
the config hash and the energy answer, and stops the server.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-root", type=Path, default=ROOT / "demo" / "models")
    p.add_argument("--kind", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = p.parse_args()

    from llem_server.demo import BUILDERS

    model_dir = args.model_root / "demo"
    if not (model_dir / "config.json").exists():
        print(f"making a small {args.kind} model in {model_dir} ...", flush=True)
        BUILDERS[args.kind](model_dir)

    port_file = Path(tempfile.mkdtemp()) / "port"
    server = subprocess.Popen([sys.executable, "-m", "llem_server", "--port", str(args.port), "--port-file",
                               str(port_file), "--model-root", str(args.model_root), "--log-format", "console",
                               "--log-level", "warning"])
    try:
        deadline = time.monotonic() + 180
        while not port_file.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                print("llem-server did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        address = f"127.0.0.1:{port_file.read_text().strip()}"

        from llem_client import Client

        with Client(address, timeout=300) as client:
            prompts = ["The energy of a GPU", "Café au lait, 東京 🙂"]
            for attempt in (1, 2):
                r = client.generate(prompts, model="demo", pytorch={"batch_size": 2},
                                    decoder={"preset": "deterministic"}, max_output_tokens=16)
                print(f"\n--- call {attempt}: config_hash {r.config_hash}  cache_hit: {str(r.cache_hit).lower()}")
                for c in r.completions:
                    print(f"  [{c.index}] {prompts[c.index]!r} -> {c.text!r} "
                          f"({c.input_tokens} in, {c.output_tokens} out, {pb_reason(c.finish_reason)})")
                t = r.timing
                ttft = f"{t.time_to_first_token_ms:.1f} ms" if t.HasField("time_to_first_token_ms") else "n/a"
                print(f"  timing: total {t.total_ms:.1f} ms, load {t.load_ms:.1f} ms, first token {ttft}, "
                      f"inter-token p50 {t.inter_token_latency.median_ms:.2f} ms")
                e = r.energy
                if e.available:
                    print(f"  energy: {e.total_j:.3f} J ± {e.uncertainty_j:.3f} J over {e.duration_s:.3f} s "
                          f"({e.method}), {e.joules_per_output_token:.4f} J/token")
                else:
                    print(f"  energy: not measured: {e.unavailable_reason}")
            info = client.server_info()
            print(f"\nserver {info.server_version}: torch {info.versions['torch']}, "
                  f"transformers {info.versions['transformers']}, device {info.devices[0].name}")
        return 0
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        print("server stopped")


def pb_reason(value: int) -> str:
    from llem.v1 import llem_pb2

    return llem_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
