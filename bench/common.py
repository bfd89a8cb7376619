"""Shared pieces of the benchmark scripts (not tests): the machine/version header,
tables, results files, a real ``llem-server`` subprocess, and the in-process reference.

The in-process reference is built from the server's own code so that the comparison is
fair: the request is resolved by ``llem_server.config`` exactly as the servicer does
(same load kwargs, same generate kwargs), the model and tokenizer are loaded by
``llem_server.models.load_model`` (left padding, pad token, eos ids), prompts are
tokenized exactly as ``llem_server.generation.run_generate`` does, and ``model.generate``
gets the same keyword arguments. Only the service's own additions are left out of the
"plain" reference (the step hook, the cancel criterion, the pipe, gRPC): those are what
the benchmarks measure.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
for _src in ("client/src", "server/src"):  # the repo's sources, installed or not (the GPU machine)
    if str(ROOT / _src) not in sys.path:
        sys.path.insert(0, str(ROOT / _src))

from llem_server.launch import ServerProcess  # noqa: E402
from llem_server.launch import ServerStarting as _Starting  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL_ROOT = Path(os.environ.get("LLEM_BENCH_MODELS", "/tmp/llem-bench-models"))

# A prompt long enough to be truncated to any max_input_tokens used here, so every
# prompt in a batch has the same length and no padding differs between runs.
SENTENCES = (
    "The quick brown fox jumps over the lazy dog. Energy is measured in joules. "
    "A GPU draws power while it generates tokens; the counter reports millijoules. "
    "Large language models predict the next token from the tokens before it. "
    "Batch size, precision and quantization change speed, energy and output. "
)


def log(*a: Any) -> None:
    print(*a, flush=True)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------

def pct(vals: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(vals)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def med(vals: Sequence[float]) -> float:
    return statistics.median(vals) if vals else float("nan")


def fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{nd}f}"
    return str(v)


# ---------------------------------------------------------------------------
# header, tables, results
# ---------------------------------------------------------------------------

def _git() -> dict[str, str]:
    out = {}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "server", "client"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        out["server_or_client_modified"] = "yes" if dirty else "no"
    except Exception:  # noqa: BLE001 - no git on the machine: leave it out
        pass
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        names = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            n = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
            names.append(n.decode() if isinstance(n, bytes) else n)
        drv = pynvml.nvmlSystemGetDriverVersion()
        drv = drv.decode() if isinstance(drv, bytes) else drv
        pynvml.nvmlShutdown()
        return f"{', '.join(names)} (driver {drv})" if names else "none"
    except Exception:  # noqa: BLE001 - no driver: no GPU
        return "none"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3]) + f" on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def wait_quiet(max_wait_s: float = 90.0, below: float | None = None) -> None:
    """Wait (bounded) until the 1-minute load average drops, so that other people's work
    on a shared machine disturbs a run less. The load is recorded in the header either way."""
    below = below if below is not None else max(1.0, (os.cpu_count() or 1) * 0.6)
    end = time.monotonic() + max_wait_s
    while time.monotonic() < end:
        try:
            if float(Path("/proc/loadavg").read_text().split()[0]) < below:
                return
        except OSError:
            return
        time.sleep(2)
    log(f"machine still busy after {max_wait_s:.0f}s (load {_loadavg()}); measuring anyway")


def header(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Date, machine, versions and the command that made a result."""
    import grpc

    h: dict[str, str] = {
        "load_average": _loadavg(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "host": socket.gethostname(),
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores)",
        "gpu": _gpu(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }
    for mod in ("torch", "transformers", "google.protobuf"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            h[mod.replace("google.", "")] = m.__version__
        except Exception:  # noqa: BLE001
            h[mod] = "absent"
    try:
        import torch

        h["torch_threads"] = str(torch.get_num_threads())
        if torch.cuda.is_available():
            h["cuda"] = torch.version.cuda or ""
    except Exception:  # noqa: BLE001
        pass
    try:
        from llem_server import __version__ as v

        h["llem_server"] = v
    except Exception:  # noqa: BLE001
        pass
    h.update(_git())
    args = list(sys.argv if argv is None else argv)
    try:
        args[0] = str(Path(args[0]).resolve().relative_to(ROOT))
    except (ValueError, IndexError):
        pass
    h["command"] = "python " + " ".join(args)
    return h


def machine_tag(device: str) -> str:
    return "cpu" if device == "cpu" else "gpu"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""

    def markdown(self) -> str:
        out = [f"### {self.title}", ""]
        out.append("| " + " | ".join(self.columns) + " |")
        out.append("|" + "|".join("---" for _ in self.columns) + "|")
        for r in self.rows:
            out.append("| " + " | ".join(fmt(v) for v in r) + " |")
        if self.note:
            out += ["", self.note]
        return "\n".join(out)

    def as_dicts(self) -> list[dict]:
        return [dict(zip(self.columns, r)) for r in self.rows]


def write_results(name: str, hdr: dict, tables: list[Table], *, notes: Sequence[str] = (), data: Any = None,
                  out_dir: Path | None = None) -> Path:
    """Write ``<name>.md`` and ``<name>.json`` under bench/results/ (and under $OUT if set)."""
    out_dir = out_dir or RESULTS
    hdr = {**hdr, "load_average_at_end": _loadavg(), "nice_value": str(os.nice(0))}
    out_dir.mkdir(parents=True, exist_ok=True)
    md = [f"## {name}", ""]
    md += [f"- **{k}**: `{v}`" if k == "command" else f"- **{k}**: {v}" for k, v in hdr.items()]
    md.append("")
    for t in tables:
        md += [t.markdown(), ""]
    for n in notes:
        md += [n, ""]
    text = "\n".join(md)
    payload = {"name": name, "header": hdr, "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows,
                                                        "note": t.note} for t in tables],
               "notes": list(notes), "data": data}
    md_path, js_path = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_path.write_text(text)
    js_path.write_text(json.dumps(payload, indent=1, default=str))
    extra = os.environ.get("OUT")
    if extra and Path(extra).is_dir() and Path(extra).resolve() != out_dir.resolve():
        for p in (md_path, js_path):
            shutil.copy(p, Path(extra) / p.name)
    log("")
    log(text)
    log(f"wrote {md_path.relative_to(ROOT) if md_path.is_relative_to(ROOT) else md_path} and .json")
    return md_path


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------

