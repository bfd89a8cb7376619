"""Per-request GPU energy: NVML samplers, attribution, baseline, RAPL (stdlib + pynvml at the edge).

See ``meter.py`` for the method; ``EnergyMeter`` is what the service uses.
"""
from .baseline import BaselineResult
from .meter import (METHOD_COUNTER, METHOD_POWER, METHOD_RAPL, CpuReport, DeviceReport, EnergyMeter, EnergyReport,
                    SensorState, Window)

__all__ = ["BaselineResult", "CpuReport", "DeviceReport", "EnergyMeter", "EnergyReport", "METHOD_COUNTER",
           "METHOD_POWER", "METHOD_RAPL", "SensorState", "Window"]
