"""``llem-client run`` as a subprocess against a real llem-server with a tiny model.

Uses the session fixtures ``server`` (``.address``) and ``model_root`` from
conftest.py. Config-error tests need no server: they must fail before sending.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

MODEL = "llama"
UNREACHABLE = "127.0.0.1:1"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLEM_SERVER", "LLEM_TOKEN")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def llem(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llem_client.cli", *map(str, args)],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


def write_config(path: Path, **overrides) -> Path:
    cfg = {
        "model": MODEL,
        "backend": "pytorch",
        "n": 4,
        "dataset": {"n": 6, "input_len": 12, "seed": 3},
        "precision": "fp32",
        "random_seed": 7,
        "max_output_tokens": 4,
        "decoder": {"preset": "deterministic"},
        "pytorch": {"batch_size": 2},
        "warmup": {"enabled": True, "n_warmup": 1, "thermal_floor_seconds": 0},
        "baseline": {"enabled": True, "duration_seconds": 1},
        "energy": {"backend": "auto"},
        "output_dir": str(path.parent / "out"),
    }
    cfg.update(overrides)
    path.write_text(yaml.safe_dump(cfg))
    return path


def only_result(out_dir: Path) -> dict:
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == 1, files
    assert not list(out_dir.glob(".*.tmp")), "a temporary file was left behind"
    return json.loads(files[0].read_text())


def check_result(res: dict, *, requests: int, prompts: int) -> None:
    assert res["schema"] == "llem-client/result" and res["schema_version"] == "1.1"
    assert res["status"] == "completed" and res["error"] is None
    assert len(res["config_hash"]) == 64
    assert res["server"]["server_version"]
    a = res["aggregates"]
    assert a["requests"] == requests == len(res["requests"]) and a["prompts"] == prompts
    assert a["output_tokens"] == sum(r["output_tokens"] for r in res["requests"]) > 0
    assert a["input_tokens"] == sum(r["input_tokens"] for r in res["requests"]) > 0
    assert a["output_tokens_per_s"] > 0 and "output_tokens" in a["throughput_basis"]
    for r in res["requests"]:
        assert r["config_hash"] == res["config_hash"]
        assert len(r["completions"]) == r["prompts"]
        assert r["output_tokens"] <= 4 * r["prompts"]
    # energy.md rule 7: an energy that was not measured is absent with a reason, never 0 J
    absent = {"available", "unavailable_reason", "method", "absence"}
    for energy in [r["energy"] for r in res["requests"]] + [res["model_load"]["load_energy"]]:
        if energy is not None and not energy["available"]:
            assert set(energy) <= absent and energy["unavailable_reason"], energy
        elif energy is not None and "cpu" in energy and not energy["cpu"]["available"]:
            assert set(energy["cpu"]) <= absent, energy["cpu"]
    e = a["energy"]
    assert e["recorded"] is True
    assert e["requests_with_energy"] + e["requests_without_energy"] == requests
    if e["requests_with_energy"] == 0:
        assert e["total_j"] is None and e["joules_per_output_token"] is None  # never 0 J for "unknown"
        ph = res["measurement"]["phase_energy"]  # nor for the phase: a reason per device
        assert ph["energy_j"] is None and ph["devices"] and all(d["unavailable_reason"] for d in ph["devices"])
    assert res["effective_config"]["model"]["model"] == MODEL


def test_full_run_synthetic(server, tmp_path):
    cfg = write_config(tmp_path / "exp.yaml")
    p = llem("run", cfg, "--server", server.address, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "out")
    check_result(res, requests=2, prompts=4)
    assert res["dataset"]["kind"] == "synthetic" and res["dataset"]["used"] == 4
    assert res["warmup"]["requests"] == 1 and res["warmup"]["mode"] == "fixed"
    assert res["config"]["pytorch"]["batch_size"] == 2
    # the summary (plain, not a TTY) names the key figures
    for label in ("output tokens/s", "total energy", "latency p50", "warnings"):
        assert label in p.stdout, p.stdout
    assert "model llama:" in p.stderr and "request 2/2" in p.stderr


def test_run_jsonl_with_overrides_and_json_stdout(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Energy is {i}", "source": s}) + "\n" for i, s in enumerate("aabbab")))
    cfg = write_config(tmp_path / "exp.yaml", dataset=str(data), dataset_order="interleaved", n=6)
    p = llem("run", cfg, "--server", server.address, "-n", "3", "--batch-size", "2",
             "decoder.top_k=5", "--set", "warmup.enabled=false", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)  # stdout is the JSON alone
    check_result(res, requests=2, prompts=3)
    assert res == only_result(tmp_path / "out")
    assert res["dataset"]["kind"] == "jsonl" and res["dataset"]["sources"] == {"a": 2, "b": 1}
    assert res["config"]["decoder"]["top_k"] == 5 and res["warmup"]["requests"] == 0
    assert [r["prompts"] for r in res["requests"]] == [2, 1]
    assert "output tokens/s" in p.stderr  # the summary moved to stderr


def test_run_txt_dataset_flag_output_flag_and_convergence(server, tmp_path):
    (tmp_path / "p.txt").write_text("The quick brown fox\nA GPU draws power\nOnce upon a time\n")
    cfg = write_config(
        tmp_path / "exp.yaml", n=None,
        warmup={"enabled": True, "convergence_detection": True, "cv_threshold": 10.0, "window_size": 2,
                "min_prompts": 2, "max_prompts": 3, "thermal_floor_seconds": 0},
    )
    p = llem("run", cfg, "--server", server.address, "--dataset", "p.txt", "--output", "res2",
             "--precision", "fp32", "--model", MODEL, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "res2")
    check_result(res, requests=2, prompts=3)
    assert res["dataset"]["kind"] == "txt"
    w = res["warmup"]
    assert w["mode"] == "convergence" and w["converged"] is True and w["requests"] == 2  # CV < 10 at the first check


def _greedy_run(server, tmp_path: Path, in_flight: int) -> dict:
    cfg = write_config(tmp_path / f"exp{in_flight}.yaml", n=6, pytorch={"batch_size": 1}, warmup={"enabled": False},
                       baseline={"enabled": False}, output_dir=str(tmp_path / f"out{in_flight}"))
    p = llem("run", cfg, "--server", server.address, "--in-flight", str(in_flight), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / f"out{in_flight}")
    check_result(res, requests=6, prompts=6)
    assert res["measurement"]["in_flight"] == in_flight and res["measurement"]["requests_sent"] == 6
    assert [r["index"] for r in res["requests"]] == list(range(6))  # kept in request order
    assert [line.split(":")[0] for line in p.stderr.splitlines() if line.startswith("request ")] == \
        [f"request {i}/6" for i in range(1, 7)]
    a = res["aggregates"]
    # throughput over the phase's elapsed time, first send to last response
    assert a["wall_time_s"] == pytest.approx(res["measurement"]["elapsed_s"])
    assert a["wall_time_s"] == pytest.approx(max(r["received_at_s"] for r in res["requests"]) - res["requests"][0]["sent_at_s"])
    assert a["output_tokens_per_s"] == pytest.approx(a["output_tokens"] / a["wall_time_s"])
    assert a["server_latency_ms"]["count"] == a["server_queue_wait_ms"]["count"] == 6
    assert "requests in flight" in p.stdout and "server latency p50" in p.stdout
    return res


def test_in_flight_2_matches_sequential_and_overlaps(server, tmp_path):
    one, two = _greedy_run(server, tmp_path, 1), _greedy_run(server, tmp_path, 2)

    def outputs(res: dict) -> list:
        return [(r["prompt_indices"], r["input_tokens"], r["output_tokens"], [c["text"] for c in r["completions"]])
                for r in res["requests"]]

    assert outputs(one) == outputs(two)  # greedy decoding: the same completions, in the same order
    seq, par = one["requests"], two["requests"]
    # one in flight: each request is sent after the previous response came back
    assert all(seq[k + 1]["sent_at_s"] >= seq[k]["received_at_s"] for k in range(5))
    # two in flight: some request was sent while the one before it was still outstanding
    assert any(par[k + 1]["sent_at_s"] < par[k]["received_at_s"] for k in range(5))


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_in_flight_must_be_a_positive_integer(tmp_path, value):
    cfg = write_config(tmp_path / "exp.yaml")
    p = llem("run", cfg, "--server", UNREACHABLE, "--in-flight", value, cwd=tmp_path)
    assert p.returncode == 2
    assert "argument --in-flight" in p.stderr, p.stderr
    assert "cannot reach" not in p.stderr and not (tmp_path / "out").exists()


def test_energy_null_is_recorded_as_disabled(server, tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", energy={"backend": None}, n=2, warmup={"enabled": False})
    p = llem("run", cfg, "--server", server.address, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "out")
    assert res["energy"] == {"backend": "null", "recorded": False}
    assert res["aggregates"]["energy"]["recorded"] is False
    assert all(r["energy"] is None for r in res["requests"])
    assert res["baseline"]["measured"] is False and res["baseline"]["skipped"] == "energy.backend is null"


def test_energy_nvml_without_gpu_energy_fails_clearly(server, tmp_path):
    from llem_client import Client

    with Client(server.address) as c:
        if any(d.energy_sensor.available for d in c.server_info().devices):
            pytest.skip("this server measures energy")
    cfg = write_config(tmp_path / "exp.yaml", energy={"backend": "nvml"})
    p = llem("run", cfg, "--server", server.address, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert "energy.backend is nvml" in p.stderr and "no GPU energy" in p.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_keys_exit_2_with_suggestions(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", datset="x.jsonl", warmup={"n_warmpu": 1}, pytorch={"batch_sise": 2})
    p = llem("run", cfg, "--server", UNREACHABLE, "decoder.temprature=0.5", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    for line in ("datset: unknown key (did you mean 'dataset'?)", "warmup.n_warmpu: unknown key (did you mean 'n_warmup'?)",
                 "pytorch.batch_sise: unknown key (did you mean 'batch_size'?)",
                 "decoder.temprature: unknown key (did you mean 'temperature'?)"):
        assert line in p.stderr, p.stderr
    assert "cannot reach" not in p.stderr  # nothing was sent


def test_bad_types_and_enum_values_exit_2(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", precision="bf61", pytorch={"batch_size": "two"})
    p = llem("run", cfg, "--server", UNREACHABLE, cwd=tmp_path)
    assert p.returncode == 2
    assert "precision: unknown value 'bf61' (did you mean 'bf16'?)" in p.stderr
    assert "pytorch.batch_size: expected an integer" in p.stderr


def test_other_backend_exit_2(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", backend="vllm")
    p = llem("run", cfg, "--server", UNREACHABLE, cwd=tmp_path)
    assert p.returncode == 2
    assert "backend: 'vllm' is not supported" in p.stderr and "pytorch" in p.stderr


def test_unreadable_config_exit_2(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    assert llem("run", tmp_path / "bad.yaml", cwd=tmp_path).returncode == 2
    assert llem("run", tmp_path / "missing.yaml", cwd=tmp_path).returncode == 2


def test_unreachable_server_exit_1(tmp_path):
    cfg = write_config(tmp_path / "exp.yaml")
    p = llem("run", cfg, "--server", UNREACHABLE, cwd=tmp_path, timeout=60)
    assert p.returncode == 1
    assert f"cannot reach llem-server at {UNREACHABLE}" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()


def test_server_side_validation_is_a_config_error(server, tmp_path):
    # config.md rule 1: load_in_4bit with load_in_8bit -> INVALID_ARGUMENT naming the field.
    cfg = write_config(tmp_path / "exp.yaml")
    p = llem("run", cfg, "--server", server.address, "pytorch.load_in_4bit=true", "pytorch.load_in_8bit=true", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "rejected the configuration" in p.stderr and "pytorch.load_in_" in p.stderr


def _sigint_preexec() -> None:
    # A test runner started in the background may ignore SIGINT; Python only turns
    # SIGINT into KeyboardInterrupt when it is not ignored at start.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Cli:
    """The CLI as a subprocess whose stderr is read line by line while it runs."""

    def __init__(self, args: list[str], cwd: Path, marker: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llem_client.cli", *args], cwd=cwd, env=_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_preexec,
        )
        self.lines: list[str] = []
        self.seen = threading.Event()  # set once a stderr line contains marker
        self._marker = marker
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.lines.append(line)
            if self._marker in line:
                self.seen.set()

    def interrupt_and_wait(self, timeout: float = 60) -> str:
        """SIGINT, then the exit; returns stdout. Only the pump reads stderr."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self._pump.join(10)
        return self.proc.stdout.read()  # type: ignore[union-attr]

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


