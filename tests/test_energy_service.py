"""Per-request energy through the real server, on a simulated NVML counter of known power.

The server runs with ``--energy-backend simulated --simulated-power-w 150``: the real
sampler, attribution and proto conversion run above a fake counter whose true energy
over any window is 150 W x its length. Only the hardware is simulated.
"""
from __future__ import annotations

import pytest

from llem_client import Client

POWER_W = 150.0
GREEDY = {"preset": "deterministic"}


@pytest.fixture(scope="module")
def client(sim_server):
    with Client(sim_server.address, timeout=120) as c:
        yield c


def test_generate_reports_the_counter_energy_of_its_window(client):
    r = client.generate(["Hello", "Energy"], model="llama", decoder=GREEDY, max_output_tokens=8,
                        pytorch={"batch_size": 2})
    e = r.energy
    assert e.available, e.unavailable_reason
    assert e.method.startswith("nvml_total_energy_counter") and e.exclusive
    assert e.duration_s > 0
    # the window's true energy is known: power x duration, within the reported bound
    assert abs(e.total_j - POWER_W * e.duration_s) <= e.uncertainty_j + 1e-6
    assert e.joules_per_output_token == pytest.approx(e.total_j / r.usage.output_tokens)
    assert e.low_confidence  # a CPU-sized window is far shorter than 1 s / 10 updates
    assert any(w.code == "ENERGY_SHORT_WINDOW" for w in r.warnings)
    d = e.devices[0]
    assert d.uuid and d.energy_j == pytest.approx(e.total_j)
    assert e.provenance.torch_version and e.provenance.transformers_version
    # the window is the generation, timed in the worker: no longer than the server-side generate time
    assert e.duration_s * 1e3 <= r.timing.generate_ms + 1.0


def test_back_to_back_requests_each_get_their_own_window(client):
    rs = [client.generate([f"p{i}"], model="gpt2", decoder=GREEDY, max_output_tokens=4) for i in range(4)]
    for r in rs:
        assert r.energy.available and r.energy.exclusive
        assert abs(r.energy.total_j - POWER_W * r.energy.duration_s) <= r.energy.uncertainty_j + 1e-6


def test_load_energy_is_measured(client):
    loaded = client.load_model(model="gpt2", pytorch={"attn_implementation": "eager"})
    if not loaded.cache_hit:
        e = loaded.model.load_energy
        assert e.available and e.duration_s > 0
        assert abs(e.total_j - POWER_W * e.duration_s) <= e.uncertainty_j + 1e-6
    listed = {m.config_hash: m for m in client.list_models().models}[loaded.config_hash]
    assert listed.load_energy.available == loaded.model.load_energy.available


def test_baseline_is_measured_and_subtracted(client):
    b = client.measure_baseline(duration_s=0.6)
    dev = b.devices[0]
    assert dev.available and dev.baseline.power_w == pytest.approx(POWER_W, rel=0.05)
    info = client.server_info()
    assert info.devices[0].baseline.power_w == pytest.approx(dev.baseline.power_w)
    assert info.devices[0].energy_sensor.available
    r = client.generate(["after baseline"], model="llama", decoder=GREEDY, max_output_tokens=4)
    e = r.energy
    assert e.HasField("adjusted_j") and e.baseline_power_w == pytest.approx(dev.baseline.power_w)
    assert e.adjusted_j == pytest.approx(e.total_j - e.baseline_power_w * e.duration_s)


def test_bad_baseline_duration_is_invalid(client):
    from llem_client import InvalidArgument

    with pytest.raises(InvalidArgument):
        client.measure_baseline(duration_s=0)
