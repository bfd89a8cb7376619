"""Run results: per-request records, aggregates, the JSON file and the summary.

Rules the aggregates keep:
  * throughput counts output tokens only, over the measured phase's elapsed wall
    time, from the first request sent to the last response received (input tokens
    are reported apart). With several requests in flight, per-request wall times
    overlap, so their sum would undercount throughput;
  * latency is reported twice: the client's (send to response; with more than one
    request in flight it includes the time a request waits behind the previous
    one) and the server's own (arrival to response less its device-queue wait);
  * energy sums add only ``available`` energies and say how many requests had
    none: an absent energy is never 0 J;
  * time to first token is summarised over the requests that report it.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from llem.v1 import llem_pb2

from .convert import message_to_dict

SCHEMA = "llem-client/result"
SCHEMA_VERSION = "1.1"  # 1.1: dataset positions, config_file, t0_unix, phase_energy, baseline source; digest without output_dir
THROUGHPUT_BASIS = "output_tokens / elapsed wall time of the measured phase (first request sent to last response received)"
JOULES_BASIS = ("total_j / output tokens of the requests with energy; energy is measured inside each request's "
                "generate() window only: the device's energy between requests (idle, queueing, the client) is not included")
UNCERTAINTY_BASIS = ("uncertainty_j and adjusted_uncertainty_j are worst-case bounds: the sums of the per-request "
                     "bounds (errors assumed to add up, not to cancel), not standard errors")
LATENCY_BASIS = ("latency_ms: client, request sent to response received (with in_flight > 1 it includes waiting "
                 "behind the previous requests); server_latency_ms: server, arrival to response less the "
                 "device-queue wait (server_queue_wait_ms)")


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), ``None`` for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "mean": sum(values) / len(values),
        "min": min(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
    }


def request_record(
    index: int,
    prompt_indices: list[int],
    resp: llem_pb2.GenerateResponse,
    wall_s: float,
    *,
    record_energy: bool,
    sent_at_s: float | None = None,
    received_at_s: float | None = None,
    dataset_positions: list[int | None] | None = None,
) -> dict[str, Any]:
    """One measured request, as stored in the result file.

    ``prompt_indices``: the prompts' places in the run's order (after ordering and
    ``n``); ``dataset_positions``: their places in the dataset as loaded (see
    ``Prompt.position``), which identify them. ``sent_at_s`` / ``received_at_s``: when
    the client sent the request and got the response, in seconds from the start of
    the measured phase (monotonic clock; ``measurement.t0_unix`` anchors it).
    """
    timing = resp.timing
    return {
        "index": index,
        "request_id": resp.request_id,
        "prompt_indices": prompt_indices,
        "dataset_positions": dataset_positions,
        "prompts": len(prompt_indices),
        "config_hash": resp.config_hash,
        "cache_hit": resp.cache_hit,
        "input_tokens": resp.usage.input_tokens,
        "output_tokens": resp.usage.output_tokens,
        "wall_s": wall_s,
        "sent_at_s": sent_at_s,
        "received_at_s": received_at_s,
        "server_total_ms": timing.total_ms,
        "server_queue_wait_ms": timing.queue_wait_ms,
        "time_to_first_token_ms": timing.time_to_first_token_ms if timing.HasField("time_to_first_token_ms") else None,
        "timing": message_to_dict(timing),
        "energy": message_to_dict(resp.energy) if record_energy else None,
        "warnings": [{"code": w.code, "message": w.message} for w in resp.warnings],
        "completions": [
            {
                "index": c.index,
                "text": c.text,
                "input_tokens": c.input_tokens,
                "output_tokens": c.output_tokens,
                "finish_reason": llem_pb2.FinishReason.Name(c.finish_reason).removeprefix("FINISH_REASON_").lower(),
            }
            for c in resp.completions
        ],
    }


def measured_elapsed_s(records: list[dict[str, Any]]) -> float | None:
    """Wall time from the first request sent to the last response received.

    Records without send/receive times (written by hand, or by an older client)
    fall back to the sum of their wall times, as with one request in flight.
    """
    if not records:
        return None
    if all(r.get("sent_at_s") is not None and r.get("received_at_s") is not None for r in records):
        return max(r["received_at_s"] for r in records) - min(r["sent_at_s"] for r in records)
    return sum(r["wall_s"] for r in records)


def aggregate(records: list[dict[str, Any]], *, energy_recorded: bool) -> dict[str, Any]:
    """Totals, throughput, energy, latency and TTFT over the measured requests."""
    in_tok = sum(r["input_tokens"] for r in records)
    out_tok = sum(r["output_tokens"] for r in records)
    wall = measured_elapsed_s(records)  # None with no requests: nothing was timed, not 0 s
    # A record without generate_ms (hand-written, older) would count as 0 ms and inflate the rate.
    gen_ms = [r["timing"].get("generate_ms") for r in records if isinstance(r.get("timing"), dict)]
    gen_s = sum(gen_ms) / 1000.0 if gen_ms and len(gen_ms) == len(records) and None not in gen_ms else None
    agg: dict[str, Any] = {
        "requests": len(records),
        "prompts": sum(r["prompts"] for r in records),
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "wall_time_s": wall,
        "request_wall_time_sum_s": sum(r["wall_s"] for r in records),
        "output_tokens_per_s": (out_tok / wall) if wall else None,
        "throughput_basis": THROUGHPUT_BASIS,
        # Model speed alone: the wall time also holds queueing, the network and the
        # server's wait for the energy counter to pass the window's end.
        "output_tokens_per_generate_s": (out_tok / gen_s) if gen_s else None,
        "generate_basis": "output_tokens / sum of server timing.generate_ms",
        "latency_ms": _stats([r["wall_s"] * 1000.0 for r in records]),
        "latency_basis": LATENCY_BASIS,
        "server_total_ms": _stats([r["server_total_ms"] for r in records]),
        "server_queue_wait_ms": _stats([r["server_queue_wait_ms"] for r in records if r.get("server_queue_wait_ms") is not None]),
        "server_latency_ms": _stats([r["server_total_ms"] - r["server_queue_wait_ms"] for r in records
                                     if r.get("server_queue_wait_ms") is not None]),
        "time_to_first_token_ms": _stats([r["time_to_first_token_ms"] for r in records if r["time_to_first_token_ms"] is not None]),
        # Part of server_total_ms spent waiting for the energy counter's next update; a
        # record without the field is left out, not counted as no wait.
        "server_energy_wait_ms": _stats([r["timing"]["energy_wait_ms"] for r in records
                                         if isinstance(r.get("timing"), dict) and r["timing"].get("energy_wait_ms") is not None]),
    }
    warnings: Counter[str] = Counter(w["code"] for r in records for w in r["warnings"])
    if not energy_recorded:
        agg["energy"] = {"recorded": False, "reason": "energy.backend is null"}
    else:
        with_e = [r for r in records if r["energy"] and r["energy"].get("available")]
        without = [r for r in records if not (r["energy"] and r["energy"].get("available"))]
        total = sum(r["energy"]["total_j"] for r in with_e) if with_e else None
        adj = [r for r in with_e if r["energy"].get("adjusted_j") is not None]
        out_with_e = sum(r["output_tokens"] for r in with_e)
        reasons = Counter((r["energy"] or {}).get("unavailable_reason") or "not reported" for r in without)
        agg["energy"] = {
            "recorded": True,
            "requests_with_energy": len(with_e),
            "requests_without_energy": len(without),
            "unavailable_reasons": dict(reasons),
            "total_j": total,
            # adjusted_j only where every summed request has one, else the partial sum would mislead
            "adjusted_j": sum(r["energy"]["adjusted_j"] for r in adj) if adj and len(adj) == len(with_e) else None,
            # the baseline's error is the same in every request: bounds add up, linearly (absent,
            # not 0, where a request has none: a server older than the field)
            "adjusted_uncertainty_j": (sum(r["energy"]["adjusted_uncertainty_j"] for r in adj)
                                       if adj and len(adj) == len(with_e)
                                       and all("adjusted_uncertainty_j" in r["energy"] for r in adj) else None),
            "requests_with_adjusted_energy": len(adj),
            "joules_per_output_token": (total / out_with_e) if total is not None and out_with_e > 0 else None,
            "joules_per_output_token_basis": JOULES_BASIS,
            # A request without its bound makes the sum unknown, not smaller.
            "uncertainty_j": (sum(r["energy"]["uncertainty_j"] for r in with_e)
                              if with_e and all(r["energy"].get("uncertainty_j") is not None for r in with_e) else None),
            "uncertainty_basis": UNCERTAINTY_BASIS,
            "low_confidence_requests": sum(1 for r in with_e if r["energy"].get("low_confidence")),
            "approximate_requests": sum(1 for r in with_e if r["energy"].get("approximate")),
            "shared_window_requests": sum(1 for r in with_e if not r["energy"].get("exclusive")),
        }
        if without:
            warnings["ENERGY_MISSING"] += len(without)
    agg["warnings"] = dict(warnings)
    return agg


def prepare_output_dir(path: Path) -> list[Path]:
    """Make ``path`` and prove a file can be written there, before anything is run.

    Returns the folders it created (deepest first) so that a run which writes
    nothing can take them away again (:func:`remove_unused`). Raises
    ConfigurationError when the folder cannot be made or written.
    """
    from .errors import ConfigurationError

    made, p = [], path
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".llem-write-check.", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        remove_unused(made)
        raise ConfigurationError([("output_dir", f"cannot write results under {path}: {e.strerror or e}")]) from None
    return made


def remove_unused(folders: list[Path]) -> None:
    """Remove folders made by :func:`prepare_output_dir`, deepest first, while they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:
            return