def test_ctrl_c_during_thermal_floor_keeps_warmup_and_exits_130(server, tmp_path):
    cfg = write_config(tmp_path / "exp.yaml", warmup={"enabled": True, "n_warmup": 1, "thermal_floor_seconds": 60})
    cli = _Cli(["run", str(cfg), "--server", server.address], tmp_path, "thermal floor")
    assert cli.seen.wait(120), cli.stderr
    out = cli.interrupt_and_wait()
    assert cli.proc.returncode == 130, cli.stderr
    res = only_result(tmp_path / "out")
    assert res["status"] == "interrupted" and res["stage"] == "warmup"
    assert res["warmup"]["requests"] == 1 and res["requests"] == []
    assert "interrupted" in out  # the summary still prints
    assert "no measured requests" in out and "unavailable: not reported" not in out


def test_ctrl_c_mid_run_writes_partial_result_and_exits_130(server, tmp_path):
    from llem_client import Client, LlemError

    # Keep the server's device busy with long requests so that each of the CLI's
    # requests waits in the queue: the interrupt then lands mid-run, never after it.
    stop = threading.Event()
    errors: list[str] = []

    def blocker() -> None:
        with Client(server.address) as c:
            limit = c.server_info().limits.max_output_tokens or 256
            n = min(128, limit)
            while not stop.is_set():
                try:
                    c.generate(["busy"], model=MODEL, precision="fp32", max_output_tokens=n,
                               decoder={"min_new_tokens": n, "preset": "deterministic"})
                except LlemError as e:
                    errors.append(repr(e))  # shown if the run is not interrupted mid-way
                    time.sleep(0.05)

    t = threading.Thread(target=blocker, daemon=True)
    t.start()
    try:
        # 40 requests, each queued behind a blocker's, keep the run going for seconds after
        # the first (with 6, a run once finished before the interrupt landed).
        cfg = write_config(tmp_path / "exp.yaml", n=40, dataset={"n": 40, "input_len": 12, "seed": 3},
                           pytorch={"batch_size": 1}, warmup={"enabled": False}, baseline={"enabled": False})
        cli = _Cli(["run", str(cfg), "--server", server.address], tmp_path, "request 1/40")
        assert cli.seen.wait(180), cli.stderr
        cli.interrupt_and_wait()
    finally:
        stop.set()
        t.join(timeout=60)
    assert cli.proc.returncode == 130, (cli.stderr, errors[:3])
    res = only_result(tmp_path / "out")
    assert res["status"] == "interrupted" and res["stage"] == "measure"
    assert 1 <= len(res["requests"]) < 40
    assert res["aggregates"]["requests"] == len(res["requests"])
    assert "interrupted during measure" in cli.stderr


