"""Other processes on a metered GPU: ENERGY_OTHER_PROCESSES (energy/processes.py).

The counter measures the whole GPU, so energy reported for a request includes any other
process's work there. These tests list processes on a simulated NVML, drive the real
sampler and meter on a fake clock, and check which windows are warned, and that the
warning reaches a Generate answer and a baseline through a real server.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from llem_server.energy import EnergyMeter
from llem_server.energy.processes import PROCESS_EVERY_S, ProcessWatch
from llem_server.energy.simulated import NVML_ERROR_NO_PERMISSION, NVMLError, SimGpu, SimulatedNvml

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
    assert "1 other process(es) used GPU 0" in shared and str(OTHER) in shared and str(WORKER) not in shared
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
    assert "NVML listed 2 processes on GPU 0" in two and "90001, 90002" in two


def test_once_our_pid_was_listed_a_lone_stranger_is_named():
    # PIDs proved comparable (the worker was listed at start-up); later the worker's
    # context is gone (a restart) while another process holds the GPU: judged by PID.
    def procs(t):
        return [WORKER] if t < 5.0 else [OTHER]
    _, _, (msg,) = run(procs, [(6.0, 8.0)])
    assert "1 other process(es)" in msg and str(OTHER) in msg


def test_under_mps_the_clients_are_what_is_judged():
    # Under MPS the compute list holds the MPS server (777), which owns the shared context;
    # the clients come from a second call. The server is no "other process".
    clock = FakeClock()
    sim = SimulatedNvml([SimGpu(power=200.0, processes=[777], mps_processes=[WORKER, OTHER])], clock=clock)
    m = EnergyMeter([0], nvml=sim, clock=clock, period_s=0.05, min_period_s=0.001, rapl_root="/x")
    m.set_server_pids(lambda: {WORKER: 0})
    clock.t += 0.013
    while clock.t < T0 + 5.0:
        m.sample_once()
        clock.t += 0.05
    w = m.open_window([0], T0 + 2.0, "r")
    m.close_window(w, T0 + 4.0, 4)
    msg = dict(m.report(w, 0.01).warnings)["ENERGY_OTHER_PROCESSES"]
    assert "(PID 4242)" in msg and "777" not in msg  # the other client, not the MPS server
    sim.gpus[0].mps_processes = [WORKER]  # our worker alone among the clients: nothing to say
    while clock.t < T0 + 8.0:
        m.sample_once()
        clock.t += 0.05
    w = m.open_window([0], T0 + 6.5, "alone")
    m.close_window(w, T0 + 7.5, 4)
    assert "ENERGY_OTHER_PROCESSES" not in dict(m.report(w, 0.01).warnings)


def test_only_this_gpus_worker_proves_the_pids_comparable():
    # In a container, a host PID equal by chance to a sibling worker's PID must not switch
    # judging to PIDs (the GPU's own worker's host PID would then be "another process").
    _, _, (msg,) = run([4101, 90001], [(2.0, 4.0)], server_pids={WORKER: 0, 4101: 1}, gpus=2)
    assert "NVML listed 2 processes" in msg  # still judged by count


def test_a_sibling_worker_with_a_context_on_this_gpu_is_named_as_ours():
    _, _, (msg,) = run([WORKER, 4101], [(2.0, 4.0)], server_pids={WORKER: 0, 4101: 1}, gpus=2)
    assert "4101 (this server's worker for GPU 1)" in msg


def test_no_listing_no_warning_and_no_failure():
    _, m, (unsupported,) = run(None, [(2.0, 4.0)])  # NOT_SUPPORTED: nothing seen, nothing claimed
    assert unsupported == "" and m._devs[0].procs is None
    assert "not supported" in m.sensors()[0].processes_unseen and m.sensors()[0].available

    def denied(t):
        raise NVMLError(NVML_ERROR_NO_PERMISSION)
    _, m, (no_permission,) = run(denied, [(2.0, 4.0)])
    assert no_permission == "" and m._devs[0].procs is None and "no permission" in m.sensors()[0].processes_unseen

    def flaky(t):
        if t < 6.0:
            raise RuntimeError("driver hiccup")
        return [WORKER, OTHER]
    _, m, (failing, recovered) = run(flaky, [(2.0, 4.0), (7.0, 9.0)])
    assert failing == "" and str(OTHER) in recovered and m.sensors()[0].processes_unseen == ""

    def broken(t):
        if t > 3.0:
            raise RuntimeError("driver gone")
        return [WORKER]
    _, m, _ = run(broken, [])
    assert "driver gone" in m.sensors()[0].processes_unseen  # failing now: said, not silent


def test_a_passing_failure_keeps_the_last_listing_a_lasting_one_does_not():
    def procs(t):
        if 3.0 <= t < 4.0 or t >= 7.0:  # one failed listing at ~3.x s; failing for good from 7 s
            raise RuntimeError("hiccup")
        return [WORKER, OTHER]
    _, _, (through_one, after_lasting) = run(procs, [(3.2, 3.9), (10.5, 11.5)])
    assert str(OTHER) in through_one  # the listing before the hiccup still holds
    assert after_lasting == ""  # unknown: nothing claimed


def test_a_listing_is_taken_soon_after_a_window_opens():
    clock = FakeClock()
    state = {"pids": [WORKER]}
    sim = SimulatedNvml([SimGpu(power=200.0, processes=lambda: state["pids"])], clock=clock)
    m = EnergyMeter([0], nvml=sim, clock=clock, period_s=0.05, min_period_s=0.001, rapl_root="/x")
    m.set_server_pids(lambda: {WORKER: 0})

    def listings():
        return sum(1 for _, n in sim.calls_since(0) if n == "nvmlDeviceGetComputeRunningProcesses")

    clock.t += 0.013
    while clock.t < T0 + 2.0:
        m.sample_once()
        clock.t += 0.05
    n = listings()
    while listings() == n:  # up to the next once-a-second listing
        m.sample_once()
        clock.t += 0.05
    for _ in range(11):  # 0.55 s later another process arrives, and a 0.3 s window runs
        m.sample_once()
        clock.t += 0.05
    state["pids"] = [WORKER, OTHER]
    w = m.open_window([0], clock.t, "r")
    for _ in range(6):
        m.sample_once()
        clock.t += 0.05
    m.close_window(w, clock.t, 4)  # ~0.85 s after the last rhythmic listing: the next is after the end
    for _ in range(3):
        m.sample_once()
        clock.t += 0.05
    assert str(OTHER) in dict(m.report(w, 0.01).warnings).get("ENERGY_OTHER_PROCESSES", "")


def test_the_workers_own_children_are_not_other_processes():
    # A compile helper started by the worker may open a context: it works for our requests.
    # Here this test process plays the worker and a real child process its helper.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _, _, (msg,) = run([os.getpid(), child.pid], [(2.0, 4.0)], server_pids={os.getpid(): 0})
        assert msg == ""
        _, _, (msg,) = run([os.getpid(), child.pid, 1], [(2.0, 4.0)], server_pids={os.getpid(): 0})
        assert "(PID 1)" in msg  # a stranger beside it still is
    finally:
        child.kill()
        child.wait()


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
    assert str(OTHER) in codes["ENERGY_OTHER_PROCESSES"] and "idle power includes theirs" in \
        codes["ENERGY_OTHER_PROCESSES"]
    assert str(OTHER) in res.other_processes


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
        # Judged by PID: the server told the meter its worker's PID, which the simulated GPU lists.
        assert r.energy.available and "1 other process(es) used GPU 0 meanwhile (PID 4242)" in \
            warned["ENERGY_OTHER_PROCESSES"] and "host PIDs" not in warned["ENERGY_OTHER_PROCESSES"]
        assert r.energy.exclusive  # this server's own requests did not share the window
        b = c.measure_baseline(duration_s=0.6)
        assert "ENERGY_OTHER_PROCESSES" in {w.code for w in b.warnings}
        assert str(OTHER) in b.devices[0].baseline.other_processes
        r = c.generate(["hello"], model="llama", max_output_tokens=4)
        assert r.energy.HasField("adjusted_j") and "ENERGY_BASELINE_OTHER_PROCESSES" in {w.code for w in r.warnings}
        info = c.server_info()
        assert info.devices[0].energy_sensor.processes_unseen_reason == "" 
    with Client(sim_server.address, timeout=120) as c:  # the simulated GPU lists only its worker
        r = c.generate(["hello"], model="llama", max_output_tokens=4)
        assert r.energy.available and "ENERGY_OTHER_PROCESSES" not in {w.code for w in r.warnings}
