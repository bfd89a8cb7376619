"""Energy results (``llem_server.energy``, plain data) to ``llem.v1`` messages."""
from __future__ import annotations

from llem.v1 import llem_pb2

from .energy import BaselineResult, EnergyReport, SensorState


def energy(report: EnergyReport) -> llem_pb2.Energy:
    msg = llem_pb2.Energy(available=report.available, unavailable_reason=report.reason,
                          method=report.method_label, duration_s=report.duration_s,
                          provenance=provenance(report.provenance))
    if not report.available:
        msg.absence = llem_pb2.EnergyAbsence.Value(f"ENERGY_ABSENCE_{report.absence or 'MEASUREMENT_FAILED'}")
    c = report.cpu
    msg.cpu.CopyFrom(llem_pb2.CpuEnergy(available=c.available, unavailable_reason=c.reason, domains=c.domains))
    if c.available and c.energy_j is not None:
        msg.cpu.energy_j = c.energy_j
    if not report.available:
        return msg  # no numbers at all: absent is never a zero that looks measured
    msg.total_j = report.total_j
    msg.uncertainty_j = report.uncertainty_j
    msg.low_confidence = report.low_confidence
    msg.exclusive = report.exclusive
    msg.approximate = report.approximate
    if report.adjusted_j is not None:
        msg.adjusted_j = report.adjusted_j
    if report.adjusted_uncertainty_j is not None:
        msg.adjusted_uncertainty_j = report.adjusted_uncertainty_j
    if report.baseline_power_w is not None:
        msg.baseline_power_w = report.baseline_power_w
    if report.joules_per_output_token is not None:
        msg.joules_per_output_token = report.joules_per_output_token
    for d in report.devices:
        de = msg.devices.add(index=d.index, name=d.name or "", uuid=d.uuid or "", energy_j=d.energy_j,
                             avg_power_w=d.avg_power_w, counter_updates=d.counter_updates)
        for name in ("power_limit_w", "persistence_mode", "temperature_start_c", "temperature_end_c",
                     "counter_resolution_mj", "counter_update_ms", "baseline_power_w"):
            val = getattr(d, name)
            if val is not None:
                setattr(de, name, val)
    return msg


def absent(reason: str, absence: int) -> llem_pb2.Energy:
    """Energy not (yet) measured, for a reason that holds for the GPU and CPU parts alike;
    ``absence`` its kind (llem_pb2.ENERGY_ABSENCE_*)."""
    return llem_pb2.Energy(available=False, unavailable_reason=reason, absence=absence,
                           cpu=llem_pb2.CpuEnergy(available=False, unavailable_reason=reason))


def provenance(p: dict[str, str]) -> llem_pb2.Provenance:
    return llem_pb2.Provenance(driver_version=p.get("driver_version", ""), cuda_version=p.get("cuda_version", ""),
                               torch_version=p.get("torch_version", ""),
                               transformers_version=p.get("transformers_version", ""),
                               nvml_version=p.get("nvml_version", ""))


def warnings(report: EnergyReport) -> list[llem_pb2.Warning]:
    return [llem_pb2.Warning(code=c, message=m) for c, m in report.warnings]


def sensor(state: SensorState) -> llem_pb2.EnergySensor:
    return llem_pb2.EnergySensor(available=state.available, unavailable_reason=state.reason, method=state.method,
                                 processes_unseen_reason=state.processes_unseen)


def baseline(b: BaselineResult) -> llem_pb2.Baseline:
    msg = llem_pb2.Baseline(power_w=b.power_w or 0.0, duration_s=b.duration_s, measured_unix=b.measured_unix,
                            age_s=b.age_s, method=b.method, uncertainty_w=b.uncertainty_w,
                            other_processes=b.other_processes)
    if b.models_loaded is not None:
        msg.models_loaded = b.models_loaded
    return msg


def device_baseline(b: BaselineResult) -> llem_pb2.DeviceBaseline:
    msg = llem_pb2.DeviceBaseline(index=b.index, available=b.available, unavailable_reason=b.reason)
    if b.available:
        msg.baseline.CopyFrom(baseline(b))
    return msg