def test_run_with_energy_baseline_and_nvml_backend(sim_server, tmp_path):
    # The simulated counter gives every request an energy figure: sums, baseline and J/token are checked.
    cfg = write_config(tmp_path / "exp.yaml", energy={"backend": "nvml"}, baseline={"enabled": True, "duration_seconds": 1})
    p = llem("run", cfg, "--server", sim_server.address, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "out")
    check_result(res, requests=2, prompts=4)
    e = res["aggregates"]["energy"]
    assert e["requests_with_energy"] == 2 and e["requests_without_energy"] == 0
    assert e["total_j"] == pytest.approx(sum(r["energy"]["total_j"] for r in res["requests"]))
    assert e["joules_per_output_token"] == pytest.approx(e["total_j"] / res["aggregates"]["output_tokens"])
    assert res["baseline"]["measured"] is True
    bl = res["baseline"]["response"]["devices"][0]["baseline"]
    assert abs(bl["power_w"] - 150) <= bl["uncertainty_w"] + 1e-6  # within its own reported bound
    assert e["adjusted_j"] is not None  # a baseline exists, so every request has an adjusted figure
    assert e["baseline"]["source"] == "measured by this run" and e["baseline"]["matches_requests"] is True
    assert e["baseline"]["devices"][0]["power_w"] == bl["power_w"]
    assert res["provenance"]["energy_methods"] and res["model_load"]["load_energy"]["available"]
    assert "total energy" in p.stdout and "J per output token" in p.stdout
    # The whole measured phase, time between requests included: 150 W x its length, and at least
    # the requests' own windows (the counter wait between answers is in no request).
    ph = res["measurement"]["phase_energy"]
    (dev,) = ph["devices"]
    assert abs(ph["energy_j"] - 150.0 * dev["duration_s"]) <= ph["uncertainty_j"] + 1e-6
    assert ph["energy_j"] >= e["total_j"] - ph["uncertainty_j"]
    assert dev["duration_s"] >= res["measurement"]["elapsed_s"] * 0.9
    assert "phase energy" in p.stdout and "the requests' own windows" in p.stdout


