"""``llem-client run``: server info, load, warm-up, baseline, measured requests.

The runner fills a result dict as it goes, so that whatever finished before an
interrupt or an error is kept; the CLI decides what to write and which exit code.

The measured phase keeps up to ``in_flight`` Generate calls outstanding (default
2): the server runs one generation at a time per device, so windows stay
exclusive, but it answers a request only once the energy counter has updated after
its window (~100 ms), while the device starts the next queued request at once. A
strictly sequential client would leave the device idle for that wait. Results are
consumed in request order. Warm-up stays sequential: its latency-CV convergence
needs latencies that hold no queueing.
"""
from __future__ import annotations

import math
import os
import platform
import socket
import statistics
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from llem.v1 import llem_pb2

from . import __version__
from .client import Client, _DeferredSigint
from .convert import message_to_dict
from .datasets import Prompt
from .display import Display
from .errors import LlemError
from .experiment import Experiment
from .readings import energy_between
from .results import SCHEMA, SCHEMA_VERSION, aggregate, measured_elapsed_s, request_record, write_atomic

SERVER_INFO_TIMEOUT_S = 30.0
DEFAULT_IN_FLIGHT = 2
# The result file is rewritten (atomically, status "running") during the measured phase
# so that a run killed outright (SIGKILL, a node lost) still leaves its records: after
# the first request, then at most every 30 s. Time, not a request count, bounds the
# cost whatever the request rate; a rewrite costs more as the file grows, so the gap is
# also kept at least 10x the last rewrite's time (at most ~10 % of the run, usually far less).
CHECKPOINT_INTERVAL_S = 30.0
# Deferred energies are fetched every this many measured requests (one GetEnergy call
# that waits for nothing, so the run is not slowed: those not settled yet, ~100 ms after
# their request's end, are asked for again next time). The server keeps only its
# --deferred-energy-keep most recent deferred energies, shared with other clients:
# fetched only at the end, a long run lost its early ones. Fetched this way, about
# 8 + in_flight + 100 ms / request time of this run's requests must fit in that window
# (the default keeps 10,000).
DEFERRED_FETCH_EVERY = 8
# On an interrupted or failed run: how long to try for the energies of the requests
# that finished (SLURM's default grace between SIGTERM and SIGKILL is 30 s).
DEFERRED_LAST_FETCH_TIMEOUT_S = 5.0