def ensure_model(root: Path, name: str, kind: str = "llama", **kw: Any) -> Path:
    """A demo model under ``root/name``, made once (nothing is downloaded)."""
    from llem_server import demo

    path = root / name
    if (path / "config.json").exists() and any(path.glob("*.safetensors")):
        return path
    log(f"making demo model {kind} at {path} ...")
    t = time.monotonic()
    {"llama": demo.make_llama, "gpt2": demo.make_gpt2, "llama-1b": demo.make_llama_1b}[kind](path, **kw)
    log(f"  made in {time.monotonic() - t:.1f}s")
    return path


# ---------------------------------------------------------------------------
# server subprocess (llem_server.launch, with the repo's sources on PYTHONPATH)
# ---------------------------------------------------------------------------

def server_env() -> dict[str, str]:
    """The environment for a server subprocess: the repo's sources importable even
    where the packages are not installed (the GPU machine)."""
    env = dict(os.environ)
    src = [str(ROOT / "client" / "src"), str(ROOT / "server" / "src")]
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(src + ([old] if old else []))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


Server = ServerProcess


class ServerStarting(_Starting):
    """A server started in the background with the repo's sources importable."""

    def __init__(self, tmp: Path, model_root: Path, *extra: str):
        super().__init__(tmp, model_root, *extra, env=server_env())


def start_server(tmp: Path, model_root: Path, *extra: str, timeout: float = 180.0) -> Server:
    return ServerStarting(tmp, model_root, *extra).wait(timeout)


# ---------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------

