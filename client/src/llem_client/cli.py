"""``llem-client``: run experiment YAMLs against an llem-server, and manage it.

Exit codes: 0 success, 1 server or run error, 2 configuration error,
130 interrupted (Ctrl-C; a run writes its partial result first); a run stopped by
SIGTERM or SIGHUP is treated as Ctrl-C and exits 128 + the signal (143, 129).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_ERROR, EXIT_CONFIG, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_SERVER = "127.0.0.1:50051"


# ---------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------


def _connection_parent() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--server", default=os.environ.get("LLEM_SERVER", DEFAULT_SERVER),
                   help="HOST[:PORT] (port 50051 when left out), h1:p,h2:p (round robin) or dns:///host:port (default: $LLEM_SERVER or %(default)s)")
    g.add_argument("--token", default=os.environ.get("LLEM_TOKEN"), help="bearer token (default: $LLEM_TOKEN)")
    g.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    g.add_argument("--ca-cert", metavar="FILE", help="CA certificate (PEM) to trust; implies --tls")
    g.add_argument("--client-cert", metavar="FILE", help="client certificate (PEM) for mTLS")
    g.add_argument("--client-key", metavar="FILE", help="client private key (PEM) for mTLS")
    g.add_argument("--server-name", help="name to verify the server certificate against")
    g.add_argument("--timeout", type=float, default=None, help="deadline per call in seconds (not for run's generation)")
    return p


def _in_flight(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of requests, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (1 sends strictly one request after another), got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    conn = _connection_parent()
    parser = argparse.ArgumentParser(
        prog="llem-client",
        description="Client for llem-serve: run experiments with per-request GPU energy, inspect and manage the server.",
        epilog="Exit codes: 0 success, 1 server or run error, 2 configuration error, 130 interrupted "
               "(run: 143 on SIGTERM, 129 on SIGHUP).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"llem-client {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", parents=[conn], help="run an experiment YAML (config.md §6)",
                         description="Run an experiment YAML remotely: load, warm-up, baseline, measured requests, summary, JSON result.")
    run.add_argument("config", metavar="CONFIG.yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. pytorch.batch_size=4 decoder.preset=deterministic")
    run.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE", help="a dotted override (repeatable)")
    run.add_argument("--model", help="override model")
    run.add_argument("-n", "--n", dest="n", type=int, help="override n (number of prompts)")
    run.add_argument("--batch-size", type=int, help="override pytorch.batch_size (prompts per request)")
    run.add_argument("--precision", help="override precision (fp32, fp16, bf16)")
    run.add_argument("--dataset", help="override dataset: a .jsonl file (one object a line with a \"prompt\" or "
                                       "\"text\" string, optional \"source\") or a .txt file (one prompt a line)")
    run.add_argument("--output", "-o", help="override output_dir")
    run.add_argument("--in-flight", type=_in_flight, default=2, metavar="N",
                     help="measured Generate requests kept outstanding (default: %(default)s). The server runs one at a time "
                          "per device, but answers each only after the energy counter's next update (~60 ms p50 on an H200); "
                          "with the next request already queued the device need not idle during that wait. "
                          "1: strictly sequential")
    run.add_argument("--energy-delivery", choices=["response", "in_response", "deferred"], default="response",
                     help="response (or in_response, as the Python API names it; the default): each answer carries its energy, after the counter's next update. "
                          "deferred: answers come without that wait (clean latencies even with --in-flight 1) and the "
                          "energies are fetched with GetEnergy as the run goes (every few requests) and at its end")
    run.add_argument("--json", action="store_true", help="print the result JSON to stdout (the summary goes to stderr)")
    run.add_argument("--dry-run", action="store_true", help="validate the config and print the effective configuration; send nothing")

    info = sub.add_parser("info", parents=[conn], help="server version, devices, energy sensors, limits")
    info.add_argument("--json", action="store_true", help="print the GetServerInfo answer as JSON")
    models = sub.add_parser("models", parents=[conn], help="list cached models")
    models.add_argument("--json", action="store_true", help="print the ListModels answer as JSON")
    load = sub.add_parser("load", parents=[conn], help="load a model ahead of time",
                          description="Load a model (by name, or model/precision/pytorch from an experiment YAML).")
    load.add_argument("target", metavar="MODEL|CONFIG.yaml")
    load.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. pytorch.attn_implementation=eager")
    load.add_argument("--precision", help="fp32, fp16 or bf16 (default: the server's)")
    load.add_argument("--json", action="store_true", help="print the LoadModel answer as JSON")
    unload = sub.add_parser("unload", parents=[conn], help="unload a model by config hash (a unique prefix is enough)")
    unload.add_argument("config_hash")
    unload.add_argument("--json", action="store_true", help="print the UnloadModel answer as JSON")
    health = sub.add_parser("health", parents=[conn], help="grpc.health.v1 check; exit 0 when SERVING")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    return parser


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _client(args: argparse.Namespace):
    from .client import Client

    return Client(
        args.server,
        token=args.token,
        tls=args.tls,
        root_certificates=args.ca_cert,
        certificate_chain=args.client_cert,
        private_key=args.client_key,
        server_name=args.server_name,
        timeout=args.timeout,
    )


def _config_problems(err, display) -> int:
    display.error("invalid configuration")
    for path, msg in err.problems:
        display.line(f"  {path}: {msg}" if path else f"  {msg}")
    return EXIT_CONFIG


def _yaml_path(field: str) -> str:
    # The server names fields from the request root (model.pytorch.x); the YAML has them at the top.
    for prefix in ("model.pytorch.", "model."):
        if field.startswith(prefix):
            rest = field[len(prefix):]
            return rest if prefix == "model." else f"pytorch.{rest}"
    return field


def _server_error(err, display, server: str, *, connecting: bool = False, stage: str | None = None) -> int:
    from .errors import DeadlineExceeded, InvalidArgument, Unauthenticated, Unavailable

    if connecting and isinstance(err, (Unavailable, DeadlineExceeded)):
        display.error(f"cannot reach llem-server at {server}: {err.details or err.code.name}")
        return EXIT_ERROR
    if isinstance(err, Unavailable) and stage:
        # gRPC's own words ("Stream removed", "Socket closed") do not say the server is gone.
        display.error(f"the server at {server} went away during {stage} (it stopped, crashed or the network "
                      f"dropped): UNAVAILABLE: {err.details or 'no details'}")
        return EXIT_ERROR
    if isinstance(err, InvalidArgument):
        # The violations carry the details already; show the message only without them.
        # The message is shown when it says something the listed violations do not.
        new = err.new_violations()
        said = err.details and (not new or len(new) < len(err.field_violations))
        display.error("the server rejected the configuration" + (f": {err.details}" if said else ""))
        for field, desc in new:
            display.line(f"  {_yaml_path(field)}: {desc}")
        return EXIT_CONFIG
    if isinstance(err, Unauthenticated):
        display.error(f"the server refused the credentials ({err.details}); pass --token or set LLEM_TOKEN")
        return EXIT_ERROR
    name = err.code.name if err.code is not None else "ERROR"
    display.error(f"{name}: {err.details}" if err.details else f"{name} (the server gave no details)")
    for field, desc in err.new_violations():
        display.line(f"  {field}: {desc}")
    if err.retry_delay is not None:
        display.line(f"  the server suggests retrying after {err.retry_delay:g} s")
    return EXIT_ERROR


def _dump(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    sys.stdout.flush()


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n else "0"


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------


def _result_path(result: dict[str, Any], output_dir: Path) -> Path:
    stamp = result["started_at"].replace("-", "").replace(":", "").split(".")[0] + "Z"
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(result["config"]["model"]).name or "model")
    return output_dir / f"{stamp}_{model}_{result['run_id']}.json"


# A batch job's end comes as SIGTERM (timeout, SLURM's scancel or time limit, then
# SIGKILL after a grace period) or SIGHUP (the terminal closed): a run keeps what it
# measured for those as for Ctrl-C.
_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))  # no SIGHUP on Windows
CONFIG_TEXT_MAX_BYTES = 256 * 1024  # YAMLs are small; a bigger one keeps its sha256 and its start


def _stop_like_ctrl_c(received: list[int]):
    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        held = signal.getsignal(signal.SIGINT)
        if callable(held) and held is not signal.default_int_handler:
            held(signal.SIGINT, frame)  # a section that holds Ctrl-C back (_DeferredSigint) holds this too
            return
        raise KeyboardInterrupt

    return handler


def _config_file(path: str, text: str) -> dict[str, Any]:
    """The YAML as given, so that the result holds the experiment even when the file changes."""
    raw = text.encode("utf-8")
    cut = len(raw) > CONFIG_TEXT_MAX_BYTES
    return {
        "path": path,
        "resolved_path": str(Path(path).resolve()),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "bytes": len(raw),
        "text": raw[:CONFIG_TEXT_MAX_BYTES].decode("utf-8", "ignore") if cut else text,
        "text_truncated": cut,
    }


def cmd_run(args: argparse.Namespace, display) -> int:
    from .datasets import load_prompts
    from .errors import ConfigurationError, LlemError
    from .experiment import build_experiment, read_config
    from .results import prepare_output_dir, remove_unused, summary_rows, write_atomic
    from .runner import EnergyRequirementError, Runner

    try:
        data, config_text = read_config(args.config)
        exp = build_experiment(
            data,
            overrides=list(args.overrides) + list(args.set_overrides),
            flags={
                "model": args.model,
                "n": args.n,
                "pytorch.batch_size": args.batch_size,
                "precision": args.precision,
                "dataset": args.dataset,
                "output_dir": args.output,
            },
            source=args.config,
        )
        if args.dataset:
            exp.base_dir = Path.cwd()  # a path typed on the command line is relative to here
        prompts, dataset_info = load_prompts(exp)
        if args.dry_run:
            _dump({"config": exp.effective(), "config_digest": exp.config_digest(), "dataset": dataset_info,
                   "requests": -(-len(prompts) // exp.batch_size)})
            return EXIT_OK
        made = prepare_output_dir(exp.output_dir)  # fail now, not after a long run
        client = _client(args)
    except ConfigurationError as e:
        return _config_problems(e, display)

    runner = Runner(client, exp, prompts, dataset_info, display, args.server, in_flight=args.in_flight,
                    energy_delivery=args.energy_delivery)
    runner.result["config_file"] = _config_file(args.config, config_text)
    # The final write goes to the same path: during the run it holds the records so far.
    runner.checkpoint_path = _result_path(runner.result, exp.output_dir)
    received: list[int] = []
    previous = {}
    try:
        for sig in _STOP_SIGNALS:
            previous[sig] = signal.signal(sig, _stop_like_ctrl_c(received))
    except ValueError:  # not the main thread: the caller keeps its own signal policy
        pass
    code = EXIT_OK
    status, error, stopped_by = "completed", None, None
    try:
        runner.run()
    except KeyboardInterrupt:
        # Ignore a second Ctrl-C (or SIGTERM) while the partial result is written; the
        # caller's handlers come back below (cmd_run may run inside a longer program).
        try:
            previous.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
            for sig in (signal.SIGINT, *previous):
                signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        signum = received[0] if received else signal.SIGINT
        stopped_by = signal.Signals(signum).name
        display.line("")
        by = "" if signum == signal.SIGINT else f" by {stopped_by}"
        display.line(f"interrupted during {runner.stage}{by}: keeping {len(runner.records)} finished request(s)")
        status, code = "interrupted", 128 + signum
    except EnergyRequirementError as e:
        display.error(str(e))
        status, error, code = "failed", e, EXIT_ERROR
    except LlemError as e:
        code = _server_error(e, display, args.server, connecting=runner.stage == "connect", stage=runner.stage)
        status, error = "failed", e
    finally:
        if status != "completed":
            runner.fetch_deferred_before_exit()  # the finished requests' energies, briefly
        runner.close()
        client.close()

    result = runner.finish(status, error, interrupted_by=stopped_by)
    # Write whenever something was measured or attempted past loading, and always on
    # Ctrl-C once the server answered: a failed connect or load leaves no file.
    wrote = None
    keep = runner.stage not in ("connect", "load") or (status == "interrupted" and runner.info is not None)
    write_error = None
    if keep:
        try:
            wrote = write_atomic(_result_path(result, exp.output_dir), result)
        except OSError as e:
            write_error = e
            code = code or EXIT_ERROR
    if wrote is None:
        remove_unused(made)
    for sig, handler in previous.items():
        if handler is not None:  # None: set outside Python, cannot be put back
            signal.signal(sig, handler)
    if args.json:
        _dump(result)
    if keep or args.json:  # the summary even when the file could not be written: the run is not lost
        display.table("llem-client run summary", summary_rows(result), stream=sys.stderr if args.json else sys.stdout)
    if wrote is not None:
        display.line(f"result: {wrote}")
    if write_error is not None:
        display.error(f"cannot write the result under {exp.output_dir}: {write_error.strerror or write_error}"
                      + ("" if args.json else "; rerun with --json to capture it on stdout"))
        saved = runner.checkpoint_path
        if saved is not None and saved.exists():  # says "running": it is the records up to the last save
            display.error(f"{saved} holds the results saved during the run (status: running), not this run's end")
    return code


# ---------------------------------------------------------------------------
# Other subcommands
# ---------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace, display) -> int:
    from .convert import message_to_dict

    with _client(args) as c:
        info = c.server_info()
    if args.json:
        _dump(message_to_dict(info))
        return EXIT_OK
    rows = [("server version", info.server_version or "?")]
    rows += [(f"  {k}", v) for k, v in sorted(info.versions.items()) if v]  # an empty version (no CUDA) says nothing
    for d in info.devices:
        s = d.energy_sensor
        energy = f"energy: {s.method}" if s.available else f"energy unavailable: {s.unavailable_reason}"
        extra = f", {_mib(d.total_memory_bytes)}" if d.total_memory_bytes else ""
        if d.HasField("baseline") and d.baseline.power_w:
            energy += f", baseline {d.baseline.power_w:.1f} W ({d.baseline.age_s:.0f} s old)"
        if s.available and s.processes_unseen_reason:
            energy += f" (other processes unseen: {s.processes_unseen_reason})"
        if d.HasField("baseline") and d.baseline.other_processes:
            energy += f"; baseline taken beside other processes: {d.baseline.other_processes}"
        rows.append((f"device {d.kind}:{d.index}", f"{d.name}{extra}; worker {d.worker_state or '?'}, queue {d.queue_depth}; {energy}"))
        if d.loaded_config_hashes:
            rows.append(("  loaded", ", ".join(h[:12] for h in d.loaded_config_hashes)))
    cpu = info.cpu_energy_sensor
    rows.append(("cpu energy", cpu.method if cpu.available else f"unavailable: {cpu.unavailable_reason or '?'}"))
    lim = info.limits
    rows.append(("limits", f"models {lim.max_models}, queue {lim.max_queue}, prompts {lim.max_prompts}, "
                           f"input tokens {lim.max_input_tokens}, output tokens {lim.max_output_tokens}, message {_mib(lim.max_message_bytes)}"))
    rows.append(("hub allowed", str(info.allow_hub).lower()))
    rows.append(("remote code allowed", str(info.allow_remote_code).lower()))
    rows.append(("compile backends", ", ".join(info.compile_backends) or "-"))
    rows.append(("cache implementations", ", ".join(info.cache_implementations) or "-"))
    display.table(f"llem-server at {args.server}", rows, stream=sys.stdout)
    return EXIT_OK


def cmd_models(args: argparse.Namespace, display) -> int:
    from llem.v1 import llem_pb2

    from .convert import message_to_dict

    with _client(args) as c:
        resp = c.list_models()
    if args.json:
        _dump(message_to_dict(resp))
        return EXIT_OK
    now = time.time()
    rows = []
    for m in resp.models:
        state = llem_pb2.ModelState.Name(m.state).removeprefix("MODEL_STATE_").lower()
        prec = llem_pb2.Precision.Name(m.config.precision).removeprefix("PRECISION_").lower()
        used = f"{now - m.last_used_unix:.0f} s ago" if m.last_used_unix else "-"
        notes = [m.error] if m.error else []
        notes += [w.code for w in m.warnings]  # e.g. COMPILE_FAILED: served uncompiled
        rows.append([m.config_hash[:12], m.config.model, prec, state + (f" ({', '.join(notes)})" if notes else ""),
                     m.device, _mib(m.memory_bytes), str(m.use_count), used])
    display.grid(f"{len(rows)} cached model(s)", ["hash", "model", "precision", "state", "device", "memory", "uses", "last used"], rows,
                 stream=sys.stdout)
    return EXIT_OK


def cmd_load(args: argparse.Namespace, display) -> int:
    from .convert import message_to_dict, suggest
    from .errors import ConfigurationError
    from .experiment import apply_override, parse_override, read_yaml

    allowed = ("model", "precision", "pytorch")
    try:
        if args.target.endswith((".yaml", ".yml")):
            # Only the load part of an experiment YAML matters here; the rest is not read.
            data = {k: v for k, v in read_yaml(args.target).items() if k in allowed}
        else:
            data = {"model": args.target}
        for text in args.overrides:
            apply_override(data, *parse_override(text))
        if args.precision:
            data["precision"] = args.precision
        bad = [(k, f"not a load key{suggest(k, allowed)}; allowed: {', '.join(allowed)}") for k in data if k not in allowed]
        if bad:
            raise ConfigurationError(bad)
        if not isinstance(data.get("model"), str) or not data["model"]:
            raise ConfigurationError([("model", "required")])
        with _client(args) as c:
            resp = c.load_model(data["model"], precision=data.get("precision"), pytorch=data.get("pytorch"),
                                strip_generation_fields=True)
    except ConfigurationError as e:
        return _config_problems(e, display)
    if args.json:
        _dump(message_to_dict(resp))
        return EXIT_OK
    m = resp.model
    how = "already loaded" if resp.cache_hit else f"loaded in {m.load_time_s:.2f} s"
    if m.compiled or m.compile_time_s:
        how += f" (compile {m.compile_time_s:.2f} s)"
    e = m.load_energy
    energy = f"{e.total_j:.3f} J" if e.available else f"unavailable ({e.unavailable_reason or 'no reason given'})"
    print(f"{resp.config_hash}  {m.config.model or data['model']}: {how} on {m.device or '?'}, {_mib(m.memory_bytes)}, load energy {energy}")
    for w in resp.warnings:
        print(f"  warning {w.code}: {w.message}")
    return EXIT_OK


def cmd_unload(args: argparse.Namespace, display) -> int:
    from .convert import message_to_dict
    from .errors import ConfigurationError

    h = args.config_hash.strip()
    if not h:  # "" is a prefix of every hash: it would pick whichever model is cached alone
        raise ConfigurationError([("config_hash", "empty: give a config hash or a unique prefix of one (see llem-client models)")])
    with _client(args) as c:
        if len(h) < 64:  # a prefix, as `models` shows
            matches = [m.config_hash for m in c.list_models().models if m.config_hash.startswith(h)]
            if len(matches) != 1:
                display.error(f"{'no' if not matches else len(matches)} cached model(s) match {h!r}")
                return EXIT_ERROR
            h = matches[0]
        resp = c.unload_model(h)
    if args.json:
        _dump({"config_hash": h, **message_to_dict(resp)})
    elif resp.unloaded:
        print(f"unloaded {h} ({_mib(resp.freed_bytes)} freed)")
    else:
        print(f"{h} was not loaded")
    return EXIT_OK if resp.unloaded else EXIT_ERROR


def cmd_health(args: argparse.Namespace, display) -> int:
    from grpc_health.v1 import health_pb2

    from .errors import NotFound

    with _client(args) as c:
        try:
            resp = c.health(args.service)
        except NotFound:
            display.error(f"the server has no health status for service {args.service!r} "
                          "(leave --service out for the whole server, or use llem.v1.LlemService)")
            return EXIT_ERROR
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(name)
    return EXIT_OK if resp.status == health_pb2.HealthCheckResponse.SERVING else EXIT_ERROR


COMMANDS = {"run": cmd_run, "info": cmd_info, "models": cmd_models, "load": cmd_load, "unload": cmd_unload, "health": cmd_health}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llem-client`` console script; returns the exit code."""
    parser = build_parser()
    # Overrides may come after options (run cfg.yaml --server x pytorch.batch_size=4);
    # argparse leaves those as extras, so collect them here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command in ("run", "load") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from .display import Display
    from .errors import ConfigurationError, LlemError

    display = Display(sys.stderr)
    try:
        return COMMANDS[args.command](args, display)
    except ConfigurationError as e:
        return _config_problems(e, display)
    except LlemError as e:
        from .errors import DeadlineExceeded, Unavailable

        return _server_error(e, display, args.server, connecting=isinstance(e, (Unavailable, DeadlineExceeded)))
    except KeyboardInterrupt:
        display.line("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`llem-client info | head`): stop quietly, as Unix tools do.
        # Python's own flush of stdout at exit would raise again: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
