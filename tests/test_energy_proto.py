"""energy_proto: EnergyReport / SensorState / BaselineResult to llem.v1 messages."""
from __future__ import annotations

import pytest

from llem.v1 import llem_pb2
from llem_server import energy_proto
from llem_server.energy import BaselineResult, CpuReport, DeviceReport, EnergyReport, SensorState


def _report(**kw):
    base = dict(available=True, method="nvml_total_energy_counter", attribution="exclusive", exclusive=True,
                total_j=12.5, duration_s=2.0, uncertainty_j=0.4, low_confidence=False,
                devices=[DeviceReport(index=0, name="NVIDIA H200", uuid="GPU-1", energy_j=12.5, avg_power_w=6.25,
                                      power_limit_w=700.0, persistence_mode=True, temperature_start_c=40,
                                      temperature_end_c=44, counter_resolution_mj=1.0, counter_update_ms=100.0,
                                      counter_updates=20)],
                joules_per_output_token=0.125, output_tokens=100,
                provenance={"driver_version": "580.159", "cuda_version": "12.8", "torch_version": "2.11",
                            "transformers_version": "5.17", "nvml_version": "13.580"},
                cpu=CpuReport(True, "", 3.0, ["package-0"]),
                warnings=[("ENERGY_PERSISTENCE_OFF", "x")])
    base.update(kw)
    return EnergyReport(**base)


def test_available_report():
    m = energy_proto.energy(_report())
    assert m.available and m.method == "nvml_total_energy_counter/exclusive" and m.exclusive
    assert m.total_j == 12.5 and m.uncertainty_j == 0.4 and m.joules_per_output_token == 0.125
    assert not m.HasField("adjusted_j") and not m.HasField("baseline_power_w")
    d = m.devices[0]
    assert (d.name, d.uuid, d.counter_updates, d.power_limit_w, d.persistence_mode) == \
        ("NVIDIA H200", "GPU-1", 20, 700.0, True)
    assert not d.HasField("baseline_power_w") and d.HasField("temperature_end_c")
    assert m.provenance.torch_version == "2.11" and m.provenance.nvml_version == "13.580"
    assert m.cpu.available and m.cpu.energy_j == 3.0 and list(m.cpu.domains) == ["package-0"]
    w = energy_proto.warnings(_report())
    assert isinstance(w[0], llem_pb2.Warning) and w[0].code == "ENERGY_PERSISTENCE_OFF"


def test_baseline_fields_and_zero_tokens():
    m = energy_proto.energy(_report(adjusted_j=4.5, baseline_power_w=4.0, joules_per_output_token=None,
                                    adjusted_uncertainty_j=1.25))
    assert m.adjusted_j == 4.5 and m.baseline_power_w == 4.0 and not m.HasField("joules_per_output_token")
    assert m.adjusted_uncertainty_j == 1.25


def test_unavailable_report_carries_reason_and_no_numbers():
    r = EnergyReport(False, "no NVIDIA driver: NVML could not be initialised (NVML_ERROR_LIBRARY_NOT_FOUND)",
                     duration_s=1.0, cpu=CpuReport(False, "no RAPL: /sys/class/powercap does not exist"))
    m = energy_proto.energy(r)
    assert not m.available and "NVML_ERROR_LIBRARY_NOT_FOUND" in m.unavailable_reason
    assert len(m.devices) == 0 and not m.HasField("adjusted_j") and not m.HasField("joules_per_output_token")
    # Absent, not 0: a client (or a JSON mapping that prints defaults) cannot mistake it for measured.
    assert not m.HasField("total_j") and not m.HasField("uncertainty_j")
    assert m.HasField("duration_s") and m.duration_s == 1.0  # the window itself was stamped
    assert not m.cpu.available and "no RAPL" in m.cpu.unavailable_reason and not m.cpu.HasField("energy_j")
    assert not energy_proto.absent("deferred", llem_pb2.ENERGY_ABSENCE_DEFERRED).HasField("duration_s")


def test_sensor_and_baseline():
    s = energy_proto.sensor(SensorState(False, "no GPU", ""))
    assert isinstance(s, llem_pb2.EnergySensor) and s.unavailable_reason == "no GPU"
    b = BaselineResult(0, True, "", 81.0, 30.0, 1.7e9, 5.0, "nvml_total_energy_counter", age_s=12.0)
    db = energy_proto.device_baseline(b)
    assert db.available and db.baseline.power_w == 81.0 and db.baseline.age_s == 12.0
    assert db.baseline.method == "nvml_total_energy_counter"
    bad = energy_proto.device_baseline(BaselineResult(1, False, "GPU 1: not supported"))
    assert not bad.available and not bad.HasField("baseline") and bad.unavailable_reason


def test_from_a_live_simulated_meter():
    from llem_server.energy import EnergyMeter
    from llem_server.energy.simulated import SimGpu, SimulatedNvml

    t = [50.0]
    sim = SimulatedNvml([SimGpu(power=100.0)], clock=lambda: t[0])
    meter = EnergyMeter([0], nvml=sim, clock=lambda: t[0], rapl_root="/x",
                        versions={"torch": "2.11", "transformers": "5.17", "cuda": "12.8"})
    for k in range(30):
        t[0] = 50.03 + k * 0.1
        meter.sample_once()
    w = meter.open_window([0], 50.5, "r")
    meter.close_window(w, 52.5, 0)
    m = energy_proto.energy(meter.report(w, 0.01))
    assert m.available and m.total_j == pytest.approx(200.0, abs=m.uncertainty_j)
    assert not m.HasField("joules_per_output_token")  # 0 output tokens: absent, not 0
    assert m.provenance.cuda_version == "12.8" and m.provenance.driver_version
    assert m.devices[0].uuid == "GPU-sim-0000"
    info = meter.device_static(0)
    assert info["name"] == "Simulated H200" and info["energy_method"] == "nvml_total_energy_counter"