def _umask() -> int:
    """The process umask without changing it (os.umask sets it, briefly 0 for the request
    threads running beside a checkpoint) where /proc tells it; else the set-and-restore probe."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0)
    os.umask(old)
    return old


def write_atomic(path: Path, data: dict[str, Any]) -> Path:
    """Write JSON to ``path`` via a temporary file and rename: never a half-written result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask).
        umask = _umask()
        if hasattr(os, "fchmod"):  # POSIX (Windows has no modes to speak of)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False, allow_nan=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ---------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        v = round(v, digits) + 0.0  # + 0.0: -0.0 (or -0.0001 at 3 digits) prints as 0.000, not -0.000
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def _dataset_text(d: dict[str, Any]) -> str:
    if d.get("kind") == "synthetic":
        return f"synthetic ({d.get('used', '?')} prompts of {d.get('input_len')} words, seed {d.get('seed')})"
    where = f", found in the {d['found_in']}" if d.get("found_in") in ("config folder", "current directory") else ""
    return f"{d.get('path', '?')} ({d.get('used', '?')} of {d.get('available', '?')} prompts{where})"


def _baseline_text(b: dict[str, Any] | None) -> str:
    """Whose baseline adjusted_j used: one left on the server by another client applies
    even with baseline.enabled false, so the summary says so."""
    if not b:
        return ""
    power = "/".join(_fmt(p, " W", 1) for p in b.get("request_baseline_power_w") or []) or "n/a"
    text = f" (baseline {power}, {b['source']}"
    ages = [d["age_s_at_run_start"] for d in b.get("devices", []) if d.get("age_s_at_run_start") is not None]
    if ages:
        text += f", {_fmt(max(ages), ' s', 0)} old at the start"
    if not b.get("matches_requests", True):
        text += "; some requests used another baseline"
    return text + ")"