@dataclass
class Config:
    """One request configuration, sent through the client and resolved in-process alike."""

    model: str
    new_tokens: int
    batch: int = 1  # prompts per request, all in one generate() slice
    input_tokens: int = 32
    precision: str | None = None
    pytorch: dict | None = None  # extra pytorch fields (cache_implementation, ...)
    decoder: dict | None = None  # None: greedy with min_new_tokens = new_tokens
    seed: int = 42

    def prompts(self) -> list[str]:
        # ~60 tokens per sentence block with the demo tokenizers: enough to truncate to
        # input_tokens without tokenizing kilobytes of text that is thrown away.
        text = SENTENCES * (self.input_tokens // 32 + 2)
        return [f"{i} {text}" for i in range(self.batch)]

    def client_kwargs(self) -> dict:
        pytorch = {"batch_size": self.batch, **(self.pytorch or {})}
        decoder = self.decoder if self.decoder is not None else {"temperature": 0.0,
                                                                 "min_new_tokens": self.new_tokens}
        kw = {"model": self.model, "pytorch": pytorch, "decoder": decoder, "max_output_tokens": self.new_tokens,
              "max_input_tokens": self.input_tokens, "random_seed": self.seed}
        if self.precision:
            kw["precision"] = self.precision
        return kw

    def request(self):
        from llem_client import _core

        return _core.generate_request(self.prompts(), **self.client_kwargs())


def deferred(request, request_id: str):
    """A copy of ``request`` with energy_delivery = DEFERRED (answered at once; the energy is
    fetched with GetEnergy(request_id) afterwards)."""
    from llem.v1 import llem_pb2

    out = llem_pb2.GenerateRequest()
    out.CopyFrom(request)
    out.energy_delivery = llem_pb2.ENERGY_DELIVERY_DEFERRED
    out.request_id = request_id
    return out


def client(address: str, timeout: float | None = 600.0):
    from llem_client import Client

    return Client(address, timeout=timeout)


def timed_generate(c, cfg: Config, request=None) -> tuple[float, Any]:
    """(client-observed seconds, response) of one Generate with a ready-made request."""
    req = request if request is not None else cfg.request()
    t = time.perf_counter()
    resp = c.generate_request(req)
    return time.perf_counter() - t, resp


# ---------------------------------------------------------------------------
# the in-process reference
# ---------------------------------------------------------------------------

class Reference:
    """The same model and request, in this process's main thread, through the server's code.

    ``plain(cfg)``: tokenize as the worker does, ``model.generate`` with the worker's
    kwargs (no streamer, no stopping criterion), ids to a list, decode: what a user of
    transformers would write. ``worker_path(cfg)``: ``llem_server.generation.run_generate``
    itself (hook and criterion included) without the pipe and gRPC.
    """

    def __init__(self, model_root: Path, device: str = "auto"):
        import torch

        from llem_server import config as C
        from llem_server.worker import _capabilities

        self.torch = torch
        self.C = C
        self.model_root = model_root
        dev = "cuda:0" if (device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu"
        # The servicer's Capabilities, from the worker's probe (service.LlemServicer.capabilities).
        self.caps = C.Capabilities.from_worker(_capabilities(torch, dev))
        self._models: dict[str, Any] = {}
        self.loads = 0

    def resolve(self, cfg: Config):
        from llem_server.paths import resolve_model

        src = resolve_model(cfg.model, self.model_root, False)
        resolved = self.C.resolve_generate(cfg.request(), self.caps, model_is_local=src.is_local)
        return src, resolved

    def entry(self, cfg: Config):
        from llem_server.models import load_model

        src, resolved = self.resolve(cfg)
        h = resolved.load.config_hash()
        if h not in self._models:
            log(f"in-process: loading {cfg.model} ...")
            self._models[h] = load_model(h, src.source, resolved.load.load_kwargs(), resolved.load.compile_kwargs())
            self.loads += 1
        return self._models[h], resolved

    def plan(self, cfg: Config) -> dict:
        _, resolved = self.resolve(cfg)
        return resolved.plan.worker_payload()

    def prepare(self, cfg: Config) -> Callable[[], int]:
        """A zero-argument callable running one plain in-process request; returns output tokens."""
        torch = self.torch
        entry, resolved = self.entry(cfg)
        plan = resolved.plan
        model, tok = entry.model, entry.tokenizer
        gen_kwargs = dict(plan.generate_kwargs)
        max_new = int(plan.max_output_tokens)
        device = next(model.parameters()).device
        prompts = cfg.prompts()
        bs = int(plan.batch_size)
        eos = entry.eos_ids

        def run() -> int:
            n = 0
            # exactly run_generate's tokenization: all slices first, then the seed, then generate
            encs = [tok(prompts[s:s + bs], return_tensors="pt", padding=True, truncation=True,
                        max_length=int(plan.max_input_tokens)) for s in range(0, len(prompts), bs)]
            torch.manual_seed(int(plan.random_seed))
            for enc in encs:
                ids = enc["input_ids"].to(device)
                att = enc["attention_mask"].to(device)
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new,
                                         pad_token_id=entry.pad_id, **gen_kwargs)
                for row in out[:, ids.shape[1]:].tolist():
                    cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                    tok.decode(row[:cut], skip_special_tokens=True)
                    n += cut
            return n

        return run

    def prepare_worker_path(self, cfg: Config) -> Callable[[], int]:
        """``run_generate`` (the worker's function) in this process: hook and criterion, no IPC."""
        import multiprocessing as mp

        from llem_server.generation import run_generate

        entry, _ = self.entry(cfg)
        plan = self.plan(cfg)
        prompts = cfg.prompts()
        flag = mp.get_context("spawn").RawValue("q", 0)

        def run() -> int:
            r = run_generate(entry, prompts, plan, job_id=1, cancel_flag=flag, emit=None, on_start=lambda t: None)
            return sum(c["output_tokens"] for c in r["completions"])

        return run

    def sync(self) -> None:
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()


def common_args(p, *, reps: int) -> None:
    p.add_argument("--model-root", type=Path, default=DEFAULT_MODEL_ROOT,
                   help="where demo models are made (and reused)")
    p.add_argument("--model", default="tiny-llama", help="model name under --model-root")
    p.add_argument("--kind", default="llama", choices=["llama", "gpt2", "llama-1b"],
                   help="demo model to make when --model does not exist yet")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of a made llama/gpt2 demo model")
    p.add_argument("--layers", type=int, default=2, help="layers of a made llama/gpt2 demo model")
    p.add_argument("--device", default="auto", help="auto or cpu (server --devices and in-process device)")
    p.add_argument("--reps", type=int, default=reps, help="measured repetitions per configuration")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured repetitions first")
    p.add_argument("--input-tokens", type=int, default=32, help="prompt length after truncation")
    p.add_argument("--server-arg", action="append", default=[], help="extra llem-server argument (repeatable)")
    p.add_argument("--tag", default=None, help="results file suffix (default: cpu or gpu)")
    p.add_argument("--nice", type=int, default=-10 if hasattr(os, "geteuid") and os.geteuid() == 0 else 0,
                   help="nice increment for this process and its servers (default -10 as root: a shared machine)")
    p.add_argument("--quiet-wait", type=float, default=90.0,
                   help="wait up to this many seconds for the machine's load to drop first (0: don't)")


def raise_priority(nice: int) -> str:
    """Lower this process's nice value (servers started later inherit it), so that other
    work on a shared machine disturbs the measurement less. Needs root for a negative value."""
    if nice == 0:
        return str(os.nice(0))
    try:
        os.nice(nice)
    except OSError as exc:
        log(f"could not change the nice value ({exc}); running at {os.nice(0)}")
    return str(os.nice(0))


def prepare_model(args) -> Path:
    args.nice_value = raise_priority(args.nice)
    if args.quiet_wait > 0:
        wait_quiet(args.quiet_wait)
    kw = {} if args.kind == "llama-1b" else {"hidden": args.hidden, "layers": args.layers}
    ensure_model(args.model_root, args.model, args.kind, **kw)
    return args.model_root


def device_flags(args) -> list[str]:
    return ["--devices", args.device] if args.device != "auto" else []


def result_name(base: str, args) -> str:
    if args.tag:
        return f"{base}-{args.tag}"
    try:
        import torch

        gpu = args.device != "cpu" and torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    return f"{base}-{'gpu' if gpu else 'cpu'}"