def test_run_with_deferred_energy_fetches_it_after_the_phase(sim_server, tmp_path):
    # Answers come without the counter wait; the energies arrive from GetEnergy, measured the same way.
    cfg = write_config(tmp_path / "exp.yaml", energy={"backend": "nvml"}, warmup={"enabled": False})
    p = llem("run", cfg, "--server", sim_server.address, "--energy-delivery", "deferred", "--in-flight", "1",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "out")
    check_result(res, requests=2, prompts=4)
    assert res["measurement"]["energy_delivery"] == "deferred"
    for r in res["requests"]:
        # (that the answers did not wait for the counter is a timing, measured by bench/metering.py)
        e = r["energy"]
        assert e["available"], e
        assert abs(e["total_j"] - 150.0 * e["duration_s"]) <= e["uncertainty_j"] + 1e-6
    agg = res["aggregates"]["energy"]
    assert agg["requests_with_energy"] == 2 and agg["total_j"] == pytest.approx(
        sum(r["energy"]["total_j"] for r in res["requests"]))
    out = p.stdout + p.stderr
    assert res["measurement"]["phase_energy"]["energy_j"] is not None
    assert "deferred energy:" in out
    assert "request 1/2: " in out and "energy deferred" in out and "ENERGY_DELIVERY_DEFERRED" not in out


