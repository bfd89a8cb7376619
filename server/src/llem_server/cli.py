"""``llem-server``: serve models over gRPC with per-request GPU energy."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .service import Settings


def _devices(spec: str) -> str:
    """auto, cpu or distinct CUDA indices: one index twice would be two workers on one GPU,
    each timing its windows as if it ran alone there."""
    if spec in ("auto", "cpu"):
        return spec
    parts = [x.strip() for x in spec.split(",")]
    if not all(x.isdigit() for x in parts):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected auto, cpu, or CUDA indices such as 0,1")
    if len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"{spec!r}: each GPU once (one worker per GPU)")
    return ",".join(parts)


def _pids(spec: str) -> tuple[int, ...]:
    parts = [x.strip() for x in spec.split(",") if x.strip()]
    if not all(x.isdigit() and int(x) > 0 for x in parts):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected process ids such as 4242,4243")
    return tuple(map(int, parts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llem-server", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 picks a free one; see --port-file)")
    p.add_argument("--port-file", type=Path, help="write the bound port to this file once serving")
    p.add_argument("--model-root", type=Path, default=Path("."),
                   help="a request's model name resolves to a directory under this folder")
    p.add_argument("--allow-hub", action="store_true", help="allow Hugging Face hub ids as model names")
    p.add_argument("--allow-remote-code", action="store_true", help="allow trust_remote_code=true")
    p.add_argument("--max-models", type=int, default=2, help="models kept loaded per device (LRU eviction)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting per device before RESOURCE_EXHAUSTED")
    p.add_argument("--max-prompts", type=int, default=256, help="prompts per request at most")
    p.add_argument("--max-input-tokens", type=int, default=8192, help="max_input_tokens at most")
    p.add_argument("--max-output-tokens", type=int, default=4096, help="max_output_tokens at most")
    p.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024, help="largest request message")
    p.add_argument("--devices", default="auto", type=_devices,
                   help="auto, cpu, or comma-separated CUDA indices (each once)")
    p.add_argument("--energy-backend", choices=["auto", "nvml", "simulated", "none"], default="auto",
                   help="where GPU energy comes from; 'simulated' is a known-power fake counter for tests")
    p.add_argument("--simulated-power-w", type=float, default=150.0, help="power of the simulated counter")
    p.add_argument("--simulated-other-pids", type=_pids, default=(),
                   help="PIDs the simulated GPU lists as compute processes beside the worker "
                        "(shows ENERGY_OTHER_PROCESSES)")
    p.add_argument("--baseline-seconds", type=float, default=0.0,
                   help="measure idle power this long at start-up, before serving (0: only via MeasureBaseline)")
    p.add_argument("--deferred-energy-keep", type=int, default=10_000,
                   help="energies of ENERGY_DELIVERY_DEFERRED requests kept for GetEnergy (most recent)")
    p.add_argument("--auth-token-file", type=Path,
                   help="bearer tokens, one per line (ASCII, at least 16 characters; lines starting with '#' are comments): "
                        "required on every llem.v1 call; health and reflection stay open for probes")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics (plain HTTP, no auth) on this port")
    p.add_argument("--metrics-host", help="address the metrics port listens on (default: --host); "
                                          "e.g. a private interface while gRPC listens on 0.0.0.0")
    p.add_argument("--grace-seconds", type=float, default=30.0, help="time in-flight calls get on SIGTERM")
    p.add_argument("--log-format", choices=["auto", "json", "console"], default="auto",
                   help="log lines: json (one object per line), console (readable), or auto: "
                        "console on a terminal, json otherwise")
    p.add_argument("--log-level", default="info", help="debug, info, warning, error or critical")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("llem-server: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if not args.model_root.is_dir():
        print(f"llem-server: --model-root {args.model_root} is not a directory", file=sys.stderr)
        return 2
    settings = Settings(
        host=args.host, port=args.port, model_root=args.model_root.resolve(), max_models=args.max_models,
        max_queue=args.max_queue, max_prompts=args.max_prompts, max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens, max_message_bytes=args.max_message_bytes,
        allow_hub=args.allow_hub, allow_remote_code=args.allow_remote_code, grace_seconds=args.grace_seconds,
        energy_backend=args.energy_backend, devices=args.devices, deferred_energy_keep=args.deferred_energy_keep,
        extra={"simulated_power_w": args.simulated_power_w, "simulated_other_pids": args.simulated_other_pids,
               "baseline_seconds": args.baseline_seconds},
    )
    from .logs import configure, get_logger

    as_json = {"json": True, "console": False}.get(args.log_format)
    if as_json is None:
        as_json = not sys.stderr.isatty()
    configure(json=as_json, level=args.log_level)
    # Worker processes (spawned, so they inherit the environment) log the same way.
    os.environ["LLEM_LOG_FORMAT"] = "json" if as_json else "console"
    os.environ["LLEM_LOG_LEVEL"] = args.log_level
    if args.auth_token_file:
        from .auth import load_tokens

        try:
            load_tokens(args.auth_token_file, warn=False)  # fail at start-up, not on the first call
        except (OSError, ValueError) as exc:
            print(f"llem-server: --auth-token-file: {exc}", file=sys.stderr)
            return 2
    tls = (args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    if tls is not None:
        from .tls import TLSConfigError, server_credentials

        try:
            server_credentials(*tls)  # unreadable or mismatched files: a clear message, exit 2
        except TLSConfigError as exc:
            print(f"llem-server: {exc}", file=sys.stderr)
            return 2
    from .app import run

    return run(settings, port_file=args.port_file, auth_token_file=args.auth_token_file, tls=tls,
               metrics_port=args.metrics_port, metrics_host=args.metrics_host,
               log=get_logger())


if __name__ == "__main__":
    sys.exit(main())
