"""Other processes on a metered GPU: ENERGY_OTHER_PROCESSES (energy/processes.py).

The counter measures the whole GPU, so energy reported for a request includes any other
process's work there. These tests list processes on a simulated NVML, drive the real
sampler and meter on a fake clock, and check which windows are warned, and that the
warning reaches a Generate answer and a baseline through a real server.
"""
from __future__ import annotations

import time

import pytest

from llem_server.energy import EnergyMeter
from llem_server.energy.processes import PROCESS_EVERY_S, ProcessWatch
from llem_server.energy.simulated import SimGpu, SimulatedNvml

T0 = 1000.0
WORKER, OTHER = 4100, 4242


class FakeClock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(procs, windows, server_pids=None, gpus=1):
    """Sample 0-12 s (fake) with ``procs(t_rel)`` listed on GPU 0; report each (a, b) window."""
    clock = FakeClock()
    gpu_list = [SimGpu(power=200.0, processes=(lambda: procs(clock.t - T0)) if callable(procs) else procs)
                for _ in range(gpus)]
    sim = SimulatedNvml(gpu_list, clock=clock)
    m = EnergyMeter(list(range(gpus)), nvml=sim, clock=clock, period_s=0.05, min_period_s=0.001,
                    rapl_root="/nonexistent-powercap")
    m.set_server_pids(lambda: dict(server_pids if server_pids is not None else {WORKER: 0}))
    clock.t += 0.013
    while clock.t < T0 + 12:
        m.sample_once()
        clock.t += 0.05
    m.sample_once()
    out = []
    for a, b in windows:
        w = m.open_window([0], T0 + a, f"r{a}")
        m.close_window(w, T0 + b, 10)
        r = m.report(w, timeout_s=0.01)
        assert r.available
        out.append(dict(r.warnings).get("ENERGY_OTHER_PROCESSES", ""))
    return sim, m, out


def test_own_worker_alone_is_not_warned_another_process_is_named():
    _, _, (alone,) = run([WORKER], [(2.0, 4.0)])
    assert alone == ""
    sim, m, (shared,) = run([WORKER, OTHER], [(2.0, 4.0)])
    assert "1 other compute process(es)" in shared and str(OTHER) in shared and str(WORKER) not in shared
    assert "measures the whole GPU" in shared
    # The energy is still the counter's over the window, and this server's attribution is unchanged.
    w = m.open_window([0], T0 + 5.0, "again")
    m.close_window(w, T0 + 7.0, 10)
    r = m.report(w, timeout_s=0.01)
    assert r.exclusive and r.attribution == "exclusive"
    assert abs(r.total_j - sim.true_energy_j(0, T0 + 5.0, T0 + 7.0)) <= r.uncertainty_j


def test_only_listings_in_force_during_the_window_count():
    # OTHER is listed from 6 s to 8 s (seen at the next once-a-second listing).
    def procs(t):
        return [WORKER, OTHER] if 6.0 <= t < 8.0 else [WORKER]
    _, _, (before, during, straddling, after) = run(procs, [(2.0, 4.5), (6.5, 7.5), (5.2, 6.8), (9.5, 11.0)])
    assert before == "" and after == ""
    assert str(OTHER) in during and str(OTHER) in straddling


def test_listing_runs_about_once_a_second_on_the_sampler_not_every_read():
    sim, _, _ = run([WORKER], [])
    listings = sum(1 for _, name in sim.calls_since(0) if name == "nvmlDeviceGetComputeRunningProcesses")
    # 12 fake seconds of reads every 50 ms: ~240 reads, ~12 listings (+1: the probe at start-up).
    assert 11 <= listings <= 14, listings


def test_host_pids_from_a_container_are_judged_by_count():
    # In a PID namespace the driver's PIDs are the host's: the worker's own PID is not among them.
    _, _, (one,) = run([90001], [(2.0, 4.0)])
    assert one == ""  # one process: taken to be the worker
    _, _, (two,) = run([90001, 90002], [(2.0, 4.0)])
    assert "NVML listed 2 compute processes" in two and "90001, 90002" in two


def test_a_sibling_worker_with_a_context_on_this_gpu_is_named_as_ours():
    _, _, (msg,) = run([WORKER, 4101], [(2.0, 4.0)], server_pids={WORKER: 0, 4101: 1}, gpus=2)
    assert "4101 (this server's worker for GPU 1)" in msg


def test_no_listing_no_warning_and_no_failure():
    _, m, (unsupported,) = run(None, [(2.0, 4.0)])  # NOT_SUPPORTED: nothing seen, nothing claimed
    assert unsupported == "" and m._devs[0].procs is None

    def flaky(t):
        if t < 6.0:
            raise RuntimeError("driver hiccup")
        return [WORKER, OTHER]
    _, _, (failing, recovered) = run(flaky, [(2.0, 4.0), (7.0, 9.0)])
    assert failing == "" and str(OTHER) in recovered


def test_watch_keeps_changes_only_and_is_bounded():
    clock = FakeClock()
    state = {"pids": frozenset({1})}
    w = ProcessWatch(0, lambda: state["pids"], clock, keep=8)
    for i in range(100):  # a steady GPU: one listing kept
        w.poll()
        clock.t += PROCESS_EVERY_S
    assert len(w._changes) == 1
    for i in range(100):  # a process coming and going every second: the last 8 kept
        state["pids"] = frozenset({1, 2}) if i % 2 else frozenset({1})
        w.poll()
        clock.t += PROCESS_EVERY_S
    assert len(w._changes) == 8


def test_baseline_with_another_process_says_so():
    sim = SimulatedNvml([SimGpu(power=80.0, update_period_s=0.02, processes=[WORKER, OTHER])])
    m = EnergyMeter([0], nvml=sim, period_s=0.01, min_period_s=0.005, rapl_root="/x")
    m.set_server_pids(lambda: {WORKER: 0})
    m.start()
    try:
        time.sleep(0.1)
        res = m.measure_baseline(0.3)[0]
    finally:
        m.close()
    assert res.available
    codes = dict(res.warnings())
    assert str(OTHER) in codes["ENERGY_OTHER_PROCESSES"] and "not the serving state's idle power" in \
        codes["ENERGY_OTHER_PROCESSES"]


# ---------------------------------------------------------------- through a real server
@pytest.fixture(scope="module")
def shared_gpu_server(tmp_path_factory, model_root):
    from conftest import start_server

    srv = start_server(tmp_path_factory.mktemp("other-pids"), model_root, "--energy-backend", "simulated",
                       "--simulated-other-pids", str(OTHER))
    yield srv
    srv.stop(30)


def test_generate_and_baseline_answers_carry_the_warning(shared_gpu_server, sim_server):
    from llem_client import Client

    with Client(shared_gpu_server.address, timeout=120) as c:
        r = c.generate(["hello"], model="llama", max_output_tokens=4)
        warned = {w.code: w.message for w in r.warnings}
        assert r.energy.available and str(OTHER) in warned["ENERGY_OTHER_PROCESSES"]
        assert r.energy.exclusive  # this server's own requests did not share the window
        b = c.measure_baseline(duration_s=0.6)
        assert "ENERGY_OTHER_PROCESSES" in {w.code for w in b.warnings}
    with Client(sim_server.address, timeout=120) as c:  # the simulated GPU lists only its worker
        r = c.generate(["hello"], model="llama", max_output_tokens=4)
        assert r.energy.available and "ENERGY_OTHER_PROCESSES" not in {w.code for w in r.warnings}