def test_round_robin_loads_on_every_replica_before_measuring(server, sim_server, tmp_path):
    from llem_client import Client

    model = "gpt2"
    for address in (server.address, sim_server.address):  # start cold on both
        with Client(address) as c:
            for m in c.list_models().models:
                if m.config.model == model:
                    c.unload_model(m.config_hash)
    # Warm-up off: a warm-up request must not be what happens to load a replica.
    cfg = write_config(tmp_path / "exp.yaml", model=model, n=6, dataset={"n": 6, "input_len": 8, "seed": 1},
                       pytorch={"batch_size": 1}, warmup={"enabled": False}, baseline={"enabled": False})
    both = f"{server.address},{sim_server.address}"
    p = llem("run", cfg, "--server", both, "--in-flight", "1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "out")
    # no measured request paid for a load, and both servers hold the model
    assert [r["cache_hit"] for r in res["requests"]] == [True] * 6
    for address in (server.address, sim_server.address):
        with Client(address) as c:
            assert any(m.config.model == model for m in c.list_models().models), address
    loads = res["model_load"]["replicas"]
    assert [r["address"] for r in loads] == [server.address, sim_server.address]
    assert [r["address"] for r in res["server"]["replicas"]] == [server.address, sim_server.address]
    assert len({r["config_hash"] for r in loads}) == 1
    e = res["aggregates"]["energy"]
    if e["requests_with_energy"] and e["requests_without_energy"]:  # requests reached both servers
        missing = e["requests_without_energy"]
        line = next(x for x in p.stdout.splitlines() if "requests without energy" in x)
        assert f"{missing} of 6: the total covers the other {6 - missing} only" in line, p.stdout


def test_unwritable_output_folder_fails_before_running(tmp_path):
    (tmp_path / "afile").write_text("not a folder\n")
    cfg = write_config(tmp_path / "exp.yaml")
    for out in ("/proc/nope", str(tmp_path / "afile" / "out")):
        p = llem("run", cfg, "--server", UNREACHABLE, "-o", out, cwd=tmp_path, timeout=60)
        assert p.returncode == 2, p.stderr
        assert f"output_dir: cannot write results under {out}" in p.stderr
        assert "cannot reach" not in p.stderr  # nothing was tried
    # a folder made for a run that wrote nothing is taken away again
    p = llem("run", cfg, "--server", UNREACHABLE, "-o", tmp_path / "new" / "deep", cwd=tmp_path, timeout=60)
    assert p.returncode == 1 and "cannot reach" in p.stderr
    assert not (tmp_path / "new").exists()


def test_result_that_cannot_be_written_still_prints_the_summary(server, tmp_path, monkeypatch, capsys):
    # runner first: it binds results.write_atomic on import, and must keep the real one
    from llem_client import cli, results, runner  # noqa: F401

    def refuse(path, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(results, "write_atomic", refuse)
    cfg = write_config(tmp_path / "exp.yaml", n=2, warmup={"enabled": False}, baseline={"enabled": False})
    code = cli.main(["run", str(cfg), "--server", server.address])
    out, err = capsys.readouterr()
    assert code == 1
    assert "llem-client run summary" in out and "output tokens/s" in out
    assert "cannot write the result under" in err and "Permission denied" in err


def test_a_failed_final_write_points_at_the_checkpoint_it_leaves(server, tmp_path, monkeypatch, capsys):
    """The file saved during the run says "running": the user is told it is not the run's end."""
    from llem_client import cli, results, runner

    assert runner.write_atomic is results.write_atomic  # the checkpoint writes for real

    real = results.write_atomic

    def refuse_the_end(path, data):
        if data["status"] == "running":
            return real(path, data)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "write_atomic", refuse_the_end)
    cfg = write_config(tmp_path / "exp.yaml", n=2, warmup={"enabled": False}, baseline={"enabled": False})
    code = cli.main(["run", str(cfg), "--server", server.address, "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    saved = list((tmp_path / "out").glob("*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["status"] == "running"
    assert f"{saved[0]} holds the results saved during the run (status: running)" in err


def test_an_interrupted_run_gives_the_callers_signal_handlers_back(server, tmp_path, monkeypatch, capsys):
    """cmd_run inside a longer program: after a Ctrl-C it must not leave SIGINT ignored."""
    from llem_client import cli, runner

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "run", interrupted)
    mine = lambda signum, frame: None  # noqa: E731
    before = {sig: signal.signal(sig, mine) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        cfg = write_config(tmp_path / "exp.yaml", n=2, warmup={"enabled": False}, baseline={"enabled": False})
        code = cli.main(["run", str(cfg), "--server", server.address])
        assert code == 128 + signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    capsys.readouterr()


def _run_on_a_terminal(args: list[str], cwd: Path) -> tuple[int, str]:
    """The CLI with stderr on a pseudo-terminal (so the rich progress bar is drawn); returns (code, stderr)."""
    import pty

    master, slave = pty.openpty()
    env = {**_env(), "COLUMNS": "200", "TERM": "xterm"}
    proc = subprocess.Popen([sys.executable, "-m", "llem_client.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks: list[bytes] = []

    def pump() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    proc.communicate(timeout=180)
    t.join(10)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("delivery", ["response", "deferred"])
def test_progress_shows_no_joules_before_energy_is_known(server, tmp_path, delivery):
    # The CPU server measures no energy: the bar must never show 0 J, in either delivery.
    cfg = write_config(tmp_path / "exp.yaml", warmup={"enabled": False}, baseline={"enabled": False})
    code, err = _run_on_a_terminal(["run", str(cfg), "--server", server.address, "--energy-delivery", delivery], tmp_path)
    assert code == 0, err
    assert "measuring" in err and "tok" in err  # the bar was drawn
    assert " 0 J" not in err and "0.00 J" not in err, err
    if delivery == "deferred":
        assert "energy deferred" in err
        assert "deferred energy: unavailable for all 2 request(s)" in err and "0.000 J" not in err, err
    else:
        assert "energy n/a" in err


# --- what the result file needs for publication (audit of llem-client run's files) ---


def test_result_file_identifies_prompts_config_clock_and_warmup_warnings(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Energy is a word number {i}", "source": s}) + "\n"
                            for i, s in enumerate("aabbab")))
    # max_input_tokens 4 truncates every prompt: the warm-up request says so too
    cfg = write_config(tmp_path / "exp.yaml", dataset="prompts.jsonl", dataset_order="interleaved", n=3,
                       max_input_tokens=4, baseline={"enabled": False})
    old = os.umask(0o022)
    try:
        before = time.time()
        p = llem("run", cfg.name, "--server", server.address, cwd=tmp_path)
    finally:
        os.umask(old)
    assert p.returncode == 0, p.stderr
    files = list((tmp_path / "out").glob("*.json"))
    assert len(files) == 1 and (files[0].stat().st_mode & 0o777) == 0o644  # the umask's mode, not 0600
    res = only_result(tmp_path / "out")
    # the prompts' lines in the file (interleaved a a b b a b -> lines 1, 3, 2), not 0..n-1
    assert [r["prompt_indices"] for r in res["requests"]] == [[0, 1], [2]]
    assert [r["dataset_positions"] for r in res["requests"]] == [[1, 3], [2]]
    # the YAML as given, and where the relative paths in argv lead
    assert res["config_file"]["text"] == cfg.read_text() and res["config_file"]["path"] == "exp.yaml"
    assert res["client"]["cwd"] == str(tmp_path) and res["client"]["argv"][1] == "exp.yaml"
    # the measured phase's clock has a wall-clock anchor
    t0 = res["measurement"]["t0_unix"]
    assert before < t0 < time.time()
    assert all(r["sent_at_s"] >= 0 for r in res["requests"])
    w = res["warmup"]
    assert len(w["warnings"]) == w["requests"] == 1
    assert "INPUT_TRUNCATED" in [x["code"] for x in w["warnings"][0]], w


def _long_run(tmp_path: Path, n: int = 300, **extra) -> Path:
    # Many small requests, one at a time: a signal sent after the first few lands mid-run.
    return write_config(tmp_path / "exp.yaml", n=n, dataset={"n": n, "input_len": 8, "seed": 3},
                        pytorch={"batch_size": 1}, warmup={"enabled": False}, baseline={"enabled": False}, **extra)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_run_ended_by_a_signal_keeps_its_records(server, tmp_path, sig):
    cfg = _long_run(tmp_path)
    cli = _Cli(["run", str(cfg), "--server", server.address, "--in-flight", "1"], tmp_path, "request 3/300")
    assert cli.seen.wait(180), cli.stderr
    cli.proc.send_signal(sig)
    cli.proc.wait(60)
    cli._pump.join(10)
    res = only_result(tmp_path / "out")
    if sig == signal.SIGTERM:  # as Ctrl-C: the partial result, the signal named, exit 128 + 15
        assert cli.proc.returncode == 143, cli.stderr
        assert res["status"] == "interrupted" and res["interrupted_by"] == "SIGTERM" and res["stage"] == "measure"
        assert 3 <= len(res["requests"]) < 300
        assert "interrupted during measure by SIGTERM" in cli.stderr
    else:  # nothing runs on SIGKILL: the file saved during the run holds the first request(s)
        assert cli.proc.returncode == -signal.SIGKILL
        assert res["status"] == "running" and res["finished_at"] is None
        assert 1 <= len(res["requests"]) < 300
    assert res["aggregates"]["requests"] == len(res["requests"])


def test_adjusted_energy_says_the_baseline_was_already_on_the_server(sim_server, tmp_path):
    from llem_client import Client

    with Client(sim_server.address) as c:  # another client's baseline, left on the server
        c.measure_baseline(1.0)
    cfg = write_config(tmp_path / "exp.yaml", n=2, warmup={"enabled": False}, baseline={"enabled": False})
    p = llem("run", cfg, "--server", sim_server.address, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "out")
    e = res["aggregates"]["energy"]
    assert e["adjusted_j"] is not None  # it was adjusted although this run measured no baseline
    b = e["baseline"]
    assert b["source"].startswith("already on the server") and b["matches_requests"] is True
    dev = b["devices"][0]
    assert abs(dev["power_w"] - 150) <= dev["uncertainty_w"] + 1e-6 and dev["age_s_at_run_start"] >= 0
    assert dev["measured_unix"] <= time.time()
    row = next(x for x in p.stdout.splitlines() if "adjusted energy" in x)
    assert "already on the server" in row and "old at the start" in row, p.stdout


@pytest.fixture(scope="module")
def short_keep_server(model_root, tmp_path_factory):
    """A simulated-energy server that keeps only its 24 most recent deferred energies."""
    from conftest import start_server, stop_server

    srv = start_server(tmp_path_factory.mktemp("keep-server"), model_root, "--energy-backend", "simulated",
                       "--simulated-power-w", "150", "--deferred-energy-keep", "24")
    yield srv
    stop_server(srv)


def test_refused_deferred_requests_do_not_push_measured_energies_out(short_keep_server):
    """30 refused deferred requests (more than the 24 kept) after a measured one: its energy is
    still there, and each refusal still says why (they used to evict the measured ones)."""
    from llem.v1 import llem_pb2

    from llem_client import Client, InvalidArgument

    with Client(short_keep_server.address, timeout=60) as c:
        c.generate(["kept"], model="llama", max_output_tokens=3, request_id="kept-1", energy_delivery="deferred")
        for i in range(30):
            with pytest.raises(InvalidArgument):
                c.generate(["x"], model="llama", decoder={"temperature": 5.0}, request_id=f"refused-{i}",
                           energy_delivery="deferred")
        kept, refused = c.get_energy(["kept-1", "refused-29"], wait_seconds=5).results
    assert kept.state == llem_pb2.DEFERRED_ENERGY_STATE_SETTLED and kept.energy.available
    assert refused.state == llem_pb2.DEFERRED_ENERGY_STATE_SETTLED
    assert refused.energy.unavailable_reason.startswith("the request did not finish") and "temperature" in \
        refused.energy.unavailable_reason


def test_deferred_energy_is_fetched_as_the_run_goes(short_keep_server, tmp_path):
    # 48 deferred requests against a server keeping 24: fetched only at the end, 24 were lost.
    # Each request is made longer than an energy takes to settle (~100 ms), as on a GPU: the
    # tiny model's 4-token requests (~6 ms) would have ~16 unsettled at once on their own.
    cfg = _long_run(tmp_path, n=48, energy={"backend": "nvml"}, max_output_tokens=64,
                    decoder={"preset": "deterministic", "min_new_tokens": 64})
    p = llem("run", cfg, "--server", short_keep_server.address, "--energy-delivery", "deferred", "--in-flight", "1",
             cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    res = only_result(tmp_path / "out")
    e = res["aggregates"]["energy"]
    assert e["requests_with_energy"] == 48 and e["requests_without_energy"] == 0, e["unavailable_reasons"]
    assert "ENERGY_MISSING" not in res["aggregates"]["warnings"]


def test_interrupted_deferred_run_fetches_the_finished_requests_energy(short_keep_server, tmp_path):
    cfg = _long_run(tmp_path, energy={"backend": "nvml"})
    cli = _Cli(["run", str(cfg), "--server", short_keep_server.address, "--energy-delivery", "deferred",
                "--in-flight", "1"], tmp_path, "request 3/300")
    assert cli.seen.wait(180), cli.stderr
    cli.proc.send_signal(signal.SIGTERM)
    cli.proc.wait(60)
    cli._pump.join(10)
    assert cli.proc.returncode == 143, cli.stderr
    res = only_result(tmp_path / "out")
    assert res["status"] == "interrupted" and len(res["requests"]) >= 3
    for r in res["requests"]:  # fetched before the file was written, not "fetch it with GetEnergy"
        assert r["energy"]["available"], r["energy"]


def test_deferred_energies_from_a_server_without_the_state_field_are_still_asked_again():
    """DEFERRED_ENERGY_STATE_UNSPECIFIED: an older server; its words decide, as the proto says."""
    from llem.v1 import llem_pb2

    from llem_client.runner import _not_settled, _pick_deferred

    def item(reason: str, state=llem_pb2.DEFERRED_ENERGY_STATE_UNSPECIFIED):
        return llem_pb2.RequestEnergy(request_id="r", state=state,
                                      energy=llem_pb2.Energy(available=False, unavailable_reason=reason))

    assert _not_settled(item("not settled within wait_seconds=0: ask again"))
    assert not _not_settled(item("the request did not finish: cancelled"))
    assert _not_settled(item("x", llem_pb2.DEFERRED_ENERGY_STATE_PENDING))
    other = item("no deferred energy for this request id on this server: ...")
    knew = item("the request did not finish: cancelled")
    assert _pick_deferred([other, knew]) is knew