class EnergyRequirementError(Exception):
    """energy.backend is nvml but the server measures no GPU energy."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _sensor_summary(info: llem_pb2.GetServerInfoResponse) -> list[str]:
    out = []
    for d in info.devices:
        s = d.energy_sensor
        state = f"energy via {s.method or 'sensor'}" if s.available else f"energy unavailable: {s.unavailable_reason or 'no reason given'}"
        out.append(f"{d.kind}:{d.index} {d.name} ({state})")
    return out


def _energy_text(e: llem_pb2.Energy | dict | None) -> str:
    if e is None:
        return "energy not recorded"
    if isinstance(e, dict):
        if not e.get("available"):
            return f"energy unavailable ({e.get('unavailable_reason') or 'no reason given'})"
        return f"{e['total_j']:.3f} J"
    if not e.available:
        return f"energy unavailable ({e.unavailable_reason or 'no reason given'})"
    return f"{e.total_j:.3f} J"


def _not_settled(item: llem_pb2.RequestEnergy) -> bool:
    """An energy still settling: ask again later."""
    if item.state == llem_pb2.DEFERRED_ENERGY_STATE_UNSPECIFIED:  # a server older than the state: its words
        return not item.energy.available and item.energy.unavailable_reason.endswith("ask again")
    return item.state == llem_pb2.DEFERRED_ENERGY_STATE_PENDING


def _unknown_here(item: llem_pb2.RequestEnergy) -> bool:
    if item.state == llem_pb2.DEFERRED_ENERGY_STATE_UNSPECIFIED:  # as above
        return item.energy.unavailable_reason.startswith("no deferred energy for this request id")
    return item.state == llem_pb2.DEFERRED_ENERGY_STATE_UNKNOWN


def _pick_deferred(items: list[llem_pb2.RequestEnergy]) -> llem_pb2.RequestEnergy:
    """One request's deferred energy from the replicas' answers: the measured one, else
    the reason of the server that knew the request, else the first answer."""
    for item in items:
        if item.energy.available:
            return item
    for item in items:
        if not _unknown_here(item):
            return item
    return items[0]


class _InFlight:
    """Generate calls on up to ``depth`` worker threads; ``close(cancel=True)`` cancels them.

    The main thread waits only on ``concurrent.futures`` (pure Python, with a short
    timeout so that a Ctrl-C taken by another thread is still seen); gRPC's own waits
    happen on the workers, where no KeyboardInterrupt can land (see ``Client._unary``).
    Each result is ``(response, sent, received)`` in ``time.perf_counter()`` seconds.
    """

    def __init__(self, client: Client, depth: int):
        self._client = client
        self._pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="llem-run")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._calls: set[Any] = set()  # gRPC calls started and not yet finished

    def submit(self, request: llem_pb2.GenerateRequest) -> Future:
        return self._pool.submit(self._call, request)

    def _call(self, request: llem_pb2.GenerateRequest) -> tuple[llem_pb2.GenerateResponse, float, float]:
        if self._stop.is_set():
            raise CancelledError()
        sent = time.perf_counter()
        call = self._client.generate_future(request, timeout=None)  # no deadline for generation
        with self._lock:
            self._calls.add(call)
            stopped = self._stop.is_set()
        try:
            if stopped:  # close() ran between the check above and the registration
                call.cancel()
            return call.result(), sent, time.perf_counter()
        finally:
            with self._lock:
                self._calls.discard(call)

    @staticmethod
    def result(fut: Future) -> tuple[llem_pb2.GenerateResponse, float, float]:
        while not wait_futures([fut], timeout=0.1).done:
            pass
        return fut.result()

    def close(self, *, cancel: bool) -> None:
        """Stop the workers; with ``cancel``, cancel queued and running calls first."""
        if not cancel:
            self._pool.shutdown(wait=True)
            return
        with _DeferredSigint():  # a second Ctrl-C must not break the clean-up
            self._stop.set()
            with self._lock:
                calls = list(self._calls)
            for call in calls:
                call.cancel()
            # Cancelled calls return at once, so joining the workers cannot hang.
            self._pool.shutdown(wait=True, cancel_futures=True)


class Runner:
    """One experiment against one server or a set of replicas. ``result`` is valid at every point.

    With several servers (``h1:p,h2:p``) the measured requests go round robin, so the
    model is loaded, warmed up and baselined on every replica first: a load (or a cold
    first request) on one of them must not fall inside the measured phase.
    """

    def __init__(self, client: Client, exp: Experiment, prompts: list[Prompt], dataset_info: dict[str, Any], display: Display, address: str,
                 *, in_flight: int = DEFAULT_IN_FLIGHT, energy_delivery: str = "response"):
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {in_flight}")
        if energy_delivery not in ("response", "in_response", "deferred"):
            raise ValueError(f"energy_delivery must be 'response' (or 'in_response') or 'deferred', not {energy_delivery!r}")
        self.client = client
        self.in_flight = in_flight
        # deferred: measured requests ask for ENERGY_DELIVERY_DEFERRED, energies come from GetEnergy
        self.deferred = energy_delivery == "deferred" and exp.energy_backend != "null"
        self.exp = exp
        self.prompts = prompts
        self.display = display
        self.run_id = uuid.uuid4().hex[:12]
        self.stage = "connect"
        self.record_energy = exp.energy_backend != "null"
        self.records: list[dict[str, Any]] = []
        # Where to save the results so far during the measured phase (the CLI sets the
        # result file's path); None: no rewrites during the run.
        self.checkpoint_path: Path | None = None
        self._next_checkpoint = 0.0  # time.monotonic() of the next rewrite; 0: after the first request
        self._unsettled: list[dict[str, Any]] = []  # deferred records whose energy is not fetched yet
        self.info: llem_pb2.GetServerInfoResponse | None = None  # the first replica's
        self.infos: list[llem_pb2.GetServerInfoResponse] = []  # one per replica
        # (address, client) per replica; one server: its address and the client itself
        self.replicas: list[tuple[str, Client]] = [(address, client)]
        if client.replica_addresses:
            self.replicas = [(a, client.replica(a)) for a in client.replica_addresses]
        self.result: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "status": "running",
            "interrupted_by": None,
            "stage": None,  # the phase the run ended in (set by finish)
            "error": None,
            "run_id": self.run_id,
            "started_at": _now(),
            "finished_at": None,
            "client": {
                "llem_client_version": __version__,
                "python": platform.python_version(),
                "platform": platform.platform(),
                "host": socket.gethostname(),
                "argv": sys.argv[1:],
                "cwd": os.getcwd(),  # argv's relative paths are relative to it
            },
            "server": {"address": address},
            "config_source": exp.source,
            "config_file": None,  # the YAML's text and sha256 (the CLI fills it in)
            "config": exp.effective(),
            "config_digest": exp.config_digest(),
            "config_hash": None,
            "effective_config": None,
            "dataset": dataset_info,
            "model_load": None,
            "warmup": {"enabled": exp.warmup["enabled"], "requests": 0},
            "baseline": {"enabled": exp.baseline["enabled"], "measured": False},
            "energy": {"backend": exp.energy_backend, "recorded": self.record_energy},
            "measurement": {"in_flight": in_flight, "requests_sent": 0, "elapsed_s": None, "t0_unix": None,
                            "phase_energy": None,
                            "energy_delivery": "deferred" if energy_delivery == "deferred" else "response"},
            "requests": self.records,
            "aggregates": None,
            "provenance": None,
            "warnings": [],
        }

    @property
    def _multi(self) -> bool:
        return len(self.replicas) > 1

    def close(self) -> None:
        """Close the per-replica clients (the caller closes the one it passed in)."""
        for _, c in self.replicas:
            if c is not self.client:
                c.close()

    # Phases -----------------------------------------------------------------

    def run(self) -> None:
        """All phases in order; raises KeyboardInterrupt / LlemError / EnergyRequirementError."""
        self._server_info()
        self._load()
        self._warmup()
        self._baseline()
        self._measure()
        self.stage = "done"

    def finish(self, status: str, error: BaseException | None = None, *, interrupted_by: str | None = None) -> dict[str, Any]:
        """Close the result with a status (completed, interrupted, failed; running for a checkpoint)."""
        self.result["status"] = status
        self.result["interrupted_by"] = interrupted_by
        self.result["stage"] = self.stage
        if error is not None:
            err: dict[str, Any] = {"type": type(error).__name__, "message": str(error)}
            if isinstance(error, LlemError):
                err["code"] = error.code.name if error.code else None
                err["details"] = error.details
                err["field_violations"] = [list(v) for v in error.field_violations]
            self.result["error"] = err
        self.result["finished_at"] = _now()
        self.result["measurement"]["elapsed_s"] = measured_elapsed_s(self.records)
        self.result["aggregates"] = agg = aggregate(self.records, energy_recorded=self.record_energy)
        if agg["energy"].get("recorded"):
            agg["energy"]["baseline"] = self._baseline_used()
        self.result["provenance"] = self._provenance()
        return self.result

    def _baseline_used(self) -> dict[str, Any] | None:
        """Where the baseline behind adjusted_j came from: this run's measurement, or one
        already on the server (another client's or an earlier run's) that applies even with
        baseline.enabled false. None where no request has an adjusted figure."""
        adjusted = [r["energy"] for r in self.records if r["energy"] and r["energy"].get("adjusted_j") is not None]
        if not adjusted:
            return None
        devices: list[dict[str, Any]] = []
        if self.result["baseline"].get("measured"):
            source = "measured by this run"
            rec = self.result["baseline"]
            answers = ([(x["address"], x["response"]) for x in rec["replicas"]] if "replicas" in rec
                       else [(self.replicas[0][0], rec["response"])])
            for address, resp in answers:
                devices += [{"address": address, "index": d.get("index", 0), **d["baseline"]}
                            for d in resp.get("devices", []) if d.get("available") and "baseline" in d]
        else:
            source = "already on the server, not measured by this run"
            for (address, _), info in zip(self.replicas, self.infos):
                devices += [{"address": address, "index": d.index, **message_to_dict(d.baseline), "age_s_at_run_start": d.baseline.age_s}
                            for d in info.devices if d.HasField("baseline") and d.baseline.measured_unix]
        for d in devices:
            d.pop("age_s", None)  # an age is only meaningful with its moment: age_s_at_run_start says it
        used = sorted({e["baseline_power_w"] for e in adjusted if e.get("baseline_power_w") is not None})
        known = [d["power_w"] for d in devices if d.get("power_w") is not None]
        return {
            "source": source,
            "devices": devices,
            "request_baseline_power_w": used,
            # False: some request used a baseline none of these is (re-measured during the run?)
            "matches_requests": all(any(math.isclose(p, k, rel_tol=1e-9) for k in known) for p in used),
        }

    def _provenance(self) -> dict[str, Any] | None:
        """Where the numbers came from, in one place (details stay in server/requests)."""
        if self.info is None:
            return None
        energy = next((r["energy"].get("provenance") for r in self.records if r["energy"] and r["energy"].get("available")), None)
        return {
            "server_version": self.info.server_version,
            "versions": dict(self.info.versions),
            "devices": [
                {"kind": d.kind, "index": d.index, "name": d.name, "uuid": d.uuid, "compute_capability": d.compute_capability}
                for d in self.info.devices
            ],
            "energy_methods": sorted({r["energy"]["method"] for r in self.records if r["energy"] and r["energy"].get("available")}),
            "energy": energy,
        }

    def _server_info(self) -> None:
        infos = []
        for address, client in self.replicas:
            info = client.server_info(timeout=SERVER_INFO_TIMEOUT_S)
            infos.append(info)
            self.display.line(f"server: llem-server {info.server_version or '?'} at {address}")
            for s in _sensor_summary(info):
                self.display.line(f"  device {s}")
        self.info, self.infos = infos[0], infos
        self.result["server"].update(message_to_dict(infos[0]))
        if self._multi:
            self.result["server"]["replicas"] = [{"address": a, **message_to_dict(i)} for (a, _), i in zip(self.replicas, infos)]
        blind = [(a, i) for (a, _), i in zip(self.replicas, infos) if not any(d.energy_sensor.available for d in i.devices)]
        if self.exp.energy_backend == "nvml" and blind:
            reasons = "; ".join(f"{a}: " + ("; ".join(_sensor_summary(i)) or "the server reports no devices") for a, i in blind)
            raise EnergyRequirementError(
                f"energy.backend is nvml but {'a server' if self._multi else 'the server'} measures no GPU energy ({reasons}); "
                "use energy.backend: auto to run without energy, or a server with an NVIDIA GPU"
            )
        if not self.record_energy:
            self.display.line("energy: not recorded (energy.backend: null)")

    def _load(self) -> None:
        self.stage = "load"
        loads = []
        for address, client in self.replicas:
            self.display.line(f"loading {self.exp.model}" + (f" on {address}" if self._multi else "") + " ...")
            resp = client.load_model(self.exp.model_config, strip_generation_fields=True,
                                     request_id=f"{self.run_id}-load", timeout=None)
            loads.append(self._load_record(resp))
            self._show_load(resp)
        self.result["config_hash"] = loads[0]["config_hash"]
        self.result["model_load"] = dict(loads[0])
        if self._multi:
            self.result["model_load"]["replicas"] = [{"address": a, **rec} for (a, _), rec in zip(self.replicas, loads)]
            if len({rec["config_hash"] for rec in loads}) > 1:
                self.result["warnings"].append({"code": "REPLICA_CONFIG_HASH_DIFFERS",
                                                "message": "the replicas hash the configuration differently (server versions differ?)"})

    def _load_record(self, resp: llem_pb2.LoadModelResponse) -> dict[str, Any]:
        m = resp.model
        return {
            "config_hash": resp.config_hash,
            "cache_hit": resp.cache_hit,
            "load_time_s": m.load_time_s,
            "compile_time_s": m.compile_time_s,
            "compiled": m.compiled,
            "device": m.device,
            "memory_bytes": m.memory_bytes,
            "load_energy": message_to_dict(m.load_energy) if self.record_energy and m.HasField("load_energy") else None,
            "warnings": [{"code": w.code, "message": w.message} for w in resp.warnings],
            "model": {k: v for k, v in message_to_dict(m).items() if k != "load_energy"},  # energy is above
        }

    def _show_load(self, resp: llem_pb2.LoadModelResponse) -> None:
        m = resp.model
        how = "already loaded (cache hit)" if resp.cache_hit else f"loaded in {m.load_time_s:.2f} s"
        if m.compile_time_s or m.compiled:
            how += f", compile {m.compile_time_s:.2f} s"
        text = f"model {self.exp.model}: {how} on {m.device or '?'}, config {resp.config_hash[:12]}"
        if self.record_energy and m.HasField("load_energy"):
            text += f", load {_energy_text(m.load_energy)}"
        self.display.line(text)
        for w in resp.warnings:
            self.display.line(f"  warning {w.code}: {w.message}")

    def _batch(self, k: int) -> list[str]:
        # Warm-up uses the measured batch shape, cycling through the prompts.
        size = min(self.exp.batch_size, len(self.prompts))
        start = (k * size) % len(self.prompts)
        return [self.prompts[(start + j) % len(self.prompts)].text for j in range(size)]

    def _timed(self, client: Client, prompts: list[str], request_id: str) -> tuple[llem_pb2.GenerateResponse, float]:
        req = self.exp.request(prompts, request_id)
        t0 = time.perf_counter()
        resp = client.generate_request(req, timeout=None)
        return resp, time.perf_counter() - t0

    def _warmup(self) -> None:
        cfg = self.exp.warmup
        rec: dict[str, Any] = {**cfg, "requests": 0, "latencies_ms": [], "warnings": [],
                               "unit": "requests of pytorch.batch_size prompts"}
        self.result["warmup"] = rec
        if not cfg["enabled"]:
            return
        self.stage = "warmup"
        conv = cfg["convergence_detection"]
        rec["mode"] = "convergence" if conv else "fixed"
        limit = cfg["max_prompts"] if conv else cfg["n_warmup"]
        self.display.line(
            f"warm-up: {'until latency CV < ' + format(cfg['cv_threshold'], 'g') + f' (at most {limit})' if conv else limit} request(s)"
            + (f" on each of {len(self.replicas)} servers" if self._multi else "")
        )
        if self._multi:
            rec["replicas"] = []
        for r, (address, client) in enumerate(self.replicas):
            part = rec
            if self._multi:  # each replica warms up on its own; rec keeps the totals
                part = {"address": address, "requests": 0, "latencies_ms": [], "warnings": []}
                rec["replicas"].append(part)
            self._warm(client, part, rec, limit, f"{self.run_id}-w{r}-" if self._multi else f"{self.run_id}-w")
        if conv and self._multi:
            rec["converged"] = all(p["converged"] for p in rec["replicas"])
        floor = cfg["thermal_floor_seconds"]
        if floor > 0:
            self.display.line(f"thermal floor: waiting {floor:g} s")
            time.sleep(floor)
        rec["thermal_floor_waited_s"] = floor

    def _warm(self, client: Client, part: dict[str, Any], rec: dict[str, Any], limit: int, id_prefix: str) -> None:
        """Warm-up requests on one server until done (or converged); ``part`` is its record."""
        cfg = self.exp.warmup
        conv = cfg["convergence_detection"]
        need = max(cfg["min_prompts"], cfg["window_size"])
        if conv:
            part["converged"] = False
            part["final_cv"] = None
        for k in range(limit):
            resp, wall = self._timed(client, self._batch(k), f"{id_prefix}{k}")
            if self.result["effective_config"] is None:
                self.result["effective_config"] = message_to_dict(resp.effective_config)
            part["requests"] += 1
            part["latencies_ms"].append(wall * 1000.0)
            # One list per request, beside its latency: a compile or a truncation here
            # explains a slow warm-up, and would also apply to the measured requests.
            part["warnings"].append([{"code": w.code, "message": w.message} for w in resp.warnings])
            if part is not rec:
                rec["requests"] += 1
            if conv and part["requests"] >= need:
                window = part["latencies_ms"][-cfg["window_size"]:]
                mean = statistics.fmean(window)
                cv = statistics.pstdev(window) / mean if mean > 0 else 0.0
                part["final_cv"] = cv
                if cv < cfg["cv_threshold"]:
                    part["converged"] = True
                    break
        where = f" on {part['address']}" if "address" in part else ""
        if conv:
            state = "converged" if part["converged"] else "did not converge"
            cv_text = "n/a" if part["final_cv"] is None else f"{part['final_cv']:.3f}"
            self.display.line(f"warm-up{where}: {part['requests']} request(s), {state} (CV {cv_text})")
            if not part["converged"]:
                self.result["warnings"].append(
                    {"code": "WARMUP_NOT_CONVERGED", "message": f"latency CV {cv_text} after {part['requests']} warm-up requests{where}"}
                )
        else:
            self.display.line(f"warm-up{where}: {part['requests']} request(s) done")

    def _baseline(self) -> None:
        cfg = self.exp.baseline
        rec: dict[str, Any] = {**cfg, "measured": False}
        self.result["baseline"] = rec
        if not cfg["enabled"]:
            return
        if not self.record_energy:
            rec["skipped"] = "energy.backend is null"
            return
        sensing = [(a, c) for (a, c), i in zip(self.replicas, self.infos) if any(d.energy_sensor.available for d in i.devices)]
        if not sensing:
            rec["skipped"] = "the server measures no device energy"
            self.display.line("baseline: skipped (the server measures no device energy)")
            return
        self.stage = "baseline"
        dur = float(cfg["duration_seconds"])
        if self._multi:
            rec["replicas"] = []
        for address, client in sensing:
            self.display.line(f"baseline: measuring idle power for {dur:g} s" + (f" on {address}" if self._multi else "") + " ...")
            resp = client.measure_baseline(dur, timeout=dur + 120.0)
            rec["measured"] = True
            if self._multi:
                rec["replicas"].append({"address": address, "response": message_to_dict(resp)})
            else:
                rec["response"] = message_to_dict(resp)
            for d in resp.devices:
                if d.available:
                    self.display.line(f"  device {d.index}: {d.baseline.power_w:.1f} W over {d.baseline.duration_s:.1f} s")
                else:
                    self.display.line(f"  device {d.index}: unavailable ({d.unavailable_reason})")
            for w in resp.warnings:
                self.display.line(f"  warning {w.code}: {w.message}")

    def _measure(self) -> None:
        self.stage = "measure"
        size = self.exp.batch_size
        batches = [list(range(i, min(i + size, len(self.prompts)))) for i in range(0, len(self.prompts), size)]
        meas = self.result["measurement"]
        depth = max(1, min(self.in_flight, len(batches)))
        self._totals = {"tokens": 0, "joules": 0.0, "missing": 0}
        self.display.line(
            f"measuring: {len(self.prompts)} prompt(s) in {len(batches)} request(s) of up to {size}"
            + (f", up to {depth} in flight" if depth > 1 else "")
        )
        pending: deque[tuple[int, list[int], Future]] = deque()
        since_fetch = 0  # answers since the last GetEnergy for deferred energies
        pool = _InFlight(self.client, depth)
        start = self._read_energy() if self.record_energy else None
        t0 = time.perf_counter()  # the phase's clock: records hold offsets from here
        meas["t0_unix"] = time.time()  # ... and this is that moment in Unix time

        def top_up(finished: int = 0) -> None:
            while meas["requests_sent"] < len(batches) and len(pending) - finished < depth:
                i = meas["requests_sent"]
                req = self.exp.request([self.prompts[j].text for j in batches[i]], f"{self.run_id}-{i}")
                if self.deferred:
                    req.energy_delivery = llem_pb2.ENERGY_DELIVERY_DEFERRED
                pending.append((i, batches[i], pool.submit(req)))
                meas["requests_sent"] += 1

        with self.display.progress(len(batches), energy=self._bar_energy()) as bar:
            try:
                top_up()
                while pending:
                    i, idx, fut = pending[0]
                    resp, sent, received = pool.result(fut)
                    # The head is done, so it is no longer in flight: queue the next request
                    # before the bookkeeping, and drop the head only once it is recorded.
                    top_up(finished=1)
                    self._keep(bar, len(batches), i, idx, resp, sent - t0, received - t0)
                    pending.popleft()
                    since_fetch += 1
                    if self.deferred and since_fetch >= DEFERRED_FETCH_EVERY:
                        # Every 8 answers, not "while 8 are unsettled": those settle ~100 ms after
                        # their request, so short requests made that one GetEnergy per answer.
                        try:
                            self._fetch_deferred(wait_s=0.0, final=False)
                        except LlemError as e:  # not worth the run: they are asked for again at the end
                            self.display.line(f"GetEnergy failed ({e}); the deferred energies are fetched later")
                        since_fetch = 0
                    self._checkpoint()
            except BaseException:
                # Keep whatever finished (the request waited on, and any after it), then
                # cancel the rest. Nothing here waits on the server.
                kept = {r["index"] for r in self.records}
                for i, idx, fut in list(pending):
                    if i not in kept and fut.done() and not fut.cancelled() and fut.exception() is None:
                        resp, sent, received = fut.result()
                        self._keep(bar, len(batches), i, idx, resp, sent - t0, received - t0)
                pool.close(cancel=True)
                raise
            pool.close(cancel=False)
        if start is not None:
            meas["phase_energy"] = self._phase_energy(start, self._read_energy())
        if self.deferred:
            if self._unsettled:
                self.display.line(f"fetching the energy of {len(self._unsettled)} deferred request(s) ...")
                self._fetch_deferred(wait_s=10.0, final=True)
            self._report_deferred()

    def _read_energy(self) -> list[tuple[str, Any]]:
        """A ReadEnergy reading per replica (or the reason there is none)."""
        out: list[tuple[str, Any]] = []
        for address, c in self.replicas:
            try:
                out.append((address, c.read_energy()))
            except LlemError as e:  # e.g. UNIMPLEMENTED: a server older than ReadEnergy
                out.append((address, f"ReadEnergy failed: {e}"))
        return out

    def _phase_energy(self, start: list[tuple[str, Any]], end: list[tuple[str, Any]]) -> dict[str, Any]:
        """The devices' energy over the measured phase, from a reading before the first request
        and one after the last answer: the requests' windows and the time between them (the
        counter wait, gaps), which no request's energy holds."""
        devices: list[dict[str, Any]] = []
        for (address, a), (_, b) in zip(start, end):
            if isinstance(a, str) or isinstance(b, str):
                devices.append({"address": address, "energy_j": None, "uncertainty_j": None,
                                "unavailable_reason": a if isinstance(a, str) else b})
                continue
            devices += [{"address": address, **d} for d in energy_between(a, b)]
        measured = [d for d in devices if d["energy_j"] is not None]
        whole = bool(devices) and len(measured) == len(devices)
        return {
            "energy_j": sum(d["energy_j"] for d in measured) if whole else None,
            "uncertainty_j": sum(d["uncertainty_j"] for d in measured) if whole else None,
            "uncertainty_basis": "bound: one counter update's energy at each reading, per GPU",
            "basis": "each GPU's energy counter between a reading before the first request and one after the "
                     "last answer: the requests' windows and the time between them",
            "devices": devices,
        }

    def _checkpoint(self) -> None:
        """Rewrite the result file (status running) when due; see CHECKPOINT_INTERVAL_S."""
        if self.checkpoint_path is None or time.monotonic() < self._next_checkpoint:
            return
        start = time.monotonic()
        snapshot = self.finish("running")
        snapshot["finished_at"] = None
        try:
            write_atomic(self.checkpoint_path, snapshot)
        except OSError as e:
            self.display.line(f"cannot save the results so far under {self.checkpoint_path.parent} "
                              f"({e.strerror or e}); the run goes on")
            self.checkpoint_path = None
            return
        spent = time.monotonic() - start
        self._next_checkpoint = time.monotonic() + max(CHECKPOINT_INTERVAL_S, 10 * spent)

    def _fetch_deferred(self, *, wait_s: float, final: bool, timeout: float | None = None) -> None:
        """Fill deferred records' energy from GetEnergy. An energy not settled yet stays
        to be fetched again, unless ``final``: then it keeps the server's reason."""
        done: set[int] = set()
        t = self._totals
        try:
            for k in range(0, len(self._unsettled), 1000):
                chunk = self._unsettled[k:k + 1000]
                ids = [r["request_id"] for r in chunk]
                # Each replica keeps the energies of the requests it served: ask them all.
                kw = {} if timeout is None else {"timeout": timeout}
                answers = [c.get_energy(ids, wait_seconds=wait_s, **kw).results for _, c in self.replicas]
                for j, rec in enumerate(chunk):
                    item = _pick_deferred([a[j] for a in answers])
                    if not final and _not_settled(item):
                        continue
                    rec["energy"] = message_to_dict(item.energy)
                    rec["warnings"] += [{"code": w.code, "message": w.message} for w in item.warnings]
                    if item.energy.available:
                        t["joules"] += item.energy.total_j
                    else:
                        t["missing"] += 1
                    done.add(id(rec))
        finally:
            self._unsettled = [r for r in self._unsettled if id(r) not in done]

    def fetch_deferred_before_exit(self) -> None:
        """Best effort, for an interrupted or failed run: fetch the deferred energies of the
        requests that finished, within DEFERRED_LAST_FETCH_TIMEOUT_S; those still missing
        then say why instead of "fetch it with GetEnergy"."""
        if not self._unsettled:
            return
        self.display.line(f"fetching the energy of {len(self._unsettled)} finished deferred request(s) ...")
        why = "the run ended before GetEnergy answered"
        try:
            self._fetch_deferred(wait_s=1.0, final=True, timeout=DEFERRED_LAST_FETCH_TIMEOUT_S)
        except (LlemError, KeyboardInterrupt) as e:
            why = f"GetEnergy failed as the run ended: {e}"
        for rec in self._unsettled:
            rec["energy"] = {"available": False, "unavailable_reason": f"deferred energy not fetched: {why}"}
            self._totals["missing"] += 1
        self._unsettled = []
        self._report_deferred()

    def _report_deferred(self) -> None:
        recs = [r for r in self.records if r.get("energy") is not None]
        t = self._totals
        if not recs:
            return
        if t["missing"] == len(recs):
            reasons = sorted({r["energy"].get("unavailable_reason") or "no reason given" for r in recs})
            self.display.line(f"deferred energy: unavailable for all {len(recs)} request(s): " + "; ".join(reasons))
        else:
            self.display.line(f"deferred energy: {t['joules']:.3f} J over {len(recs) - t['missing']} request(s)"
                              + (f", {t['missing']} without energy" if t["missing"] else ""))

    def _bar_energy(self) -> str:
        """The progress bar's energy: a figure only once some request has one."""
        if not self.record_energy:
            return "energy not recorded"
        if self.deferred:
            return "energy deferred"  # fetched with GetEnergy as the run goes
        t = self._totals
        if len(self.records) == t["missing"]:
            return "energy n/a" if self.records else ""
        return f"{t['joules']:,.2f} J" + (f" ({t['missing']} without)" if t["missing"] else "")

    def _keep(self, bar: Any, total: int, i: int, idx: list[int], resp: llem_pb2.GenerateResponse,
              sent_s: float, received_s: float) -> None:
        """Record one measured response and report it."""
        if self.result["effective_config"] is None:
            self.result["effective_config"] = message_to_dict(resp.effective_config)
        rec = request_record(i, idx, resp, received_s - sent_s, record_energy=self.record_energy,
                             sent_at_s=sent_s, received_at_s=received_s,
                             dataset_positions=[self.prompts[j].position for j in idx])
        self.records.append(rec)
        t = self._totals
        t["tokens"] += rec["output_tokens"]
        if self.deferred:
            self._unsettled.append(rec)
            energy_text = "energy deferred"  # fetched with GetEnergy as the run goes
        elif self.record_energy:
            if resp.energy.available:
                t["joules"] += resp.energy.total_j
            else:
                t["missing"] += 1
            energy_text = _energy_text(rec["energy"])
        else:
            energy_text = "energy not recorded"
        bar.advance(
            output_tokens=t["tokens"],
            energy=self._bar_energy(),
            line=f"request {i + 1}/{total}: {rec['output_tokens']} output tokens, {rec['wall_s']:.3f} s, {energy_text}",
        )