def _phase_text(phase: dict[str, Any], windows_j: float | None, tokens: int) -> str:
    if phase.get("energy_j") is None:
        reasons = sorted({d.get("unavailable_reason") or "not read" for d in phase.get("devices", [])})
        return "unavailable: " + ("; ".join(reasons) or "no reading")
    j, dur = phase["energy_j"], max((d.get("duration_s") or 0.0) for d in phase["devices"])
    text = f"{_fmt(j, ' J', 3)} ± {_fmt(phase['uncertainty_j'], ' J', 3)} bound over {_fmt(dur, ' s', 3)}"
    if tokens:
        text += f", {_fmt(j / tokens, ' J', 4)} per output token"
    if windows_j is not None:
        text += f" (GPUs over the whole measured phase; the requests' own windows: {_fmt(windows_j, ' J', 3)})"
    return text


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows for the end-of-run summary."""
    a = result["aggregates"]
    rows = [
        ("status", result["status"]),
        ("model", f"{result['config']['model']} (config {(result.get('config_hash') or '')[:12] or 'n/a'})"),
        ("dataset", _dataset_text(result.get("dataset") or {})),
        ("requests", f"{a['requests']} ({a['prompts']} prompts)"),
        ("input tokens", _fmt(a["input_tokens"])),
        ("output tokens", _fmt(a["output_tokens"])),
        ("output tokens/s", _fmt(a["output_tokens_per_s"]) + " (client wall time); "
         + _fmt(a.get("output_tokens_per_generate_s")) + " in the server's generate()"),
    ]
    e = a["energy"]
    if not e["recorded"]:
        rows.append(("energy", "not recorded (energy.backend: null)"))
    else:
        missing = e["requests_without_energy"]
        note = f" ({e['requests_with_energy']} of {a['requests']} requests)" if missing else ""
        if not a["requests"]:
            rows.append(("total energy", "n/a: no measured requests"))
        elif e["total_j"] is None:
            reasons = "; ".join(e["unavailable_reasons"]) or "not reported"
            rows.append(("total energy", f"unavailable: {reasons}"))
        else:
            bound = f" ± {_fmt(e['uncertainty_j'], ' J', 3)} bound" if e.get("uncertainty_j") is not None else ""
            rows.append(("total energy", _fmt(e["total_j"], " J", 3) + bound + note))
            low = e.get("low_confidence_requests") or 0
            rows.append(("low-confidence requests", f"{low} of {e['requests_with_energy']}"
                         + (" (windows under ~1 s or few counter updates)" if low else "")))
            adj_bound = (f" ± {_fmt(e['adjusted_uncertainty_j'], ' J', 3)} bound"
                         if e.get("adjusted_uncertainty_j") is not None else "")
            rows.append(("adjusted energy", _fmt(e["adjusted_j"], " J", 3) + adj_bound + _baseline_text(e.get("baseline"))
                         if e["adjusted_j"] is not None else "n/a (no baseline)"))
            rows.append(("J per output token", _fmt(e["joules_per_output_token"], " J", 4)))
            phase = (result.get("measurement") or {}).get("phase_energy")
            if phase:
                rows.append(("phase energy", _phase_text(phase, e.get("total_j"), a["output_tokens"])))
            if missing:
                rows.append(("requests without energy", f"{missing} of {a['requests']}: the total covers the other "
                             f"{e['requests_with_energy']} only; " + "; ".join(e["unavailable_reasons"])))
    in_flight = (result.get("measurement") or {}).get("in_flight")
    if in_flight is not None and a["requests"]:
        rows.append(("requests in flight", f"{in_flight}; throughput over the measured phase's {_fmt(a['wall_time_s'], ' s', 3)}"))
    lat = a["latency_ms"]
    if lat["count"]:
        how = "client: sent to response" + (", incl. waiting behind earlier in-flight requests" if (in_flight or 1) > 1 else "")
        rows.append(("latency p50 / p90 / p99", f"{_fmt(lat['p50'])} / {_fmt(lat['p90'])} / {_fmt(lat['p99'])} ms ({how})"))
    slat, q = a.get("server_latency_ms", {"count": 0}), a.get("server_queue_wait_ms", {"count": 0})
    ew = a.get("server_energy_wait_ms", {"count": 0})
    if slat["count"]:
        # The server's latency includes its wait for the energy counter: say how much.
        rows.append(("server latency p50 / p90 / p99", f"{_fmt(slat['p50'])} / {_fmt(slat['p90'])} / {_fmt(slat['p99'])} ms "
                     f"(arrival to response less device-queue wait, incl. energy-counter wait p50 {_fmt(ew.get('p50'))} ms; "
                     f"queue wait p50 {_fmt(q.get('p50'))} ms)"))
    t = a["time_to_first_token_ms"]
    if t["count"]:
        rows.append(("time to first token p50 / p95", f"{_fmt(t['p50'])} / {_fmt(t['p95'])} ms ({t['count']} request{'s' if t['count'] != 1 else ''})"))
    else:
        rows.append(("time to first token", "not reported"))
    warns = dict(a["warnings"])
    for w in result.get("warnings", []):
        warns[w["code"]] = warns.get(w["code"], 0) + 1
    rows.append(("warnings", ", ".join(f"{k} x{v}" for k, v in sorted(warns.items())) or "none"))
    if result.get("error"):
        rows.append(("error", result["error"]["message"]))
    return rows
